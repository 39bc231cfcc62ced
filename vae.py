"""Wan 2.1 causal 3-D video VAE (z_dim 16), written from scratch.

Follows `wan/modules/vae.py` of Wan-Video/Wan2.1 (commit 9737cba9): the same module tree and
parameter names, so the official `Wan2.1_VAE.pth` loads with a strict `load_state_dict`, and the
same chunked causal procedure, which *is* the model (the modules called once on a whole clip skip
the temporal resampling and give something else):
- encode: the first frame alone, then chunks of 4 frames; each chunk gives one latent frame;
- decode: one latent frame per chunk; chunk 0 gives 1 frame, every later chunk gives 4;
- every causal 3-tap conv carries the last 2 frames of its input to the next chunk, and the
  temporal down/upsamplers carry their own state, upstream's first-chunk quirks included.
Latents are normalised per channel, (mu - mean) / std with Wan's 16 constants; decode undoes that
and clamps to [-1, 1]. The cache is a dict created inside encode/decode and handed down (upstream
keeps it in mutable default arguments), so the model holds no state between calls and is safe
across threads. `decode(z, checkpoint=True)` recomputes each chunk in the backward, so gradients
through the decoder cost the chunk inputs and caches plus one chunk.

Left out: sampling from the posterior (encode returns its mean), attention blocks outside the
middle (`attn_scales`, empty in Wan 2.1), the non-chunked forward, spatial tiling, and the Wan 2.2
VAE (`is_residual`, patchified input).
"""

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file

CACHE_T = 2  # frames a causal 3-tap conv carries over from the previous chunk


@dataclass
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # upstream spelling
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip


VAE_CONFIGS = {"wan2.1": VAEConfig(), "tiny": VAEConfig(dim=8, num_res_blocks=1)}


def check_config(cfg: VAEConfig):
    """The chunk procedure assumes 8x spatial and 4x temporal compression (3 + 2 resamples)."""
    if cfg.attn_scales:
        raise ValueError(f"attn_scales must be empty (Wan 2.1 has attention only in the middle), got {cfg.attn_scales}")
    if len(cfg.dim_mult) != 4 or len(cfg.temperal_downsample) != 3 or sum(cfg.temperal_downsample) != 2:
        raise ValueError(
            f"need 4 stages with 2 temporal downsamples, got dim_mult {cfg.dim_mult}, "
            f"temperal_downsample {cfg.temperal_downsample}"
        )


# ---------------------------------------------------------------------------------------------
# Building blocks


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding (2 * pad_t frames) all goes in front; a cached prefix of
    earlier frames replaces as much of that zero padding as it covers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self.causal_padding = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, T
        self.padding = (0, 0, 0)

    def forward(self, x, cache_x=None):
        pad = list(self.causal_padding)
        if cache_x is not None and pad[4] > 0:
            x = torch.cat([cache_x, x], dim=2)
            pad[4] -= cache_x.shape[2]
        return super().forward(F.pad(x, pad))


def cached_conv(conv, x, cache):
    """One chunk through a causal 3-tap conv. Its cache slot keeps the last CACHE_T frames of
    the input (topped up with the previous slot's last frame after a 1-frame chunk), so the
    chunked result equals the conv over the whole sequence."""
    prev = cache.get(conv)
    keep = x[:, :, -CACHE_T:]
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:], keep], dim=2)
    cache[conv] = keep.clone()  # a copy, so the slot does not keep the whole chunk alive
    return conv(x, prev)


