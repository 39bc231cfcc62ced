"""VELR: truncated mid-step reward feedback learning (ReFL) of Wan through an ensemble latent reward
model, with a KL anchor and online LRM alignment; and the ReFL baselines it is compared with.

Follows "VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models" (OpenReview
TctJWv7Suz): §4.3 and Algorithm 1 for the step (`velr_step`), App. C.2-C.3 for the settings (the
`paper` preset), §5 for the baselines (--mode pixel / lastk / latestep / dollar). PRFL's ReFL
recipe ("Video Generation Models Are Good Latent Reward Models", arXiv 2511.21541) is the `prfl`
preset: the reward on the noisy latent x_t of one DiT step, and its supervised regulariser
(--sft-data). LPO, a different algorithm, is train_lpo.py.

    python train_refl.py                                       # the offline toy world (toy.py), CPU
    torchrun --nproc_per_node=8 train_refl.py --ckpt-dir Wan2.1-T2V-1.3B --lrm runs/lrm/lrm.safetensors \\
        --reward my_rewards:video_reward --prompts prompts.txt --gradient-checkpointing --out runs/refl

The run folder: args.json (the resolved config), metrics.jsonl (one line per step), ckpt.pt
(--resume continues bit for bit on the CPU), samples/ (evaluation videos, before_after.png),
lora.safetensors (the community Wan LoRA format; the A14B: lora_high_noise / lora_low_noise.safetensors),
summary.json, and under torchrun sync.json. Image-to-video models (I2V-A14B, I2V-14B, the TI2V-5B
with images) take --prompts as a jsonl of {"prompt", "image"}.

Left out: learning-rate schedules, EMA, prompt-embedding caching on disk.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

import lora
import lrm as lrm_lib
import refl
import runs
import sample
import shards

# ----------------------------------------------------------------------------- configuration

# Presets: the values each sets over the defaults of the config's fields, which are the paper's
# (VELR §4.3, App. C.2, C.3; refl.RunConfig). Without checkpoints a run takes `toy`, the offline
# world's settings (refl.TOY_PRESET); --preset prfl goes on top of either. A value may be a function
# of the config resolved so far. Flags given on the command line win over every preset.
PRESETS = {
    "paper": {},
    "toy": refl.TOY_PRESET,
    **refl.MODEL_PRESETS,  # t2v-A14B, ti2v-5B: on top of paper when --ckpt-dir holds that model
    # PRFL (arXiv 2511.21541 and its public code, HY-Video-PRFL): a no-grad rollout to a random step of
    # the whole schedule, one DiT step with gradient, the LRM on that step's noisy latent, the reward
    # loss 0.1 relu(2 - sigmoid(r)); trained without KL, without guidance, without online alignment,
    # fully fine-tuned at lr 5e-6 (the toy world keeps its own preset's lr), weight decay 0.01, gradient-norm
    # clip 1, gradient accumulation 5, 10% prompt dropout, and (with --sft-data) its supervised updates
    # alternating with the reward updates
    "prfl": dict(reward_on="zt", reward_loss="prfl", toy_lrm="dit", window=1, mid_min=0, mid_max=lambda c: c.sample_steps - 1 - c.window,
                 beta=0.0, guidance=1.0, align_every=0, full_finetune=True, lr=lambda c: c.lr if c.toy else 5e-6,
                 weight_decay=0.01, grad_clip=1.0, grad_accum=5, prompt_dropout=0.1, sft_schedule="alternate"),
}
MODES = ("velr", "pixel", "lastk", "latestep", "dollar")


@dataclass
class ReFLConfig(refl.RunConfig):
    """refl.RunConfig's shared settings (models, sampler and window, LoRA, alignment, run), and:"""
    # ReFL
    mode: Literal[MODES] = "velr"  # velr, or a baseline (pixel ReFL, VADER-style lastk, ImageReward-style latestep, dollar)
    preset: Literal["prfl"] | None = None  # prfl: PRFL's ReFL recipe (arXiv 2511.21541) on top of the defaults
    reward_on: Literal["z0", "zt"] = "z0"  # z0: the LRM scores the z0 predicted from the window's last velocity (VELR);
    #                                        zt: a noise-aware LRM scores the window's last latent at its sigma (PRFL)
    reward_loss: Literal["neg", "prfl"] = "neg"  # neg: minimise -reward (VELR); prfl: 0.1 relu(2 - sigmoid(reward))
    noise_ensemble: bool = False  # score z0 by DiNa-LRM's noise ensembling (lrm.noise_ensemble; a noise-aware LRM)
    sft_data: str | None = None  # real latents (a prepare_data.py dataset) for PRFL's supervised flow-matching term
    sft_weight: float = 1.0  # weight of that term beside the ReFL loss and the KL (ours: PRFL's is not stated)
    sft_schedule: Literal["joint", "alternate"] = "joint"  # joint: the term joins each update's loss; alternate: a
    #                                                       separate supervised update follows each reward update (PRFL)


