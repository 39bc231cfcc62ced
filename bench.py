"""Side-by-side benchmark: memory, speed and quality of VELR, its baselines and the related methods.

    python bench.py all [--threads 1]   # every CPU section (~11 min on 2 cores)
    python bench.py memory              # one training step per paradigm: VELR, pixel ReFL, last-K, late step, LPO
    python bench.py dit | vae | lrm     # our modules against diffusers' / one ensemble member
    python bench.py quality             # the paper's Table 3 (and the noise-aware / pairwise LRMs) on synthetic data
    python bench.py gpu-quick [--tiny]  # one GPU, ~10 min: the real 1.3B step, dit, vae
    python bench.py toy | refl | lpo-probe | sp  [--toy-world watchable]   # the toy worlds' rows

Each measurement runs in its own child process (`python bench.py _child TASK JSON`), so a peak is
that workload's alone: `resident_mb` (weights and optimiser state when the timed steps start),
`peak_mb`, and `step_mb` = peak - resident. GPU: `torch.cuda` allocator counters; CPU: the
child's `VmRSS` / `VmHWM` above its post-import baseline. Times are the fastest of the measured
steps after a warm-up. `memory`'s pixel reward is a ViT-B-sized stand-in (`PixelRewardStandIn`),
so it under-states pixel ReFL against the paper's 7B-32B VLMs. Results print as markdown tables
and merge into `bench.json` (`--out`); BENCH.md records them with their commands and machines.
Left out: multi-GPU runs and the paper's VLM reward models.
"""


import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint

import sample
from vae import latent_shape

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # large frees return to the OS at once


# ---------------------------------------------------------------------------------------------
# Measuring one workload inside a child process


def proc_status_mb(field):
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in MiB; Linux only."""
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if m is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(m[1]) / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_mb(device, base_mb):
    """Peak since the last reset_peak: of allocated tensors on a GPU, of the resident set above
    `base_mb` on CPU (right after reset_peak both are the memory held now)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return proc_status_mb("VmHWM") - base_mb


def measure(step, device, base_mb, repeats=3, warmup=True):
    """One warm-up call (unless `warmup` is False), then the fastest of `repeats` timed calls of
    step() (the CPU is shared, the minimum is the least disturbed). Memory, in MiB:
    `resident_mb`, held when the timed calls start (weights, optimiser state: the post-build
    baseline); `peak_mb`, the peak over the timed calls, resident memory included (what
    max_memory_allocated reports on a GPU); `step_mb` = peak_mb - resident_mb, what a step adds
    on top (activations, gradients, temporaries)."""
    if warmup:
        step()
    reset_peak(device)
    resident = peak_mb(device, base_mb)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = peak_mb(device, base_mb)
    return {"time_s": min(times), "peak_mb": peak, "resident_mb": resident, "step_mb": peak - resident}


def run_child(task, args, timeout=1800):
    """Run CHILD_TASKS[task](args) in a fresh interpreter; returns the dict it printed. Raises
    RuntimeError naming the task when it fails, subprocess.TimeoutExpired after `timeout` s."""
    cmd = [sys.executable, os.path.abspath(__file__), "_child", task, json.dumps(args)]
    proc = subprocess.run(cmd, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {task} {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(task, args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for module in CHILD_IMPORTS[task]:
        importlib.import_module(module)  # imported before the baseline: code is not part of the peak
    if task in ("dit", "vae"):  # ours and diffusers' children import the same (allocator state alike)
        from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
    base_mb = 0.0 if device.type == "cuda" else proc_status_mb("VmRSS")
    torch.manual_seed(args.get("seed", 0))
    print(json.dumps(CHILD_TASKS[task](args, device, base_mb)))


# ---------------------------------------------------------------------------------------------
# memory: one ReFL training step per paradigm (train_refl.velr_step, train_lpo.lpo_step), each in its own process

MEMORY_MODES = ("velr", "pixel", "lastk", "latestep")


def memory_config(scale):
    """The ReFL step of `memory` at `scale`: "cuda", the real 1.3B at 480x832x81 in bf16 (random
    weights: memory and time do not depend on them); "cpu", a reduced-width DiT (4 layers of
    width 256) but the real Wan 2.1 VAE (dim 96) and the real LRM (default LRMConfig, 10
    members), 9 frames at 128x128 (latent 16x3x16x16); "tiny", the same models around a 2-layer
    DiT of width 64 and 5 frames at 32x32 with a 4-step sampler (a smoke test). All: LoRA, DiT
    gradient checkpointing, batch 1, no CFG; cuda and cpu: the paper's sampler (50 UniPC steps,
    mid step 15..25, window 10)."""
    sampler = ["--sample-steps", "50", "--solver", "unipc", "--mid-min", "15", "--mid-max", "25", "--window", "10",
               "--beta", "10", "--lr", "1e-5", "--guidance", "1", "--batch-size", "1", "--gradient-checkpointing"]
    if scale == "cuda":
        return {"dit": {}, "flags": [*sampler, "--size", "832x480", "--frames", "81", "--lora-rank", "256"]}
    if scale == "cpu":
        dit = {"dim": 256, "ffn_dim": 1024, "num_heads": 2, "num_layers": 4}
        return {"dit": dit, "flags": [*sampler, "--size", "128x128", "--frames", "9", "--lora-rank", "32"]}
    tiny = ["--sample-steps", "4", "--solver", "euler", "--mid-min", "1", "--mid-max", "1", "--window", "2", "--guidance", "1",
            "--batch-size", "1", "--gradient-checkpointing", "--size", "32x32", "--frames", "5", "--lora-rank", "4"]
    return {"dit": {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2}, "flags": tiny}


class PixelRewardStandIn(nn.Module):
    """The pixel reward model of the `pixel` baseline: a frozen ViT-B/16-sized image encoder
    (86M parameters: patch 16, width 768, 12 pre-LN blocks, checkpointed) on every decoded frame,
    mean-pooled to one scalar per video. The paper's are 7B-32B video VLMs (CausalVQA,
    UnifiedReward) that cannot run here; this one is about 100x smaller, so it UNDER-states what
    the pixel baseline costs. The prompt is ignored (text conditioning is left out of its cost)."""

    def __init__(self, dim=768, depth=12, heads=12, patch=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 1)

    def forward(self, video, prompts):
        b = video.shape[0]
        x = self.patch(video.transpose(1, 2).flatten(0, 1).to(self.head.weight.dtype))  # (B*T, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B*T, h*w, D)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(x.mean(1)).view(b, -1).mean(1).float()


@contextmanager
def saved_tensor_bytes(modules):
    """Count the bytes autograd saves for backward (activations, not weights), by the label of
    the innermost module of `modules` ({label: [module, ...]}) running when a tensor is saved.
    Checkpointed regions save only their inputs, so they count as such. Yields {label: bytes}."""
    counts, stack, seen = {}, ["other"], set()
    weights = {p.untyped_storage().data_ptr() for ms in modules.values() for m in ms for p in m.parameters()}
    handles = []
    for label, ms in modules.items():
        for m in ms:
            handles.append(m.register_forward_pre_hook(lambda *_, label=label: stack.append(label)))
            handles.append(m.register_forward_hook(lambda *_: None if stack.pop() else None))  # a hook's return replaces the output

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counts[stack[-1]] = counts.get(stack[-1], 0) + storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()


def child_refl(args, device, base_mb):
    """Training steps of train_refl.py (`velr_step`) or train_lpo.py (`lpo_step`) in `args["mode"]`, the models built
    here with random weights, the LRM (fp32, frozen) as train_refl.main holds it between
    alignments. Also the activation bytes held for backward by module (`saved_tensor_bytes`,
    counted on the first step) and the weight bytes by module. On a GPU the first step is the
    measured one (`warmup` False: a step at 480x832x81 takes minutes), on CPU a warm-up step
    comes first so the resident baseline holds the optimiser state and torch's lazily built
    kernels."""
    from types import SimpleNamespace

    import refl
    import replay
    import train_lpo
    import train_refl
    from lrm import LRM_CONFIGS, EnsembleLRM
    from model_dit import DiTConfig, WanDiT, cast_dit
    import vae as vae_lib
    from vae import VAE_CONFIGS, WanVAE

    cfg = args["config"]
    dit_lrm = args.get("lrm") == "dit"  # VELR with the DiT-backbone LRM, scoring x_t (--reward-on zt)
    lpo = args["mode"] == "lpo"
    shape = args.get("shape")  # "ti2v-5B": the 2.2 VAE's latents and its labels for the buffer; "i2v": image conditioning
    align = ["--align-every", "1", "--align-rounds", "1"] if shape == "ti2v-5B" else ["--align-every", "0"]
    flags = [*cfg["flags"], *align, *(["--reward-on", "zt"] if dit_lrm else [])]
    choice = args.get("experts")  # two experts: the window from one start, split half and half at the boundary
    if choice:
        base = train_refl.parse_args(flags)
        start = (base.mid_min + base.mid_max) // 2
        boundary = expert_window(sample.get_sigmas(base.sample_steps, base.shift, base.solver), start, base.window)
        flags += ["--mid-min", str(start), "--mid-max", str(start), "--experts", choice, "--boundary", str(boundary)]
    window = train_refl.parse_args(flags).window  # LPO trains as many steps as VELR's window: a like-for-like step
    targs = (train_lpo.parse_args([*flags, "--lpo-steps", str(window)]) if lpo
             else train_refl.parse_args(["--mode", args["mode"], *flags]))
    with device:  # random init of 1.3B parameters is slow on CPU
        dit = WanDiT(DiTConfig(**cfg["dit"]))
    if device.type == "cuda":  # frozen bf16 base under LoRA, Wan's fp32 islands kept (load_dit's rule)
        cast_dit(dit, sample.dtypes(device)["dit"])
    dit.gradient_checkpointing = targs.gradient_checkpointing
    lora_kwargs = dict(full_finetune=False, lora_rank=targs.lora_rank, lora_alpha=targs.lora_alpha,
                       lora_targets=targs.lora_targets, seed=targs.seed)
    pair = experts = opts = None
    if choice:
        from model_dit import TwoExpertDiT

        with device:
            low = WanDiT(DiTConfig(**cfg["dit"]))
        if device.type == "cuda":
            cast_dit(low, sample.dtypes(device)["dit"])
        pair = TwoExpertDiT(dit, low, targs.boundary, (targs.guidance, targs.guidance))
        pair.gradient_checkpointing = targs.gradient_checkpointing
        model, ref, experts = refl.wrap_experts(pair, refl.trained_experts(choice), device, 1, **lora_kwargs)
        opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=targs.lr)
                for n, m in experts.items()}
    else:
        model, ref = refl.wrap(dit, device, 1, **lora_kwargs)
    modules = {"dit": [dit] + ([pair.low] if pair is not None else [])}
    vae = rm = lrm = None
    if args["mode"] == "pixel":  # only what the step uses is built: the decoder and the pixel RM ...
        vae = WanVAE(VAE_CONFIGS["wan2.1"]).to(device).eval().requires_grad_(False)
        rm = PixelRewardStandIn().to(device).eval().requires_grad_(False)
        modules.update(decoder=[vae.conv2, vae.decoder], pixel_rm=[rm])
    elif dit_lrm:  # the generator's first blocks (8 on a GPU) as a frozen fp32 trunk, 10 heads
        from dataclasses import replace

        from lrm_dit import DiTLRMConfig, DiTRewardModel

        trunk = replace(dit.cfg, num_layers=min(DIT_LRM_BLOCKS["cuda"], dit.cfg.num_layers))
        with device:
            lrm = DiTRewardModel(DiTLRMConfig(dit=trunk, noise_aware=True), 10).requires_grad_(False)
        lrm.trunk.gradient_checkpointing = targs.gradient_checkpointing
        modules.update(lrm=[lrm])
    else:  # ... or the LRM (VELR's alignment decodes and scores without gradient, offloadable); LPO's is noise-aware
        from dataclasses import replace

        lrm_cfg = replace(LRM_CONFIGS["default"], timestep_cond=args["mode"] == "lpo", in_channels=dit.cfg.out_dim)
        lrm = EnsembleLRM(lrm_cfg, 10).to(device).requires_grad_(False)
        modules.update(lrm=[lrm])
    if shape == "ti2v-5B":  # the buffer's labels: the Wan 2.2 VAE decodes each admitted z0 (no gradient)
        vae = WanVAE(VAE_CONFIGS["wan2.2"]).to(device).eval().requires_grad_(False)
        modules.update(decoder=[vae.conv2, vae.decoder])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=targs.lr) if pair is None else None
    sigmas = sample.get_sigmas(targs.sample_steps, targs.shift, targs.solver)
    context = torch.randn(1, 512, dit.cfg.text_dim, device=device)  # precomputed prompt embedding
    lengths = torch.tensor([20], device=device)
    prompts, step_index = ["a red video"], [0]
    # what train_refl's / train_lpo's step reads of a refl.Run (no alignment: --align-every 0)
    latent = vae_lib.latent_shape(targs.frames, targs.height, targs.width, vae.cfg if vae is not None else None)
    cond = None
    if shape == "i2v":  # the I2V models' y: mask (4) + image latent (16) on channels, and the image latent
        g = torch.Generator().manual_seed(0)
        cond = {"y": torch.randn(1, 20, *latent[1:], generator=g).to(device),
                "image_latent": torch.randn(1, 16, 1, *latent[2:], generator=g).to(device)}
    run = SimpleNamespace(model=model, ref=ref, lrm=lrm, vae=vae, neg=None, sigmas=sigmas, device=device, data_rank=0,
                          prompts=prompts, table={prompts[0]: (context[0], lengths[0])}, opt=opt, world=1,
                          shape=latent, bad=refl.new_bad_counts(), log=print, pair=pair, experts=experts, opts=opts,
                          guidance=targs.guidance, mid=(targs.mid_min, targs.mid_max), first_low=None,
                          conditioning=lambda entries: cond, data_world=1, dp_group=None,
                          buffer=replay.ReplayBuffer(targs.buffer_size),
                          reward_fn=lambda video, p: video.float().mean((1, 2, 3, 4)),
                          lrm_opt=torch.optim.AdamW(lrm.parameters(), lr=targs.align_lr) if shape == "ti2v-5B" else None)
    if pair is not None:
        *run.mid, run.first_low = train_refl.expert_plan(targs, pair, sigmas, print)
    score = None if lpo else train_refl.make_reward(targs.mode, lrm, vae, rm, reward_on=targs.reward_on)

    def step():
        step_index[0] += 1  # steps 1, 2, ...: the same mid steps and noise for every mode
        if lpo:
            train_lpo.lpo_step(run, targs, step_index[0])
        else:
            train_refl.velr_step(run, targs, score, step_index[0])

    with saved_tensor_bytes(modules) as saved:  # counted on the first step
        first = measure(step, device, base_mb, 1, warmup=False)
    warmup = args.get("warmup", device.type != "cuda")  # then the first step was the warm-up
    res = measure(step, device, base_mb, args.get("repeats", 1), warmup=False) if warmup else first
    res["saved_mb"] = {k: v / 2**20 for k, v in saved.items()}
    res["params_mb"] = {k: sum(p.numel() * p.element_size() for m in ms for p in m.parameters()) / 2**20 for k, ms in modules.items()}
    return res


