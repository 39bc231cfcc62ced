"""The offline toy world: what `python train_refl.py` (no checkpoints) and the tests train in.

ReFL needs a generator whose mid-step x0 prediction says something about where its own sampler
ends; a randomly initialised DiT does not, so the offline runs use small worlds of their own
(WORLDS; train_refl.py --toy-world), built from this repo's Wan code at toy sizes:
  - procedural videos: 5 frames of 32x32, a square of one random colour moving in a straight line
    over a background of another; captions name a palette colour UNRELATED to the video, so the
    pretrained generator does not already satisfy the prompt-dependent reward;
  - "watchable" (the README's default): visible, anti-aliased squares; the "tiny" Wan VAE trained
    as an autoencoder on them and the 6-layer "toy-l" DiT pretrained on its latents, shipped in
    assets/ with 2,048 labelled rollouts of that DiT (`python toy.py train-assets`); its LRMs are
    bootstrapped on 3/4 of the rollouts and early-stopped on the held-out 1/4; reward
    `toy:square_color`, from decoded pixels only;
  - "random" (the tests' world): hard-edged squares, the tiny VAE with random weights, the "tiny"
    DiT pretrained at first use, its LRM bootstrapped on 256 rollouts without a held-out split;
    reward `toy:calibrated_color`, calibrated to that decoder;
  - pretraining: the generator with Wan's flow-matching loss (x_sigma = (1 - sigma) x0 + sigma eps,
    target v = eps - x0); an ensemble LRM bootstrapped on its labelled rollouts as VELR pretrains
    one (§4.1). The worlds' sampler: 20 Euler steps, shift 5 (ToyConfig).
Everything built is cached under `cache_dir` (default `<repo>/.cache/toy`, or $VELR_CACHE), keyed
by a hash of the settings, written atomically. Follows no paper of its own.

Left out: real videos and real reward models; the worlds test the machinery, not video quality.
"""

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import lrm as lrm_lib
import rewards
import runs
import sample
import text_encoder
from model_dit import DIT_CONFIGS, DiTConfig, WanDiT
import vae as vae_lib
from vae import VAE_CONFIGS, VAEConfig, WanVAE

TEMPLATES = ("a {} video", "make it {}", "{} everywhere", "a clip in {}")
MIN_CONTRAST = 0.5  # RGB distance (in [0, 1] units) from the background at which the parser's threshold sits (half of it)
SOFTNESS = 0.05  # width of square_color's soft mask around that threshold
MIN_AREA = 0.05  # square area (fraction of the video) below which square_color counts the square as partly missing


@dataclass
class ToyConfig:
    frames: int = 5
    size: int = 32
    num_videos: int = 512  # procedural training set of the generator
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    refine_steps: int = 0  # > 0: a second cosine cycle of pretraining from the first's weights (pretrain_dit)
    refine_lr: float = 3e-4
    sample_steps: int = 20  # Euler, the toy world's sampler
    shift: float = 5.0
    lrm_members: int = 5
    lrm_rollouts: int = 256  # labelled generator samples the LRM is bootstrapped on
    lrm_steps: int = 400
    lrm_batch: int = 32
    lrm_lr: float = 1e-3
    lrm_holdout: float = 0.0  # > 0: this share of the rollouts is held out for early stopping (bootstrap_lrm)
    lrm_eval_every: int = 100  # bootstrap steps between held-out reads
    lrm_patience: int = 5  # held-out reads without a new best before the bootstrap stops (the curve is noisy: 500 steps)
    reward: str = "toy:calibrated_color"
    seed: int = 0
    # The watchable world (TRAINED below): a trained VAE, a larger DiT, visible squares.
    vae_steps: int = 0  # 0: the random tiny VAE; > 0: trained for this many steps (train_vae)
    vae_videos: int = 4096  # procedural training set of the VAE
    vae_batch: int = 32
    vae_lr: float = 3e-3
    dit: str = "tiny"  # TOY_DITS key
    min_contrast: float = 0.0  # least RGB distance ([0, 1] units) between square and background
    edge: float = 0.0  # 0: hard square edges; > 0: anti-aliased over this many pixels

    def key(self) -> str:
        fields = _one_cycle_as_before(asdict(self))
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _one_cycle_as_before(settings: dict) -> dict:
    """settings without refine_* when there is no second pretraining cycle, so that a one-cycle world
    key or recipe reads as it did before those fields existed."""
    if not settings.get("refine_steps", 1):
        del settings["refine_steps"], settings["refine_lr"]
    return settings


# The watchable world: the "tiny" VAE trained on anti-aliased, always-visible squares, the "toy-l" DiT
# pretrained on its latents in two cosine cycles (both shipped in assets/ once trained:
# `python toy.py train-assets`),
# and a reward on the square's colour. WORLDS names the worlds `train_refl.py --toy-world` offers.
WATCHABLE = ToyConfig(num_videos=4096, pretrain_steps=6000, pretrain_batch=64, refine_steps=6000, refine_lr=3e-4,
                      vae_steps=14000, vae_batch=16, dit="toy-l",
                      min_contrast=MIN_CONTRAST, edge=1.0, reward="toy:square_color",
                      lrm_rollouts=2048, lrm_holdout=0.25, lrm_steps=5000)
WORLDS = {"random": ToyConfig(), "watchable": WATCHABLE}
# The toy world a script uses unless told: $VELR_TOY_WORLD, else this one (the README's main command).
# The tests and bench.py set the variable, so their worlds, subprocesses included, stay fixed.
DEFAULT_WORLD = "watchable"


def default_world() -> str:
    return os.environ.get("VELR_TOY_WORLD") or DEFAULT_WORLD


# ----------------------------------------------------------------------------- data