RUN_KEYS = ("mode",) + refl.RUN_KEYS + ("reward_on", "noise_ensemble", "reward_loss", "sft_weight", "sft_schedule")


def parse_args(argv=None) -> ReFLConfig:
    def choose(given):
        return [refl.base_preset(given)] + refl.model_presets(given) + (["prfl"] if given.get("preset") == "prfl" else [])

    c, names = runs.parse_config(ReFLConfig, argv, " ".join(__doc__.split("\n\n")[0].split()), PRESETS, choose)
    c.presets = names
    refl.validate(c)
    if not (math.isfinite(c.sft_weight) and c.sft_weight >= 0):
        raise ValueError(f"--sft-weight must be a finite number >= 0, got {c.sft_weight}")
    if c.mode == "pixel" and (c.reward_on != "z0" or c.noise_ensemble):
        raise ValueError("--mode pixel decodes z0: --reward-on zt and --noise-ensemble need an LRM")
    if c.boundary is not None and c.sft_data:
        raise ValueError("--sft-data draws a timestep per sample, and two experts switch by timestep: it does not "
                         "combine with a two-expert model")
    if c.reward_on == "zt" and c.noise_ensemble:
        raise ValueError("--noise-ensemble re-noises a clean z0; it does not combine with --reward-on zt")
    if c.lrm and noise_aware_flag(c) and Path(c.lrm).is_file():
        refl.check_noise_aware(lrm_lib.read_config(c.lrm)[2], noise_aware_flag(c), c.lrm)
    images = c.prompts and Path(c.prompts).is_file() and any(sample.read_prompt_images(c.prompts)[1])
    if images and c.sft_data:
        raise ValueError(f"--prompts {c.prompts} gives images and --sft-data holds text-to-video latents: the "
                         f"supervised term has no images to condition on")
    if images and c.reward_on == "zt" and c.ckpt_dir and sample.detect_model(c.ckpt_dir) == "ti2v-5B":
        raise ValueError("--reward-on zt scores the noisy latent, whose first frame the TI2V-5B holds clean (the "
                         "image's), which no noise-aware LRM was trained on; use --reward-on z0")
    if not c.toy and (c.lrm is None and c.mode != "pixel" or c.reward is None):
        raise ValueError(f"real checkpoints need --reward and (unless --mode pixel) --lrm, got reward={c.reward!r}, "
                         f"lrm={c.lrm!r}")
    return c


def noise_aware_flag(c: ReFLConfig) -> str | None:
    """The flag that makes the reward read noisy latents (it needs a noise-aware LRM), or None."""
    return "--reward-on zt" if c.reward_on == "zt" else "--noise-ensemble" if c.noise_ensemble else None


# ----------------------------------------------------------------------------- the pieces of one step

def window(mode: str, g: torch.Generator, n: int, k: int, mid_min: int, mid_max: int) -> tuple[int, int]:
    """(grad_start, stop): the sampler steps grad_start..stop-1 run with gradient. VELR: K steps from
    a mid step drawn uniformly from [mid_min, mid_max] (§4.3); lastk: the last K (VADER); latestep:
    one step drawn from the last K (ImageReward's ReFL)."""
    if mode == "lastk":
        return n - k, n
    if mode == "latestep":
        start = int(torch.randint(n - k, n, (1,), generator=g))
        return start, start + 1
    start = int(torch.randint(mid_min, mid_max + 1, (1,), generator=g))
    return start, start + k  # exactly K DiT calls with gradient; z0 from the velocity of the last


