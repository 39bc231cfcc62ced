"""Wan 2.1 (z_dim 16) and Wan 2.2 (z_dim 48) causal 3-D video VAEs, written from scratch.

Follows `wan/modules/vae.py` of Wan-Video/Wan2.1 (commit 9737cba9) and `wan/modules/vae2_2.py` of
Wan-Video/Wan2.2: the same module trees and parameter names, so `Wan2.1_VAE.pth` and
`Wan2.2_VAE.pth` load with a strict `load_state_dict`, and the same chunked causal procedure, which
*is* the model (the modules called once on a whole clip skip the temporal resampling and give
something else):
- encode: the first frame alone, then chunks of 4 frames; each chunk gives one latent frame;
- decode: one latent frame per chunk; chunk 0 gives 1 frame, every later chunk gives 4;
- every causal 3-tap conv carries the last 2 frames of its input to the next chunk, and the
  temporal down/upsamplers carry their own state, upstream's first-chunk quirks included.
Wan 2.2 adds three things: a 2x2 pixel patchify in front of the encoder (3 -> 12 channels) and
its inverse after the decoder, so space is compressed 16x; a parameter-free shortcut around every
down/up stage (`AvgDown3D` averages channel groups of the space-to-depth input, `DupUp3D`
repeats channels into depth-to-space); and a decoder wider than the encoder (256 vs 160).
Latents are normalised per channel, (mu - mean) / std with the model's constants; decode undoes
that and clamps to [-1, 1]. The cache is a dict created inside encode/decode and handed down
(upstream keeps it in mutable default arguments), so the model holds no state between calls and
is safe across threads. `decode(z, checkpoint=True)` recomputes each chunk in the backward, so
gradients through the decoder cost the chunk inputs and caches plus one chunk.

Left out: sampling from the posterior (encode returns its mean), attention blocks outside the
middle (`attn_scales`, empty in both), the non-chunked forward, and spatial tiling.
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
from safetensors import SafetensorError, safe_open
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
    dec_dim: int | None = None  # decoder base width; None = dim (Wan 2.1)
    is_residual: bool = False  # Wan 2.2: AvgDown3D / DupUp3D shortcuts around each stage
    patch_size: int = 1  # Wan 2.2: 2x2 pixel patchify before the encoder, unpatchify after the decoder

    @property
    def stride(self) -> int:
        """Spatial compression: 8 from the three 2x downsamples, times the pixel patch."""
        return 8 * self.patch_size

    @property
    def size_multiple(self) -> int:
        """Video heights and widths a Wan pipeline generates: the VAE stride times the DiT's 2x2 patch."""
        return 2 * self.stride


# Wan 2.2's 48 latent constants (`Wan2_2_VAE.__init__`; the same in the TI2V-5B diffusers vae/config.json).
LATENTS_MEAN_22 = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENTS_STD_22 = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
_WAN22 = dict(z_dim=48, is_residual=True, patch_size=2, latents_mean=LATENTS_MEAN_22, latents_std=LATENTS_STD_22)

VAE_CONFIGS = {
    "wan2.1": VAEConfig(),
    "wan2.2": VAEConfig(dim=160, dec_dim=256, **_WAN22),
    "tiny": VAEConfig(dim=8, num_res_blocks=1),
    "tiny2.2": VAEConfig(dim=8, dec_dim=12, num_res_blocks=1, **_WAN22),
}


def check_config(cfg: VAEConfig):
    """The chunk procedure assumes 8x spatial and 4x temporal compression (3 + 2 resamples)."""
    if cfg.attn_scales:
        raise ValueError(f"attn_scales must be empty (Wan has attention only in the middle), got {cfg.attn_scales}")
    if len(cfg.dim_mult) != 4 or len(cfg.temperal_downsample) != 3 or sum(cfg.temperal_downsample) != 2:
        raise ValueError(
            f"need 4 stages with 2 temporal downsamples, got dim_mult {cfg.dim_mult}, "
            f"temperal_downsample {cfg.temperal_downsample}"
        )
    if cfg.patch_size not in (1, 2) or len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
        raise ValueError(f"need patch_size 1 or 2 and z_dim ({cfg.z_dim}) latent means and stds, got patch_size "
                         f"{cfg.patch_size}, {len(cfg.latents_mean)} means, {len(cfg.latents_std)} stds")
    if not cfg.is_residual and cfg.dec_dim not in (None, cfg.dim):
        raise ValueError(f"a decoder width apart from the encoder's needs is_residual (Wan 2.2), got dec_dim "
                         f"{cfg.dec_dim}, dim {cfg.dim}")


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
        elif isinstance(layer, (ResidualBlock, Resample, DownResidualBlock)):
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

    def __init__(self, dim, mode, up_dim=None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):  # Wan 2.1 halves the channels here, Wan 2.2 keeps them
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2 if up_dim is None else up_dim, 3, padding=1),
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


