"""The parts of reward feedback learning on Wan that VELR's trainer (train_refl.py) and LPO's
(train_lpo.py) share: loading the models (or the offline toy world), prompt embeddings and, for
image-to-video, the images' conditioning (`ImageConditioning`), the guided velocity and the
initial model's, VELR's online LRM alignment (the replay buffer's offers and the Huber re-fit,
Algorithm 1 and App. C.2 of "VELR: Efficient Video Reward Feedback via Ensemble Latent Reward
Models"), the evaluation on fixed prompts and seeds, and `Run`: the run folder, checkpoints,
resume, metrics.jsonl and the end of a run under torchrun.

Distributed: LoRA under DDP (the fp32 adapters replicated), full fine-tuning under FSDP2 with a
frozen sharded copy as the reference; Ulysses sequence parallelism splits each sample's tokens
over --sp-size ranks (distributed.py). The buffer and the LRM stay identical on every rank.
"""

import copy
import gc
import json
import math
import os
import random
import resource
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed
import lora
import lrm as lrm_lib
import model_dit
import picture as picture_lib
import replay
import rewards
import runs
import sample
import text_encoder
import toy
import vae as vae_lib
from model_dit import load_dit
from vae import load_vae

ALIGN_CLEAN_PROB = 0.1  # share of clean latents when a noise-aware LRM is aligned (train_lrm.py's --clean-prob default)
RUN_FILES = ("args.json", "metrics.jsonl", "ckpt.pt", "lora.safetensors", *lora.EXPERT_FILES.values(), "summary.json",
             "sync.json", "samples")
# VELR's window starts, mid steps 15..25 of its 50-step UniPC grid at shift 5 (§4.3, App. C.2), as
# sigmas: the default window of a model with another grid (the A14B's 40 steps at shift 12)
VELR_MID_SIGMA = tuple(float(s) for s in sample.get_sigmas(50, 5.0, "unipc")[[25, 15]])


# ----------------------------------------------------------------------------- configuration

@dataclass
class RunConfig:
    """The settings VELR's trainer (train_refl.ReFLConfig) and LPO's (train_lpo.LPOConfig) share;
    their defaults are the VELR paper's (§4.3, App. C.2, C.3). Each field is a flag, its comment the help."""
    # models and data (none given: the offline toy world)
    ckpt_dir: str | None = None  # a Wan repo folder (original or Diffusers layout; sample.MODELS)
    dit: str | None = None  # DiT file or folder (overrides --ckpt-dir)
    vae: str | None = None  # VAE file or folder (overrides --ckpt-dir)
    text_encoder: str | None = None  # UMT5 file or folder (overrides --ckpt-dir)
    tokenizer: str | None = None  # tokenizer folder or file (overrides --ckpt-dir)
    lrm: str | None = None  # a pretrained LRM (train_lrm.py); the toy world bootstraps its own
    toy_lrm: Literal["ensemble", "dit"] = "ensemble"  # without --lrm, the toy world's LRM: its ensemble (noise-aware
    #                                                   where the run needs one), or dit: PRFL's reward model, the
    #                                                   generator's blocks under noise-aware heads (--preset prfl)
    reward: str | None = None  # pixel reward: a rewards.py built-in or module:attr (the toy world: its own)
    prompts: str | None = None  # text file, one prompt per line, or a jsonl of {"prompt", "image"} for image-to-video
    #                             (toy world: its own captions)
    image_cache: int = 256  # image-to-video: images whose conditioning (y, latent, CLIP) stays in host memory; the
    #                         least recently used is dropped and recomputed when drawn again (y: 5 MiB at 480p)
    size: str = "832x480"  # WxH, multiples of 16
    frames: int = 81  # 4k+1
    cache_dir: str | None = None  # toy world cache (default <repo>/.cache/toy or $VELR_CACHE/toy)
    toy_world: Literal["random", "watchable"] | None = None  # which toy world (toy.py; default $VELR_TOY_WORLD,
    #                                                          else watchable; random is the tests' world)
    # sampler and window
    sample_steps: int = 50  # sampler steps
    shift: float = 5.0  # timestep shift
    solver: Literal["unipc", "euler"] = "unipc"  # sampler
    guidance: float = 5.0  # CFG scale, 1 = none
    cfg_grad: Literal["both", "cond"] = "both"  # gradient of the guided velocity v_u + g (v_c - v_u): both: exact,
    #                                             g dv_c + (1 - g) dv_u; cond: the unconditional branch without
    #                                             gradient (g dv_c only, one DiT backward less per step, biased)
    mid_min: int = 15  # first step the window may start at
    mid_max: int = 25  # last step the window may start at
    mid_sigma: tuple[float, float] | None = None  # LO HI: the window starts at the steps whose sigma is in [LO, HI]
    #                                               (sets --mid-min/--mid-max from the grid; the A14B: VELR's range)
    window: int = 10  # K, the steps with gradient
    beta: float = 10.0  # KL weight, 0 = no KL
    agg: Literal["mean", "min", "max", "lcb"] = "mean"  # ensemble aggregation
    lcb_k: float = 1.0  # lcb = mean - k std over members; mean - k sqrt(Var_members + v(sigma)) for a Thurstone LRM
    lr: float = 1e-5  # learning rate
    batch_size: int = 4  # prompts per rank and micro-batch
    grad_accum: int = 1  # micro-batches per update, each batch_size prompts per rank; their gradients are averaged
    prompt_dropout: float = 0.0  # probability that a training sample's prompt is the empty one (its DiT calls, its
    #                              reward and its buffer label all see ""); evaluation never drops
    gradient_checkpointing: bool = False  # recompute each window step and DiT block in backward
    grad_clip: float = 0.0  # clip the gradients' global norm to this before each update; 0 = off (VELR states none)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay of the trained weights (VELR states none)
    # two experts (Wan 2.2 A14B, or the toy world split with --boundary)
    experts: Literal["both", "low", "high"] = "both"  # which experts train. both: each its own adapters and optimiser,
    #                                                  stepped only when it ran with gradient (exact); low: the window's
    #                                                  high-noise steps run without gradient; high: the gradient runs
    #                                                  back through the frozen low-noise expert's steps
    boundary: float | None = None  # t >= boundary * 1000 runs the high-noise expert (None: the model's; a value in the
    #                                toy world splits its generator into two experts, both starting as it)
    guidance_high: float | None = None  # the high-noise expert's CFG scale (None: --guidance; --guidance is the low one's)
    offload_idle: bool = False  # --experts low: the frozen high-noise expert waits on the CPU while the low-noise one
    #                             runs (one transfer each way per rollout; its GPU memory free for the window's backward)
    # trainable weights
    full_finetune: bool = False  # train every DiT weight (FSDP2 under torchrun)
    lora_rank: int = 256  # LoRA rank (VELR App. C.3)
    lora_alpha: float = 256.0  # LoRA alpha; scale = alpha / rank
    lora_targets: str = ",".join(lora.WAN_TARGETS)  # comma-separated Linear names inside each block
    # online LRM alignment
    align_every: int = 10  # ReFL steps between alignments, 0 = never
    align_rounds: int = 2  # passes over the buffer per alignment, each ceil(entries / batch) updates (App. C.2)
    align_lr: float = 1e-5  # LRM learning rate
    align_delta: float | None = None  # Huber delta of the alignment (None: the LRM file's, its train_lrm --huber-delta)
    buffer_size: int = 256  # replay buffer entries
    refresh_variance: bool = False  # before each alignment, rescore the buffer's variances with the current LRM (the
    #                                 paper stores them once, at admission; the toy preset rescores: see TOY_PRESET)
    # run
    steps: int = 1000  # training steps
    eval_every: int = 100  # steps between evaluations, 0 = before and after only
    eval_samples: int = 8  # fixed prompt/seed pairs evaluated
    picture_rows: int = 2  # pairs in samples/before_after.png (initial vs trained model); 0 = no picture
    save_every: int = 100  # steps between checkpoints, 0 = only at the end
    out: str = "runs/refl"  # run folder
    resume: str | None = None  # ckpt.pt to continue from
    overwrite: bool = False  # start a new run in a non-empty --out, replacing it
    max_bad_steps: int = 10  # stop once more steps + LRM updates than this were skipped for non-finite values
    compile: bool = False  # torch.compile the DiT's blocks and the LRM (numerics unchanged)
    sp_size: int = 1  # Ulysses sequence parallelism: ranks that split each sample's tokens (1: off)
    seed: int = 0  # seed
    stop_after: int | None = None  # exit right after this step as a crash would (to test --resume)
    allow_changed: str | None = None  # --resume: run-defining settings that may differ from the checkpoint's,
    #                                    comma-separated flag names (dashes optional: guidance,align-lr); each
    #                                    change is recorded in metrics.jsonl as {"step", "changed": {key: [old, new]}}

    @property
    def toy(self) -> bool:
        return not (self.ckpt_dir or self.dit)

    @property
    def width(self) -> int:
        return vae_lib.parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return vae_lib.parse_size(self.size)[1]

    def record(self) -> dict:
        """What args.json holds: every resolved field, the presets applied."""
        return {**asdict(self), "toy": self.toy, "presets": getattr(self, "presets", [])}


# The settings that define a run: a checkpoint continues only under the same ones (--steps may grow).
RUN_KEYS = ("full_finetune", "lora_rank", "lora_alpha", "lora_targets", "batch_size", "sample_steps", "shift", "solver",
            "mid_min", "mid_max", "window", "size", "frames", "agg", "seed", "buffer_size", "toy_world", "sp_size",
            "grad_clip", "weight_decay", "grad_accum", "prompt_dropout", "reward", "guidance", "cfg_grad", "eval_samples", "lcb_k", "beta", "lr",
            "lrm", "toy_lrm", "align_every", "align_rounds", "align_lr", "align_delta", "refresh_variance", "prompts",
            "mid_sigma", "experts", "boundary", "guidance_high")

