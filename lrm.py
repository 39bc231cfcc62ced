"""Ensemble latent reward model (LRM) of VELR, its Dollar-style baseline, the losses and update steps,
and the one writer and reader of LRM files (of every kind, lrm_dit.py's DiT-backbone LRM included).

Follows "VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models" (OpenReview
TctJWv7Suz; §4.1 Eq. 4-6, §4.2 Eq. 7, App. C.1, C.7; Table 7: ~0.02B parameters per member). A
member reads a clean Wan latent z (16, T, H, W) and the prompt's UMT5 embedding and predicts the
scalar a pixel-space video reward gives the decoded video: three 3D residual blocks (Eq. 4), tokens
with learnable temporal and spatial position embeddings, cross-attention to the prompt (its last
real token, or all real tokens), a pre-LN transformer encoder, pooling, an MLP head to a scalar.
`EnsembleLRM` runs N independent members as one batched computation, each trained on its own
minibatch, so their spread is an uncertainty estimate (§4.2); `lcb` = mean - k std is ours, beside
the paper's mean/min/max. `DollarLRM` is the Dollar baseline (Ding et al., ICCV 2025), rebuilt from
its description. Options beside the paper (off by default: older files load and score as before)
follow DiNa-LRM ("Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling", arXiv
2602.11146): a timestep-conditioned (FiLM) LRM, inference-time noise ensembling, Bradley-Terry and
noise-calibrated Thurstone pair losses, and an lcb with the aleatoric variance added.

Left out: flash-attention specifics (F.scaled_dot_product_attention picks its kernel) and the
paper's VELR/T and VELR/C ablation variants.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


OBJECTIVES = ("huber", "bce", "bt", "thurstone")
POINTWISE = ("huber", "bce")  # trained on one labelled sample at a time (the others on pairs)


@dataclass
class LRMConfig:
    """One member. The defaults give 20.8M parameters per member (0.02B; 0.21B for ten, as in Table 7)."""

    in_channels: int = 16  # Wan VAE latent channels
    text_dim: int = 4096  # UMT5-XXL width
    channels: tuple[int, ...] = (128, 256, 384)  # widths of the three residual blocks; d_v = channels[-1]
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))  # (t, h, w) per block
    norm_groups: int = 32
    num_heads: int = 6
    num_layers: int = 4  # transformer encoder depth
    ffn_dim: int = 1536
    max_frames: int = 21  # largest latent (T, H, W) the position embeddings cover: 81 frames, 1280 px
    max_height: int = 160
    max_width: int = 160
    text_mode: str = "last"  # "last": the last real prompt token (paper); "all": every real token
    pool: str = "mean"  # "mean" | "max" over the video tokens
    eps: float = 1e-5
    # Noise awareness (options beside the paper; off: VELR's clean-latent LRM, files without these fields).
    timestep_cond: bool = False  # FiLM of the token stream on the noise level (a noise-aware LRM)
    t_freq_dim: int = 64  # width of the sinusoidal embedding of t = 1000 sigma
    objective: str = "huber"  # what the LRM was trained with: "huber" (paper Eq. 6), "bce" (PRFL's, on binary
    #                           labels: the score is a logit), "bt" or "thurstone"
    huber_delta: float = 1.0  # the Huber delta of that training (online alignment re-uses it)
    label_threshold: float | None = None  # bce: a reward above it is label 1, else 0 (None: rewards in [0, 1] as given)
    # Image-to-video (an option beside the paper; off: the LRM scores z alone).
    image_cond: bool = False  # the first block also reads the conditioning image's latent, repeated over the latent
    #                           frames beside z on channels (EnsembleLRM.forward's `image`)

    def __post_init__(self):
        self.channels = tuple(self.channels)  # a config read back from JSON carries lists
        self.strides = tuple(tuple(s) for s in self.strides)
        if len(self.channels) != len(self.strides):
            raise ValueError(f"one stride per block: channels {self.channels}, strides {self.strides}")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"channels {self.channels} must be divisible by norm_groups {self.norm_groups}")
        if self.dim % self.num_heads:
            raise ValueError(f"d_v {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.text_mode not in ("last", "all"):
            raise ValueError(f"text_mode must be 'last' or 'all', got {self.text_mode!r}")
        if self.pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {self.pool!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.image_cond and self.timestep_cond:
            raise ValueError("image_cond and timestep_cond do not combine: an image-conditioned LRM scores clean "
                             "latents")
        if self.t_freq_dim < 2 or self.t_freq_dim % 2:
            raise ValueError(f"t_freq_dim must be even and >= 2, got {self.t_freq_dim}")

    @property
    def dim(self) -> int:
        return self.channels[-1]


LRM_CONFIGS = {
    "default": LRMConfig(),
    "tiny": LRMConfig(text_dim=64, channels=(16, 32, 64), norm_groups=8, num_heads=4, num_layers=2, ffn_dim=128),
}


# ----------------------------------------------------------------------------- pure functions

def downsampled_grid(size: tuple[int, int, int], strides) -> tuple[int, int, int]:
    """Latent (T, H, W) -> token grid after the blocks; kernel 3 / padding 1 and kernel 1 / padding 0
    convolutions with stride s both give ceil(n / s)."""
    for stride in strides:
        size = tuple((n - 1) // s + 1 for n, s in zip(size, stride))
    return size


def stack_members(z: torch.Tensor, n: int) -> torch.Tensor:
    """Latents -> member-stacked channels (B, N*C, T, H, W): z (B, C, T, H, W) is shared by all
    members, z (N, B, C, T, H, W) holds one batch per member."""
    if z.dim() == 5:
        return z.repeat(1, n, 1, 1, 1)
    return z.transpose(0, 1).flatten(1, 2)  # (B, N*C, T, H, W)


def text_tokens(context: torch.Tensor, lengths: torch.Tensor, mode: str):
    """Zero-padded context (N, B, L, C) and true lengths (N, B) -> keys (N, B, Lk, C), mask (N, B, Lk) or None.
    "last" keeps token lengths-1 (the EOS of a UMT5 prompt), "all" keeps every token and masks the padding."""
    if mode == "last":
        index = (lengths - 1)[..., None, None].expand(-1, -1, 1, context.shape[-1])
        return context.gather(2, index), None
    mask = torch.arange(context.shape[2], device=context.device) < lengths[..., None]
    return context, mask


def ensemble_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (N, B) -> mean (B,), std (B,) over the members (population std, 0 for one member)."""
    return rewards.mean(0), rewards.std(0, correction=0)