def procedural_videos(n: int, frames: int, size: int, generator: torch.Generator,
                      min_contrast: float = 0.0, edge: float = 0.0) -> torch.Tensor:
    """n videos (n, 3, frames, size, size) in [-1, 1]: random background, a moving square of another
    colour. The square's colour is redrawn until it is at least `min_contrast` (RGB distance, [0, 1]
    units) from the background; edge > 0 draws its edges anti-aliased over `edge` pixels (pixel
    coverage of a linear ramp), edge 0 hard (the random-VAE world's videos, unchanged)."""
    bg = torch.rand(n, 3, generator=generator) * 2 - 1
    fg = torch.rand(n, 3, generator=generator) * 2 - 1
    for _ in range(64 if min_contrast > 0 else 0):
        close = (fg - bg).norm(dim=1) < 2 * min_contrast  # [-1, 1] units
        if not close.any():
            break
        fg = torch.where(close[:, None], torch.rand(n, 3, generator=generator) * 2 - 1, fg)
    side = torch.randint(size // 4, size // 2 + 1, (n,), generator=generator)
    start = torch.rand(n, 2, generator=generator) * (size - side[:, None])  # top-left corner (y, x)
    velocity = (torch.rand(n, 2, generator=generator) * 2 - 1) * size / (2 * frames)
    t = torch.arange(frames).float()
    pos = (start[:, None] + velocity[:, None] * t[None, :, None]).clamp(min=0)  # (n, T, 2)
    pos = torch.minimum(pos, (size - side)[:, None, None].float())
    grid = torch.arange(size).float()
    if edge > 0:  # coverage of pixel centres by a square whose edges ramp linearly over `edge` pixels
        centre, s = grid + 0.5, side[:, None, None, None].float()
        inside_y = ((centre - pos[..., :1]) / edge + 0.5).clamp(0, 1) * ((pos[..., :1] + s[..., 0] - centre) / edge + 0.5).clamp(0, 1)
        inside_x = ((centre - pos[..., 1:]) / edge + 0.5).clamp(0, 1) * ((pos[..., 1:] + s[..., 0] - centre) / edge + 0.5).clamp(0, 1)
        mask = (inside_y[..., :, None] * inside_x[..., None, :])[:, None]
    else:
        inside_y = (grid >= pos[..., :1]) & (grid < pos[..., :1] + side[:, None, None])  # (n, T, H)
        inside_x = (grid >= pos[..., 1:]) & (grid < pos[..., 1:] + side[:, None, None])  # (n, T, W)
        mask = (inside_y[..., :, None] & inside_x[..., None, :]).float()[:, None]  # (n, 1, T, H, W)
    return bg[:, :, None, None, None] * (1 - mask) + fg[:, :, None, None, None] * mask


def world_videos(n: int, cfg: ToyConfig, generator: torch.Generator) -> torch.Tensor:
    """The procedural videos of the world cfg describes."""
    return procedural_videos(n, cfg.frames, cfg.size, generator, cfg.min_contrast, cfg.edge)


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
    the toy decoder's own colour scale. A random VAE decodes every latent to nearly the same grey,
    so the plain colour reward barely moves and gives ReFL nothing to climb. Here the video's mean
    colour is first standardised per channel by `decoder_colour_stats` and squashed, c = tanh(z / 2)
    in (-1, 1), then compared with the named colour mapped to [-1, 1]: 1 - |c - (2 rgb - 1)|^2 / 12,
    in [0, 1].
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


def square_mask(video: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """Where the square is, (B, T, H, W): pixels whose colour is more than MIN_CONTRAST / 2 (RGB
    distance, [0, 1] units) from their frame's background colour; 0/1, or with soft=True a sigmoid
    of width SOFTNESS around that threshold (differentiable in the pixels)."""
    x = rewards.unit_range(video)
    d = (x - _background(x)).pow(2).sum(1).add(1e-12).sqrt()  # (B, T, H, W)
    if not soft:
        return (d > MIN_CONTRAST / 2).float()
    return torch.sigmoid((d - MIN_CONTRAST / 2) / SOFTNESS)


def square_color(video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The watchable world's pixel reward (`--reward toy:square_color`): does the square have the
    colour the caption names? From decoded pixels alone: the square is segmented against the
    per-frame background (`square_mask`, soft), its mean colour c (RGB in [0, 1]) compared with the
    named one:

        reward = presence * (1 - |c - named|^2 / 3),  presence = min(1, square area / MIN_AREA)

    in [0, 1], 1 = a visible square of exactly the named colour. `presence` pays nothing for
    erasing the square or for painting the whole frame (the background is the frame's median colour,
    so a frame of one colour has no square). Differentiable, as `--mode pixel` needs. A caption
    without a palette word gets rewards.NEUTRAL."""
    x = rewards.unit_range(video)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {x.shape[0]} videos")
    m = square_mask(video, soft=True)[:, None]  # (B, 1, T, H, W)
    area = m.sum((1, 2, 3, 4))
    c = (m * x).sum((2, 3, 4)) / area.clamp_min(1e-3)[:, None]  # (B, 3) mean colour of the square
    colours = [rewards.prompt_color(p) for p in prompts]
    named = torch.tensor([k is not None for k in colours], device=x.device)
    target = x.new_tensor([k or (0.5, 0.5, 0.5) for k in colours])
    presence = (area / (MIN_AREA * x[0, 0].numel())).clamp(max=1)
    match = presence * (1 - (c - target).pow(2).sum(1) / 3)
    return torch.where(named, match, torch.full_like(match, rewards.NEUTRAL))


def parse_squares(video: torch.Tensor, min_fill: float = 0.8) -> list[int]:
    """The toy scene parser: for each video (B, 3, T, H, W) in [-1, 1], in how many of its frames it
    finds exactly one square: `square_mask`, cleaned of rows and columns with fewer than 2
    mask pixels, must be one blob that fills at least `min_fill` of its bounding box, with sides
    between 1/4 and 3/4 of the frame and an aspect ratio within 1.5."""
    mask = square_mask(video)  # (B, T, H, W) 0/1
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

# The toy DiTs: "tiny" (the random-VAE world's: 8 tokens for the 16x2x4x4 latent) and "toy" (the
# watchable world's: patch 1x1x1, so 32 tokens, one per latent pixel; dim 128, 4 layers).
TOY_DITS = {"tiny": DIT_CONFIGS["tiny"],
            # text_len 32, not Wan's 512: the toy captions are at most 18 tokens, and 512 padded context
            # rows would outnumber the 32 video tokens many times over
            "toy": DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=64, patch_size=(1, 1, 1),
                             text_len=32),
            # the watchable world's generator: "toy" 1.5x wider and 1.5x deeper, whose samples show the
            # square in every frame far more often than "toy"'s
            "toy-l": DiTConfig(dim=192, ffn_dim=768, num_heads=4, num_layers=6, text_dim=64, patch_size=(1, 1, 1),
                               text_len=32)}


def build_models(seed: int = 0, dit: str = "tiny"):
    """The seeded tiny models: (dit, vae, text encoder, tokenizer), fp32, on the CPU, the VAE with
    random weights. The caller's global RNG is left as it was (the weights come from `seed` alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WanDiT(TOY_DITS[dit])
        vae = WanVAE(VAE_CONFIGS["tiny"]).eval().requires_grad_(False)
        encoder = text_encoder.UMT5Encoder(text_encoder.UMT5_CONFIGS["tiny"]).eval().requires_grad_(False)
    return model, vae, encoder, text_encoder.load_tokenizer(None)


def vae_psnr(vae, videos: torch.Tensor, batch: int = 32) -> float:
    """Reconstruction PSNR in dB of videos in [-1, 1] through encode -> decode, on the [0, 1] scale."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        err = sum(((vae.decode(vae.encode(v.to(device))).cpu() - v) / 2).pow(2).sum().item() for v in videos.split(batch))
    return 10 * math.log10(1 / (err / videos.numel()))


def toy_vae_config(mean=None, std=None) -> VAEConfig:
    """The "tiny" Wan VAE preset with the toy latents' own normalisation (identity until measured)."""
    z = VAE_CONFIGS["tiny"].z_dim
    return replace(VAE_CONFIGS["tiny"], latents_mean=tuple(mean or [0.0] * z), latents_std=tuple(std or [1.0] * z))


class TrainingCheckpoint:
    """Resumable training of a toy model: every `every` steps the model, optimiser, scheduler, step
    and data generator go to `path` (tmp + fsync + rename), with the recipe they belong to; `resume`
    restores them when the recipe is the same (else starts over) and returns the step to go on from.
    A run resumed this way on the CPU equals the uninterrupted one bit for bit. path None: off."""

    def __init__(self, path, recipe_json: str, every: int = 500, log=print):
        self.path, self.recipe, self.every, self.log = Path(path) if path else None, recipe_json, every, log

    def resume(self, model, opt, sched, g) -> int:
        if self.path is None or not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("recipe") != self.recipe:
            self.log(f"{self.path} holds another recipe's training; starting over")
            return 0
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        g.set_state(state["rng"])
        self.log(f"resumed {self.path} at step {state['step']}")
        return state["step"]

    def save(self, done: int, model, opt, sched, g):
        """After `done` steps: written on every `every`-th."""
        if self.path is None or done % self.every:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": done, "recipe": self.recipe, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict() if sched is not None else None, "rng": g.get_state()}
        runs.save_torch(self.path, state)


def train_vae(cfg: ToyConfig, device="cpu", log=print, ckpt=None, save_every=500) -> WanVAE:
    """The "tiny" Wan VAE (vae.py, the real model's code) trained as a plain autoencoder, MSE of
    decode(encode(x)) through the posterior mean, on cfg.vae_videos procedural videos (AdamW,
    one-cycle learning rate); then its per-channel latent mean/std measured on them, as Wan's VAE
    comes with its own, and returned in a VAE that normalises with them (eval, no grad, on the CPU).
    Deterministic per seed on one device.
    ckpt: a file to checkpoint the training to every save_every steps and resume from."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    data = world_videos(cfg.vae_videos, cfg, g)
    with torch.random.fork_rng():  # the weights come from cfg.seed alone
        torch.manual_seed(cfg.seed)
        vae = WanVAE(toy_vae_config()).to(device).train()
    for m in vae.modules():  # channels-last convs: faster steps on the CPU (same values up to rounding)
        if isinstance(m, torch.nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    saver = TrainingCheckpoint(ckpt, recipe(cfg, VAE_RECIPE), save_every, log)
    for step in range(saver.resume(vae, opt, sched, g), cfg.vae_steps):
        x = data[torch.randint(len(data), (cfg.vae_batch,), generator=g)].to(device)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        loss = (vae.decode(vae.encode(x)) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == cfg.vae_steps - 1:
            log(f"toy VAE step {step:5d} | mse {loss.item():.5f}")
        saver.save(step + 1, vae, opt, sched, g)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mu = torch.cat([vae.encode(v.to(device)).cpu() for v in data.split(64)])  # raw latents (identity normalisation)
    trained = WanVAE(toy_vae_config(mu.mean((0, 2, 3, 4)).tolist(), mu.std((0, 2, 3, 4)).tolist()))
    trained.load_state_dict({k: v.cpu() for k, v in vae.state_dict().items()})
    return trained.eval().requires_grad_(False)


def pretrain_dit(dit, vae, encoder, tokenizer, cfg: ToyConfig, log=print, device="cpu", ckpt=None, save_every=500,
                 stage1=None):
    """Flow matching on the VAE latents of the procedural videos; updates dit in place (on `device`,
    returned there). The watchable world (cfg.vae_steps > 0) decays the learning rate to 0 (cosine).
    cfg.refine_steps > 0 adds a second cosine cycle (a warm restart at cfg.refine_lr, fresh AdamW and
    its own data seed) that starts from the first cycle's weights rounded to fp16, as shipped, so it
    can go on from a shipped first-cycle file: `stage1`, that file's state dict, skips the first cycle.
    ckpt: a file to checkpoint the training to every save_every steps and resume from (the second
    cycle's goes beside it, "_refine" added to its name)."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        videos = world_videos(cfg.num_videos, cfg, g)
        device_vae = next(vae.parameters()).device
        z = torch.cat([vae.encode(v.to(device_vae)).cpu() for v in videos.split(512)])  # the default world: one call
        context, lengths = text_encoder.encode_prompts(toy_prompts(cfg.num_videos, g), tokenizer, encoder, dit.cfg.text_len)
    dit.to(device)
    first = replace(cfg, refine_steps=0)
    if stage1 is None:
        opt = torch.optim.AdamW(dit.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps) if cfg.vae_steps else None
        saver = TrainingCheckpoint(ckpt, recipe(first, DIT_RECIPE), save_every, log)
        _flow_matching(dit, z, context, cfg, cfg.pretrain_steps, opt, sched, g, saver, log, device, "pretrain")
    else:
        dit.load_state_dict(stage1)
    if cfg.refine_steps:
        with torch.no_grad():
            for p in dit.parameters():
                p.copy_(p.half().float())
        g = torch.Generator().manual_seed(cfg.seed + 7)
        opt = torch.optim.AdamW(dit.parameters(), lr=cfg.refine_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.refine_steps)
        path = Path(ckpt).with_name(Path(ckpt).stem + "_refine" + Path(ckpt).suffix) if ckpt else None
        saver = TrainingCheckpoint(path, recipe(cfg, DIT_RECIPE), save_every, log)
        _flow_matching(dit, z, context, cfg, cfg.refine_steps, opt, sched, g, saver, log, device, "refine")
    return dit


def _flow_matching(dit, z, context, cfg: ToyConfig, steps, opt, sched, g, saver, log, device, tag):
    """One cosine cycle (or constant rate, sched None) of Wan's flow-matching loss on latents z."""
    for step in range(saver.resume(dit, opt, sched, g), steps):
        idx = torch.randint(len(z), (cfg.pretrain_batch,), generator=g)
        x0, noise = z[idx], torch.randn(z[idx].shape, generator=g)
        sigma = sample.shift_sigmas(torch.rand(len(idx), generator=g), cfg.shift)  # the sampler's shift
        s = sigma.view(-1, 1, 1, 1, 1)
        t = (sigma * 1000).long()  # the sampler hands truncated integer timesteps
        x, target = ((1 - s) * x0 + s * noise).to(device), (noise - x0).to(device)
        loss = (dit(x, t.to(device), context[idx].to(device)) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"toy {tag} step {step:4d} | flow-matching loss {loss.item():.4f}")
        saver.save(step + 1, dit, opt, sched, g)


def rollout(dit, context, noise, cfg: ToyConfig) -> torch.Tensor:
    """Full no-grad Euler rollout of the toy sampler -> final latent."""
    sigmas = sample.get_sigmas(cfg.sample_steps, cfg.shift, "euler")
    with torch.no_grad():
        z, _ = sample.denoise(lambda x, t: dit(x, t, context), noise, sigmas, solver="euler")
    return z


def latent_shape(cfg: ToyConfig) -> tuple[int, int, int, int]:
    return vae_lib.latent_shape(cfg.frames, cfg.size, cfg.size)


def bootstrap_data(dit, vae, encoder, tokenizer, cfg: ToyConfig) -> dict:
    """cfg.lrm_rollouts labelled samples of the generator: {"z" final latents, "context", "lengths",
    "target" the pixel reward of the decoded latent, "prompts"}, seeded by cfg.seed + 1."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    reward_fn = rewards.load_reward(cfg.reward)
    prompts = toy_prompts(cfg.lrm_rollouts, g)
    with torch.no_grad():
        context, lengths = text_encoder.encode_prompts(prompts, tokenizer, encoder, dit.cfg.text_len)
        z = torch.cat([
            rollout(dit, context[i : i + 64], torch.randn(len(prompts[i : i + 64]), *latent_shape(cfg), generator=g), cfg)
            for i in range(0, len(prompts), 64)
        ])
        target = torch.cat([reward_fn(vae.decode(z[i : i + 256]), prompts[i : i + 256]).float() for i in range(0, len(z), 256)])
    return {"z": z, "context": context, "lengths": lengths, "target": target, "prompts": prompts, "generator": g}


ROLLOUT_RECIPE_EXTRA = ("lrm_rollouts", "sample_steps", "reward")


def save_rollouts(data: dict, path: Path, cfg: ToyConfig):
    """bootstrap_data's latents and rewards (fp32) with their prompts and recipe in the metadata."""
    _save_atomic({"z": data["z"], "target": data["target"]}, Path(path),
                 {"prompts": json.dumps(data["prompts"]), "recipe": recipe(cfg, DIT_RECIPE + ROLLOUT_RECIPE_EXTRA)})


def read_rollouts(path: Path, cfg: ToyConfig, encoder, tokenizer, text_len: int):
    """The rollouts file at path as bootstrap_data's dict (contexts re-encoded from the prompts), or
    None when it was made with another recipe than cfg's."""
    found = _read_trained(path, cfg, DIT_RECIPE + ROLLOUT_RECIPE_EXTRA)
    if found is None:
        return None
    state, meta = found
    prompts = json.loads(meta["prompts"])
    if len(prompts) != len(state["z"]) or len(state["target"]) != len(state["z"]):
        raise ValueError(f"{path}: {len(state['z'])} latents, {len(state['target'])} rewards and {len(prompts)} prompts")
    with torch.no_grad():
        context, lengths = text_encoder.encode_prompts(prompts, tokenizer, encoder, text_len)
    return {"z": state["z"], "target": state["target"], "prompts": prompts, "context": context, "lengths": lengths}


def world_rollouts(dit, vae, encoder, tokenizer, cfg: ToyConfig, cache_dir=None, log=print) -> dict:
    """The world's labelled rollouts (bootstrap_data): from its cache folder, else from assets/
    (train-assets ships the watchable world's), else made here and cached."""
    path = Path(cache_dir or default_cache_dir()) / cfg.key() / "rollouts.safetensors"
    for candidate in (path, ASSETS / "toy_rollouts.safetensors"):
        if candidate.exists():
            try:
                data = read_rollouts(candidate, cfg, encoder, tokenizer, dit.cfg.text_len)
            except Exception as err:
                raise ValueError(f"{candidate} is unreadable ({type(err).__name__}: {err}); delete it (cache) or restore "
                                 f"it (git checkout -- assets/) and rerun") from err
            if data is not None:
                return data
    log(f"toy world: sampling {cfg.lrm_rollouts} labelled rollouts of the generator, cached at {path}")
    data = bootstrap_data(dit, vae, encoder, tokenizer, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rollouts(data, path, cfg)
    return data


def shared_rollouts(dit, vae, encoder, tokenizer, cfg: ToyConfig, cache_dir=None, log=print):
    """The rollouts every LRM of a world with a held-out split is bootstrapped on (world_rollouts), so
    they all see the same data and split; None for a world without one (each bootstrap samples its own)."""
    return world_rollouts(dit, vae, encoder, tokenizer, cfg, cache_dir, log) if cfg.lrm_holdout > 0 else None


def heldout_split(n: int, cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of the bootstrap rollouts: a seeded cfg.lrm_holdout share held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7))
    k = round(n * cfg.lrm_holdout)
    return perm[k:].sort().values, perm[:k].sort().values


@torch.no_grad()
def lrm_metrics(model, data: dict, idx: torch.Tensor, sigma: float = 0.0, batch: int = 256) -> dict:
    """The paper's Table 3 metrics of the ensemble mean on the samples idx of bootstrap_data: MSE and
    Pearson correlation against the true reward (each member's too), and the pair accuracy within a prompt (every two
    samples of one prompt with different rewards: is the higher-scored one the higher-rewarded?).
    sigma > 0: the latents are re-noised at sigma (seeded noise), as a process reward model sees x_t."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(99)
    scores = []
    for i in range(0, len(idx), batch):
        j = idx[i : i + batch]
        z = data["z"][j]
        sig = None
        if sigma > 0:
            sig = torch.full((len(j),), float(sigma))
            z = lrm_lib.noise_latents(z, sig, torch.randn(z.shape, generator=g))
        scores.append(model(z, data["context"][j], data["lengths"][j], sigma=sig).float())
    model.train(was_training)
    members, t = torch.cat(scores, 1).double(), data["target"][idx].double()
    s = members.mean(0)
    pcc = torch.corrcoef(torch.stack([s, t]))[0, 1].item()
    member_pcc = [torch.corrcoef(torch.stack([m, t]))[0, 1].item() for m in members]
    a, b, p = lrm_lib.make_pairs([data["prompts"][k] for k in idx.tolist()], t, 0.0, torch.Generator().manual_seed(0))
    pair_acc = ((s[a] > s[b]).double() == p.double()).double().mean().item() if len(a) else float("nan")
    return {"mse": (s - t).pow(2).mean().item(), "pcc": pcc, "pair_acc": pair_acc, "samples": len(idx), "pairs": len(a),
            "member_pcc": member_pcc, "member_mse": (members - t).pow(2).mean(1).tolist()}


def bootstrap_lrm(dit, vae, encoder, tokenizer, cfg: ToyConfig, log=print, model=None, noise_aware=False, data=None):
    """Ensemble LRM (or the given `model`, e.g. a one-member ensemble, a Dollar LRM or a DiT-trunk
    LRM) fitted to the pixel reward of the generator's own decoded rollouts (bootstrap_data, or
    `data` from it). noise_aware=True: fitted on the rollouts re-noised at levels of the toy
    sampler's schedule (0 with probability NOISE_AWARE_CLEAN_PROB), the label the clean rollout's
    reward (train_lrm.py --noise-aware). cfg.lrm_holdout > 0: that share of the rollouts is held
    out, the held-out MSE (at fixed noise draws when noise-aware) is read every cfg.lrm_eval_every
    steps, and training stops after cfg.lrm_patience reads without a new best, keeping the best
    weights; `model.bootstrap_log` then records the curve and the stopping step."""
    data = data or bootstrap_data(dit, vae, encoder, tokenizer, cfg)
    g = data.get("generator") or torch.Generator().manual_seed(cfg.seed + 3)  # read from a file: a fresh seeded one
    z, context, lengths, target = data["z"], data["context"], data["lengths"], data["target"]
    model = model or lrm_lib.EnsembleLRM(toy_lrm_config(cfg, noise_aware), n_members=cfg.lrm_members, seed=cfg.seed)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lrm_lr)
    grid = sample.get_sigmas(cfg.sample_steps, cfg.shift, "euler")[:-1]
    train_idx, test_idx = heldout_split(len(z), cfg) if cfg.lrm_holdout > 0 else (torch.arange(len(z)), None)
    if test_idx is not None:  # fixed held-out inputs: the noise levels and noise of a noise-aware read are drawn once
        hg = torch.Generator().manual_seed(cfg.seed + 8)
        test_sigma = lrm_lib.draw_sigmas((len(test_idx),), grid, NOISE_AWARE_CLEAN_PROB, hg) if noise_aware else None
        test_z = z[test_idx] if test_sigma is None else lrm_lib.noise_latents(z[test_idx], test_sigma, torch.randn(z[test_idx].shape, generator=hg))
    best, curve, stale = (float("inf"), 0, None), [], 0

    def heldout_mse():
        model.eval()
        with torch.no_grad():
            s = torch.cat([model(test_z[i : i + 256], context[test_idx[i : i + 256]], lengths[test_idx[i : i + 256]],
                                 sigma=None if test_sigma is None else test_sigma[i : i + 256]).float().mean(0)
                           for i in range(0, len(test_idx), 256)])
        model.train()
        return (s - target[test_idx]).pow(2).mean().item()

    for step in range(cfg.lrm_steps):
        idx = train_idx[torch.randint(len(train_idx), (cfg.lrm_batch,), generator=g)]
        zb, sigma = z[idx], None
        if noise_aware:
            sigma = lrm_lib.draw_sigmas((len(idx),), grid, NOISE_AWARE_CLEAN_PROB, g)
            zb = lrm_lib.noise_latents(zb, sigma, torch.randn(zb.shape, generator=g))
        out = lrm_lib.lrm_update(model, opt, zb, context[idx], lengths[idx], target[idx], generator=g, sigma=sigma)
        if step % 100 == 0 or step == cfg.lrm_steps - 1:
            log(f"toy LRM bootstrap step {step:4d} | huber {out['loss']:.4f} | mse {out['mse']:.4f}")
        if test_idx is not None and ((step + 1) % cfg.lrm_eval_every == 0 or step == cfg.lrm_steps - 1):
            mse = heldout_mse()
            curve.append((step + 1, mse))
            if mse < best[0]:
                best, stale = (mse, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()}), 0
            else:
                stale += 1
            if stale >= cfg.lrm_patience:
                log(f"toy LRM bootstrap: held-out MSE has not improved for {stale} reads; stopping at step {step + 1}")
                break
    if test_idx is not None:
        model.load_state_dict(best[2])
        model.bootstrap_log = {"heldout_mse_curve": curve, "best_step": best[1], "best_heldout_mse": best[0],
                               "train": len(train_idx), "heldout": len(test_idx)}
        log(f"toy LRM bootstrap: kept step {best[1]}, held-out MSE {best[0]:.4f} ({len(test_idx)} held-out rollouts)")
    return model


def toy_lrm_config(cfg: ToyConfig, noise_aware: bool = False) -> lrm_lib.LRMConfig:
    """The "tiny" LRM with position embeddings sized to the toy latent (timestep-conditioned if noise_aware)."""
    _, t, h, w = latent_shape(cfg)
    return lrm_lib.LRMConfig(**{**asdict(lrm_lib.LRM_CONFIGS["tiny"]), "max_frames": t, "max_height": h, "max_width": w,
                                "timestep_cond": noise_aware})


NOISE_AWARE_CLEAN_PROB = 0.1  # share of clean latents in the noise-aware bootstrap (train_lrm.py's --clean-prob default)


def dit_trunk_lrm(dit, cfg: ToyConfig):
    """PRFL's reward model in the toy world, untrained: the generator's blocks (all of them, up to
    PRFL's 8) frozen under cfg.lrm_members noise-aware heads."""
    import lrm_dit

    return lrm_dit.dit_reward_model_from(dit, None, cfg.lrm_members, cfg.seed, noise_aware=True, mlp_dims=(64, 32))


def load_noise_aware_lrm(dit, vae, encoder, tokenizer, cfg: ToyConfig = None, cache_dir=None, log=print,
                         dit_trunk: bool = False):
    """The toy world's noise-aware LRM (bootstrap_lrm(noise_aware=True)) for `train_refl.py
    --reward-on zt`: its ensemble, or with dit_trunk the DiT-trunk LRM (dit_trunk_lrm; --toy-lrm dit).
    Built once from the world's models and cached next to the world's files as
    lrm_noise_aware.safetensors / lrm_dit_trunk.safetensors."""
    cfg = cfg or ToyConfig()
    name = "lrm_dit_trunk" if dit_trunk else "lrm_noise_aware"
    path = Path(cache_dir or default_cache_dir()) / cfg.key() / f"{name}.safetensors"
    if path.exists():
        try:
            return lrm_lib.load_lrm(path)
        except Exception as err:
            raise ValueError(f"toy cache file {path} is unreadable ({type(err).__name__}: {err}); delete it and rerun") from err
    what = "the DiT-trunk LRM" if dit_trunk else "a noise-aware LRM"
    log(f"toy world: bootstrapping {what} on {cfg.lrm_rollouts} labelled rollouts, cached at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, log, noise_aware=True,
                          model=dit_trunk_lrm(dit, cfg) if dit_trunk else None,
                          data=shared_rollouts(dit, vae, encoder, tokenizer, cfg, cache_dir, log))
    model.zero_grad(set_to_none=True)
    lrm_lib.save_lrm(model, path)  # atomic
    return model


# ----------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("VELR_CACHE", Path(__file__).resolve().parent / ".cache")) / "toy"


def _save_atomic(state: dict, path: Path, metadata: dict):
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    runs.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


ASSETS = Path(__file__).resolve().parent / "assets"  # shipped weights of the watchable world (train-assets)
VAE_RECIPE = ("frames", "size", "vae_videos", "vae_steps", "vae_batch", "vae_lr", "min_contrast", "edge", "seed")
DIT_RECIPE = VAE_RECIPE + ("num_videos", "pretrain_steps", "pretrain_batch", "pretrain_lr", "shift", "dit",
                           "refine_steps", "refine_lr")


def recipe(cfg: ToyConfig, fields) -> str:
    """The settings a trained model depends on, as the JSON stored with its weights (a DiT's with
    its architecture, text_len included, which the weights' shapes do not show)."""
    settings = _one_cycle_as_before({k: getattr(cfg, k) for k in fields})
    if "dit" in fields:
        # the architecture; fields left None are parts not built (no image cross-attention), left out
        # so that a DiTConfig gaining such an optional part keeps every shipped recipe
        settings["dit_config"] = {k: v for k, v in asdict(TOY_DITS[cfg.dit]).items() if v is not None}
    return json.dumps(settings, sort_keys=True)


def save_toy_vae(vae: WanVAE, path: Path, cfg: ToyConfig, dtype=torch.float32):
    """A trained toy VAE as safetensors with its latent normalisation and its recipe in the metadata."""
    meta = {"latents_mean": json.dumps(list(vae.cfg.latents_mean)), "latents_std": json.dumps(list(vae.cfg.latents_std)),
            "recipe": recipe(cfg, VAE_RECIPE)}
    _save_atomic({k: v.to(dtype) for k, v in vae.state_dict().items()}, Path(path), meta)


def save_toy_dit(dit: WanDiT, path: Path, cfg: ToyConfig, dtype=torch.float32):
    _save_atomic({k: v.cpu().to(dtype) for k, v in dit.state_dict().items()}, Path(path), {"recipe": recipe(cfg, DIT_RECIPE)})


def _load_finite(path: Path) -> dict:
    """A safetensors file of the toy world, refused (naming the first tensor) when it holds NaN or inf."""
    state = load_file(str(path))
    bad = runs.nonfinite_tensors(state)
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]} holds NaN or inf")
    return state


def _read_trained(path: Path, cfg: ToyConfig, fields):
    """(tensors as fp32, metadata) of a file saved by save_toy_vae / save_toy_dit, or None when it was
    trained with another recipe than cfg's."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("recipe") != recipe(cfg, fields):
        return None
    return {k: v.float() for k, v in _load_finite(path).items()}, meta


def read_toy_vae(path: Path, cfg: ToyConfig):
    """The trained toy VAE at path, or None when its recipe is not cfg's."""
    found = _read_trained(path, cfg, VAE_RECIPE)
    if found is None:
        return None
    state, meta = found
    vae = WanVAE(toy_vae_config(json.loads(meta["latents_mean"]), json.loads(meta["latents_std"])))
    vae.load_state_dict(state, strict=True)
    return vae.eval().requires_grad_(False)


def recipe_difference(path: Path, cfg: ToyConfig, fields) -> list[str]:
    """The recipe fields (architecture included) in which the file's training differs from cfg's,
    as "field file-value -> cfg-value"; [] when they agree."""
    try:
        with safe_open(str(path), "pt") as f:
            stored = json.loads((f.metadata() or {}).get("recipe") or "{}")
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable toy asset (truncated or corrupt?): {err}; restore it "
                         f"(git checkout -- {path.name}) or retrain it with `python toy.py train-assets`") from None
    wanted = json.loads(recipe(cfg, fields))
    return [f"{k} {stored.get(k)!r} -> {wanted[k]!r}" for k in sorted(wanted) if stored.get(k) != wanted[k]]


def untrained_parts(cfg: ToyConfig, cache_dir=None) -> list[str]:
    """The trained models of world cfg (VAE, DiT) that load_world would have to train: neither in
    the cache nor shipped in assets/ with cfg's recipe. [] for the random-VAE world, whose small DiT
    is cheap to pretrain."""
    if not cfg.vae_steps:
        return []
    root = Path(cache_dir or default_cache_dir()) / cfg.key()
    return [name for name, fields in (("toy_vae.safetensors", VAE_RECIPE), ("toy_dit.safetensors", DIT_RECIPE))
            if not (root / name.removeprefix("toy_")).exists()
            and (not (ASSETS / name).exists() or recipe_difference(ASSETS / name, cfg, fields))]


def check_trained(cfg: ToyConfig, cache_dir=None):
    """Refuse a world whose trained VAE or DiT would have to be trained first (hours on a CPU): a
    shipped file of another recipe is named with the fields that differ."""
    missing = untrained_parts(cfg, cache_dir)
    for name in missing:
        if (ASSETS / name).exists():
            diff = recipe_difference(ASSETS / name, cfg, VAE_RECIPE if "vae" in name else DIT_RECIPE)
            raise ValueError(f"{ASSETS / name} was trained with another recipe than this toy world's: {'; '.join(diff)}. "
                             f"Restore the shipped file (git checkout -- assets/), or train this world's with "
                             f"`python toy.py train-assets` (hours on 2 CPU cores)")
    if missing:
        raise ValueError(f"this toy world needs its trained {' and '.join(missing)} in assets/, which this checkout "
                         f"does not have: train them with `python toy.py train-assets [--device cuda]` (minutes on a "
                         f"GPU, ~1.7 h on 2 CPU cores), or use the random world (--toy-world random)")


def load_world(cfg: ToyConfig = None, cache_dir=None, log=print, train=False):
    """The toy world: (dit pretrained, vae, text encoder, tokenizer, bootstrapped LRM).

    Built once and cached under cache_dir/<settings hash>/ (vae / dit / lrm .safetensors); later
    calls load the cache. The random VAE and the text encoder are rebuilt from the seed (cheap). A
    trained VAE (cfg.vae_steps > 0) and the DiT pretrained on it come from the repository's assets/
    (`python toy.py train-assets`). When they are missing, or shipped with another recipe, the world
    is refused (naming the fields) unless `train`: then they are trained here, and the console is
    told whatever `log` is (hours on a CPU).
    """
    cfg = cfg or ToyConfig()
    if not train:
        check_trained(cfg, cache_dir)
    root = Path(cache_dir or default_cache_dir()) / cfg.key()
    root.mkdir(parents=True, exist_ok=True)
    dit, vae, encoder, tokenizer = build_models(cfg.seed, cfg.dit)
    vae_path, dit_path, lrm_path = root / "vae.safetensors", root / "dit.safetensors", root / "lrm.safetensors"

    def unreadable(path, err):  # a cut or stale cache file: say how to recover
        if path.parent != root:
            return ValueError(f"shipped toy asset {path} is unreadable ({type(err).__name__}: {err}); restore it "
                              f"(git checkout -- {path.name}) or retrain it with `python toy.py train-assets`")
        return ValueError(f"toy cache file {path} is unreadable ({type(err).__name__}: {err}); "
                          f"delete the cache folder {root} and rerun to rebuild it")

    def dit_state(path):
        if path == dit_path:
            return _load_finite(path)
        found = _read_trained(path, cfg, DIT_RECIPE)
        return found and found[0]

    def first_readable(paths, read):
        for path in paths:
            if path.exists():
                try:
                    found = read(path)
                except Exception as err:
                    raise unreadable(path, err) from err
                if found is not None:
                    return found
        return None

    if cfg.vae_steps:
        vae = first_readable((vae_path, ASSETS / "toy_vae.safetensors"), lambda path: read_toy_vae(path, cfg))
        if vae is None:
            print(f"toy world: training the tiny VAE ({cfg.vae_steps} steps of batch {cfg.vae_batch}; on 2 CPU cores "
                f"about 2 s a step: `python toy.py train-assets --device cuda` does it on a GPU), cached at {vae_path}")
            vae = train_vae(cfg, log=log)
            save_toy_vae(vae, vae_path, cfg)
    state = first_readable((dit_path,) + ((ASSETS / "toy_dit.safetensors",) if cfg.vae_steps else ()),
                           dit_state)
    if state is not None:
        dit.load_state_dict(state, strict=True)
    else:
        (print if cfg.vae_steps else log)(f"toy world: pretraining the tiny DiT ({cfg.pretrain_steps} flow-matching steps), cached at {dit_path}")
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
        model = bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, log,
                              data=shared_rollouts(dit, vae, encoder, tokenizer, cfg, cache_dir, log))
        model.zero_grad(set_to_none=True)
        lrm_lib.save_lrm(model, lrm_path)  # atomic
    return dit, vae, encoder, tokenizer, model


