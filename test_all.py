"""VELR test suite: every component, on tiny random models, CPU only, offline.

Run: python -m pytest -q test_all.py   (or: python test_all.py)
"""
import dataclasses
import json
import math
from pathlib import Path
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file
from model_dit import (DIT_CONFIGS, DiTConfig, WanDiT, _infer_config, attention, load_dit, rope_apply, rope_freqs,
sinusoidal_embedding)
import threading
from diffusers import AutoencoderKLWan
from vae import VAE_CONFIGS, VAEConfig, WanVAE, config_from_diffusers, load_vae
import sys
from dataclasses import asdict, replace
import torch.nn.functional as F
import lrm
import rewards


# ============================================================================
# dit
# ============================================================================


_DIT_TSV = Path(__file__).resolve().parent.parent / "shared/docs/wan21_keys.tsv"


# head_dim 128 and text_dim 4096 like the released models, but 2 heads, 2 layers and a small FFN.
_DIT_CFG128 = DiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=4096)


def _dit_tsv_section(title: str) -> tuple[dict, str]:
    """key -> shape for the tsv section whose header starts with title, and that header line."""
    shapes, header, inside = {}, None, False
    for line in _DIT_TSV.read_text().splitlines():
        if line.startswith("#"):
            inside = line.startswith(title)
            header = line if inside else header
        elif inside:
            key, shape = line.split("\t")
            shapes[key] = tuple(int(s) for s in shape.split(","))
    return shapes, header


def _dit_perturb(model, seed=0):
    """Move every parameter off its init (incl. zero heads, unit norms) at a scale that keeps outputs O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            vector_like = p.ndim < 2 or "scale_shift_table" in name or "modulation" in name
            std = 0.1 if vector_like else 0.5 / p[0].numel() ** 0.5  # matrices: 0.5 / sqrt(fan_in)
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def _dit_inputs(cfg, f, h, w, t, text_lens, seed=0):
    """Batch of latents, timesteps and contexts zero-padded to text_len after each true length."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(t), cfg.in_dim, f, h, w, generator=gen)
    context = torch.randn(len(t), cfg.text_len, cfg.text_dim, generator=gen)
    for i, n in enumerate(text_lens):
        context[i, n:] = 0
    return x, torch.tensor(t), context


def _dit_diffusers(cfg: DiTConfig, seed=0):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                eps=cfg.eps)
    return _dit_perturb(ref.eval(), seed)


@pytest.mark.parametrize("name,title", [("1.3B", "# DiT Wan2.1-T2V-1.3B"), ("14B", "# DiT Wan2.1-T2V-14B")])
def test_dit_meta_build_matches_official_keys(name, title):
    official, header = _dit_tsv_section(title)
    with torch.device("meta"):
        model = WanDiT(DIT_CONFIGS[name])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official)  # same keys, same order
    assert ours == official
    n_params = sum(math.prod(s) for s in ours.values())
    assert f"{len(ours)} tensors, {n_params} parameters" in header
    assert _infer_config(official, {}) == DIT_CONFIGS[name]  # config inference from the real shapes


@pytest.mark.parametrize("cfg", [DIT_CONFIGS["tiny"], _DIT_CFG128], ids=["tiny", "head128_text4096"])
def test_dit_matches_diffusers_fp32(cfg, tmp_path):
    ref = _dit_diffusers(cfg)
    ref.save_pretrained(tmp_path / "transformer")
    model = load_dit(tmp_path / "transformer")
    assert model.cfg == cfg and not model.training
    cases = [((1, 6, 4), [999, 37], [7, 300]), ((3, 4, 6), [500.5, 1.0], [512, 1])]
    for (f, h, w), t, text_lens in cases:
        x, t, context = _dit_inputs(cfg, f, h, w, t, text_lens)
        with torch.no_grad():
            want = ref(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
            got = model(x, t, context)
        assert got.dtype == torch.float32 and got.shape == x.shape
        # measured ~2.5e-6 of the output scale; 1e-5 (tighter than the 1e-4 asked for) is what catches
        # exact GELU in place of tanh GELU (~3e-5), which 1e-4 would let through
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (f, h, w)
        assert not torch.allclose(got[0], got[1])  # the two samples really differ


def test_dit_original_layouts_load_identically(tmp_path):
    cfg = _DIT_CFG128
    torch.manual_seed(0)
    model = _dit_perturb(WanDiT(cfg).eval())
    x, t, context = _dit_inputs(cfg, 3, 4, 6, [999, 250], [5, 40])
    with torch.no_grad():
        want = model(x, t, context)
    sd = model.state_dict()
    keys = list(sd)
    save_file(sd, tmp_path / "dit.safetensors")
    torch.save(sd, tmp_path / "dit.pth")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, tmp_path / "comfy.safetensors")
    torch.save({"diffusion_model." + k: v for k, v in sd.items()}, tmp_path / "prefixed.pth")
    shards = tmp_path / "sharded"
    shards.mkdir()
    weight_map = {}
    for i, part in enumerate([keys[:20], keys[20:]]):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, shards / name)
        weight_map |= {k: name for k in part}
    index = shards / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    paths = [tmp_path / n for n in ("dit.safetensors", "dit.pth", "legacy.pt", "comfy.safetensors", "prefixed.pth")]
    for path in paths + [index, shards]:
        loaded = load_dit(path)  # no config: inferred from the shapes (num_heads = 256 // 128)
        assert loaded.cfg == cfg, path
        with torch.no_grad():
            assert torch.equal(loaded(x, t, context), want), path