def aggregate(rewards: torch.Tensor, agg: str = "mean", k: float = 1.0) -> torch.Tensor:
    """Paper Eq. 7: Agg over members of rewards (N, B) -> (B,); lcb = mean - k * std."""
    if agg == "mean":
        return rewards.mean(0)
    if agg == "min":
        return rewards.min(0).values
    if agg == "max":
        return rewards.max(0).values
    if agg == "lcb":
        mean, std = ensemble_stats(rewards)
        return mean - k * std
    raise ValueError(f"agg must be mean, min, max or lcb, got {agg!r}")


def aggregate_lcb(rewards: torch.Tensor, k: float = 1.0, aleatoric=None) -> torch.Tensor:
    """Lower confidence bound with both kinds of uncertainty (our extension, beyond every paper here):

        lcb = mean - k * sqrt(Var_members + v)

    Var_members is the ensemble's (epistemic) population variance over members; v the per-sample
    (aleatoric) variance of the score, for a Thurstone-trained LRM v(sigma) = 2 sigma^2 + 0.05
    (`thurstone_var`). With aleatoric None this is exactly Eq. 7's mean - k * std."""
    if aleatoric is None:
        return aggregate(rewards, "lcb", k)
    return rewards.mean(0) - k * (rewards.var(0, correction=0) + aleatoric).sqrt()


def huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Paper Eq. 6, elementwise: 0.5 d^2 where |d| <= delta, else delta (|d| - delta / 2); d = target - pred."""
    d = (target - pred).abs()
    return torch.where(d <= delta, 0.5 * d * d, delta * (d - 0.5 * delta))


def bce_targets(reward: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """PRFL's binary quality labels from rewards: 1 where reward > threshold, else 0. Without a
    threshold the rewards are the labels and must be probabilities: one outside [0, 1] becomes NaN,
    left out like a missing label. A NaN reward stays NaN."""
    if threshold is not None:
        return torch.where(torch.isfinite(reward), (reward > threshold).to(reward.dtype), reward)
    return torch.where((reward >= 0) & (reward <= 1), reward, torch.full_like(reward, float("nan")))


def pointwise_loss(pred: torch.Tensor, target: torch.Tensor, objective: str = "huber", delta: float = 1.0):
    """Elementwise loss of a score against its label: Huber (Eq. 6), or binary cross-entropy with
    the score as the logit (PRFL; target a label in [0, 1])."""
    if objective == "bce":
        return F.binary_cross_entropy_with_logits(pred.float(), target.float(), reduction="none")
    if objective != "huber":
        raise ValueError(f"pointwise objective must be 'huber' or 'bce', got {objective!r}")
    return huber_loss(pred, target, delta)


# ----------------------------------------------------------------------------- noise awareness and pairs
# Noisy latents as Wan's flow matching makes them, z_sigma = (1 - sigma) z0 + sigma eps; the noise
# level enters the LRM as Wan's timestep t = 1000 sigma (PRFL, arXiv 2511.21541; LPO, arXiv 2502.01051;
# DiNa-LRM, arXiv 2602.11146: a timestep-conditioned reward head).

THURSTONE_FLOOR = 0.05  # v(0): the score variance of a clean latent (DiNa-LRM's noise-calibrated Thurstone)
NOISE_ENSEMBLE_SIGMAS = (0.0, 0.1, 0.2, 0.3)  # our default set of levels for `noise_ensemble` (low noise)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (..., dim) of t = 1000 sigma, Wan's layout: [cos(t f_i), sin(t f_i)],
    f_i = 10000^(-i / (dim / 2)); computed in float64, returned in float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=sigma.device) / half)
    angles = (sigma.double() * 1000)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], -1).float()


def noise_latents(z0: torch.Tensor, sigma, noise: torch.Tensor) -> torch.Tensor:
    """z_sigma = (1 - sigma) z0 + sigma eps, sigma a float or one per sample (leading dims of z0)."""
    sigma = torch.as_tensor(sigma, dtype=z0.dtype, device=z0.device)
    sigma = sigma.reshape(sigma.shape + (1,) * (z0.dim() - sigma.dim()))
    return (1 - sigma) * z0 + sigma * noise.to(z0.dtype)


def draw_sigmas(shape, grid: torch.Tensor, clean_prob: float, generator=None, draw: str = "grid") -> torch.Tensor:
    """Noise levels (shape) for noise-aware training: 0 (a clean latent) with probability clean_prob,
    else a point of the sampler's shifted grid `grid` (its `steps` sigmas, the final 0 excluded).
    draw "grid": uniform over the points (most mass at high noise under the shift); "uniform":
    DiNa-LRM's u ~ U[0, 1] snapped to the nearest point, each point as likely as its cell of [0, 1] is wide."""
    grid = torch.as_tensor(grid, dtype=torch.float32).flatten()
    if draw == "grid":
        sigma = grid[torch.randint(len(grid), tuple(shape), generator=generator)]
    elif draw == "uniform":
        u = torch.rand(tuple(shape), generator=generator)
        sigma = grid[(u[..., None] - grid).abs().argmin(-1)]
    else:
        raise ValueError(f"sigma draw must be 'grid' or 'uniform', got {draw!r}")
    clean = torch.rand(tuple(shape), generator=generator) < clean_prob
    return torch.where(clean, torch.zeros_like(sigma), sigma)