# The offline toy world's settings, a preset of both trainers (its sampler is the one the toy
# generator was trained and its LRM bootstrapped with). It rescores the buffer's variances before each
# alignment: with variances kept from admission (the paper's rule, still the `paper` preset's) the
# buffer stops admitting the policy's samples late in a long toy run and its true reward falls
# (BENCH.md, the long run); --no-refresh-variance restores the paper's rule.
TOY_PRESET = dict(toy_world=lambda c: toy.default_world(),
                  reward=lambda c: toy.WORLDS[c.toy_world].reward, sample_steps=toy.ToyConfig.sample_steps,
                  shift=toy.ToyConfig.shift, solver="euler", mid_min=6, mid_max=10, window=5, beta=0.1, lr=5e-4,
                  align_lr=1e-4, steps=100, eval_every=50, eval_samples=48, guidance=1.0,
                  size=f"{toy.ToyConfig.size}x{toy.ToyConfig.size}", frames=toy.ToyConfig.frames, lora_rank=16,
                  lora_alpha=16.0, picture_rows=6, refresh_variance=True)


def base_preset(given: dict) -> str:
    """paper with checkpoints, toy without."""
    return "paper" if given.get("ckpt_dir") or given.get("dit") else "toy"


# Wan 2.2 T2V-A14B: its own sampler (40 UniPC steps at shift 12), guidance pair and expert boundary
# (sample.MODELS), and VELR's window carried over by sigma; goes on top of `paper`.
A14B = sample.MODELS["t2v-A14B"]
A14B_PRESET = dict(sample_steps=A14B["steps"], shift=A14B["shift"], guidance=A14B["guidance"][0],
                   guidance_high=A14B["guidance"][1], boundary=A14B["boundary"], mid_sigma=VELR_MID_SIGMA)


# Wan 2.2 TI2V-5B, trained as text-to-video: its official frames and size (sample.MODELS; the
# sampler, 50 UniPC steps at shift 5 with CFG 5, is the paper's); the 2.2 VAE's latents, 48 channels at /16.
TI2V_5B_PRESET = dict(frames=sample.MODELS["ti2v-5B"]["frames"], size=sample.MODELS["ti2v-5B"]["size"])
# The image-to-video models: their samplers (40 UniPC steps at shift 5; I2V-A14B: its guidance pair and
# boundary) and VELR's window carried over by sigma; the size stays --size (every image is fitted to it).
I2V_A14B, I2V_14B = sample.MODELS["i2v-A14B"], sample.MODELS["i2v-14B"]
I2V_A14B_PRESET = dict(sample_steps=I2V_A14B["steps"], shift=I2V_A14B["shift"], guidance=I2V_A14B["guidance"][0],
                       guidance_high=I2V_A14B["guidance"][1], boundary=I2V_A14B["boundary"], mid_sigma=VELR_MID_SIGMA)
I2V_14B_PRESET = dict(sample_steps=I2V_14B["steps"], shift=I2V_14B["shift"], guidance=I2V_14B["guidance"],
                      mid_sigma=VELR_MID_SIGMA)
MODEL_PRESETS = {"t2v-A14B": A14B_PRESET, "ti2v-5B": TI2V_5B_PRESET, "i2v-A14B": I2V_A14B_PRESET,
                 "i2v-14B": I2V_14B_PRESET}


def model_presets(given: dict) -> list[str]:
    """[the model's name] when --ckpt-dir holds one of MODEL_PRESETS, else []."""
    d = given.get("ckpt_dir")
    held = sample.detect_model(d) if d and Path(d).is_dir() else None
    return [held] if held in MODEL_PRESETS else []


def validate(c: RunConfig):
    """The checks of the shared settings: a one-line error naming the flag."""
    for k in ("sample_steps", "window", "lr", "batch_size", "lora_rank", "steps", "eval_samples", "buffer_size",
              "align_rounds", "sp_size", "grad_accum", "image_cache"):
        if getattr(c, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(c, k)}")
    for k in ("beta", "align_every", "align_lr", "eval_every", "save_every", "lcb_k", "max_bad_steps", "picture_rows",
              "grad_clip", "weight_decay"):
        if getattr(c, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(c, k)}")
    def f(k):
        return runs.flag(c, k)

    if c.mid_sigma is not None:
        c.mid_min, c.mid_max = starts_in_sigma(c.mid_sigma, sample.get_sigmas(c.sample_steps, c.shift, c.solver), c.window)
    if c.boundary is not None and not 0 < c.boundary < 1:
        raise ValueError(f"--boundary must be in (0, 1), a fraction of the 1000 training timesteps, got {c.boundary}")
    if c.offload_idle and (c.experts != "low" or c.full_finetune):
        raise ValueError(f"--offload-idle moves the frozen high-noise expert of --experts low (LoRA), got --experts "
                         f"{c.experts}{' --full-finetune' if c.full_finetune else ''}")
    if c.guidance_high is not None and not math.isfinite(c.guidance_high):
        raise ValueError(f"--guidance-high must be a finite number, got {c.guidance_high}")
    if not 0 <= c.mid_min <= c.mid_max:
        raise ValueError(f"need 0 <= {f('mid_min')} <= {f('mid_max')}, got {c.mid_min}, {c.mid_max}")
    if c.mid_max + c.window >= c.sample_steps:
        raise ValueError(f"{f('mid_max')} + {f('window')} must stay below {f('sample_steps')} {c.sample_steps}, "
                         f"got {c.mid_max} + {c.window}")
    vae_lib.check_size(c.frames, c.height, c.width)
    if c.frames < 5:
        raise ValueError(f"--frames {c.frames} is a still image, not a video: video ReFL needs at least 5 frames")
    for k in ("shift", "guidance", "beta", "lr", "lcb_k", "lora_alpha", "align_lr"):
        if not math.isfinite(getattr(c, k)):
            raise ValueError(f"--{k.replace('_', '-')} must be a finite number, got {getattr(c, k)}")
    if not 0 <= c.prompt_dropout < 1:
        raise ValueError(f"{f('prompt_dropout')} must be in [0, 1), got {c.prompt_dropout}")
    if c.align_delta is not None and not (math.isfinite(c.align_delta) and c.align_delta > 0):
        raise ValueError(f"--align-delta must be a finite number > 0, got {c.align_delta}")
    if c.shift <= 0:
        raise ValueError(f"--shift must be > 0, got {c.shift}")
    if not c.full_finetune and c.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be > 0 (the LoRA's scale is alpha / rank; 0 would train nothing), "
                         f"got {c.lora_alpha}")


def starts_in_sigma(mid_sigma, sigmas, window: int) -> tuple[int, int]:
    """(mid_min, mid_max): the first and last sampler step whose sigma lies in [LO, HI] and whose
    window of `window` steps fits the grid."""
    lo, hi = sorted(mid_sigma)
    n = len(sigmas) - 1
    steps = [i for i in range(n - window) if lo <= float(sigmas[i]) <= hi]
    if not steps:
        raise ValueError(f"--mid-sigma {lo} {hi}: no step of the {n}-step grid (sigmas {float(sigmas[0]):.3f} .. "
                         f"{float(sigmas[n - 1]):.3f}) starts a {window}-step window in that range")
    return steps[0], steps[-1]


def check_noise_aware(cfg, flag: str, name):
    """A reward on noisy latents (flag) needs an LRM trained on them: refuse one trained on clean latents."""
    if not cfg.timestep_cond:
        raise ValueError(f"{flag} needs a noise-aware LRM (train_lrm.py --noise-aware, --model ensemble or dit); "
                         f"{name} was trained on clean latents only")


# ----------------------------------------------------------------------------- models and prompts

