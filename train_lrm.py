"""Offline pretraining of the latent reward model (VELR §4.1, Eq. 6, App. C.1): it regresses the
pixel reward of the decoded latent, R(Dec(z), prompt), from the latent and the prompt embedding
with the Huber loss. Every member walks its own shuffled order of each epoch, so the members stay
diverse beyond their own initialisations. Paper defaults: batch 4 per rank, lr 2e-5, ~3 epochs,
10 members, bf16. After every epoch: MSE and Pearson on train and held-out samples per member and
for the ensemble mean (the layout of the paper's Table 3), in `metrics.jsonl`.

Data: prepare_data.py's shards (`--data`, shards.py), or a small synthetic set built in-process.
Options beside the paper: `--model dollar` (the Dollar baseline), `--model dit` (the generator's
first blocks + heads, PRFL's design, arXiv 2511.21541; lrm_dit.py), `--noise-aware` (DiNa-LRM's
timestep-conditioned LRM on re-noised latents, arXiv 2602.11146; as there, a pair's two sides share
sigma and noise, and Thurstone draws sigma ~ U[0, 1] snapped to the sampler's grid), `--loss
bce` (PRFL's binary cross-entropy on binary labels, `--label-threshold`), `--loss bt|thurstone`
(pairs of one prompt, or `--pairs FILE`), with per-noise-level metrics. The flags
are the fields of `LRMTrainConfig`. DDP over ranks; `--resume` continues bit for bit; files are
written through runs.py.

    python train_lrm.py                                      # tiny synthetic run, CPU
    torchrun --nproc_per_node=8 train_lrm.py --data data/lrm --config default --out runs/lrm

Left out: gradient accumulation (the paper uses none), learning-rate schedules (constant lr).
"""

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lrm
import lrm_dit
import rewards
import distributed
import runs
import sample
import shards
import text_encoder
import toy

DESCRIPTION = "Huber pretraining of the ensemble latent reward model"


@dataclass
class LRMTrainConfig:
    """The command line: one flag per field (`--batch-size` for batch_size), the trailing comment its
    --help (runs.parse_config)."""

    # data
    data: str | None = None  # folder of prepare_data.py shards (index.json); None: --synthetic
    synthetic: int = 128  # samples of the in-process synthetic set
    synthetic_reward: str = "color"  # pixel reward of the synthetic set (toy:calibrated_color spreads the
        # rewards of one prompt, which pairs need)
    test_frac: float = 0.2  # held-out share of the samples
    # model
    model: Literal["dit", "dollar", "ensemble"] = "ensemble"  # ensemble (VELR), dollar (baseline) or dit (the
        # generator's first blocks + N heads; --dit-*)
    config: Literal["default", "tiny"] = "tiny"  # LRM size: default for real latents (text width 4096), tiny for
        # the toy world
    members: int = 10  # ensemble size; the Dollar baseline has 1
    dit_ckpt: str | None = None  # --model dit: the generator whose first blocks are the trunk (anything
        # model_dit.load_dit reads, or `toy`: the toy world's pretrained generator, built once and cached in
        # $VELR_CACHE/toy); None: the toy world's tiny DiT with random weights
    dit_blocks: int | None = None  # --model dit: blocks of the generator kept (None: 8 as PRFL, at most all)
    dit_trunk: Literal["frozen", "lora", "full"] = "frozen"  # --model dit: frozen trunk, LoRA adapters on its
        # blocks trained with the heads, or full: the blocks' weights trained (PRFL) at --dit-trunk-lr
    dit_trunk_lr: float = 1e-6  # --model dit --dit-trunk full: the blocks' learning rate (PRFL's)
    dit_dtype: Literal["fp32", "bf16"] = "fp32"  # --model dit: the trunk's weights; bf16 halves its memory and
        # file (Wan's fp32 islands kept, run under bf16 autocast as the generator is)
    dit_lora_rank: int = 16  # --model dit --dit-trunk lora: rank, alpha = rank
    dit_mlp: str | None = None  # --model dit: hidden widths of each head's MLP, comma-separated (None: 1024,512
        # as PRFL with --dit-ckpt, 64,32 for the toy DiT)
    # training (paper App. C.1)
    epochs: int = 3  # passes over the training samples
    batch_size: int = 4  # per rank and member
    lr: float = 2e-5  # AdamW learning rate, constant
    huber_delta: float = 1.0  # the Huber loss's delta
    seed: int = 0  # initialisation, split, data order and noise
    # noise awareness and pairs (options; the paper's LRM: neither)
    loss: Literal["huber", "bce", "bt", "thurstone"] = "huber"  # huber: regress the reward (paper Eq. 6); bce:
        # binary cross-entropy on binary quality labels, the score a logit (PRFL); bt: Bradley-Terry on pairs;
        # thurstone: DiNa-LRM's noise-calibrated Thurstone fidelity loss on pairs
    label_threshold: float | None = None  # --loss bce: a reward above it is label 1, else 0; None: the rewards are
        # the labels and must lie in [0, 1] (binary, or soft)
    pair_margin: float = 0.02  # pairs (same prompt) whose rewards differ by less are near-ties and dropped
    pairs: str | None = None  # preference file for --loss bt|thurstone: jsonl of {"a": source, "b": source,
        # "p": P(a preferred)}, sources as prepare_data.py recorded them in --data; None: pairs formed from the labels
    noise_aware: bool = False  # timestep-conditioned LRM trained on re-noised latents z = (1 - s) z0 + s eps,
        # s from the sampler's schedule (--sigma-draw); the label stays the clean latent's reward
    clean_prob: float = 0.1  # --noise-aware: share of clean (s = 0) latents
    image_cond: bool = False  # image-to-video: the LRM also reads the conditioning image's latent
        # (LRMConfig.image_cond); trained here on each video's own first latent frame, the image an I2V model is given
    sigma_draw: Literal["uniform", "grid"] | None = None  # --noise-aware: how s is drawn from the sampler's grid:
        # uniform (DiNa-LRM: u ~ U[0, 1] snapped to the nearest grid sigma) or grid (each of its steps equally
        # likely: most mass at high noise); None: uniform for --loss thurstone, grid for huber and bt
    pair_noise: Literal["shared", "independent"] = "shared"  # --noise-aware --loss bt|thurstone: shared (DiNa-LRM:
        # both sides of a pair re-noised with one noise draw, so the score difference comes from the latents, not
        # the noise, the setting its v(s) is calibrated for) or independent (a draw per side, as runs before this
        # flag did)
    sample_steps: int = 50  # --noise-aware: the sampler's steps (toy world: 20)
    shift: float = 5.0  # --noise-aware: the sampler's shift
    solver: Literal["unipc", "euler"] = "unipc"  # --noise-aware: the sampler, its sigma grid (toy world: euler)
    eval_sigmas: str = "0,0.3,0.6,0.9"  # --noise-aware: noise levels of the per-sigma metrics, comma-separated
    # run
    out: str = "runs/lrm"  # run folder; a non-empty one needs --resume or --overwrite
    save_every: int = 100  # steps between checkpoints, also at every epoch end
    resume: str | None = None  # ckpt.pt to continue from
    overwrite: bool = False  # replace the run in a non-empty --out (its files go once the data and flags are checked)
    stop_after: int | None = None  # exit right after this step as a crash would (no export), to test --resume
    allow_changed: str | None = None  # --resume: settings of RUN_KEYS that may differ from the checkpoint's,
        # comma-separated flag names (dashes optional: lr,huber-delta); each change is recorded in metrics.jsonl
        # as {"step", "changed": {key: [old, new]}}
    log_every: int = 10  # steps between log lines
    max_bad_steps: int = 10  # stop with an error once more than this many steps were skipped for non-finite
        # loss, gradients or labels


