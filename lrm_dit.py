"""The generator as the reward model: a DiT-backbone LRM (kind "dit") that `lrm.save_lrm` writes and
`lrm.load_lrm` reads like every other LRM.

The patch embedding, text and time conditioning, RoPE and the first n blocks of a Wan DiT
(model_dit.WanDiT, its modules and numerics unchanged) read the noisy latent at t = 1000 sigma as the
generator does; N heads on that one shared trunk are the ensemble's members, each a learned-query
attention pooling and an MLP to a scalar. Its interface is lrm.EnsembleLRM's: forward(z, context,
lengths, sigma=None) -> rewards (N, B) fp32, trained by lrm.lrm_update / lrm.lrm_pair_update.

Follows PRFL ("Video Generation Models Are Good Latent Reward Models", arXiv 2511.21541, §3):
blocks 0-7 of the 14B as the trunk, one learnable query, MLP 5120 -> 1024 -> 512 -> 1. The ensemble
of heads on one trunk is ours. Options: a frozen or LoRA-adapted trunk, fp32 or bf16 trunk weights.

Left out here: PRFL's ReFL recipe for the generator (train_refl.py --preset prfl) and any trunk other
than a Wan DiT's own first blocks.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lora
from lrm import OBJECTIVES, EnsembleLayerNorm, EnsembleLinear, _split_inputs, init_members
from model_dit import DiTConfig, WanDiT, cast_dit, load_dit, rope_freqs, sinusoidal_embedding


TRUNKS = ("frozen", "lora", "full")


TRUNK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class DiTLRMConfig:
    """A DiT-backbone LRM: the trunk's DiTConfig (num_layers = the n blocks kept), the heads, the trunk mode."""

    dit: DiTConfig = None  # the generator's config with num_layers = n (PRFL: 8 of the 14B's 40)
    pool_heads: int = 0  # attention heads of each member's pooling; 0: the trunk's num_heads
    mlp_dims: tuple[int, ...] = (1024, 512)  # hidden widths of each member's MLP to a scalar (PRFL: 1024, 512)
    trunk: str = "frozen"  # "frozen" | "lora": LoRA adapters on the trunk blocks' Linears, trained with the heads |
    #                        "full": the kept blocks' own weights trained (PRFL; the embeddings stay frozen)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    objective: str = "huber"  # what it was trained with, as LRMConfig.objective
    huber_delta: float = 1.0  # the Huber delta of that training, as LRMConfig.huber_delta
    label_threshold: float | None = None  # bce's binary labels, as LRMConfig.label_threshold
    # trained on re-noised latents (train_lrm.py --noise-aware), so it scores x_t at its sigma: the
    # trunk always reads t = 1000 sigma, but one trained on clean latents only is no process reward
    noise_aware: bool = False
    # the trunk's weights: "float32", or "bfloat16" (Wan's fp32 islands kept fp32, run under bf16
    # autocast as the generator is): half the memory and file size (8 blocks of the 14B: 11 -> 5.6 GB)
    trunk_dtype: str = "float32"

    def __post_init__(self):
        self.dit = DiTConfig(**self.dit) if isinstance(self.dit, dict) else (self.dit or DiTConfig(num_layers=8))
        if self.trunk_dtype not in TRUNK_DTYPES:
            raise ValueError(f"trunk_dtype must be one of {sorted(TRUNK_DTYPES)}, got {self.trunk_dtype!r}")
        self.mlp_dims = tuple(self.mlp_dims)
        if any(d < 1 for d in self.mlp_dims):
            raise ValueError(f"mlp_dims must all be >= 1, got {self.mlp_dims}")
        if self.dit.num_layers < 1:
            raise ValueError(f"the trunk needs at least one block, got num_layers={self.dit.num_layers}")
        if self.dit.dim % self.heads:
            raise ValueError(f"pool_heads {self.heads} must divide the trunk width {self.dit.dim}")
        if self.trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {self.trunk!r}")
        if self.trunk == "full" and self.trunk_dtype != "float32":
            raise ValueError("trunk 'full' trains the blocks' weights: keep them float32 (trunk_dtype)")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    # what the rest of the code reads from an LRM config
    in_channels = property(lambda self: self.dit.in_dim)
    text_dim = property(lambda self: self.dit.text_dim)
    timestep_cond = property(lambda self: self.noise_aware)  # scores noisy latents (what check_noise_aware reads)
    heads = property(lambda self: self.pool_heads or self.dit.num_heads)