def load_models(c, device, rank, noise_aware_flag=None, two_experts=False, images_ok=False):
    """(dit, vae, text encoder, tokenizer, LRM or None, training prompts, image) for config `c`. Every
    file named on the command line is checked before the first model loads (a 14B DiT takes minutes).
    noise_aware_flag: the flag that needs a noise-aware LRM (None: any LRM will do). The dit is a
    model_dit.TwoExpertDiT for the A14B models, and for the toy world with --boundary (its generator
    twice, the experts starting equal); two_experts: whether the caller trains one. image: None for
    text-to-video, else {"kind": image_kind's, "paths": each prompt's image, "clip": Wan 2.1 I2V's
    image encoder or None}; images_ok: whether the caller trains image-to-video."""
    held = sample.detect_model(c.ckpt_dir) if c.ckpt_dir else None
    two = held in ("t2v-A14B", "i2v-A14B") or (c.toy and c.boundary is not None)
    if c.boundary is not None and not two:
        raise ValueError(f"--boundary {c.boundary} splits two experts; {c.ckpt_dir or c.dit} holds one DiT")
    if getattr(c, "offload_idle", False) and not two:
        raise ValueError(f"--offload-idle moves the idle one of two experts; {c.ckpt_dir or c.dit or 'the toy world'} "
                         f"holds one DiT (the toy world splits its generator with --boundary)")
    if two and not two_experts:
        raise ValueError(f"{c.ckpt_dir or 'the toy world with --boundary'} is a two-expert model; this trainer runs "
                         f"one DiT (train_refl.py trains both)")
    paths = sample.model_paths(c)
    prompts, image_paths = read_entries(c, held)
    kind = image_kind(held, image_paths)
    if kind is not None and not images_ok:
        raise ValueError(f"{c.ckpt_dir} holds {held} and --prompts {c.prompts} gives images: this trainer runs "
                         f"text-to-video; train_refl.py trains image-to-video")
    if c.lrm and not Path(c.lrm).is_file():
        raise FileNotFoundError(f"--lrm {c.lrm} " + ("is a folder; give the LRM .safetensors file in it"
                                                     if Path(c.lrm).is_dir() else "does not exist"))
    dollar = getattr(c, "mode", None) == "dollar"
    if dollar and c.lrm is None:
        raise ValueError("--mode dollar needs a Dollar LRM via --lrm (train_lrm.py --model dollar)")
    lrm = lrm_lib.load_lrm(c.lrm) if c.lrm else None  # the small files first: a bad one is found in seconds
    if getattr(getattr(lrm, "cfg", None), "image_cond", False) and kind is None:
        raise ValueError(f"--lrm {c.lrm} reads a conditioning image (image_cond); this run is text-to-video")
    clip = None
    if c.toy:  # every rank, before the barrier below (load_world checks again, but rank 0 first and alone)
        toy.check_trained(toy.WORLDS[c.toy_world], c.cache_dir)
    if c.toy:
        if rank != 0:
            distributed.barrier()  # rank 0 builds the cache first
        log = print if rank == 0 else lambda s: None
        world_cfg = toy.WORLDS[c.toy_world]
        dit, vae, encoder, tokenizer, toy_lrm = toy.load_world(world_cfg, cache_dir=c.cache_dir, log=log)
        if lrm is None and (noise_aware_flag or c.toy_lrm == "dit") and not dollar:
            toy_lrm = toy.load_noise_aware_lrm(dit, vae, encoder, tokenizer, world_cfg, cache_dir=c.cache_dir, log=log,
                                               dit_trunk=c.toy_lrm == "dit")
        if two:
            dit = model_dit.TwoExpertDiT(dit, copy.deepcopy(dit), c.boundary, expert_guidance(c))
        if rank == 0:
            distributed.barrier()
        lrm = toy_lrm if lrm is None else lrm
    else:
        vae_cfg = vae_lib.read_config(paths["vae"])  # the size rule of its stride, before the DiT loads
        vae_lib.check_size(c.frames, c.height, c.width, vae_cfg.size_multiple)
        tokenizer, dt = text_encoder.load_tokenizer(paths["tokenizer"]), sample.dtypes(device)
        # LoRA trains fp32 adapters on the policy's (bf16 on GPU) frozen base; full fine-tuning keeps fp32 master weights
        dtype = torch.float32 if c.full_finetune else dt["dit"]
        dit = load_dit(paths["dit"], dtype=dtype)
        if two:
            low = load_dit(paths["dit_low"], dtype=dtype)
            dit = model_dit.TwoExpertDiT(dit, low, c.boundary or A14B["boundary"], expert_guidance(c))
        want = vae_cfg.z_dim if kind in (None, "ti2v") else 2 * vae_cfg.z_dim + 4  # I2V: [x, mask, image latent]
        if dit.cfg.in_dim != want:
            i2v = kind is None and dit.cfg.in_dim == 2 * vae_cfg.z_dim + 4
            hint = ("; it is an image-to-video DiT: give --prompts as a jsonl of {\"prompt\", \"image\"}" if i2v else
                    " (the Wan 2.1 VAE makes 16, Wan 2.2's 48; the I2V DiTs read 2 x 16 + 4)")
            raise ValueError(f"the DiT {paths['dit']} reads {dit.cfg.in_dim} input channels, this run gives it {want} "
                             f"from the VAE {paths['vae']}'s {vae_cfg.z_dim}-channel latents{hint}")
        vae = load_vae(paths["vae"], device=device, dtype=dt["vae"])
        encoder = text_encoder.load_text_encoder(paths["text_encoder"], device=device, dtype=dt["text_encoder"])
        if kind == "i2v+clip":
            import clip as clip_lib

            clip = clip_lib.load_clip(paths["clip"], device=device, dtype=dt["vae"])
    if lrm is not None and noise_aware_flag:
        check_noise_aware(lrm.cfg, noise_aware_flag, c.lrm or "the toy world's LRM")
    if lrm is not None:
        check_lrm_fits(lrm, dit.cfg, c.lrm or "the toy world's LRM", print if rank == 0 else lambda s: None)
    image = None if kind is None else {"kind": kind, "paths": image_paths, "clip": clip}
    return dit, vae.to(device), encoder, tokenizer, lrm, prompts, image


def read_entries(c, held) -> tuple[list[str], list]:
    """--prompts -> (prompts, each one's image path or None): a text file (one prompt per line), or a
    jsonl of {"prompt", "image"} (sample.read_prompt_images). The images must suit the model held:
    every prompt of an image-to-video model has one, a text-to-video model takes none, and the
    TI2V-5B runs one mode for the whole run (all prompts with an image, or none). Every image is
    read here, before any model loads."""
    if not c.prompts:
        if c.toy:
            prompts = toy.prompt_list()
            return prompts, [None] * len(prompts)
        raise ValueError("real checkpoints need --prompts FILE (one prompt per line, or a jsonl of "
                         "{\"prompt\", \"image\"} for image-to-video)")
    prompts, images = sample.read_prompt_images(c.prompts)
    given = [i for i, p in enumerate(images) if p is not None]
    need = sample.MODELS[held]["image"] if held else None
    if given and not c.toy and held is None:
        raise ValueError(f"--prompts {c.prompts} gives images: image-to-video training needs --ckpt-dir, whose "
                         f"files tell which model it is and how its images condition it")
    if given and (c.toy or need is None):
        raise ValueError(f"--prompts {c.prompts} gives images, and {c.ckpt_dir or 'the toy world'} holds "
                         f"{held or 'a text-to-video generator'}, which takes none")
    if need == "required" and len(given) < len(prompts):
        line = next(i for i, p in enumerate(images) if p is None) + 1
        raise ValueError(f"{c.ckpt_dir} holds {held}, an image-to-video model: every prompt needs an image "
                         f"(--prompts as a jsonl of {{\"prompt\", \"image\"}}); prompt {line} of {c.prompts} has none")
    if need == "optional" and 0 < len(given) < len(prompts):
        raise ValueError(f"--prompts {c.prompts}: {len(given)} of {len(prompts)} prompts have an image; a TI2V-5B run "
                         f"is image-to-video (every prompt with an image) or text-to-video (none)")
    for path in dict.fromkeys(images[i] for i in given):
        sample.load_image(path)  # a missing or unreadable image: its one-line error, now
    return prompts, images


def image_kind(held, images) -> str | None:
    """How the images condition the model held: "i2v" (Wan 2.2 I2V-A14B: mask + image latent beside the
    noisy latent on channels), "i2v+clip" (Wan 2.1 I2V-14B: and CLIP features before the prompt in
    cross-attention), "ti2v" (TI2V-5B: the image latent is the clean first latent frame), None (text-to-video)."""
    if not any(p is not None for p in images):
        return None
    return {"i2v-A14B": "i2v", "i2v-14B": "i2v+clip", "ti2v-5B": "ti2v"}[held]


class ImageConditioning:
    """An image-to-video run's conditioning of each prompt entry's image, computed when a batch first
    needs it and kept on the CPU for the `cache` most recently used images (the rest recomputed on
    demand: the computation is deterministic, so a recomputed image conditions exactly as before).
    Each image is fitted to the run's --size by scaling to cover and centre-cropping (every batch is
    one size; the official I2V sampler instead fits the size to each image, sample.py). Per image:
      image_latent (C, 1, H', W'): the image's VAE latent, the TI2V-5B's clean first latent frame,
        stored in the replay buffer with each z0 for an LRM that sees the image (lrm.LRMConfig.image_cond);
      y (4 + C, F', H', W'): the I2V models' extra input channels, mask + latent of the image followed
        by black frames (sample.i2v_condition), in the DiT's dtype: 5 MiB in bf16 at 480p and 81 frames;
      clip (257, 1280): Wan 2.1 I2V's CLIP ViT-H/14 features of the fitted image (sample.py's are of the
        image as given; the same when it already has the run's size), also stored in the buffer.
    entry_image (E,): the image of each prompt entry."""

    def __init__(self, kind, paths, vae, clip, frames, height, width, device, dtype, cache: int = 256):
        self.kind, self.vae, self.clip, self.frames, self.size = kind, vae, clip, frames, (height, width)
        self.device, self.dtype, self.cache = device, dtype, cache
        self.paths = list(dict.fromkeys(paths))
        self.entry_image = torch.tensor([self.paths.index(p) for p in paths])
        self.rows = OrderedDict()  # image index -> its tensors, least recently used first

    def image(self, i: int) -> torch.Tensor:
        """Image i fitted to the run's size, (3, H, W) in [-1, 1]."""
        return sample.resize_crop(sample.load_image(self.paths[i]), *self.size)

    def image_rows(self, i: int) -> dict:
        if i in self.rows:
            self.rows.move_to_end(i)
            return self.rows[i]
        img = self.image(i)[None].to(self.device)
        with torch.no_grad():
            rows = {"image_latent": sample.ti2v_image_latent(self.vae, img)[0].cpu()}
            if self.kind != "ti2v":
                rows["y"] = sample.i2v_condition(self.vae, img, self.frames)[0].to("cpu", self.dtype)
            if self.kind == "i2v+clip":
                rows["clip"] = self.clip.encode_image(img)[0].to("cpu", self.dtype)
        self.rows[i] = rows
        while len(self.rows) > self.cache:
            self.rows.popitem(last=False)
        return rows

    def batch(self, entries, device) -> dict:
        """The conditioning of prompt entries (B,): the DiT's inputs ("y", "clip"; "first_frame" for
        the TI2V-5B) and "image_latent"."""
        rows = [self.image_rows(i) for i in self.entry_image[torch.as_tensor(entries)].tolist()]
        out = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
        if self.kind == "ti2v":
            out["first_frame"] = out["image_latent"]
        return out


