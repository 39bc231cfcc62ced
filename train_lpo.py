"""LPO: step-level preference optimisation of Wan with a noise-aware latent reward model.

Follows "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference
Optimization" (arXiv 2502.01051, §4, Algorithm 1): at a sampling step t the policy's stochastic
transition draws k candidates x_{t-1}, a noise-aware LRM scores them at their own noise level,
the best and the worst form a preference pair when their softmax-normalised score gap clears a
threshold, and DPO on the transitions' log-likelihoods trains the policy against the reference
(the initial model). The transition is the DDIM-with-eta step for the flow path
(sample.ddim_transition). It trains every sampling step with a stochastic transition, as LPO
does, or --lpo-steps N drawn ones, and shares VELR's runs, evaluation and online LRM alignment (refl.py).

    python train_lpo.py                     # the offline toy world, with its noise-aware LRM
    torchrun --nproc_per_node=8 train_lpo.py --ckpt-dir Wan2.1-T2V-1.3B --lrm runs/lrm_na/lrm.safetensors \\
        --reward my_rewards:video_reward --prompts prompts.txt --out runs/lpo

Left out: LPO's own LRM (here any noise-aware LRM of train_lrm.py), its image-model recipes.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

import lrm as lrm_lib
import refl
import runs
import sample

LPO_WARN_STEPS = 10  # warn when no pair was kept in a run's first this many steps
# Presets over the field defaults (LPO's: k 4, DPO beta 500, thresholds 0.35-0.5, no KL; the rest
# VELR's, refl.RunConfig). The toy world's LRM regresses a 0-1 reward, not LPO's logit-scale
# scores, so its softmax needs a temperature near the candidates' score differences.
PRESETS = {
    "paper": {},
    "toy": {**refl.TOY_PRESET, "beta": 0.0, "lpo_temp": 0.01, "lpo_steps": 5},  # 5 of 19 steps: CPU time
}


@dataclass
class LPOConfig(refl.RunConfig):
    """refl.RunConfig's shared settings (models, sampler and window, LoRA, alignment, run), and:"""
    # LPO (arXiv 2502.01051)
    beta: float = 0.0  # KL weight beside DPO (LPO has none: DPO against the reference is its anchor)
    lpo_k: int = 4  # candidates x_{t-1} drawn from each x_t (LPO's)
    lpo_eta: float = 1.0  # stochasticity of the transition, > 0: 1 = the flow path's exact posterior; smaller
    #                        values approach Euler (the deterministic step, which has no likelihood)
    dpo_beta: float = 500.0  # DPO's beta on the transition log-likelihoods (LPO's)
    lpo_threshold: tuple[float, float] = (0.35, 0.5)  # a pair is kept when the softmax gap of best and worst exceeds
    #                                                   AT_0 + (AT_1 - AT_0) s_t, s_t the step's sigma min-max
    #                                                   normalised over the sampler's steps (LPO's)
    lpo_temp: float = 1.0  # temperature of that two-way softmax over the LRM scores (LPO: 1, logit-scale scores)
    lpo_clip: float = 0.1  # the policy/reference likelihood ratio is clamped to [1 - c, 1 + c] in DPO (LPO's); 0: off
    lpo_steps: int = 0  # sampler steps trained per rollout: 0 = every step with a stochastic transition (LPO's),
    #                     N = N of them drawn per step (the same on every rank); --gradient-checkpointing keeps
    #                     the memory of many steps at one step's activations plus a latent per step
    lr: float = 6e-5  # learning rate (LPO's)
    lora_rank: int = 4  # LoRA rank (LPO's)
    lora_alpha: float = 4.0  # LoRA alpha; scale = alpha / rank
    grad_clip: float = 1.0  # gradient-norm clip (LPO's)
    out: str = "runs/lpo"  # run folder

    @property
    def mode(self) -> str:
        """In a checkpoint's settings: a train_refl.py checkpoint (mode velr, pixel, ...) is not an LPO run."""
        return "lpo"


RUN_KEYS = ("mode",) + refl.RUN_KEYS + ("lpo_k", "lpo_eta", "dpo_beta", "lpo_threshold", "lpo_temp", "lpo_clip",
                                         "lpo_steps")