def expert_plan(c: ReFLConfig, pair, sigmas, log) -> tuple[int, int, int]:
    """Where the windows of a two-expert run land: (mid_min, mid_max, first low-noise step). --experts
    low keeps the windows that reach a low-noise step (their high-noise steps run without gradient),
    high the ones that reach a high-noise step; both keeps all. Logs which experts the windows touch,
    warns when --experts both trains an expert no window reaches, and refuses a choice no window
    reaches at all."""
    n, k = c.sample_steps, c.window
    ts = sample.timesteps_from_sigmas(sigmas).tolist()
    first_low = next((i for i in range(n) if not pair.is_high(ts[i])), n)
    starts = {"velr": range(c.mid_min, c.mid_max + 1), "lastk": [n - k], "latestep": range(n - k, n)}[c.mode]
    size = k if c.mode != "latestep" else 1

    def touched(s):  # the experts a window starting at step s runs
        return tuple(e for e, hit in (("high", s < first_low), ("low", s + size > first_low)) if hit)

    where = ", ".join(f"{s}: " + "+".join(touched(s)) for s in starts)
    log(f"two experts: boundary {pair.boundary} (t >= {pair.boundary * 1000:g} runs the high-noise one), first "
        f"low-noise step {first_low} of {n}, guidance low {pair.guidance[0]:g} / high {pair.guidance[1]:g}; window "
        f"starts {where}")
    keep = [s for s in starts if c.experts == "both" or c.experts in touched(s)]
    if not keep:
        raise ValueError(f"--experts {c.experts}: no window of --mode {c.mode} reaches the {c.experts}-noise expert "
                         f"(its first low-noise step is {first_low}); move the window (--mid-sigma, --mid-min/--mid-max) "
                         f"or train the other expert")
    for e in ("high", "low") if c.experts == "both" else ():
        if not any(e in touched(s) for s in starts):
            log(f"warning: no window reaches the {e}-noise expert: its adapters will not train")
    if c.mode == "velr" and len(keep) < len(starts):
        log(f"--experts {c.experts}: windows start at steps {keep[0]}..{keep[-1]}, the ones that reach that expert")
    elif len(keep) < len(starts):
        raise ValueError(f"--experts {c.experts}: some windows of --mode {c.mode} do not reach that expert")
    return keep[0], keep[-1], first_low


def policy_velocity(model, context, checkpoint: bool, cond=None):
    """The policy's velocity under `context` (the prompt's, or the negative prompt's for guidance's
    unconditional branch) and the batch's image conditioning `cond`. checkpoint: keep only each window
    step's input latent and rerun the DiT in the backward (itself checkpointed per block), so the
    window's memory is one DiT call's, not K steps' block inputs."""
    return lambda x, t: refl.velocity(model, x, t, context, None, 1.0, checkpoint=checkpoint, cond=cond)


def make_reward(mode, lrm, vae, reward_fn, *, reward_on="z0", noise_ensemble=False, agg="mean", lcb_k=1.0, seed=0):
    """The reward of a window's end, chosen once at start-up:
    score(z0, x_t, sigma_t, context, lengths, prompts, image=None) -> (reward (B,), member rewards (N, B));
    image: an image-to-video run's conditioning image latent, for an LRM that reads it.
    pixel: decode z0 (checkpointed) and the differentiable pixel reward; otherwise the LRM on z0
    (VELR Eq. 7), on x_t at sigma_t (--reward-on zt, PRFL), or noise-ensembled on z0 (DiNa-LRM),
    aggregated over members by `agg` (a Thurstone-trained LRM's lcb adds its v(sigma))."""
    if mode == "pixel":
        def pixel(z0, xt, sigma, context, lengths, prompts, image=None):
            reward = reward_fn(vae.decode(z0, checkpoint=True), prompts).float()
            return reward, reward[None].detach()
        return pixel
    thurstone = agg == "lcb" and getattr(getattr(lrm, "cfg", None), "objective", "huber") == "thurstone"

    def latent(z0, xt, sigma, context, lengths, prompts, image=None):
        if reward_on == "zt":
            members, scored = lrm(xt, context, lengths, sigma=sigma), sigma
        elif noise_ensemble:
            members, scored = lrm_lib.noise_ensemble(lrm, z0, context, lengths, seed=seed), 0.0
        else:
            members, scored = lrm(z0, context, lengths, **refl.lrm_image(lrm, image)), 0.0
        if thurstone:
            return lrm_lib.aggregate_lcb(members, lcb_k, lrm_lib.thurstone_var(scored).to(members.device)), members
        return lrm_lib.aggregate(members, agg, lcb_k), members
    return latent