def memory_ratios(velr, pixel):
    """VELR / pixel ReFL: step memory (above the resident weights), total peak, step time."""
    return {"ratio_peak": velr["step_mb"] / pixel["step_mb"], "ratio_peak_total": velr["peak_mb"] / pixel["peak_mb"],
            "ratio_time": velr["time_s"] / pixel["time_s"]}


def bench_memory(device, scale, rows=None):
    """Every row of memory_jobs (rows: only these names), each one training step in its own child; the
    VELR / pixel and CFG both / cond ratios when both of their rows ran."""
    cfg = memory_config(scale)
    res = {"config": cfg, "device": device.type}
    for name, job in memory_jobs(cfg, scale).items():
        if rows is None or name in rows:
            res[name] = run_child("refl", {**job, "repeats": 1})
    return with_memory_ratios(res)


def with_memory_ratios(res: dict) -> dict:
    """res with the VELR / pixel and CFG both / cond ratios of the rows it holds (each when both rows are there)."""
    if "velr" in res and "pixel" in res:
        res.update(memory_ratios(res["velr"], res["pixel"]))
    if "velr_cfg_both" in res and "velr_cfg_cond" in res:
        both, cond = res["velr_cfg_both"], res["velr_cfg_cond"]
        res["cfg_both_over_cond"] = {k: both[k] / cond[k] for k in ("step_mb", "peak_mb", "time_s")}
    return res


def memory_jobs(cfg, scale) -> dict:
    """name -> the child's arguments of each `memory` row: the ReFL paradigms (MEMORY_MODES), VELR with
    the DiT-backbone LRM, LPO (k = 4 candidates per window step), VELR under CFG 5 with the exact guided
    gradient (--cfg-grad both), the approximation (cond) and both without the KL (beta 0: the KL's extra
    guided call at the cut state left out), two experts under each --experts, and model_jobs' rows."""
    jobs = {mode: {"mode": mode, "config": cfg} for mode in MEMORY_MODES}
    jobs["velr_dit_lrm"] = {"mode": "velr", "lrm": "dit", "config": cfg}
    jobs["lpo"] = {"mode": "lpo", "config": cfg}
    for name, extra in (("velr_cfg_both", ["--cfg-grad", "both"]), ("velr_cfg_cond", ["--cfg-grad", "cond"]),
                        ("velr_cfg_both_beta0", ["--cfg-grad", "both", "--beta", "0"])):
        flags = [*cfg["flags"], "--guidance", "5", *extra]  # the last value of a flag wins
        jobs[name] = {"mode": "velr", "config": {**cfg, "flags": flags}}
    for choice in ("both", "low", "high"):
        jobs[f"velr_experts_{choice}"] = {"mode": "velr", "experts": choice, "config": cfg}
    return {**jobs, **model_jobs(cfg, scale)}


def model_jobs(cfg, scale) -> dict:
    """VELR's step for the Wan 2.2 and image-to-video shapes: velr_5b, the TI2V-5B's (a 48-channel DiT
    and LRM, and with --align-every 1 the buffer's labels decoded by the Wan 2.2 VAE; on a GPU the real
    5B at 1280x704x121), and velr_i2v, image-to-video (the DiT reads 36 channels: the I2V models' mask
    and image latent beside x, the buffer stores the image latent; the table's DiT otherwise)."""
    from dataclasses import asdict

    import model_dit

    five = {**cfg, "dit": asdict(model_dit.DIT_CONFIGS["ti2v-5B"]) if scale == "cuda" else
            {**cfg["dit"], "in_dim": 48, "out_dim": 48}}
    if scale == "cuda":
        five["flags"] = [*cfg["flags"], "--size", "1280x704", "--frames", "121"]
    i2v = {**cfg, "dit": {**cfg["dit"], "in_dim": 36}}  # the table's DiT: the difference is the conditioning's
    return {"velr_5b": {"mode": "velr", "shape": "ti2v-5B", "config": five},
            "velr_i2v": {"mode": "velr", "shape": "i2v", "config": i2v}}