class PoolHeads(nn.Module):
    """N members' heads: a learned query attends over the tokens (pre-LN, multi-head; key projection
    without bias, value and output projections), then an MLP (GELU) to a scalar.
    tokens (N or 1, B, L, D) -> scores (N, B).

    Computed without projecting every token for every member (the same function as the plain
    attention): head h's logit of token l is q_h . W_k,h (g * xhat_l + b) = xhat_l . (g * W_k,h^T q_h)
    + a constant that cancels in the softmax (xhat: the LayerNorm before its affine g, b, shared by
    all members), and its output is W_v,h (g * sum_l a_l xhat_l + b) + b_v,h since the weights a_l
    sum to 1. So every member and head reads the tokens twice (O(N H L D)) instead of N key and value
    projections of all tokens (O(N L D^2)), and only the shared xhat (B, L, D) is stored."""

    def __init__(self, n: int, cfg: DiTLRMConfig):
        super().__init__()
        dim, self.n_members, self.num_heads, self.eps = cfg.dit.dim, n, cfg.heads, cfg.dit.eps
        self.query = nn.Parameter(torch.empty(n, 1, dim))
        self.norm = EnsembleLayerNorm(n, dim, cfg.dit.eps)
        self.key = nn.Parameter(torch.empty(n, dim, dim))  # W_k (out, in); a key bias would cancel in the softmax
        self.value = EnsembleLinear(n, dim, dim)
        self.out = EnsembleLinear(n, dim, dim)
        widths = (dim,) + cfg.mlp_dims + (1,)
        self.mlp = nn.ModuleList(EnsembleLinear(n, a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, tokens):
        n, h, d = self.n_members, self.num_heads, tokens.shape[-1]
        e = d // h
        xhat = F.layer_norm(tokens, (d,), eps=self.eps)  # (N|1, B, L, D)
        g, b = self.norm.weight, self.norm.bias  # (N, D)
        u = torch.einsum("nhe,nhed->nhd", self.query.view(n, h, e), self.key.view(n, h, e, d)) * g[:, None] / math.sqrt(e)
        a = (xhat @ u.transpose(1, 2)[:, None].to(xhat.dtype)).softmax(2)  # (N, B, L, H): weights over the tokens
        pooled = a.transpose(2, 3).to(xhat.dtype) @ xhat * g[:, None, None] + b[:, None, None]  # (N, B, H, D) = sum a LN(x)
        v = torch.einsum("nbhd,nhed->nbhe", pooled, self.value.weight.view(n, h, e, d)) + self.value.bias.view(n, 1, h, e)
        x = self.out(v.flatten(2))  # (N, B, D)
        for i, layer in enumerate(self.mlp):
            x = layer(x if i == 0 else F.gelu(x, approximate="tanh"))
        return x.squeeze(-1)


class DiTRewardModel(nn.Module):
    """The generator's first n blocks as a shared trunk, N pooling + MLP heads as the members:
    forward(z, context, lengths, sigma=None) -> rewards (N, B) fp32, the interface of EnsembleLRM.

    Trunk (PRFL, arXiv 2511.21541, §3): Wan's patch embedding, text embedding, time embedding and
    6-way projection, 3-D RoPE and blocks 0..n-1, exactly WanDiT's modules and numerics, reading the
    latent at t = 1000 sigma (sigma None or 0: a clean latent, t = 0) and the prompt zero-padded to
    text_len rows (rows past `lengths` are zeroed first). Initialise it from a generator with
    `dit_reward_model_from`; `DiTRewardModel(cfg)` alone draws Wan's random init from `seed`.
    cfg.trunk: "frozen" (never trained; `requires_grad_` leaves it off), "lora" (lora.add_lora on
    every block Linear, rank cfg.lora_rank; the adapters start at zero, so the trunk starts as the
    generator's and trains with the heads) or "full" (the blocks' weights train, PRFL's reward
    model; `trunk_parameters` gives them for their own learning rate). Gradients always flow to z (ReFL needs them);
    `model.trunk.gradient_checkpointing = True` recomputes each trunk block in the backward.

    Members: N heads (PoolHeads) on the one trunk, so N members cost one trunk forward plus N small
    heads. Shared inputs (z (B, ...) with one sigma per sample) run the trunk once; per-member batches
    (z (N, B, ...), or member-specific sigmas) run it on all N*B samples. Diversity between members
    comes from (1) each head's own init (init_members: member i draws from a generator seeded with
    seed + i) and (2) each member's own data order: lrm_update / lrm_pair_update's per-member
    minibatches, which train_lrm.py and the alignment of train_refl.py feed. The trunk is shared, so
    the spread over members measures the heads' disagreement on one representation: with a frozen
    trunk that is all of it, with LoRA the adapters are trained by every member's loss.
    """

    kind = "dit"
    noise_aware = property(lambda self: self.cfg.noise_aware)  # alignment re-noises the buffer for such an LRM

    def __init__(self, cfg: DiTLRMConfig, n_members: int = 10, seed: int = 0):
        super().__init__()
        self.cfg, self.n_members = cfg, n_members
        with torch.random.fork_rng(devices=[]):  # Wan's init draws from the global RNG: seed it, leave the caller's
            torch.manual_seed(seed)
            self.trunk = WanDiT(cfg.dit)
        self.trunk.head = None  # only the blocks' tokens are used
        if cfg.trunk_dtype != "float32":
            cast_dit(self.trunk, TRUNK_DTYPES[cfg.trunk_dtype])
        self.trunk.requires_grad_(False)
        if cfg.trunk == "lora":  # freezes the trunk, trainable fp32 adapters in every block Linear
            lora.add_lora(self.trunk, cfg.lora_rank, cfg.lora_alpha, generator=torch.Generator().manual_seed(seed + 104729))
        for p in self.trunk_parameters():  # a full trunk: the blocks train (the embeddings stay frozen)
            p.requires_grad_(True)
        self.heads = PoolHeads(n_members, cfg)
        if self.heads.query.device.type != "meta":
            init_members(self.heads, seed)

    def requires_grad_(self, requires_grad: bool = True):
        """The heads (and a LoRA trunk's adapters, or a full trunk's blocks) follow requires_grad; a frozen
        trunk's weights stay off."""
        self.heads.requires_grad_(requires_grad)
        for name, p in self.trunk.named_parameters():
            p.requires_grad_(requires_grad and (".lora_" in name or self._full_block(name)))
        return self

    def _full_block(self, name: str) -> bool:
        return self.cfg.trunk == "full" and name.startswith("blocks.")

    def trunk_parameters(self) -> list:
        """The trunk's trainable weights (a full trunk's blocks): train_lrm gives them their own learning rate."""
        return [p for name, p in self.trunk.named_parameters() if self._full_block(name)]

    def load_trunk(self, state: dict):
        """Copy a generator's weights (a WanDiT state dict, original names) into the trunk: the
        embeddings and blocks 0..n-1; the generator's later blocks and output head are not used."""
        own = {k: v for k, v in self.trunk.state_dict().items() if ".lora_" not in k}
        src = {k: k.replace(".base.", ".") for k in own}  # a LoRA-wrapped Linear keeps its weight in .base
        missing = sorted(s for s in src.values() if s not in state)
        misshaped = sorted(f"{s} {tuple(state[s].shape)} != {tuple(own[k].shape)}" for k, s in src.items()
                           if s in state and state[s].shape != own[k].shape)
        if missing or misshaped:
            raise ValueError(f"the generator does not fit the reward model's trunk ({self.cfg.dit}): "
                             f"missing {missing[:8]}, mis-shaped {misshaped[:8]}")
        with torch.no_grad():
            for k, s in src.items():
                own[k].copy_(state[s])  # state_dict tensors share the parameters' storage

    def member_sigmas(self, sigma, z: torch.Tensor) -> torch.Tensor:
        """sigma (None = 0, a float, (B,) or (N, B)) -> (N, B) float32 on z's device."""
        n, b = self.n_members, z.shape[-5]
        sigma = torch.as_tensor(0.0 if sigma is None else sigma, dtype=torch.float32, device=z.device)
        if sigma.dim() > 2 or (sigma.dim() == 2 and sigma.shape[0] != n) or (sigma.dim() >= 1 and sigma.shape[-1] != b):
            raise ValueError(f"sigma must be a number, ({b},) or ({n}, {b}), got {tuple(sigma.shape)}")
        if bool(((sigma < 0) | (sigma > 1)).any()):
            raise ValueError(f"sigma must be in [0, 1], got {sigma.tolist()}")
        return sigma.expand(n, b)

    def text(self, context, lengths):
        """context (B, L, C), lengths (B,) -> (B, text_len, C): rows past lengths zeroed, zero-padded as Wan's encoder."""
        text_len = self.cfg.dit.text_len
        if bool((lengths > text_len).any()):
            raise ValueError(f"prompt lengths {lengths.tolist()} exceed the DiT's text_len {text_len}")
        context = context * (torch.arange(context.shape[1], device=context.device) < lengths[:, None])[..., None]
        context = context[:, :text_len]
        return F.pad(context, (0, 0, 0, text_len - context.shape[1]))

    def trunk_tokens(self, x, t, context):
        """WanDiT.forward up to its last block: x (B, in_dim, F, H, W), t (B,) in [0, 1000], context
        (B, text_len, text_dim) -> tokens (B, f*h*w, dim) fp32, the residual stream after block n-1."""
        trunk, cfg, device = self.trunk, self.cfg.dit, x.device.type
        if self.cfg.trunk_dtype != "float32" and not torch.is_autocast_enabled(device):
            with torch.autocast(device, dtype=TRUNK_DTYPES[self.cfg.trunk_dtype]):  # as the generator runs in bf16
                return self.trunk_tokens(x, t, context)
        trunk._check_inputs(x, t, context, None, None)
        dtype = trunk.patch_embedding.weight.dtype
        x = trunk.patch_embedding(x.to(dtype))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, L, D), tokens in (f, h, w) row-major order
        freqs = rope_freqs(cfg.head_dim, *grid, device=x.device)
        with torch.amp.autocast(device, enabled=False):
            e = trunk.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).float())
            e0 = trunk.time_projection(e).unflatten(1, (6, cfg.dim))[None]  # (1, B, 6, D) fp32: one token run
        runs = ((0, x.shape[1]),)
        context = trunk.text_embedding(context.to(dtype))
        for block in trunk.blocks:
            if trunk.gradient_checkpointing and torch.is_grad_enabled():  # recompute each block in the backward
                x = checkpoint(block, x, e0, context, freqs, runs, use_reentrant=False)
            else:
                x = block(x, e0, context, freqs, runs)
        return x.float()

    def forward(self, z, context, lengths, sigma=None):
        n = self.n_members
        context, lengths = _split_inputs(z, context, lengths, n, self.cfg)  # (N, B, L, C), (N, B)
        sigma = self.member_sigmas(sigma, z)  # (N, B)
        if z.dim() == 5 and bool((sigma == sigma[:1]).all()):  # one trunk pass serves every member
            tokens = self.trunk_tokens(z, 1000 * sigma[0], self.text(context[0], lengths[0]))[None]  # (1, B, L, D)
        else:  # each member's own samples (or noise levels): the trunk runs on all N*B
            z = z.expand(n, *z.shape) if z.dim() == 5 else z
            tokens = self.trunk_tokens(z.flatten(0, 1), 1000 * sigma.flatten(),
                                       self.text(context.flatten(0, 1), lengths.flatten()))
            tokens = tokens.unflatten(0, (n, -1))
        return self.heads(tokens).float()