def parse_args(argv=None) -> LPOConfig:
    c, names = runs.parse_config(LPOConfig, argv, " ".join(__doc__.split("\n\n")[0].split()), PRESETS,
                                 lambda given: [refl.base_preset(given)])
    c.presets, c.lpo_threshold = names, [float(x) for x in c.lpo_threshold]
    refl.validate(c)
    if c.lpo_k < 2:
        raise ValueError(f"--lpo-k must be >= 2 (a best and a worst candidate), got {c.lpo_k}")
    if not 0 <= c.lpo_clip < 1 or not 0 <= c.lpo_steps <= c.sample_steps - 1:
        raise ValueError(f"need 0 <= --lpo-clip < 1 and 0 <= --lpo-steps <= --sample-steps - 1 ({c.sample_steps - 1} "
                         f"steps have a stochastic transition), got {c.lpo_clip}, {c.lpo_steps}")
    lo, hi = c.lpo_threshold
    positive = (c.lpo_eta, c.dpo_beta, c.lpo_temp)
    if not (0 <= lo < 1 and 0 <= hi < 1 and all(math.isfinite(x) and x > 0 for x in positive)):
        raise ValueError(f"LPO needs thresholds in [0, 1), --lpo-eta, --dpo-beta and --lpo-temp > 0, got "
                         f"{c.lpo_threshold}, {c.lpo_eta}, {c.dpo_beta}, {c.lpo_temp}")
    if not c.toy and (c.lrm is None or c.reward is None):
        raise ValueError(f"real checkpoints need --lrm (noise-aware) and --reward, got lrm={c.lrm!r}, reward={c.reward!r}")
    if c.lrm and Path(c.lrm).is_file():
        refl.check_noise_aware(lrm_lib.read_config(c.lrm)[2], "LPO", c.lrm)
    return c


def lpo_threshold(threshold, sigmas, i: int) -> float:
    """The score gap a pair needs at step i: linear from AT_0 to AT_1 in the step's sigma, min-max
    normalised over the sampler's steps (sigmas[:-1]), as LPO reads its threshold table."""
    lo, hi = threshold
    table = [float(x) for x in sigmas[:-1]]
    span = max(table) - min(table)
    return lo + (hi - lo) * ((float(sigmas[i]) - min(table)) / span if span > 0 else 1.0)