def expert_window(sigmas, start: int, window: int) -> float:
    """The boundary that splits the window starting at `start` in half: its first window // 2 steps
    run the high-noise expert, the rest the low-noise one."""
    ts = sample.timesteps_from_sigmas(sigmas).tolist()
    mid = start + window // 2
    return (ts[mid - 1] + ts[mid]) / 2000


def table_memory(res, modes=None):
    modes = modes or [m for m in (*MEMORY_MODES, "velr_dit_lrm", "lpo", "velr_cfg_both", "velr_cfg_cond",
                                  "velr_cfg_both_beta0", "velr_experts_both", "velr_experts_low", "velr_experts_high",
                                  "velr_5b", "velr_i2v")
                      if m in res]
    parts = ("dit", "decoder", "pixel_rm", "lrm", "other")
    rows = [
        [mode, res[mode]["time_s"], res[mode]["peak_mb"], res[mode]["resident_mb"], res[mode]["step_mb"]]
        + [res[mode]["saved_mb"].get(k, 0.0) for k in parts]
        + [res[mode]["params_mb"].get(k, 0.0) for k in ("dit", "decoder", "pixel_rm", "lrm")]
        for mode in modes
    ]
    header = (["mode", "step s", "peak MiB", "resident MiB", "step MiB"] + [f"saved {k} MiB" for k in parts]
              + [f"weights {k} MiB" for k in ("dit", "decoder", "pixel_rm", "lrm")])
    note = ("velr_experts_*: two DiTs of this shape as the A14B's experts, the window (one start, mid step of the "
            "range) split half high-noise, half low-noise, --experts both / low / high. velr_5b: the TI2V-5B's "
            "48-channel latents (DiT and LRM), with the buffer's labels decoded by the Wan 2.2 VAE and one "
            "alignment update in the step (--align-every 1); on a GPU the real 5B at 1280x704x121. velr_i2v: the "
            "DiT reading the I2V models' 36 channels (x, mask, image latent). "
            "peak = resident (weights, optimiser state) + step (activations, gradients, temporaries). pixel = decoder "
            "(checkpointed) + a ViT-B/16-sized stand-in pixel RM in the backward; the paper's VLM RMs are ~100x larger "
            "(paper Table 1, Wan 1.3B: pixel ReFL 105.76 GB, VELR 22.18 GB = 20.97%)")
    return (f"### memory: one ReFL step, {res['device']}, {' '.join(res['config']['flags'])}, DiT {res['config']['dit'] or '1.3B'}"
            f"\n\n{markdown(header, rows)}\n\n"
            + (f"VELR / pixel: step memory {res['ratio_peak']:.3f}, total peak {res['ratio_peak_total']:.3f}, "
               f"step time {res['ratio_time']:.3f}. " if "ratio_peak" in res else "") + note
            + (f"\n\nCFG 5, --cfg-grad both / cond: step memory {res['cfg_both_over_cond']['step_mb']:.3f}, total peak "
               f"{res['cfg_both_over_cond']['peak_mb']:.3f}, step time {res['cfg_both_over_cond']['time_s']:.3f}"
               if "cfg_both_over_cond" in res else ""))


# ---------------------------------------------------------------------------------------------
# dit: our WanDiT vs diffusers' WanTransformer3DModel, identical weights


def dit_setup(scale, version="2.1"):
    """(diffusers constructor kwargs, latent (C, F, H, W)) at `scale`: "cuda", the real 1.3B at
    480x832x81 (bf16, gradient checkpointing on a GPU); "quick", 4 of its 30 blocks at that size;
    "cpu", two 1.3B-width blocks on a small latent (per-block cost is what differs, so two blocks
    show it); "tiny", a 2-layer DiT of width 64 (a smoke test). version "2.2": the TI2V-5B's width
    (24 heads, FFN 14336, 48 latent channels) at 1280x704x121 on a GPU, run with per-token t."""
    if version == "2.2":
        width = {"num_attention_heads": 24, "attention_head_dim": 128, "ffn_dim": 14336, "text_dim": 4096,
                 "in_channels": 48, "out_channels": 48}
        return {
            "cuda": ({**width, "num_layers": 30}, (48, 31, 44, 80)),
            "quick": ({**width, "num_layers": 4}, (48, 31, 44, 80)),
            "cpu": ({**width, "num_layers": 2}, (48, 3, 8, 14)),
            "tiny": ({"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 128, "text_dim": 64,
                      "in_channels": 48, "out_channels": 48, "num_layers": 2}, (48, 2, 4, 4)),
        }[scale]
    width = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "text_dim": 4096}
    return {
        "cuda": ({**width, "num_layers": 30}, latent_shape(81, 480, 832)),
        "quick": ({**width, "num_layers": 4}, latent_shape(81, 480, 832)),
        "cpu": ({**width, "num_layers": 2}, (16, 3, 16, 28)),
        "tiny": ({"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 128, "text_dim": 64, "num_layers": 2},
                 (16, 1, 4, 4)),
    }[scale]


def child_dit(args, device, base_mb):
    """Forward + backward to every weight of one denoising call; per_token: the TI2V-5B's
    image-to-video timesteps (the first latent frame's tokens at 0, the rest at t)."""
    gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *args["shape"], generator=g).to(device)
    t = torch.tensor([700.0], device=device)
    if args.get("per_token"):
        from model_dit import first_frame_timesteps

        t = first_frame_timesteps(t, (args["shape"][1], args["shape"][2] // 2, args["shape"][3] // 2))
    context = torch.randn(1, 512, args["text_dim"], generator=g).to(device)  # zero-padded length 512
    if args["impl"] in ("ours", "ours_compiled"):
        from model_dit import load_dit

        model = load_dit(args["path"], device=device, dtype=sample.dtypes(device)["dit"]).train()
        model.gradient_checkpointing = gpu
        if args["impl"] == "ours_compiled":  # --compile; the warm-up call of measure() compiles
            model.compile_blocks()
        forward = lambda: model(x, t, context)  # noqa: E731
    else:
        from diffusers import WanTransformer3DModel

        from safetensors.torch import load_file

        # from_pretrained insists on `accelerate` for this class; build from config and load instead
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(args["path"]))
        model.load_state_dict(load_file(Path(args["path"]) / "diffusion_pytorch_model.safetensors"))
        model = model.to(device).train()
        if gpu:  # what torch_dtype=bf16 does (which needs `accelerate`): bf16 but for its fp32 modules
            for name, p in model.named_parameters():
                if not any(k in name for k in model._keep_in_fp32_modules):
                    p.data = p.data.to(torch.bfloat16)
            model.enable_gradient_checkpointing()
        forward = lambda: model(x, t, context, return_dict=False)[0]  # noqa: E731

    def step():
        with sample.autocast(device):
            v = forward()
        v.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return measure(step, device, base_mb, args.get("repeats", 3))


def bench_dit(device, scale, timeout=1800):
    from diffusers import WanTransformer3DModel

    kwargs, shape = dit_setup(scale)
    res = {"shape": list(shape), "num_layers": kwargs["num_layers"]}
    args = {"shape": shape, "text_dim": kwargs["text_dim"]}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**kwargs)
        with torch.no_grad():  # random weights everywhere (no zero-initialised output layer)
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(tmp)
        del model
        res["fwd_bwd"] = {impl: run_child("dit", {**args, "impl": impl, "path": tmp}, timeout) for impl in IMPLS}
        try:  # compilation takes minutes at the real size: its own, longer limit, and a failure costs only this row
            compiled = run_child("dit", {**args, "impl": "ours_compiled", "path": tmp}, 3 * timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            compiled = {"error": f"{type(err).__name__}: {str(err)[-500:]}"}
    res.update(ratios(res["fwd_bwd"]))
    diffusers = res["fwd_bwd"]["diffusers"]  # `train_refl.py --compile`'s DiT against diffusers' eager one
    res["compile"] = {"ours_compiled": compiled}
    if "error" not in compiled:  # on a GPU the peak is the allocator's; on the CPU RSS, which compilation inflates
        res["compile"].update(ratio_time=compiled["time_s"] / diffusers["time_s"], ratio_peak=compiled["peak_mb"] / diffusers["peak_mb"])
    kwargs, shape = dit_setup(scale, "2.2")  # the TI2V-5B's blocks with per-token t
    part = {"shape": list(shape), "num_layers": kwargs["num_layers"]}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(tmp)
        del model
        job = {"shape": shape, "text_dim": kwargs["text_dim"], "per_token": True, "path": tmp}
        part["fwd_bwd"] = {impl: run_child("dit", {**job, "impl": impl}, timeout) for impl in IMPLS}
    part.update(ratios(part["fwd_bwd"]))
    res["ti2v"] = part
    return res


def table_dit(res):
    text = table_vs_diffusers("dit (Wan 2.1 1.3B blocks)", res, ("fwd_bwd",))
    if "ti2v" in res:
        text += "\n\n" + table_vs_diffusers("dit (Wan 2.2 TI2V-5B blocks, per-token t)", res["ti2v"], ("fwd_bwd",))
    return text


# ---------------------------------------------------------------------------------------------
# vae: our WanVAE vs diffusers' AutoencoderKLWan, identical weights


def vae_setup(scale, version="2.1"):
    """(diffusers constructor kwargs, video (frames, height, width), our VAEConfig name): the Wan 2.1
    or 2.2 VAE on 5 frames at 480x832 ("cuda"), 240x416 ("quick"; 256x416 for 2.2, whose sizes are
    multiples of 32) or 64x64 ("cpu"); "tiny": a width-8 VAE at 16x16 (32x32 for 2.2)."""
    from vae import LATENTS_MEAN_22, LATENTS_STD_22

    if version == "2.1":
        return {"cuda": ({}, (5, 480, 832), "wan2.1"), "quick": ({}, (5, 240, 416), "wan2.1"),
                "cpu": ({}, (5, 64, 64), "wan2.1"),
                "tiny": ({"base_dim": 8, "num_res_blocks": 1}, (5, 16, 16), "tiny")}[scale]
    wan22 = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
                 out_channels=12, latents_mean=list(LATENTS_MEAN_22), latents_std=list(LATENTS_STD_22))
    return {"cuda": (wan22, (5, 480, 832), "wan2.2"), "quick": (wan22, (5, 256, 416), "wan2.2"),
            "cpu": (wan22, (5, 64, 64), "wan2.2"),
            "tiny": ({**wan22, "base_dim": 8, "decoder_base_dim": 12, "num_res_blocks": 1}, (5, 32, 32), "tiny2.2")}[scale]