# ----------------------------------------------------------------------------- measuring a world

MEASURE_SIGMAS = (0.0, 0.3, 0.6, 0.9)  # noise levels of the process-reward rows


def measure_lrms(dit, vae, encoder, tokenizer, cfg: ToyConfig, data: dict, log=print) -> dict:
    """The paper's Table 3 metrics (lrm_metrics) on the held-out rollouts of cfg's split for the
    LRMs a world bootstraps on `data`: the ensemble (train rows too, and its early-stopping record),
    the noise-aware ensemble per sigma of MEASURE_SIGMAS, and DiT-trunk LRMs (PRFL's design: the
    generator's blocks frozen under 5 heads, noise-aware) on the pretrained generator and on the
    same blocks at their random init."""
    train_idx, test_idx = heldout_split(len(data["z"]), cfg)
    res = {}
    ensemble = bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, log, data=data)
    res["ensemble"] = {"heldout": lrm_metrics(ensemble, data, test_idx), "train": lrm_metrics(ensemble, data, train_idx),
                       "best_step": ensemble.bootstrap_log["best_step"]}
    models = {"noise_aware": None,
              "dit_trunk": dit_trunk_lrm(dit, cfg), "dit_random_trunk": dit_trunk_lrm(build_models(cfg.seed, cfg.dit)[0], cfg)}
    for name, model in models.items():
        model = bootstrap_lrm(dit, vae, encoder, tokenizer, cfg, log, model=model, noise_aware=True, data=data)
        res[name] = {str(sig): lrm_metrics(model, data, test_idx, sigma=sig) for sig in MEASURE_SIGMAS}
        res[name]["best_step"] = model.bootstrap_log["best_step"]
    return res


