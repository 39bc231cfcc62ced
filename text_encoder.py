"""UMT5-XXL text encoder of Wan 2.1, its tokenizer, and an on-disk cache of prompt embeddings.

Follows `wan/modules/t5.py` (T5Encoder, umt5_xxl, encoder only) and `wan/modules/tokenizers.py` of
Wan-Video/Wan2.1: names and shapes equal `models_t5_umt5-xxl-enc-bf16.pth`. T5 RMS norm in fp32;
attention without 1/sqrt(head_dim), with a per-layer relative position bias (T5's bidirectional
buckets), padded keys at finfo.min, run as one fp32 island through F.scaled_dot_product_attention
(Wan rounds q.k^T to the weight dtype first, so bf16 outputs agree with Wan's to bf16 rounding; in
fp32 they match transformers' UMT5EncoderModel to float32 rounding); gated FFN with gelu_tanh.
Prompts become embeddings as in Wan's T5EncoderModel.__call__ (`encode_prompts`): clean the text,
tokenize, EOS, truncate to 512, pad; keep each prompt's true-length rows and zero the rest.
`PromptCache` stores those rows on disk, so the 11 GB encoder runs once per prompt.

`load_text_encoder` reads Wan's .pth, transformers' safetensors (file, index, Diffusers folder) and
HF-named repacks (ComfyUI); `load_tokenizer` a tokenizer.json, a spiece.model, a repack's
`spiece_model` tensor, or none: an offline byte tokenizer for the "tiny" preset. sentencepiece and
tokenizers are imported only when such a file is read. Every file goes through one reader, `_read`.

Left out: the decoder, dropout (inference only), the fp16 clamp (run bf16 or fp32), shared position
embeddings (UMT5 has none), and the special-token parsing of literal "</s>" / "<pad>" in a prompt
(the HF tokenizer maps those to their ids; here they are plain text).
"""

import hashlib
import html
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

try:
    import ftfy  # optional, as in diffusers' WanPipeline; Wan's own code always applies it
except ImportError:
    ftfy = None

PAD_ID, EOS_ID = 0, 1  # T5's special ids (unk is 2)


@dataclass
class UMT5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6


UMT5_CONFIGS = {
    "umt5-xxl": UMT5Config(),
    "tiny": UMT5Config(vocab=384, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2),
}

# ---------------------------------------------------------------------------------------------
# Model


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    """T5's bidirectional bucket of rel = key_pos - query_pos: half the buckets per sign, exact
    distances below num_buckets // 4, log-spaced distances up to max_dist, then the last bucket."""
    half = num_buckets // 2
    exact = half // 2
    sign = (rel > 0).long() * half
    n = rel.abs()
    log = torch.log(n.clamp(min=1).float() / exact) / math.log(max_dist / exact)
    far = (exact + (log * (half - exact)).long()).clamp(max=half - 1)
    return sign + torch.where(n < exact, n, far)


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int, max_dist: int):
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # (Lq, Lk): key - query
        bucket = relative_position_bucket(rel, self.num_buckets, self.max_dist)
        return self.embedding(bucket).permute(2, 0, 1)[None]  # (1, H, Lq, Lk)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, bias):
        """x (B, L, C); bias (B, H, L, L) fp32: position bias with finfo.min on padded keys."""
        b, l, _ = x.shape
        q, k, v = (t.view(b, l, self.num_heads, -1).transpose(1, 2).float() for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(b, l, -1).to(x.dtype))


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """Wan's `T5SelfAttention`: pre-norm attention and FFN, each layer with its own position bias."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_dist)

    def forward(self, x, pad):
        """pad (B, 1, 1, L) bool, True on padded keys."""
        bias = self.pos_embedding(x.shape[1]).float().masked_fill(pad, torch.finfo(torch.float32).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L) int64, mask (B, L) with 1 on real tokens -> (B, L, dim) in the weight dtype."""
        x = self.token_embedding(ids)
        pad = (mask == 0)[:, None, None, :]  # (B, 1, 1, Lk)
        for block in self.blocks:
            x = block(x, pad)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def clean_prompt(text: str) -> str:
    """Wan's cleaning: ftfy.fix_text (only if installed), html.unescape twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def byte_pieces(texts: list[str]) -> list[list[int]]:
    """Offline tokenizer of the "tiny" preset: UTF-8 bytes shifted past T5's pad / EOS / unk ids."""
    return [[b + 3 for b in t.encode("utf-8")] for t in texts]