def stored_conditioning(cond) -> dict:
    """What the replay buffer keeps of a batch's conditioning (None: text-to-video): the image latent,
    and Wan 2.1 I2V's CLIP features, so that the alignment can rescore the entry with an LRM that sees them."""
    return {k: cond[k] for k in ("image_latent", "clip") if k in cond} if cond else {}


def dit_inputs(model, x, t, cond) -> tuple:
    """(x, t, keyword inputs) of a DiT call under a batch's image conditioning `cond` (None: as given).
    The TI2V-5B sees latent frame 0 replaced by the image latent with its tokens at t = 0."""
    if not cond:
        return x, t, {}
    if "first_frame" in cond:
        patch = unwrap(model).cfg.patch_size
        x = sample.put_first_frame(x, cond["first_frame"])
        t = model_dit.first_frame_timesteps(t, tuple(s // p for s, p in zip(x.shape[2:], patch)))
    return x, t, {k: cond[k] for k in ("y", "clip") if k in cond}


def lrm_image(lrm, image) -> dict:
    """The LRM's keyword for the conditioning image latent: {"image": image} for an LRM that reads it
    (lrm.LRMConfig.image_cond, off by default), else {}."""
    return {"image": image} if image is not None and getattr(getattr(lrm, "cfg", None), "image_cond", False) else {}


def final_latent(z, cond):
    """The video latent a rollout ends with: the TI2V-5B's first latent frame is the image's."""
    return sample.put_first_frame(z, cond["first_frame"]) if cond and "first_frame" in cond else z


def expert_guidance(c) -> tuple[float, float]:
    """(low, high) CFG scales of a two-expert model: --guidance and --guidance-high (default: the same)."""
    return c.guidance, c.guidance if c.guidance_high is None else c.guidance_high


def check_lrm_fits(lrm, dit_cfg, name, log):
    """The LRM reads the generator's latents and prompt embeddings: their widths must be its own
    (one line, before the first step). A DiT LRM whose trunk is another DiT than the generator is
    allowed (its own trunk weights score the latents), with a note naming what differs."""
    if lrm.cfg.in_channels != dit_cfg.out_dim or lrm.cfg.text_dim != dit_cfg.text_dim:
        raise ValueError(f"--lrm {name} reads {lrm.cfg.in_channels}-channel latents and {lrm.cfg.text_dim}-wide "
                         f"prompt embeddings, the generator makes {dit_cfg.out_dim} and {dit_cfg.text_dim}")
    trunk = getattr(lrm.cfg, "dit", None)
    if trunk is not None:
        differ = [f"{k} {getattr(trunk, k)} (generator {getattr(dit_cfg, k)})" for k in asdict(trunk)
                  if k != "num_layers" and getattr(trunk, k) != getattr(dit_cfg, k)]
        if differ:
            log(f"note: --lrm {name} is a DiT LRM built on another DiT than the generator ({', '.join(differ)}); "
                f"it scores through its own trunk, not the generator's blocks as PRFL does")


def embed_prompts(prompts: list[str], tokenizer, encoder, device, text_len: int = 512) -> dict:
    """prompt -> (context (text_len, C) on the CPU, length); the encoder is not needed afterwards.
    text_len: the DiT's (Wan's 512; the watchable toy world's DiT reads 32)."""
    table = {}
    unique = sorted(set(prompts))
    with torch.no_grad():
        for i in range(0, len(unique), 16):
            context, lengths = text_encoder.encode_prompts(unique[i : i + 16], tokenizer, encoder.to(device), text_len)
            for p, c, n in zip(unique[i : i + 16], context.cpu(), lengths.cpu()):
                table[p] = (c, n)
    return table


def text_batch(table: dict, prompts: list[str], device):
    context = torch.stack([table[p][0] for p in prompts]).to(device)
    lengths = torch.stack([table[p][1] for p in prompts]).to(device)
    return context, lengths


def draw_batch(seed: int, step: int, rank: int, prompts: list[str], batch_size: int, shape) -> tuple[list[str], torch.Tensor]:
    """The step's prompts and starting noise, a pure function of (seed, step, rank): a resumed run
    replays the same data, and every rank draws its own."""
    idx, noise = draw_entries(seed, step, rank, len(prompts), batch_size, shape)
    return [prompts[i] for i in idx], noise


def draw_entries(seed: int, step: int, rank: int, n: int, batch_size: int, shape) -> tuple[list[int], torch.Tensor]:
    """draw_batch's draw as prompt entry indices (of n): an image-to-video run's images go with them."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)
    idx = torch.randint(n, (batch_size,), generator=g).tolist()
    return idx, torch.randn(batch_size, *shape, generator=g)


def drop_prompts(prompts: list[str], p: float, seed: int, step: int, rank: int) -> list[str]:
    """Prompt dropout: each prompt replaced by "" with probability p, drawn from (seed, step, rank)
    alone (its own generator: the batch's other draws do not move when p changes)."""
    if p == 0:
        return prompts
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank + 7_368_787)
    return ["" if d else q for q, d in zip(prompts, (torch.rand(len(prompts), generator=g) < p).tolist())]


def micro_key(step: int, micro: int, micros: int) -> int:
    """The draw key of micro-batch `micro` of update `step` under --grad-accum micros: the draws of
    consecutive updates never repeat, and without accumulation the key is the step."""
    return (step - 1) * micros + micro + 1


def shared_generator(seed: int, step: int) -> torch.Generator:
    """Seeded by (seed, step) alone: the same draw on every rank (the window's position)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 - 1)


# ----------------------------------------------------------------------------- velocities

def velocity(model, x, t, context, neg_context, guidance, cfg_grad="both", checkpoint=False, cond=None):
    """Guided velocity v_u + g (v_c - v_u) of `model`. cfg_grad "both": both branches keep the graph
    (the exact derivative g dv_c + (1 - g) dv_u); "cond": the unconditional branch without gradient
    (g dv_c only). checkpoint: each branch's DiT call is recomputed in the backward, one at a time,
    so guidance with gradient costs the memory of one call's activations, not two. guidance: a number,
    or a function of the integer timestep (two experts: the scale of the one that runs at t). cond: the
    batch's image conditioning (ImageConditioning.batch; both branches see the image)."""
    if callable(guidance):
        guidance = guidance(int(t.reshape(-1)[0]))
    xi, ti, kw = dit_inputs(model, x, t, cond)

    def call(ctx):
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(model, xi, ti, ctx, use_reentrant=False, **kw)
        return model(xi, ti, ctx, **kw)

    v = call(context)
    if neg_context is None or guidance == 1.0:
        return v
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg_grad == "both"):
        v_uncond = call(neg_context)
    return sample.guided_velocity(v, v_uncond, guidance)


def unwrap(model):
    """The module under the training wrappers: DDP's module, the raw pair under an ExpertCall."""
    if isinstance(model, ExpertCall):
        return model.pair
    return model.module if isinstance(model, DDP) else model


class ExpertCall(torch.nn.Module):
    """Two experts as one velocity model while they train: a call at t goes to the high-noise or the
    low-noise module by the pair's rule (model_dit.TwoExpertDiT.is_high), each module the expert as
    its run wraps it (DDP, FSDP2, or the bare expert). The dispatch is a pure function of t, so the
    recompute of a checkpointed step runs the expert that ran it. `ran` collects the experts called
    with gradient enabled since it was last cleared: the ones whose optimiser may step."""

    def __init__(self, high, low, pair):
        super().__init__()
        self.high, self.low = high, low
        object.__setattr__(self, "pair", pair)  # not a child: its parameters are the wrapped ones
        self.ran = set()
        self.finite = True  # every loss of the update so far was finite (experts_step)

    @property
    def cfg(self):
        return self.pair.cfg

    def forward(self, x, t, context, **kwargs):
        name = "high" if self.pair.is_high(t) else "low"
        if torch.is_grad_enabled():
            self.ran.add(name)
        return getattr(self, name)(x, t, context, **kwargs)


def initial_model(model, ref):
    """A context giving the initial model: `ref` (the frozen copy) or, under LoRA, `model` with its adapters off."""
    return nullcontext(ref) if ref is not None else lora.lora_disabled(unwrap(model))


def reference_velocity(model, ref, x, t, context, neg_context, guidance, cond=None):
    """v_ref of the initial model at x (no gradient: the reference is a fixed target)."""
    with torch.no_grad(), initial_model(model, ref) as m:
        return velocity(m, x.detach(), t, context, neg_context, guidance, cond=cond)


def wrap(dit, device, world, *, full_finetune: bool, lora_rank: int, lora_alpha: float, lora_targets: str, seed: int):
    """(trainable model, frozen reference or None). LoRA: DDP, reference = adapters off.
    Full fine-tuning: FSDP2 per block + root, reference = a frozen copy sharded the same way."""
    if full_finetune:
        ref = copy.deepcopy(dit).requires_grad_(False)
        dit.requires_grad_(True)
        if world > 1:
            from torch.distributed.fsdp import fully_shard
            for m in (dit, ref):
                for block in m.blocks:
                    fully_shard(block)
                fully_shard(m)
        return dit, ref
    # seeded by --seed alone: every rank starts from the same adapters, and --seed changes them
    lora.add_lora(dit, lora_rank, lora_alpha, lora_targets, generator=torch.Generator().manual_seed(seed))
    dit.to(device)
    if world > 1:
        return DDP(dit, device_ids=[device.index] if device.type == "cuda" else None), None
    return dit, None


EXPERT_SEED = {"high": 0, "low": 1}  # added to --seed for each expert's adapters: two independent initialisations


def wrap_experts(pair, trained: tuple, device, world, *, full_finetune: bool, **lora_kwargs):
    """(ExpertCall, reference pair or None, {name: wrapped expert}) for a model_dit.TwoExpertDiT whose
    experts `trained` learn: each wrapped on its own as `wrap` does one DiT (its own adapters, seeded
    per expert; DDP, or FSDP2 per block with its own frozen copy). An expert that does not train is
    frozen, and under full fine-tuning with torchrun sharded too; it is its own reference."""
    seed = lora_kwargs.pop("seed")
    wrapped, refs = {}, {}
    for name in ("high", "low"):
        expert = getattr(pair, name)
        if name in trained:
            wrapped[name], refs[name] = wrap(expert, device, world, full_finetune=full_finetune,
                                             seed=seed + EXPERT_SEED[name], **lora_kwargs)
            continue
        expert.requires_grad_(False).to(device)
        if full_finetune and world > 1:
            from torch.distributed.fsdp import fully_shard
            for block in expert.blocks:
                fully_shard(block)
            fully_shard(expert)
        refs[name] = expert
    call = ExpertCall(wrapped.get("high", pair.high), wrapped.get("low", pair.low), pair)
    ref = model_dit.TwoExpertDiT(refs["high"], refs["low"], pair.boundary, pair.guidance) if full_finetune else None
    return call, ref, wrapped


class IdleOffload:
    """--offload-idle under --experts low: the frozen high-noise expert moves to `idle` (the CPU) when
    the low-noise expert runs and back to `device` before it runs again, so it is away while the
    window's gradient steps and their backward run (the high-noise steps come first in every rollout:
    one transfer each way per rollout). Forward pre-hooks on both experts, so every caller (the
    trainer's rollouts, the evaluation, the adapters-off reference) moves it. `loaded`: where it is."""

    def __init__(self, high, low, device, idle="cpu"):
        self.high, self.device, self.idle, self.loaded = high, torch.device(device), torch.device(idle), True
        self.hooks = [high.register_forward_pre_hook(lambda *_: self.load()),
                      low.register_forward_pre_hook(lambda *_: self.unload())]

    def load(self):
        if not self.loaded:
            self.high.to(self.device)
            self.loaded = True

    def unload(self):
        if self.loaded:
            self.high.to(self.idle)
            self.loaded = False


def trained_experts(choice: str) -> tuple:
    """--experts -> the names of the experts that train."""
    return ("high", "low") if choice == "both" else (choice,)


# ----------------------------------------------------------------------------- online alignment

def buffer_policy(lrm) -> str:
    """The replay buffer's policy for this LRM: an ensemble ranks entries by its variance, a
    one-member LRM (variance always 0) gets a FIFO buffer (replay.py)."""
    return "fifo" if lrm is not None and lrm.n_members == 1 else "variance"


def offer_to_buffer(buffer, z0, members, context, lengths, prompts, vae, reward_fn, step, rank, world, bad, log,
                    group=None, extra=None) -> dict:
    """Algorithm 1's buffer update, every ReFL step: offer every z0 of the global batch with the
    LRM's ensemble variance on it (members (N, B)); label (decode without gradient + pixel reward)
    only the ones the buffer admits, each rank its own; insert them. The decision is taken on the
    all-gathered variances, so every rank admits and inserts the same entries in the same order.
    Non-finite pixel rewards never enter the buffer (bad["rewards_dropped"]). extra: fields stored with
    each z0 (an image-to-video run's conditioning, stored_conditioning). Returns the number
    labelled over all ranks and, when any were, their mean true reward and the LRM's mean absolute
    error on them. rank / world / group are the data-parallel ones."""
    variance = members.float().var(0, correction=0)  # (B,), 0 for a one-member LRM
    admitted = buffer.admit(distributed.all_gather_cat(variance, group).cpu())  # (world B,), identical on every rank
    b = z0.shape[0]
    mine = admitted[rank * b : (rank + 1) * b].to(z0.device)
    true = torch.full((b,), float("nan"), device=z0.device)
    if mine.any():
        chosen = [p for p, m in zip(prompts, mine.tolist()) if m]
        with torch.no_grad():
            true[mine] = reward_fn(vae.decode(z0[mine]), chosen).float().to(true.device)
        for p in [p for p, r in zip(chosen, true[mine].tolist()) if not math.isfinite(r)]:
            log(f"step {step}: the pixel reward returned a non-finite value for {p!r}; dropped")
    if admitted.any():  # the same on every rank, so the collectives stay matched
        keep = admitted.to(z0.device)
        entries = [distributed.all_gather_cat(x, group)[keep] for x in (z0, context, lengths, true, variance)]
        stored = {k: distributed.all_gather_cat(v, group)[keep] for k, v in (extra or {}).items()}
        bad["rewards_dropped"] += buffer.insert(*entries, extra=stored)
    finite = mine & torch.isfinite(true)
    err = (members.mean(0).float() - true).abs()
    stats = torch.stack([torch.where(finite, true, 0).sum(), torch.where(finite, err, 0).sum(), finite.sum().float()])
    if world > 1:
        dist.all_reduce(stats, group=group)
    rec = {"labelled": int(admitted.sum())}
    if stats[2] > 0:
        rec.update(true_reward=(stats[0] / stats[2]).item(), lrm_error=(stats[1] / stats[2]).item())
    return rec


def refresh_variance(lrm, buffer, batch_size, device, world, step, log):
    """Rescore every buffer entry's ensemble variance with the current LRM (no gradient) and store
    it; rank 0's values on every rank, so the buffers stay identical."""
    parts = []
    with torch.no_grad(), sample.autocast(device):
        for i in range(0, len(buffer), batch_size):
            rows = slice(i, i + batch_size)
            image = buffer.data["image_latent"][rows].to(device) if "image_latent" in buffer.data else None
            members = lrm(buffer.data["z"][rows].to(device), buffer.data["context"][rows].to(device),
                          buffer.data["lengths"][rows].to(device), **lrm_image(lrm, image))
            parts.append(members.float().var(0, correction=0))
    variance = torch.cat(parts)
    if world > 1:
        dist.broadcast(variance, 0)
    removed = buffer.set_variance(variance)
    if removed:
        log(f"step {step}: {removed} buffer entries got a non-finite variance from the LRM; removed")


def alignment_delta(c, lrm) -> float:
    """The alignment's Huber delta: --align-delta, else the one the LRM was pretrained with (its file's config)."""
    return c.align_delta if c.align_delta is not None else getattr(getattr(lrm, "cfg", None), "huber_delta", 1.0)


def align_lrm(lrm, lrm_opt, buffer, *, rounds: int, batch_size: int, sigma_grid, seed: int, step: int, device,
              world: int, bad, log, refresh: bool = False, delta: float = 1.0) -> dict:
    """Re-fit the LRM on the shared buffer (App. C.2): `rounds` passes, each ceil(entries /
    batch_size) Huber updates (delta: the pretraining's; a BCE-trained LRM: BCE on its binary
    labels); every member draws its own minibatch (variance-weighted, or uniform in a FIFO buffer); a noise-aware LRM gets them re-noised at levels of `sigma_grid` (0 with
    ALIGN_CLEAN_PROB), labels the clean rewards. Seeded the same on every rank: same batches, same
    update. An update with non-finite loss or gradients is not applied (bad["lrm_skipped"])."""
    if refresh and len(buffer) and buffer.policy == "variance":  # a FIFO buffer orders by age alone: nothing to rescore
        refresh_variance(lrm, buffer, batch_size, device, world, step, log)
    if not len(buffer):
        return {}
    g = torch.Generator().manual_seed(seed * 7919 + step)  # same on every rank: same batches, same update
    n, bs = lrm.n_members, batch_size
    updates = rounds * math.ceil(len(buffer) / bs)
    cfg = getattr(lrm, "cfg", None)
    objective = "bce" if getattr(cfg, "objective", "huber") == "bce" else "huber"  # a pairwise LRM: Huber
    threshold = getattr(cfg, "label_threshold", None)
    amp = sample.dtypes(device)["amp"]
    lrm.requires_grad_(True)
    for _ in range(updates):
        b = {k: v.unflatten(0, (n, bs)).to(device) for k, v in buffer.sample(n * bs, generator=g).items()}  # (N, B, ...)
        sigma = None
        if getattr(lrm, "noise_aware", False):  # the buffer holds clean z0: re-noise as pretraining does
            sigma = lrm_lib.draw_sigmas((n, bs), sigma_grid, ALIGN_CLEAN_PROB, g)
            b["z"] = lrm_lib.noise_latents(b["z"], sigma.to(device), torch.randn(b["z"].shape, generator=g).to(device))
            sigma = sigma.to(device)
        res = lrm_lib.lrm_update(lrm, lrm_opt, b["z"], b["context"], b["lengths"], b["reward"], delta=delta, generator=g,
                                 amp_dtype=amp, sigma=sigma, objective=objective, label_threshold=threshold,
                                 **lrm_image(lrm, b.get("image_latent")))
        if res["skipped"]:
            bad["lrm_skipped"] += 1
            log(f"step {step}: LRM update skipped (non-finite loss or gradients)")
    lrm.requires_grad_(False)
    if world > 1:
        for p in lrm.parameters():  # float nondeterminism must not let the ranks' LRMs drift apart
            dist.broadcast(p.data, 0)
    return {"lrm_updates": updates}


# ----------------------------------------------------------------------------- evaluation

def eval_pairs(n: int, prompts: list[str]) -> list[tuple[str, int, int]]:
    """n fixed (prompt, seed, entry) triples: entry i mod len(prompts) (its prompt and, in an
    image-to-video run, its image), seed 10_000 + i."""
    return [(prompts[i % len(prompts)], 10_000 + i, i % len(prompts)) for i in range(n)]


def sample_pairs(model, vae, pairs, table, neg_context, *, shape, sigmas, solver, guidance, device, latents=False,
                 cond=None):
    """Decoded videos (B, 3, T, H, W) of full no-grad rollouts of `model` on eval_pairs' (prompt, seed,
    ...) pairs, under their image conditioning `cond` (ImageConditioning.batch; None: text-to-video);
    latents=True returns (final latents, videos)."""
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(p[1])) for p in pairs]).to(device)
    context, _ = text_batch(table, [p[0] for p in pairs], device)
    neg = None if neg_context is None else neg_context[:1].expand(len(pairs), -1, -1)

    def branch(ctx):
        return lambda x, t: velocity(model, x, t, ctx, None, 1.0, cond=cond)

    with torch.no_grad(), sample.autocast(device):
        z, _ = sample.denoise(branch(context), noise, sigmas, solver=solver,
                              uncond_fn=None if neg is None else branch(neg), guidance=guidance)
        z = final_latent(z, cond)
        video = vae.decode(z)
    return (z, video) if latents else video


