"""Wan flow-matching sampling: the sigma grids, Wan's UniPC and Euler, classifier-free guidance,
the one `denoise()` loop that sampling, data generation and ReFL share (all of it needs torch alone),
image-to-video conditioning, and the command line for every Wan 2.1 / 2.2 model (`MODELS`; `main`,
which imports its packages when it runs).

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

Wan 2.2 (`wan/text2video.py`, `image2video.py`, `textimage2video.py` of Wan-Video/Wan2.2): the
A14B's two experts switch inside one `denoise` call (the solver's history carries over), each with
its own guidance; I2V models read y = [mask 4, image latent] on the DiT's channels (Wan 2.1 I2V-14B
also CLIP features of the image, `clip.py`); the TI2V-5B's image is its clean first latent frame,
whose tokens get t = 0.

Left out: Wan's DPM++ solver (Euler is kept as the simple, stateless alternative), first-last-frame
video, prompt extension and CPU offloading of the models.
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
    guidance is a number or a function of the integer timestep (Wan 2.2's two experts each have
    their own: model_dit.TwoExpertDiT.guidance_at); the solver's history runs on across an expert
    switch, as in one call of the official sampler.
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
            g = guidance(ts[i]) if callable(guidance) else guidance
            v = velocity_fn(x, t)
            if uncond_fn is not None and g != 1.0:
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg_grad == "both"):
                    v_uncond = uncond_fn(x, t)
                v = guided_velocity(v, v_uncond, g)
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
# Image-to-video: sizes, the image's conditioning, the TI2V-5B's clean first frame


def i2v_size(height: int, width: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Wan I2V-A14B / I2V-14B output (height, width) for an image of height x width: its aspect
    ratio at about max_area pixels, the latent a multiple of the DiT patch (official `image2video.py`:
    lat = round(sqrt(area * aspect) // stride // patch * patch)). No crop: the image is stretched to it."""
    aspect = height / width
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"image {width}x{height} at max area {max_area} leaves no latent (aspect too extreme?)")
    return stride * lat_h, stride * lat_w