class PromptTokenizer:
    """`tok(prompts, max_length) -> (ids, mask)`, both (B, max_length) int64, as T5TokenizerFast with
    padding="max_length", truncation=True: cleaned text, pieces, truncation keeping room for EOS, EOS,
    pad 0. `pieces` maps cleaned texts to id lists without special tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def __call__(self, prompts: list[str], max_length: int = 512):
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}")
        rows = [p[: max_length - 1] + [EOS_ID] for p in self.pieces([clean_prompt(t) for t in prompts])]
        ids = torch.full((len(rows), max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(rows), max_length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask


def _tokenizers_pieces(file: Path):
    try:  # imported here: the rest of this file needs neither tokenizer package
        import tokenizers
    except ImportError as err:
        raise ImportError(f"reading {file} needs the tokenizers package (pip install tokenizers)") from err
    contents = _read(file)
    try:
        tok = tokenizers.Tokenizer.from_str(json.dumps(contents))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{file}: not a tokenizers tokenizer.json (as saved by T5TokenizerFast): {err}") from err
    tok.no_truncation()  # a saved tokenizer.json may carry the settings of its last call
    tok.no_padding()
    return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def _sentencepiece_pieces(model_proto: bytes, source: str):
    try:
        import sentencepiece
    except ImportError as err:
        raise ImportError(f"reading {source} needs the sentencepiece package (pip install sentencepiece)") from err
    sp = sentencepiece.SentencePieceProcessor()
    try:
        if not model_proto:
            raise ValueError("0 bytes")
        sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{source}: not a SentencePiece model (expected the bytes of a spiece.model): "
                         f"{str(err).strip() or type(err).__name__}") from err
    if sp.get_piece_size() == 0:
        raise ValueError(f"{source}: not a SentencePiece model (expected the bytes of a spiece.model): no pieces")
    return lambda texts: sp.encode(texts)


def load_tokenizer(path=None) -> PromptTokenizer:
    """None -> the offline byte tokenizer; a folder with tokenizer.json (preferred, as
    T5TokenizerFast) or spiece.model; either file; or a repack .safetensors with `spiece_model`.
    A file that is not a tokenizer is refused here, not at the first prompt."""
    if path is None:
        return PromptTokenizer(byte_pieces)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        for name in ("tokenizer.json", "spiece.model"):
            if (path / name).exists():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"{path} holds neither tokenizer.json nor spiece.model")
    if path.suffix == ".json":
        return PromptTokenizer(_tokenizers_pieces(path))
    if path.suffix == ".model":
        return PromptTokenizer(_sentencepiece_pieces(_read(path), str(path)))
    if path.suffix == ".safetensors":
        tensors = _read(path, only=("spiece_model",))
        if "spiece_model" not in tensors:
            raise ValueError(f"{path} has no 'spiece_model' tensor to build a tokenizer from")
        proto = tensors["spiece_model"].numpy().tobytes()
        return PromptTokenizer(_sentencepiece_pieces(proto, f"{path} (tensor 'spiece_model')"))
    raise ValueError(f"unknown tokenizer {path} "
                     "(expected a folder, tokenizer.json, spiece.model or a .safetensors repack)")


# ---------------------------------------------------------------------------------------------
# Prompt embeddings


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizer, encoder: UMT5Encoder, text_len: int = 512):
    """-> context (B, text_len, dim) with zeros past each prompt's length, lengths (B,) (EOS counted);
    dtype and device of the encoder's weights. The encoder sees only the longest prompt's tokens:
    padded keys are masked, so real rows equal those of Wan's full text_len pass."""
    weight = encoder.token_embedding.weight
    ids, mask = tokenizer(prompts, max_length=text_len)
    lengths = mask.sum(1).to(weight.device)
    n = int(lengths.max())
    x = encoder(ids[:, :n].to(weight.device), mask[:, :n].to(weight.device))  # (B, n, dim)
    keep = torch.arange(n, device=weight.device) < lengths[:, None]
    x = x.masked_fill(~keep[..., None], 0)
    return F.pad(x, (0, 0, 0, text_len - n)), lengths