# Named presets (runs.parse_config): the defaults above are the paper's (VELR App. C.1: batch 4 per
# rank, lr 2e-5, 3 epochs, 10 members), so `paper` changes nothing. The toy world's sampler
# (--sample-steps 20 --solver euler) is no preset: a noise-aware run in it passes those flags.
PRESETS = {"paper": {}}

RUN_FILES = ("args.json", "metrics.jsonl", "ckpt.pt", "lrm.safetensors", "sync.json")  # what --overwrite removes
CKPT_KEYS = ("model", "optimizer", "step")
# The settings that shape the result: a checkpoint (its "run") continues only under the same ones
# (--epochs may grow; --allow-changed accepts others on purpose).
RUN_KEYS = ("data", "synthetic", "synthetic_reward", "test_frac", "model", "config", "members", "dit_ckpt", "dit_blocks",
            "dit_trunk", "dit_trunk_lr", "dit_dtype", "dit_lora_rank", "dit_mlp", "batch_size", "lr", "huber_delta", "seed", "loss",
            "label_threshold",
            "pair_margin", "pairs", "noise_aware", "clean_prob", "sigma_draw", "pair_noise", "sample_steps", "shift",
            "solver", "image_cond")


def run_settings(args) -> dict:
    """The RUN_KEYS of a parsed config, as a checkpoint records them (dit_mlp as a list)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(args, k)) for k in RUN_KEYS)}


def saved_settings(run: dict) -> dict:
    """A checkpoint's run settings with sigma_draw and pair_noise filled in, when it predates them, as the
    code then behaved (noise-aware: sigma uniform over the grid, a noise draw per pair side), so that
    resuming it under today's defaults is refused rather than changing the recipe midway."""
    if not run or "sigma_draw" in run:
        return run
    noisy, pairs = bool(run.get("noise_aware")), run.get("loss") in ("bt", "thurstone")
    return {"sigma_draw": "grid" if noisy else None, "pair_noise": "independent" if noisy and pairs else "shared",
            **run}


# ---------------------------------------------------------------------------------------------
def fit_to_latents(cfg, shape):
    """The LRM config for latents of `shape` (C, T, H, W): in_channels from the data (16 for every
    Wan 2.1-VAE model, the A14B included; 48 for the TI2V-5B's Wan 2.2 VAE), and position tables
    grown to cover the latent grid where the config's are smaller (the 5B's 121 frames give 31)."""
    c, t, h, w = shape
    return replace(cfg, in_channels=c, max_frames=max(cfg.max_frames, t), max_height=max(cfg.max_height, h),
                   max_width=max(cfg.max_width, w))