def evaluate(rollout, reward_fn, pairs, table, batch_size, device, rank, world, out_dir, step, bad=None, lrm=None,
             group=None, conditioning=None) -> dict:
    """Mean pixel reward of full rollouts (rollout(pairs, latents=True) -> (z, videos)) on the fixed
    pairs, sharded over ranks (under FSDP every rank runs the same number of batches); non-finite
    rewards are left out and counted in bad["eval_dropped"]. Saves the first two videos of rank 0.
    Returns {"true_reward"} and, with an `lrm`, the LRM (member mean) on the same final latents:
    "lrm_err" = mean |LRM - true|, "latent_minus_true" = mean (LRM - true). conditioning: prompt entries ->
    their image conditioning (Run.conditioning), for an LRM that reads the image."""
    per_rank = math.ceil(len(pairs) / world)
    mine = [rank + world * j for j in range(per_rank)]  # indices >= len(pairs) are padding, weight 0
    total = torch.zeros(5, device=device)  # reward sum, finite count, non-finite count, |LRM - true| sum, (LRM - true) sum
    for i in range(0, per_rank, batch_size):
        chunk = mine[i : i + batch_size]
        ps = [pairs[j % len(pairs)][0] for j in chunk]
        z, video = rollout([pairs[j % len(pairs)] for j in chunk], latents=True)
        with torch.no_grad():
            r = reward_fn(video, ps).float()
        weight = torch.tensor([float(j < len(pairs)) for j in chunk], device=device)
        finite = torch.isfinite(r)
        gap = torch.zeros_like(r)
        if lrm is not None:
            context, lengths = text_batch(table, ps, device)
            cond = conditioning([pairs[j % len(pairs)][2] for j in chunk]) if conditioning else None
            with torch.no_grad(), sample.autocast(device):
                gap = lrm(z, context, lengths, **lrm_image(lrm, cond and cond["image_latent"])).float().mean(0) - r
        ok = weight * finite
        total += torch.stack([torch.where(finite, r * weight, 0).sum(), ok.sum(), (weight * ~finite).sum(),
                              torch.where(finite, gap.abs() * ok, 0).sum(), torch.where(finite, gap * ok, 0).sum()])
        if rank == 0 and i == 0 and distributed.global_rank() == 0:
            picture_lib.save_videos(video[:2], Path(out_dir) / "samples", step)
    if world > 1:
        dist.all_reduce(total, group=group)
    if bad is not None:
        bad["eval_dropped"] += int(total[2].item())
    if total[1] == 0:
        return {"true_reward": float("nan")}
    res = {"true_reward": (total[0] / total[1]).item()}
    if lrm is not None:
        res.update(lrm_err=(total[3] / total[1]).item(), latent_minus_true=(total[4] / total[1]).item())
    return res