def thurstone_var(sigma) -> torch.Tensor:
    """DiNa-LRM's noise-dependent score variance v(sigma) = 2 sigma^2 + 0.05."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return 2 * sigma * sigma + THURSTONE_FLOOR


def thurstone_prob(s_a, s_b, sigma_a, sigma_b=None) -> torch.Tensor:
    """P(a > b) = Phi((s_a - s_b) / sqrt(v(sigma_a) + v(sigma_b))): DiNa-LRM's noise-calibrated
    Thurstone likelihood; with both at one sigma, Phi((s_a - s_b) / sqrt(2 v(sigma)))."""
    sigma_b = sigma_a if sigma_b is None else sigma_b
    scale = (thurstone_var(sigma_a) + thurstone_var(sigma_b)).to(s_a.device).sqrt()
    return torch.special.ndtr((s_a - s_b) / scale)


def bt_prob(s_a, s_b) -> torch.Tensor:
    """Bradley-Terry P(a > b) = sigmoid(s_a - s_b)."""
    return torch.sigmoid(s_a - s_b)


def bt_loss(s_a, s_b, p) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood for target probability p, elementwise:
    -p log sigmoid(s_a - s_b) - (1 - p) log sigmoid(s_b - s_a); p = 1 gives -log sigmoid(s_a - s_b)."""
    d = s_a - s_b
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))


def fidelity_loss(prob, p, eps: float = 1e-6) -> torch.Tensor:
    """Fidelity loss 1 - sqrt(p P) - sqrt((1 - p)(1 - P)) of a predicted P against a target p,
    elementwise; P is clamped to [eps, 1 - eps] (the square root's slope is infinite at 0)."""
    prob = prob.clamp(eps, 1 - eps)
    p = torch.as_tensor(p, dtype=prob.dtype, device=prob.device)
    # sqrt(p) sqrt(P), not sqrt(p P): at p = 0 or 1 the other term's gradient stays 0 instead of 0 * inf
    return 1 - p.sqrt() * prob.sqrt() - (1 - p).sqrt() * (1 - prob).sqrt()


def pair_loss(s_a, s_b, p, objective: str, sigma_a=0.0, sigma_b=None) -> torch.Tensor:
    """The pairwise loss of `objective` ("bt" or "thurstone"), elementwise."""
    if objective == "bt":
        return bt_loss(s_a, s_b, p)
    if objective == "thurstone":
        return fidelity_loss(thurstone_prob(s_a, s_b, sigma_a, sigma_b), p)
    raise ValueError(f"pairwise objective must be 'bt' or 'thurstone', got {objective!r}")


def make_pairs(groups, rewards, margin: float = 0.0, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference pairs from labelled samples: every two samples of the same group (prompt) whose
    rewards differ by at least `margin` (near-ties are dropped). Returns a (P,), b (P,) indices and
    the target p (P,) = 1 if reward a > reward b else 0; each pair's order is a coin flip (from
    `generator`), so a is not always the winner. Non-finite rewards form no pair."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    groups = list(groups)
    by_group = {}
    for i, key in enumerate(groups):
        if torch.isfinite(rewards[i]):
            by_group.setdefault(key, []).append(i)
    a, b = [], []
    for members in by_group.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if abs(rewards[i] - rewards[j]) >= margin and rewards[i] != rewards[j]:
                    a.append(i)
                    b.append(j)
    a, b = torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)
    flip = torch.rand(len(a), generator=generator) < 0.5
    a, b = torch.where(flip, b, a), torch.where(flip, a, b)
    return a, b, (rewards[a] > rewards[b]).float()


# ----------------------------------------------------------------------------- batched layers

class EnsembleConv3d(nn.Module):
    """N independent Conv3d(cin, cout, k, stride, padding k//2) as one grouped convolution:
    (B, N*cin, T, H, W) -> (B, N*cout, T', H', W')."""

    def __init__(self, n: int, cin: int, cout: int, kernel: int, stride=1):
        super().__init__()
        self.n, self.stride, self.padding = n, stride, kernel // 2
        self.weight = nn.Parameter(torch.empty(n, cout, cin, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(n, cout))

    def forward(self, x):
        w, b = self.weight.flatten(0, 1), self.bias.flatten()  # member-major (N*cout, cin, k, k, k)
        return F.conv3d(x, w, b, self.stride, self.padding, groups=self.n)


class EnsembleGroupNorm(nn.Module):
    """N independent GroupNorm(groups, c) on member-stacked channels: one GroupNorm with N*groups
    groups, because every member's channels form `groups` consecutive groups of their own."""

    def __init__(self, n: int, groups: int, c: int, eps: float):
        super().__init__()
        self.groups, self.eps = n * groups, eps
        self.weight = nn.Parameter(torch.empty(n, c))
        self.bias = nn.Parameter(torch.empty(n, c))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight.flatten(), self.bias.flatten(), self.eps)


class EnsembleLinear(nn.Module):
    """N independent Linear(din, dout): x (N, ..., din) -> (N, ..., dout) by one batched matmul."""

    def __init__(self, n: int, din: int, dout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dout, din))
        self.bias = nn.Parameter(torch.empty(n, dout))

    def forward(self, x):
        n = x.shape[0]
        y = torch.baddbmm(self.bias[:, None], x.reshape(n, -1, x.shape[-1]), self.weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], -1)


class EnsembleLayerNorm(nn.Module):
    """N independent LayerNorm(dim) on x (N, ..., dim)."""

    def __init__(self, n: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(n, dim))
        self.bias = nn.Parameter(torch.empty(n, dim))

    def forward(self, x):
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


# ----------------------------------------------------------------------------- blocks