class PromptCache:
    """Per-prompt embeddings on disk, `root/<sha256>.safetensors` holding the true-length rows.
    The key hashes encoder_tag (name the weights and tokenizer, e.g. "umt5-xxl-bf16"), text_len and
    the cleaned prompt, so prompts that clean to the same text share one file."""

    def __init__(self, root, encoder_tag: str):
        self.root, self.encoder_tag = Path(root), encoder_tag

    def path(self, prompt: str, text_len: int = 512) -> Path:
        key = f"{self.encoder_tag}\n{text_len}\n{clean_prompt(prompt)}"
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def missing(self, prompts: list[str], text_len: int = 512) -> list[str]:
        """Prompts without a cache file, one per distinct file, in order."""
        todo = {}
        for p in prompts:
            path = self.path(p, text_len)
            if not path.exists():
                todo.setdefault(path, p)
        return list(todo.values())

    def _write(self, prompt: str, text_len: int, rows: torch.Tensor):
        path = self.path(prompt, text_len)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"context": rows.contiguous().cpu()}, tmp, metadata={"prompt": clean_prompt(prompt)})
        os.replace(tmp, path)  # atomic: readers never see half a file

    def encode(self, prompts: list[str], tokenizer, encoder, text_len: int = 512, batch_size: int = 16):
        """Same (context, lengths) as encode_prompts, on the CPU; only missing prompts are encoded.
        encoder may be None when every prompt is cached."""
        todo = self.missing(prompts, text_len)
        if todo and encoder is None:
            raise ValueError(f"{len(todo)} prompt(s) not cached in {self.root} for tag {self.encoder_tag!r} "
                             f"and no encoder given, e.g. {todo[0]!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(todo), batch_size):
            context, lengths = encode_prompts(todo[i : i + batch_size], tokenizer, encoder, text_len)
            for prompt, c, n in zip(todo[i : i + batch_size], context, lengths):
                self._write(prompt, text_len, c[:n])
        rows = []
        for p in prompts:
            try:
                rows.append(_read(self.path(p, text_len), only=("context",))["context"])
            except (ValueError, KeyError) as err:
                raise ValueError(f"prompt cache entry for {p!r} is unreadable; delete it to re-encode: {err}") from err
        lengths = torch.tensor([r.shape[0] for r in rows])
        return torch.stack([F.pad(r, (0, 0, 0, text_len - r.shape[0])) for r in rows]), lengths


# ---------------------------------------------------------------------------------------------
# Loading

_HF_BLOCK_TO_WAN = {  # transformers UMT5EncoderModel, under encoder.block.{i}. -> Wan, under blocks.{i}.
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # GELU branch
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # linear branch
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_HF_TOP_TO_WAN = {
    "shared.weight": "token_embedding.weight",
    "encoder.embed_tokens.weight": "token_embedding.weight",  # tied to shared.weight; files may hold either
    "encoder.final_layer_norm.weight": "norm.weight",
}


def _hf_to_wan(key: str) -> str:
    """HF UMT5 name -> Wan name; unknown names pass through so the strict check reports them."""
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if m and m[2] in _HF_BLOCK_TO_WAN:
        return f"blocks.{m[1]}.{_HF_BLOCK_TO_WAN[m[2]]}"
    return _HF_TOP_TO_WAN.get(key, key)


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():  # a transformers / Diffusers text_encoder/ folder
        found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one *.safetensors.index.json or one *.safetensors, "
                             f"found {[p.name for p in found]}")
        return _checkpoint_files(found[0])
    if path.name.endswith(".index.json"):
        contents = _read(path)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path}: not a safetensors index (expected a JSON object with a non-empty 'weight_map')")
        return [path.parent / s for s in sorted(set(weight_map.values()))]
    if path.suffix in (".safetensors", ".pth", ".pt"):
        return [path]
    raise ValueError(f"unknown checkpoint type {path} "
                     "(expected .pth, .pt, .safetensors, .safetensors.index.json or a folder)")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


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
        raise ValueError(f"{file}: holds a dict with keys {sorted(map(str, obj))[:8]} whose entries {odd[:8]} are "
                         f"not tensors; expected a state dict (name -> tensor) or a dict with a single 'model' or "
                         f"'state_dict' entry holding one")
    return obj


