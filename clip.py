"""The CLIP ViT-H/14 image encoder of Wan 2.1 image-to-video, written from scratch.

Wan 2.1 I2V-14B cross-attends to CLIP features of its input image: the vision tower of open-clip
XLM-RoBERTa-large ViT-H/14 ("Reproducible scaling laws for contrastive language-image learning",
arXiv 2212.07143), as `wan/modules/clip.py` of Wan-Video/Wan2.1 runs it:
- 224 px input, 14 px patches (16 x 16 = 256 patches and a class token: 257 rows), width 1280,
  16 heads, MLP ratio 4 with exact GELU, pre-norm blocks, LayerNorm eps 1e-5;
- a LayerNorm on the embeddings before the blocks (`pre_norm`, CLIP's "pre_layrnorm");
- the features are the output of the first 31 of the 32 blocks: no last block, no post-norm, no
  projection (`visual(x, use_31_block=True)`; transformers' `CLIPVisionModel` hidden_states[-2]);
- preprocessing: the image in [-1, 1] resized to 224 x 224 (bicubic, align_corners False), mapped
  to [0, 1] and normalised with CLIP's mean and std.
Loads the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (its `visual.*`
tensors; the text tower is not needed) and a Diffusers `image_encoder/` folder (transformers'
CLIPVisionModel layout, whose separate q, k, v become the fused `to_qkv`). Wan 2.2 has no CLIP.
"""

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    num_heads: int = 16
    num_layers: int = 32  # in the checkpoint; the features use the first num_layers - 1
    mlp_ratio: int = 4
    eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


CLIP_CONFIGS = {"vit-h-14": CLIPConfig(), "tiny": CLIPConfig(image_size=28, dim=64, num_heads=4, num_layers=3)}


class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32, cast back (as open-clip's and Wan's)."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, N, S, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionEncoder(nn.Module):
    """encode_image: images (B, 3, H, W) in [-1, 1] -> features (B, 257, 1280), fp32."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*[AttentionBlock(cfg) for _ in range(cfg.num_layers - 1)])

    def features(self, pixels):
        """Normalised pixels (B, 3, image_size, image_size) -> (B, 1 + patches, dim): the first
        num_layers - 1 blocks' output."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        return self.transformer(x)

    def preprocess(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> CLIP's normalised (B, 3, image_size, image_size), fp32."""
        size = (self.cfg.image_size,) * 2
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False) * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_image(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        return self.features(self.preprocess(images)).float()


# ---------------------------------------------------------------------------------------------
# Loading

# Tensors of the official file that the features never read: the text tower, the temperature, the
# last block, the post-norm and the projection head.
_UNUSED = re.compile(r"^(textual\.|log_scale$|visual\.(post_norm\.|head$))")

# transformers CLIPVisionModel -> ours (q, k, v are fused into to_qkv separately).
_HF = [
    (r"^embeddings\.patch_embedding\.", "patch_embedding."),
    (r"^pre_layrnorm\.", "pre_norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.\1.mlp.0."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.\1.mlp.2."),
]


def _from_official(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if _UNUSED.match(k):
            continue
        out[k.removeprefix("visual.")] = v
    return out


def _from_transformers(state: dict) -> dict:
    """transformers' CLIPVisionModel names (with or without the "vision_model." prefix) -> ours."""
    out, qkv = {}, {}
    for k, v in state.items():
        k = k.removeprefix("vision_model.")
        if k == "embeddings.class_embedding":
            out["cls_embedding"] = v.view(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embedding"] = v[None]
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif k.startswith(("post_layernorm.", "embeddings.position_ids")):
            continue
        else:
            for pattern, repl in _HF:
                k = re.sub(pattern, repl, k)
            out[k] = v
    for (layer, kind), parts in qkv.items():
        out[f"transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _read(file: Path) -> dict:
    if not file.is_file() or file.stat().st_size == 0:
        raise ValueError(f"{file}: missing or empty; expected {file.name} holding CLIP weights")
    try:
        if file.suffix == ".safetensors":
            return _check_finite(file, load_file(file))
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"{file}: not a readable weight file (truncated or corrupt?): {err}") from err
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{file}: expected a state dict (name -> tensor)")
    return _check_finite(file, obj)


def _check_finite(path, state: dict) -> dict:
    """A weight file holding NaN or inf is refused, naming the first such tensor."""
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k} holds NaN or inf; the weight file is corrupt (re-export or "
                             f"re-download it)")
    return state


def _config_of(state: dict) -> CLIPConfig:
    """The config from the (our-layout) shapes of a file holding every block; heads: head_dim 80,
    as ViT-H (16 heads at width 1280)."""
    if "patch_embedding.weight" not in state or "pos_embedding" not in state:
        raise ValueError(f"not a CLIP vision tower: holds {sorted(state)[:6]}")
    dim, _, patch, _ = state["patch_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer."))
    side = round((state["pos_embedding"].shape[1] - 1) ** 0.5)
    return CLIPConfig(image_size=side * patch, patch_size=patch, dim=dim, num_heads=max(1, dim // 80),
                      num_layers=layers)


def load_clip(path, config: CLIPConfig | None = None, device="cpu", dtype=torch.float32) -> CLIPVisionEncoder:
    """Load the CLIP image encoder from the official .pth or a Diffusers image_encoder/ folder
    (config.json + model.safetensors); the config comes from config.json, or the file's shapes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise ValueError(f"{path}: expected a Diffusers image_encoder/ folder with config.json and model.safetensors")
        hf = json.loads((path / "config.json").read_text())
        hf = hf.get("vision_config", hf)
        state = _from_transformers(_read(weights))
        config = config or CLIPConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], dim=hf["hidden_size"],
                                      num_heads=hf["num_attention_heads"], num_layers=hf["num_hidden_layers"],
                                      mlp_ratio=hf["intermediate_size"] // hf["hidden_size"],
                                      eps=hf.get("layer_norm_eps", 1e-5))
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}; Wan's CLIP uses exact GELU")
    else:
        state = _from_official(_read(path))
    config = config or _config_of(state)
    last = f"transformer.{config.num_layers - 1}."  # the block whose output the features skip
    state = {k: v for k, v in state.items() if not k.startswith(last)}
    with torch.device("meta"):
        model = CLIPVisionEncoder(config)
    want = model.state_dict()
    missing, unexpected = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    wrong = [k for k in want.keys() & state.keys() if want[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} is not the CLIP image encoder for {config}: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}, wrong shapes {wrong[:6]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
