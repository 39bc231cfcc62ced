"""The offline toy world: what `python train_refl.py` (no checkpoints) and the tests train in.

ReFL needs a generator whose mid-step x0 prediction says something about where its own sampler
ends; a randomly initialised DiT does not, and ReFL on it raises no true reward at any learning
rate (measured on a 2-layer DiT: lr 1e-4 and 1e-3, beta 0 and 1). So the offline default is a small world of its own:

  - procedural videos: 5 frames of 32x32, a random background colour and a square of another
    random colour moving in a straight line; captions name a colour from the pixel reward's
    palette that is UNRELATED to the video, so the pretrained generator ignores the colour word
    and does not already satisfy the prompt-dependent "color" reward;
  - the tiny Wan-architecture models, all seeded: DiT ("tiny": dim 64, 2 layers), VAE ("tiny",
    random weights: latents 16x2x4x4), UMT5 ("tiny") with the offline byte tokenizer;
  - the tiny DiT pretrained by flow matching (x_sigma = (1 - sigma) x0 + sigma eps, target
    v = eps - x0, sigma drawn through the sampler's shift) on the VAE latents of the videos, about
    a minute on 2 CPU cores; the weights are cached on first use under `cache_dir`
    (default `<repo>/.cache/toy`, or $VELR_CACHE), keyed by a hash of the settings, written
    atomically;
  - an ensemble LRM bootstrapped from the generator's own labelled rollouts: sample, decode,
    score with the pixel reward, `lrm.lrm_update` (also cached).

The world's sampler: 20 Euler steps, shift 5; train_refl.py's toy defaults read it from ToyConfig.
Left out: a trained toy VAE (a random VAE is a fixed, smooth decoder, which is all ReFL needs here).
"""

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lrm as lrm_lib
import rewards
import sample
import text_encoder
from model_dit import DIT_CONFIGS, WanDiT
import vae as vae_lib
from vae import VAE_CONFIGS, WanVAE

TEMPLATES = ("a {} video", "make it {}", "{} everywhere", "a clip in {}")
MIN_CONTRAST = 0.5  # RGB distance (in [0, 1] units) from the background at which the parser's threshold sits (half of it)


@dataclass
class ToyConfig:
    frames: int = 5
    size: int = 32
    num_videos: int = 512  # procedural training set of the generator
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    sample_steps: int = 20  # Euler, the toy world's sampler
    shift: float = 5.0
    lrm_members: int = 5
    lrm_rollouts: int = 256  # labelled generator samples the LRM is bootstrapped on
    lrm_steps: int = 400
    lrm_batch: int = 32
    lrm_lr: float = 1e-3
    reward: str = "toy:calibrated_color"
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- data