def test_dit_repo_folder_with_config_json(tmp_path):
    cfg = DIT_CONFIGS["tiny"]  # dim 64: num_heads cannot come from the shapes, only from config.json
    torch.manual_seed(0)
    model = _dit_perturb(WanDiT(cfg).eval())
    repo = tmp_path / "Wan2.1-T2V-tiny"
    repo.mkdir()
    save_file(model.state_dict(), repo / "diffusion_pytorch_model.safetensors")
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, repo / "Wan2.1_VAE.pth")  # siblings must be ignored
    with pytest.raises(ValueError, match="cannot infer num_heads: dim 64"):
        load_dit(repo / "diffusion_pytorch_model.safetensors")
    original_config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": 64,
                       "ffn_dim": 128, "freq_dim": 256, "in_dim": 16, "out_dim": 16, "num_heads": 2,
                       "num_layers": 2, "text_len": 512, "eps": 1e-06}
    (repo / "config.json").write_text(json.dumps(original_config))
    x, t, context = _dit_inputs(cfg, 1, 2, 4, [3], [9])
    with torch.no_grad():
        want = model(x, t, context)
        for loaded in (load_dit(repo), load_dit(repo / "diffusion_pytorch_model.safetensors", config="tiny")):
            assert loaded.cfg == cfg
            assert torch.equal(loaded(x, t, context), want)
    (repo / "config.json").write_text(json.dumps(original_config | {"num_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys \(27\): blocks\.2\.modulation"):
        load_dit(repo)


def test_dit_load_errors_name_the_problem(tmp_path):
    vae = {"encoder.conv1.weight": torch.randn(96, 3, 3, 3, 3), "encoder.conv1.bias": torch.randn(96),
           "conv1.weight": torch.randn(32, 32, 1, 1, 1), "decoder.middle.0.residual.0.gamma": torch.randn(384, 1, 1, 1)}
    torch.save(vae, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError) as err:
        load_dit(tmp_path / "Wan2.1_VAE.pth")
    for part in ("layout guessed: original keys", "missing keys (6): patch_embedding.weight", "head.modulation",
                 "unexpected keys (4): encoder.conv1.weight"):
        assert part in str(err.value)

    torch.manual_seed(0)
    sd = WanDiT(DIT_CONFIGS["tiny"]).state_dict()
    save_file(sd, tmp_path / "dit.safetensors")
    torch.save(sd, tmp_path / "dit.pth")
    for name in ("dit.safetensors", "dit.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"could not read checkpoint file .*cut_{name} \\(truncated"):
            load_dit(tmp_path / f"cut_{name}", config="tiny")

    bad = dict(sd, **{"blocks.1.self_attn.q.weight": torch.zeros(64, 32)})
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): blocks\.1\.self_attn\.q\.weight \(64, 32\) in file "
                                         r"vs \(64, 64\) in model"):
        load_dit(tmp_path / "bad.safetensors", config="tiny")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected one .*found \\[\\]"):
        load_dit(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown checkpoint type .*dit.bin"):
        load_dit(tmp_path / "dit.bin")


def test_dit_bf16_weights_keep_fp32_islands(tmp_path):
    cfg = DIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    save_file(_dit_perturb(WanDiT(cfg)).state_dict(), tmp_path / "dit.safetensors")
    fp32 = load_dit(tmp_path / "dit.safetensors", config="tiny")
    bf16 = load_dit(tmp_path / "dit.safetensors", config=cfg, dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in bf16.state_dict().items()}
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["blocks.0.ffn.2.weight"] == torch.bfloat16
    assert dtypes["patch_embedding.weight"] == dtypes["text_embedding.0.weight"] == torch.bfloat16
    for key in ("time_embedding.0.weight", "time_projection.1.weight", "blocks.0.modulation", "blocks.0.norm3.weight",
                "blocks.1.cross_attn.norm_k.weight", "head.modulation", "head.head.weight"):
        assert dtypes[key] == torch.float32, key
    assert all(p.requires_grad for p in bf16.parameters())
    x, t, context = _dit_inputs(cfg, 3, 4, 4, [999, 500], [3, 20])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # autocast rounds fp32 weights to bf16 on the fly, so bf16 storage changes nothing
        assert torch.equal(bf16(x, t, context), fp32(x, t, context))


def test_dit_autocast_checkpointing_keeps_fp32_islands():
    cfg = DIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = _dit_perturb(WanDiT(cfg))
    model.gradient_checkpointing = True
    seen = {}
    watch = {"time_embedding": model.time_embedding, "time_projection": model.time_projection,
             "block0": model.blocks[0], "block1": model.blocks[1], "head": model.head,
             "q": model.blocks[0].self_attn.q, "norm_q": model.blocks[0].self_attn.norm_q, "ffn": model.blocks[1].ffn}
    def record(name):  # output dtype of the first call (not of the recomputation in backward)
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)
        return hook

    for name, module in watch.items():
        module.register_forward_hook(record(name))
    x, t, context = _dit_inputs(cfg, 3, 4, 4, [999, 0], [3, 20])
    with torch.no_grad():
        want = model(x, t, context)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context)
    out.square().mean().backward()
    assert out.dtype == torch.float32
    assert (out - want).abs().max() < 0.05 * want.abs().max()  # bf16 numerics, same function
    for name in ("time_embedding", "time_projection", "block0", "block1", "head", "norm_q"):
        assert seen[name] == torch.float32, name
    assert seen["q"] == seen["ffn"] == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_dit_checkpointing_with_only_adapters_trainable():
    class LoRA(torch.nn.Module):  # the shape of a LoRA wrapper: frozen base Linear + trainable low rank
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.down = torch.nn.Linear(base.in_features, 4, bias=False)
            self.up = torch.nn.Linear(4, base.out_features, bias=False)
            torch.nn.init.normal_(self.up.weight, std=0.1)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    cfg = DIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = _dit_perturb(WanDiT(cfg)).requires_grad_(False)
    for block in model.blocks:
        block.self_attn.q = LoRA(block.self_attn.q)
        block.ffn[2] = LoRA(block.ffn[2])
    for name, p in model.named_parameters():
        p.requires_grad_(".down." in name or ".up." in name)
    x, t, context = _dit_inputs(cfg, 1, 4, 4, [800, 100], [3, 20])
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(x, t, context).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 8 and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_dit_sinusoid_rope_and_attention_math():
    t = torch.tensor([0, 1, 37, 999])
    emb = sinusoidal_embedding(t, 256)
    assert emb.dtype == torch.float64 and emb.shape == (4, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]).double())  # cos first
    for i, j in [(2, 0), (3, 5), (3, 127)]:
        arg = t[i].item() * 10000 ** (-j / 128)
        assert emb[i, j].item() == pytest.approx(math.cos(arg), abs=1e-12)
        assert emb[i, 128 + j].item() == pytest.approx(math.sin(arg), abs=1e-12)
    diffusers_emb = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)  # float32
    assert (emb - diffusers_emb.double()).abs().max() < 2e-4

    # RoPE for head_dim 128 on a (3, 2, 5) grid: pairs 0-21 rotate with f (dim 44), 22-42 with h and 43-63 with w
    # (dim 42 each); pair k of an axis of dim D turns by pos * 10000^(-2k/D); layout (re, im) interleaved.
    f, h, w = 3, 2, 5
    x = torch.randn(1, f * h * w, 2, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = torch.empty_like(x)
    for token in range(f * h * w):
        pos = (token // (h * w), token // w % h, token % w)
        for pair in range(64):
            axis, k, dim = (0, pair, 44) if pair < 22 else (1, pair - 22, 42) if pair < 43 else (2, pair - 43, 42)
            angle = pos[axis] * 10000 ** (-2 * k / dim)
            re, im = x[0, token, :, 2 * pair], x[0, token, :, 2 * pair + 1]
            want[0, token, :, 2 * pair] = re * math.cos(angle) - im * math.sin(angle)
            want[0, token, :, 2 * pair + 1] = re * math.sin(angle) + im * math.cos(angle)
    freqs = rope_freqs(128, f, h, w)
    assert freqs.dtype == torch.complex128 and freqs.shape == (30, 1, 64)
    torch.testing.assert_close(rope_apply(x, freqs), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(rope_apply(x.float(), freqs), want.float(), rtol=0, atol=1e-5)

    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    weights = torch.softmax(torch.einsum("bqnd,bknd->bnqk", q, k) / 8**0.5, dim=-1)
    torch.testing.assert_close(attention(q, k, v), torch.einsum("bnqk,bknd->bqnd", weights, v).flatten(2))


def test_dit_init_config_and_input_checks():
    cfg = DIT_CONFIGS["tiny"]
    assert cfg.head_dim == 32 and DIT_CONFIGS["14B"].head_dim == DIT_CONFIGS["1.3B"].head_dim == 128
    assert DiTConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # patch_size list -> tuple
    with pytest.raises(ValueError, match="dim=65, num_heads=2"):
        DiTConfig(dim=65, num_heads=2)
    torch.manual_seed(0)
    model = WanDiT(cfg)
    x, t, context = _dit_inputs(cfg, 1, 4, 4, [999], [3])
    assert torch.equal(model(x, t, context), torch.zeros_like(x))  # Wan zero-inits the output head
    assert model.blocks[0].modulation.std().item() == pytest.approx(cfg.dim**-0.5, rel=0.2)
    assert model.text_embedding[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not model.gradient_checkpointing
    with pytest.raises(ValueError, match=r"x must be \(B, 16, F, H, W\).*got \(1, 16, 1, 3, 4\)"):
        model(x[..., :3, :], t, context)
    with pytest.raises(ValueError, match=r"t must have shape \(1,\), got \(\)"):
        model(x, t[0], context)
    with pytest.raises(ValueError, match=r"zero-padded to \(1, 512, 64\), got \(1, 3, 64\)"):
        model(x, t, context[:, :3])


# ============================================================================
# vae
# ============================================================================


def _vae_perturb_(model, seed):
    """Move every parameter (norm gammas included) away from its init, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)).add_(0.01 * torch.randn(p.shape, generator=g))
    return model.eval()


def _vae_tiny(seed=0):
    torch.manual_seed(seed)
    return _vae_perturb_(WanVAE(VAE_CONFIGS["tiny"]), seed)


def _vae_stats(cfg):
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _vae_video(b, t, h, w, seed):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _vae_check_parity(ours, theirs, batch, sizes):
    """encode/decode of `ours` vs diffusers `theirs` (fp32) for T = 1, 5, 9 at (H, W) `sizes`."""
    mean, std = _vae_stats(ours.cfg)
    with torch.no_grad():
        for t in (1, 5, 9):
            (h, w), (lh, lw) = sizes
            video = _vae_video(batch, t, h, w, seed=t)
            z = ours.encode(video)
            ref = theirs.encode(video).latent_dist.mean  # un-normalised posterior mean
            assert z.shape == (batch, 16, 1 + (t - 1) // 4, h // 8, w // 8) and z.dtype == torch.float32
            assert (z - (ref - mean) / std).abs().max() <= 1e-4, t

            z = torch.randn(batch, 16, 1 + (t - 1) // 4, lh, lw, generator=torch.Generator().manual_seed(10 + t))
            out = ours.decode(z)
            ref = theirs.decode(z * std + mean).sample
            assert out.shape == (batch, 3, t, 8 * lh, 8 * lw)
            assert (out - ref).abs().max() <= 1e-4, t
            assert (out.abs() < 0.999).float().mean() > 0.5  # mostly unclamped, so the check means something


def test_vae_config_and_official_keys():
    assert VAE_CONFIGS["wan2.1"] == VAEConfig()
    assert VAE_CONFIGS["tiny"].z_dim == 16 and VAE_CONFIGS["tiny"].dim_mult == VAEConfig().dim_mult
    with torch.device("meta"):
        state = WanVAE(VAEConfig()).state_dict()
    # Wan2.1_VAE.pth: 194 tensors, 126,892,531 parameters (spec §1a, §3.6).
    assert len(state) == 194 and sum(v.numel() for v in state.values()) == 126_892_531
    shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.residual.0.gamma": (192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    with pytest.raises(ValueError, match=r"attn_scales must be empty .*got \(1\.0,\)"):
        WanVAE(VAEConfig(dim=8, attn_scales=(1.0,)))
    with pytest.raises(ValueError, match=r"dim_mult \(1, 2, 4\)"):
        WanVAE(VAEConfig(dim=8, dim_mult=(1, 2, 4)))


def test_vae_parity_diffusers_full_architecture(tmp_path):
    torch.manual_seed(0)
    theirs = _vae_perturb_(AutoencoderKLWan(), seed=1)  # defaults = the Wan 2.1 VAE
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.cfg == VAEConfig() and not ours.training
    _vae_check_parity(ours, theirs, batch=1, sizes=((16, 24), (3, 2)))


def test_vae_parity_diffusers_tiny_batched(tmp_path):
    torch.manual_seed(0)
    theirs = _vae_perturb_(AutoencoderKLWan(base_dim=8, num_res_blocks=1), seed=2)
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.cfg == VAE_CONFIGS["tiny"]
    _vae_check_parity(ours, theirs, batch=2, sizes=((24, 16), (2, 3)))


def test_vae_encode_is_causal_per_chunk():
    vae = _vae_tiny()
    video = _vae_video(1, 13, 16, 16, seed=0)  # chunks: frame 0, 1-4, 5-8, 9-12
    with torch.no_grad():
        z = vae.encode(video)
        for first_changed, chunk in ((1, 1), (5, 2), (9, 3)):
            changed = video.clone()
            changed[:, :, first_changed:] = _vae_video(1, 13 - first_changed, 16, 16, seed=first_changed)
            z2 = vae.encode(changed)
            assert torch.equal(z[:, :, :chunk], z2[:, :, :chunk]), chunk
            assert not torch.allclose(z[:, :, chunk], z2[:, :, chunk])


def test_vae_decode_is_causal_per_chunk():
    vae = _vae_tiny()
    z = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = vae.decode(z)
        for k in (1, 2, 3):  # latent frame k decodes to frames 4k-3 .. 4k
            changed = z.clone()
            changed[:, :, k:] += 1.0
            out2 = vae.decode(changed)
            assert torch.equal(out[:, :, : 4 * k - 3], out2[:, :, : 4 * k - 3]), k
            assert not torch.allclose(out[:, :, 4 * k - 3 :], out2[:, :, 4 * k - 3 :])


def test_vae_whole_clip_matches_prefix_clip():
    vae = _vae_tiny()
    video = _vae_video(1, 9, 16, 24, seed=3)
    with torch.no_grad():
        whole, prefix = vae.encode(video), vae.encode(video[:, :, :5])
    assert whole.shape[2] == 3 and prefix.shape[2] == 2
    torch.testing.assert_close(whole[:, :, :2], prefix, rtol=0, atol=1e-6)


def test_vae_checkpointed_decode_gradient_matches():
    vae = _vae_tiny()
    z0 = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1))
    upsample = vae.decoder.upsamples[2]  # tiny: 2 residual blocks per stage, then the Resample
    assert upsample.mode == "upsample3d"
    param = upsample.time_conv.weight  # on the "Rep" first-chunk quirk path
    grads = []
    for checkpoint in (False, True):
        z = z0.clone().requires_grad_(True)
        vae.zero_grad()
        out = vae.decode(z, checkpoint=checkpoint)
        (out * weight).sum().backward()
        grads.append((out.detach(), z.grad.clone(), param.grad.clone()))
    (out_a, gz_a, gp_a), (out_b, gz_b, gp_b) = grads
    assert gz_a.abs().sum() > 0 and gp_a.abs().sum() > 0
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(gz_b, gz_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp_b, gp_a, rtol=1e-5, atol=1e-6)


def test_vae_loads_original_layouts(tmp_path):
    vae, tiny = _vae_tiny(), VAE_CONFIGS["tiny"]
    state = vae.state_dict()
    video = _vae_video(1, 5, 16, 16, seed=4)
    with torch.no_grad():
        z_ref = vae.encode(video)

        torch.save(state, tmp_path / "Wan2.1_VAE.pth")
        loaded = load_vae(tmp_path / "Wan2.1_VAE.pth", config=tiny)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded.encode(video), z_ref)

        save_file({k: v.half() for k, v in state.items()}, tmp_path / "wan_2.1_vae_fp16.safetensors")
        loaded = load_vae(tmp_path / "wan_2.1_vae_fp16.safetensors", config=tiny)
        assert loaded.conv1.weight.dtype == torch.float32
        assert torch.equal(loaded.conv1.weight, state["conv1.weight"].half().float())

        save_file({k: v.bfloat16() for k, v in state.items()}, tmp_path / "wan_2.1_vae_bf16.safetensors")
        loaded = load_vae(tmp_path / "wan_2.1_vae_bf16.safetensors", config=tiny, dtype=torch.bfloat16)
        assert loaded.decoder.head[2].weight.dtype == torch.bfloat16
        z = loaded.encode(video)
        assert z.dtype == torch.float32 and (z - z_ref).abs().max() < 0.25 * z_ref.abs().max()
        assert loaded.decode(z).dtype == torch.float32

    # Original-layout files carry no config: the tiny file does not fit the Wan 2.1 default.
    with pytest.raises(ValueError, match=r"layout guessed: original.*mis-shaped [1-9]"):
        load_vae(tmp_path / "Wan2.1_VAE.pth")


def test_vae_bad_inputs_raise_clear_errors(tmp_path):
    vae = _vae_tiny()
    with pytest.raises(ValueError, match=r"frames must be 4k\+1, got 8"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\), got shape \(1, 4, 5, 16, 16\)"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 8, got 12x16"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match=r"latent must be \(B, 16, T, H, W\), got shape \(1, 4, 2, 2, 2\)"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))

    dit = {  # a few Wan 2.1 DiT tensors (original names, 1.3B shapes cut down)
        "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
        "head.modulation": torch.zeros(1, 2, 8),
    }
    save_file(dit, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"missing 194 .*unexpected 3 .*patch_embedding\.weight"):
        load_vae(tmp_path / "diffusion_pytorch_model.safetensors")

    AutoencoderKLWan(base_dim=8, num_res_blocks=1, is_residual=True).save_pretrained(tmp_path / "wan22_vae")
    with pytest.raises(ValueError, match=r"'is_residual': True"):
        load_vae(tmp_path / "wan22_vae")
    with pytest.raises(ValueError, match=r"'decoder_base_dim': 64"):
        config_from_diffusers({"base_dim": 96, "decoder_base_dim": 64})
    assert config_from_diffusers({"base_dim": 8, "decoder_base_dim": 8, "num_res_blocks": 1}) == VAE_CONFIGS["tiny"]


def test_vae_calls_share_no_state_across_threads():
    vae = _vae_tiny()
    zs = [torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        serial = [vae.decode(z) for z in zs]
        results = [None] * len(zs)

        def work(i):
            with torch.no_grad():
                results[i] = vae.decode(zs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(zs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for a, b in zip(serial, results):
        assert torch.equal(a, b)


# ============================================================================
# lrm
# ============================================================================


_LRM_TINY = lrm.LRM_CONFIGS["tiny"]


def _lrm_inputs(b=2, size=(2, 4, 4), length=7, seed=0, cfg=_LRM_TINY):
    """Latents (B, 16, T, H, W), a zero-padded context (B, L, C) and true lengths 2..L."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, cfg.in_channels, *size, generator=g)
    lengths = torch.randint(2, length + 1, (b,), generator=g)
    context = torch.randn(b, length, cfg.text_dim, generator=g)
    context[torch.arange(length) >= lengths[:, None]] = 0  # padding rows are zero, as in Wan
    return z, context, lengths


def _lrm_member(model, i):
    """Member i of an ensemble as a stand-alone one-member model of the same kind."""
    single = type(model)(model.cfg, n_members=1)
    single.load_state_dict({k: v[i : i + 1] for k, v in model.state_dict().items()})
    return single


@pytest.mark.parametrize("text_mode,pool", [("last", "mean"), ("all", "max")])
def test_lrm_shapes_and_gradients(text_mode, pool):
    torch.manual_seed(0)
    cfg = replace(_LRM_TINY, text_mode=text_mode, pool=pool)
    for model, n in ((lrm.EnsembleLRM(cfg, 3), 3), (lrm.DollarLRM(cfg), 1)):
        z, context, lengths = _lrm_inputs(cfg=cfg)
        z.requires_grad_(True)
        r = model(z, context, lengths)
        assert r.shape == (n, 2) and r.dtype == torch.float32 and torch.isfinite(r).all()
        r.sum().backward()
        assert z.grad.abs().sum() > 0  # ReFL backpropagates the reward into the latent
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lrm_latent_sizes():
    torch.manual_seed(0)
    model = lrm.EnsembleLRM(_LRM_TINY, 2)
    for size in [(2, 4, 4), (1, 1, 1), (5, 7, 9), (21, 60, 104)]:
        z, context, lengths = _lrm_inputs(b=1, size=size)
        with torch.no_grad():
            assert model(z, context, lengths).shape == (2, 1)
    assert lrm.downsampled_grid((21, 60, 104), _LRM_TINY.strides) == (6, 8, 13)
    with pytest.raises(ValueError, match=r"\(22, 8, 8\) exceeds"):
        model(*_lrm_inputs(b=1, size=(22, 8, 8)))
    z, context, lengths = _lrm_inputs()
    with pytest.raises(ValueError, match="lengths must be in"):
        model(z, context, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"z must be"):
        model(z[:, :8], context, lengths)


def test_lrm_param_count():
    with torch.device("meta"):
        single = lrm.EnsembleLRM(lrm.LRMConfig(), 1)
        ten = lrm.EnsembleLRM(lrm.LRMConfig(), 10)
    per_member = sum(p.numel() for p in single.parameters())
    assert 19e6 < per_member < 22e6  # paper Table 7: 0.02B per member
    assert sum(p.numel() for p in ten.parameters()) == 10 * per_member  # 0.21B for ten


def test_lrm_batched_equals_each_member():
    torch.manual_seed(0)
    for cfg in (_LRM_TINY, replace(_LRM_TINY, text_mode="all")):
        model = lrm.EnsembleLRM(cfg, 3, seed=5)
        z, context, lengths = _lrm_inputs(b=3, seed=1)
        zs, cs, ls = _lrm_inputs(b=3, seed=2)  # a second batch: member i gets batch i
        per_member = (torch.stack([z, zs, z]), torch.stack([context, cs, context]), torch.stack([lengths, ls, lengths]))
        with torch.no_grad():
            shared, own = model(z, context, lengths), model(*per_member)
            for i in range(3):
                single = _lrm_member(model, i)
                torch.testing.assert_close(shared[i], single(z, context, lengths)[0], atol=1e-5, rtol=1e-5)
                alone = single(per_member[0][i], per_member[1][i], per_member[2][i])[0]
                torch.testing.assert_close(own[i], alone, atol=1e-5, rtol=1e-5)
    # member i is initialised exactly like a one-member model with seed + i
    model = lrm.EnsembleLRM(_LRM_TINY, 3, seed=5)
    for i in range(3):
        alone = lrm.EnsembleLRM(_LRM_TINY, 1, seed=5 + i).state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v[i : i + 1], alone[k]), k


def test_lrm_members_differ_and_bootstrap_diversifies():
    torch.manual_seed(0)
    z, context, lengths = _lrm_inputs(b=8, seed=3)
    target = torch.rand(8)
    with torch.no_grad():
        assert lrm.EnsembleLRM(_LRM_TINY, 4)(z, context, lengths).std(0).min() > 1e-3  # differ at init
    outputs = {}
    for bootstrap in (True, False):
        model = lrm.EnsembleLRM(_LRM_TINY, 4)
        with torch.no_grad():  # all members start from member 0's weights
            for p in model.parameters():
                p.copy_(p[:1].expand_as(p))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            stats = lrm.lrm_update(model, opt, z, context, lengths, target, bootstrap=bootstrap, generator=g)
        assert stats["loss"] > 0 and stats["mse"] > 0
        with torch.no_grad():
            outputs[bootstrap] = model(z, context, lengths)
    assert outputs[True].std(0).min() > 1e-3  # own bootstrap batches pull equal members apart
    assert outputs[False].std(0).max() < 1e-5  # the same batch keeps them equal


def test_lrm_update_gives_each_member_its_own_gradient():
    """One SGD step of the ensemble moves member i exactly as one step of member i alone on its batch."""
    torch.manual_seed(0)
    z, context, lengths = _lrm_inputs(b=6, seed=4)
    target = torch.rand(6) * 3  # some errors beyond delta: both Huber branches
    idx = lrm.bootstrap_indices(3, 6, torch.Generator().manual_seed(9))
    for mode in ("bootstrap", "per-member"):
        model = lrm.EnsembleLRM(_LRM_TINY, 3)
        singles = [_lrm_member(model, i) for i in range(3)]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if mode == "bootstrap":
            lrm.lrm_update(model, opt, z, context, lengths, target, bootstrap=True, generator=torch.Generator().manual_seed(9))
        else:
            lrm.lrm_update(model, opt, z[idx], context[idx], lengths[idx], target[idx])
        for i, single in enumerate(singles):
            opt1 = torch.optim.SGD(single.parameters(), lr=0.1)
            j = idx[i]
            lrm.lrm_update(single, opt1, z[j], context[j], lengths[j], target[j], bootstrap=False)
            after = _lrm_member(model, i).state_dict()
            for k, v in single.state_dict().items():
                torch.testing.assert_close(after[k], v, atol=1e-5, rtol=1e-4, msg=f"{mode} member {i} {k}")


def test_lrm_aggregate_and_huber():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 4, generator=g)
    mean, std = lrm.ensemble_stats(r)
    for b in range(4):
        col = r[:, b].tolist()
        m = sum(col) / 5
        s = (sum((x - m) ** 2 for x in col) / 5) ** 0.5
        assert abs(mean[b] - m) < 1e-6 and abs(std[b] - s) < 1e-6
        assert abs(lrm.aggregate(r, "mean")[b] - m) < 1e-6
        assert lrm.aggregate(r, "min")[b] == min(col) and lrm.aggregate(r, "max")[b] == max(col)
        assert abs(lrm.aggregate(r, "lcb", k=2.0)[b] - (m - 2.0 * s)) < 1e-5
    assert torch.equal(lrm.ensemble_stats(r[:1])[1], torch.zeros(4))  # one member: no spread
    with pytest.raises(ValueError, match="'median'"):
        lrm.aggregate(r, "median")
    pred, target = torch.randn(100, generator=g) * 3, torch.randn(100, generator=g)
    for delta in (0.5, 1.0, 2.0):
        oracle = F.huber_loss(pred, target, reduction="none", delta=delta)
        torch.testing.assert_close(lrm.huber_loss(pred, target, delta), oracle)
    assert lrm.huber_loss(torch.tensor(0.5), torch.tensor(0.0)).item() == 0.125  # 0.5 d^2
    assert lrm.huber_loss(torch.tensor(3.0), torch.tensor(0.0)).item() == 2.5  # delta (|d| - delta/2)


def test_lrm_last_token_is_the_last_real_token():
    torch.manual_seed(0)
    z, context, lengths = _lrm_inputs(b=2, length=9, seed=6)
    lengths = torch.tensor([4, 9])
    context[0, 4:] = 0
    last, every = lrm.EnsembleLRM(_LRM_TINY, 2), lrm.EnsembleLRM(replace(_LRM_TINY, text_mode="all"), 2)
    with torch.no_grad():
        base = {m: m(z, context, lengths) for m in (last, every)}
        padded = context.clone()
        padded[0, 4:] = torch.randn(5, 64)  # padding rows must never be read
        earlier = context.clone()
        earlier[0, 2] += 1.0  # a real token before the last one
        final = context.clone()
        final[0, 3] += 1.0  # the last real token of prompt 0
        for m in (last, every):
            torch.testing.assert_close(m(z, padded, lengths), base[m])
            assert (m(z, final, lengths)[:, 0] - base[m][:, 0]).abs().min() > 1e-4
        torch.testing.assert_close(last(z, earlier, lengths), base[last])  # "last" sees one token
        assert (every(z, earlier, lengths)[:, 0] - base[every][:, 0]).abs().min() > 1e-4


def test_lrm_bf16_autocast():
    torch.manual_seed(0)
    model = lrm.EnsembleLRM(_LRM_TINY, 3)
    z, context, lengths = _lrm_inputs(b=4)
    with torch.no_grad():
        ref = model(z, context, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(z, context.bfloat16(), lengths)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 0.02
    before = model.head2.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    stats = lrm.lrm_update(model, opt, z, context, lengths, torch.rand(4), generator=g, amp_dtype=torch.bfloat16)
    assert stats["loss"] == stats["loss"] and not torch.equal(before, model.head2.weight)


def test_lrm_save_load(tmp_path):
    torch.manual_seed(0)
    z, context, lengths = _lrm_inputs(b=3)
    for model in (lrm.EnsembleLRM(replace(_LRM_TINY, text_mode="all"), 3, seed=2), lrm.DollarLRM(_LRM_TINY, seed=3)):
        path = tmp_path / f"{model.kind}.safetensors"
        lrm.save_lrm(model, path)
        loaded = lrm.load_lrm(path)
        assert type(loaded) is type(model) and loaded.cfg == model.cfg and loaded.n_members == model.n_members
        with torch.no_grad():
            assert torch.equal(loaded(z, context, lengths), model(z, context, lengths))
    # a file whose tensors do not fit the config in its metadata names the offending keys
    small = lrm.EnsembleLRM(replace(_LRM_TINY, ffn_dim=96), 3)
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    state["extra"] = torch.zeros(1)
    meta = {"kind": "ensemble", "n_members": "3", "config": json.dumps(asdict(_LRM_TINY))}
    save_file(state, tmp_path / "bad.safetensors", metadata=meta)
    expected = r"unexpected \['extra'\].*layers\.0\.fc1\.weight \(3, 96, 64\) != \(3, 128, 64\)"
    with pytest.raises(ValueError, match=expected):
        lrm.load_lrm(tmp_path / "bad.safetensors")
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an LRM file"):
        lrm.load_lrm(tmp_path / "other.safetensors")


def _lrm_toy_data(n, prompts, directions, g):
    """Latents and prompts with reward tanh(<channel means of z, direction of the prompt> / 4):
    a function of the latent and of the prompt's last real token, like a colour reward."""
    k = torch.randint(len(prompts), (n,), generator=g)
    z = 0.2 * torch.randn(n, 16, 2, 4, 4, generator=g) + torch.randn(n, 16, 1, 1, 1, generator=g)
    lengths = torch.randint(2, prompts.shape[1] + 1, (n,), generator=g)
    context = prompts[k].clone()
    context[torch.arange(n), lengths - 1] = prompts[k, -1]  # the prompt's identity in its last real token
    context[torch.arange(prompts.shape[1]) >= lengths[:, None]] = 0
    return z, context, lengths, torch.tanh((z.mean((2, 3, 4)) * directions[k]).sum(1) / 4)


def _lrm_fit(model, train, test, steps=300, batch=16):
    """AdamW on each member's own random minibatches; held-out MSE of the member mean."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(len(train[3]), (model.n_members, batch), generator=gen)  # (N, B)
        lrm.lrm_update(model, opt, *(t[idx] for t in train))
    with torch.no_grad():
        return (model(*test[:3]).mean(0) - test[3]).pow(2).mean().item()


def test_lrm_fit_ensemble_beats_single_and_dollar():
    """Paper Table 3 in miniature: held-out MSE of the 10-ensemble mean below a single member and Dollar."""
    g = torch.Generator().manual_seed(0)
    prompts, directions = torch.randn(4, 6, 64, generator=g), torch.randn(4, 16, generator=g)
    train, test = _lrm_toy_data(1024, prompts, directions, g), _lrm_toy_data(256, prompts, directions, g)
    models = {"ensemble": lrm.EnsembleLRM(_LRM_TINY, 10), "single": lrm.EnsembleLRM(_LRM_TINY, 1, seed=100),
              "dollar": lrm.DollarLRM(_LRM_TINY, seed=200)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead (and spin on a busy machine)
    try:
        mse = {name: _lrm_fit(model, train, test) for name, model in models.items()}
    finally:
        torch.set_num_threads(threads)
    print("held-out MSE", mse, "target variance", test[3].var().item(), file=sys.stderr)
    assert mse["ensemble"] < 0.8 * mse["single"] and mse["ensemble"] < 0.8 * mse["dollar"]
    assert mse["ensemble"] < 0.25 * test[3].var().item()


def _lrm_video(rgb, b=1, t=3, size=8):
    """A constant-colour video (B, 3, T, H, W) in [-1, 1] from an RGB in [0, 1]."""
    return (torch.tensor(rgb).view(1, 3, 1, 1, 1) * 2 - 1).expand(b, 3, t, size, size).clone()


def test_lrm_reward_color():
    red, blue = _lrm_video((1.0, 0.0, 0.0)), _lrm_video((0.0, 0.0, 1.0))
    prompt = ["a red ball on a blue table"]  # the first colour word counts
    assert rewards.color(red, prompt).item() == 1.0
    assert abs(rewards.color(blue, prompt).item() - (1 - 2 / 3)) < 1e-6
    assert rewards.color(blue, ["A BLUE car"]).item() == 1.0
    assert rewards.color(_lrm_video((0.5, 0.5, 0.5)), ["a grey cat"]).item() == 1.0
    assert rewards.color(red, ["a reddish dog"]).item() == rewards.NEUTRAL  # whole words only
    both = torch.cat([red, blue])
    assert torch.equal(rewards.color(both, ["a red kite", "a cat"]), torch.tensor([1.0, rewards.NEUTRAL]))
    with pytest.raises(ValueError, match="2 prompts for 1 videos"):
        rewards.color(red, ["a", "b"])


def test_lrm_reward_sharpness_smoothness_motion():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 4, 16, 16, generator=g) * 2 - 1
    blurred = F.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert (rewards.sharpness(blurred, ["", ""]) < 0.7 * rewards.sharpness(video, ["", ""])).all()
    assert rewards.sharpness(_lrm_video((0.2, 0.4, 0.6)), [""]).item() == 0.0
    static = video[:, :, :1].expand(-1, -1, 4, -1, -1)
    assert torch.equal(rewards.motion(static, ["", ""]), torch.zeros(2))
    assert torch.equal(rewards.smoothness(static, ["", ""]), torch.ones(2))  # the maximum
    assert (rewards.motion(video, ["", ""]) > 0.2).all() and (rewards.smoothness(video, ["", ""]) < 0.9).all()
    flip = torch.stack([-torch.ones(3, 8, 8), torch.ones(3, 8, 8)], dim=1)[None]  # black -> white
    assert rewards.motion(flip, [""]).item() == 1.0 and rewards.smoothness(flip, [""]).item() == 0.0
    with pytest.raises(ValueError, match="at least 2 frames, got 1"):
        rewards.motion(video[:, :, :1], ["", ""])


def test_lrm_reward_gradients():
    g = torch.Generator().manual_seed(0)
    for name, fn in rewards.BUILTIN.items():
        video = (torch.rand(2, 3, 3, 8, 8, generator=g) * 1.8 - 0.9).requires_grad_(True)
        fn(video, ["a green field", "an orange sunset"]).sum().backward()
        assert video.grad is not None and video.grad.abs().sum() > 0, name


def test_lrm_load_reward(tmp_path, monkeypatch):
    assert rewards.load_reward("color") is rewards.color
    (tmp_path / "lrm_user_rm.py").write_text(
        "import torch\n"
        "def brightness(video, prompts):\n"
        "    return video.mean((1, 2, 3, 4))\n"
        "class Scaled:\n"
        "    def __init__(self, scale=2.0):\n"
        "        self.scale = scale\n"
        "    def __call__(self, video, prompts):\n"
        "        return self.scale * video.mean((1, 2, 3, 4))\n"
        "not_callable = 3\n"
    )
    video = torch.full((2, 3, 2, 4, 4), 0.25)
    by_path = rewards.load_reward(f"{tmp_path / 'lrm_user_rm.py'}:brightness")
    assert torch.equal(by_path(video, ["a", "b"]), torch.full((2,), 0.25))
    factory = rewards.load_reward(f"{tmp_path / 'lrm_user_rm.py'}:Scaled")  # a class: built once
    assert torch.equal(factory(video, ["a", "b"]), torch.full((2,), 0.5))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert torch.equal(rewards.load_reward("lrm_user_rm:brightness")(video, ["a", "b"]), torch.full((2,), 0.25))
    with pytest.raises(TypeError, match="not callable"):
        rewards.load_reward("lrm_user_rm:not_callable")
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        rewards.load_reward("lrm_user_rm:missing")
    with pytest.raises(ValueError, match="neither a built-in"):
        rewards.load_reward("beauty")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