def select_pairs(scores: torch.Tensor, threshold: float, temp: float = 1.0):
    """LPO's pair rule over k candidates per sample, scores (B, k): sort, keep the best and the worst,
    softmax over those two (temperature temp), keep the pair where p_best - p_worst > threshold.
    That gap is tanh((s_best - s_worst) / (2 temp)): computed so, in float64, any temperature > 0
    gives a number (near 0: 1 for any difference, the hard limit). Returns (best, worst, kept) (B,)."""
    scores = scores.double()
    best, worst = scores.argmax(1), scores.argmin(1)
    gap = torch.tanh((scores.max(1).values - scores.min(1).values) / (2 * temp))
    return best, worst, gap > threshold


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta: float, clip: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss -log sigmoid(beta (log r_w - log r_l)) (B,), r = pi / ref the likelihood ratio
    of each side; clip > 0 clamps r to [1 - clip, 1 + clip] first (LPO's trust region: outside it a
    side gets no gradient)."""
    log_w, log_l = logp_w - ref_logp_w, logp_l - ref_logp_l
    if clip > 0:
        lo, hi = math.log(1 - clip), math.log(1 + clip)
        log_w, log_l = log_w.clamp(lo, hi), log_l.clamp(lo, hi)
    return -torch.nn.functional.logsigmoid(beta * (log_w - log_l))


def lpo_loss(model, ref, lrm, noise, grad_start: int, stop: int, context, lengths, neg, sigmas, g: torch.Generator, *,
             guidance: float, k: int, eta: float, dpo_beta: float, threshold, temp: float, agg: str = "mean",
             lcb_k: float = 1.0, beta: float = 0.0, clip: float = 0.0, train_steps=None, cfg_grad: str = "both",
             checkpoint: bool = False) -> dict:
    """The policy's stochastic sampler (eta) runs steps 0..stop-1; the trained steps (train_steps,
    default grad_start..stop-1) draw k candidates x_{t-1} from the policy's Gaussian transition, the
    noise-aware LRM scores them at sigma_{t-1} (aggregated over members by agg), the best and the
    worst form a pair when select_pairs keeps them, and DPO compares the policy's transition
    log-likelihoods (with gradient) against the reference's (same std: the normalisers cancel). The
    trajectory continues from one candidate drawn uniformly (as SPO does); the other steps take one
    draw without gradient. Candidates, the choice and the rollout noise come from g. loss = mean DPO
    over the kept pairs of all trained steps (0, with the graph intact, when none is kept) + beta KL
    at the last trained step."""
    train_steps = sorted(set(range(grad_start, stop) if train_steps is None else train_steps))
    if not train_steps or train_steps[-1] >= stop:
        raise ValueError(f"train_steps must be steps below stop {stop}, got {train_steps}")
    x = noise
    sig = sigmas.tolist()
    ts = sample.timesteps_from_sigmas(sigmas).tolist()
    b = x.shape[0]

    def draw(shape):
        return torch.randn(shape, generator=g).to(x.device)

    def vel(x_in, t):
        return refl.velocity(model, x_in, t, context, neg, guidance, cfg_grad, checkpoint)

    losses, kept_total, scores_last, ranges = [], 0, None, []
    for i in range(train_steps[-1] + 1):
        t = torch.full((b,), ts[i], dtype=torch.int64, device=x.device)
        if i not in train_steps:  # the policy's own stochastic rollout, no gradient
            with torch.no_grad():
                mean, std = sample.ddim_transition(x, refl.velocity(model, x, t, context, neg, guidance), sig[i],
                                                   sig[i + 1], eta)
            x = mean + std * draw(x.shape)
            continue
        v = vel(x, t)
        v_ref = refl.reference_velocity(model, ref, x, t, context, neg, guidance)
        mean, std = sample.ddim_transition(x, v.float(), sig[i], sig[i + 1], eta)
        mean_ref, _ = sample.ddim_transition(x, v_ref.float(), sig[i], sig[i + 1], eta)
        cands = mean.detach()[:, None] + std * draw((b, k, *x.shape[1:]))  # (B, k, C, F, H, W)
        with torch.no_grad():
            members = lrm(cands.flatten(0, 1), context.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0),
                          sigma=sig[i + 1])
            scores = lrm_lib.aggregate(members.float(), agg, lcb_k).view(b, k)
        best, worst, kept = select_pairs(scores, lpo_threshold(threshold, sigmas, i), temp)
        ranges.append(scores.max(1).values - scores.min(1).values)
        rows = torch.arange(b, device=x.device)
        y_w, y_l = cands[rows, best], cands[rows, worst]
        per_pair = dpo_loss(sample.gaussian_log_prob(y_w, mean, std), sample.gaussian_log_prob(y_l, mean, std),
                            sample.gaussian_log_prob(y_w, mean_ref, std), sample.gaussian_log_prob(y_l, mean_ref, std),
                            dpo_beta, clip)
        losses.append((per_pair * kept.to(per_pair.dtype)).sum())
        kept_total += int(kept.sum())
        scores_last, last = scores, (x, v, v_ref, sig[i])
        x = cands[rows, torch.randint(k, (b,), generator=g).to(x.device)]
    x_last, v_last, v_ref_last, sigma_last = last
    kl = (v_last.float() - v_ref_last.float()).pow(2).mean()
    loss = torch.stack(losses).sum() / max(kept_total, 1)
    if beta > 0:
        loss = loss + beta * kl
    z0 = sample.x0_from_velocity(x_last, sigma_last, v_last.detach())  # for the log and the alignment buffer
    with torch.no_grad():
        members = lrm(z0, context, lengths)
    return {"loss": loss, "reward": scores_last.mean(1), "members": members.detach(), "kl": kl.detach(), "z0": z0.detach(),
            "pairs": kept_total, "pair_offers": b * len(train_steps), "score_range": torch.cat(ranges).median().item()}


def train_steps(sample_steps: int, n: int, g: torch.Generator) -> list[int]:
    """The sampler steps LPO trains in one rollout: every step with a stochastic transition (0..
    sample_steps-2; the last goes to sigma 0, where the transition has no spread), or n of them
    drawn from g (shared by the ranks), in order."""
    steps = list(range(sample_steps - 1))
    return steps if n == 0 else sorted(torch.randperm(len(steps), generator=g)[:n].tolist())


def lpo_step(r: refl.Run, c: LPOConfig, step: int) -> dict:
    """One LPO update over --grad-accum micro-batches of every rank's own prompts and noise, each
    offered to VELR's buffer; the alignment every --align-every updates."""
    parts = []
    for m in range(c.grad_accum):
        key = refl.micro_key(step, m, c.grad_accum)
        prompts, noise = refl.draw_batch(c.seed, key, r.data_rank, r.prompts, c.batch_size, r.shape)
        prompts = refl.drop_prompts(prompts, c.prompt_dropout, c.seed, key, r.data_rank)
        steps = train_steps(c.sample_steps, c.lpo_steps, refl.shared_generator(c.seed, key))
        context, lengths = refl.text_batch(r.table, prompts, r.device)
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + key * 4099 + r.data_rank + 15_485_863)
        with sample.autocast(r.device):
            out = lpo_loss(r.model, r.ref, r.lrm, noise.to(r.device), steps[0], steps[-1] + 1, context, lengths,
                           r.neg, r.sigmas, g, guidance=c.guidance, k=c.lpo_k, eta=c.lpo_eta, dpo_beta=c.dpo_beta,
                           threshold=c.lpo_threshold, temp=c.lpo_temp, agg=c.agg, lcb_k=c.lcb_k, beta=c.beta,
                           clip=c.lpo_clip, train_steps=steps, cfg_grad=c.cfg_grad, checkpoint=c.gradient_checkpointing)
        refl.optimizer_step(r.model, r.opt, out["loss"], r.world, r.bad, step, r.log, scale=c.sp_size, clip=c.grad_clip,
                            micro=m, micros=c.grad_accum)
        rec = {"loss": out["loss"].item(), "reward": out["reward"].nanmean().item(),
               "reward_std": out["members"].float().std(0, correction=0).mean().item(), "kl": out["kl"].item(),
               "pairs": out["pairs"], "pair_offers": out["pair_offers"], "score_range": out["score_range"]}
        if c.align_every:
            rec.update(refl.offer_to_buffer(r.buffer, out["z0"], out["members"], context, lengths, prompts, r.vae,
                                            r.reward_fn, step, r.data_rank, r.data_world, r.bad, r.log, group=r.dp_group))
        parts.append(rec)
        del out
    rec = {"step": step, **refl.mean_records(parts), "lr": c.lr}
    if c.align_every and step % c.align_every == 0:
        rec.update(refl.align_lrm(r.lrm, r.lrm_opt, r.buffer, rounds=c.align_rounds, batch_size=c.batch_size,
                                  sigma_grid=r.sigmas[:-1], seed=c.seed, step=step, device=r.device, world=r.world,
                                  bad=r.bad, log=r.log, refresh=c.refresh_variance, delta=refl.alignment_delta(c, r.lrm)))
    return rec


def main(argv=None):
    c = parse_args(argv)
    r = refl.Run(c, RUN_KEYS, noise_aware_flag="LPO (train_lpo.py)")
    start, kept = r.start(), 0
    for step in range(start + 1, c.steps + 1):
        t0 = time.time()
        rec = lpo_step(r, c, step)
        kept += rec["pairs"]
        if step - start == LPO_WARN_STEPS and kept == 0:
            r.log(f"warning: LPO kept no preference pair in {LPO_WARN_STEPS} steps, so nothing trains: the {c.lpo_k} "
                  f"candidates' LRM scores differ by {rec['score_range']:.3g} (median max - min), too little for a "
                  f"softmax gap of {c.lpo_threshold[0]}-{c.lpo_threshold[1]} at --lpo-temp {c.lpo_temp}; a temperature "
                  f"near that difference keeps some (LPO's 1 suits logit-scale scores)")
        if r.end_step(step, rec, t0):
            return r.model, r.lrm, r.buffer
    r.finish("lpo")
    return r.model, r.lrm, r.buffer


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, no traceback
        raise SystemExit(f"train_lpo.py: error: {e}") from None