# Data: rows {"latent", "context" (L, C) without padding, "reward"} (shards.ShardRows or synthetic)


class TooManyBadSteps(RuntimeError):
    """More steps were skipped for non-finite labels, loss or gradients than --max-bad-steps allows."""


@torch.no_grad()
def synthetic_data(n, seed, reward="color", batch=32):
    """n rows from the toy world ($VELR_TOY_WORLD, toy.py): its procedural videos through its tiny VAE
    (random weights; the watchable world's trained one from assets/), toy captions through the tiny
    UMT5, target = the built-in pixel reward of the decoded latent."""
    world = toy.WORLDS[toy.default_world()]  # its video size: 5 frames of 32x32 -> latents 16x2x4x4
    _, vae, encoder, tokenizer = toy.build_models(seed)
    if world.vae_steps:
        toy.check_trained(world)
        vae = toy.read_toy_vae(toy.ASSETS / "toy_vae.safetensors", world)
    reward_fn, g, rows = rewards.load_reward(reward), torch.Generator().manual_seed(seed), []
    for i in range(0, n, batch):
        videos = toy.world_videos(min(batch, n - i), world, g)
        prompts = toy.toy_prompts(len(videos), g)
        z = vae.encode(videos)
        target = reward_fn(vae.decode(z), prompts).float()
        context, lengths = text_encoder.encode_prompts(prompts, tokenizer, encoder)
        rows += [{"latent": z[j], "context": context[j, : lengths[j]], "reward": target[j].item(), "prompt": prompts[j]}
                 for j in range(len(z))]
    return rows


def prompts_and_rewards(data) -> tuple[list[str], list[float]]:
    """Every sample's prompt (the group its pairs are formed in) and reward."""
    if hasattr(data, "prompts_and_rewards"):
        return data.prompts_and_rewards()
    return [r["prompt"] for r in data], [r["reward"] for r in data]


def collate(rows, device, longest=None):
    """rows -> z (B, 16, T, H, W), context (B, L, C) zero-padded to the longest (or `longest`),
    lengths (B,), target (B,)."""
    longest = longest or max(r["context"].shape[0] for r in rows)
    context = torch.zeros(len(rows), longest, rows[0]["context"].shape[1])
    for i, r in enumerate(rows):
        context[i, : r["context"].shape[0]] = r["context"].float()
    z = torch.stack([r["latent"] for r in rows]).float()
    lengths = torch.tensor([r["context"].shape[0] for r in rows])
    target = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
    return z.to(device), context.to(device), lengths.to(device), target.to(device)


def split(n, test_frac, seed):
    """Seeded held-out split by sample -> (train indices, test indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(n * test_frac))
    if n_test >= n:
        raise ValueError(f"test_frac {test_frac} leaves no training samples out of {n}")
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def member_batches(rows_per_member, device):
    """One list of rows per member -> z (N, B, 16, T, H, W), context (N, B, L, C), lengths (N, B),
    target (N, B): each member's own minibatch, in the layout `lrm.lrm_update` takes."""
    longest = max(r["context"].shape[0] for rows in rows_per_member for r in rows)
    parts = [collate(rows, device, longest) for rows in rows_per_member]
    return tuple(torch.stack(t) for t in zip(*parts))


def epoch_order(train, epoch, seed):
    """The shuffled training order of one epoch: a function of (seed, epoch), so resume recomputes it."""
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [train[i] for i in perm.tolist()]


MEMBER_SEED_STRIDE = 7919  # member m shuffles each epoch with seed + 7919 m


# ---------------------------------------------------------------------------------------------
# Noise-aware and pairwise training (options; PRFL / LPO / DiNa-LRM, see the README)


def sigma_grid(args) -> torch.Tensor:
    """The sampler's shifted schedule (sample.get_sigmas) without its final 0: the levels a
    noise-aware LRM is trained on, one per sampling step."""
    return sample.get_sigmas(args.sample_steps, args.shift, args.solver)[:-1].float()


def step_noise(args, step: int, rank: int, shape, sides: int = 1) -> tuple[torch.Tensor, list]:
    """This step's noise levels (shape[:2], e.g. (N, B); drawn as --sigma-draw says) and `sides` noise
    draws of `shape` (pairs: 1 when both sides share the noise, 2 for a draw per side): a function of
    (seed, step, rank), so --resume redraws exactly what the lost steps drew."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + rank + 17)
    sigma = lrm.draw_sigmas(shape[:2], sigma_grid(args), args.clean_prob, g, args.sigma_draw)
    return sigma, [torch.randn(tuple(shape), generator=g) for _ in range(sides)]


def renoise(z, sigma, noise):
    """z (N, B, 16, T, H, W) -> z_sigma = (1 - sigma) z + sigma eps with sigma (N, B)."""
    return lrm.noise_latents(z, sigma.to(z.device), noise.to(z.device))


def fixed_noise(index: int, shape, seed: int) -> torch.Tensor:
    """The evaluation noise of sample `index`: the same at every epoch, rank and batch size."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + index))