def run_chunk(layers, x, cache):
    """Apply `layers` in order to one chunk; stateful layers get the cache."""
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = cached_conv(layer, x, cache)
        elif isinstance(layer, (ResidualBlock, Resample)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class RMS_norm(nn.Module):
    """x / ||x||_2 over channels * sqrt(C) * gamma (F.normalize: eps 1e-12 on the norm, no
    mean subtraction, no bias). gamma is (C, 1, 1, 1) for video, (C, 1, 1) for images. The
    normalisation runs in fp32: a no-op for the fp32 reference, as diffusers does for 16-bit."""

    def __init__(self, dim, images=True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class Upsample(nn.Upsample):
    """2x 'nearest-exact' upsampling computed in fp32, as upstream does."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim, dropout=0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        # The 1x1x1 shortcut has no temporal extent, so it needs no cache.
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        return run_chunk(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        qkv = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (B*T, 1, H*W, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        y = y.squeeze(1).transpose(1, 2).unflatten(2, (h, w))  # (B*T, C, H, W)
        y = self.proj(y).unflatten(0, (b, t)).transpose(1, 2)  # (B, C, T, H, W)
        return x + y


class Resample(nn.Module):
    """2x spatial down/upsampling per frame; the '3d' modes also halve/double T."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:  # pad right and bottom by 1, then a stride-2 conv
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        if self.mode == "upsample3d":
            x = self.upsample_time(x, cache)
        b, t = x.shape[0], x.shape[2]
        x = self.resample(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W) -> (B*T, C', H', W')
        x = x.unflatten(0, (b, t)).transpose(1, 2)  # (B, C', T, H', W')
        if self.mode == "downsample3d":
            x = self.downsample_time(x, cache)
        return x

    def downsample_time(self, x, cache):
        """Stride-2 time_conv over [last frame of the previous chunk, this chunk]: 4 -> 2 -> 1
        frames. Chunk 0 (the lone first frame) skips it and passes through."""
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if prev is None:
            return x
        return self.time_conv(torch.cat([prev, x], dim=2))

    def upsample_time(self, x, cache):
        """time_conv gives 2C channels, read as frames 2t and 2t+1, so T doubles. Upstream quirk,
        kept literally: chunk 0 skips it (1 frame stays 1) and marks the slot "Rep"; chunk 1 then
        runs time_conv with zero padding instead of chunk 0's frames, and caches a zero frame in
        front of a 1-frame input; from chunk 2 on the cache works as in `cached_conv`."""
        prev = cache.get(self)
        if prev is None:
            cache[self] = "Rep"
            return x
        rep = isinstance(prev, str)
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T:
            keep = torch.cat([torch.zeros_like(keep) if rep else prev[:, :, -1:], keep], dim=2)
        x = self.time_conv(x, None if rep else prev)
        cache[self] = keep.clone()
        b, c2, t, h, w = x.shape
        x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)  # (B, C, T, 2, H, W)
        return x.reshape(b, c2 // 2, t * 2, h, w)


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, VAE


def middle_block(dim, dropout):
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def head_block(in_dim, out_dim):
    return nn.Sequential(RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]  # 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                downsamples.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = middle_block(out_dim, cfg.dropout)
        self.head = head_block(out_dim, cfg.z_dim * 2)

    def forward(self, x, cache):
        return run_chunk([self.conv1, *self.downsamples, *self.middle, *self.head], x, cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]  # 384, 384, 384, 192, 96
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle_block(dims[0], cfg.dropout)
        upsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = head_block(out_dim, 3)

    def forward(self, x, cache):
        return run_chunk([self.conv1, *self.middle, *self.upsamples, *self.head], x, cache)


def latent_stats(cfg: VAEConfig, device):
    """Wan's per-channel latent mean and std, (1, C, 1, 1, 1) in fp32."""
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


def check_video(video):
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
    t, h, w = video.shape[2:]
    if (t - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {t}")
    if h % 8 or w % 8:
        raise ValueError(f"height and width must be multiples of 8, got {h}x{w}")


# Video sizes a Wan 2.1 text-to-video pipeline accepts: the VAE compresses time 4x (the first
# frame alone) and space 8x, and the DiT cuts the latent into 2x2 patches, so frames = 4k+1 and
# height, width are multiples of 16. The VAE alone would take multiples of 8 (check_video), but
# latents of such a size cannot be generated, so every script uses this stricter rule.
SIZE_MULTIPLE = 16


def check_size(frames: int, height: int, width: int):
    """Raise a ValueError naming the value if (frames, height, width) is not a Wan video size."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(f"width and height must be positive multiples of {SIZE_MULTIPLE} "
                         f"(VAE 8x, DiT 2x2 patches), got {width}x{height}")


def parse_size(text: str) -> tuple[int, int]:
    """"832x480" -> (832, 480), checked by check_size."""
    w, _, h = str(text).lower().partition("x")
    if not (w.strip().isdigit() and h.strip().isdigit()):
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 832x480, got {text!r}")
    width, height = int(w), int(h)
    check_size(1, height, width)
    return width, height


def latent_shape(frames: int, height: int, width: int, z_dim: int = 16) -> tuple[int, int, int, int]:
    """The latent (C, T', H', W') of a video of `frames` x height x width: (16, 1 + (T-1)/4, H/8, W/8)."""
    check_size(frames, height, width)
    return z_dim, 1 + (frames - 1) // 4, height // 8, width // 8


class WanVAE(nn.Module):
    """encode: video (B, 3, T, H, W) -> latent (B, 16, 1 + (T-1)/4, H/8, W/8); decode: back."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, logvar)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def encode(self, video):
        """video in [-1, 1], T = 4k+1, H and W multiples of 8 -> normalised posterior mean (fp32)."""
        check_video(video)
        x = video.to(self.conv1.weight.dtype)
        chunks = [x[:, :, :1]] + [x[:, :, 1 + 4 * i : 5 + 4 * i] for i in range((x.shape[2] - 1) // 4)]
        cache = {}
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(h)[:, : self.cfg.z_dim].float()
        mean, std = latent_stats(self.cfg, mu.device)
        return (mu - mean) * (1.0 / std)  # upstream multiplies by 1/std

    def decode(self, z, checkpoint=False):
        """Normalised latent (B, 16, T', H', W') -> video (B, 3, 1 + 4(T'-1), 8H', 8W') in [-1, 1]
        (fp32). Differentiable; checkpoint=True recomputes each chunk during backward."""
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latent must be (B, {self.cfg.z_dim}, T, H, W), got shape {tuple(z.shape)}")
        mean, std = latent_stats(self.cfg, z.device)
        x = self.conv2((z.float() / (1.0 / std) + mean).to(self.conv2.weight.dtype))
        cache, frames = {}, []
        for i in range(x.shape[2]):
            chunk = x[:, :, i : i + 1]
            if checkpoint:
                y, cache = torch.utils.checkpoint.checkpoint(self.decode_chunk, chunk, cache, use_reentrant=False)
            else:  # the cache updated in place: each old slot is freed as its new one is written
                y = self.decoder(chunk, cache)
            frames.append(y)
        out = torch.cat(frames, dim=2)
        del frames
        return out.clamp(-1.0, 1.0).float()

    def decode_chunk(self, x, cache):
        """One latent frame through the decoder as a pure function (x, cache) -> (frames, new
        cache): the input cache is not modified, so checkpointing can rerun it in backward."""
        cache = dict(cache)
        return self.decoder(x, cache), cache


# ---------------------------------------------------------------------------------------------
# Loading

# Original -> Diffusers `AutoencoderKLWan` tensor names (spec §3.7), applied in order; the flat
# decoder.upsamples index is split into up_blocks stages by `to_diffusers_name`.
TO_DIFFUSERS = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"\.head\.0\.", ".norm_out."),
    (r"\.head\.2\.", ".conv_out."),
    (r"\.middle\.0\.", ".mid_block.resnets.0."),
    (r"\.middle\.1\.", ".mid_block.attentions.0."),
    (r"\.middle\.2\.", ".mid_block.resnets.1."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]

# Diffusers config.json field -> VAEConfig field. Fields not listed must keep Wan 2.1's value.
DIFFUSERS_CONFIG = {
    "base_dim": "dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_scales": "attn_scales",
    "temperal_downsample": "temperal_downsample",
    "dropout": "dropout",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
}
DIFFUSERS_WAN21_ONLY = {"is_residual": (False,), "in_channels": (3,), "out_channels": (3,), "patch_size": (None,)}


def to_diffusers_name(key, num_res_blocks):
    for pattern, repl in TO_DIFFUSERS:
        key = re.sub(pattern, repl, key)
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:  # each decoder stage: num_res_blocks + 1 residual blocks, then a Resample
        stage, j = divmod(int(m[1]), num_res_blocks + 2)
        part = f"resnets.{j}" if j <= num_res_blocks else "upsamplers.0"
        key = f"decoder.up_blocks.{stage}.{part}.{m[2]}"
    return key


def config_from_diffusers(d):
    bad = {k: d[k] for k, ok in DIFFUSERS_WAN21_ONLY.items() if k in d and d[k] not in ok}
    if d.get("decoder_base_dim") not in (None, d.get("base_dim", VAEConfig.dim)):
        bad["decoder_base_dim"] = d["decoder_base_dim"]
    if bad:
        raise ValueError(f"not a Wan 2.1 VAE config, unsupported values: {bad}")
    fields = {ours: d[theirs] for theirs, ours in DIFFUSERS_CONFIG.items() if theirs in d}
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _names(keys, limit=8):
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {list(keys[:limit])}{more}"


def check_state_dict(model, state, path, layout):
    """Raise naming the missing, unexpected and mis-shaped keys, and the layout guessed."""
    want = model.state_dict()
    missing = sorted(want.keys() - state.keys())
    unexpected = sorted(state.keys() - want.keys())
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sorted(want.keys() & state.keys())
        if state[k].shape != want[k].shape
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{path} does not match the Wan 2.1 VAE for {model.cfg} (layout guessed: {layout}): "
            f"missing {_names(missing)}; unexpected {_names(unexpected)}; mis-shaped {_names(misshaped)}"
        )


_WRAPPER_KEYS = ("model", "state_dict")  # {key: state_dict} with nothing else is unwrapped


def _state_dict_of(obj, file):
    """The name -> tensor dict a .pth holds: the object itself, or the one entry of {"model": sd} or
    {"state_dict": sd}. Anything else (a training checkpoint with optimizer state, a list) is refused."""
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    odd = [str(k) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:
        raise ValueError(f"{file}: holds a dict with keys {sorted(map(str, obj))[:8]} whose entries {odd[:8]} are "
                         f"not tensors; expected a state dict (name -> tensor) or a dict with a single 'model' or "
                         f"'state_dict' entry holding one")
    return obj


def _check_finite(path, state: dict) -> dict:
    """One pass over the loaded tensors: a weight file holding NaN or inf is refused, naming the first."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} holds NaN or inf; the weight file is corrupt (re-export or "
                             f"re-download it)")
    return state


def _read(file: Path):
    """The one reader of this file: config.json -> its parsed contents; a .safetensors or a .pth/.pt
    (weights only, never pickled code) -> name -> tensor. Every way a file can be missing, empty,
    truncated or of the wrong kind ends here in an error that names the file."""
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    if not file.is_file():
        raise ValueError(f"{file} is not a file; expected Wan2.1_VAE.pth, a .safetensors or a Diffusers vae/ folder")
    if file.stat().st_size == 0:
        raise ValueError(f"{file}: empty file (0 bytes); expected a VAE checkpoint (.pth, .safetensors) or config.json")
    if file.name == "config.json":
        try:
            return json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not valid JSON: {err}") from err
    if file.suffix == ".safetensors":
        try:
            state = load_file(file)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from err
        return _check_finite(file, state)
    try:  # mmap needs the zip format of torch.save; older pickles are read whole
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:  # torch.load fails in many types (EOFError, UnpicklingError, RuntimeError, ...)
        raise ValueError(f"{file}: not a readable torch checkpoint (truncated, corrupt, or holding more than "
                         f"tensors?): {type(err).__name__}: {err}") from err
    return _check_finite(file, _state_dict_of(obj, file))


def load_vae(path, config=None, device="cpu", dtype=torch.float32) -> WanVAE:
    """Load `Wan2.1_VAE.pth`, an original-layout .safetensors (fp32 or a 16-bit repack) or a
    Diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors), cast to `dtype`.
    `config` defaults to the folder's config.json, or for original-layout files (which carry
    none) to Wan 2.1's; a tiny file needs config=VAE_CONFIGS["tiny"]. A .pth holding
    {"model": state_dict} or {"state_dict": state_dict} and nothing else is unwrapped. Returns the
    model in eval mode with frozen parameters (gradients still flow to a z that requires them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        wanted = ("config.json", "diffusion_pytorch_model.safetensors")
        if not all((path / name).is_file() for name in wanted):
            raise ValueError(f"{path}: expected a Diffusers vae/ folder holding {' and '.join(wanted)}, found "
                             f"{sorted(p.name for p in path.iterdir())[:8]}")
        settings = _read(path / "config.json")
        if not isinstance(settings, dict):
            raise ValueError(f"{path / 'config.json'}: expected a JSON object of VAE settings")
        config = config or config_from_diffusers(settings)
        state = _read(path / "diffusion_pytorch_model.safetensors")
    else:  # .safetensors, or any other file as a torch checkpoint (Wan2.1_VAE.pth)
        state = _read(path)
    with torch.device("meta"):
        model = WanVAE(config or VAEConfig())
    layout = "diffusers" if "quant_conv.weight" in state else "original"
    if layout == "diffusers":
        table = {to_diffusers_name(k, model.cfg.num_res_blocks): k for k in model.state_dict()}
        state = {table.get(k, k): v for k, v in state.items()}
    check_state_dict(model, state, path, layout)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