class ResBlock3d(nn.Module):
    """Paper Eq. 4: H = SiLU(GN(W2 * SiLU(GN(W1 * H))) + D(H)); W1 and the 1x1x1 skip D carry the stride."""

    def __init__(self, n: int, cin: int, cout: int, stride, cfg: LRMConfig):
        super().__init__()
        self.conv1 = EnsembleConv3d(n, cin, cout, 3, stride)
        self.norm1 = EnsembleGroupNorm(n, cfg.norm_groups, cout, cfg.eps)
        self.conv2 = EnsembleConv3d(n, cout, cout, 3)
        self.norm2 = EnsembleGroupNorm(n, cfg.norm_groups, cout, cfg.eps)
        self.skip = EnsembleConv3d(n, cin, cout, 1, stride)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


class Attention(nn.Module):
    """Multi-head attention of queries x (N, B, Lq, dim) over keys/values y (N, B, Lk, kv_dim);
    mask (N, B, Lk) bool, True = attend. Keys and values are projected from kv_dim to dim."""

    def __init__(self, n: int, dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = EnsembleLinear(n, dim, dim)
        self.k = EnsembleLinear(n, kv_dim, dim)
        self.v = EnsembleLinear(n, kv_dim, dim)
        self.o = EnsembleLinear(n, dim, dim)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        n, b, length, d = t.shape
        return t.reshape(n * b, length, self.num_heads, -1).transpose(1, 2)  # (N*B, heads, L, head_dim)

    def forward(self, x, y, mask=None):
        n, b, lq, d = x.shape
        q, k, v = self.heads(self.q(x)), self.heads(self.k(y)), self.heads(self.v(y))
        mask = None if mask is None else mask.reshape(n * b, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N*B, heads, Lq, head_dim)
        return self.o(out.transpose(1, 2).reshape(n, b, lq, d))


class TransformerBlock(nn.Module):
    """Pre-LN transformer encoder block: self-attention, then a GELU MLP, both residual."""

    def __init__(self, n: int, cfg: LRMConfig):
        super().__init__()
        self.norm1 = EnsembleLayerNorm(n, cfg.dim, cfg.eps)
        self.self_attn = Attention(n, cfg.dim, cfg.num_heads, cfg.dim)
        self.norm2 = EnsembleLayerNorm(n, cfg.dim, cfg.eps)
        self.fc1 = EnsembleLinear(n, cfg.dim, cfg.ffn_dim)
        self.fc2 = EnsembleLinear(n, cfg.ffn_dim, cfg.dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TimestepFiLM(nn.Module):
    """Per-member FiLM on the noise level (DiNa-LRM's timestep-conditioned head, on our token stream):
    sigma (N, B) -> sinusoidal embedding of t = 1000 sigma -> Linear, SiLU -> Linear -> scale, shift
    (N, B, 1, D); tokens x (N, B, L, D) -> x (1 + scale) + shift. The output layer starts at zero
    (init_members), so a fresh conditioned LRM scores exactly like the unconditioned one."""

    def __init__(self, n: int, cfg: LRMConfig):
        super().__init__()
        self.freq_dim = cfg.t_freq_dim
        self.embed = EnsembleLinear(n, cfg.t_freq_dim, cfg.dim)
        self.out = EnsembleLinear(n, cfg.dim, 2 * cfg.dim)

    def forward(self, x, sigma):
        e = timestep_embedding(sigma, self.freq_dim).to(x.dtype)  # (N, B, F)
        scale, shift = self.out(F.silu(self.embed(e))).unsqueeze(2).chunk(2, -1)  # (N, B, 1, D) each
        return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- models

def init_members(model: nn.Module, seed: int):
    """Every init decision. Member i draws from its own generator seeded with seed + i, in parameter
    order, on the CPU (so the result does not depend on the device). Biases 0, norm scales 1,
    position embeddings N(0, 0.02^2), the FiLM output layer 0, all other weights N(0, 1/fan_in).
    The FiLM layers are registered last, so they draw after (and never change) every other weight."""
    with torch.no_grad():
        for i in range(model.n_members):
            g = torch.Generator().manual_seed(seed + i)
            for name, p in model.named_parameters():
                shape = p.shape[1:]
                if name.endswith("bias"):
                    value = torch.zeros(shape)
                elif "norm" in name:
                    value = torch.ones(shape)
                elif name.startswith("pos_"):
                    value = torch.randn(shape, generator=g) * 0.02
                elif name.startswith("film.out."):
                    value = torch.zeros(shape)  # FiLM starts as the identity (scale 0, shift 0)
                else:
                    value = torch.randn(shape, generator=g) / shape[1:].numel() ** 0.5
                p[i].copy_(value)


def _split_inputs(z, context, lengths, n: int, cfg: LRMConfig):
    """Validate inputs and bring them to the per-member form: context (N, B, L, C), lengths (N, B).
    z (B, 16, T, H, W) with context (B, L, C), lengths (B,) is one batch shared by all members;
    z (N, B, 16, T, H, W) with context (N, B, L, C), lengths (N, B) gives each member its own batch."""
    shared = z.dim() == 5
    if z.dim() not in (5, 6) or z.shape[-4] != cfg.in_channels or (not shared and z.shape[0] != n):
        c = cfg.in_channels
        raise ValueError(f"z must be (B, {c}, T, H, W) or ({n}, B, {c}, T, H, W), got {tuple(z.shape)}")
    if context.dim() != z.dim() - 2 or context.shape[-1] != cfg.text_dim or lengths.shape != context.shape[:-2]:
        raise ValueError(
            f"context {tuple(context.shape)} / lengths {tuple(lengths.shape)} do not match "
            f"z {tuple(z.shape)} and text_dim {cfg.text_dim}"
        )
    if (lengths < 1).any() or (lengths > context.shape[-2]).any():
        raise ValueError(f"lengths must be in [1, {context.shape[-2]}], got {lengths.tolist()}")
    if shared:
        context, lengths = context.expand(n, *context.shape), lengths.expand(n, *lengths.shape)
    return context, lengths


class EnsembleLRM(nn.Module):
    """N LRM members evaluated together: forward(z, context, lengths) -> rewards (N, B) fp32.

    z: (B, 16, T, H, W) shared, or (N, B, 16, T, H, W) one batch per member (training);
    context: the zero-padded UMT5 embedding (B, L, text_dim) / (N, B, L, text_dim), L up to 512;
    lengths: the true token counts (B,) / (N, B). Gradients flow to z (ReFL needs them).

    Per member (paper §4.1):
        three 3D residual blocks   H = SiLU(GN(W2 * SiLU(GN(W1 * H))) + D(H)), each downsampling
        tokens + learnable temporal and spatial position embeddings
        cross-attention            video tokens -> prompt (the last real token, or all real tokens)
        transformer encoder        pre-LN self-attention + MLP blocks
        pooling over tokens, MLP head -> scalar
    The "last token" is the last *real* token (index lengths - 1 of the zero-padded context), never
    a padding row.

    Every parameter carries a leading member dimension (N, ...): the convolutions are grouped
    convolutions with groups=N on member-stacked channels (B, N*C, T, H, W), the linear layers are
    batched matmuls over (N, B, L, D) tokens, attention folds (N, B) into its batch. We chose explicit
    batched layers over torch.func.vmap: the computation is plain PyTorch that reads like a single
    model, works with DDP, autocast and meta-device loading, and member i's weights are simply `p[i]`
    of every parameter. Members are independent models stored together: member i is initialised from
    its own generator seeded with seed + i (so it equals `EnsembleLRM(cfg, 1, seed=seed + i)`), and
    `lrm_update` gives every member its own minibatch.
    """

    kind = "ensemble"

    def __init__(self, cfg: LRMConfig, n_members: int = 10, seed: int = 0):
        super().__init__()
        self.cfg, self.n_members = cfg, n_members
        n, widths = n_members, (cfg.in_channels * (2 if cfg.image_cond else 1),) + cfg.channels
        self.blocks = nn.ModuleList(
            ResBlock3d(n, cin, cout, s, cfg) for cin, cout, s in zip(widths, widths[1:], cfg.strides)
        )
        t, h, w = downsampled_grid((cfg.max_frames, cfg.max_height, cfg.max_width), cfg.strides)
        self.pos_temporal = nn.Parameter(torch.empty(n, t, cfg.dim))
        self.pos_spatial = nn.Parameter(torch.empty(n, h, w, cfg.dim))
        self.norm_cross = EnsembleLayerNorm(n, cfg.dim, cfg.eps)
        self.cross_attn = Attention(n, cfg.dim, cfg.num_heads, cfg.text_dim)
        self.layers = nn.ModuleList(TransformerBlock(n, cfg) for _ in range(cfg.num_layers))
        self.norm_out = EnsembleLayerNorm(n, cfg.dim, cfg.eps)
        self.head1 = EnsembleLinear(n, cfg.dim, cfg.dim)
        self.head2 = EnsembleLinear(n, cfg.dim, 1)
        if cfg.timestep_cond:  # registered last: see init_members
            self.film = TimestepFiLM(n, cfg)
        if self.pos_temporal.device.type != "meta":
            init_members(self, seed)

    @property
    def noise_aware(self) -> bool:
        return self.cfg.timestep_cond

    def member_sigmas(self, sigma, z: torch.Tensor) -> torch.Tensor:
        """sigma (None = 0, a float, (B,) or (N, B)) -> (N, B) float32 on z's device. An LRM without
        timestep conditioning only scores clean latents: a non-zero sigma is an error."""
        n, b = self.n_members, z.shape[-5]
        if sigma is None:
            sigma = torch.zeros(())
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device)
        if not self.noise_aware and bool((sigma != 0).any()):
            raise ValueError("this LRM scores clean latents only (sigma = 0); a noisy latent needs a noise-aware LRM "
                             "(train_lrm.py --noise-aware)")
        if sigma.dim() > 2 or (sigma.dim() == 2 and sigma.shape[0] != n) or (sigma.dim() >= 1 and sigma.shape[-1] != b):
            raise ValueError(f"sigma must be a number, ({b},) or ({n}, {b}), got {tuple(sigma.shape)}")
        return sigma.expand(n, b)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Block output (B, N*D, t, h, w) -> tokens (N, B, t*h*w, D) with position embeddings added."""
        t, h, w = x.shape[2:]
        x = x.unflatten(1, (self.n_members, -1)).permute(1, 0, 3, 4, 5, 2)  # (N, B, t, h, w, D)
        pos = self.pos_temporal[:, None, :t, None, None] + self.pos_spatial[:, None, None, :h, :w]  # (N, 1, t, h, w, D)
        return (x + pos).flatten(2, 4)

    def check_size(self, z: torch.Tensor):
        cfg, size = self.cfg, tuple(z.shape[-3:])
        if any(s > m for s, m in zip(size, (cfg.max_frames, cfg.max_height, cfg.max_width))):
            raise ValueError(
                f"latent (T, H, W) {size} exceeds the position embeddings' maximum "
                f"({cfg.max_frames}, {cfg.max_height}, {cfg.max_width}); raise max_frames/max_height/max_width"
            )

    def forward(self, z, context, lengths, sigma=None, image=None):
        """sigma: the noise level of z (None: clean); only a noise-aware (timestep_cond) LRM reads it.
        image: the conditioning image's latent (B, C, 1, H, W) / (N, B, C, 1, H, W), read by an image_cond
        LRM only; None: z's own first latent frame, which is the image for real videos (the first frame an
        image-to-video model is given; the causal VAE encodes it alone) and for the TI2V-5B's output."""
        self.check_size(z)
        dtype = self.head2.weight.dtype
        context, lengths = _split_inputs(z, context.to(dtype), lengths, self.n_members, self.cfg)
        sigma = self.member_sigmas(sigma, z)
        if self.cfg.image_cond:
            image = z[..., :1, :, :] if image is None else image.to(z.device, z.dtype)
            if image.shape[:-3] != z.shape[:-3] or image.shape[-3] != 1 or image.shape[-2:] != z.shape[-2:]:
                raise ValueError(f"image must be z's shape with one latent frame, {tuple(z.shape[:-3])} + (1, "
                                 f"{z.shape[-2]}, {z.shape[-1]}), got {tuple(image.shape)}")
            z = torch.cat([z, image.expand_as(z)], dim=-4)  # [z, image] on channels
        x = stack_members(z.to(dtype), self.n_members)  # (B, N*16, T, H, W)
        for block in self.blocks:
            x = block(x)
        x = self.tokens(x)  # (N, B, L, D)
        if self.noise_aware:
            x = self.film(x, sigma)
        keys, mask = text_tokens(context, lengths, self.cfg.text_mode)
        x = x + self.cross_attn(self.norm_cross(x), keys, mask)
        for layer in self.layers:
            x = layer(x)
        x = self.norm_out(x)
        x = x.mean(2) if self.cfg.pool == "mean" else x.amax(2)  # (N, B, D)
        return self.head2(F.silu(self.head1(x))).squeeze(-1).float()