class AvgDown3D(nn.Module):
    """Wan 2.2's parameter-free stage shortcut on the way down: space-to-depth by (ft, fs, fs),
    then the mean of each group of consecutive channels down to out_dim. A chunk whose length is
    not a multiple of ft gets zero frames in front (chunk 0, a single frame, averages with zero)."""

    def __init__(self, in_dim, out_dim, factor_t, factor_s):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.group, rest = divmod(in_dim * factor_t * factor_s**2, out_dim)
        if rest:
            raise ValueError(f"AvgDown3D: {in_dim} channels x {factor_t * factor_s**2} do not split into {out_dim}")

    def forward(self, x):
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2's parameter-free stage shortcut on the way up: each channel repeated, then
    depth-to-space by (ft, fs, fs). On decode chunk 0 the first ft - 1 frames are dropped, as the
    main path's temporal upsampler leaves chunk 0 at one frame."""

    def __init__(self, in_dim, out_dim, factor_t, factor_s):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.repeats, rest = divmod(out_dim * factor_t * factor_s**2, in_dim)
        if rest:
            raise ValueError(f"DupUp3D: {out_dim} channels x {factor_t * factor_s**2} are not a multiple of {in_dim}")

    def forward(self, x, first_chunk=False):
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class DownResidualBlock(nn.Module):
    """A Wan 2.2 encoder stage: residual blocks then a Resample (`downsamples`), plus AvgDown3D
    of the stage input (`avg_shortcut`). The last stage does not downsample: its shortcut is the
    identity."""

    def __init__(self, in_dim, out_dim, num_res_blocks, dropout, temporal, down):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        blocks = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim, dropout) for j in range(num_res_blocks)]
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x, cache):
        return run_chunk(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpResidualBlock(nn.Module):
    """A Wan 2.2 decoder stage: num_res_blocks + 1 residual blocks then a channel-keeping Resample
    (`upsamples`), plus DupUp3D of the stage input (`avg_shortcut`; none on the last stage)."""

    def __init__(self, in_dim, out_dim, num_res_blocks, dropout, temporal, up):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        blocks = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim, dropout) for j in range(num_res_blocks + 1)]
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x, cache, first_chunk):
        y = run_chunk(self.upsamples, x, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, first_chunk)


def patchify(x, p):
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p) in Wan 2.2's (c r q) channel order: channel
    c*p*p + r*p + q holds row offset q and column offset r (the column offset is the slower one)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # (B, C, r, q, T, H', W')
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x, p):
    """The exact inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # (B, C, T, H', q, W', r)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


# ---------------------------------------------------------------------------------------------
# Encoder, decoder, VAE


def middle_block(dim, dropout):
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def head_block(in_dim, out_dim):
    return nn.Sequential(RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]  # 2.1: 96, 96, 192, 384, 384; 2.2: 160, ..., 640
        self.conv1 = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3, padding=1)
        downsamples, last = [], len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if cfg.is_residual:  # one module per stage, named downsamples.{i}.downsamples.{j}
                temporal = i < last and cfg.temperal_downsample[i]
                downsamples.append(DownResidualBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, temporal, i < last))
                continue
            for _ in range(cfg.num_res_blocks):  # Wan 2.1: one flat list, named downsamples.{k}
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
        dim = cfg.dec_dim or cfg.dim
        dims = [dim * u for u in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]  # 2.1: 384, 384, 384, 192, 96
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle_block(dims[0], cfg.dropout)
        upsamples, last = [], len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if cfg.is_residual:  # one module per stage, named upsamples.{i}.upsamples.{j}
                temporal = i < last and temperal_upsample[i]
                upsamples.append(UpResidualBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, temporal, i < last))
                continue
            if i > 0:
                in_dim //= 2  # the previous stage's Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = head_block(out_dim, 3 * cfg.patch_size**2)

    def forward(self, x, cache):
        first_chunk = not cache  # decode chunk 0 meets an empty cache; Wan 2.2's DupUp3D trims frames there
        x = run_chunk([self.conv1, *self.middle], x, cache)
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk) if isinstance(layer, UpResidualBlock) else run_chunk([layer], x, cache)
        return run_chunk(self.head, x, cache)


def latent_stats(cfg: VAEConfig, device):
    """Wan's per-channel latent mean and std, (1, C, 1, 1, 1) in fp32."""
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


