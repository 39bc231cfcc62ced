"""Wan 2.1 flow-matching sampling: the sigma grids, Wan's UniPC and Euler, classifier-free guidance,
the one `denoise()` loop that sampling, data generation and ReFL share (all of it needs torch alone),
and the text-to-video command line (`main`, which imports its packages when it runs).

Follows `wan/utils/fm_solvers_unipc.py` and `wan/text2video.py` of Wan-Video/Wan2.1 (spec §5):
- flow matching: x_sigma = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0, so
  x0 = x - sigma v; the model is handed t = int64(sigma * 1000), truncated (999, not 999.8);
- UniPC grid: linspace(0.999, 0, steps + 1)[:-1], shifted (sigma' = s sigma / (1 + (s - 1) sigma)),
  then a final 0; Euler grid: the same from 1.0 (t = 1000 at the first step);
- UniPC ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
  arXiv 2302.04867) as Wan and diffusers configure it: order 2, B(h) = e^-h - 1 ("bh2"), x0
  prediction, the corrector after every model call but the first, first order at the first and
  the last step; `denoise` equals diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s,
  prediction_type="flow_prediction") stepped on that grid (the tests check it to 1e-5);
- CFG: v = v_u + g (v_c - v_u) in fp32, from two separate forward passes.
Under torchrun, without --sp-size the ranks never communicate (rank r samples prompts r, r + world,
...); with --sp-size S each group of S consecutive ranks samples its share of the prompts together,
each prompt's tokens split over the group (Ulysses all-to-alls around self-attention).

Left out: Wan's DPM++ solver (Euler is kept as the simple, stateless alternative), image-to-video,
prompt extension and CPU offloading of the models.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

# The sampler (sigmas, solvers, denoise, CFG, precision, paths) needs torch alone; the command line's
# packages and project files (imageio, safetensors, distributed, lora, model_dit, text_encoder, vae)
# are imported inside the functions that use them.

NUM_TRAIN_TIMESTEPS = 1000
UNIPC_SIGMA_MAX = 0.999  # the first sigma of Wan's 1000-step training grid, 1 - 1/1000

# wan/configs/shared_config.py, used when no negative prompt is given ("Bright tones, overexposed,
# static, blurred details, subtitles, style, works, paintings, images, static, overall gray, worst
# quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn
# hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture,
# messy background, three legs, many people in the background, walking backwards").
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# ---------------------------------------------------------------------------------------------
# Flow-matching math (pure functions)


def shift_sigmas(sigmas, shift):
    """Wan's timestep shift: more of the steps at high noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def get_sigmas(steps, shift=5.0, solver="unipc"):
    """The float64 grid of `steps` + 1 sigmas, from (almost) 1 down to a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in ("unipc", "euler"):
        raise ValueError(f"solver must be 'unipc' or 'euler', got {solver!r}")
    start = UNIPC_SIGMA_MAX if solver == "unipc" else 1.0
    # i * step + start: numpy.linspace's float64 rounding, which Wan's grid is built with; an
    # ulp can move a truncated timestep when sigma * 1000 is an integer.
    sigmas = torch.arange(steps, dtype=torch.float64) * (-start / steps) + start
    return torch.cat([shift_sigmas(sigmas, shift), torch.zeros(1, dtype=torch.float64)])


def timesteps_from_sigmas(sigmas):
    """The int64 timesteps the model receives at each step: sigma * 1000, truncated."""
    return (sigmas[:-1].double() * NUM_TRAIN_TIMESTEPS).long()


def x0_from_velocity(x, sigma, v):
    return x - sigma * v


def euler_step(x, v, sigma, sigma_next):
    return x + (sigma_next - sigma) * v


def ddim_transition(x, v, sigma, sigma_next, eta=1.0):
    """The Gaussian step sigma -> sigma_next < sigma of a stochastic flow sampler: DDIM with eta
    (Song et al. 2021, Eq. 12) written for the flow path x_s = (1 - s) x0 + s eps. From the
    velocity's predictions x0 = x - sigma v and eps = x + (1 - sigma) v:

        x_next ~ N(mean, std^2 I),  mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) eps,
        std = eta sigma_next sqrt(1 - r^2),  r = sigma_next (1 - sigma) / (sigma (1 - sigma_next)).

    eta = 0 is the deterministic step, equal to Euler's; eta = 1 draws from the exact posterior
    q(x_next | x, x0) of the path (DDPM's ancestral step): x = a x_next + b n with
    a = (1 - sigma) / (1 - sigma_next) gives Var = sigma_next^2 b^2 / sigma^2 = sigma_next^2 (1 - r^2).
    Returns (mean, std) with std a float (0 at sigma_next = 0)."""
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got {sigma_next}, {sigma}")
    r = sigma_next * (1 - sigma) / (sigma * (1 - sigma_next))
    std = eta * sigma_next * math.sqrt(max(1 - r * r, 0.0))
    x0, eps = x - sigma * v, x + (1 - sigma) * v
    return (1 - sigma_next) * x0 + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * eps, std


def gaussian_log_prob(y, mean, std: float):
    """Per-sample log-density of y under N(mean, std^2 I), averaged over the elements (B,) in fp32:
    the mean keeps a likelihood-ratio weight such as DPO's beta independent of the latent size."""
    d = (y.float() - mean.float()).flatten(1)
    return -(d.pow(2).mean(1) / (2 * std**2)) - math.log(std) - 0.5 * math.log(2 * math.pi)


def guided_velocity(v_cond, v_uncond, guidance):
    """Classifier-free guidance in fp32 (or wider): v_u + g (v_c - v_u)."""
    dtype = torch.promote_types(torch.promote_types(v_cond.dtype, v_uncond.dtype), torch.float32)
    v_cond, v_uncond = v_cond.to(dtype), v_uncond.to(dtype)
    return v_uncond + guidance * (v_cond - v_uncond)


def log_snr(sigma):
    """lambda = log(alpha / sigma) of the flow path (alpha = 1 - sigma); +inf at sigma = 0."""
    return math.log(1 - sigma) - math.log(sigma) if sigma > 0 else math.inf


def first_order_step(x, x0, sigma, sigma_next):
    """The exact step for a constant x0 prediction (DDIM / DPM-Solver++ 1). Returns the step and
    phi = e^-h - 1 (h = lambda_next - lambda), which the higher-order terms scale with."""
    phi = math.expm1(log_snr(sigma) - log_snr(sigma_next))
    return sigma_next / sigma * x - (1 - sigma_next) * phi * x0, phi


def unipc_predict(x, x0, x0_prev, sigmas, i):
    """UniP from sigmas[i] to sigmas[i+1]: second order with x0_prev (the x0 prediction at
    sigmas[i-1]), first order when it is None."""
    s, s_next = sigmas[i], sigmas[i + 1]
    x_next, phi = first_order_step(x, x0, s, s_next)
    if x0_prev is None:
        return x_next
    r = (log_snr(sigmas[i - 1]) - log_snr(s)) / (log_snr(s_next) - log_snr(s))
    return x_next - (1 - s_next) * phi * 0.5 * (x0_prev - x0) / r  # rho = 1/2 at order 2 (bh2)


def unic_weights(h, r):
    """Second-order UniC weights (rho_prev, rho_new) for the bh2 variant: the solution of
    [[1, 1], [r, 1]] rho = [phi_2 / B(h), 2 phi_3 / B(h)] with hh = -h (data prediction)."""
    hh = -h
    b_h = math.expm1(hh)
    phi_2 = b_h / hh - 1
    phi_3 = phi_2 / hh - 0.5
    b1, b2 = phi_2 / b_h, 2 * phi_3 / b_h
    rho_prev = (b1 - b2) / (1 - r)
    return rho_prev, b1 - rho_prev


def unipc_correct(x_prev, x0, x0_prev, x0_prev2, sigmas, i):
    """UniC: re-do the step sigmas[i-1] -> sigmas[i] that started at x_prev, now that x0 (the
    prediction at sigmas[i]) is known. Second order with x0_prev2 (at sigmas[i-2]), else first."""
    s_prev, s = sigmas[i - 1], sigmas[i]
    x, phi = first_order_step(x_prev, x0_prev, s_prev, s)
    if x0_prev2 is None:
        return x - (1 - s) * phi * 0.5 * (x0 - x0_prev)
    h = log_snr(s) - log_snr(s_prev)
    r = (log_snr(sigmas[i - 2]) - log_snr(s_prev)) / h
    rho_prev, rho_new = unic_weights(h, r)
    return x - (1 - s) * phi * (rho_prev * (x0_prev2 - x0_prev) / r + rho_new * (x0 - x0_prev))


# ---------------------------------------------------------------------------------------------
# The denoising loop


def denoise(velocity_fn, x, sigmas, *, solver="unipc", uncond_fn=None, guidance=1.0, cfg_grad="both", start=0,
            stop=None, grad_start=None, trace=False, progress=None):
    """Run steps start .. stop-1 of the grid `sigmas` (steps + 1 values, get_sigmas) from x.

    velocity_fn(x, t) / uncond_fn(x, t): conditional / unconditional velocity, t = int64 (B,).
    With uncond_fn and guidance != 1 the velocity is guided (CFG); otherwise only velocity_fn runs.
    Steps before grad_start run under no_grad (grad_start=None: every step), steps from grad_start
    on keep the graph. cfg_grad "both": there the unconditional branch keeps it too, so the guided
    velocity's gradient is the exact g dv_c + (1 - g) dv_u; "cond": it runs without (g dv_c only).
    UniPC keeps its history inside one call only: the call's first step is first order and is
    not corrected, so a run split into two calls differs from one call; Euler has no state.

    Returns (x after the last step, x0 = x - sigma v from the last velocity, at step stop-1) and,
    with trace=True, a list of {"step", "t", "sigma", "x", "v"} (model input and guided velocity)
    for every step from grad_start on (every step when grad_start is None).
    progress(i) is called after each step i.
    """
    n = len(sigmas) - 1
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"need 0 <= start < stop <= {n} (steps), got start={start}, stop={stop}")
    if solver not in ("unipc", "euler"):
        raise ValueError(f"solver must be 'unipc' or 'euler', got {solver!r}")
    if solver == "unipc" and sigmas[start] >= 1:
        raise ValueError(f"unipc needs sigmas below 1 (log-SNR is -inf at 1), got {float(sigmas[start])} "
                         f"at step {start}")
    ts = timesteps_from_sigmas(sigmas).tolist()
    sig = sigmas.tolist()
    trace_from = start if grad_start is None else grad_start
    x0s, x_prev, records = {}, None, []  # x0s: step -> x0 prediction, for the last three steps
    for i in range(start, stop):
        with torch.set_grad_enabled(grad_start is not None and i >= grad_start):
            t = torch.full((x.shape[0],), ts[i], dtype=torch.int64, device=x.device)
            v = velocity_fn(x, t)
            if uncond_fn is not None and guidance != 1.0:
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg_grad == "both"):
                    v_uncond = uncond_fn(x, t)
                v = guided_velocity(v, v_uncond, guidance)
            x0 = x0s[i] = x0_from_velocity(x, sig[i], v)
            if trace and i >= trace_from:
                records.append({"step": i, "t": ts[i], "sigma": sig[i], "x": x, "v": v})
            if solver == "euler":
                x = euler_step(x, v, sig[i], sig[i + 1])
            else:
                if i > start:
                    x = unipc_correct(x_prev, x0, x0s[i - 1], x0s.get(i - 2), sig, i)
                x_prev = x
                # first order at the call's first step and at the last step of the grid
                x = unipc_predict(x, x0, x0s.get(i - 1) if i < n - 1 else None, sig, i)
            x0s.pop(i - 2, None)
        if progress is not None:
            progress(i)
    return (x, x0, records) if trace else (x, x0)