class DollarLRM(nn.Module):
    """The Dollar baseline (Ding et al., ICCV 2025), reproduced from its description; rewards (1, B).

    Dollar's latent reward model is not public, and neither the VELR paper (which reproduced it
    "based on its description", §5.6, Table 3) describes it only as a simpler latent reward network) gives
    its layers. Our reproduction keeps what such a regressor needs and nothing of
    VELR's additions: per block one strided 3x3x3 convolution + GroupNorm + SiLU (no residual
    path), global mean pooling, the last real prompt token projected to the same width and
    concatenated (no cross-attention, no position embeddings, no transformer), a 2-layer MLP to a
    scalar. Widths and strides come from the same LRMConfig, so it sees the same data as a member.
    Built from the same batched layers, so `n_members` > 1 would work, but the baseline is one model.
    """

    kind = "dollar"
    noise_aware = False

    def __init__(self, cfg: LRMConfig, n_members: int = 1, seed: int = 0):
        super().__init__()
        if cfg.timestep_cond:
            raise ValueError("the Dollar baseline has no timestep conditioning (timestep_cond must be False)")
        self.cfg, self.n_members = cfg, n_members
        n, widths = n_members, (cfg.in_channels,) + cfg.channels
        self.convs = nn.ModuleList(EnsembleConv3d(n, a, b, 3, s) for a, b, s in zip(widths, widths[1:], cfg.strides))
        self.norms = nn.ModuleList(EnsembleGroupNorm(n, cfg.norm_groups, c, cfg.eps) for c in cfg.channels)
        self.text_proj = EnsembleLinear(n, cfg.text_dim, cfg.dim)
        self.head1 = EnsembleLinear(n, 2 * cfg.dim, cfg.dim)
        self.head2 = EnsembleLinear(n, cfg.dim, 1)
        if self.text_proj.weight.device.type != "meta":
            init_members(self, seed)

    def forward(self, z, context, lengths, sigma=None):
        if sigma is not None and bool((torch.as_tensor(sigma) != 0).any()):
            raise ValueError("the Dollar LRM scores clean latents only (sigma = 0)")
        dtype = self.head2.weight.dtype
        context, lengths = _split_inputs(z, context.to(dtype), lengths, self.n_members, self.cfg)
        x = stack_members(z.to(dtype), self.n_members)
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        video = x.mean((2, 3, 4)).unflatten(1, (self.n_members, -1)).transpose(0, 1)  # (N, B, D)
        text = self.text_proj(text_tokens(context, lengths, "last")[0].squeeze(2))  # (N, B, D)
        return self.head2(F.silu(self.head1(torch.cat([video, text], -1)))).squeeze(-1).float()