def kl_to_initial(model, ref, last: dict, context, neg, guidance, *, grad: bool, cfg_grad="both",
                  checkpoint=False, cond=None) -> torch.Tensor:
    """KL = mean((v_theta - v_ref)^2) at the window's last step x_t, v_ref from the initial model (App. C.2).
    Both velocities are taken at x_t with its graph cut: the KL regularises the velocity field on the
    policy's own states, and its gradient is d/dtheta of v_theta(x_t) alone, the same on both sides.
    (The window's velocity at x_t also depends on theta through x_t, the reference's would not; mixing
    the two gives a gradient that is neither.) grad: the policy's velocity is recomputed at the cut
    x_t with gradient (one more guided DiT call); otherwise the window's value is reused."""
    x = last["x"].detach()
    t = torch.full((x.shape[0],), last["t"], dtype=torch.int64, device=x.device)
    v = refl.velocity(model, x, t, context, neg, guidance, cfg_grad, checkpoint, cond) if grad else last["v"].detach()
    v_ref = refl.reference_velocity(model, ref, x, t, context, neg, guidance, cond)
    wide = torch.promote_types(v.dtype, torch.float32)  # fp32 for a bf16 DiT
    return (v.to(wide) - v_ref.to(wide)).pow(2).mean()


def objective(reward, kl, beta: float, reward_loss: str = "neg") -> tuple[torch.Tensor, int]:
    """(loss, rewards dropped): -mean reward + beta KL over the finite rewards (none finite: a NaN
    loss, so the step is skipped); reward_loss prfl: PRFL's 0.1 relu(2 - sigmoid(r)) per sample."""
    finite = torch.isfinite(reward.detach())
    used = reward[finite].mean() if finite.any() else reward.sum() * float("nan")
    if reward_loss == "prfl":
        finite_r = reward[finite] if finite.any() else reward * float("nan")
        used = -(0.1 * torch.relu(2 - torch.sigmoid(finite_r))).mean()
    return -used + (beta * kl if beta > 0 else 0.0), int((~finite).sum())


