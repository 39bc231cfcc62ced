"""The Wan DiT, written from the spec, loading every official layout: Wan 2.1 T2V 1.3B / 14B and
I2V-14B, Wan 2.2 TI2V-5B and the A14B experts (T2V, I2V).

Follows `wan/modules/model.py` of Wan-Video/Wan2.1 and Wan-Video/Wan2.2 (WanModel): parameter names
and shapes equal the original checkpoint, so `state_dict()` is the official layout key for key.
The Wan 2.2 models are Wan 2.1 DiTs of other sizes; what they add to the forward is per-token
timesteps, t of shape (B, L) (the TI2V-5B's first latent frame at t = 0), and, for the I2V models,
a conditioning latent y concatenated to x on channels (mask 4 + image latent 16). Wan 2.1 I2V-14B
also cross-attends to 257 rows of CLIP image features (`img_emb`, `k_img` / `v_img` per block).
The numerics follow the original, not diffusers: the timestep sinusoid in float64, cos first; the
time MLP, modulation, gates, residual stream and head as fp32 islands (autocast off); q/k RMSNorm
across all heads, in fp32; 3-D RoPE (interleaved pairs, 22/21/21 split for head_dim 128) in
float64 complex; cross-attention over all text_len (512) zero-padded context rows, unmasked. Under
bf16 autocast the Linear/Conv layers and attention run in bf16 and the islands stay fp32, as in
Wan's sampling loop; bf16 weights (load_dit(dtype=torch.bfloat16)) keep the islands fp32 and need
autocast. Without autocast the model runs in its parameter dtype (fp32 for parity checks).

Also here: attention on F.scaled_dot_product_attention, per-block checkpointing, compiled blocks,
and Ulysses sequence parallelism (`set_sequence_parallel`; DeepSpeed-Ulysses, arXiv 2309.14509).
`load_dit` reads the original layout (.safetensors, sharded index, .pth/.pt, a folder with
config.json), `diffusion_model.`-prefixed repacks and the Diffusers WanTransformer3DModel layout,
all through one reader, `_read`, whose errors name the file and what was expected.

Left out: FLF2V's image position embedding (`img_emb.emb_pos`), sliding-window attention, and the
padding of variable-length token lists: samples of one batch share one latent shape.
"""

import json
import math
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.utils.checkpoint import checkpoint


@dataclass
class DiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_dim: int | None = None  # Wan 2.1 I2V: width of the CLIP image features it cross-attends to (1280)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)  # a config read back from JSON carries a list
        if self.dim % self.num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={self.dim}, num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
DIT_CONFIGS = {
    "1.3B": DiTConfig(),  # Wan 2.1 T2V-1.3B
    "14B": DiTConfig(**_14B),  # Wan 2.1 T2V-14B
    "i2v-14B": DiTConfig(**_14B, in_dim=36, image_dim=1280),  # Wan 2.1 I2V-14B: y (mask 4 + image 16), CLIP
    "t2v-A14B": DiTConfig(**_14B),  # each Wan 2.2 T2V-A14B expert
    "i2v-A14B": DiTConfig(**_14B, in_dim=36),  # each Wan 2.2 I2V-A14B expert: y, no CLIP
    "ti2v-5B": DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64),
}


# ----------------------------------------------------------------------------- pure math

def time_runs(t: torch.Tensor, n_tokens: int):
    """Timesteps t (B,) or per token (B, L) -> (runs, values): the token runs ((a, b), ...) on which
    every sample's timestep is constant, and values (S, B), the timestep of each run. The pipelines
    give one run (text-to-video) or two (the TI2V first frame at t = 0), so the time MLP runs on
    S*B rows and the modulations are applied per run, never materialised per token."""
    if t.ndim == 1:
        return ((0, n_tokens),), t[None]
    change = (t[:, 1:] != t[:, :-1]).any(0).nonzero().flatten().tolist()
    starts = [0] + [c + 1 for c in change]
    return tuple(zip(starts, starts[1:] + [n_tokens])), t[:, starts].T


def first_frame_timesteps(t: torch.Tensor, grid: tuple[int, int, int], frames: int = 1) -> torch.Tensor:
    """t (B,) -> (B, f*h*w) per-token timesteps with the first `frames` latent frames' tokens at 0
    (Wan 2.2 TI2V image-to-video: the image's latent frame is clean). grid: the DiT's token grid."""
    f, h, w = grid
    out = t[:, None].expand(t.shape[0], f * h * w).clone()
    out[:, : frames * h * w] = 0
    return out