def pair_batches(data, pairs_per_member, device):
    """One list of (a, b, p) per member -> z_a, z_b (N, P, 16, T, H, W), context (N, P, L, C), lengths
    (N, P), p (N, P): `lrm.lrm_pair_update`'s layout. Both sides of a pair share the prompt."""
    rows = {i: data[i] for pairs in pairs_per_member for a, b, _ in pairs for i in (a, b)}
    longest = max(r["context"].shape[0] for r in rows.values())
    za, zb, ctx, lens, ps = [], [], [], [], []
    for pairs in pairs_per_member:
        z, c, n, _ = collate([rows[a] for a, _, _ in pairs], device, longest)
        za.append(z), ctx.append(c), lens.append(n)
        zb.append(collate([rows[b] for _, b, _ in pairs], device, longest)[0])
        ps.append(torch.tensor([p for _, _, p in pairs], dtype=torch.float32, device=device))
    return torch.stack(za), torch.stack(zb), torch.stack(ctx), torch.stack(lens), torch.stack(ps)


def form_pairs(data, indices, margin, seed) -> list[tuple[int, int, float]]:
    """Preference pairs among `indices`: same prompt, rewards at least `margin` apart (lrm.make_pairs),
    each in a seeded random order -> [(a, b, p)] with data indices."""
    prompts, labels = prompts_and_rewards(data)
    a, b, p = lrm.make_pairs([prompts[i] for i in indices], [labels[i] for i in indices], margin,
                             torch.Generator().manual_seed(seed + 31337))
    return [(indices[i], indices[j], q) for i, j, q in zip(a.tolist(), b.tolist(), p.tolist())]