def sft_loss(model, rows, *, seed: int, step: int, data_rank: int, batch_size: int, shift: float, device,
             prompt_dropout: float = 0.0, empty=None) -> torch.Tensor:
    """PRFL's supervised flow-matching regulariser: batch_size real latents drawn by (seed, step,
    data rank), re-noised as Wan was trained, x_s = (1 - s) z0 + s eps with s through the
    sampler's shift, and the squared error of the model's velocity against eps - z0. With
    prompt_dropout p, a sample's context is `empty` (the "" prompt's) with probability p."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + data_rank + 104_729)
    items = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=g).tolist()]
    z0 = torch.stack([it["latent"] for it in items]).float()
    context = torch.zeros(len(items), refl.unwrap(model).cfg.text_len, items[0]["context"].shape[-1])
    for i, it in enumerate(items):
        context[i, : it["context"].shape[0]] = it["context"]
    eps = torch.randn(z0.shape, generator=g)
    sigma = sample.shift_sigmas(torch.rand(len(items), generator=g), shift)
    if prompt_dropout > 0:  # drawn last: the other draws stay those of a run without dropout
        context[torch.rand(len(items), generator=g) < prompt_dropout] = empty.to(context.dtype)
    s = sigma.view(-1, 1, 1, 1, 1)
    x = ((1 - s) * z0 + s * eps).to(device)
    v = model(x, (sigma * 1000).long().to(device), context.to(device))
    return (v.float() - (eps - z0).to(device)).pow(2).mean()


# ----------------------------------------------------------------------------- the step

def micro_batch(r: refl.Run, c: ReFLConfig, score, key: int, sft_rows=None) -> dict:
    """Algorithm 1's forward on one micro-batch of every rank's own prompts and noise, drawn by `key`
    (refl.micro_key): the window's rollout, the reward, the KL and the loss, its graph kept for the
    backward; (+ PRFL's supervised term, --sft-schedule joint)."""
    entries, noise = refl.draw_entries(c.seed, key, r.data_rank, len(r.prompts), c.batch_size, r.shape)
    prompts = refl.drop_prompts([r.prompts[i] for i in entries], c.prompt_dropout, c.seed, key, r.data_rank)
    cond = r.conditioning(entries)  # image-to-video: the entries' images (a dropped prompt keeps its image)
    grad_start, stop = window(c.mode, refl.shared_generator(c.seed, key), c.sample_steps, c.window, *r.mid)
    if r.pair is not None and c.experts == "low":  # the window's high-noise steps need no graph: nothing before them trains
        grad_start = max(grad_start, r.first_low)
    context, lengths = refl.text_batch(r.table, prompts, r.device)
    uncond = policy_velocity(r.model, r.neg, c.gradient_checkpointing, cond) if r.neg is not None else None
    with sample.autocast(r.device):
        # 1-3. roll out without gradient to grad_start, keep the graph for the K window steps, and
        #      predict z0 = x_t - sigma_t v from the last of them (§4.3; sample.denoise)
        xt, z0, trace = sample.denoise(policy_velocity(r.model, context, c.gradient_checkpointing, cond),
                                       noise.to(r.device), r.sigmas, solver=c.solver, uncond_fn=uncond,
                                       guidance=r.guidance, cfg_grad=c.cfg_grad, stop=stop, grad_start=grad_start,
                                       trace=True)
        z0 = refl.final_latent(z0, cond)  # the TI2V-5B's first latent frame is the image's
        # 4. reward: the ensemble LRM on z0, aggregated over its members (Eq. 7), or the mode's source
        image = {"image": cond["image_latent"]} if cond else {}  # image-to-video: for an LRM that reads it
        reward, members = score(z0, xt, float(r.sigmas[stop]), context, lengths, prompts, **image)
        # 5. KL to the initial model at the window's last step (App. C.2)
        kl = kl_to_initial(r.model, r.ref, trace[-1], context, r.neg, r.guidance, grad=c.beta > 0,
                           cfg_grad=c.cfg_grad, checkpoint=c.gradient_checkpointing, cond=cond)
        # 6. loss = -reward + beta KL (+ PRFL's supervised term on real latents)
        loss, dropped = objective(reward, kl, c.beta, c.reward_loss)
        out = {"loss": loss, "z0": z0.detach(), "members": members.detach(), "context": context, "lengths": lengths,
               "prompts": prompts, "stored": refl.stored_conditioning(cond), "dropped": dropped,
               "reward": reward.detach().nanmean().item(), "kl": kl.item(),
               "reward_std": members.detach().float().std(0, correction=0).mean().item()}
        if sft_rows is not None:
            sft = sft_loss(r.model, sft_rows, seed=c.seed, step=key, data_rank=r.data_rank, batch_size=c.batch_size,
                           shift=c.shift, device=r.device, prompt_dropout=c.prompt_dropout, empty=r.table[""][0])
            out["loss"], out["sft"] = loss + c.sft_weight * sft, sft.item()
    return out


def velr_step(r: refl.Run, c: ReFLConfig, score, step: int, sft_rows=None) -> dict:
    """One update of VELR's Algorithm 1: --grad-accum micro-batches, their gradients averaged into
    one optimiser step; every micro-batch's z0 offered to the buffer; the alignment every
    --align-every updates. The baselines differ only in their window (--mode lastk / latestep) and
    their `score` (pixel, dollar). --sft-data with --sft-schedule alternate: a separate supervised
    update (PRFL's) follows each reward update."""
    joint = sft_rows if c.sft_schedule == "joint" else None
    parts = []
    for m in range(c.grad_accum):
        out = micro_batch(r, c, score, refl.micro_key(step, m, c.grad_accum), joint)
        # under SP each rank holds its tokens' share of the gradient: x sp_size gives the data-parallel mean
        if r.pair is None:
            refl.optimizer_step(r.model, r.opt, out["loss"], r.world, r.bad, step, r.log, scale=c.sp_size,
                                clip=c.grad_clip, micro=m, micros=c.grad_accum)
        else:
            expert_rec = refl.experts_step(r.model, r.experts, r.opts, out["loss"], r.world, r.bad, step, r.log,
                                           scale=c.sp_size, clip=c.grad_clip, micro=m, micros=c.grad_accum)
        r.bad["rewards_dropped"] += out["dropped"]
        rec = {k: out[k] for k in ("reward", "kl", "reward_std", "sft") if k in out} | {"loss": out["loss"].item()}
        if c.align_every and c.mode != "pixel":
            # 7. offer z0 to the replay buffer, which admits the LRM's most uncertain (App. C.2)
            rec.update(refl.offer_to_buffer(r.buffer, out["z0"], out["members"], out["context"], out["lengths"],
                                            out["prompts"], r.vae, r.reward_fn, step, r.data_rank, r.data_world, r.bad,
                                            r.log, group=r.dp_group, extra=out["stored"]))
        parts.append(rec)
        del out
    rec = {"step": step, **refl.mean_records(parts), "lr": c.lr, **(expert_rec if r.pair is not None else {})}
    if sft_rows is not None and c.sft_schedule == "alternate":
        losses = []
        for m in range(c.grad_accum):
            with sample.autocast(r.device):
                sft = sft_loss(r.model, sft_rows, seed=c.seed, step=refl.micro_key(step, m, c.grad_accum),
                               data_rank=r.data_rank, batch_size=c.batch_size, shift=c.shift, device=r.device,
                               prompt_dropout=c.prompt_dropout, empty=r.table[""][0])
            refl.optimizer_step(r.model, r.opt, c.sft_weight * sft, r.world, r.bad, step, r.log, scale=c.sp_size,
                                clip=c.grad_clip, micro=m, micros=c.grad_accum)
            losses.append(sft.item())
        rec["sft"] = sum(losses) / len(losses)
    # 8. every align_every updates, re-fit the LRM on the buffer (Algorithm 1's alignment)
    if c.align_every and c.mode != "pixel" and step % c.align_every == 0:
        rec.update(refl.align_lrm(r.lrm, r.lrm_opt, r.buffer, rounds=c.align_rounds, batch_size=c.batch_size,
                                  sigma_grid=r.sigmas[:-1], seed=c.seed, step=step, device=r.device, world=r.world,
                                  bad=r.bad, log=r.log, refresh=c.refresh_variance, delta=refl.alignment_delta(c, r.lrm)))
    return rec


# ----------------------------------------------------------------------------- main

def main(argv=None):
    c = parse_args(argv)

    def read_sft():  # checked before any model loads
        rows = shards.ShardRows(c.sft_data, "--sft-data") if c.sft_data else None
        if rows is not None and not len(rows):
            raise ValueError(f"--sft-data {c.sft_data} holds no samples")
        return rows

    r = refl.Run(c, RUN_KEYS, noise_aware_flag(c), before_load=read_sft, expert_plan=expert_plan, images_ok=True)
    r.eval_lrm = r.lrm if c.mode != "pixel" else None
    score = make_reward(c.mode, r.lrm, r.vae, r.reward_fn, reward_on=c.reward_on, noise_ensemble=c.noise_ensemble,
                        agg=c.agg, lcb_k=c.lcb_k, seed=c.seed)
    start = r.start()
    for step in range(start + 1, c.steps + 1):
        t0 = time.time()
        rec = velr_step(r, c, score, step, r.extra)
        if r.end_step(step, rec, t0):
            return r.model, r.lrm, r.buffer
    r.finish(c.mode)
    return r.model, r.lrm, r.buffer


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, no traceback
        raise SystemExit(f"train_refl.py: error: {e}") from None