def _read(file: Path, dtype: torch.dtype | None = None, only=None):
    """The one reader of this file. A .safetensors or .pth/.pt (weights only, never pickled code) ->
    name -> tensor, floating tensors cast to dtype one at a time (keeps peak memory low), only the
    names in `only` if given; a .json -> its parsed contents; a .model -> its bytes. Every way a file
    can be missing, empty, truncated or of the wrong kind ends here in an error that names the file."""
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    if not file.is_file():
        raise ValueError(f"{file} is not a file; expected a checkpoint (.safetensors, .pth, .pt) or a tokenizer file")
    if file.stat().st_size == 0:
        raise ValueError(f"{file}: empty file (0 bytes); expected a checkpoint (.safetensors, .pth, .pt) "
                         "or a tokenizer file")
    if file.suffix == ".model":
        return file.read_bytes()
    if file.suffix == ".json":
        try:
            return json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not valid JSON: {err}") from err
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                names = [k for k in f.keys() if only is None or k in only]
                return {k: _cast(f.get_tensor(k), dtype) for k in names}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    try:  # mmap needs torch.save's zip format; older pickles are read whole
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:  # torch.load fails in many types (EOFError, UnpicklingError, RuntimeError, ...)
        raise ValueError(f"{file}: not a readable torch checkpoint (truncated, corrupt, or holding more than "
                         f"tensors?): {type(err).__name__}: {err}") from err
    return {k: _cast(v, dtype) for k, v in _state_dict_of(obj, file).items() if only is None or k in only}


def _read_tensors(files: list[Path], dtype: torch.dtype) -> dict:
    """Every tensor of the files, floating ones cast to dtype."""
    sd = {}
    for file in files:
        sd.update(_read(file, dtype))
    return sd


def _to_wan_layout(sd: dict) -> tuple[dict, str]:
    """Drop non-weight entries (a repack's `spiece_model` bytes) and rename HF keys -> (sd, layout)."""
    sd = {k: v for k, v in sd.items() if v.is_floating_point()}
    if any(k.startswith(("shared.", "encoder.")) for k in sd):
        return {_hf_to_wan(k): v for k, v in sd.items()}, "transformers UMT5EncoderModel (HF names)"
    return sd, "Wan models_t5_umt5-xxl-enc (original names)"


def _infer_config(sd: dict, path, layout: str) -> UMT5Config:
    """Sizes from tensor shapes; max_dist and eps are not stored and keep the umt5-xxl values."""
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        return UMT5Config(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                          dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=num_heads,
                          num_layers=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                          num_buckets=num_buckets)
    except KeyError as err:
        raise ValueError(f"cannot infer a UMT5 config from {path} (layout guessed: {layout}): no {err}; "
                         f"pass config=") from err


def _short(keys: list) -> str:
    return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")


def _check_keys(model: nn.Module, sd: dict, path, layout: str):
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} in file vs {tuple(v.shape)} in model"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"cannot load a UMT5 encoder from {path}\n  layout guessed: {layout}\n"
                         f"  missing keys ({len(missing)}): {_short(missing)}\n"
                         f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}\n"
                         f"  wrong shapes ({len(wrong)}): {_short(wrong)}")


def load_text_encoder(path, config: UMT5Config | None = None, device="cpu", dtype=torch.bfloat16) -> UMT5Encoder:
    """Wan .pth, HF safetensors (file, index or folder) or an HF-named repack -> eval UMT5Encoder
    without grads. config=None infers the sizes from the tensor shapes. Strict. A repack such as
    ComfyUI's umt5_xxl_*.safetensors has no encoder.embed_tokens.weight (shared.weight holds it) and
    carries a `spiece_model` byte tensor, which is dropped here."""
    sd, layout = _to_wan_layout(_read_tensors(_checkpoint_files(Path(path)), dtype))
    cfg = config or _infer_config(sd, path, layout)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    _check_keys(model, sd, path, layout)
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
