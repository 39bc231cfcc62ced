"""Wan 2.1 LoRA in one file: adapters on the DiT's Linear layers, the reference model with the
adapters switched off, and the community Wan LoRA file format (export, read, merge).

Follows LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685,
§4.1): y = W x + (alpha / r) B A x, with A (r, in) Kaiming-uniform and B (out, r) zero, so training
starts exactly at the base model. The adapters are kept in fp32 whatever the base dtype: with a bf16
copy, lora_A's first updates (its gradient is tiny because B starts at zero) round away.
The file format is the one ComfyUI and diffusers' Wan LoRA loader read: the original DiT module
names (`blocks.0.self_attn.q`, ...) prefixed with `diffusion_model.`, each with `.lora_A.weight`
(r, in), `.lora_B.weight` (out, r) and a scalar `.alpha`; `lora_down` / `lora_up` are read as A / B,
and a missing alpha means alpha = r (scale 1). Imports only torch and safetensors.

    dit = model_dit.load_dit("Wan2.1-T2V-1.3B")
    add_lora(dit, rank=256, alpha=256)            # trains only the adapters
    with lora_disabled(dit): v_ref = dit(x, t, context)
    save_lora(dit, "lora.safetensors")
    merge_lora(model_dit.load_dit(...), "lora.safetensors")   # W += scale alpha / r  B A

Wan 2.2's A14B (two experts, model_dit.TwoExpertDiT) has one file per expert, as ComfyUI and
diffusers load them: `lora_high_noise.safetensors` and `lora_low_noise.safetensors` (diffusers:
the low-noise file with `load_into_transformer_2=True`); `save_expert_loras` / `merge_expert_loras`.

Left out: adapters outside the blocks' Linears (embeddings, head, convolutions), LoRA dropout,
and variants such as DoRA; files with Diffusers module names (`attn1.to_q`, ...) are not read.
"""

import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# every Linear inside a Wan attention block: attention projections and the two FFN layers
WAN_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
PREFIX = "diffusion_model."
_SUFFIXES = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up",
             ".lora_up.weight": "up", ".alpha": "alpha"}


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) B A x with A, B in fp32; `enabled = False` gives base(x) alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base, self.alpha, self.enabled = base, alpha, True
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        # nn.Linear's own default, U(-1/sqrt(in), 1/sqrt(in))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * (self.alpha / self.lora_A.out_features)


def add_lora(dit: nn.Module, rank: int, alpha: float, targets=WAN_TARGETS, generator: torch.Generator | None = None) -> list[str]:
    """Wrap every Linear inside dit.blocks whose name ends with one of `targets` (a sequence or a
    comma-separated string) and freeze everything else. Returns the wrapped module names.
    `generator` seeds lora_A (default: the global RNG)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = targets.split(",") if isinstance(targets, str) else targets
    dit.requires_grad_(False)
    suffixes = tuple("." + s.strip() for s in targets)
    names = [n for n, m in dit.named_modules() if n.startswith("blocks.") and n.endswith(suffixes) and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"LoRA targets {','.join(targets)!r} match no Linear inside the DiT blocks")
    for name in names:
        parent, _, child = name.rpartition(".")
        module = dit.get_submodule(parent)
        setattr(module, child, LoRALinear(getattr(module, child), rank, alpha, generator))
    return names


@contextmanager
def lora_disabled(dit: nn.Module):
    """The model the adapters started from (the KL reference): the same forward, every adapter off."""
    layers = [m for m in dit.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield dit
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(dit: nn.Module) -> dict:
    """The adapters in the community Wan format: diffusion_model.<module>.lora_A/.lora_B.weight + .alpha."""
    state = {}
    for name, m in dit.named_modules():
        if isinstance(m, LoRALinear):
            key = PREFIX + name
            state[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
            state[f"{key}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    return state


def save_lora(dit: nn.Module, path, metadata: dict | None = None):
    """Write lora_state_dict(dit) as safetensors, atomically (a temporary file, then os.replace)."""
    state = lora_state_dict(dit)
    if not state:
        raise ValueError("the model has no LoRA adapters to save")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to write {path}: {len(bad)} LoRA tensors hold NaN or inf (first: {bad[0]})")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "wan-lora", **(metadata or {})})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_finite(path, state: dict) -> dict:
    """One pass over the loaded tensors: a weight file holding NaN or inf is refused, naming the first."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} holds NaN or inf; the weight file is corrupt (re-export or "
                             f"re-download it)")
    return state