def child_vae(args, device, base_mb):
    """encode (no grad, as when caching latents) or decode forward+backward (pixel ReFL);
    "decode_ckpt": ours with decode(checkpoint=True), as train_refl's pixel paradigm runs it."""
    from vae import VAE_CONFIGS

    t, h, w = args["shape"]
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, t, h, w, generator=g) * 2 - 1).to(device)
    z = torch.randn(1, *latent_shape(t, h, w, VAE_CONFIGS[args.get("config", "wan2.1")]), generator=g)
    z = z.to(device).requires_grad_(True)
    if args["impl"] == "ours":
        from vae import load_vae

        vae = load_vae(args["path"], device=device)
        encode, decode = vae.encode, (lambda z: vae.decode(z, checkpoint=args["op"] == "decode_ckpt"))
    else:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(args["path"]).to(device).eval().requires_grad_(False)
        for p in vae.parameters():  # read every weight once, as load_vae's NaN/inf check does: on the CPU the
            p.detach().sum()  # weights are memory-mapped, and only pages read count in the resident memory
        encode, decode = (lambda v: vae.encode(v).latent_dist.mean), (lambda z: vae.decode(z).sample)

    def step():
        if args["op"] == "encode":
            with torch.no_grad():
                encode(video)
        else:
            decode(z).square().mean().backward()
            z.grad = None

    return measure(step, device, base_mb, args.get("repeats", 3))


def bench_vae(device, scale, timeout=1800):
    """The Wan 2.1 VAE (top-level keys) and the Wan 2.2 VAE (`wan22`), ours vs diffusers with the
    same random weights; for 2.2 also our checkpointed decode (diffusers has none)."""
    from diffusers import AutoencoderKLWan

    res = {}
    for version in ("2.1", "2.2"):
        kwargs, shape, config = vae_setup(scale, version)
        part = {"shape": list(shape)}
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            AutoencoderKLWan(**kwargs).save_pretrained(tmp)  # the architecture, random weights
            job = {"path": tmp, "shape": part["shape"], "config": config}
            for op in ("encode", "decode"):
                part[op] = {impl: run_child("vae", {**job, "impl": impl, "op": op}, timeout) for impl in IMPLS}
            if version == "2.2":
                part["decode_ckpt"] = {"ours": run_child("vae", {**job, "impl": "ours", "op": "decode_ckpt"}, timeout)}
        part.update(ratios(part["encode"], part["decode"]))
        part["ratio_decode_peak"] = part["decode"]["ours"]["peak_mb"] / part["decode"]["diffusers"]["peak_mb"]
        if version == "2.1":
            res.update(part)
        else:
            res["wan22"] = part
    return res


def table_vae(res):
    text = table_vs_diffusers("vae (Wan 2.1)", res, ("encode", "decode"))
    if "wan22" in res:
        r = res["wan22"]
        text += "\n\n" + table_vs_diffusers("vae (Wan 2.2)", r, ("encode", "decode"))
        c = r["decode_ckpt"]["ours"]
        text += (f"\n\nWan 2.2 decode peak ours/diffusers: {r['ratio_decode_peak']:.3f}; ours with "
                 f"decode(checkpoint=True): {c['time_s']:.3g} s, {c['peak_mb']:.0f} MiB")
    return text


# ---------------------------------------------------------------------------------------------
# lrm: the 10-member ensemble as one batched computation vs one member vs a loop over members

LRM_VARIANTS = ("ensemble10", "member1", "loop10")


def lrm_shape(scale):
    """Latent (C, T, H, W): 480x832x81 on GPU, 17 frames at 240x416 on CPU, 1 frame at 32x32 (tiny)."""
    return {"cuda": latent_shape(81, 480, 832), "cpu": latent_shape(17, 240, 416), "tiny": latent_shape(1, 32, 32)}[scale]


# DiT-backbone LRM (lrm_dit.DiTRewardModel): Wan 1.3B's block width, PRFL's 8 blocks on a GPU (2 on the
# CPU, where 8 blocks of 1.3B take minutes: fewer trunk blocks make the heads' share larger, so the
# CPU ratio is an upper bound), the tiny DiT for smoke tests; frozen trunk, PRFL's head MLP.
DIT_LRM_BLOCKS = {"cuda": 8, "cpu": 2, "tiny": 2}


def dit_lrm_config(scale):
    from dataclasses import replace

    from lrm_dit import DiTLRMConfig
    from model_dit import DIT_CONFIGS

    base = DIT_CONFIGS["tiny" if scale == "tiny" else "1.3B"]
    return DiTLRMConfig(dit=replace(base, num_layers=DIT_LRM_BLOCKS[scale]), noise_aware=True,
                        mlp_dims=(64, 32) if scale == "tiny" else (1024, 512))


def child_lrm(args, device, base_mb):
    """Forward + backward (to the weights and to the latent, as in LRM training and ReFL)."""
    from lrm import LRM_CONFIGS, EnsembleLRM
    from lrm_dit import DiTRewardModel

    dit_heads = args["variant"].startswith("dit_heads")  # the DiT-backbone LRM: N heads on one frozen trunk
    cfg = dit_lrm_config(args["scale"]) if dit_heads else LRM_CONFIGS[args["config"]]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, *args["shape"], generator=g).to(device).requires_grad_(True)
    context = torch.randn(1, 32, cfg.text_dim, generator=g).to(device)
    lengths = torch.tensor([20], device=device)
    if dit_heads:
        models = [DiTRewardModel(cfg, int(args["variant"][len("dit_heads"):]), seed=0).requires_grad_(True)]
        models[0].trunk.gradient_checkpointing = device.type == "cuda"  # as train_refl --gradient-checkpointing at 480x832x81
    elif args["variant"] == "ensemble10":
        models = [EnsembleLRM(cfg, 10, seed=0)]
    else:  # member i of the ensemble is EnsembleLRM(cfg, 1, seed=i)
        models = [EnsembleLRM(cfg, 1, seed=i) for i in range(10 if args["variant"] == "loop10" else 1)]
    models = [m.to(device) for m in models]

    def step():
        sum(m(z, context, lengths).sum() for m in models).backward()
        for m in models:
            m.zero_grad(set_to_none=True)
        z.grad = None

    return measure(step, device, base_mb, args.get("repeats", 3))


def bench_lrm(device, scale):
    shape = lrm_shape(scale)
    res = {"shape": list(shape), "config": "default"}
    for v in LRM_VARIANTS:
        res[v] = run_child("lrm", {"variant": v, "config": "default", "shape": shape})
    t = {v: res[v]["time_s"] for v in LRM_VARIANTS}
    res["ratio_10_vs_1"] = t["ensemble10"] / t["member1"]
    res["ratio_10_vs_loop"] = t["ensemble10"] / t["loop10"]
    res["ratio_peak_10_vs_loop"] = res["ensemble10"]["peak_mb"] / res["loop10"]["peak_mb"]
    res["dit_blocks"] = DIT_LRM_BLOCKS[scale]
    for v in ("dit_heads10", "dit_heads1"):
        res[v] = run_child("lrm", {"variant": v, "scale": scale, "shape": shape})
    res["ratio_heads_vs_1"] = res["dit_heads10"]["time_s"] / res["dit_heads1"]["time_s"]
    res["ratio_peak_heads_vs_1"] = res["dit_heads10"]["peak_mb"] / res["dit_heads1"]["peak_mb"]
    return res


def table_lrm(res):
    dit = [v for v in ("dit_heads10", "dit_heads1") if v in res]
    rows = [[v, res[v]["time_s"], res[v]["peak_mb"]] for v in (*LRM_VARIANTS, *dit)]
    ratios = [["ensemble10 / member1 time", res["ratio_10_vs_1"]], ["ensemble10 / loop10 time", res["ratio_10_vs_loop"]],
              ["ensemble10 / loop10 peak", res["ratio_peak_10_vs_loop"]]]
    if dit:
        ratios += [[f"DiT LRM ({res['dit_blocks']} trunk blocks) 10 heads / 1 head time", res["ratio_heads_vs_1"]],
                   ["DiT LRM 10 heads / 1 head peak", res["ratio_peak_heads_vs_1"]]]
    return (f"### lrm forward+backward, latent {res['shape']}\n\n" + markdown(["variant", "s", "peak MiB"], rows)
            + "\n\n" + markdown(["ratio", "value"], ratios))