def dit_reward_model_from(dit_or_path, n_blocks: int = None, n_members: int = 10, seed: int = 0,
                          **options) -> DiTRewardModel:
    """A DiT-backbone LRM whose trunk is the generator's first n_blocks blocks (None: 8 as PRFL, or
    all when it has fewer): dit_or_path is a WanDiT or anything model_dit.load_dit reads (only the
    kept blocks are read from it); options are DiTLRMConfig fields (trunk, lora_rank, mlp_dims,
    trunk_dtype, ...). The heads are fresh (seeded); the generator itself is not changed."""
    if not isinstance(dit_or_path, nn.Module):
        dtype = TRUNK_DTYPES.get(options.get("trunk_dtype"), torch.float32)  # DiTLRMConfig names a bad one below
        dit_or_path = load_dit(dit_or_path, dtype=dtype, num_layers=n_blocks or 8)
    dit = dit_or_path
    n_blocks = n_blocks or min(8, dit.cfg.num_layers)
    if not 1 <= n_blocks <= dit.cfg.num_layers:
        raise ValueError(f"n_blocks must be in [1, {dit.cfg.num_layers}] (the generator's blocks), got {n_blocks}")
    cfg = DiTLRMConfig(dit=replace(dit.cfg, num_layers=n_blocks), **options)
    model = DiTRewardModel(cfg, n_members, seed)
    model.load_trunk(dit.state_dict())
    return model.to(next(dit.parameters()).device)