def read_lora(path) -> dict:
    """A community-format Wan LoRA file -> {"<module>": {"down", "up", "alpha"}} (alpha: a float,
    the rank when the file has none). Keys may carry the `diffusion_model.` prefix or not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors LoRA file (truncated or corrupt?): {e}") from None
    _check_finite(path, state)
    groups = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{path}: not a LoRA key of the community Wan format: {key}")
        groups.setdefault(name[: -len(suffix)], {})[_SUFFIXES[suffix]] = value
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            raise ValueError(f"{path}: LoRA of {name} needs both down (lora_A) and up (lora_B) weights, has {sorted(g)}")
        g["alpha"] = float(g["alpha"]) if "alpha" in g else float(g["down"].shape[0])
    return groups


@torch.no_grad()
def merge_lora(dit: nn.Module, path, scale: float = 1.0) -> int:
    """Add a community-format Wan LoRA into the DiT's Linear weights, W += scale alpha / r  B A.
    Returns the number of layers changed."""
    groups = read_lora(path)
    for name, g in groups.items():
        try:
            layer = dit.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: LoRA targets {name}, which the DiT does not have") from None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path}: LoRA targets {name}, a {type(layer).__name__}, not a Linear")
        rank = g["down"].shape[0]
        delta = (g["up"].float() @ g["down"].float()) * (scale * g["alpha"] / rank)
        if delta.shape != layer.weight.shape:
            raise ValueError(f"{path}: LoRA of {name} gives {tuple(delta.shape)}, the weight is {tuple(layer.weight.shape)}")
        layer.weight += delta.to(layer.weight)
    return len(groups)


# Wan 2.2 A14B: one community-format file per expert
EXPERT_FILES = {"high": "lora_high_noise.safetensors", "low": "lora_low_noise.safetensors"}


def save_expert_loras(experts: nn.Module, folder, metadata: dict | None = None) -> list[Path]:
    """Write the adapters of each expert of a two-expert DiT (`.high`, `.low`) to folder/EXPERT_FILES;
    an expert without adapters gets no file. Returns the files written."""
    folder, written = Path(folder), []
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in EXPERT_FILES.items():
        expert = getattr(experts, name)
        if lora_state_dict(expert):
            save_lora(expert, folder / file, {**(metadata or {}), "expert": name})
            written.append(folder / file)
    if not written:
        raise ValueError("neither expert has LoRA adapters to save")
    return written


def expert_lora_files(source) -> dict:
    """The pair of files of an A14B LoRA: a folder holding EXPERT_FILES (one of them may be missing:
    an expert that was not trained), or "HIGH,LOW" paths (one side may be empty). -> {"high": path, ...}."""
    text = str(source)
    if "," in text:
        high, low = (p.strip() for p in text.split(",", 1))
        files = {k: Path(p) for k, p in (("high", high), ("low", low)) if p}
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"an A14B LoRA is a pair of files: give the folder holding {' and '.join(EXPERT_FILES.values())}, "
                             f"or HIGH,LOW paths; got {source}")
        files = {k: folder / f for k, f in EXPERT_FILES.items() if (folder / f).is_file()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"LoRA files not found: {missing or [str(Path(source) / f) for f in EXPERT_FILES.values()]}")
    return files


def merge_expert_loras(experts: nn.Module, source, scale: float = 1.0) -> dict:
    """merge_lora of each expert's file (expert_lora_files) into that expert; -> {expert: layers changed}."""
    return {name: merge_lora(getattr(experts, name), path, scale) for name, path in expert_lora_files(source).items()}