def modulate(x: torch.Tensor, runs, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) * (1 + scale) + shift, with shift and scale (S, B, 1, D) constant on each run."""
    if len(runs) == 1:
        return x * (1 + scale[0]) + shift[0]
    return torch.cat([x[:, a:b] * (1 + scale[i]) + shift[i] for i, (a, b) in enumerate(runs)], dim=1)


def gated(y: torch.Tensor, runs, gate: torch.Tensor) -> torch.Tensor:
    """y (B, L, D) * gate, gate (S, B, 1, D) constant on each run."""
    if len(runs) == 1:
        return y * gate[0]
    return torch.cat([y[:, a:b] * gate[i] for i, (a, b) in enumerate(runs)], dim=1)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timesteps (B,) -> (B, dim) float64 [cos(t*w_j), sin(t*w_j)], w_j = 10000^(-j/(dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    arg = torch.outer(t.to(torch.float64), freqs)  # (B, half)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _rope_axis(n: int, dim: int, device) -> torch.Tensor:
    """Rotations e^(i*pos*theta_k) for positions 0..n-1 on one axis: (n, dim/2) complex128."""
    theta = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64, device=device).div(dim))
    angles = torch.outer(torch.arange(n, dtype=torch.float64, device=device), theta)
    return torch.polar(torch.ones_like(angles), angles)


def rope_freqs(head_dim: int, f: int, h: int, w: int, device=None) -> torch.Tensor:
    """Wan's 3-D RoPE for an (f, h, w) token grid: (f*h*w, 1, head_dim/2) complex128.

    The head_dim/2 complex pairs split over the axes as t: head_dim/2 - 2*(head_dim//6),
    h and w: head_dim//6 each (22/21/21 for head_dim 128); tokens are in (f, h, w) row-major order.
    """
    d_hw = 2 * (head_dim // 6)
    grid = (f, h, w)
    t_axis = _rope_axis(f, head_dim - 2 * d_hw, device)[:, None, None].expand(*grid, -1)
    h_axis = _rope_axis(h, d_hw, device)[None, :, None].expand(*grid, -1)
    w_axis = _rope_axis(w, d_hw, device)[None, None, :].expand(*grid, -1)
    return torch.cat([t_axis, h_axis, w_axis], dim=-1).reshape(f * h * w, 1, head_dim // 2)


def rope_apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, L, N, d) by freqs (L, 1, d/2); pairs (2i, 2i+1) are (real, imag), math in float64."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))  # (B, L, N, d/2)
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked multi-head attention, q (B, Lq, N, d), k and v (B, Lk, N, d) -> (B, Lq, N*d).

    q and k are cast to v's dtype: under bf16 autocast v comes out of a Linear in bf16, so
    attention runs in bf16 like Wan's flash attention. Softmax scale 1/sqrt(d).
    """
    q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, Lq, d)
    return out.transpose(1, 2).flatten(2)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Tokens (B, f*h*w, pt*ph*pw*C) -> video (B, C, f*pt, h*ph, w*pw); C is the fastest feature."""
    (f, h, w), (pt, ph, pw) = grid, patch_size
    x = x.unflatten(1, grid).unflatten(-1, (pt, ph, pw, -1))  # (B, f, h, w, pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
    return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------- sequence parallelism
# Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509): each of the S ranks of a group
# holds a contiguous 1/S of the token sequence; around self-attention an all-to-all trades that
# for all tokens of 1/S of the heads, and back. Everything else in a block is per token (RoPE,
# modulation, norms, cross-attention to the whole prompt, FFN), so it runs on the local tokens.


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """dist.all_to_all_single on dim 0 (one chunk per rank)."""
    x = x.contiguous()  # first: empty_like keeps a permuted input's strides, and the collective writes flat
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, L/S, N, d) local tokens, all heads -> (B, L, N/S, d) all tokens, this rank's heads."""
    s, (b, ls, n, d) = dist.get_world_size(group), x.shape
    out = _all_to_all(x.unflatten(2, (s, n // s)).permute(2, 0, 1, 3, 4), group)  # (S, B, L/S, N/S, d) by source rank
    return out.permute(1, 0, 2, 3, 4).reshape(b, s * ls, n // s, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse: (B, L, N/S, d) -> (B, L/S, N, d)."""
    s, (b, l, ns, d) = dist.get_world_size(group), x.shape
    out = _all_to_all(x.unflatten(1, (s, l // s)).permute(1, 0, 2, 3, 4), group)  # (S, B, L/S, N/S, d) by head group
    return out.permute(1, 2, 0, 3, 4).reshape(b, l // s, s * ns, d)


class _Exchange(torch.autograd.Function):
    """The all-to-all, sequence -> heads (to_heads) or back; the adjoint of each is the other."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


class _GatherTokens(torch.autograd.Function):
    """All-gather the token chunks along dim 1. Backward keeps this rank's slice of the gradient:
    every rank of the group computes the same loss from the gathered output, so summing over the
    group (as an all-gather's adjoint would) counts it S times. The parameters' gradients are then
    each rank's share (from its own tokens); their sum over the group is the whole gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(dist.get_world_size(ctx.group), dim=1)[ctx.rank].contiguous(), None


# ----------------------------------------------------------------------------- modules

class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, cast back to the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim: normalise in fp32, cast to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)  # across all heads, not per head
        self.norm_k = WanRMSNorm(dim, eps)
        self.sp_group = None  # set by WanDiT.set_sequence_parallel

    def forward(self, x, freqs):
        n = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(2, (n, -1))  # (B, L, N, d)
        k = self.norm_k(self.k(x)).unflatten(2, (n, -1))
        v = self.v(x).unflatten(2, (n, -1))
        q, k = rope_apply(q, freqs), rope_apply(k, freqs)
        if self.sp_group is None:
            return self.o(attention(q, k, v))
        q, k, v = (_Exchange.apply(t, self.sp_group, True) for t in (q, k, v))  # all tokens, 1/S of the heads
        out = attention(q, k, v).unflatten(2, (n // dist.get_world_size(self.sp_group), -1))
        return self.o(_Exchange.apply(out, self.sp_group, False).flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Attention to the text rows; with `image` (Wan 2.1 I2V) also to the image rows that precede
    them in the context, through their own k_img / v_img / norm_k_img, the two outputs summed."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool = False):
        super().__init__(dim, num_heads, eps)
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    def forward(self, x, context, n_img: int = 0):
        n = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(2, (n, -1))  # (B, L, N, d)
        if n_img:  # (sliced only then: a slice's backward would reorder the text gradient's sums)
            img, context = context[:, :n_img], context[:, n_img:]
        k = self.norm_k(self.k(context)).unflatten(2, (n, -1))  # (B, text_len, N, d)
        v = self.v(context).unflatten(2, (n, -1))
        out = attention(q, k, v)
        if n_img:
            k_img = self.norm_k_img(self.k_img(img)).unflatten(2, (n, -1))
            out = out + attention(q, k_img, self.v_img(img).unflatten(2, (n, -1)))
        return self.o(out)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps, image=cfg.image_dim is not None)
        self.norm2 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, freqs, runs, n_img=0):
        """x (B, L, D) residual stream, e0 (S, B, 6, D) fp32 time projection of the S token runs
        (`time_runs`), context (B, n_img + text_len, D)."""
        assert e0.dtype == torch.float32, f"time projection must be float32, got {e0.dtype}"
        # fp32 modulation, shifts, scales and gates (autocast leaves elementwise ops alone)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation + e0).chunk(6, dim=2)
        y = self.self_attn(modulate(self.norm1(x).float(), runs, shift_msa, scale_msa), freqs)
        x = x + gated(y, runs, gate_msa)  # fp32 from here on: the gate is fp32
        x = x + self.cross_attn(self.norm3(x), context, n_img)
        y = self.ffn(modulate(self.norm2(x).float(), runs, shift_ffn, scale_ffn))
        return x + gated(y, runs, gate_ffn)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, runs):
        """x (B, L, D) fp32, e (S, B, D) fp32 time embedding of the S token runs (not the 6-way projection)."""
        shift, scale = (self.modulation + e[:, :, None]).chunk(2, dim=2)
        return self.head(modulate(self.norm(x), runs, shift, scale))


class MLPProj(nn.Module):
    """Wan 2.1 I2V's projection of the CLIP features to the model width: LayerNorm, Linear, GELU,
    Linear, LayerNorm (`img_emb.proj.{0,1,3,4}`); the norms in fp32."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(WanLayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), WanLayerNorm(out_dim))

    def forward(self, x):
        return self.proj(x)


def check_sequence_parallel(cfg: DiTConfig, sp_size: int, latent_shape=None):
    """What Ulysses needs of a DiT and a latent (C, F, H, W), checked before a run starts: the ranks
    split the heads, so they must divide them, and the tokens, so they must divide their count."""
    if cfg.num_heads % sp_size:
        raise ValueError(f"--sp-size {sp_size} must divide the DiT's {cfg.num_heads} attention heads")
    if latent_shape is not None:
        grid = [s // p for s, p in zip(latent_shape[-3:], cfg.patch_size)]
        if math.prod(grid) % sp_size:
            raise ValueError(f"--sp-size {sp_size} must divide the {math.prod(grid)} tokens of a latent "
                             f"{tuple(latent_shape)} (grid {tuple(grid)}): choose another --size or --frames")


class WanDiT(nn.Module):
    """forward(x (B, C, F, H, W), t (B,) or (B, L) in [0, 1000], context (B, text_len, text_dim),
    y=None (B, in_dim - C, F, H, W), clip=None (B, 257, image_dim)) -> fp32 velocity (B, out_dim, F, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.image_dim is not None:
            self.img_emb = MLPProj(cfg.image_dim, dim)
        self.sp_group = None
        self.init_weights()

    def compile_blocks(self, **kwargs):
        """torch.compile every block in place (nn.Module.compile, kwargs to torch.compile). The
        fp32 modulation, fp32 norms and float64 RoPE are traced as written, so the numerics stay
        eager's up to float rounding."""
        for block in self.blocks:
            block.compile(**kwargs)

    def set_sequence_parallel(self, group):
        """Split every sample's tokens over the ranks of `group` (Ulysses; None: off). Every rank of
        the group must call forward with the same inputs; each gets the whole output. The heads must
        divide by the group size. Parameter gradients are then each rank's share: sum them over the
        group (distributed.sp_sum_grads) for the whole gradient."""
        if group is not None:
            check_sequence_parallel(self.cfg, dist.get_world_size(group))
        self.sp_group = group
        for block in self.blocks:
            block.self_attn.sp_group = group

    def init_weights(self):
        """Wan's init: xavier Linears with zero bias, N(0, 0.02) embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding.modules(), *self.time_embedding.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def _check_inputs(self, x, t, context, y, clip):
        cfg = self.cfg
        b = x.shape[0]
        if y is not None and (y.ndim != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:]):
            raise ValueError(f"y must be (B, C, F, H, W) with x's B, F, H, W {(b, *x.shape[2:])}, got {tuple(y.shape)}")
        channels = x.shape[1] + (0 if y is None else y.shape[1])
        if x.ndim == 5 and y is None and x.shape[1] < cfg.in_dim:
            raise ValueError(f"this DiT takes {cfg.in_dim} input channels and x has {x.shape[1]}: pass y, the "
                             f"other {cfg.in_dim - x.shape[1]} (image-to-video: mask 4 + image latent 16)")
        if x.ndim != 5 or channels != cfg.in_dim or any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"x must be (B, {cfg.in_dim}, F, H, W) (with y: x and y together) with F, H, W "
                             f"divisible by {cfg.patch_size}, got {tuple(x.shape)}"
                             + ("" if y is None else f" and y {tuple(y.shape)}"))
        tokens = math.prod(s // p for s, p in zip(x.shape[2:], cfg.patch_size))
        if t.shape not in ((b,), (b, tokens)):
            raise ValueError(f"t must have shape ({b},) or per token ({b}, {tokens}), got {tuple(t.shape)}")
        if context.shape != (b, cfg.text_len, cfg.text_dim):
            raise ValueError(f"context must be zero-padded to ({b}, {cfg.text_len}, {cfg.text_dim}), "
                             f"got {tuple(context.shape)}")
        if (clip is None) != (cfg.image_dim is None):
            raise ValueError(f"clip image features (B, 257, {cfg.image_dim}) are needed by a DiT with image_dim"
                             if clip is None else "clip given to a DiT without image cross-attention (image_dim None)")
        if clip is not None and (clip.ndim != 3 or clip.shape[0] != b or clip.shape[2] != cfg.image_dim):
            raise ValueError(f"clip must be ({b}, N, {cfg.image_dim}), got {tuple(clip.shape)}")

    def forward(self, x, t, context, y=None, clip=None):
        self._check_inputs(x, t, context, y, clip)
        cfg, device = self.cfg, x.device.type
        dtype = self.patch_embedding.weight.dtype
        if y is not None:  # image-to-video: [noisy latent, mask, image latent] on channels
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        x = self.patch_embedding(x.to(dtype))  # (B, D, f, h, w)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, L, D), tokens in (f, h, w) row-major order
        freqs = rope_freqs(cfg.head_dim, *grid, device=x.device)
        runs, values = time_runs(t, x.shape[1])
        with torch.amp.autocast(device, enabled=False):
            e = self.time_embedding(sinusoidal_embedding(values.flatten(), cfg.freq_dim).float())  # (S*B, D)
            e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, values.shape)  # (S, B, 6, D)
            e = e.unflatten(0, values.shape)  # (S, B, D); both from 2-D matmuls, as Wan 2.1 computes them
        if self.sp_group is not None:  # this rank's contiguous share of the tokens, rotations and runs
            s, r = dist.get_world_size(self.sp_group), dist.get_rank(self.sp_group)
            if x.shape[1] % s:
                raise ValueError(f"{x.shape[1]} tokens (grid {grid}) do not split over sequence parallel size {s}")
            n = x.shape[1] // s
            x, freqs = x.chunk(s, dim=1)[r], freqs.chunk(s, dim=0)[r]
            lo, hi = r * n, (r + 1) * n
            mine = [i for i, (a, b) in enumerate(runs) if a < hi and b > lo]
            runs = tuple((max(a, lo) - lo, min(b, hi) - lo) for a, b in (runs[i] for i in mine))
            e, e0 = e[mine], e0[mine]
        context = self.text_embedding(context.to(dtype))  # (B, text_len, D); padded rows are not masked
        n_img = 0
        if clip is not None:  # Wan 2.1 I2V: the image rows go in front of the text rows
            context = torch.cat([self.img_emb(clip.to(dtype)), context], dim=1)
            n_img = clip.shape[1]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, context, freqs, runs, n_img, use_reentrant=False)
            else:
                x = block(x, e0, context, freqs, runs, n_img)
        with torch.amp.autocast(device, enabled=False):
            x = self.head(x.float(), e, runs)  # (B, L, pt*ph*pw*C)
        if self.sp_group is not None:
            x = _GatherTokens.apply(x, self.sp_group)
        return unpatchify(x, grid, cfg.patch_size).float()


class TwoExpertDiT(nn.Module):
    """Wan 2.2 A14B: a high-noise and a low-noise expert, two DiTs of one shape. A call at integer
    timestep t runs the high-noise expert while t >= boundary * 1000 and the low-noise one after
    (the official `_prepare_model_for_timestep`; diffusers' `transformer` and `transformer_2`), so
    it stands wherever one WanDiT does. guidance = (low, high), as the official configs write it;
    `guidance_at(t)` is the one of the expert that runs at t. Every sample of one call must be at
    the same step."""

    def __init__(self, high: WanDiT, low: WanDiT, boundary: float, guidance=(1.0, 1.0)):
        super().__init__()
        if high.cfg != low.cfg:
            raise ValueError(f"the two experts must have one shape, got high {high.cfg} and low {low.cfg}")
        if not 0 < boundary < 1:
            raise ValueError(f"boundary must be in (0, 1), a fraction of the 1000 training timesteps, got {boundary}")
        self.high, self.low, self.boundary, self.guidance = high, low, boundary, tuple(guidance)

    @property
    def cfg(self) -> DiTConfig:
        return self.high.cfg

    @property
    def gradient_checkpointing(self) -> bool:
        return self.high.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self.high.gradient_checkpointing = self.low.gradient_checkpointing = on

    def is_high(self, t) -> bool:
        """Whether the high-noise expert runs at t (an int, or a tensor (B,) / (B, L) of one step)."""
        if torch.is_tensor(t):
            per_sample = t.reshape(t.shape[0], -1).amax(1) if t.ndim else t.reshape(1)
            if bool((per_sample != per_sample[0]).any()):
                raise ValueError(f"the samples of one call are at different timesteps {per_sample.tolist()}: "
                                 f"the experts switch by timestep, so call them one step at a time")
            t = per_sample[0].item()
        return t >= self.boundary * 1000

    def expert(self, t) -> WanDiT:
        return self.high if self.is_high(t) else self.low

    def guidance_at(self, t) -> float:
        return self.guidance[1] if self.is_high(t) else self.guidance[0]

    def forward(self, x, t, context, **kwargs):
        return self.expert(t)(x, t, context, **kwargs)

    def compile_blocks(self, **kwargs):
        self.high.compile_blocks(**kwargs)
        self.low.compile_blocks(**kwargs)

    def set_sequence_parallel(self, group):
        self.high.set_sequence_parallel(group)
        self.low.set_sequence_parallel(group)


# ----------------------------------------------------------------------------- loading

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # single-file repacks (ComfyUI and others)

# Diffusers WanTransformer3DModel -> original names; "*" is the block index. Note the norm swap:
# Diffusers numbers the block norms in execution order, so its norm2 is the original (affine) norm3.
_DIFFUSERS_TO_ORIGINAL = {
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "scale_shift_table": "head.modulation",
    "proj_out.": "head.head.",
    "blocks.*.scale_shift_table": "blocks.*.modulation",
    "blocks.*.attn1.to_q.": "blocks.*.self_attn.q.",
    "blocks.*.attn1.to_k.": "blocks.*.self_attn.k.",
    "blocks.*.attn1.to_v.": "blocks.*.self_attn.v.",
    "blocks.*.attn1.to_out.0.": "blocks.*.self_attn.o.",
    "blocks.*.attn1.norm_q.": "blocks.*.self_attn.norm_q.",
    "blocks.*.attn1.norm_k.": "blocks.*.self_attn.norm_k.",
    "blocks.*.norm2.": "blocks.*.norm3.",
    "blocks.*.attn2.to_q.": "blocks.*.cross_attn.q.",
    "blocks.*.attn2.to_k.": "blocks.*.cross_attn.k.",
    "blocks.*.attn2.to_v.": "blocks.*.cross_attn.v.",
    "blocks.*.attn2.to_out.0.": "blocks.*.cross_attn.o.",
    "blocks.*.attn2.norm_q.": "blocks.*.cross_attn.norm_q.",
    "blocks.*.attn2.norm_k.": "blocks.*.cross_attn.norm_k.",
    "blocks.*.ffn.net.0.proj.": "blocks.*.ffn.0.",
    "blocks.*.ffn.net.2.": "blocks.*.ffn.2.",
    # Wan 2.1 I2V: the CLIP projection and each block's image keys and values
    "condition_embedder.image_embedder.norm1.": "img_emb.proj.0.",
    "condition_embedder.image_embedder.ff.net.0.proj.": "img_emb.proj.1.",
    "condition_embedder.image_embedder.ff.net.2.": "img_emb.proj.3.",
    "condition_embedder.image_embedder.norm2.": "img_emb.proj.4.",
    "blocks.*.attn2.add_k_proj.": "blocks.*.cross_attn.k_img.",
    "blocks.*.attn2.add_v_proj.": "blocks.*.cross_attn.v_img.",
    "blocks.*.attn2.norm_added_k.": "blocks.*.cross_attn.norm_k_img.",
}

# config.json field -> DiTConfig field, for the original WanModel config and the Diffusers one.
_CONFIG_JSON_FIELDS = {
    "dim": "dim", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "num_heads": "num_heads",
    "num_layers": "num_layers", "in_dim": "in_dim", "out_dim": "out_dim", "text_dim": "text_dim",
    "text_len": "text_len", "patch_size": "patch_size", "eps": "eps",
    "num_attention_heads": "num_heads", "in_channels": "in_dim", "out_channels": "out_dim", "image_dim": "image_dim",
}

# Tensors whose shapes give the config when no config is passed (original names).
_SHAPE_KEYS = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
               "blocks.0.ffn.0.weight", "head.modulation", "head.head.weight")

_DIT_MODULES = ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "blocks.", "head.",
                "img_emb.")

WAN_HEAD_DIM = 128  # every released Wan 2.1 / 2.2 DiT; num_heads = dim // 128 when no config says otherwise


def _diffusers_to_original(key: str) -> str:
    m = re.match(r"blocks\.(\d+)\.", key)
    generic = "blocks.*." + key[m.end():] if m else key
    for old, new in _DIFFUSERS_TO_ORIGINAL.items():
        if generic.startswith(old):
            new = new + generic[len(old):]
            return new.replace("*", m.group(1)) if m else new
    return key  # unknown: left as is, reported as unexpected by the load


def _to_original_keys(sd: dict) -> tuple[dict, str]:
    """Strip a repack prefix and rename Diffusers keys; returns the renamed dict and the layout guessed."""
    layout = "original keys"
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
            layout += f" after stripping prefix '{prefix}'"
            break
    if any(k.startswith("condition_embedder.") for k in sd):
        sd = {_diffusers_to_original(k): v for k, v in sd.items()}
        layout = layout.replace("original keys", "Diffusers keys renamed to original")
    return sd, layout


def _files_in_index(index: Path) -> list[Path]:
    contents = _read(index)
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: not a safetensors index (expected a JSON object with a non-empty 'weight_map')")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _checkpoint_files(path: Path) -> tuple[list[Path], dict, str]:
    """Weight files, config.json contents ({} if none) and a description of the source."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one *.safetensors or one *.safetensors.index.json, found "
                             f"{[p.name for p in found]} (for a Diffusers repo pass its transformer/ folder)")
        config = path / "config.json"
        files, source = _checkpoint_files(found[0])[0], f"folder {path.name}/ with {found[0].name}"
        config_json = _read(config) if config.exists() else {}
        if not isinstance(config_json, dict):
            raise ValueError(f"{config}: expected a JSON object of model settings, got a {type(config_json).__name__}")
        return files, config_json, source
    if path.name.endswith(".index.json"):
        files = _files_in_index(path)
        return files, {}, f"{len(files)} shards listed in {path.name}"
    if path.suffix in (".safetensors", ".pth", ".pt"):
        return [path], {}, f"single file {path.name}"
    raise ValueError(f"unknown checkpoint type {path} "
                     "(expected .safetensors, .safetensors.index.json, .pth, .pt or a folder)")


_WRAPPER_KEYS = ("model", "state_dict")  # {key: state_dict} with nothing else is unwrapped


def _state_dict_of(obj, file: Path) -> dict:
    """The name -> tensor dict a .pth holds: the object itself, or the one entry of {"model": sd} or
    {"state_dict": sd}. Anything else (a training checkpoint with optimizer state, a list) is refused."""
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    odd = [str(k) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:
        raise ValueError(f"{file}: holds a dict with keys {sorted(map(str, obj))[:8]} whose entries "
                         f"{odd[:8]} are not tensors; expected a state dict (name -> tensor) or a dict with a "
                         f"single 'model' or 'state_dict' entry holding one")
    return obj


def _check_finite(path, state: dict) -> dict:
    """One pass over the loaded tensors: a weight file holding NaN or inf is refused, naming the first."""
    for k, v in state.items():
        if "float8" in str(getattr(v, "dtype", "")):  # refused by name in load_dit (_refuse_fp8)
            continue
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} holds NaN or inf; the weight file is corrupt (re-export or "
                             f"re-download it)")
    return state


def _read(file: Path, skip=None):
    """The one reader of this file: a .json -> its parsed contents; a .safetensors or .pth/.pt (weights
    only, never pickled code; memory-mapped when it is a zip) -> name -> tensor, without the names
    for which skip(name) is true (never read from a .safetensors). Every way a file can be missing,
    empty, truncated or of the wrong kind ends here in an error that names the file."""
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    if not file.is_file():
        raise ValueError(f"{file} is not a file; expected a weight file (.safetensors, .pth, .pt) or a .json")
    if file.stat().st_size == 0:
        raise ValueError(f"{file}: empty file (0 bytes); expected a weight file (.safetensors, .pth, .pt) or a .json")
    if file.suffix == ".json":
        try:
            return json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not valid JSON: {err}") from err
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if skip is None or not skip(k)}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from err
        return _check_finite(file, state)
    try:  # mmap needs the zip format of torch.save; older pickles are read whole
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:  # torch.load fails in many types (EOFError, UnpicklingError, RuntimeError, ...)
        raise ValueError(f"{file}: not a readable torch checkpoint (truncated, corrupt, or holding more than "
                         f"tensors?): {type(err).__name__}: {err}") from err
    sd = _state_dict_of(obj, file)
    return _check_finite(file, sd if skip is None else {k: v for k, v in sd.items() if not skip(k)})


def _config_from_json(d: dict) -> dict:
    kw = {field: d[name] for name, field in _CONFIG_JSON_FIELDS.items() if d.get(name) is not None}
    if "attention_head_dim" in d:  # Diffusers stores heads x head_dim instead of dim
        kw["dim"] = d["num_attention_heads"] * d["attention_head_dim"]
    return kw


def _infer_config(shapes: dict, config_json: dict) -> DiTConfig:
    """DiTConfig from tensor shapes (original names); fields of a config.json take precedence."""
    dim = shapes["head.modulation"][-1]
    patch = tuple(shapes["patch_embedding.weight"][2:])
    kw = dict(dim=dim, ffn_dim=shapes["blocks.0.ffn.0.weight"][0], freq_dim=shapes["time_embedding.0.weight"][1],
              num_layers=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")),
              in_dim=shapes["patch_embedding.weight"][1], out_dim=shapes["head.head.weight"][0] // math.prod(patch),
              text_dim=shapes["text_embedding.0.weight"][1], patch_size=patch)
    if "img_emb.proj.1.weight" in shapes:  # Wan 2.1 I2V's CLIP projection
        kw["image_dim"] = shapes["img_emb.proj.1.weight"][1]
    kw.update(_config_from_json(config_json))
    if "num_heads" not in kw:
        if kw["dim"] % WAN_HEAD_DIM:
            raise ValueError(f"cannot infer num_heads: dim {kw['dim']} is not a multiple of Wan's head_dim "
                             f"{WAN_HEAD_DIM}; pass config=")
        kw["num_heads"] = kw["dim"] // WAN_HEAD_DIM
    return DiTConfig(**kw)


def _short(keys: list) -> str:
    return ", ".join(map(str, keys[:8])) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")


def _raise_load_error(path, layout: str, missing: list, unexpected: list, wrong: list):
    raise ValueError(f"cannot load a Wan DiT from {path}\n  layout guessed: {layout}\n"
                     f"  missing keys ({len(missing)}): {_short(missing)}\n"
                     f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}\n"
                     f"  wrong shapes ({len(wrong)}): {_short(wrong)}")


def _check_keys(path, layout: str, expected: dict, shapes: dict):
    """Compare key -> shape dicts of the model and the file; raise naming every difference."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {shapes[k]} in file vs {tuple(v)} in model"
             for k, v in expected.items() if k in shapes and shapes[k] != tuple(v)]
    if missing or unexpected or wrong:
        _raise_load_error(path, layout, missing, unexpected, wrong)


def keeps_fp32(key: str) -> bool:
    """Weights of the fp32 islands (time MLP, modulations, norms, head) stay fp32 whatever the dtype."""
    island = key.startswith(("time_embedding.", "time_projection.", "head.", "img_emb.proj.0.", "img_emb.proj.4."))
    return island or key.endswith("modulation") or ".norm" in key


def _refuse_fp8(path, sd: dict):
    """fp8-scaled repacks store float8 weights with per-tensor scales; this loader reads real-valued weights only."""
    fp8 = [k for k, v in sd.items() if k.endswith("scale_weight") or "float8" in str(v.dtype)]
    if fp8:
        raise ValueError(f"{path}: an fp8-scaled checkpoint ({len(fp8)} float8 or scale_weight tensors, e.g. "
                         f"{fp8[0]}); load the fp16 / bf16 / fp32 release of this model instead")


def cast_dit(model: WanDiT, dtype: torch.dtype) -> WanDiT:
    """Cast the weights in place to dtype, the fp32 islands (keeps_fp32) kept in fp32: load_dit's
    rule, for a model built rather than loaded. Run a bf16 model under torch.autocast."""
    for name, p in model.named_parameters():
        p.data = p.data.float() if keeps_fp32(name) else p.data.to(dtype)
    return model


def load_dit(path, config=None, device="cpu", dtype=torch.float32, num_layers=None) -> WanDiT:
    """Load a Wan 2.1 or 2.2 DiT from any official layout (see the module docstring): a file, a sharded
    index, an official folder (an A14B expert's high_noise_model/ or low_noise_model/), a Diffusers
    transformer/ or transformer_2/ folder; returns it in eval mode. fp8-scaled repacks are refused.

    config: a DiTConfig, a DIT_CONFIGS name, or None to infer it from the weights (and a folder's
    config.json). Without a config.json, num_heads = dim // 128, Wan's fixed head_dim.
    dtype applies to all weights except those of the fp32 islands (keeps_fp32), which stay fp32.
    num_layers: keep at most the first num_layers blocks (and the embeddings and head); the later
    blocks' weights are never read from a .safetensors file, nor converted or kept (a reward model's
    trunk from 8 of the 14B's 40 blocks reads a fifth of the file).
    """
    path = Path(path)
    files, config_json, source = _checkpoint_files(path)
    skip = None
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        later = re.compile(r"(?:^|\.)blocks\.(\d+)\.")  # the same in every layout ("model.diffusion_model.blocks.3.")
        skip = lambda key: (m := later.search(key)) is not None and int(m.group(1)) >= num_layers  # noqa: E731
    sd = {}
    for file in files:
        sd.update(_read(file, skip))
    _refuse_fp8(path, sd)
    sd, layout = _to_original_keys(sd)
    layout = f"{layout}, {source}"
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if config is None:
        absent = [k for k in _SHAPE_KEYS if k not in shapes]
        if absent:  # not a DiT at all: name what is missing and what does not belong
            _raise_load_error(path, layout, absent, [k for k in shapes if not k.startswith(_DIT_MODULES)], [])
        config = _infer_config(shapes, config_json)
    cfg = DIT_CONFIGS[config] if isinstance(config, str) else config
    if num_layers is not None:  # the blocks read: the first num_layers, or all when there are fewer
        cfg = replace(cfg, num_layers=min(cfg.num_layers, num_layers))
    with torch.device("meta"):
        model = WanDiT(cfg)
    _check_keys(path, f"{layout}; {cfg}", {k: v.shape for k, v in model.state_dict().items()}, shapes)
    sd = {k: v.to(device=device, dtype=torch.float32 if keeps_fp32(k) else dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def load_two_experts(high, low, boundary: float, guidance=(1.0, 1.0), **kwargs) -> TwoExpertDiT:
    """The A14B experts from their folders or files (official high_noise_model/ and low_noise_model/,
    or diffusers transformer/ = high and transformer_2/ = low); kwargs go to load_dit for both."""
    return TwoExpertDiT(load_dit(high, **kwargs), load_dit(low, **kwargs), boundary, guidance).eval()