# ----------------------------------------------------------------------------- the run

def new_bad_counts() -> dict:
    """What non-finite values cost the run: rewards left out (training / evaluation), steps not
    applied, and steps that left out a reward (each counts against --max-bad-steps)."""
    return {"rewards_dropped": 0, "eval_dropped": 0, "refl_skipped": 0, "lrm_skipped": 0,
            "reward_steps": 0}  # steps that dropped at least one training reward


def gradients_finite(model, loss, world: int) -> bool:
    """True when the loss and every trainable gradient are finite on every rank (one all-reduce, so
    the ranks skip a step together)."""
    ok = bool(torch.isfinite(loss.detach()).all())
    for p in model.parameters():
        if ok and p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: this rank's shard
            ok = bool(torch.isfinite(g).all())
    if world > 1:
        flag = torch.tensor(float(ok), device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def gradient_sync(model, on: bool):
    """A context for one backward: DDP all-reduces (FSDP2 reduce-scatters) the gradients only when
    `on`; the earlier micro-batches of an accumulated update keep theirs local."""
    if isinstance(model, DDP):
        return nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(on)
    return nullcontext()


def optimizer_step(model, opt, loss, world, bad, step, log, scale: float = 1.0, clip: float = 0.0, micro: int = 0,
                   micros: int = 1):
    """Backward (loss x scale), then apply the update only when loss and gradients are finite on
    every rank; otherwise nothing of this step is applied (bad["refl_skipped"]). clip > 0: the
    gradients' global norm is clipped to it first (on the all-reduced gradients: the same on every rank).
    Gradient accumulation: the `micros` losses of one update call this in turn, micro = 0..micros-1.
    The first clears the gradients, each backward takes loss x scale / micros (so the update sees their
    mean), the ranks' gradients meet only in the last backward, and the last applies the update; a
    non-finite loss in any micro-batch skips the whole update."""
    if micro == 0:
        opt.zero_grad(set_to_none=True)
        opt.micro_losses_finite = True
    opt.micro_losses_finite &= bool(torch.isfinite(loss.detach()).all())
    last = micro == micros - 1
    with gradient_sync(model, last):
        (loss * (scale / micros)).backward()
    if not last:
        return
    ok = torch.tensor(1.0 if opt.micro_losses_finite else float("nan"))  # every micro-batch's loss, in one value
    if gradients_finite(model, loss.detach() * ok.to(loss.device), world):
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        bad["refl_skipped"] += 1
        log(f"step {step}: non-finite ReFL loss or gradients; the step is skipped")


def experts_step(call: ExpertCall, experts: dict, opts: dict, loss, world, bad, step, log, scale: float = 1.0,
                 clip: float = 0.0, micro: int = 0, micros: int = 1) -> dict:
    """optimizer_step for two experts, each with its own optimiser (`experts` / `opts`: the trained
    ones by name). Every backward synchronises the gradients of the experts it reached (their DDP /
    FSDP2 wrappers, each on its own): which expert a micro-batch's window reaches differs between
    micro-batches, so no backward may leave them local. The last micro-batch steps the optimiser of
    each expert that ran with gradient in any micro-batch of the update (call.ran, the same on every
    rank: the window is shared) and no other: Adam moves weights on a zero gradient (momentum,
    weight decay, its step count). clip: the global norm over the experts that ran. Returns
    {"trained_<name>": 0/1, "grad_norm_<name>": its gradients' norm before clipping} per expert."""
    if micro == 0:
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        call.finite = True
    call.finite &= bool(torch.isfinite(loss.detach()).all())
    if loss.requires_grad:  # a window that reached no trained expert leaves the loss without a graph
        (loss * (scale / micros)).backward()
    if micro != micros - 1:
        return {}
    ran = [name for name in experts if name in call.ran]
    call.ran.clear()
    rec = {f"trained_{name}": float(name in ran) for name in experts}
    ok = torch.tensor(1.0 if call.finite else float("nan"))
    params = {name: [p for p in experts[name].parameters() if p.grad is not None] for name in ran}
    if not gradients_finite(call, loss.detach() * ok.to(loss.device), world):
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        bad["refl_skipped"] += 1
        log(f"step {step}: non-finite ReFL loss or gradients; the step is skipped")
        return rec
    for name in ran:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params[name]])
        rec[f"grad_norm_{name}"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    if clip > 0 and ran:
        torch.nn.utils.clip_grad_norm_([p for name in ran for p in params[name]], clip)
    for name in ran:
        opts[name].step()
    return rec


def mean_records(parts: list[dict], sums=("labelled", "pairs", "pair_offers")) -> dict:
    """One record of an update's micro-batches: each value's mean over the micro-batches that have
    it; the counts in `sums` add up."""
    out = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        values = [p[k] for p in parts if k in p]
        out[k] = sum(values) if k in sums else sum(values) / len(values)
    return out


def read_checkpoint(path) -> dict:
    """A train_refl / train_lpo ckpt.pt -> its state, or an error that names the file and the problem."""
    return runs.read_checkpoint(path, ("step", "model", "optimizer", "buffer", "rng", "history"), "ReFL")


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rank_difference(models: list, lrm, buffer) -> float:
    """Largest difference of the full trainable weights (of each of `models`), the LRM and the replay
    buffer between the ranks (0.0: in sync). A collective: every rank calls it."""
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)  # gathered on every rank
    tensors = [t for m in models for t in get_model_state_dict(m, options=options).values()]
    tensors += list(lrm.parameters()) if lrm is not None else []
    tensors += list(buffer.data.values()) + [buffer.arrival] if buffer.data is not None else []
    return distributed.max_rank_difference(tensors)