def _from_lrm_dit(name: str):
    """A class of lrm_dit.py (the DiT-backbone LRM), imported only when a "dit" file or model needs it,
    so that this file imports with torch and safetensors alone."""
    try:
        import lrm_dit
    except ModuleNotFoundError as err:
        if err.name != "lrm_dit":
            raise
        raise ImportError("kind 'dit': a DiT-backbone LRM file needs lrm_dit.py beside lrm.py") from None
    return getattr(lrm_dit, name)


class _KindTable(Mapping):
    """kind -> class, where a str value names a class of lrm_dit.py that is imported on lookup
    (`kind in table` and iterating the kinds import nothing)."""

    def __init__(self, table: dict):
        self._table = table

    def __getitem__(self, kind: str):
        value = self._table[kind]
        return _from_lrm_dit(value) if isinstance(value, str) else value

    def __contains__(self, kind) -> bool:
        return kind in self._table

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


MODEL_KINDS = _KindTable({"ensemble": EnsembleLRM, "dollar": DollarLRM, "dit": "DiTRewardModel"})
CONFIG_OF_KIND = _KindTable({"dit": "DiTLRMConfig"})  # the config class of a kind's file; every other kind: LRMConfig


def noise_ensemble(model, z0, context, lengths, sigmas=NOISE_ENSEMBLE_SIGMAS, seed: int = 0) -> torch.Tensor:
    """DiNa-LRM's inference-time noise ensembling: the clean latents z0 (B, 16, T, H, W) re-noised at
    each level of `sigmas` with fixed noise (level i: a CPU generator seeded with seed + i, one draw of
    z0's shape) and scored at that level; rewards (N, B) averaged over the levels. Deterministic, and
    differentiable in z0 (usable as a ReFL reward). A level 0 scores z0 itself."""
    total = 0
    for i, sigma in enumerate(sigmas):
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + i)).to(z0.device)
        zs = noise_latents(z0, float(sigma), noise) if sigma else z0
        total = total + model(zs, context, lengths, sigma=float(sigma) if sigma else None)
    return total / len(sigmas)