# ---------------------------------------------------------------------------------------------
# quality: the paper's Table 3 (Dollar, one LRM, ensembles of 3, 5, 10) on the synthetic data

QUALITY_MODELS = {"dollar": ["--model", "dollar"], "lrm1": ["--members", "1"], "ensemble3": ["--members", "3"],
                  "ensemble5": ["--members", "5"], "ensemble10": ["--members", "10"]}
QUALITY_ARGS = ["--synthetic", "256", "--epochs", "8", "--lr", "1e-3", "--batch-size", "8", "--config", "tiny"]


def bench_quality(device, scale):
    """Every model trained by train_lrm.py with the same data, split, seed, steps and lr; the
    ensemble row of its metrics is the ensemble mean (a single model's own prediction for N=1).
    The same at every scale (the synthetic set is small; train_lrm picks the device)."""
    import train_lrm

    res = {"args": QUALITY_ARGS}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in QUALITY_MODELS.items():
            with open(Path(tmp) / f"{name}.log", "w") as log, redirect_stdout(log):  # its per-epoch tables
                m = train_lrm.main([*QUALITY_ARGS, *extra, "--out", str(Path(tmp) / name), "--log-every", "1000000"])
            res[name] = {f"{split}_{k}": m[split][k][-1] for split in ("train", "test") for k in ("mse", "pcc")}
        res.update(bench_quality_noise(tmp))
    return res


# Noise-aware and pairwise LRMs (options beside the paper): their own synthetic set, where the
# rewards of one prompt spread (toy:calibrated_color), so same-prompt pairs exist; 5 members each.
QUALITY_NA_ARGS = ["--synthetic", "512", "--synthetic-reward", "toy:calibrated_color", "--pair-margin", "0.005",
                   "--epochs", "8", "--lr", "1e-3", "--batch-size", "8", "--config", "tiny", "--members", "5",
                   "--sample-steps", "20", "--solver", "euler", "--eval-sigmas", "0,0.3,0.6,0.9"]
QUALITY_NA_MODELS = {"clean": [], "huber": ["--noise-aware"], "bt": ["--noise-aware", "--loss", "bt", "--epochs", "3"],
                     "thurstone": ["--noise-aware", "--loss", "thurstone", "--epochs", "3"],
                     # DiT-backbone LRMs (PRFL's design): the toy generator's blocks as a frozen trunk, 5 heads;
                     # pretrained (the world's generator) and with the same blocks at their random init
                     "dit": ["--noise-aware", "--model", "dit", "--dit-ckpt", "toy"],
                     "dit_random": ["--noise-aware", "--model", "dit"]}


def bench_quality_noise(tmp):
    """The noise-aware ensemble per sigma (test MSE / PCC against the clean reward, same-prompt pair
    accuracy) next to a clean ensemble on the same data, and BT / Thurstone / Huber (all noise-aware)
    ranking accuracy and expected calibration error, each the mean over the noisy levels (sigma > 0)."""
    import toy
    import train_lrm

    world = toy.default_world()  # the watchable world: its own reward (the square's colour) labels the set
    args = [toy.WORLDS[world].reward if a == "toy:calibrated_color" and world != "random" else a for a in QUALITY_NA_ARGS]
    runs = {}
    for name, extra in QUALITY_NA_MODELS.items():
        with open(Path(tmp) / f"na_{name}.log", "w") as log, redirect_stdout(log):
            runs[name] = train_lrm.main([*args, *extra, "--out", str(Path(tmp) / f"na_{name}"), "--log-every", "1000000"])
    noisy = [k for k in runs["huber"]["sigma"] if float(k) > 0]
    pairwise = {name: {"pair_acc": sum(runs[name]["sigma"][k]["pair_acc"] for k in noisy) / len(noisy),
                       "ece": sum(runs[name]["sigma"][k]["ece"] for k in noisy) / len(noisy),
                       "per_sigma": runs[name]["sigma"]} for name in ("huber", "bt", "thurstone")}
    def per_sigma(name):
        return {k: {m: v[m] for m in ("test_mse", "test_pcc", "pair_acc")} for k, v in runs[name]["sigma"].items()}

    dit_rows = {key: per_sigma(name) for name, key in (("dit", "dit_lrm"), ("dit_random", "dit_lrm_random_trunk"))
                if name in runs}
    return {"args_noise": args, "clean_ensemble_test_mse": runs["clean"]["test"]["mse"][-1],
            "noise_aware": per_sigma("huber"), **dit_rows, "pairwise": pairwise}


def table_quality(res):
    rows = [[split] + [res[n][f"{split}_{k}"] for n in QUALITY_MODELS for k in ("mse", "pcc")] for split in ("train", "test")]
    header = [""] + [f"{n} {k.upper()}" for n in QUALITY_MODELS for k in ("mse", "pcc")]
    text = f"### quality (train_lrm.py {' '.join(res['args'])})\n\n" + markdown(header, rows)
    if "noise_aware" in res:
        rows = [[sig, m["test_mse"], m["test_pcc"], m["pair_acc"]] for sig, m in res["noise_aware"].items()]
        text += (f"\n\n### noise-aware ensemble (train_lrm.py {' '.join(res['args_noise'])} --noise-aware; clean "
                 f"ensemble test MSE {res['clean_ensemble_test_mse']:.4g})\n\n"
                 + markdown(["sigma", "test MSE", "test PCC", "pair acc"], rows))
        for key, what in (("dit_lrm", "the toy generator's blocks"), ("dit_lrm_random_trunk", "the same blocks, random init")):
            if key in res:  # DiT-backbone LRM, frozen trunk, 5 heads
                rows = [[sig, m["test_mse"], m["test_pcc"], m["pair_acc"]] for sig, m in res[key].items()]
                text += (f"\n\n### DiT-backbone LRM ({what}; --model dit --noise-aware)\n\n"
                         + markdown(["sigma", "test MSE", "test PCC", "pair acc"], rows))
        rows = [[n, m["pair_acc"], m["ece"]] for n, m in res["pairwise"].items()]
        text += "\n\n### pairwise (noise-aware, mean over sigma > 0)\n\n" + markdown(["loss", "pair acc", "ECE"], rows)
    return text


# ---------------------------------------------------------------------------------------------
# gpu-quick: VELR vs pixel ReFL at the real config plus dit / vae at a modest size, ~10 minutes

QUICK_TIMEOUT_S = {"refl": 270, "dit": 90, "vae": 60}  # per child (2 refl, 2 dit, 9 vae children): a hung
# child costs its limit, not the run; run it under `timeout 590` too, what printed before stays