def measure_world(dit, vae, encoder, tokenizer, cfg: ToyConfig, n: int = 48) -> dict:
    """What a user sees: the VAE's reconstruction PSNR on 64 held-out procedural videos, and on n
    fixed samples of the generator how often the scene parser finds the square (in every frame,
    and frames per sample on average). The samples are drawn on the CPU, seeded."""
    res = {"vae_psnr_db": vae_psnr(vae, world_videos(64, cfg, torch.Generator().manual_seed(12345)))}
    g = torch.Generator().manual_seed(4321)
    prompts = toy_prompts(n, g)
    with torch.no_grad():
        context, _ = text_encoder.encode_prompts(prompts, tokenizer, encoder, dit.cfg.text_len)
        video = vae.decode(rollout(dit.eval(), context, torch.randn(n, *latent_shape(cfg), generator=g), cfg))
    found = parse_squares(video)
    res.update(square_every_frame=sum(f == cfg.frames for f in found) / n, square_frames_mean=sum(found) / n)
    return res


def train_assets(argv=None):
    """`python toy.py train-assets [--device cuda]`: train the watchable world's VAE and DiT and write
    them (fp16, recipe in the metadata) to assets/, with the generator's labelled rollouts the world's
    LRMs are bootstrapped on (toy_rollouts.safetensors), and what they all measure in
    assets/toy_assets.json (the LRMs' rows on the held-out rollouts)."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="toy.py train-assets", description=train_assets.__doc__)
    p.add_argument("--device", default="cpu", help="where to train (default cpu; a GPU takes minutes, 2 CPU cores hours)")
    p.add_argument("--vae-steps", type=int, default=WATCHABLE.vae_steps, help=f"default {WATCHABLE.vae_steps}")
    p.add_argument("--pretrain-steps", type=int, default=WATCHABLE.pretrain_steps, help=f"default {WATCHABLE.pretrain_steps}")
    p.add_argument("--refine-steps", type=int, default=WATCHABLE.refine_steps,
                   help=f"a second cosine cycle of DiT pretraining from the first's weights; 0: none (default {WATCHABLE.refine_steps})")
    p.add_argument("--refine-lr", type=float, default=WATCHABLE.refine_lr, help=f"its peak learning rate (default {WATCHABLE.refine_lr})")
    p.add_argument("--vae-videos", type=int, default=WATCHABLE.vae_videos, help=f"default {WATCHABLE.vae_videos}")
    p.add_argument("--videos", type=int, default=WATCHABLE.num_videos, help=f"the DiT's (default {WATCHABLE.num_videos})")
    p.add_argument("--rollouts", type=int, default=WATCHABLE.lrm_rollouts,
                   help=f"labelled generator rollouts the LRMs are bootstrapped on (default {WATCHABLE.lrm_rollouts})")
    p.add_argument("--lrm-steps", type=int, default=WATCHABLE.lrm_steps,
                   help=f"most bootstrap steps of each LRM, early-stopped on the held-out rollouts (default {WATCHABLE.lrm_steps})")
    p.add_argument("--dit", default=WATCHABLE.dit, choices=sorted(TOY_DITS), help=f"the DiT's size (default {WATCHABLE.dit})")
    p.add_argument("--out", default=str(ASSETS), help="output folder (default assets/ of the repository)")
    p.add_argument("--ckpt-dir", default=str(default_cache_dir() / "train_assets"),
                   help="training checkpoints, every 500 steps; a rerun resumes from them (default <cache>/toy/train_assets)")
    args = p.parse_args(argv)
    for flag in ("vae_steps", "pretrain_steps", "vae_videos", "videos", "rollouts", "lrm_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.refine_steps < 0 or not args.refine_lr > 0:
        p.error(f"--refine-steps must be >= 0 and --refine-lr > 0, got {args.refine_steps} and {args.refine_lr}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch build sees no CUDA GPU")
    cfg = replace(WATCHABLE, vae_steps=args.vae_steps, pretrain_steps=args.pretrain_steps, vae_videos=args.vae_videos,
                  num_videos=args.videos, dit=args.dit, lrm_rollouts=args.rollouts, lrm_steps=args.lrm_steps,
                  refine_steps=args.refine_steps, refine_lr=args.refine_lr)
    if cfg != WATCHABLE:
        print("note: other steps than toy.WATCHABLE's: load_world will not use these files for that world")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = Path(args.ckpt_dir)
    vae_file = out / "toy_vae.safetensors"
    if vae_file.exists() and not recipe_difference(vae_file, cfg, VAE_RECIPE):
        print(f"{vae_file} holds this recipe's VAE: only the DiT is trained")
        t_vae = json.loads((out / "toy_assets.json").read_text()).get("vae_seconds", 0.0) if (out / "toy_assets.json").exists() else 0.0
    else:
        save_toy_vae(train_vae(cfg, device=args.device, ckpt=ckpt / "vae.pt"), vae_file, cfg, torch.float16)
        t_vae = time.time() - t0
    vae = read_toy_vae(vae_file, cfg)  # what users get: the fp16 file
    t_dit = time.time()
    dit, _, encoder, tokenizer = build_models(cfg.seed, cfg.dit)
    dit_file = out / "toy_dit.safetensors"
    first = _read_trained(dit_file, replace(cfg, refine_steps=0), DIT_RECIPE) if cfg.refine_steps and dit_file.exists() else None
    if first is not None:
        print(f"{dit_file} holds this recipe's first pretraining cycle: only the second is trained")
    pretrain_dit(dit, vae.to(args.device), encoder, tokenizer, cfg, device=args.device, ckpt=ckpt / "dit.pt",
                 stage1=first and first[0])
    save_toy_dit(dit, dit_file, cfg, torch.float16)
    dit.load_state_dict(_read_trained(dit_file, cfg, DIT_RECIPE)[0])
    dit = dit.cpu().eval()
    res = measure_world(dit, vae.cpu(), encoder, tokenizer, cfg)
    print(f"the generator: {res}")
    res.update(vae_seconds=round(t_vae, 1), dit_seconds=round(time.time() - t_dit, 1), device=args.device,
               recipe=json.loads(recipe(cfg, DIT_RECIPE)))
    if cfg.lrm_holdout > 0:  # the labelled rollouts every LRM of the world is bootstrapped on, and those LRMs' metrics
        t_rollouts = time.time()
        data = bootstrap_data(dit, vae, encoder, tokenizer, cfg)
        save_rollouts(data, out / "toy_rollouts.safetensors", cfg)
        data = read_rollouts(out / "toy_rollouts.safetensors", cfg, encoder, tokenizer, dit.cfg.text_len)  # as users get them
        res["rollouts"] = {"n": len(data["z"]), "heldout": round(len(data["z"]) * cfg.lrm_holdout),
                           "reward_mean": data["target"].mean().item(), "reward_std": data["target"].std().item(),
                           "seconds": round(time.time() - t_rollouts, 1)}
        res["lrm"] = measure_lrms(dit, vae, encoder, tokenizer, cfg, data)
    runs.write_text(out / "toy_assets.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["train-assets"]:
        raise SystemExit("usage: python toy.py train-assets [--device cuda] [--vae-steps N] [--pretrain-steps N] [--out DIR]")
    train_assets(sys.argv[2:])