# ----------------------------------------------------------------------------- training step

def bootstrap_indices(n_members: int, batch: int, generator=None) -> torch.Tensor:
    """(N, B) sample indices: every member's own bootstrap resample (with replacement) of a batch of B."""
    return torch.randint(batch, (n_members, batch), generator=generator)


def lrm_update(model, optimizer, z, context, lengths, target, *, delta=1.0, bootstrap=False, generator=None,
               amp_dtype=None, sigma=None, objective="huber", label_threshold=None, image=None):
    """One Huber step (paper Eq. 6) of an ensemble or Dollar LRM; target = the pixel reward of the
    decoded latents. All members run in one batched forward; which samples each member sees:

      z (B, 16, T, H, W), context (B, L, C), lengths (B,), target (B,) - one batch for all members:
        bootstrap=False (default): the batch as is, diversity from the independent inits;
        bootstrap=True: each member its own bootstrap resample of it (indices from `generator`).
        The default is False because resampling a small batch hurts: a resample of the paper's 4
        leaves each member ~2.7 distinct samples and weights the rest double (BENCH.md has a toy run).
      z (N, B, 16, T, H, W), context (N, B, L, C), lengths (N, B), target (N, B) - the caller's
        own minibatch per member (e.g. each member its own shuffled data order); no resampling.

    The loss is the sum over members of each member's mean Huber loss, so each member gets exactly
    the gradient it would get alone. `model` may be wrapped in DDP. amp_dtype (e.g. torch.bfloat16)
    runs the forward under autocast; the backward runs outside it.

    Non-finite values never reach the weights:
      - a non-finite target is not trained on: its sample is left out of its member's mean (a member
        with no finite target in its minibatch gets a zero gradient this step);
      - a step whose loss or gradients are not finite, or that has no finite target at all, is
        skipped: no optimizer step (the optimizer state is not advanced), gradients cleared. Under
        DDP every rank takes the same decision.
    With finite inputs the step is exactly the plain one.

    sigma (None, (B,) or (N, B) like target): the noise level of each latent, for a noise-aware LRM.
    image (None, or like z with one latent frame): each latent's conditioning image, for an image_cond LRM.
    objective "bce" (PRFL): binary cross-entropy of the score as a logit against the label
    bce_targets(target, label_threshold) (a reward outside [0, 1] without a threshold counts as non-finite).

    Returns {"loss": mean member loss, "mse": mean member squared error (bce: of sigmoid(score))} on
    their minibatches (finite samples only), "dropped": how many target values were non-finite
    (entries of the target the caller passed), "skipped": True if nothing was applied.
    """
    n = getattr(model, "module", model).n_members  # DDP keeps the model in .module
    if objective == "bce":
        target = bce_targets(target, label_threshold)
    finite = torch.isfinite(target)
    dropped = int(finite.numel() - finite.sum())
    if z.dim() == 5 and bootstrap:
        idx = bootstrap_indices(n, z.shape[0], generator).to(z.device)  # (N, B)
        z, context, lengths, target = z[idx], context[idx], lengths[idx], target[idx]
        sigma = None if sigma is None else sigma[idx]
        image = None if image is None else image[idx]
    extra = ({} if sigma is None else {"sigma": sigma}) | ({} if image is None else {"image": image})
    with torch.autocast(z.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        pred = model(z, context, lengths, **extra)  # (N, B)
    target = target.float().expand_as(pred)
    seen = pred.detach().float().sigmoid() if objective == "bce" else pred.detach()  # what mse compares
    if dropped:
        keep = torch.isfinite(target)
        target = torch.where(keep, target, 0.5 if objective == "bce" else pred.detach())  # safe, masked out below
        count = keep.sum(1)
        loss = torch.where(keep, pointwise_loss(pred, target, objective, delta), 0).sum(1) / count.clamp_min(1)  # (N,)
        mse = (torch.where(keep, seen - target, 0).pow(2).sum() / count.sum().clamp_min(1)).item()
        usable = bool(count.sum() > 0)
    else:
        loss = pointwise_loss(pred, target, objective, delta).mean(1)  # (N,)
        mse = (seen - target).pow(2).mean().item()
        usable = True
    skipped = _apply(model, optimizer, loss, usable)
    return {"loss": loss.mean().item(), "mse": mse, "dropped": dropped, "skipped": skipped}


def _apply(model, optimizer, loss, usable: bool) -> bool:
    """Backward of the member losses (N,) and the optimizer step, unless the loss or a gradient is
    not finite or nothing was usable (then no step and cleared gradients; under DDP one rank's skip
    is every rank's). Returns True when skipped."""
    optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()  # always, so that DDP ranks meet in the gradient all-reduce
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    ok = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads]).all()
    ok = ok & usable
    if hasattr(model, "module") and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = (~ok).to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one rank's skip is every rank's
        ok = flag[0] == 0
    skipped = not bool(ok)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return skipped