def format_line(r: dict) -> str:
    """One step's log line. labelled: samples decoded and scored for the buffer this step; r_true and
    lrm_err: their mean pixel reward and the LRM's mean absolute error on them ("-" when none)."""
    true = f"{r['true_reward']:.4f}" if "true_reward" in r else "  -   "
    err = f"{r['lrm_error']:.4f}" if "lrm_error" in r else "  -   "
    pairs = f"pairs {r['pairs']}/{r['pair_offers']} (range {r['score_range']:.3g}) | " if "pairs" in r else ""
    evaluation = f" | eval true reward {r['eval_true_reward']:.4f}" if "eval_true_reward" in r else ""
    trained = [e for e in ("high", "low") if r.get(f"trained_{e}")]
    experts = f"experts {'+'.join(trained) or 'none'} | " if any(f"trained_{e}" in r for e in ("high", "low")) else ""
    return (f"step {r['step']:5d} | loss {r['loss']:+.4f} | r_lrm {r['reward']:.4f} ± {r['reward_std']:.4f} | "
            f"kl {r['kl']:.2e} | {experts}{pairs}labelled {r.get('labelled', 0):3d} | r_true {true} | lrm_err {err} | "
            f"lr {r['lr']:.1e} | {r['sec']:.2f} s | mem {r['peak_mem_mb']:.0f} MB{evaluation}")