def attempt(res, name, fn):
    """res[name] = fn(), or {"error": ...} when it raises (a failing or timed-out child), printed at
    once either way: a run cut short by its time budget still shows every part that finished."""
    try:
        res[name] = fn()
    except Exception as e:  # noqa: BLE001 (one failing part must not lose the others)
        res[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    print(f"{name}: {json.dumps(res[name])}", flush=True)


def bench_gpu_quick(device, scale):
    """The VELR and pixel-ReFL children of `memory` at `scale` (one step each, no warm-up on a
    GPU), then `dit` and `vae` at the "quick" sizes (4 of the 1.3B's blocks at 480x832x81; the VAE
    at 240x416), each part timed out by QUICK_TIMEOUT_S and printed as soon as it is done."""
    cfg = memory_config(scale)
    part = "quick" if scale == "cuda" else scale
    res = {"config": cfg, "device": device.type}
    for mode in ("velr", "pixel"):
        attempt(res, mode, lambda: run_child("refl", {"mode": mode, "config": cfg, "repeats": 1}, QUICK_TIMEOUT_S["refl"]))
    if "error" not in res["velr"] and "error" not in res["pixel"]:
        res.update(memory_ratios(res["velr"], res["pixel"]))
        print(f"VELR / pixel: {json.dumps(memory_ratios(res['velr'], res['pixel']))}", flush=True)
    attempt(res, "dit", lambda: bench_dit(device, part, QUICK_TIMEOUT_S["dit"]))
    attempt(res, "vae", lambda: bench_vae(device, part, QUICK_TIMEOUT_S["vae"]))
    return res


def table_gpu_quick(res):
    modes = [m for m in ("velr", "pixel") if "error" not in res[m]]
    parts = [f"{name} failed: {res[name]['error']}" for name in ("velr", "pixel", "dit", "vae") if "error" in res[name]]
    if len(modes) == 2:
        parts.append(table_memory(res, modes))
    if "error" not in res["dit"]:
        parts.append(table_dit(res["dit"]))
    if "error" not in res["vae"]:
        parts.append(table_vae(res["vae"]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# toy: is the offline toy world one you can watch? (its VAE, its generator, the default run)

TOY_SEEDS = 4


def bench_toy(device, scale, seeds=TOY_SEEDS, world="random"):
    """A toy world's floors (toy.WORLDS[world]): the VAE's reconstruction PSNR on 64 held-out
    procedural videos, the world build time in a fresh cache (the watchable world's VAE and DiT
    come from assets/, so its build is the LRM bootstrap), the share of 48 fixed samples of the
    pretrained generator in which the scene parser finds one square in every frame, and the
    README's main command (train_refl.py, toy defaults) for seeds 0..seeds-1: true reward before,
    after, gain."""
    import toy
    import train_refl

    res = {"world": world}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        dit, vae, encoder, tokenizer, lrm = toy.load_world(toy.WORLDS[world], cache_dir=tmp, log=lambda *a: None)
        res["build_s"] = time.time() - t0
        res.update(toy.measure_world(dit, vae, encoder, tokenizer, toy.WORLDS[world]))
        data = toy.shared_rollouts(dit, vae, encoder, tokenizer, toy.WORLDS[world], tmp)
        if data is not None:  # the bootstrapped LRM on the rollouts it never trained on
            res["lrm_heldout"] = toy.lrm_metrics(lrm, data, toy.heldout_split(len(data["z"]), toy.WORLDS[world])[1])
        res["runs"] = {}
        for seed in range(seeds):
            out = Path(tmp) / f"run{seed}"
            with open(Path(tmp) / f"run{seed}.log", "w") as log, redirect_stdout(log):
                train_refl.main(["--cache-dir", tmp, "--out", str(out), "--seed", str(seed), "--toy-world", world])
            summary = json.loads((out / "summary.json").read_text())
            before, after = summary["true_reward_before"], summary["true_reward_after"]
            res["runs"][seed] = {"before": before, "after": after, "gain": after - before, "sec": summary["train_seconds"]}
            print(f"toy seed {seed}: {json.dumps(res['runs'][seed])}", flush=True)
    gains = torch.tensor([r["gain"] for r in res["runs"].values()])
    res["gain_mean"] = gains.mean().item()
    res["gain_std"] = gains.std().item() if len(gains) > 1 else 0.0
    return res


def table_toy(res):
    rows = [["VAE PSNR, 64 held-out videos (dB)", res["vae_psnr_db"]], ["world build (s)", res["build_s"]],
            ["samples with one square in every frame", res["square_every_frame"]],
            ["mean frames with one square (of 5)", res["square_frames_mean"]]]
    rows += [[f"default run seed {s}: before -> after (gain)", f"{r['before']:.3f} -> {r['after']:.3f} ({r['gain']:+.3f})"]
             for s, r in res["runs"].items()]
    rows.append(["gain, mean ± std over seeds", f"{res['gain_mean']:+.3f} ± {res['gain_std']:.3f}"])
    if "lrm_heldout" in res:
        m = res["lrm_heldout"]
        rows.append([f"bootstrap LRM on {m['samples']} held-out rollouts: MSE / PCC / pair acc",
                     f"{m['mse']:.4f} / {m['pcc']:.3f} / {m['pair_acc']:.3f}"])
    world = res.get("world", "random")
    return f"### toy world {world} (python bench.py toy --toy-world {world})\n\n" + markdown(["measure", "value"], rows)


# ---------------------------------------------------------------------------------------------
# lpo-probe: does --mode lpo optimise what its scorer prefers? (a known scorer in place of the LRM)

class ChannelMeanScorer(nn.Module):
    """A stand-in noise-aware "LRM" with a known preference: the mean of latent channel 0, (1, B)."""

    n_members, noise_aware = 1, True

    def forward(self, z, context, lengths, sigma=None):
        return z[:, 0].flatten(1).mean(1)[None].float()


def bench_lpo_probe(device, scale, steps=100, eval_every=25, eval_samples=48, cache_dir=None):
    """train_lpo.lpo_step in the toy world with ChannelMeanScorer as the ranker (toy defaults,
    batch 4, temperature 0.01, no alignment): the scorer's value on full samples of the fixed
    evaluation pairs at every `eval_every` steps, with the kept-pair share. Separates the method
    (does DPO on the chosen pairs move the policy towards what the ranker prefers?) from the
    ranker's quality, which the refl rows measure."""
    from types import SimpleNamespace

    import refl
    import train_lpo
    import vae as vae_lib

    c = train_lpo.parse_args(["--batch-size", "4", "--lpo-temp", "0.01", "--align-every", "0",
                              "--eval-samples", str(eval_samples), *(["--cache-dir", str(cache_dir)] if cache_dir else [])])
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null, redirect_stdout(null):
        c.cache_dir = c.cache_dir or tmp
        dit, vae, encoder, tokenizer, _, prompts, _ = refl.load_models(c, device, 0)
    table = refl.embed_prompts(prompts, tokenizer, encoder, device, dit.cfg.text_len)
    model, ref = refl.wrap(dit.to(device), device, 1, full_finetune=False, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                           lora_targets=c.lora_targets, seed=c.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr, weight_decay=0.0)
    sigmas = sample.get_sigmas(c.sample_steps, c.shift, c.solver)
    scorer, pairs = ChannelMeanScorer(), refl.eval_pairs(c.eval_samples, prompts)
    shape = vae_lib.latent_shape(c.frames, c.height, c.width)
    run = SimpleNamespace(model=model, ref=ref, lrm=scorer, vae=vae, neg=None, sigmas=sigmas, device=device, data_rank=0,
                          prompts=prompts, table=table, opt=opt, world=1, shape=shape, bad=refl.new_bad_counts(), log=print)

    def evaluate():
        z = torch.cat([refl.sample_pairs(model, vae, pairs[i : i + 16], table, None, shape=shape, sigmas=sigmas,
                                         solver=c.solver, guidance=c.guidance, device=device, latents=True)[0]
                       for i in range(0, len(pairs), 16)])
        return z[:, 0].mean().item()

    curve, kept, offered = [{"step": 0, "score": evaluate()}], 0, 0
    t0 = time.time()
    for step in range(1, steps + 1):
        rec = train_lpo.lpo_step(run, c, step)
        kept, offered = kept + rec["pairs"], offered + rec["pair_offers"]
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "score": evaluate(), "kl": rec["kl"], "loss": rec["loss"]})
    return {"steps": steps, "curve": curve, "pair_share": kept / max(offered, 1), "sec": time.time() - t0}


def table_lpo_probe(res):
    rows = [[c["step"], c["score"], c.get("kl", "-"), c.get("loss", "-")] for c in res["curve"]]
    return (f"### lpo-probe (python bench.py lpo-probe): LPO ranked by the mean of latent channel 0; kept pairs "
            f"{res['pair_share']:.0%}\n\n" + markdown(["step", "channel-0 mean of samples", "KL", "DPO loss"], rows))


# ---------------------------------------------------------------------------------------------
# refl: VELR and its baselines side by side in the toy world, same ReFL budget (VELR §5)

REFL_SEEDS = 3
REFL_METHODS = {  # name -> train_refl (lpo: train_lpo) flags on top of the toy defaults ("@1member" / "@dollar": that LRM)
    "velr": [],
    "velr_noalign": ["--align-every", "0"],
    "velr_1member": ["--lrm", "@1member"],
    "dollar": ["--mode", "dollar", "--lrm", "@dollar"],
    "velr_zt": ["--reward-on", "zt"],  # a noise-aware LRM scores the window's last x_t (the toy world bootstraps it)
    # PRFL's recipe (one step with gradient anywhere in the schedule, reward on x_t) and, in the toy
    # world, its reward model (--toy-lrm dit: the generator's blocks under noise-aware heads)
    "prfl": ["--preset", "prfl"],
    "lpo": [],  # LPO (train_lpo.py): step-level DPO on pairs the noise-aware LRM picks
    "pixel": ["--mode", "pixel"],
    "lastk": ["--mode", "lastk"],
    "latestep": ["--mode", "latestep"],
    # two experts: the toy generator twice, split at boundary 0.875 (windows start at steps 6..10, its
    # first low-noise step is 9), each --experts choice
    "velr_experts_both": ["--boundary", "0.875"],
    "velr_experts_low": ["--boundary", "0.875", "--experts", "low"],
    "velr_experts_high": ["--boundary", "0.875", "--experts", "high"],
}


# The long run (VELR Fig. 8: what alignment is for): 300 steps, an evaluation every 25, the buffer's
# admissions per step; the paper's buffer rule (variances stored at admission, never rescored) beside
# the toy default, which rescores them before each alignment.
REFL_LONG = {"steps": 300, "eval_every": 25, "picture": ("velr", "velr_noalign"),
             "methods": {"velr": [], "velr_paper_buffer": ["--no-refresh-variance"], "velr_noalign": ["--align-every", "0"],
                         "pixel": ["--mode", "pixel"]}}


def bench_refl(device, scale, seeds=REFL_SEEDS, methods=None, long=False, out_dir=None):
    """Every method of REFL_METHODS for seeds 0..seeds-1 in the toy world with its defaults (same
    steps, batch, window, lr): true-reward gain, the LRM's error against the true reward at every
    evaluation (|LRM - true| on the final latents of the 48 eval pairs), the LRM-minus-true gap at
    every evaluation, peak memory, time per step and the buffer's admissions per step (mean over
    seeds). The one-member and Dollar LRMs are bootstrapped like the world's ensemble (same
    rollouts, split, stopping rule and lr). methods: a subset of the names. long: REFL_LONG's methods, steps and
    evaluations, and seed 0's before/after pictures of REFL_LONG["picture"] side by side in
    out_dir/bench_refl_long_pictures.png."""
    import lrm as lrm_lib
    import toy
    import train_lpo
    import train_refl

    world = toy.default_world()
    cfg = toy.WORLDS[world]
    table = REFL_LONG["methods"] if long else REFL_METHODS
    extra = ["--steps", str(REFL_LONG["steps"]), "--eval-every", str(REFL_LONG["eval_every"])] if long else []
    res = {"world": world, "seeds": seeds, "methods": {}}
    if long:
        res.update(steps=REFL_LONG["steps"], eval_every=REFL_LONG["eval_every"])
    with tempfile.TemporaryDirectory() as tmp:
        dit, vae, encoder, tokenizer, _ = toy.load_world(cfg, cache_dir=tmp, log=lambda *a: None)
        data = toy.shared_rollouts(dit, vae, encoder, tokenizer, cfg, tmp, log=lambda *a: None)
        lrms = {"@1member": lrm_lib.EnsembleLRM(toy.toy_lrm_config(cfg), n_members=1, seed=cfg.seed),
                "@dollar": lrm_lib.DollarLRM(toy.toy_lrm_config(cfg), seed=cfg.seed)}
        for key, model in lrms.items():
            if not any(key in f for name, flags in table.items() for f in flags if not methods or name in methods):
                continue
            with open(os.devnull, "w") as null, redirect_stdout(null):
                toy.bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, model=model, data=data)
            lrm_lib.save_lrm(model.requires_grad_(False), Path(tmp) / f"{key[1:]}.safetensors")
        pictures = []
        for name, flags in table.items():
            if methods and name not in methods:
                continue
            flags = [str(Path(tmp) / f"{f[1:]}.safetensors") if f.startswith("@") else f for f in flags]
            runs, admitted = [], []
            for seed in range(seeds):
                out = Path(tmp) / f"{name}{seed}"
                picture = long and seed == 0 and name in REFL_LONG["picture"]
                with open(Path(tmp) / f"{name}{seed}.log", "w") as log, redirect_stdout(log):
                    (train_lpo if name == "lpo" else train_refl).main(
                        ["--cache-dir", tmp, "--out", str(out), "--seed", str(seed), *extra,
                         *([] if picture else ["--picture-rows", "0"]), *flags])
                runs.append(json.loads((out / "summary.json").read_text()))
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
                admitted.append([r.get("labelled", 0) for r in lines if "step" in r and "changed" not in r])
                if picture:
                    pictures.append((name, out / "samples" / "before_after.png"))
            gains = torch.tensor([r["true_reward_after"] - r["true_reward_before"] for r in runs])
            steps = [e["step"] for e in runs[0]["eval_history"]]
            def curve(key):  # mean over seeds per evaluation; None where the method has no such value (pixel: no LRM)
                values = [[r["eval_history"][i].get(key) for r in runs] for i in range(len(steps))]
                return [None if None in v else sum(v) / len(v) for v in values]

            per_step = [sum(a[i] for a in admitted) / seeds for i in range(min(map(len, admitted)))]
            res["methods"][name] = {
                "gain_mean": gains.mean().item(), "gain_std": gains.std().item() if seeds > 1 else 0.0,
                "gains": gains.tolist(), "steps": steps, "true_curve": curve("true_reward"),
                "lrm_err_curve": curve("lrm_err"), "lrm_err_final": curve("lrm_err")[-1],
                "gap_curve": curve("latent_minus_true"), "latent_minus_true": curve("latent_minus_true")[-1],
                "admitted_per_step": per_step,
                "peak_mb": max(r["peak_mem_mb"] for r in runs), "sec_per_step": sum(r["sec_per_step"] for r in runs) / seeds}
            print(f"refl {name}: {json.dumps({k: v for k, v in res['methods'][name].items() if k != 'admitted_per_step'})}",
                  flush=True)
        if pictures and out_dir is not None:
            res["pictures"] = str(side_by_side(pictures, Path(out_dir) / "bench_refl_long_pictures.png"))
    return res