# ---------------------------------------------------------------------------------------------
# Models: checkpoint folders, precision


def checkpoint_paths(ckpt_dir):
    """A Wan2.1-T2V repo folder, or its -Diffusers twin -> {"dit", "vae", "text_encoder", "tokenizer"}."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint folder {d} does not exist")
    if any((d / sub).is_dir() for sub in ("transformer", "vae", "text_encoder")):  # Diffusers layout
        return {"dit": d / "transformer", "vae": d / "vae", "text_encoder": d / "text_encoder",
                "tokenizer": d / "tokenizer"}
    return {"dit": d, "vae": d / "Wan2.1_VAE.pth", "text_encoder": d / "models_t5_umt5-xxl-enc-bf16.pth",
            "tokenizer": d / "google" / "umt5-xxl"}


MODEL_PARTS = ("dit", "vae", "text_encoder", "tokenizer")


def model_paths(args, parts=MODEL_PARTS) -> dict:
    """The files of `parts` from --ckpt-dir (either layout) with --dit/--vae/--text-encoder/--tokenizer
    on top; {} when none of these flags is given (the scripts' offline default). Every path of
    `parts` must exist: the error names each missing one before any model is loaded."""
    paths = checkpoint_paths(args.ckpt_dir) if getattr(args, "ckpt_dir", None) else {}
    for k in MODEL_PARTS:
        if getattr(args, k, None) is not None:
            paths[k] = Path(getattr(args, k))
    if not paths:
        return {}
    missing = [f"{k}={paths.get(k)}" for k in parts if paths.get(k) is None or not paths[k].exists()]
    if missing:
        raise FileNotFoundError(f"model files not found: {', '.join(missing)} (give --ckpt-dir or the single paths)")
    return {k: paths[k] for k in parts}


def dtypes(device) -> dict:
    """The project's one precision policy, {"dit", "text_encoder", "vae", "amp"}, Wan's own:
    UMT5 in bf16 everywhere (its official weights are bf16, and prompt embeddings then match
    between sampling, data preparation and training), the VAE in fp32, and the DiT in bf16 under
    bf16 autocast with its fp32 islands kept (model_dit) on CUDA; on the CPU the DiT runs in fp32
    without autocast (bf16 is slow there; the CPU runs are tests and toys). Full fine-tuning keeps
    fp32 DiT master weights whatever this says (train_refl.py)."""
    gpu = device.type == "cuda"
    return {"dit": torch.bfloat16 if gpu else torch.float32, "text_encoder": torch.bfloat16, "vae": torch.float32,
            "amp": torch.bfloat16 if gpu else None}


def autocast(device):
    """The autocast context of dtypes(device): bf16 on CUDA, off on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# Command line

# spec §5.2 for the real models; the tiny random-weight run is sized to take seconds on a CPU
REAL_DEFAULTS = {"steps": 50, "size": "832x480", "frames": 81}
TINY_DEFAULTS = {"steps": 8, "size": "32x32", "frames": 5}


def parse_args(argv=None):
    import vae as vae_lib

    p = argparse.ArgumentParser(description="Wan 2.1 text-to-video sampling")
    g = p.add_argument_group("models (none given: tiny presets with random weights)")
    g.add_argument("--ckpt-dir", help="Wan2.1-T2V-{1.3B,14B} folder, original or -Diffusers layout")
    g.add_argument("--dit", help="DiT file or folder (overrides --ckpt-dir)")
    g.add_argument("--vae", help="Wan2.1_VAE.pth or a Diffusers vae/ folder")
    g.add_argument("--text-encoder", help="models_t5_umt5-xxl-enc-bf16.pth or a Diffusers text_encoder/ folder")
    g.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder")
    g.add_argument("--lora", help="community-format Wan LoRA (.safetensors) merged into the DiT")
    g.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the LoRA delta (default 1.0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default="A corgi running on a beach at sunset, cinematic.", help="the one prompt")
    g.add_argument("--prompts", help="text file, one prompt per line (overrides --prompt)")
    g.add_argument("--negative-prompt", default=None, help="default: Wan's Chinese negative prompt")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; tiny: 8)")
    g.add_argument("--shift", type=float, default=5.0, help="timestep shift (default 5.0)")
    g.add_argument("--guidance", type=float, default=5.0, help="CFG scale, 1 = no guidance (default 5.0)")
    g.add_argument("--solver", choices=("unipc", "euler"), default="unipc", help="default unipc")
    g.add_argument("--seed", type=int, default=42, help="prompt k of a --prompts file uses seed + k (default 42)")
    g.add_argument("--size", default=None, help="WxH, multiples of 16 (default 832x480; tiny: 32x32)")
    g.add_argument("--frames", type=int, default=None, help="4k+1 (default 81; tiny: 5)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="samples", help="a .mp4 file (one prompt) or a folder (default samples)")
    g.add_argument("--fps", type=int, default=16, help="default 16")
    g.add_argument("--save-latents", help="folder for the final latents + prompts (reward-model data)")
    g.add_argument("--device", help="default: this rank's GPU, else the CPU")
    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (numerics unchanged)")
    g.add_argument("--sp-size", type=int, default=1, help="Ulysses sequence parallelism under torchrun: each prompt's "
                   "tokens split over this many ranks (default 1: off); must divide the world size and the heads")
    args = p.parse_args(argv)

    args.tiny = not (args.ckpt_dir or args.dit or args.vae or args.text_encoder or args.tokenizer)
    for k, v in (TINY_DEFAULTS if args.tiny else REAL_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.width, args.height = vae_lib.parse_size(args.size)
        vae_lib.check_size(args.frames, args.height, args.width)
    except ValueError as e:
        p.error(str(e))
    for k in ("shift", "guidance", "lora_scale"):
        if not math.isfinite(getattr(args, k)):
            p.error(f"--{k.replace('_', '-')} must be a finite number, got {getattr(args, k)}")
    if args.steps < 1 or args.shift <= 0 or args.fps < 1:
        p.error(f"--steps and --fps must be >= 1 and --shift > 0, got {args.steps}, {args.fps}, {args.shift}")
    if args.negative_prompt is None:
        args.negative_prompt = WAN_NEGATIVE_PROMPT
    return args


def load_models(args, device):
    """-> (dit, vae, tokenizer, text encoder). No checkpoint: the tiny presets, seeded random weights."""
    import lora
    import model_dit
    import text_encoder as text_encoder_lib
    import vae as vae_lib

    if args.tiny:
        print("no checkpoint given: tiny presets with RANDOM weights; the video is noise, this run only "
              "exercises the pipeline (give --ckpt-dir for real samples)")
        with torch.random.fork_rng():  # seeded weights, the caller's RNG untouched
            torch.manual_seed(0)
            dit = model_dit.WanDiT(model_dit.DIT_CONFIGS["tiny"]).to(device)
            vae = vae_lib.WanVAE(vae_lib.VAE_CONFIGS["tiny"]).to(device)
            encoder = text_encoder_lib.UMT5Encoder(text_encoder_lib.UMT5_CONFIGS["tiny"]).to(device)
        tokenizer = text_encoder_lib.load_tokenizer(None)
    else:
        paths, dt = model_paths(args), dtypes(device)
        dit = model_dit.load_dit(paths["dit"], device=device, dtype=dt["dit"])
        vae = vae_lib.load_vae(paths["vae"], device=device, dtype=dt["vae"])
        encoder = text_encoder_lib.load_text_encoder(paths["text_encoder"], device=device, dtype=dt["text_encoder"])
        tokenizer = text_encoder_lib.load_tokenizer(paths["tokenizer"])
    if args.lora:
        print(f"merged LoRA {args.lora} into {lora.merge_lora(dit, args.lora, args.lora_scale)} layers")
    return dit.eval().requires_grad_(False), vae.eval().requires_grad_(False), tokenizer, encoder.eval()


def output_paths(args, index, count):
    """(video path, json path) of prompt `index` of `count`."""
    out = Path(args.out)
    if out.suffix == ".mp4":
        if count != 1:
            raise ValueError(f"--out {out} is one file but there are {count} prompts; give a folder")
        video = out
    else:
        video = out / f"{index:05d}.mp4"
    return video, video.with_suffix(".json")


def write_video(path, video, fps):
    """(3, T, H, W) in [-1, 1] -> mp4 (libx264), quantised as Wan does: uint8((x + 1) / 2 * 255)."""
    import imageio

    frames = ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8) as writer:
        for frame in frames:
            writer.append_data(frame)


def make_velocity_fn(dit, context):
    """(x, t) -> velocity for one prompt embedding, under the precision policy's autocast."""
    def velocity(x, t):
        with autocast(x.device):
            return dit(x, t, context)
    return velocity


def generate(dit, context, neg_context, args, seed, device):
    """One prompt -> final normalised latent (1, 16, T', H', W'), with a progress line per step."""
    import vae as vae_lib

    shape = (1, *vae_lib.latent_shape(args.frames, args.height, args.width))
    noise = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    sigmas = get_sigmas(args.steps, args.shift, args.solver)
    ts, t0 = timesteps_from_sigmas(sigmas), time.time()

    def progress(i):
        elapsed = time.time() - t0
        print(f"  step {i + 1}/{args.steps} t={ts[i].item()} sigma={sigmas[i].item():.4f} {elapsed:.1f}s", flush=True)

    z, _ = denoise(make_velocity_fn(dit, context), noise, sigmas, solver=args.solver,
                   uncond_fn=make_velocity_fn(dit, neg_context), guidance=args.guidance, progress=progress)
    return z


def read_prompts(path) -> list[str]:
    """A prompts file: one prompt per non-empty line. An error names a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def settings(args):
    keys = ("ckpt_dir", "dit", "vae", "text_encoder", "lora", "lora_scale", "negative_prompt", "steps", "shift",
            "guidance", "solver", "width", "height", "frames", "fps")
    return {"random_weights": args.tiny, **{k: getattr(args, k) for k in keys}}


def sample_prompts(args, prompts, mine, rank, device, sp_group=None, write=True):
    """Sample prompts[k] for k in mine: an mp4 + json each (and the latent with --save-latents).
    With sp_group every rank of the group samples the same prompts, their tokens split; the rank
    given write=True writes."""
    from safetensors.torch import save_file

    import text_encoder as text_encoder_lib

    dit, vae, tokenizer, encoder = load_models(args, device)
    if sp_group is not None:
        dit.set_sequence_parallel(sp_group)
    if args.compile:
        dit.compile_blocks()
    # encode every prompt up front (one at a time, kept on the CPU), then free the text encoder
    embeddings = [text_encoder_lib.encode_prompts([prompts[k]], tokenizer, encoder) for k in mine]
    embeddings = [(context.cpu(), length.cpu()) for context, length in embeddings]
    neg_context, _ = text_encoder_lib.encode_prompts([args.negative_prompt], tokenizer, encoder)
    del encoder

    for k, (context, length) in zip(mine, embeddings):
        seed = args.seed + k
        print(f"[rank {rank}] prompt {k + 1}/{len(prompts)} seed {seed}: {prompts[k]}", flush=True)
        z = generate(dit, context.to(device), neg_context, args, seed, device)
        if not write:
            continue
        with torch.no_grad():
            video = vae.decode(z)[0]  # (3, T, H, W)
        video_path, json_path = output_paths(args, k, len(prompts))
        write_video(video_path, video, args.fps)
        info = {"prompt": prompts[k], "seed": seed, **settings(args)}
        json_path.write_text(json.dumps(info, indent=1, ensure_ascii=False))
        if args.save_latents:
            Path(args.save_latents).mkdir(parents=True, exist_ok=True)
            save_file({"latent": z[0].float().contiguous().cpu(), "length": length},
                      str(Path(args.save_latents) / f"{k:05d}.safetensors"),
                      metadata={"prompt": prompts[k], "seed": str(seed), "settings": json.dumps(settings(args))})
        print(f"[rank {rank}] wrote {video_path}", flush=True)


def main(argv=None):
    """The command line. Writes `out.mp4` at 16 fps and `out.json` with the prompt, seed and settings:

        python sample.py                                  # tiny presets, RANDOM weights, offline
        python sample.py --ckpt-dir Wan2.1-T2V-1.3B --prompt "a cat surfing" --out cat.mp4
        python sample.py --ckpt-dir Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt --out samples/ \\
            --save-latents latents/ --lora my_lora.safetensors
        torchrun --nproc_per_node=8 sample.py --ckpt-dir Wan2.1-T2V-14B --prompts prompts.txt --out samples/

    Prompt k of a file uses seed + k, so the output does not depend on the number of ranks. Under
    torchrun without --sp-size every rank samples its own prompts (r, r + world, ...) and no process
    group is created. With --sp-size S the ranks set up a process group: each group of S consecutive
    ranks samples the same prompts, each prompt's tokens split over the group (the DiT's Ulysses
    all-to-alls), and the group's first rank writes the outputs; ranks of different groups meet only
    when the group is set up and torn down. Precision is the one policy of `dtypes()`: Wan's own
    (text encoder bf16, VAE fp32, DiT bf16 under autocast with its fp32 islands on CUDA; the DiT in
    fp32 on the CPU)."""
    import distributed

    args = parse_args(argv)
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    model_paths(args)  # a missing model file is refused before anything loads
    if args.sp_size < 1:
        raise ValueError(f"--sp-size must be >= 1, got {args.sp_size}")
    sp_group = None
    if args.sp_size > 1:  # the ranks of a sequence-parallel group talk; different groups never do
        rank, world, device = distributed.setup_distributed()
        sp_group, _ = distributed.sequence_parallel_groups(args.sp_size)
    else:
        rank, world, device = distributed.rank_and_device()  # the ranks never communicate: no process group
    data_rank, data_world = rank // args.sp_size, world // args.sp_size
    if args.device:
        device = torch.device(args.device)
    mine = list(range(len(prompts)))[data_rank::data_world]
    for k in mine:  # fail on a bad --out before loading anything
        output_paths(args, k, len(prompts))
    if mine:
        sample_prompts(args, prompts, mine, rank, device, sp_group, write=rank % args.sp_size == 0)
    else:
        print(f"[rank {rank}] no prompts left for this rank ({len(prompts)} prompts, {world} ranks)")
    if sp_group is not None:
        distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, no traceback
        raise SystemExit(f"sample.py: error: {e}") from None