class Run:
    """One ReFL run of config `c`: ranks, models, optimisers, LRM, buffer, prompt table, and the run
    folder's files. `settings` are the config fields that define the run (a checkpoint resumes only
    under the same ones); `noise_aware_flag` names the flag that needs a noise-aware LRM, if any."""

    def __init__(self, c, settings: tuple, noise_aware_flag=None, before_load=None, expert_plan=None, images_ok=False):
        self.c, self.settings = c, settings
        self.rank, self.world, self.device = distributed.setup_distributed()
        torch.manual_seed(c.seed + self.rank)
        random.seed(c.seed + self.rank)
        # Data parallelism over world / sp_size groups of ranks; the sp_size ranks of one group hold
        # the same samples, their tokens split (Ulysses): data_rank / data_world / dp_group are the data's.
        self.sp_group = self.dp_group = None
        self.data_rank, self.data_world = self.rank, self.world
        if c.sp_size > 1:  # sequence_parallel_groups refuses a size that does not divide the world
            self.sp_group, self.dp_group = distributed.sequence_parallel_groups(c.sp_size)
            self.data_rank, self.data_world = self.rank // c.sp_size, self.world // c.sp_size
        self.out = Path(c.out)
        runs.check_out_dir(self.out, c.resume, c.overwrite)
        self.resume_state, self.changed = None, {}
        allowed = runs.allowed_changes(c.allow_changed, settings)
        if c.resume:
            self.resume_state = read_checkpoint(c.resume)
            self.changed = runs.check_resume(self.resume_state.get("run") or {}, self.run_settings(), c.resume, allowed)
            at = self.resume_state["step"]
            if at > c.steps:
                raise ValueError(f"{c.resume} is at step {at}, past --steps {c.steps}; give --steps >= {at}")
            if at == c.steps and (self.out / "summary.json").is_file():  # without it: finish the run's evaluation
                raise ValueError(f"the run in {self.out} already finished at step {at} (summary.json); "
                                 f"give --steps > {at} to train on")
        self.reward_fn = rewards.load_reward(c.reward)
        self.extra = before_load() if before_load else None  # inputs the script checks before any model loads
        dit, self.vae, encoder, tokenizer, self.lrm, self.prompts, image = load_models(
            c, self.device, self.rank, noise_aware_flag, expert_plan is not None, images_ok)
        self.shape = vae_lib.latent_shape(c.frames, c.height, c.width, self.vae.cfg)  # Wan 2.2's VAE: 48 ch, /16
        # image-to-video: each image's conditioning, computed when first drawn (None: text-to-video)
        self.cond = None if image is None else ImageConditioning(
            image["kind"], image["paths"], self.vae, image["clip"], c.frames, c.height, c.width, self.device,
            sample.dtypes(self.device)["dit"], c.image_cache)
        del image
        model_dit.check_sequence_parallel(dit.cfg, c.sp_size, self.shape)
        self.sigmas = sample.get_sigmas(c.sample_steps, c.shift, c.solver)
        # the window's start range, and for two experts where the windows land (expert_plan(c, pair, sigmas, log)
        # -> (mid_min, mid_max, first low-noise step); it refuses an --experts choice no window reaches)
        self.mid, self.first_low = (c.mid_min, c.mid_max), None
        if isinstance(dit, model_dit.TwoExpertDiT):
            *self.mid, self.first_low = expert_plan(c, dit, self.sigmas, print if self.rank == 0 else lambda s: None)
        distributed.barrier()  # every rank has checked and loaded before rank 0 writes: a refused run leaves --out alone
        if self.rank == 0:
            if c.overwrite and not c.resume:
                runs.clear_run(self.out, RUN_FILES)
            self.out.mkdir(parents=True, exist_ok=True)
            runs.write_json(self.out / "args.json", {**c.record(), "world_size": self.world})
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        self.pairs = eval_pairs(c.eval_samples, self.prompts)
        self.table = embed_prompts(self.prompts + [sample.WAN_NEGATIVE_PROMPT, ""], tokenizer, encoder, self.device,
                                   dit.cfg.text_len)
        del encoder  # prompts are embedded once; the encoder is not needed again
        self.pair = dit if isinstance(dit, model_dit.TwoExpertDiT) else None
        # a number, or for two experts a function of t (sample.denoise, velocity)
        self.guidance = self.pair.guidance_at if self.pair is not None else c.guidance
        guided = expert_guidance(c) if self.pair is not None else (c.guidance,)
        self.neg = (text_batch(self.table, [sample.WAN_NEGATIVE_PROMPT] * c.batch_size, self.device)[0]
                    if any(g != 1.0 for g in guided) else None)
        dit = dit.to(self.device)
        dit.gradient_checkpointing = c.gradient_checkpointing
        kwargs = dict(full_finetune=c.full_finetune, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                      lora_targets=c.lora_targets, seed=c.seed)
        self.offload = None  # --offload-idle's IdleOffload (two experts only)
        if self.pair is not None:  # each trained expert: its own wrapper, optimiser and step count (Adam's per-weight)
            self.model, self.ref, self.experts = wrap_experts(dit, trained_experts(c.experts), self.device, self.world,
                                                              **kwargs)
            self.offload = IdleOffload(dit.high, dit.low, self.device) if c.offload_idle else None
        else:
            self.model, self.ref = wrap(dit, self.device, self.world, **kwargs)
            self.experts = None
        for m in (dit, self.ref):  # after wrap: the frozen copy of full fine-tuning is a deepcopy
            if m is not None and self.sp_group is not None:
                m.set_sequence_parallel(self.sp_group)
            if m is not None and c.compile:
                m.compile_blocks()

        def adamw(module):
            return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=c.lr,
                                     weight_decay=c.weight_decay)
        self.opt = adamw(self.model) if self.experts is None else None
        self.opts = {name: adamw(m) for name, m in self.experts.items()} if self.experts is not None else None
        self.lrm_opt = None
        if self.lrm is not None:
            self.lrm = self.lrm.to(self.device).requires_grad_(False)
            if c.gradient_checkpointing and getattr(self.lrm, "kind", None) == "dit":  # the DiT-backbone LRM's trunk too
                self.lrm.trunk.gradient_checkpointing = True
            if c.compile:
                self.lrm.compile()  # in place: its state_dict keys, saves and broadcasts stay the same
            self.lrm_opt = torch.optim.AdamW(self.lrm.parameters(), lr=c.align_lr, weight_decay=0.0)
        self.buffer = replay.ReplayBuffer(c.buffer_size, policy=buffer_policy(self.lrm))
        self.eval_lrm = self.lrm
        self.metrics = None

    def run_settings(self) -> dict:
        return {k: getattr(self.c, k) for k in self.settings}

    # -------------------------------------------------------------- evaluation and the loop's bookkeeping

    def rollout(self, model):
        c = self.c
        return lambda pairs, latents=False: sample_pairs(model, self.vae, pairs, self.table, self.neg, shape=self.shape,
                                                         sigmas=self.sigmas, solver=c.solver, guidance=self.guidance,
                                                         device=self.device, latents=latents,
                                                         cond=self.conditioning([p[2] for p in pairs]))

    def conditioning(self, entries) -> dict | None:
        """The image conditioning of prompt entries (None: text-to-video)."""
        return None if self.cond is None else self.cond.batch(entries, self.device)

    def evaluate(self, step: int) -> dict:
        """One evaluation: the true reward and, with an LRM, its error on the same final latents."""
        return {"step": step, **evaluate(self.rollout(self.model), self.reward_fn, self.pairs, self.table,
                                         self.c.batch_size, self.device, self.data_rank, self.data_world, self.out, step,
                                         self.bad, lrm=self.eval_lrm, group=self.dp_group,
                                         conditioning=self.conditioning)}

    def start(self) -> int:
        """Restore the checkpoint (--resume) or evaluate the initial model; open metrics.jsonl.
        Returns the last step done."""
        if self.resume_state is not None:
            start, self.history, self.bad = self.load_checkpoint(self.resume_state)
            self.log(f"resumed {self.c.resume} at step {start}")
        else:
            start, self.bad = 0, new_bad_counts()
            self.history = [self.evaluate(0)]
        self.before = self.history[0]["true_reward"]
        self.check_evaluation(0)
        self.seen_dropped = self.bad["rewards_dropped"]
        self.log(f"eval step 0 | true reward {self.before:.4f} ({len(self.pairs)} fixed prompt/seed pairs)")
        self.metrics = runs.open_metrics(self.out / "metrics.jsonl", start) if self.rank == 0 else None
        if self.metrics is not None:
            runs.record_changes(self.metrics, start, self.changed)
            for k, (old, new) in self.changed.items():
                self.log(f"--{k.replace('_', '-')} changed on resume: {old!r} -> {new!r}")
        self.t_run, self.first = time.time(), start
        return start

    def end_step(self, step: int, rec: dict, t0: float) -> bool:
        """After a step: stop on too many non-finite steps, evaluate, checkpoint, log. True when
        --stop-after says to exit here, as a crash would."""
        c, bad = self.c, self.bad
        if bad["rewards_dropped"] > self.seen_dropped:
            bad["reward_steps"] += 1
            self.seen_dropped = bad["rewards_dropped"]
        skipped = bad["refl_skipped"] + bad["lrm_skipped"] + bad["reward_steps"]
        if skipped > c.max_bad_steps:
            raise RuntimeError(f"step {step}: {bad['refl_skipped']} ReFL steps and {bad['lrm_skipped']} LRM updates were "
                               f"skipped for non-finite loss or gradients, and {bad['reward_steps']} steps dropped "
                               f"non-finite pixel rewards ({bad['rewards_dropped']} in all): more than --max-bad-steps "
                               f"{c.max_bad_steps}. Check the reward model and the learning rate; the last checkpoint "
                               f"holds the last good state")
        if c.eval_every and step % c.eval_every == 0 and step != c.steps:
            self.history.append(self.evaluate(step))
            self.check_evaluation(step)
            rec["eval_true_reward"] = self.history[-1]["true_reward"]
        if c.save_every and step % c.save_every == 0:
            self.save_checkpoint(step)
        rec.update(**bad, sec=time.time() - t0, peak_mem_mb=peak_memory_mb(self.device))
        self.log(format_line(rec))
        if self.metrics:
            self.metrics.write(runs.json_line(rec))
            self.metrics.flush()
        if step == c.stop_after:
            self.log(f"--stop-after {step}: exiting without the final evaluation, checkpoint and export")
            self.close()
            return True
        return False

    def finish(self, mode: str):
        """The final evaluation, checkpoint, picture, LoRA export and summary.json."""
        c, rank = self.c, self.rank
        seconds = time.time() - self.t_run
        self.history.append(self.evaluate(c.steps))
        after = self.history[-1]["true_reward"]
        self.save_checkpoint(c.steps)
        self.check_evaluation(c.steps)  # after the checkpoint: the trained weights are kept, no summary is written
        if c.picture_rows:
            self.log(f"before/after picture: {self.picture()}")
        if self.world > 1:  # every rank must end with the same weights, LRM and buffer (else N models were trained)
            diff = rank_difference(self.trained_modules(), self.lrm, self.buffer)
            if rank == 0:
                runs.write_json(self.out / "sync.json", {"world": self.world, "max_diff": diff}, indent=None)
            self.log(f"largest weight / LRM / buffer difference between ranks: {diff:.3g}")
        if rank == 0:
            if not c.full_finetune and self.pair is not None:  # the community's pair: one file per trained expert
                lora.save_expert_loras(self.pair, self.out)
            elif not c.full_finetune:
                lora.save_lora(unwrap(self.model), self.out / "lora.safetensors")
            summary = {"true_reward_before": self.before, "true_reward_after": after, "eval_history": self.history,
                       "steps": c.steps, "train_seconds": seconds, "sec_per_step": seconds / max(c.steps - self.first, 1),
                       "peak_mem_mb": peak_memory_mb(self.device), "world_size": self.world, "mode": mode,
                       "nonfinite": self.bad}
            if self.opts is not None:
                summary["expert_updates"] = self.expert_updates()
            runs.write_json(self.out / "summary.json", summary)
        self.log(f"true reward (eval, {len(self.pairs)} fixed prompt/seed pairs): before {self.before:.4f} -> after {after:.4f}")
        if self.opts is not None:
            self.log("optimiser steps per expert: " + ", ".join(f"{e} {n} of {c.steps}"
                                                                for e, n in self.expert_updates().items()))
        bad = self.bad
        if any(bad.values()):
            self.log(f"non-finite values: {bad['rewards_dropped']} training and {bad['eval_dropped']} evaluation rewards "
                     f"dropped, {bad['refl_skipped']} ReFL steps and {bad['lrm_skipped']} LRM updates skipped")
        self.close()

    def check_evaluation(self, step: int):
        """An evaluation with no finite reward ends the run: a NaN "before" or "after" compares nothing."""
        if not math.isfinite(self.history[-1]["true_reward"]):
            self.close()
            raise RuntimeError(f"step {step}: every pixel reward of the evaluation ({len(self.pairs)} fixed prompt/seed "
                               f"pairs) was NaN or inf, so there is no true reward to report; check --reward "
                               f"{self.c.reward} and the models")

    def close(self):
        """Close the metrics file and end the process group. The DDP wrapper goes first: its reducer
        holds the group, and a group freed at interpreter exit instead (gloo threads still joinable)
        aborts the process after a finished run."""
        if self.metrics:
            self.metrics.close()
        if isinstance(self.model, DDP):
            self.model = self.model.module
            gc.collect()
        distributed.cleanup()

    def picture(self):
        """samples/before_after.png: --picture-rows pairs spread over the evaluation pairs, sampled by
        the initial and the trained model. Every rank samples (FSDP needs them all); rank 0 writes."""
        c, pairs = self.c, self.pairs
        n = min(c.picture_rows, len(pairs))
        chosen = [pairs[i * len(pairs) // n] for i in range(n)]

        def videos(m):
            return torch.cat([self.rollout(m)(chosen[i : i + c.batch_size]) for i in range(0, n, c.batch_size)])

        after = videos(self.model)
        with initial_model(self.model, self.ref) as initial:
            before = videos(initial)
        if self.rank == 0:
            path = self.out / "samples" / "before_after.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            images = None if self.cond is None else torch.stack([self.cond.image(int(self.cond.entry_image[p[2]]))
                                                                  for p in chosen])
            picture_lib.imageio.imwrite(path, picture_lib.before_after_image(before, after, [p[0] for p in chosen],
                                                                             images=images))
            return path

    # -------------------------------------------------------------- checkpoints

    def expert_updates(self) -> dict:
        """{expert: optimiser steps taken}, read from Adam's step count (the same for all its weights)."""
        return {name: int(next(iter(opt.state.values()))["step"]) if opt.state else 0 for name, opt in self.opts.items()}

    def trained_modules(self) -> list:
        """The wrapped modules that train: the model, or each trained expert."""
        return [self.model] if self.experts is None else list(self.experts.values())

    def save_checkpoint(self, step: int):
        """Trainable weights, optimiser, step, RNG, LRM + optimiser, buffer, evaluation history, the
        run's settings; rank 0 writes atomically. get_state_dict gathers full state dicts under FSDP2
        (a collective: every rank calls it). Two experts: "model" and "optimizer" hold one state per
        trained expert, {"high": ..., "low": ...}."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        if self.experts is None:
            model_state, opt_state = get_state_dict(self.model, self.opt, options=options)
            weights = model_state
        else:
            # an optimiser that never stepped is saved as None: get_state_dict would first initialise its
            # state by a zero-gradient step (torch.distributed.checkpoint), a step count the expert never took
            model_state, opt_state = {}, {}
            for name, m in self.experts.items():
                model_state[name] = get_model_state_dict(m, options=options)
                opt_state[name] = get_state_dict(m, self.opts[name], options=options)[1] if self.opts[name].state else None
            weights = {f"{name}.{k}": v for name, sd in model_state.items() for k, v in sd.items()}
        if self.rank == 0:
            rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            lrm, lrm_opt = self.lrm, self.lrm_opt
            state = {"step": step, "model": model_state, "optimizer": opt_state, "lrm": lrm.state_dict() if lrm else None,
                     "lrm_optimizer": lrm_opt.state_dict() if lrm_opt else None, "buffer": self.buffer.state_dict(),
                     "rng": rng, "history": self.history, "nonfinite": dict(self.bad), "run": self.run_settings()}
            runs.write_checkpoint(self.out / "ckpt.pt", state, {**weights, **(state["lrm"] or {})}, step)
        distributed.barrier()

    def load_checkpoint(self, state) -> tuple[int, list, dict]:
        """Restore what save_checkpoint saved -> (step, evaluation history, non-finite counters)."""
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        if self.experts is None:
            set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=options)
        for name, m in (self.experts or {}).items():
            if state["optimizer"][name] is None:  # never stepped: the fresh optimiser is its state
                set_model_state_dict(m, state["model"][name], options=options)
            else:
                set_state_dict(m, self.opts[name], model_state_dict=state["model"][name],
                               optim_state_dict=state["optimizer"][name], options=options)
        if self.lrm is not None:
            self.lrm.load_state_dict(state["lrm"])
            self.lrm_opt.load_state_dict(state["lrm_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"], state["history"], {**new_bad_counts(), **state.get("nonfinite", {})}