def lrm_pair_update(model, optimizer, z_a, z_b, context, lengths, p, *, objective="bt", sigma=None, amp_dtype=None):
    """One pairwise step: every member scores both sides of its own pairs in one batched forward,
    z_a / z_b (N, P, 16, T, H, W), context (N, P, L, C) and lengths (N, P) of the pair's prompt,
    p (N, P) the target P(a > b), sigma (N, P) the pair's noise level (both sides; None = clean).
    The loss: Bradley-Terry -log sigmoid(s_a - s_b) (soft target p) or DiNa-LRM's noise-calibrated
    Thurstone fidelity loss (`pair_loss`); per member the mean over its finite-target pairs, summed
    over members. Non-finite targets and steps are handled as in `lrm_update`.
    Returns {"loss", "acc" (share of pairs ordered as p says, p != 0.5), "dropped", "skipped"}."""
    finite = torch.isfinite(p)
    dropped = int(finite.numel() - finite.sum())
    both = lambda a, b: torch.cat([a, b], 1)  # noqa: E731  (N, 2P, ...)
    sig = None if sigma is None else both(sigma, sigma)
    with torch.autocast(z_a.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        s = model(both(z_a, z_b), both(context, context), both(lengths, lengths), sigma=sig).float()
    s_a, s_b = s.chunk(2, 1)
    target = torch.where(finite, p, 0.5).float()
    loss = pair_loss(s_a, s_b, target, objective, 0.0 if sigma is None else sigma)
    count = finite.sum(1)
    loss = torch.where(finite, loss, 0).sum(1) / count.clamp_min(1)  # (N,)
    decided = finite & (p != 0.5)
    acc = (((s_a > s_b).float() == (p > 0.5).float()) & decided).sum() / decided.sum().clamp_min(1)
    skipped = _apply(model, optimizer, loss, bool(count.sum() > 0))
    return {"loss": loss.mean().item(), "acc": acc.item(), "dropped": dropped, "skipped": skipped}


# ----------------------------------------------------------------------------- save / load

def save_lrm(model: nn.Module, path):
    """safetensors with the model kind, member count and config (JSON) in the metadata.
    Refuses (ValueError) a model with any NaN/inf weight. Written to a temporary file, fsync'ed and
    renamed over `path`, so a kill or a full disk never leaves a torn file under the final name."""
    metadata = {"kind": model.kind, "n_members": str(model.n_members), "config": json.dumps(asdict(model.cfg)),
                "config_digest": json.dumps(_field_digests(model.cfg))}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        raise ValueError(f"refusing to save an LRM with {sum(bad.values())} non-finite values in {len(bad)} "
                         f"tensors (first: {next(iter(bad))}) to {path}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_finite(path, state: dict) -> dict:
    """One pass over the loaded tensors: a weight file holding NaN or inf is refused, naming the first."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} holds NaN or inf; the weight file is corrupt (re-export or "
                             f"re-download it)")
    return state


def _read(path: Path, device="cpu") -> tuple[str, int, LRMConfig, dict]:
    """The one reader of this file: a save_lrm .safetensors -> (kind, member count, config from the
    metadata, name -> tensor on device). The metadata is checked before any tensor is read. Every way
    the file can be missing, empty, truncated or of the wrong kind ends here in an error that names it."""
    expected = "expected an LRM .safetensors written by save_lrm"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; {expected}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); {expected}")
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            kind, n, cfg = _config_of(path, f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}; {expected}") from err
    return kind, n, cfg, _check_finite(path, state)


def _field_digests(cfg) -> dict:
    """field (nested ones dotted: dit.num_heads) -> a short hash of its value. save_lrm stores them beside
    the config, so a field edited in the metadata after saving is found on load and named: num_heads,
    eps, text_len and the like do not show in the tensor shapes, and the weights would load into
    another model without a word."""
    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return {k: hashlib.sha256(json.dumps(v).encode()).hexdigest()[:12] for k, v in flat(asdict(cfg))}


def _config_of(path: Path, meta: dict) -> tuple[str, int, LRMConfig]:
    """Model kind, member count and config from a save_lrm file's metadata; the config is compared
    field by field with the digests save_lrm wrote (files without them, from before, are read as they
    are; a field the code gained since takes its default, as its reader does)."""
    if meta.get("kind") not in MODEL_KINDS:
        raise ValueError(
            f"{path} is not an LRM file written by save_lrm: "
            f"kind {meta.get('kind')!r}, expected one of {list(MODEL_KINDS)}"
        )
    try:
        n = int(meta["n_members"])
        if n < 1:
            raise ValueError(f"{n} < 1")
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: metadata 'n_members' is {meta.get('n_members')!r}, expected a positive "
                         f"integer (written by save_lrm)") from err
    try:
        cfg = CONFIG_OF_KIND.get(meta["kind"], LRMConfig)(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:  # absent, not JSON, unknown fields, invalid values
        raise ValueError(f"{path}: metadata 'config' is not an LRMConfig as save_lrm writes it: "
                         f"{type(err).__name__}: {err}") from err
    if "config_digest" in meta:
        try:
            saved = json.loads(meta["config_digest"])
        except ValueError as err:
            raise ValueError(f"{path}: metadata 'config_digest' is not JSON ({err}); the file was edited") from err
        now = _field_digests(cfg)  # a field added to the config after the file was written is not in `saved`
        edited = sorted(k for k in saved if saved[k] != now.get(k))
        if edited:
            raise ValueError(f"{path}: metadata config fields {edited} are not what save_lrm wrote with these weights "
                             f"(edited after saving?); refusing to load the weights into another model")
    return meta["kind"], n, cfg


def read_config(path) -> tuple[str, int, LRMConfig]:
    """(kind, member count, config) of a save_lrm file from its metadata alone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file)")
    try:
        with safe_open(str(path), "pt") as f:
            return _config_of(path, f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err


def load_lrm(path, device="cpu") -> nn.Module:
    """Rebuild the model a `save_lrm` file describes (on the meta device) and load its weights."""
    path = Path(path)
    kind, n, cfg, state = _read(path, device)
    with torch.device("meta"):
        model = MODEL_KINDS[kind](cfg, n_members=n)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in state and state[k].shape != s
    )
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}  # a bf16 trunk (trunk_dtype) is built in bf16
    mistyped = sorted(f"{k} {state[k].dtype} != {d}" for k, d in dtypes.items() if k in state and state[k].dtype != d)
    if missing or unexpected or misshaped or mistyped:
        raise ValueError(
            f"{path} does not fit a {kind} LRM with {n} members (layout: lrm.save_lrm): "
            f"missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}, of another dtype {mistyped[:4]}"
            + (f" (metadata trunk_dtype {cfg.trunk_dtype})" if mistyped and hasattr(cfg, "trunk_dtype") else "")
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model