def best_output_size(width: int, height: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """Wan 2.2 TI2V-5B output (width, height) for an image: multiples of (dw, dh) within `area`,
    rounding the width first or the height first, whichever keeps the image's aspect ratio closer
    (official `utils.best_output_size`)."""
    ratio = width / height
    ow = (area * ratio) ** 0.5
    oh = area / ow
    w1 = int(ow // dw * dw)
    h1 = int(area / w1 // dh * dh)
    h2 = int(oh // dh * dh)
    w2 = int(area / h2 // dw * dw)
    off = lambda w, h: max(ratio / (w / h), (w / h) / ratio)  # noqa: E731
    return (w1, h1) if off(w1, h1) < off(w2, h2) else (w2, h2)


def load_image(path) -> torch.Tensor:
    """An image file -> (3, H, W) float32 in [-1, 1] (RGB; grey and RGBA are converted)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        a = iio.imread(path)
    except Exception as err:  # imageio raises many kinds for a file it cannot decode
        raise ValueError(f"{path}: not a readable image: {type(err).__name__}: {err}") from err
    if a.ndim == 2:
        a = a[..., None].repeat(3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"{path}: expected an RGB image, got an array of shape {a.shape}")
    img = torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1).float()
    return img / 255.0 * 2 - 1


def resize_stretch(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) -> (3, height, width), bicubic, aspect not kept: the A14B / 14B I2V resize."""
    return _bicubic(image[None], (height, width), antialias=False)[0]


def resize_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) -> (3, height, width): scaled to cover, then centre-cropped (the TI2V-5B's resize).
    Wan resizes with PIL's LANCZOS; this is torch's antialiased bicubic, so pixels differ slightly
    (no Pillow: the runtime needs none)."""
    ih, iw = image.shape[1:]
    scale = max(width / iw, height / ih)
    h, w = round(ih * scale), round(iw * scale)
    image = _bicubic(image[None], (h, w), antialias=True)[0]
    top, left = (h - height) // 2, (w - width) // 2
    return image[:, top : top + height, left : left + width]


def _bicubic(x, size, antialias):
    """Bicubic resize of (B, C, H, W) to size (align_corners False, Wan's F.interpolate setting)."""
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=antialias)


def i2v_condition(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """I2V-A14B / I2V-14B conditioning y (B, 4 + z_dim, F', H', W') of images (B, 3, H, W) in [-1, 1]:
    a 4-channel mask, 1 on latent frame 0 (its 4 channels are the 4 pixel frames a latent frame
    holds, the first pixel frame counted 4 times), then the latent of the image followed by
    frames - 1 black frames. The DiT reads [x, y] on channels."""
    b, _, h, w = image.shape
    video = torch.cat([image[:, :, None], image.new_zeros(b, 3, frames - 1, h, w)], dim=2)
    with torch.no_grad():
        latent = vae.encode(video)
    mask = torch.zeros_like(latent[:, :4])
    mask[:, :, 0] = 1
    return torch.cat([mask, latent], dim=1)


def ti2v_image_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> the TI2V-5B's clean first latent frame (B, z_dim, 1, H', W')."""
    with torch.no_grad():
        return vae.encode(image[:, :, None])


def with_first_frame(velocity_fn, z_image: torch.Tensor, patch_size=(1, 2, 2)):
    """The TI2V-5B's image-to-video: the model sees latent frame 0 replaced by the image latent,
    its tokens at t = 0, every other token at t (diffusers' form of the official re-imposed
    latent: the solver's state stays unmixed, and frame 0 is replaced at the end, `put_first_frame`)."""
    import model_dit

    def fn(x, t):
        grid = tuple(s // p for s, p in zip(x.shape[2:], patch_size))
        return velocity_fn(put_first_frame(x, z_image), model_dit.first_frame_timesteps(t, grid))
    return fn


def put_first_frame(z: torch.Tensor, z_image: torch.Tensor) -> torch.Tensor:
    """z (B, C, F', H', W') with latent frame 0 replaced by the image latent (1 or B, C, 1, H', W')."""
    return torch.cat([z_image.to(z.dtype).expand(z.shape[0], -1, -1, -1, -1), z[:, :, 1:]], dim=2)


# ---------------------------------------------------------------------------------------------
# Models: checkpoint folders, precision


# Every Wan model this repo samples, with its official defaults (Wan 2.1 / 2.2 configs and
# generate.py). guidance: one number, or (low, high) for the two experts; size: the default
# WIDTHxHEIGHT, for image-to-video the area the image's aspect is fitted to; image: whether the
# model takes an image ("required", "optional": the TI2V-5B is also text-to-video) or not (None).
MODELS = {
    "t2v-1.3B": dict(dit="1.3B", vae="wan2.1", steps=50, shift=5.0, guidance=5.0, frames=81, fps=16,
                     size="832x480", image=None),
    "t2v-14B": dict(dit="14B", vae="wan2.1", steps=50, shift=5.0, guidance=5.0, frames=81, fps=16,
                    size="1280x720", image=None),
    "i2v-14B": dict(dit="i2v-14B", vae="wan2.1", steps=40, shift=5.0, guidance=5.0, frames=81, fps=16,
                    size="1280x720", image="required"),
    "t2v-A14B": dict(dit="t2v-A14B", vae="wan2.1", steps=40, shift=12.0, guidance=(3.0, 4.0), boundary=0.875,
                     frames=81, fps=16, size="1280x720", image=None),
    "i2v-A14B": dict(dit="i2v-A14B", vae="wan2.1", steps=40, shift=5.0, guidance=(3.5, 3.5), boundary=0.9,
                     frames=81, fps=16, size="1280x720", image="required"),
    "ti2v-5B": dict(dit="ti2v-5B", vae="wan2.2", steps=50, shift=5.0, guidance=5.0, frames=121, fps=24,
                    size="1280x704", image="optional"),
}

_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


def _json(path: Path) -> dict:
    """A config.json / model_index.json as a dict; {} when it is absent or not a JSON object."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def detect_model(ckpt_dir) -> str:
    """Which MODELS entry a checkpoint folder holds, official or -Diffusers layout, from its
    folders and config files (never from its name)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint folder {d} does not exist")
    if (d / "high_noise_model").is_dir() or (d / "transformer_2").is_dir():  # Wan 2.2 A14B: two experts
        high = _json(d / "high_noise_model" / "config.json") or _json(d / "transformer" / "config.json")
        i2v = high.get("model_type") == "i2v" or 36 in (high.get("in_dim"), high.get("in_channels"))
        i2v |= _json(d / "model_index.json").get("_class_name") == "WanImageToVideoPipeline"
        return "i2v-A14B" if i2v else "t2v-A14B"
    if (d / "Wan2.2_VAE.pth").exists() or _json(d / "vae" / "config.json").get("z_dim") == 48:
        return "ti2v-5B"
    cfg = _json(d / "config.json") or _json(d / "transformer" / "config.json")
    if (d / _CLIP).exists() or (d / "image_encoder").is_dir() or cfg.get("model_type") == "i2v" or cfg.get("image_dim"):
        return "i2v-14B"
    dim = cfg.get("dim") or cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    return "t2v-14B" if dim == 5120 else "t2v-1.3B"


def checkpoint_paths(ckpt_dir, model=None):
    """A Wan repo folder, official or -Diffusers layout, -> its files: {"dit", "vae", "text_encoder",
    "tokenizer"}, plus "dit_low" for the A14B's low-noise expert ("dit" is then the high-noise one)
    and "clip" for Wan 2.1 I2V's image encoder. model: a MODELS name, default detect_model's."""
    d = Path(ckpt_dir)
    model = model or detect_model(d)
    if any((d / sub).is_dir() for sub in ("transformer", "vae", "text_encoder")):  # Diffusers layout
        paths = {"dit": d / "transformer", "vae": d / "vae", "text_encoder": d / "text_encoder",
                 "tokenizer": d / "tokenizer"}
        extra = {"dit_low": d / "transformer_2", "clip": d / "image_encoder"}
    else:
        vae = "Wan2.2_VAE.pth" if MODELS[model]["vae"] == "wan2.2" else "Wan2.1_VAE.pth"
        paths = {"dit": d, "vae": d / vae, "text_encoder": d / _T5, "tokenizer": d / "google" / "umt5-xxl"}
        extra = {"dit_low": d / "low_noise_model", "clip": d / _CLIP}
        if "boundary" in MODELS[model]:
            paths["dit"] = d / "high_noise_model"
    if "boundary" in MODELS[model]:
        paths["dit_low"] = extra["dit_low"]
    if model == "i2v-14B":
        paths["clip"] = extra["clip"]
    return paths


MODEL_PARTS = ("dit", "vae", "text_encoder", "tokenizer")


def model_paths(args, parts=MODEL_PARTS) -> dict:
    """The files of `parts` from --ckpt-dir (either layout) with --dit/--vae/--text-encoder/--tokenizer
    on top; {} when none of these flags is given (the scripts' offline default). Every path of
    `parts` must exist: the error names each missing one before any model is loaded. The A14B's
    low-noise expert ("dit_low") and Wan 2.1 I2V's CLIP ("clip") come along when the folder has them."""
    model = getattr(args, "model", None) if getattr(args, "model", None) in MODELS else None
    paths = checkpoint_paths(args.ckpt_dir, model) if getattr(args, "ckpt_dir", None) else {}
    parts = tuple(parts) + tuple(k for k in ("dit_low", "clip") if k in paths and "dit" in parts)
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

# The tiny random-weight run (no checkpoint) is sized to take seconds on a CPU; real models take
# their MODELS defaults.
TINY_DEFAULTS = {"steps": 8, "shift": 5.0, "guidance": 5.0, "size": "32x32", "frames": 5, "fps": 16}


def parse_guidance(text: str):
    """"5" -> 5.0; "3,4" -> (3.0, 4.0), the two experts' (low, high)."""
    parts = [float(v) for v in str(text).split(",")]
    if len(parts) not in (1, 2) or not all(math.isfinite(v) for v in parts):
        raise ValueError(f"--guidance must be a finite number, or LOW,HIGH for the two experts, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def parse_args(argv=None):
    import vae as vae_lib

    p = argparse.ArgumentParser(description="Wan 2.1 / 2.2 text-to-video and image-to-video sampling")
    g = p.add_argument_group("models (none given: tiny presets with random weights)")
    g.add_argument("--ckpt-dir", help="a Wan repo folder, official or -Diffusers layout (" + ", ".join(MODELS)
                   + "); which model it holds is read from its files")
    g.add_argument("--model", choices=list(MODELS), help="the model, when the folder cannot tell (default: detected)")
    g.add_argument("--dit", help="DiT file or folder; for the A14B the high-noise expert (overrides --ckpt-dir)")
    g.add_argument("--dit-low", help="the A14B's low-noise expert (overrides --ckpt-dir)")
    g.add_argument("--vae", help="Wan2.1_VAE.pth, Wan2.2_VAE.pth or a Diffusers vae/ folder")
    g.add_argument("--text-encoder", help="models_t5_umt5-xxl-enc-bf16.pth or a Diffusers text_encoder/ folder")
    g.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder")
    g.add_argument("--clip", help="Wan 2.1 I2V's CLIP: " + _CLIP + " or a Diffusers image_encoder/ folder")
    g.add_argument("--lora", help="community-format Wan LoRA (.safetensors) merged into the DiT; for the A14B "
                   "the folder holding lora_high_noise / lora_low_noise.safetensors, or HIGH,LOW")
    g.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the LoRA delta (default 1.0)")
    g = p.add_argument_group("sampling (defaults: the model's own, see MODELS)")
    g.add_argument("--prompt", default="A corgi running on a beach at sunset, cinematic.", help="the one prompt")
    g.add_argument("--prompts", help="text file, one prompt per line, or .jsonl of {\"prompt\", \"image\"} per line "
                   "(overrides --prompt)")
    g.add_argument("--image", help="the first frame, for image-to-video (i2v models; the TI2V-5B without it is "
                   "text-to-video)")
    g.add_argument("--negative-prompt", default=None, help="default: Wan's Chinese negative prompt")
    g.add_argument("--steps", type=int, default=None, help="sampling steps")
    g.add_argument("--shift", type=float, default=None, help="timestep shift")
    g.add_argument("--guidance", type=parse_guidance, default=None,
                   help="CFG scale, 1 = no guidance; for the A14B one number for both experts or LOW,HIGH")
    g.add_argument("--boundary", type=float, default=None, help="A14B: the high-noise expert runs while t >= "
                   "boundary * 1000 (default 0.875 T2V, 0.9 I2V)")
    g.add_argument("--solver", choices=("unipc", "euler"), default="unipc", help="default unipc")
    g.add_argument("--seed", type=int, default=42, help="prompt k of a --prompts file uses seed + k (default 42)")
    g.add_argument("--size", default=None, help="WxH (multiples of 16; 32 for the TI2V-5B); image-to-video: the "
                   "area the image's aspect is fitted to")
    g.add_argument("--frames", type=int, default=None, help="4k+1")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="samples", help="a .mp4 file (one prompt) or a folder (default samples)")
    g.add_argument("--fps", type=int, default=None, help="default 16; 24 for the TI2V-5B")
    g.add_argument("--save-latents", help="folder for the final latents + prompts (reward-model data)")
    g.add_argument("--device", help="default: this rank's GPU, else the CPU")
    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (numerics unchanged)")
    g.add_argument("--sp-size", type=int, default=1, help="Ulysses sequence parallelism under torchrun: each prompt's "
                   "tokens split over this many ranks (default 1: off); must divide the world size and the heads")
    args = p.parse_args(argv)

    args.tiny = not (args.ckpt_dir or args.dit or args.dit_low or args.vae or args.text_encoder or args.tokenizer)
    try:
        if args.tiny:
            if args.model or args.image:
                raise ValueError("--model and --image need a checkpoint (--ckpt-dir); the tiny random-weight run "
                                 "is text-to-video")
            defaults, multiple = TINY_DEFAULTS, vae_lib.SIZE_MULTIPLE
        else:
            args.model = args.model or (detect_model(args.ckpt_dir) if args.ckpt_dir else "t2v-1.3B")
            defaults = MODELS[args.model]
            multiple = vae_lib.VAE_CONFIGS[defaults["vae"]].size_multiple
        for k in ("steps", "shift", "guidance", "size", "frames", "fps", "boundary"):
            if getattr(args, k) is None:
                setattr(args, k, defaults.get(k))
        image = None if args.tiny else defaults["image"]
        args.width, args.height = vae_lib.parse_size(args.size, 16 if image == "required" else multiple)
        vae_lib.check_size(args.frames, args.height, args.width, multiple)
        two = args.boundary is not None
        if two and "boundary" not in defaults:
            raise ValueError(f"--boundary is for the two-expert A14B models, not {args.model or 'the tiny run'}")
        if isinstance(args.guidance, tuple) and not two:
            raise ValueError(f"--guidance {args.guidance}: a LOW,HIGH pair is for the two-expert A14B models, "
                             f"not {args.model or 'the tiny run'}")
        if two and not isinstance(args.guidance, tuple):
            args.guidance = (args.guidance, args.guidance)
        if image is None and args.image:
            raise ValueError(f"{args.model} is text-to-video: it takes no --image")
        jsonl = str(args.prompts or "").endswith(".jsonl")
        if image == "required" and not (args.image or jsonl):
            raise ValueError(f"{args.model} is image-to-video: give --image (or a .jsonl --prompts with an \"image\" "
                             f"per line)")
    except ValueError as e:
        p.error(str(e))
    for k in ("shift", "lora_scale"):
        if not math.isfinite(getattr(args, k)):
            p.error(f"--{k.replace('_', '-')} must be a finite number, got {getattr(args, k)}")
    if args.steps < 1 or args.shift <= 0 or args.fps < 1:
        p.error(f"--steps and --fps must be >= 1 and --shift > 0, got {args.steps}, {args.fps}, {args.shift}")
    if args.negative_prompt is None:
        args.negative_prompt = WAN_NEGATIVE_PROMPT
    return args


def load_models(args, device):
    """-> (dit, vae, tokenizer, text encoder, clip or None). The dit is a model_dit.TwoExpertDiT for
    the A14B. No checkpoint: the tiny presets, seeded random weights."""
    import lora
    import model_dit
    import text_encoder as text_encoder_lib
    import vae as vae_lib

    clip = None
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
        vae = vae_lib.load_vae(paths["vae"], device=device, dtype=dt["vae"])
        dit = model_dit.load_dit(paths["dit"], device=device, dtype=dt["dit"])
        check_pairing(args.model, dit.cfg, vae.cfg)
        if args.boundary is not None:
            low = model_dit.load_dit(paths["dit_low"], device=device, dtype=dt["dit"])
            dit = model_dit.TwoExpertDiT(dit, low, args.boundary, args.guidance)
        if "clip" in paths:
            import clip as clip_lib

            clip = clip_lib.load_clip(paths["clip"], device=device, dtype=dt["vae"])
        encoder = text_encoder_lib.load_text_encoder(paths["text_encoder"], device=device, dtype=dt["text_encoder"])
        tokenizer = text_encoder_lib.load_tokenizer(paths["tokenizer"])
    if args.lora and isinstance(dit, model_dit.TwoExpertDiT):  # an A14B LoRA is one file per expert
        files = lora.expert_lora_files(args.lora)
        for expert, path in files.items():
            print(f"merged LoRA {path} into {lora.merge_lora(getattr(dit, expert), path, args.lora_scale)} layers "
                  f"of the {expert}-noise expert")
    elif args.lora:
        print(f"merged LoRA {args.lora} into {lora.merge_lora(dit, args.lora, args.lora_scale)} layers")
    return dit.eval().requires_grad_(False), vae.eval().requires_grad_(False), tokenizer, encoder.eval(), clip


def check_pairing(model: str, dit_cfg, vae_cfg):
    """A DiT and a VAE that cannot work together are refused before sampling: the DiT reads the
    VAE's latent channels (I2V: latent + mask 4 + image latent)."""
    want = vae_cfg.z_dim if MODELS[model]["image"] != "required" else 2 * vae_cfg.z_dim + 4
    if dit_cfg.in_dim != want:
        kind = "Wan 2.2 VAE (48 channels)" if vae_cfg.z_dim == 48 else f"Wan 2.1 VAE ({vae_cfg.z_dim} channels)"
        raise ValueError(f"the DiT takes {dit_cfg.in_dim} input channels but {model} with the {kind} gives {want}: "
                         f"Wan2.2_VAE.pth goes with the TI2V-5B, Wan2.1_VAE.pth with every other model")


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


def make_velocity_fn(dit, context, **cond):
    """(x, t) -> velocity for one prompt embedding (and the image conditioning `cond`: y, clip),
    under the precision policy's autocast."""
    def velocity(x, t):
        with autocast(x.device):
            return dit(x, t, context, **cond)
    return velocity


def generate(dit, context, neg_context, args, seed, device, vae=None, image=None, clip=None):
    """One prompt (and, for image-to-video, its image (3, H, W) in [-1, 1]) -> final normalised
    latent (1, z_dim, T', H', W'), with a progress line per step. The output size: --size for
    text-to-video; for image-to-video the image's aspect fitted to the area of --size."""
    import model_dit
    import vae as vae_lib

    vae_cfg = vae.cfg if vae is not None else vae_lib.VAE_CONFIGS["tiny"]
    cond, z_image, (height, width) = {}, None, (args.height, args.width)
    if image is not None:
        area, (ih, iw) = args.width * args.height, image.shape[1:]
        if args.model == "ti2v-5B":
            width, height = best_output_size(iw, ih, vae_cfg.size_multiple, vae_cfg.size_multiple, area)
            z_image = ti2v_image_latent(vae, resize_crop(image, height, width)[None].to(device))
        else:
            height, width = i2v_size(ih, iw, area, vae_cfg.stride)
            cond["y"] = i2v_condition(vae, resize_stretch(image, height, width)[None].to(device), args.frames)
            if clip is not None:
                cond["clip"] = clip.encode_image(image[None].to(device))
    shape = (1, *vae_lib.latent_shape(args.frames, height, width, vae_cfg))
    noise = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    sigmas = get_sigmas(args.steps, args.shift, args.solver)
    ts, t0 = timesteps_from_sigmas(sigmas), time.time()

    def progress(i):
        elapsed = time.time() - t0
        print(f"  step {i + 1}/{args.steps} t={ts[i].item()} sigma={sigmas[i].item():.4f} {elapsed:.1f}s", flush=True)

    cond_fn, uncond_fn = make_velocity_fn(dit, context, **cond), make_velocity_fn(dit, neg_context, **cond)
    if z_image is not None:
        cond_fn, uncond_fn = with_first_frame(cond_fn, z_image), with_first_frame(uncond_fn, z_image)
    guidance = dit.guidance_at if isinstance(dit, model_dit.TwoExpertDiT) else args.guidance
    z, _ = denoise(cond_fn, noise, sigmas, solver=args.solver, uncond_fn=uncond_fn, guidance=guidance,
                   progress=progress)
    return z if z_image is None else put_first_frame(z, z_image)


def read_prompts(path) -> list[str]:
    """A prompts file: one prompt per non-empty line. An error names a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def read_prompt_images(path) -> tuple[list[str], list]:
    """A .jsonl prompts file, one {"prompt": ..., "image": ...} per line (image optional for the
    TI2V-5B; a relative image path is read from the file's folder) -> (prompts, image paths or None);
    a .txt file -> (prompts, [None, ...]). Errors name the file and line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        prompts = read_prompts(path)
        return prompts, [None] * len(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts, images = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path} line {n}: not JSON: {err}") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path} line {n}: expected {{\"prompt\": str, \"image\": path}}, got {line.strip()[:80]}")
        prompts.append(row["prompt"])
        images.append(path.parent / row["image"] if row.get("image") else None)
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts, images


def settings(args):
    keys = ("model", "ckpt_dir", "dit", "dit_low", "vae", "text_encoder", "clip", "lora", "lora_scale",
            "negative_prompt", "steps", "shift", "guidance", "boundary", "solver", "width", "height", "frames", "fps")
    return {"random_weights": args.tiny, **{k: getattr(args, k) for k in keys}}


def sample_prompts(args, prompts, mine, rank, device, sp_group=None, write=True, images=None):
    """Sample prompts[k] (with images[k], for image-to-video) for k in mine: an mp4 + json each (and
    the latent with --save-latents). With sp_group every rank of the group samples the same prompts,
    their tokens split; the rank given write=True writes."""
    from safetensors.torch import save_file

    import text_encoder as text_encoder_lib

    images = images or [None] * len(prompts)
    dit, vae, tokenizer, encoder, clip = load_models(args, device)
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
        image = load_image(images[k]) if images[k] is not None else None
        z = generate(dit, context.to(device), neg_context, args, seed, device, vae=vae, image=image, clip=clip)
        if not write:
            continue
        with torch.no_grad():
            video = vae.decode(z)[0]  # (3, T, H, W)
        video_path, json_path = output_paths(args, k, len(prompts))
        write_video(video_path, video, args.fps)
        info = {"prompt": prompts[k], "seed": seed, **({"image": str(images[k])} if images[k] else {}),
                **settings(args)}
        json_path.write_text(json.dumps(info, indent=1, ensure_ascii=False))
        if args.save_latents:
            Path(args.save_latents).mkdir(parents=True, exist_ok=True)
            save_file({"latent": z[0].float().contiguous().cpu(), "length": length},
                      str(Path(args.save_latents) / f"{k:05d}.safetensors"),
                      metadata={"prompt": prompts[k], "seed": str(seed), "settings": json.dumps(settings(args))})
        print(f"[rank {rank}] wrote {video_path}", flush=True)


def main(argv=None):
    """The command line. Writes `out.mp4` (16 fps; 24 for the TI2V-5B) and `out.json` with the prompt,
    seed and settings:

        python sample.py                                  # tiny presets, RANDOM weights, offline
        python sample.py --ckpt-dir Wan2.1-T2V-1.3B --prompt "a cat surfing" --out cat.mp4
        python sample.py --ckpt-dir Wan2.2-T2V-A14B --prompt "a cat surfing" --out cat.mp4
        python sample.py --ckpt-dir Wan2.2-I2V-A14B --image cat.png --prompt "the cat surfs" --out cat.mp4
        python sample.py --ckpt-dir Wan2.2-TI2V-5B --image cat.png --prompt "the cat surfs" --out cat.mp4
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
    prompts, images = read_prompt_images(args.prompts) if args.prompts else ([args.prompt], [args.image])
    if args.image and args.prompts:
        images = [im or Path(args.image) for im in images]  # --image for the lines that name none
    kind = None if args.tiny else MODELS[args.model]["image"]
    if kind == "required" and None in images:
        raise ValueError(f"{args.model} is image-to-video: prompt {images.index(None) + 1} has no image")
    if kind is None and any(images):
        raise ValueError(f"{args.model or 'the tiny run'} is text-to-video: {args.prompts} names images")
    for im in images:
        if im is not None and not Path(im).is_file():
            raise FileNotFoundError(f"image {im} does not exist")
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
        sample_prompts(args, prompts, mine, rank, device, sp_group, write=rank % args.sp_size == 0, images=images)
    else:
        print(f"[rank {rank}] no prompts left for this rank ({len(prompts)} prompts, {world} ranks)")
    if sp_group is not None:
        distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, no traceback
        raise SystemExit(f"sample.py: error: {e}") from None