def check_video(video, stride=8):
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
    t, h, w = video.shape[2:]
    if (t - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {t}")
    if h % stride or w % stride:
        raise ValueError(f"height and width must be multiples of {stride} (the VAE's stride), got {h}x{w}")


# Video sizes a Wan pipeline accepts: the VAE compresses time 4x (the first frame alone) and space
# by its stride (8 for Wan 2.1, 16 for Wan 2.2), and the DiT cuts the latent into 2x2 patches, so
# frames = 4k+1 and height, width are multiples of 16 (2.1) or 32 (2.2). The VAE alone takes
# multiples of its stride (check_video), but latents of such a size cannot be generated, so every
# script uses this stricter rule.
SIZE_MULTIPLE = VAEConfig().size_multiple


def check_size(frames: int, height: int, width: int, multiple: int = SIZE_MULTIPLE):
    """Raise a ValueError naming the value if (frames, height, width) is not a Wan video size
    (`multiple`: the VAE's `size_multiple`, 16 for Wan 2.1, 32 for Wan 2.2)."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"width and height must be positive multiples of {multiple} "
                         f"(VAE {multiple // 2}x, DiT 2x2 patches), got {width}x{height}")


def parse_size(text: str, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """"832x480" -> (832, 480), checked by check_size."""
    w, _, h = str(text).lower().partition("x")
    if not (w.strip().isdigit() and h.strip().isdigit()):
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 832x480, got {text!r}")
    width, height = int(w), int(h)
    check_size(1, height, width, multiple)
    return width, height


def latent_shape(frames: int, height: int, width: int, cfg: VAEConfig | None = None) -> tuple[int, int, int, int]:
    """The latent (C, T', H', W') of a video of `frames` x height x width under the VAE `cfg`
    (default Wan 2.1): (z_dim, 1 + (T-1)/4, H/stride, W/stride), 16 channels at stride 8 for
    Wan 2.1, 48 at stride 16 for Wan 2.2."""
    cfg = cfg or VAEConfig()
    check_size(frames, height, width, cfg.size_multiple)
    return cfg.z_dim, 1 + (frames - 1) // 4, height // cfg.stride, width // cfg.stride


class WanVAE(nn.Module):
    """encode: video (B, 3, T, H, W) -> latent (B, z_dim, 1 + (T-1)/4, H/s, W/s); decode: back.
    Wan 2.1: z_dim 16, s = 8; Wan 2.2: z_dim 48, s = 16."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, logvar)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def encode(self, video):
        """video in [-1, 1], T = 4k+1, H and W multiples of the stride -> normalised posterior mean (fp32)."""
        check_video(video, self.cfg.stride)
        x = patchify(video.to(self.conv1.weight.dtype), self.cfg.patch_size)
        chunks = [x[:, :, :1]] + [x[:, :, 1 + 4 * i : 5 + 4 * i] for i in range((x.shape[2] - 1) // 4)]
        cache = {}
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(h)[:, : self.cfg.z_dim].float()
        mean, std = latent_stats(self.cfg, mu.device)
        return (mu - mean) * (1.0 / std)  # upstream multiplies by 1/std

    def decode(self, z, checkpoint=False):
        """Normalised latent (B, z_dim, T', H', W') -> video (B, 3, 1 + 4(T'-1), s*H', s*W') in
        [-1, 1] (fp32). Differentiable; checkpoint=True recomputes each chunk during backward."""
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
        out = unpatchify(torch.cat(frames, dim=2), self.cfg.patch_size)
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

# Diffusers config.json field -> VAEConfig field.
DIFFUSERS_CONFIG = {
    "base_dim": "dim",
    "decoder_base_dim": "dec_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_scales": "attn_scales",
    "temperal_downsample": "temperal_downsample",
    "dropout": "dropout",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
    "is_residual": "is_residual",
    "patch_size": "patch_size",
}


def to_diffusers_name(key, cfg: VAEConfig):
    n = cfg.num_res_blocks
    m = re.match(r"(encoder|decoder)\.(down|up)samples\.(\d+)\.(down|up)samples\.(\d+)\.(.*)", key)
    if m:  # Wan 2.2 stages: n (encoder) or n + 1 (decoder) residual blocks, then the Resample
        side, stage, j, rest = m[1], m[3], int(m[5]), m[6]
        blocks = n if side == "encoder" else n + 1
        part = f"resnets.{j}" if j < blocks else ("downsampler" if side == "encoder" else "upsampler")
        key = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{stage}.{part}.{rest}"
    for pattern, repl in TO_DIFFUSERS:
        key = re.sub(pattern, repl, key)
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:  # Wan 2.1: each decoder stage is n + 1 residual blocks, then a Resample, in one flat list
        stage, j = divmod(int(m[1]), n + 2)
        part = f"resnets.{j}" if j <= n else "upsamplers.0"
        key = f"decoder.up_blocks.{stage}.{part}.{m[2]}"
    return key


def _config(**fields) -> VAEConfig:
    """A VAEConfig from loose fields: lists -> tuples, a decoder width equal to the encoder's -> None."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if fields.get("patch_size", 1) is None:
        fields["patch_size"] = 1
    if fields.get("dec_dim") == fields.get("dim", VAEConfig.dim):
        fields["dec_dim"] = None
    cfg = VAEConfig(**fields)
    check_config(cfg)
    return cfg


def config_from_diffusers(d):
    """A diffusers `AutoencoderKLWan` config.json (Wan 2.1 or Wan 2.2) -> VAEConfig."""
    fields = {ours: d[theirs] for theirs, ours in DIFFUSERS_CONFIG.items() if theirs in d}
    p = fields.get("patch_size") or 1
    bad = {k: d[k] for k in ("in_channels", "out_channels") if k in d and d[k] != 3 * p * p}
    if bad:
        raise ValueError(f"not a Wan VAE config: {bad} with patch_size {p} (expected {3 * p * p} channels)")
    try:
        return _config(**fields)
    except ValueError as err:
        raise ValueError(f"not a Wan VAE config: {err}") from err


def config_from_state(state: dict) -> VAEConfig:
    """Infer the VAEConfig of an original-layout state dict (Wan2.1_VAE.pth, Wan2.2_VAE.pth, or
    any size of either) from its keys and shapes. Wan 2.2 is told by its nested stage keys
    (`encoder.downsamples.0.downsamples.0...`); the latent constants follow z_dim (16: Wan 2.1's,
    48: Wan 2.2's)."""
    need = ("encoder.conv1.weight", "conv2.weight", "decoder.head.2.weight")
    if not all(k in state for k in need):
        raise ValueError(f"not a Wan VAE in the original layout or the diffusers one: no "
                         f"{[k for k in need if k not in state]}; it holds {_names(sorted(state))}")
    conv_in, z_dim = state["encoder.conv1.weight"].shape, state["conv2.weight"].shape[0]
    dim, patch = conv_in[0], round((conv_in[1] / 3) ** 0.5)
    residual = any(k.startswith("encoder.downsamples.0.downsamples.") for k in state)
    enc = re.compile(r"encoder\.downsamples\.(\d+)\.(?:downsamples\.(\d+)\.)?(residual\.2|time_conv|resample\.1)\.weight")
    stages, res_out, times, flat = {}, [], [], []
    for k in sorted(state, key=lambda k: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", k)]):
        m = enc.fullmatch(k)
        if not m:
            continue
        if residual:
            stage = stages.setdefault(int(m[1]), {"out": None, "blocks": 0, "time": False})
            if m[3] == "residual.2":
                stage["blocks"] += 1
                stage["out"] = state[k].shape[0]
            stage["time"] |= m[3] == "time_conv"
        else:
            flat.append((int(m[1]), m[3], state[k].shape[0]))
    if residual:
        order = [stages[i] for i in sorted(stages)]
        outs, num_res = [s["out"] for s in order], order[0]["blocks"]
        times = [s["time"] for s in order[:-1]]
    else:  # Wan 2.1: blocks k of one flat list; a Resample (resample.1) closes each stage but the last
        resamples = sorted({i for i, kind, _ in flat if kind == "resample.1"})
        num_res = sum(1 for i, kind, _ in flat if kind == "residual.2" and i < resamples[0]) if resamples else 0
        ends = resamples + [max(i for i, _, _ in flat) + 1]
        outs = [next(o for i, kind, o in flat if kind == "residual.2" and i == e - 1) for e in ends]
        times = [any(i == r and kind == "time_conv" for i, kind, _ in flat) for r in resamples]
    dim_mult = tuple(o // dim for o in outs)
    dec_dim = state["decoder.head.2.weight"].shape[1] // dim_mult[0]
    consts = {16: {}, 48: {"latents_mean": LATENTS_MEAN_22, "latents_std": LATENTS_STD_22}}
    if z_dim not in consts:
        raise ValueError(f"a Wan VAE with z_dim {z_dim} has no known latent mean/std; pass config=")
    return _config(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res,
                   temperal_downsample=tuple(times), is_residual=residual, patch_size=patch, **consts[z_dim])


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
            f"{path} does not match the Wan VAE for {model.cfg} (layout guessed: {layout}): "
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


def read_config(path) -> VAEConfig:
    """The VAEConfig of a VAE file or folder without loading its weights (a folder's config.json; a
    file's tensor names and shapes), e.g. to check sizes against its stride before any work."""
    path = Path(path)
    if path.is_dir():
        settings = _read(path / "config.json")
        if not isinstance(settings, dict):
            raise ValueError(f"{path / 'config.json'}: expected a JSON object of VAE settings")
        return config_from_diffusers(settings)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    else:
        shapes = _read(path)
    if "quant_conv.weight" in shapes:
        raise ValueError(f"{path}: a diffusers-layout file without its config.json; give the vae/ folder")
    try:
        return config_from_state(shapes)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_vae(path, config=None, device="cpu", dtype=torch.float32) -> WanVAE:
    """Load a Wan 2.1 or Wan 2.2 VAE: `Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, an original-layout
    .safetensors (fp32 or a 16-bit repack) or a Diffusers `vae/` folder (config.json +
    diffusion_pytorch_model.safetensors), cast to `dtype`. `config` defaults to the folder's
    config.json, or for original-layout files (which carry none) to what their keys and shapes
    say (`config_from_state`), never to the file name. A .pth holding {"model": state_dict} or
    {"state_dict": state_dict} and nothing else is unwrapped. Returns the model in eval mode with
    frozen parameters (gradients still flow to a z that requires them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        wanted = ("config.json", "diffusion_pytorch_model.safetensors")
        if not all((path / name).is_file() for name in wanted):
            raise ValueError(f"{path}: expected a Diffusers vae/ folder holding {' and '.join(wanted)}, found "
                             f"{sorted(p.name for p in path.iterdir())[:8]}")
        config = config or read_config(path)
        state = _read(path / "diffusion_pytorch_model.safetensors")
    else:  # .safetensors, or any other file as a torch checkpoint (Wan2.1_VAE.pth)
        state = _read(path)
    layout = "diffusers" if "quant_conv.weight" in state else "original"
    if config is None and layout == "original":
        try:
            config = config_from_state(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    with torch.device("meta"):
        model = WanVAE(config or VAEConfig())
    if layout == "diffusers":
        table = {to_diffusers_name(k, model.cfg): k for k in model.state_dict()}
        state = {table.get(k, k): v for k, v in state.items()}
    check_state_dict(model, state, path, layout)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