def read_preferences(path, data) -> list[tuple[int, int, float]]:
    """A preference file: jsonl, one {"a": SOURCE, "b": SOURCE, "p": P(a preferred)} per line, SOURCE a
    video or latent file as prepare_data.py recorded it in the shards of --data (their "sources").
    -> [(row a, row b, p)]; an unknown source, a p outside [0, 1] or a malformed line is an error
    naming the line."""
    if not hasattr(data, "sources"):
        raise ValueError("--pairs needs --data (prepare_data.py shards whose sources the file names)")
    row_of = {src: i for i, src in enumerate(data.sources())}
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            a, b, p = row_of[item["a"]], row_of[item["b"]], float(item["p"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} line {n}: expected {{\"a\": source, \"b\": source, \"p\": number}} with sources "
                             f"of the --data shards, got {line.strip()[:120]!r} ({type(err).__name__}: {err})") from None
        if not 0 <= p <= 1:
            raise ValueError(f"{path} line {n}: p must be in [0, 1], got {p}")
        pairs.append((a, b, p))
    return pairs


def split_pairs(pairs, indices) -> list[tuple[int, int, float]]:
    """The pairs whose both sides are among `indices` (a pair across the train/test split is used by neither)."""
    keep = set(indices)
    return [q for q in pairs if q[0] in keep and q[1] in keep]


def pair_prob(d, sigma, objective, resid_var=None):
    """P(a > b) an LRM gives for score differences d: sigmoid(d) (Bradley-Terry, and BCE's logits), DiNa-LRM's
    Phi(d / sqrt(2 v(sigma))) (Thurstone), and for a Huber regressor Phi(d / sqrt(2 m)) with m its
    residual variance (its training MSE at that sigma): each side read as the label plus Gaussian noise."""
    if objective in ("bt", "bce"):  # bce: two binary-quality logits compared as Bradley-Terry scores
        return lrm.bt_prob(d, torch.zeros_like(d))
    if objective == "thurstone":
        return lrm.thurstone_prob(d, torch.zeros_like(d), sigma)
    return torch.special.ndtr(d / (2 * max(resid_var, 1e-8)) ** 0.5)


def calibration_error(prob, outcome, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of P of (share of pairs) x |mean P -
    observed frequency of a > b|."""
    idx = (prob * bins).long().clamp(0, bins - 1)
    err = 0.0
    for k in range(bins):
        m = idx == k
        if m.any():
            err += m.float().mean().item() * abs(prob[m].mean().item() - outcome[m].mean().item())
    return err


@torch.no_grad()
def scores_at(model, data, indices, sigma, batch_size, device, amp, seed):
    """Ensemble-mean scores (n,) and labels (n,) of `indices`, each latent re-noised at `sigma` with
    its fixed evaluation noise (sigma 0: the clean latent)."""
    model.eval()
    out = []
    for i in range(0, len(indices), batch_size):
        chunk = indices[i : i + batch_size]
        z, context, lengths, target = collate([data[j] for j in chunk], device)
        if sigma:
            noise = torch.stack([fixed_noise(j, z.shape[1:], seed) for j in chunk]).to(device)
            z = lrm.noise_latents(z, sigma, noise)
        with amp:
            r = model(z, context, lengths, sigma=sigma or None) if sigma else model(z, context, lengths)
        out.append(torch.stack([r.float().mean(0), target]))
    model.train()
    return torch.cat(out, 1) if out else torch.zeros(2, 0)


def sigma_metrics(model, data, train, test, args, device, amp) -> dict:
    """Per evaluation sigma (PRFL's per-timestep table): held-out MSE and Pearson correlation of the
    ensemble mean against the clean latent's reward, pairwise accuracy on the held-out pairs (same
    prompt, at least --pair-margin apart) and the expected calibration error of P(a > b)
    (`pair_prob`). Every rank computes all of it (the same numbers)."""
    test_pairs = split_pairs(args.preferences, test) if args.pairs else form_pairs(data, test, args.pair_margin, args.seed + 1)
    pos = {j: k for k, j in enumerate(test)}
    objective = args.loss
    out = {}
    for sigma in (args.eval_sigmas if args.noise_aware else [0.0]):
        pred, target = scores_at(model, data, test, sigma, args.batch_size, device, amp, args.seed)
        seen, label = readout(pred, target, args)
        keep = torch.isfinite(label)
        mse, pcc = mse_pcc(sums(seen[keep][None], label[keep]))
        res = {"test_mse": mse.item(), "test_pcc": pcc.item()}
        if test_pairs:
            a = torch.tensor([pos[x] for x, _, _ in test_pairs])
            b = torch.tensor([pos[y] for _, y, _ in test_pairs])
            p = torch.tensor([q for _, _, q in test_pairs])
            d = (pred[a] - pred[b]).float()
            resid = None
            if objective == "huber":  # the regressor's residual variance at this sigma, on the training set
                tr, tt = scores_at(model, data, train, sigma, args.batch_size, device, amp, args.seed)
                ok = torch.isfinite(tt)
                resid = (tr[ok] - tt[ok]).pow(2).mean().item()
            res.update(pair_acc=((d > 0).float() == (p > 0.5).float())[p != 0.5].float().mean().item(),
                       ece=calibration_error(pair_prob(d, sigma, objective, resid), p), pairs=len(test_pairs))
        out[f"{sigma:g}"] = res
    return out


# ---------------------------------------------------------------------------------------------
# Metrics (paper Table 3: MSE and Pearson correlation, train and test)


def sums(pred, target):
    """pred (M, B), target (B,) -> (M, 7) sums: n, Σp, Σt, Σp², Σt², Σpt, Σ(p-t)². Sums add up over
    batches and ranks (one all-reduce), and give MSE and Pearson exactly."""
    pred = pred.double()
    t = target.double().expand_as(pred)
    n = torch.full_like(pred[:, 0], pred.shape[1])
    cols = [n, pred.sum(1), t.sum(1), (pred * pred).sum(1), (t * t).sum(1), (pred * t).sum(1), ((pred - t) ** 2).sum(1)]
    return torch.stack(cols, dim=1)


def mse_pcc(s):
    """(M, 7) sums -> (mse (M,), pearson (M,))."""
    n, sp, st, spp, stt, spt, se = s.unbind(1)
    cov = spt - sp * st / n
    var_p, var_t = spp - sp * sp / n, stt - st * st / n
    return se / n, cov / (var_p * var_t).clamp_min(1e-30).sqrt()


def readout(score, target, args):
    """(what the metrics compare, against what): the score and the reward; --loss bce: the
    probability sigmoid(score) and the binary label (lrm.bce_targets)."""
    if getattr(args, "loss", "huber") != "bce":
        return score, target
    return score.float().sigmoid(), lrm.bce_targets(target, args.label_threshold)


@torch.no_grad()
def evaluate(model, data, indices, batch_size, device, amp, args=None):
    """(M + 1, 7) sums over `indices` (this rank's share): one row per member, the last for the
    ensemble mean (of the scores; --loss bce: of the probabilities, against the labels)."""
    model.eval()
    total = torch.zeros(model.n_members + 1, 7, dtype=torch.float64, device=device)
    for i in range(0, len(indices), batch_size):
        z, context, lengths, target = collate([data[j] for j in indices[i : i + batch_size]], device)
        with amp:
            r = model(z, context, lengths).float()  # (M, B)
        r, target = readout(r, target, args)
        keep = torch.isfinite(target)  # a sample without a finite label is not scored
        if keep.any():
            total += sums(torch.cat([r, r.mean(0, keepdim=True)])[:, keep], target[keep])
    model.train()
    return total


def table(metrics):
    """The paper's Table 3 layout: a column pair (MSE, PCC) per model, rows train and test."""
    names = [f"member {i + 1}" for i in range(len(metrics["train"]["mse"]) - 1)] + ["ensemble"]
    lines = [f"{'':10}" + "".join(f"{n:>16}" for n in names), f"{'':10}" + f"{'MSE':>9}{'PCC':>7}" * len(names)]
    for split_name in ("train", "test"):
        m = metrics[split_name]
        cells = "".join(f"{mse:9.4f}{pcc:7.3f}" for mse, pcc in zip(m["mse"], m["pcc"]))
        lines.append(f"{split_name + ' set':10}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Checkpoint


def save_checkpoint(path, model, optimizer, step, run=None):
    """Atomic, and refused for non-finite weights (runs.write_checkpoint). Nothing else is needed to
    resume exactly: every member's data order is a function of (seed, member, epoch) and the step
    says where in it to continue. `run`: the settings it was trained under (run_settings)."""
    weights = model.state_dict()
    runs.write_checkpoint(path, {"model": weights, "optimizer": optimizer.state_dict(), "step": step, "run": run or {}},
                          weights, step)


def load_checkpoint(state, path, model, optimizer):
    """A checkpoint read by runs.read_checkpoint into the model and optimiser -> its step."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{path} does not fit this model (other --model/--config/--members?): {err}") from err
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> LRMTrainConfig:
    """The command line -> the checked config (eval_sigmas as a list of floats, dit_mlp as a tuple)."""
    args, _ = runs.parse_config(LRMTrainConfig, argv, DESCRIPTION, PRESETS, lambda given: ["paper"])
    if args.max_bad_steps < 0:
        raise ValueError(f"max-bad-steps must be >= 0, got {args.max_bad_steps}")
    if args.resume and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume {args.resume} does not exist (or is not a file)")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if args.members < 1 or args.batch_size < 1 or args.epochs < 1:
        raise ValueError(f"members, batch-size and epochs must be >= 1, got {args.members}, {args.batch_size}, {args.epochs}")
    if not 0 < args.test_frac < 1:
        raise ValueError(f"test-frac must be in (0, 1), got {args.test_frac}")
    for k in ("lr", "huber_delta", "dit_trunk_lr"):
        if not (math.isfinite(getattr(args, k)) and getattr(args, k) > 0):
            raise ValueError(f"--{k.replace('_', '-')} must be a finite number > 0, got {getattr(args, k)}")
    args.eval_sigmas = _numbers("--eval-sigmas", args.eval_sigmas, float)
    if not 0 <= args.clean_prob <= 1 or not all(0 <= x < 1 for x in args.eval_sigmas) or args.pair_margin < 0:
        raise ValueError(f"need 0 <= --clean-prob <= 1, --eval-sigmas in [0, 1), --pair-margin >= 0; got "
                         f"{args.clean_prob}, {args.eval_sigmas}, {args.pair_margin}")
    if args.label_threshold is not None and (args.loss != "bce" or not math.isfinite(args.label_threshold)):
        raise ValueError(f"--label-threshold {args.label_threshold} needs --loss bce and a finite number")
    if args.pairs and (args.loss in lrm.POINTWISE or not args.data or not Path(args.pairs).is_file()):
        raise ValueError(f"--pairs {args.pairs} needs --loss bt|thurstone, --data and an existing file")
    if args.image_cond and (args.noise_aware or args.model != "ensemble"):
        raise ValueError(f"--image-cond is an option of the clean-latent ensemble LRM (--model ensemble without "
                         f"--noise-aware), got --model {args.model}{' --noise-aware' if args.noise_aware else ''}")
    if args.noise_aware and args.model == "dollar":
        raise ValueError("--noise-aware needs --model ensemble (the Dollar baseline has no timestep conditioning)")
    if args.sigma_draw and not args.noise_aware:
        raise ValueError(f"--sigma-draw {args.sigma_draw} needs --noise-aware")
    if args.pair_noise != "shared" and not (args.noise_aware and args.loss not in lrm.POINTWISE):
        raise ValueError(f"--pair-noise {args.pair_noise} needs --noise-aware and --loss bt|thurstone")
    if args.noise_aware and args.sigma_draw is None:  # DiNa-LRM's draw for its loss; the others keep the grid's
        args.sigma_draw = "uniform" if args.loss == "thurstone" else "grid"
    if args.model != "dit" and (args.dit_ckpt or args.dit_blocks or args.dit_mlp or args.dit_trunk != "frozen"
                                or args.dit_dtype != "fp32"):
        raise ValueError("--dit-ckpt/--dit-blocks/--dit-trunk/--dit-mlp/--dit-dtype need --model dit")
    if args.dit_ckpt and args.dit_ckpt != "toy" and not Path(args.dit_ckpt).exists():
        raise FileNotFoundError(f"--dit-ckpt {args.dit_ckpt} does not exist")
    if (args.dit_blocks is not None and args.dit_blocks < 1) or args.dit_lora_rank < 1:
        raise ValueError(f"--dit-blocks and --dit-lora-rank must be >= 1, got {args.dit_blocks}, {args.dit_lora_rank}")
    args.dit_mlp = tuple(_numbers("--dit-mlp", args.dit_mlp, int)) if args.dit_mlp is not None else None
    if args.dit_mlp and min(args.dit_mlp) < 1:
        raise ValueError(f"--dit-mlp widths must be >= 1, got {args.dit_mlp}")
    return args


def _numbers(flag: str, text: str, kind) -> list:
    """A comma-separated flag value -> numbers, or a one-line error naming the flag."""
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated {kind.__name__}s, got {text!r}") from None


def dit_lrm(args, members: int):
    """--model dit: the generator's first --dit-blocks blocks (--dit-ckpt, or the toy world's tiny
    DiT with the seed's random weights) as the trunk, `members` heads on it."""
    if args.dit_ckpt == "toy":  # the generator the toy world pretrained (and whose samples the synthetic set mimics)
        dit = toy.load_world(toy.WORLDS[toy.default_world()], log=lambda *a: None)[0]
    elif args.dit_ckpt:  # only the kept blocks are read (a path goes straight to dit_reward_model_from)
        dit = args.dit_ckpt
    else:
        dit = toy.build_models(args.seed)[0]
    mlp = args.dit_mlp or ((1024, 512) if args.dit_ckpt not in (None, "toy") else (64, 32))
    return lrm_dit.dit_reward_model_from(dit, args.dit_blocks, members, args.seed, trunk=args.dit_trunk,
                                         lora_rank=args.dit_lora_rank, lora_alpha=float(args.dit_lora_rank),
                                         mlp_dims=mlp, objective=args.loss, huber_delta=args.huber_delta,
                                         label_threshold=args.label_threshold,
                                         noise_aware=args.noise_aware,
                                         trunk_dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dit_dtype])


def epoch_metrics(model, data, train, test, args, rank, world, device, amp):
    """{"train"|"test": {"mse": [...], "pcc": [...]}}, one entry per member and the ensemble last."""
    out = {}
    for name, indices in (("train", train), ("test", test)):
        s = evaluate(model, data, indices[rank::world], args.batch_size, device, amp, args)
        if world > 1:
            dist.all_reduce(s)
        mse, pcc = mse_pcc(s)
        out[name] = {"mse": mse.tolist(), "pcc": pcc.tolist()}
    return out


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.setup_distributed()
    out = Path(args.out)
    # nothing is written to --out before the folder, the checkpoint, the data and the model pass
    # their checks (a failed start leaves a fresh --out empty and an old run as it was)
    runs.check_out_dir(out, args.resume, args.overwrite)
    resumed = runs.read_checkpoint(args.resume, CKPT_KEYS, "train_lrm") if args.resume else None
    allowed = runs.allowed_changes(args.allow_changed, RUN_KEYS)
    changed = runs.check_resume(saved_settings(resumed.get("run") or {}), run_settings(args), args.resume,
                                allowed) if resumed else {}

    data = shards.ShardRows(args.data) if args.data else synthetic_data(args.synthetic, args.seed, args.synthetic_reward)
    train, test = split(len(data), args.test_frac, args.seed)
    if args.loss == "bce" and args.label_threshold is None:
        outside = [r for r in prompts_and_rewards(data)[1] if math.isfinite(r) and not 0 <= r <= 1]
        if outside:
            raise ValueError(f"--loss bce takes labels in [0, 1]; {len(outside)} rewards of the data lie outside "
                             f"(e.g. {outside[0]:.4g}): give --label-threshold to make binary labels of them")
    cfg = replace(lrm.LRM_CONFIGS[args.config], timestep_cond=args.noise_aware, image_cond=args.image_cond,
                  objective=args.loss, huber_delta=args.huber_delta, label_threshold=args.label_threshold)
    cfg = fit_to_latents(cfg, tuple(data[0]["latent"].shape))
    members = 1 if args.model == "dollar" else args.members
    if args.model == "dit":
        cfg = (model := dit_lrm(args, members)).cfg
    if data[0]["context"].shape[1] != cfg.text_dim:
        what = f"the DiT {args.dit_ckpt or '(toy)'}" if args.model == "dit" else f"config {args.config!r}"
        raise ValueError(f"prompt embeddings have width {data[0]['context'].shape[1]}, {what} expects {cfg.text_dim}")
    if args.model != "dit":
        model = lrm.MODEL_KINDS[args.model](cfg, n_members=members, seed=args.seed)
    model = model.to(device)
    trunk = {id(p) for p in getattr(model, "trunk_parameters", list)()}  # a full DiT trunk: its own lr
    groups = [{"params": [p for p in model.parameters() if id(p) not in trunk], "lr": args.lr}]
    groups += [{"params": [p for p in model.parameters() if id(p) in trunk], "lr": args.dit_trunk_lr}] if trunk else []
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    step = load_checkpoint(resumed, args.resume, model, optimizer) if args.resume else 0
    del resumed  # its tensors are in the model and the optimiser now
    ddp = DDP(model) if world > 1 else model  # DDP broadcasts rank 0's weights and all-reduces gradients
    amp_dtype, amp = sample.dtypes(device)["amp"], sample.autocast(device)

    # what an epoch walks: the training samples (Huber) or the preference pairs formed among them
    args.preferences = read_preferences(args.pairs, data) if args.pairs else None
    if args.loss in lrm.POINTWISE:
        units = train
    else:
        units = split_pairs(args.preferences, train) if args.pairs else form_pairs(data, train, args.pair_margin, args.seed)
    per_epoch = len(units) // (args.batch_size * world)  # the last partial batch is dropped
    if per_epoch == 0:
        what = "samples" if args.loss in lrm.POINTWISE else f"pairs (same prompt, --pair-margin {args.pair_margin})"
        raise ValueError(f"{len(units)} training {what} make no batch of {args.batch_size} x {world} ranks")
    total = args.epochs * per_epoch
    if args.resume and step >= total:
        raise ValueError(f"{args.resume} is at step {step}, the run ends at step {total} ({args.epochs} epochs of "
                         f"{per_epoch} steps): give --epochs > {step // per_epoch}")
    distributed.barrier()  # every rank has passed its checks: the run's files can be written
    if rank == 0:
        if args.overwrite:
            runs.clear_run(out, RUN_FILES)
        out.mkdir(parents=True, exist_ok=True)
        runs.write_json(out / "args.json", dataclasses.asdict(args), indent=1)
        with runs.open_metrics(out / "metrics.jsonl", step) as f:  # resumed: the lines past the checkpoint go
            runs.record_changes(f, step, changed)
    stop = min(total, args.stop_after or total)
    metrics, t0 = None, time.time()
    skipped = {"labels": 0, "numerics": 0}  # steps this run skipped: no finite label / non-finite loss or gradients
    dropped = 0  # non-finite labels left out of the steps this run took
    while step < stop:
        epoch, b = divmod(step, per_epoch)
        # every member its own shuffled order of the epoch (member 0: the single model's order);
        # each rank takes its own slice of every member's order
        orders = [epoch_order(units, epoch, args.seed + MEMBER_SEED_STRIDE * m) for m in range(members)]
        start = (b * world + rank) * args.batch_size
        picks = [o[start : start + args.batch_size] for o in orders]
        if args.loss in lrm.POINTWISE:
            rows = {i: data[i] for i in set().union(*picks)}  # a sample several members drew is read once
            batch = member_batches([[rows[i] for i in p] for p in picks], device)
            sigma = None
            if args.noise_aware:  # each member's latents re-noised at their own levels; label: the clean reward
                sigma, (noise,) = step_noise(args, step, rank, batch[0].shape)
                batch = (renoise(batch[0], sigma, noise), *batch[1:])
                sigma = sigma.to(device)
            stats = lrm.lrm_update(ddp, optimizer, *batch, delta=args.huber_delta, amp_dtype=amp_dtype, sigma=sigma,
                                   objective=args.loss, label_threshold=args.label_threshold)
        else:
            za, zb, ctx, lens, p = batch = pair_batches(data, picks, device)
            sigma = None
            if args.noise_aware:  # both sides of a pair at the pair's level, under one noise (or each its own)
                sigma, noise = step_noise(args, step, rank, za.shape, sides=1 if args.pair_noise == "shared" else 2)
                za, zb, sigma = renoise(za, sigma, noise[0]), renoise(zb, sigma, noise[-1]), sigma.to(device)
            stats = lrm.lrm_pair_update(ddp, optimizer, za, zb, ctx, lens, p, objective=args.loss, sigma=sigma,
                                        amp_dtype=amp_dtype)
            stats["mse"] = stats["acc"]
        labels = batch[-1].numel()
        step += 1
        dropped += stats["dropped"]
        if stats["skipped"]:
            skipped["labels" if stats["dropped"] == labels else "numerics"] += 1
            if sum(skipped.values()) > args.max_bad_steps:
                raise TooManyBadSteps(
                    f"{sum(skipped.values())} LRM steps skipped (more than --max-bad-steps {args.max_bad_steps}) by step {step}: "
                    f"{skipped['labels']} had no finite label, {skipped['numerics']} a non-finite loss or gradients; "
                    f"check the rewards in the data (NaN/inf labels) or lower --lr")
        if rank == 0 and (step % args.log_every == 0 or step == stop):
            loss = "skipped" if stats["skipped"] else f"{stats['loss']:.5f}"
            mse = "skipped" if stats["skipped"] else f"{stats['mse']:.5f}"
            print(f"step {step:6d} | epoch {epoch} | {args.loss} {loss} | {'mse' if args.loss in lrm.POINTWISE else 'pair acc'} "
                  f"{mse} | lr {args.lr:.1e} | "
                  f"skipped {sum(skipped.values())} | dropped {dropped} | {(time.time() - t0) / step:.3f} s/step")
        if step % per_epoch == 0:
            metrics = epoch_metrics(model, data, train, test, args, rank, world, device, amp)
            if args.noise_aware or args.loss not in lrm.POINTWISE:
                metrics["sigma"] = sigma_metrics(model, data, train, test, args, device, amp)
            if rank == 0:
                print(f"epoch {epoch}\n{table(metrics)}")
                for sig, m in metrics.get("sigma", {}).items():
                    print(f"  sigma {sig:>4}: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in m.items()))
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(runs.json_line({"epoch": epoch, "step": step, **metrics}))
        if rank == 0 and (args.save_every and step % args.save_every == 0 or step % per_epoch == 0):
            save_checkpoint(out / "ckpt.pt", model, optimizer, step, run_settings(args))

    if world > 1:
        diff = distributed.max_rank_difference(model.parameters())
        if rank == 0:
            print(f"weights across {world} ranks: max difference {diff}")
            runs.write_json(out / "sync.json", {"world": world, "max_diff": diff}, indent=None)
        if diff != 0.0:
            raise RuntimeError(f"ranks ended with different weights (max difference {diff})")
    if rank == 0 and step == total:
        lrm.save_lrm(model, out / "lrm.safetensors")
    del ddp  # the DDP reducer holds the process group: free it before the group ends (see refl.Run.close)
    gc.collect()
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, TooManyBadSteps) as e:  # a user's mistake or bad data: one line, no traceback
        raise SystemExit(f"train_lrm.py: error: {e}") from None