def procedural_videos(n: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n videos (n, 3, frames, size, size) in [-1, 1]: random background, a moving square of another colour."""
    bg = torch.rand(n, 3, generator=generator) * 2 - 1
    fg = torch.rand(n, 3, generator=generator) * 2 - 1
    side = torch.randint(size // 4, size // 2 + 1, (n,), generator=generator)
    start = torch.rand(n, 2, generator=generator) * (size - side[:, None])  # top-left corner (y, x)
    velocity = (torch.rand(n, 2, generator=generator) * 2 - 1) * size / (2 * frames)
    t = torch.arange(frames).float()
    pos = (start[:, None] + velocity[:, None] * t[None, :, None]).clamp(min=0)  # (n, T, 2)
    pos = torch.minimum(pos, (size - side)[:, None, None].float())
    grid = torch.arange(size).float()
    inside_y = (grid >= pos[..., :1]) & (grid < pos[..., :1] + side[:, None, None])  # (n, T, H)
    inside_x = (grid >= pos[..., 1:]) & (grid < pos[..., 1:] + side[:, None, None])  # (n, T, W)
    mask = (inside_y[..., :, None] & inside_x[..., None, :]).float()[:, None]  # (n, 1, T, H, W)
    return bg[:, :, None, None, None] * (1 - mask) + fg[:, :, None, None, None] * mask


def prompt_list() -> list[str]:
    """Every toy caption: each template with each colour of the reward's palette."""
    return [t.format(c) for c in rewards.PALETTE for t in TEMPLATES]


def toy_prompts(n: int, generator: torch.Generator) -> list[str]:
    """n captions naming a random colour of the reward's palette (unrelated to any video)."""
    names = list(rewards.PALETTE)
    colours = torch.randint(len(names), (n,), generator=generator).tolist()
    templates = torch.randint(len(TEMPLATES), (n,), generator=generator).tolist()
    return [TEMPLATES[j].format(names[i]) for i, j in zip(colours, templates)]


# ----------------------------------------------------------------------------- the toy reward

@functools.lru_cache(maxsize=4)
def decoder_colour_stats(seed: int = 0, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (3,) of the toy VAE's decoded mean colour (RGB in [0, 1]) over n standard-normal
    latents of the toy shape. Seeded and deterministic; the global RNG is left untouched."""
    _, vae, _, _ = build_models(seed)
    z = torch.randn(n, *latent_shape(ToyConfig()), generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        colours = (vae.decode(z) + 1).div(2).mean((2, 3, 4))
    return colours.mean(0), colours.std(0)


def calibrated_color(video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The toy world's pixel reward (`--reward toy:calibrated_color`): `rewards.color` read through
    the toy decoder's own colour scale. A random VAE decodes every latent to nearly the same grey
    (the mean colour moves by ~0.005 across latents, measured), so the plain colour reward is
    constant to 2 decimals and gives ReFL nothing to climb. Here the video's mean colour is first
    standardised per channel by `decoder_colour_stats` and squashed, c = tanh(z / 2) in (-1, 1),
    then compared with the named colour mapped to [-1, 1]: 1 - |c - (2 rgb - 1)|^2 / 12, in [0, 1].
    Prompt-dependent and differentiable; a prompt without a palette word gets rewards.NEUTRAL.
    It measures the direction the decoded colour moves in, not an absolute colour."""
    x = rewards.unit_range(video)  # checks the shape, [-1, 1] -> [0, 1]
    if len(prompts) != x.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {x.shape[0]} videos")
    mean, std = (t.to(x.device) for t in decoder_colour_stats())
    c = torch.tanh((x.mean((2, 3, 4)) - mean) / std / 2)  # (B, 3)
    colours = [rewards.prompt_color(p) for p in prompts]
    named = torch.tensor([k is not None for k in colours], device=video.device)
    target = 2 * video.new_tensor([k or (0.5, 0.5, 0.5) for k in colours]).float() - 1
    match = 1 - (c - target).pow(2).sum(1) / 12
    return torch.where(named, match, torch.full_like(match, rewards.NEUTRAL))


# ----------------------------------------------------------------------------- the scene parser

def _background(x: torch.Tensor) -> torch.Tensor:
    """Per-frame background colour of videos x (B, 3, T, H, W) in [0, 1]: the per-channel median over
    the frame's pixels (the square covers at most a quarter of the frame), (B, 3, T, 1, 1), detached."""
    return x.detach().flatten(3).median(3).values[..., None, None]


def square_mask(video: torch.Tensor) -> torch.Tensor:
    """Where the square is, (B, T, H, W) 0/1: pixels whose colour is more than MIN_CONTRAST / 2 (RGB
    distance, [0, 1] units) from their frame's background colour."""
    x = rewards.unit_range(video)
    return ((x - _background(x)).pow(2).sum(1).sqrt() > MIN_CONTRAST / 2).float()


def parse_squares(video: torch.Tensor, min_fill: float = 0.8) -> list[int]:
    """The toy scene parser: for each video (B, 3, T, H, W) in [-1, 1], in how many of its frames it
    finds exactly one square: `square_mask`, cleaned of rows and columns with fewer than 2
    mask pixels, must be one blob that fills at least `min_fill` of its bounding box, with sides
    between 1/4 and 3/4 of the frame and an aspect ratio within 1.5."""
    mask = square_mask(video)  # (B, T, H, W)
    size = min(mask.shape[-2:])
    found = []
    for frames in mask:
        n = 0
        for m in frames:
            rows, cols = (m.sum(1) >= 2).nonzero().flatten(), (m.sum(0) >= 2).nonzero().flatten()
            if len(rows) == 0 or len(cols) == 0:
                continue
            h, w = int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1
            fill = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean().item()
            outside = m.sum().item() - fill * h * w
            sides_ok = size / 4 <= min(h, w) and max(h, w) <= 3 * size / 4 and max(h, w) <= 1.5 * min(h, w)
            n += int(sides_ok and fill >= min_fill and outside <= 0.1 * h * w)
        found.append(n)
    return found


# ----------------------------------------------------------------------------- models

def build_models(seed: int = 0):
    """The seeded tiny models: (dit, vae, text encoder, tokenizer), fp32, on the CPU. The caller's
    global RNG is left as it was (the weights come from `seed` alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dit = WanDiT(DIT_CONFIGS["tiny"])
        vae = WanVAE(VAE_CONFIGS["tiny"]).eval().requires_grad_(False)
        encoder = text_encoder.UMT5Encoder(text_encoder.UMT5_CONFIGS["tiny"]).eval().requires_grad_(False)
    return dit, vae, encoder, text_encoder.load_tokenizer(None)


def vae_psnr(vae, videos: torch.Tensor, batch: int = 32) -> float:
    """Reconstruction PSNR in dB of videos in [-1, 1] through encode -> decode, on the [0, 1] scale."""
    with torch.no_grad():
        err = sum(((vae.decode(vae.encode(v)) - v) / 2).pow(2).sum().item() for v in videos.split(batch))
    return 10 * math.log10(1 / (err / videos.numel()))


def pretrain_dit(dit, vae, encoder, tokenizer, cfg: ToyConfig, log=print):
    """Flow matching on the VAE latents of the procedural videos; updates dit in place."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        z = vae.encode(procedural_videos(cfg.num_videos, cfg.frames, cfg.size, g))
        context, lengths = text_encoder.encode_prompts(toy_prompts(cfg.num_videos, g), tokenizer, encoder)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    for step in range(cfg.pretrain_steps):
        idx = torch.randint(cfg.num_videos, (cfg.pretrain_batch,), generator=g)
        x0, noise = z[idx], torch.randn(z[idx].shape, generator=g)
        sigma = sample.shift_sigmas(torch.rand(len(idx), generator=g), cfg.shift)  # the sampler's shift
        s = sigma.view(-1, 1, 1, 1, 1)
        t = (sigma * 1000).long()  # the sampler hands truncated integer timesteps
        loss = (dit((1 - s) * x0 + s * noise, t, context[idx]) - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.pretrain_steps - 1:
            log(f"toy pretrain step {step:4d} | flow-matching loss {loss.item():.4f}")
    return dit


def rollout(dit, context, noise, cfg: ToyConfig) -> torch.Tensor:
    """Full no-grad Euler rollout of the toy sampler -> final latent."""
    sigmas = sample.get_sigmas(cfg.sample_steps, cfg.shift, "euler")
    with torch.no_grad():
        z, _ = sample.denoise(lambda x, t: dit(x, t, context), noise, sigmas, solver="euler")
    return z


def latent_shape(cfg: ToyConfig) -> tuple[int, int, int, int]:
    return vae_lib.latent_shape(cfg.frames, cfg.size, cfg.size)


def bootstrap_lrm(dit, vae, encoder, tokenizer, cfg: ToyConfig, log=print, model=None, noise_aware=False):
    """Ensemble LRM (or the given `model`, e.g. a one-member ensemble or a Dollar LRM) fitted to the
    pixel reward of the generator's own decoded rollouts. noise_aware=True: a timestep-conditioned
    ensemble fitted on the rollouts re-noised at levels of the toy sampler's schedule (0 with
    probability NOISE_AWARE_CLEAN_PROB), the label the clean rollout's reward (train_lrm.py --noise-aware)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    reward_fn = rewards.load_reward(cfg.reward)
    prompts = toy_prompts(cfg.lrm_rollouts, g)
    with torch.no_grad():
        context, lengths = text_encoder.encode_prompts(prompts, tokenizer, encoder)
        z = torch.cat([
            rollout(dit, context[i : i + 64], torch.randn(len(prompts[i : i + 64]), *latent_shape(cfg), generator=g), cfg)
            for i in range(0, len(prompts), 64)
        ])
        target = reward_fn(vae.decode(z), prompts).float()
    model = model or lrm_lib.EnsembleLRM(toy_lrm_config(cfg, noise_aware), n_members=cfg.lrm_members, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lrm_lr)
    grid = sample.get_sigmas(cfg.sample_steps, cfg.shift, "euler")[:-1]
    for step in range(cfg.lrm_steps):
        idx = torch.randint(len(prompts), (cfg.lrm_batch,), generator=g)
        zb, sigma = z[idx], None
        if noise_aware:
            sigma = lrm_lib.draw_sigmas((len(idx),), grid, NOISE_AWARE_CLEAN_PROB, g)
            zb = lrm_lib.noise_latents(zb, sigma, torch.randn(zb.shape, generator=g))
        out = lrm_lib.lrm_update(model, opt, zb, context[idx], lengths[idx], target[idx], generator=g, sigma=sigma)
        if step % 100 == 0 or step == cfg.lrm_steps - 1:
            log(f"toy LRM bootstrap step {step:4d} | huber {out['loss']:.4f} | mse {out['mse']:.4f}")
    return model


def toy_lrm_config(cfg: ToyConfig, noise_aware: bool = False) -> lrm_lib.LRMConfig:
    """The "tiny" LRM with position embeddings sized to the toy latent (timestep-conditioned if noise_aware)."""
    _, t, h, w = latent_shape(cfg)
    return lrm_lib.LRMConfig(**{**asdict(lrm_lib.LRM_CONFIGS["tiny"]), "max_frames": t, "max_height": h, "max_width": w,
                                "timestep_cond": noise_aware})


NOISE_AWARE_CLEAN_PROB = 0.1  # share of clean latents in the noise-aware bootstrap (train_lrm.py's --clean-prob default)


def load_noise_aware_lrm(dit, vae, encoder, tokenizer, cfg: ToyConfig = None, cache_dir=None, log=print):
    """The toy world's noise-aware ensemble LRM (bootstrap_lrm(noise_aware=True)) for
    `train_refl.py --reward-on zt`: built once from the world's models and cached next to the world's
    files as lrm_noise_aware.safetensors."""
    cfg = cfg or ToyConfig()
    path = Path(cache_dir or default_cache_dir()) / cfg.key() / "lrm_noise_aware.safetensors"
    if path.exists():
        try:
            return lrm_lib.load_lrm(path)
        except Exception as err:
            raise ValueError(f"toy cache file {path} is unreadable ({type(err).__name__}: {err}); delete it and rerun") from err
    log(f"toy world: bootstrapping a noise-aware LRM on {cfg.lrm_rollouts} labelled rollouts, cached at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, log, noise_aware=True)
    model.zero_grad(set_to_none=True)
    tmp = path.with_suffix(".tmp")
    lrm_lib.save_lrm(model, tmp)
    os.replace(tmp, path)
    return model


# ----------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("VELR_CACHE", Path(__file__).resolve().parent / ".cache")) / "toy"


def _save_atomic(state: dict, path: Path, metadata: dict):
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_world(cfg: ToyConfig = None, cache_dir=None, log=print):
    """The toy world: (dit pretrained, vae, text encoder, tokenizer, bootstrapped LRM).

    Built once and cached under cache_dir/<settings hash>/ (dit.safetensors, lrm.safetensors);
    later calls load the cache. The VAE and text encoder are rebuilt from the seed (cheap).
    """
    cfg = cfg or ToyConfig()
    root = Path(cache_dir or default_cache_dir()) / cfg.key()
    root.mkdir(parents=True, exist_ok=True)
    dit, vae, encoder, tokenizer = build_models(cfg.seed)
    dit_path, lrm_path = root / "dit.safetensors", root / "lrm.safetensors"

    def unreadable(path, err):  # a cut or stale cache file: say how to recover
        return ValueError(f"toy cache file {path} is unreadable ({type(err).__name__}: {err}); "
                          f"delete the cache folder {root} and rerun to rebuild it")

    if dit_path.exists():
        try:
            dit.load_state_dict(load_file(str(dit_path)), strict=True)
        except Exception as err:
            raise unreadable(dit_path, err) from err
    else:
        log(f"toy world: pretraining the tiny DiT ({cfg.pretrain_steps} flow-matching steps), cached at {dit_path}")
        pretrain_dit(dit, vae, encoder, tokenizer, cfg, log)
        dit.zero_grad(set_to_none=True)  # the pretraining gradients are not the caller's
        _save_atomic(dit.state_dict(), dit_path, {"toy_config": json.dumps(asdict(cfg))})
    if lrm_path.exists():
        try:
            model = lrm_lib.load_lrm(lrm_path)
        except Exception as err:
            raise unreadable(lrm_path, err) from err
    else:
        log(f"toy world: bootstrapping the LRM on {cfg.lrm_rollouts} labelled rollouts, cached at {lrm_path}")
        model = bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, log)
        model.zero_grad(set_to_none=True)
        tmp = lrm_path.with_suffix(".tmp")
        lrm_lib.save_lrm(model, tmp)
        os.replace(tmp, lrm_path)
    return dit, vae, encoder, tokenizer, model