def side_by_side(pictures, path):
    """The before/after PNGs [(label, file)] next to each other, each under its label (white gap,
    bottom-padded to one height)."""
    import imageio.v3 as iio
    import numpy as np

    import picture

    images = [iio.imread(f)[..., :3] for _, f in pictures]
    height = max(im.shape[0] for im in images)
    columns = []
    for (label, _), im in zip(pictures, images):
        title = np.zeros((24, im.shape[1], 3), np.uint8)
        picture.draw_text(title, label.replace("_", " "), 5, 8)
        columns.append(np.pad(np.concatenate([title, im]), ((0, height - im.shape[0]), (0, 16), (0, 0)), constant_values=255))
    iio.imwrite(path, np.concatenate(columns, axis=1))
    return path


def plot_refl(res, path):
    """True reward, LRM error, LRM - true and the buffer's admissions per step (moving mean over 10
    steps) against step for every method (matplotlib, a bench-only dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for i, (name, m) in enumerate(res["methods"].items()):
        kw = dict(label=name, color=f"C{i}")
        axes[0, 0].plot(m["steps"], m["true_curve"], marker="o", **kw)
        for ax, key in ((axes[0, 1], "lrm_err_curve"), (axes[1, 0], "gap_curve")):
            if key in m and None not in m[key]:  # pixel ReFL has no LRM
                ax.plot(m["steps"], m[key], marker="o", **kw)
        a = m.get("admitted_per_step") or []
        if any(a):
            smooth = [sum(a[max(0, j - 9) : j + 1]) / len(a[max(0, j - 9) : j + 1]) for j in range(len(a))]
            axes[1, 1].plot(range(1, len(a) + 1), smooth, **kw)
    world = res.get("world", "random")
    axes[0, 0].set(xlabel="ReFL step", ylabel="true reward (eval, 48 pairs)", title=f"{world} world, mean over {res['seeds']} seeds")
    axes[0, 1].set(xlabel="ReFL step", ylabel="|LRM - true| (eval latents)", title="LRM error")
    axes[1, 0].set(xlabel="ReFL step", ylabel="LRM - true (eval latents)", title="proxy gap (over-optimisation)")
    axes[1, 1].set(xlabel="ReFL step", ylabel="admitted per step (10-step mean)", title="replay buffer admissions")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def table_refl(res):
    rows = [[n, f"{m['gain_mean']:+.3f} ± {m['gain_std']:.3f}", m["lrm_err_curve"][0] or "-", m["lrm_err_final"] or "-",
             m["latent_minus_true"] or "-", m["peak_mb"], m["sec_per_step"]] for n, m in res["methods"].items()]
    header = ["method", "true-reward gain", "LRM err step 0", "LRM err end", "LRM - true end", "peak MiB", "s/step"]
    if "steps" in res:  # the long run: the admissions at its end
        header.append("admitted/step, last 50")
        for row, m in zip(rows, res["methods"].values()):
            tail = m["admitted_per_step"][-50:]
            row.append(sum(tail) / len(tail) if tail and m["lrm_err_final"] is not None else "-")  # no buffer without an LRM
    what = f"{res['steps']} steps" if "steps" in res else "100 steps"
    return f"### refl ({res.get('world', 'random')} toy world, {res['seeds']} seeds, {what})\n\n" + markdown(header, rows)


# ---------------------------------------------------------------------------------------------
# Reporting

IMPLS = ("ours", "diffusers")


def ratios(*ops):
    """ours / diffusers over several ops: summed time, largest peak."""
    t = [sum(op[impl]["time_s"] for op in ops) for impl in IMPLS]
    p = [max(op[impl]["peak_mb"] for op in ops) for impl in IMPLS]
    return {"ratio_time": t[0] / t[1], "ratio_peak": p[0] / p[1]}


def markdown(header, rows):
    fmt = lambda v: (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}") if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def table_vs_diffusers(name, res, ops):
    rows = [
        [op, res[op]["ours"]["time_s"], res[op]["diffusers"]["time_s"], res[op]["ours"]["peak_mb"], res[op]["diffusers"]["peak_mb"]]
        for op in ops
    ]
    rows.append(["ratio ours/diffusers", res["ratio_time"], "", res["ratio_peak"], ""])
    if "ratio_time" in res.get("compile", {}):  # dit: ours with --compile
        c = res["compile"]
        rows.append(["ours --compile", c["ours_compiled"]["time_s"], "", c["ours_compiled"]["peak_mb"], ""])
        rows.append(["ratio ours --compile/diffusers", c["ratio_time"], "", c["ratio_peak"], ""])
    return f"### {name} {res['shape']}\n\n" + markdown(["op", "ours s", "diffusers s", "ours MiB", "diffusers MiB"], rows)


# ---------------------------------------------------------------------------------------------
# sp: Ulysses sequence parallelism against one process (2 ranks, gloo on the CPU, or nccl)

SP_CONFIG = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64, text_len=16)  # 4 heads: SP 2 or 4
SP_LATENT = (2, 16, 5, 8, 8)  # 2 x 3 x 4 x 4 = 96 tokens per sample after the 1x2x2 patches


def sp_worker(args):
    """One rank of `torchrun --nproc_per_node=S bench.py _sp JSON`: the same LoRA DiT, inputs and
    loss on every rank, forward + backward without and then with sequence parallelism over all
    ranks (gradients summed over the group); rank 0 prints the largest relative difference of the
    outputs and of the LoRA gradients, each relative to the reference's largest magnitude."""
    import distributed
    import lora
    from model_dit import DiTConfig, WanDiT

    rank, world, device = distributed.setup_distributed()
    cfg = DiTConfig(**args.get("config", SP_CONFIG))
    torch.manual_seed(0)
    dit = WanDiT(cfg).to(device)
    lora.add_lora(dit, 4, 4.0, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, prm in dit.named_parameters():
            if "lora_B" in name or name.startswith("head.head."):  # non-zero, so every gradient is non-zero
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.02)
    dit.gradient_checkpointing = bool(args.get("checkpointing"))
    shape = args.get("latent", SP_LATENT)
    x, target = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    t = torch.linspace(900, 300, shape[0], device=device)
    if args.get("per_token_t"):  # Wan 2.2 TI2V: the first latent frame's tokens at t = 0, split across ranks
        from model_dit import first_frame_timesteps

        t = first_frame_timesteps(t, tuple(s // p for s, p in zip(shape[2:], cfg.patch_size)))
    context = torch.randn(shape[0], cfg.text_len, cfg.text_dim, generator=gen).to(device)
    params = [prm for prm in dit.parameters() if prm.requires_grad]

    def step():
        dit.zero_grad(set_to_none=True)
        out = dit(x, t, context)
        (out - target).pow(2).mean().backward()
        return out.detach(), [prm.grad.clone() for prm in params]

    ref_out, ref_grads = step()
    sp, _ = distributed.sequence_parallel_groups(world)
    dit.set_sequence_parallel(sp)
    out, _ = step()
    distributed.sp_sum_grads(params, sp)
    grads = [prm.grad for prm in params]

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    res = {"sp": world, "out_rel_diff": rel(out, ref_out), "grad_rel_diff": max(rel(a, b) for a, b in zip(grads, ref_grads)),
           "lora_tensors": len(params)}
    if rank == 0:
        print(json.dumps(res), flush=True)
    distributed.cleanup()


def run_sp(args, nproc=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "_sp", json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"sequence parallel check {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refl_sp_vs_one(cache, out, flags):
    """|SP 2 - one process| / |one process's change| of the trained DiT weights after a 2-step toy
    ReFL run (LoRA: the B matrices, zero at the start; full fine-tuning: every weight)."""
    import toy
    import train_refl

    common = ["--cache-dir", str(cache), "--steps", "2", "--batch-size", "2", "--eval-samples", "2", "--eval-every", "0",
              "--save-every", "0", "--picture-rows", "0", "--align-every", "1", "--align-rounds", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_refl.py"), *common, "--sp-size", "2",
           "--out", str(Path(out) / "sp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"SP ReFL run failed:\n{proc.stderr[-3000:]}")
    with open(Path(out).with_suffix(".log"), "w") as log, redirect_stdout(log):
        train_refl.main([*common, "--out", str(Path(out) / "one")])
    sp, one = (torch.load(Path(out) / d / "ckpt.pt", weights_only=True)["model"] for d in ("sp", "one"))
    full = "--full-finetune" in flags
    init = toy.load_world(cache_dir=cache, log=lambda *a: None)[0].state_dict() if full else {}
    keys = [k for k in one if full or ".lora_B." in k]
    diff = torch.stack([(sp[k] - one[k]).norm() for k in keys]).norm()
    change = torch.stack([(one[k] - init.get(k, torch.zeros_like(one[k]))).norm() for k in keys]).norm()
    return (diff / change).item()


def bench_sp(device, scale):
    """Ulysses on 2 ranks against one process (fp32, CPU gloo unless the machine has 2 GPUs): the
    DiT's outputs and LoRA gradients, with and without gradient checkpointing; and the weights a
    2-step toy ReFL run trains, LoRA under DDP and full fine-tuning under FSDP2 ("weights_equal":
    within 1e-4 of the change; the difference is float summation order, see the README)."""
    import toy

    res = {}
    for name, flags in (("plain", {}), ("checkpointing", {"checkpointing": True})):
        res[name] = run_sp(flags)
        print(f"sp {name}: {json.dumps(res[name])}", flush=True)
    res["max_rel_diff"] = max(res[k][d] for k in ("plain", "checkpointing") for d in ("out_rel_diff", "grad_rel_diff"))
    with tempfile.TemporaryDirectory() as tmp:
        toy.load_world(cache_dir=tmp, log=lambda *a: None)
        res["refl_rel_diff"] = {"lora_ddp": refl_sp_vs_one(tmp, Path(tmp) / "lora", []),
                                "full_fsdp2": refl_sp_vs_one(tmp, Path(tmp) / "full", ["--full-finetune", "--lr", "1e-4"])}
    print(f"sp refl: {json.dumps(res['refl_rel_diff'])}", flush=True)
    res["weights_equal"] = all(v <= 1e-4 for v in res["refl_rel_diff"].values())
    return {"cpu" if device.type == "cpu" else device.type: res}


def table_sp(res):
    (machine, r), = res.items()
    rows = [[f"DiT {k}: output / LoRA grad max rel. diff", f"{r[k]['out_rel_diff']:.3g} / {r[k]['grad_rel_diff']:.3g}"]
            for k in ("plain", "checkpointing")]
    rows += [[f"2-step toy ReFL, {k}: weight diff / change", f"{v:.3g}"] for k, v in r["refl_rel_diff"].items()]
    rows.append(["weights_equal (<= 1e-4 of the change)", r["weights_equal"]])
    return f"### sp ({machine}, python bench.py sp: 2 ranks vs 1 process, fp32)\n\n" + markdown(["measure", "value"], rows)


CHILD_IMPORTS = {"refl": ["train_refl", "train_lpo"], "dit": ["model_dit"], "vae": ["vae"], "lrm": ["lrm"]}
CHILD_TASKS = {"refl": child_refl, "dit": child_dit, "vae": child_vae, "lrm": child_lrm}
SECTIONS = {  # `all` runs these; gpu-quick and toy (QUICK) only when asked
    "memory": (bench_memory, table_memory),
    "dit": (bench_dit, table_dit),
    "vae": (bench_vae, table_vae),
    "lrm": (bench_lrm, table_lrm),
    "quality": (bench_quality, table_quality),
}
WORLD_SECTIONS = ("toy", "refl", "quality", "lpo-probe")  # the sections that train in a toy world
QUICK = {"gpu-quick": (bench_gpu_quick, table_gpu_quick), "toy": (bench_toy, table_toy), "refl": (bench_refl, table_refl),
         "sp": (bench_sp, table_sp), "lpo-probe": (bench_lpo_probe, table_lpo_probe)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=[*SECTIONS, *QUICK, "all"])
    p.add_argument("--out", default="bench.json", help="results are merged into this file (default bench.json)")
    p.add_argument("--threads", type=int, help="CPU threads of every process (default: torch's); on a machine "
                   "shared with other jobs 1 avoids the stalls of oversubscribed OpenMP threads")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (tiny DiT and VAE, 32x32 ReFL step) on any device")
    p.add_argument("--seeds", type=int, help=f"toy / refl: runs with seeds 0..N-1 (default {TOY_SEEDS} / {REFL_SEEDS})")
    p.add_argument("--rows", help="memory: comma-separated row names (velr, pixel, ..., velr_experts_low, velr_5b, "
                   "velr_i2v: memory_jobs), merged into the memory entry of --out")
    p.add_argument("--methods", help=f"refl: comma-separated subset of {','.join(REFL_METHODS)}, merged into "
                   "the file's refl results (same --seeds)")
    p.add_argument("--toy-world", default="watchable", choices=["random", "watchable"],
                   help="the toy world of the sections that train in one (toy, refl, quality, lpo-probe); the "
                   "random world's results go under <section>_random (default watchable)")
    p.add_argument("--long", action="store_true", help=f"refl: the long run ({REFL_LONG['steps']} steps, "
                   f"{', '.join(REFL_LONG['methods'])}) under refl_long")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children read it at start-up
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = "tiny" if args.tiny else device.type
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    methods = args.methods.split(",") if args.methods else None
    names = REFL_LONG["methods"] if args.long else REFL_METHODS
    if methods and (args.section != "refl" or set(methods) - set(names)):
        raise ValueError(f"--methods needs section refl and names from {', '.join(names)}, got {args.methods}")
    rows, row_names = (args.rows.split(",") if args.rows else None), list(memory_jobs(memory_config("tiny"), "tiny"))
    if rows and (args.section != "memory" or set(rows) - set(row_names)):
        raise ValueError(f"--rows needs section memory and names from {', '.join(row_names)}, got {args.rows}")
    if args.long and args.section != "refl":
        raise ValueError(f"--long is for section refl, not {args.section}")
    for name in SECTIONS if args.section == "all" else [args.section]:
        bench, table = {**SECTIONS, **QUICK}[name]
        # the toy world of this section's runs, children included; the others keep the world their rows were measured in
        os.environ["VELR_TOY_WORLD"] = args.toy_world if name in WORLD_SECTIONS else "random"
        key = f"{name}_long" if args.long else name
        if name in WORLD_SECTIONS and args.toy_world != "watchable":
            key = f"{key}_{args.toy_world}"  # one entry per world
        if name == "toy":
            results[key] = bench(device, scale, args.seeds or TOY_SEEDS, args.toy_world)
        elif name == "refl":
            new = bench(device, scale, args.seeds or REFL_SEEDS, methods, long=args.long, out_dir=out.parent)
            old = results.get(key, {})
            if methods and old and old.get("seeds") != new["seeds"]:
                raise ValueError(f"--methods: {out} holds refl rows of {old.get('seeds')} seeds, not {new['seeds']}")
            results[key] = {**new, "methods": {**old.get("methods", {}), **new["methods"]}} if methods else new
            print(f"plot: {plot_refl(results[key], out.with_name(f'bench_{key}.png'))}")
        elif name == "memory" and rows:  # the new rows over the stored ones, the ratios recomputed from the merge
            results[key] = with_memory_ratios({**results.get(key, {}), **bench(device, scale, rows)})
        else:
            results[key] = bench(device, scale)
        if name in WORLD_SECTIONS:
            results[key]["world"] = args.toy_world
        print(table(results[key]) + "\n", flush=True)
        out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child_main(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1:2] == ["_sp"]:
        sp_worker(json.loads(sys.argv[2]))
    else:
        main()
