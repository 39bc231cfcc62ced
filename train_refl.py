"""VELR: truncated mid-step reward feedback learning (ReFL) of Wan 2.1 through an ensemble latent
reward model, with a KL anchor, LoRA or full fine-tuning, and online LRM alignment.

Follows "VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models" (§4.3,
Algorithm 1, App. C.2; the baselines of §5). Each step, on every rank
with its own prompts and noise:
  1. roll out the sampler WITHOUT gradients from noise to a mid step drawn uniformly from
     [--mid-min, --mid-max] (paper: 15..25 of 50);
  2. keep the graph for --window K steps (paper: 10), and predict z0 = z_t - sigma_t v from the
     velocity of the last of those K steps, t_end = step mid + K - 1 (sample.denoise, stop = mid + K);
  3. reward = the ensemble LRM on z0, aggregated over members by --agg mean|min|max|lcb
     (options: --reward-on zt scores the window's last latent x_t at its own sigma with a
     noise-aware LRM, PRFL's process reward; --noise-ensemble scores z0 by DiNa-LRM's noise
     ensembling; for a Thurstone-trained LRM lcb = mean - k sqrt(Var_members + v(sigma)); --lrm may
     be a DiT-backbone LRM, train_lrm.py --model dit, noise-aware by construction);
  4. loss = -reward + beta KL, KL = mean((v_theta - v_ref)^2) at t_end, v_ref = the initial model:
     the same DiT with LoRA disabled, or a frozen copy under full fine-tuning (beta = 0: no KL).
The gradient never passes the VAE decoder or the pixel reward model. Online LRM alignment
(Algorithm 1, App. C.2; on while --align-every > 0, not in --mode pixel): every step offers each
scored z0 of the global batch, with the LRM's ensemble variance on it, to the shared replay buffer
(replay.py); the ones it admits (higher variance than its lowest entry, or any while it is not
full) are decoded WITHOUT gradient, scored by the pixel reward (--reward) and stored. Every
--align-every steps the LRM is re-fitted: --align-rounds passes over the buffer, each
ceil(entries / --batch-size) Huber updates (lrm.lrm_update) in which every member draws its own
variance-weighted minibatch; --refresh-variance first rescores the buffer's variances with the
current LRM. A one-member LRM (variance always 0) gets a FIFO buffer sampled uniformly.
Baselines on identical settings (--mode): pixel ReFL
(decode z0 with checkpointing + differentiable pixel reward through the same window), lastk
(VADER-style: gradients through the last K steps), latestep (ImageReward-style: one gradient
step at a random step of the last K), dollar (the Dollar LRM in place of the ensemble). Beside
them, lpo: LPO's step-level preference optimisation (arXiv 2502.01051; `lpo_loss`): at each of the
K window steps, k candidates of the policy's stochastic transition scored by a noise-aware LRM at
their own sigma, DPO on the best / worst pair against the reference.

With no checkpoints it trains in the offline toy world (toy.py: a tiny Wan DiT pretrained by flow
matching on procedural videos, the toy pixel reward, a bootstrapped LRM) with the toy defaults
(TOY_DEFAULTS: a small model needs a larger learning rate and a weaker KL) and prints the evaluation true reward before and after training:

    python train_refl.py                                       # offline toy world, CPU, ~3 min
    torchrun --standalone --nproc_per_node=1 train_refl.py     # the same under torchrun
    torchrun --nproc_per_node=8 train_refl.py --ckpt-dir Wan2.1-T2V-1.3B --lrm runs/lrm/lrm.safetensors \\
        --reward my_rewards:video_reward --prompts prompts.txt --size 832x480 --frames 81 \\
        --gradient-checkpointing --out runs/refl

Distributed: LoRA runs under DDP (the base weights frozen, the fp32 LoRA weights replicated);
--full-finetune shards the DiT with FSDP2 (fully_shard per block, then the root) and keeps a
frozen sharded copy as the KL reference. gloo on CPU, nccl on GPU (distributed.py); precision is
sample.dtypes' policy (bf16 autocast on GPU, fp32 on CPU). The
replay buffer is shared by all ranks and the LRM stays identical on every rank (see replay.py).
Rank 0 prints one line per step and appends it to <out>/metrics.jsonl; <out>/args.json,
<out>/summary.json (true_reward_before / _after), <out>/samples/*.mp4 from the evaluations on
fixed prompts and seeds, <out>/ckpt.pt (atomic; --resume restores weights, optimisers, RNG, LRM,
replay buffer and evaluation history: on CPU it continues bit for bit), <out>/lora.safetensors
in the community Wan LoRA format (`python sample.py --lora`, diffusers' Wan LoRA loader), and
under torchrun <out>/sync.json: the largest difference of weights, LRM and buffer between ranks.

Left out: gradient accumulation, learning-rate schedules, EMA, prompt-embedding caching on disk
(prompts are embedded once at start-up and the text encoder is dropped).
"""

import argparse
import copy
import json
import math
import os
import random
import resource
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import imageio
import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed
import lora
import lrm as lrm_lib
import replay
import rewards
import sample
import text_encoder
import toy
import train_lrm
from model_dit import load_dit
import vae as vae_lib
from vae import load_vae

MODES = ("velr", "pixel", "lastk", "latestep", "dollar", "lpo")
# --mode lpo's softmax temperature in the toy world: its LRM regresses a 0-1 reward (not LPO's
# logit-scale scores), and the 4 candidates of one x_t differ there by 0.018 (median of max - min
# over 120 draws, 0.010 / 0.030 at the 10th / 90th percentile); at 0.01 about a third of the pairs
# pass the 0.35-0.5 gap (measured: 32%), at LPO's 1 none would.
LPO_TOY_TEMP = 0.01
LPO_WARN_STEPS = 10  # --mode lpo warns when no pair was kept in a run's first this many steps
# Flags left at None take these: the VELR paper's for real checkpoints (§4.3, App. C.2, C.3), the
# toy world's for the offline default. The toy sampler is the one the toy generator was pretrained
# and its LRM bootstrapped with (toy.ToyConfig), so ReFL cannot drift from it.
REAL_DEFAULTS = dict(sample_steps=50, shift=5.0, solver="unipc", mid_min=15, mid_max=25, window=10, beta=10.0,
                     lr=1e-5, align_every=10, align_rounds=2, align_lr=1e-5, steps=1000, eval_every=100,
                     eval_samples=8, guidance=5.0, size="832x480", frames=81, reward=None, lora_rank=256, lora_alpha=256.0,
                     picture_rows=2, lpo_temp=1.0)
# Toy window 5: the five DiT calls with gradient the toy default made while --window 4 still meant
# K + 1 calls. Toy lr: 5e-4 rather than 1e-3 (with the earlier alignment, seeds 0-3, 300 steps: lr
# 1e-3 +0.044/+0.051/+0.022/+0.039, 5e-4 +0.061/+0.046/+0.029/+0.048, 2.5e-4 +0.042/+0.048/+0.032/+0.032).
# Toy steps 100 and alignment every 10 steps (the real default's interval): under Algorithm 1's
# alignment the eval true reward of seed 0 peaks near step 100 and then falls whatever the
# alignment settings (eval at steps 100 / 200 / 300 from 0.744, 2-core CPU, one run each):
# every 25 steps at lr 1e-4 0.769 / 0.768 / 0.750; lr 1e-5 0.778 / 0.776 / 0.664; every 100 steps
# 0.796 / 0.764 / 0.760; every 10 steps 0.795 / 0.742 / 0.763. README "Over-optimisation".
# The toy world without --toy-world: $VELR_TOY_WORLD, else this one (the README's main command).
# The tests and bench.py set the variable (to "random" unless told otherwise), so their worlds,
# subprocesses included, stay the ones their numbers were measured in.
DEFAULT_TOY_WORLD = "watchable"
TOY_DEFAULTS = dict(sample_steps=toy.ToyConfig.sample_steps, shift=toy.ToyConfig.shift, solver="euler",
                    mid_min=6, mid_max=10, window=5, beta=0.1, lr=5e-4, align_every=10, align_rounds=2, align_lr=1e-4,
                    steps=100, eval_every=50, eval_samples=48, guidance=1.0,
                    size=f"{toy.ToyConfig.size}x{toy.ToyConfig.size}", frames=toy.ToyConfig.frames,
                    reward="toy:calibrated_color", lora_rank=16, lora_alpha=16.0, picture_rows=6,
                    lpo_temp=LPO_TOY_TEMP)


# ----------------------------------------------------------------------------- arguments

def _default(key: str, text: str) -> str:
    """Help text with both defaults: the real-checkpoint one and the toy world's."""
    real, toy_value = REAL_DEFAULTS[key], TOY_DEFAULTS[key]
    if real == toy_value:
        return f"{text} (default {real})"
    return f"{text} (default {real}; toy world {toy_value})" if real is not None else f"{text} (toy world default {toy_value})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    m = p.add_argument_group("models and data (none given: the offline toy world)")
    m.add_argument("--ckpt-dir", help="Wan2.1-T2V repo folder (original or Diffusers layout)")
    m.add_argument("--dit", help="DiT file or folder (overrides --ckpt-dir)")
    m.add_argument("--vae", help="VAE file or folder (overrides --ckpt-dir)")
    m.add_argument("--text-encoder", help="UMT5 file or folder (overrides --ckpt-dir)")
    m.add_argument("--tokenizer", help="tokenizer folder or file (overrides --ckpt-dir)")
    m.add_argument("--lrm", help="a pretrained LRM (train_lrm.py); the toy world bootstraps its own")
    m.add_argument("--reward", help=_default("reward", "pixel reward: a rewards.py built-in or module:attr"))
    m.add_argument("--prompts", help="text file, one prompt per line (toy world: its own captions)")
    m.add_argument("--size", help=_default("size", "WxH, multiples of 16"))
    m.add_argument("--frames", type=int, help=_default("frames", "4k+1"))
    m.add_argument("--cache-dir", help="toy world cache (default <repo>/.cache/toy or $VELR_CACHE/toy)")
    m.add_argument("--toy-world", choices=sorted(toy.WORLDS),
                   help=f"which toy world (default $VELR_TOY_WORLD, else {DEFAULT_TOY_WORLD}; watchable: the trained tiny VAE and a DiT "
                        "whose samples show the square, reward toy:square_color; random: the random tiny VAE, "
                        "reward toy:calibrated_color, the tests' world; see toy.py)")
    r = p.add_argument_group("ReFL")
    r.add_argument("--mode", default="velr", choices=MODES, help="velr, or a baseline (default velr)")
    r.add_argument("--sample-steps", type=int, help=_default("sample_steps", "sampler steps"))
    r.add_argument("--shift", type=float, help=_default("shift", "timestep shift"))
    r.add_argument("--solver", choices=("unipc", "euler"), help=_default("solver", "sampler"))
    r.add_argument("--guidance", type=float, help=_default("guidance", "CFG scale, 1 = none"))
    r.add_argument("--mid-min", type=int, help=_default("mid_min", "first step the window may start at"))
    r.add_argument("--mid-max", type=int, help=_default("mid_max", "last step the window may start at"))
    r.add_argument("--window", type=int, help=_default("window", "K, the steps with gradient"))
    r.add_argument("--beta", type=float, help=_default("beta", "KL weight, 0 = no KL"))
    r.add_argument("--agg", default="mean", choices=("mean", "min", "max", "lcb"), help="ensemble aggregation (default mean)")
    r.add_argument("--lcb-k", type=float, default=1.0,
                   help="lcb = mean - k sqrt(Var_members + v(sigma)); v only for a Thurstone-trained LRM, else "
                        "mean - k std over members (default 1.0)")
    r.add_argument("--reward-on", choices=("z0", "zt"),
                   help="z0: the LRM scores the z0 predicted from the window's last velocity (VELR); zt: a "
                        "noise-aware LRM scores the window's last latent x_t at its own sigma, no x0 prediction "
                        "(PRFL) (default z0; --preset prfl: zt)")
    r.add_argument("--reward-loss", choices=("neg", "prfl"),
                   help="neg: minimise -reward (VELR); prfl: 0.1 * relu(2 - sigmoid(reward)), PRFL's public code "
                        "(default neg; --preset prfl: prfl)")
    r.add_argument("--preset", choices=("prfl",),
                   help="prfl: PRFL's ReFL recipe (\"Video Generation Models Are Good Latent Reward Models\", arXiv "
                        "2511.21541): a no-grad rollout to a random step of the whole schedule, one DiT step with "
                        "gradient, the reward on that noisy latent, PRFL's reward loss; flags given explicitly win")
    r.add_argument("--sft-data", metavar="DIR",
                   help="real latents (a prepare_data.py dataset) for PRFL's supervised flow-matching regulariser")
    r.add_argument("--sft-weight", type=float, default=1.0,
                   help="weight of that loss beside the ReFL loss and the KL (default 1.0, ours: PRFL's is not stated)")
    r.add_argument("--noise-ensemble", action="store_true",
                   help="score z0 with DiNa-LRM's noise ensembling (lrm.noise_ensemble; a noise-aware LRM)")
    lp = p.add_argument_group("--mode lpo (LPO: step-level preference optimisation, arXiv 2502.01051)")
    lp.add_argument("--lpo-k", type=int, default=4, help="candidates x_{t-1} drawn from each x_t (default 4, LPO's)")
    lp.add_argument("--lpo-eta", type=float, default=1.0,
                    help="stochasticity of the DDIM-for-flow transition (sample.ddim_transition): 1 = the path's "
                         "exact posterior, 0 = deterministic (Euler) (default 1.0)")
    lp.add_argument("--dpo-beta", type=float, default=500.0, help="DPO's beta on the transition log-likelihoods (default 500, LPO's)")
    lp.add_argument("--lpo-threshold", type=float, nargs=2, default=[0.35, 0.5], metavar=("AT_0", "AT_1"),
                    help="a pair is kept when the softmax-normalised score gap of best and worst candidate exceeds "
                         "AT_0 + (AT_1 - AT_0) sigma_{t-1} (default 0.35 0.5, LPO's range; linear in sigma is ours)")
    lp.add_argument("--lpo-temp", type=float,
                    help=_default("lpo_temp", "temperature of that softmax over the candidates' LRM scores (LPO: "
                                  "none, i.e. 1, on logit-scale scores)"))
    r.add_argument("--lr", type=float, help=_default("lr", "learning rate"))
    r.add_argument("--batch-size", type=int, default=4, help="prompts per rank and step (default 4)")
    r.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each DiT block in backward (also a DiT-backbone LRM's trunk blocks)")
    t = p.add_argument_group("trainable weights")
    t.add_argument("--full-finetune", action="store_true", help="train every DiT weight (FSDP2 under torchrun)")
    t.add_argument("--lora-rank", type=int, help=_default("lora_rank", "LoRA rank (VELR App. C.3: 256)"))
    t.add_argument("--lora-alpha", type=float, help=_default("lora_alpha", "LoRA alpha; scale = alpha / rank"))
    t.add_argument("--lora-targets", default=",".join(lora.WAN_TARGETS),
                   help="comma-separated Linear names inside each block (default: all ten)")
    a = p.add_argument_group("online LRM alignment")
    a.add_argument("--align-every", type=int, help=_default("align_every", "ReFL steps between alignments, 0 = never"))
    a.add_argument("--align-rounds", type=int,
                   help=_default("align_rounds", "passes over the replay buffer per alignment, each "
                                 "ceil(entries / batch size) LRM updates (VELR App. C.2: two rounds)"))
    a.add_argument("--align-lr", type=float, help=_default("align_lr", "LRM learning rate"))
    a.add_argument("--buffer-size", type=int, default=256, help="replay buffer entries (default 256)")
    a.add_argument("--refresh-variance", action="store_true",
                   help="before each alignment, rescore every buffer entry's ensemble variance with the current LRM")
    o = p.add_argument_group("run")
    o.add_argument("--steps", type=int, help=_default("steps", "ReFL steps"))
    o.add_argument("--eval-every", type=int, help=_default("eval_every", "steps between evaluations, 0 = before and after only"))
    o.add_argument("--eval-samples", type=int, help=_default("eval_samples", "fixed prompt/seed pairs evaluated"))
    o.add_argument("--picture-rows", type=int, help=_default(
        "picture_rows", "fixed prompt/seed pairs in samples/before_after.png, sampled before (reference model) and "
        "after training at the end of the run; 0 = no picture"))
    o.add_argument("--save-every", type=int, default=100, help="steps between checkpoints, 0 = only at the end (default 100)")
    o.add_argument("--out", default="runs/refl", help="run folder (default runs/refl)")
    o.add_argument("--resume", metavar="PATH", help="ckpt.pt to continue from")
    o.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out, replacing it")
    o.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop with an error once more ReFL steps + LRM updates than this were skipped for non-finite "
                        "loss or gradients (default 10)")
    o.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks and the LRM (numerics unchanged)")
    o.add_argument("--sp-size", type=int, default=1,
                   help="Ulysses sequence parallelism: split each sample's tokens over this many ranks (default 1: "
                        "off); must divide the world size and the DiT's heads")
    o.add_argument("--seed", type=int, default=0, help="default 0")
    o.add_argument("--stop-after", type=int, metavar="STEP",
                   help="exit right after this step as a crash would (no final evaluation, checkpoint or export), "
                        "to test --resume")
    args = p.parse_args(argv)
    args.toy = not (args.ckpt_dir or args.dit)
    args.toy_world = args.toy_world or os.environ.get("VELR_TOY_WORLD") or DEFAULT_TOY_WORLD
    steps = args.sample_steps or (TOY_DEFAULTS if args.toy else REAL_DEFAULTS)["sample_steps"]
    preset = {"prfl": dict(reward_on="zt", reward_loss="prfl", window=1, mid_min=0, mid_max=steps - 2)}.get(args.preset, {})
    for k, v in {**preset, **{k: v for k, v in dict(reward_on="z0", reward_loss="neg").items() if k not in preset}}.items():
        if getattr(args, k) is None:  # explicit flags win over the preset, the preset over the defaults
            setattr(args, k, v)
    if args.mode == "lpo" and args.beta is None:
        args.beta = 0.0  # LPO has no KL term: DPO against the reference is its anchor (an explicit --beta adds one)
    if args.toy and args.reward is None:
        args.reward = toy.WORLDS[args.toy_world].reward
    for k, v in (TOY_DEFAULTS if args.toy else REAL_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lpo_threshold = [float(x) for x in args.lpo_threshold]
    validate(args)
    return args


def validate(args):
    positive = ("sample_steps", "window", "lr", "batch_size", "lora_rank", "steps", "eval_samples", "buffer_size",
                "align_rounds", "sp_size")
    for k in positive:
        if getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    for k in ("beta", "align_every", "align_lr", "eval_every", "save_every", "lcb_k", "max_bad_steps", "picture_rows"):
        if getattr(args, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if not 0 <= args.mid_min <= args.mid_max:
        raise ValueError(f"need 0 <= --mid-min <= --mid-max, got {args.mid_min}, {args.mid_max}")
    if args.mid_max + args.window >= args.sample_steps:
        raise ValueError(f"--mid-max + --window must stay below --sample-steps {args.sample_steps}, got {args.mid_max} + {args.window}")
    args.width, args.height = vae_lib.parse_size(args.size)
    vae_lib.check_size(args.frames, args.height, args.width)
    if args.frames < 5:
        raise ValueError(f"--frames {args.frames} is a still image, not a video: video ReFL needs at least 5 frames")
    if not (math.isfinite(args.sft_weight) and args.sft_weight >= 0):
        raise ValueError(f"--sft-weight must be a finite number >= 0, got {args.sft_weight}")
    for k in ("shift", "guidance", "beta", "lr", "lcb_k", "lora_alpha", "align_lr"):
        if not math.isfinite(getattr(args, k)):
            raise ValueError(f"--{k.replace('_', '-')} must be a finite number, got {getattr(args, k)}")
    if args.shift <= 0:
        raise ValueError(f"--shift must be > 0, got {args.shift}")
    if args.mode == "pixel" and (args.reward_on != "z0" or args.noise_ensemble):
        raise ValueError("--mode pixel decodes z0: --reward-on zt and --noise-ensemble need an LRM")
    if args.mode == "lpo":
        if args.noise_ensemble or args.reward_on == "zt" or args.reward_loss != "neg" or args.preset:
            raise ValueError("--mode lpo scores its candidates x_{t-1} at their own sigma with a noise-aware LRM and "
                             "trains by DPO: --reward-on, --noise-ensemble, --reward-loss and --preset do not apply")
        if args.lpo_k < 2:
            raise ValueError(f"--lpo-k must be >= 2 (a best and a worst candidate), got {args.lpo_k}")
        lo, hi = args.lpo_threshold
        positive = (args.lpo_eta, args.dpo_beta, args.lpo_temp)
        if not (0 <= lo < 1 and 0 <= hi < 1 and all(math.isfinite(x) and x > 0 for x in positive)):
            raise ValueError(f"--mode lpo needs thresholds in [0, 1), --lpo-eta, --dpo-beta and --lpo-temp > 0, got "
                             f"{args.lpo_threshold}, {args.lpo_eta}, {args.dpo_beta}, {args.lpo_temp}")
    if args.reward_on == "zt" and args.noise_ensemble:
        raise ValueError("--noise-ensemble re-noises a clean z0; it does not combine with --reward-on zt")
    if args.lrm and noise_aware_needed(args) and Path(args.lrm).is_file():
        check_noise_aware(lrm_lib.read_config(args.lrm)[2], args, args.lrm)
    if not args.toy and (args.lrm is None and args.mode != "pixel" or args.reward is None):
        raise ValueError(f"real checkpoints need --reward and (unless --mode pixel) --lrm, got reward={args.reward!r}, lrm={args.lrm!r}")


def noise_aware_needed(args) -> bool:
    return args.reward_on == "zt" or args.noise_ensemble or args.mode == "lpo"


def check_noise_aware(cfg, args, name):
    """--reward-on zt, --noise-ensemble and --mode lpo score noisy latents: refuse an LRM trained on clean ones."""
    if not cfg.timestep_cond:
        flag = "--reward-on zt" if args.reward_on == "zt" else "--noise-ensemble" if args.noise_ensemble else "--mode lpo"
        raise ValueError(f"{flag} needs a noise-aware LRM (train_lrm.py --noise-aware or --model dit); {name} scores clean latents only")


def latent_shape(args) -> tuple[int, int, int, int]:
    return vae_lib.latent_shape(args.frames, args.height, args.width)


# ----------------------------------------------------------------------------- models and prompts

def load_models(args, device, rank, world):
    """(dit, vae, text encoder, tokenizer, LRM or None, training prompts). Every file named on the
    command line is checked before the first model loads (a 14B DiT takes minutes to load)."""
    paths = sample.model_paths(args)
    prompts = sample.read_prompts(args.prompts) if args.prompts else (toy.prompt_list() if args.toy else None)
    if not prompts:
        raise ValueError("real checkpoints need --prompts FILE (one prompt per line)")
    if args.lrm and not Path(args.lrm).is_file():
        raise FileNotFoundError(f"--lrm {args.lrm} does not exist")
    if args.mode == "dollar" and args.lrm is None:
        raise ValueError("--mode dollar needs a Dollar LRM via --lrm (train_lrm.py --model dollar)")
    lrm = lrm_lib.load_lrm(args.lrm) if args.lrm else None  # the small files first: a bad one is found in seconds
    missing = toy.untrained_parts(toy.WORLDS[args.toy_world], args.cache_dir) if args.toy else []
    if missing:
        raise ValueError(f"--toy-world {args.toy_world} needs its trained {' and '.join(missing)} "
                         f"in assets/, which this checkout does not have: train them with `python toy.py train-assets "
                         f"[--device cuda]` (minutes on a GPU, ~1.7 h on 2 CPU cores), or use --toy-world random")
    if args.toy:
        if rank != 0:
            distributed.barrier()  # rank 0 builds the cache first
        log = print if rank == 0 else lambda s: None
        world_cfg = toy.WORLDS[args.toy_world]
        dit, vae, encoder, tokenizer, toy_lrm = toy.load_world(world_cfg, cache_dir=args.cache_dir, log=log)
        if lrm is None and noise_aware_needed(args) and args.mode != "dollar":
            toy_lrm = toy.load_noise_aware_lrm(dit, vae, encoder, tokenizer, world_cfg, cache_dir=args.cache_dir, log=log)
        if rank == 0:
            distributed.barrier()
        lrm = toy_lrm if lrm is None else lrm
    else:
        tokenizer, dt = text_encoder.load_tokenizer(paths["tokenizer"]), sample.dtypes(device)
        # LoRA trains fp32 adapters on the policy's (bf16 on GPU) frozen base; full fine-tuning keeps fp32 master weights
        dit = load_dit(paths["dit"], dtype=torch.float32 if args.full_finetune else dt["dit"])
        vae = load_vae(paths["vae"], device=device, dtype=dt["vae"])
        encoder = text_encoder.load_text_encoder(paths["text_encoder"], device=device, dtype=dt["text_encoder"])
    if lrm is not None and noise_aware_needed(args):
        check_noise_aware(lrm.cfg, args, args.lrm or "the toy world's LRM")
    return dit, vae.to(device), encoder, tokenizer, lrm, prompts


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


# ----------------------------------------------------------------------------- one ReFL step

def step_batch(args, step: int, rank: int, prompts: list[str]) -> dict:
    """The step's prompts, noise and window, a pure function of (seed, step, rank): resuming replays
    the same data order, and every rank draws its own prompts and noise."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 4099 + rank)
    shared = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 4099 - 1)  # same on all ranks
    idx = torch.randint(len(prompts), (args.batch_size,), generator=g).tolist()
    noise = torch.randn(args.batch_size, *latent_shape(args), generator=g)
    n, k = args.sample_steps, args.window
    if args.mode == "lastk":
        grad_start, stop = n - k, n
    elif args.mode == "latestep":
        grad_start = int(torch.randint(n - k, n, (1,), generator=shared))
        stop = grad_start + 1
    else:
        grad_start = int(torch.randint(args.mid_min, args.mid_max + 1, (1,), generator=shared))
        stop = grad_start + k  # exactly K DiT calls with gradient; z0 from the velocity of the last (VELR §4.3)
    return {"prompts": [prompts[i] for i in idx], "noise": noise, "grad_start": grad_start, "stop": stop}


def velocity(model, x, t, context, neg_context, guidance):
    """Guided velocity of `model`, uncond branch without gradient (as in sample.denoise)."""
    v = model(x, t, context)
    if neg_context is None or guidance == 1.0:
        return v
    with torch.no_grad():
        v_uncond = model(x, t, neg_context)
    return sample.guided_velocity(v, v_uncond, guidance)


def reference_velocity(model, ref, x, t, context, neg_context, guidance):
    """v_ref of the initial model: `ref` (a frozen copy) or, under LoRA, `model` with adapters off."""
    with torch.no_grad(), (nullcontext(ref) if ref is not None else lora.lora_disabled(unwrap(model))) as m:
        return velocity(m, x.detach(), t, context, neg_context, guidance)


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def refl_loss(model, ref, lrm, batch, context, lengths, neg_context, args, sigmas, vae=None, reward_fn=None) -> dict:
    """One ReFL forward: no-grad rollout to grad_start, gradient window, z0 from the last velocity,
    reward, KL at t_end. Returns the loss and detached statistics (z0, member rewards, kl)."""
    noise = batch["noise"].to(context.device)

    def vel(x, t):
        if args.gradient_checkpointing and torch.is_grad_enabled():
            # whole-step checkpoint: keep only each window step's input latent and rerun the DiT in
            # the backward (itself checkpointed per block), so the window's memory is one step's,
            # not K steps x num_layers block inputs (60 GB for 1.3B at 480x832x81, K = 10)
            return torch.utils.checkpoint.checkpoint(model, x, t, context, use_reentrant=False)
        return model(x, t, context)

    uncond = (lambda x, t: model(x, t, neg_context)) if neg_context is not None else None
    xt, z0, records = sample.denoise(vel, noise, sigmas, solver=args.solver, uncond_fn=uncond, guidance=args.guidance,
                                     stop=batch["stop"], grad_start=batch["grad_start"], trace=True)
    last = records[-1]
    t = torch.full((noise.shape[0],), last["t"], dtype=torch.int64, device=noise.device)
    v_ref = reference_velocity(model, ref, last["x"], t, context, neg_context, args.guidance)
    kl = (last["v"].float() - v_ref.float()).pow(2).mean()
    if args.mode == "pixel":
        reward = reward_fn(vae.decode(z0, checkpoint=True), batch["prompts"]).float()
        members = reward[None].detach()
    else:
        scored_sigma = 0.0
        if args.reward_on == "zt":  # PRFL: the window's last latent at its own noise level, no x0 prediction
            scored_sigma = float(sigmas[batch["stop"]])
            members = lrm(xt, context, lengths, sigma=scored_sigma)  # (N, B)
        elif args.noise_ensemble:
            members = lrm_lib.noise_ensemble(lrm, z0, context, lengths, seed=args.seed)
        else:
            members = lrm(z0, context, lengths)  # (N, B)
        if args.agg == "lcb" and getattr(getattr(lrm, "cfg", None), "objective", "huber") == "thurstone":
            # both uncertainties: lcb = mean - k sqrt(Var_members + v(sigma)), v(sigma) = 2 sigma^2 + 0.05
            reward = lrm_lib.aggregate_lcb(members, args.lcb_k, lrm_lib.thurstone_var(scored_sigma).to(members.device))
        else:
            reward = lrm_lib.aggregate(members, args.agg, args.lcb_k)
    finite = torch.isfinite(reward.detach())  # a non-finite reward is left out (no finite one: a NaN loss, skipped)
    used = reward[finite].mean() if finite.any() else reward.sum() * float("nan")
    if args.reward_loss == "prfl":  # PRFL's public code: 0.1 * relu(2 - sigmoid(r)), per sample, then the mean
        finite_r = reward[finite] if finite.any() else reward * float("nan")
        used = -(0.1 * torch.relu(2 - torch.sigmoid(finite_r))).mean()
    loss = -used + (args.beta * kl if args.beta > 0 else 0.0)
    return {"loss": loss, "reward": reward.detach(), "members": members.detach(), "kl": kl.detach(), "z0": z0.detach(),
            "dropped": int((~finite).sum())}


def sft_loss(model, rows, args, step: int, data_rank: int, device) -> torch.Tensor:
    """PRFL's supervised flow-matching regulariser: --batch-size real latents of the --sft-data set
    (drawn by (seed, step, data rank), so a resumed run draws the same), re-noised as Wan was
    trained, x_s = (1 - s) z0 + s eps with s through the sampler's shift, and the squared error of
    the model's velocity against eps - z0."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 4099 + data_rank + 104_729)
    items = [rows[i] for i in torch.randint(len(rows), (args.batch_size,), generator=g).tolist()]
    z0 = torch.stack([it["latent"] for it in items]).float()
    text_len = model.module.cfg.text_len if hasattr(model, "module") else model.cfg.text_len
    context = torch.zeros(len(items), text_len, items[0]["context"].shape[-1])
    for i, it in enumerate(items):
        context[i, : it["context"].shape[0]] = it["context"]
    eps = torch.randn(z0.shape, generator=g)
    sigma = sample.shift_sigmas(torch.rand(len(items), generator=g), args.shift)
    s = sigma.view(-1, 1, 1, 1, 1)
    x = ((1 - s) * z0 + s * eps).to(device)
    v = model(x, (sigma * 1000).long().to(device), context.to(device))
    return (v.float() - (eps - z0).to(device)).pow(2).mean()


# ----------------------------------------------------------------------------- LPO

def lpo_threshold(args, sigma: float) -> float:
    """The score gap a pair needs at noise level sigma: linear from AT_0 (sigma 0) to AT_1 (sigma 1)."""
    lo, hi = args.lpo_threshold
    return lo + (hi - lo) * sigma


def select_pairs(scores: torch.Tensor, threshold: float, temp: float = 1.0):
    """LPO's pair selection over k candidates per sample, scores (B, k): softmax(scores / temp) over
    the candidates, best = argmax, worst = argmin, kept where p_best - p_worst > threshold.
    Returns (best (B,), worst (B,), kept (B,) bool)."""
    p = torch.softmax(scores.float() / temp, dim=1)
    best, worst = p.argmax(1), p.argmin(1)
    gap = p.gather(1, best[:, None])[:, 0] - p.gather(1, worst[:, None])[:, 0]
    return best, worst, gap > threshold


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta: float) -> torch.Tensor:
    """Per-pair DPO loss -log sigmoid(beta ((log pi(w) - log ref(w)) - (log pi(l) - log ref(l)))) (B,)."""
    return -torch.nn.functional.logsigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l)))


def lpo_loss(model, ref, lrm, batch, context, lengths, neg_context, args, sigmas, step: int, data_rank: int) -> dict:
    """LPO ("Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference
    Optimization", arXiv 2502.01051) on the window machinery: the policy's stochastic sampler
    (sample.ddim_transition, --lpo-eta) runs without gradient to grad_start; at each of the K
    window steps t it draws --lpo-k candidates x_{t-1} from the policy's Gaussian transition, the
    noise-aware LRM scores them at sigma_{t-1} (aggregated over members by --agg), the best and worst
    form a pair when their softmax gap exceeds the threshold of sigma_{t-1} (select_pairs), and the
    DPO loss compares the policy's transition log-likelihoods (with gradient) against the
    reference's (adapters off / the frozen copy; same std, so the normalisers cancel). The
    trajectory continues from one candidate drawn uniformly (as SPO does). Candidates, the choice
    and the rollout noise are drawn from (seed, step, data rank): a resumed run redraws them.
    loss = mean DPO over the kept pairs of all K steps (0, with the graph intact, when none is
    kept) + beta KL at the last window step (--beta, default 0 in this mode)."""
    x = batch["noise"].to(context.device)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 4099 + data_rank + 15_485_863)
    sig = sigmas.tolist()
    ts = sample.timesteps_from_sigmas(sigmas).tolist()
    b, k = x.shape[0], args.lpo_k

    def draw(shape):
        return torch.randn(shape, generator=g).to(x.device)

    def vel(x_in, t):
        if args.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(velocity, model, x_in, t, context, neg_context, args.guidance,
                                                     use_reentrant=False)
        return velocity(model, x_in, t, context, neg_context, args.guidance)

    for i in range(batch["grad_start"]):  # the policy's own stochastic rollout, no gradient
        t = torch.full((b,), ts[i], dtype=torch.int64, device=x.device)
        with torch.no_grad():
            mean, std = sample.ddim_transition(x, velocity(model, x, t, context, neg_context, args.guidance),
                                               sig[i], sig[i + 1], args.lpo_eta)
        x = mean + std * draw(x.shape)
    losses, kept_total, scores_last, ranges = [], 0, None, []
    for i in range(batch["grad_start"], batch["stop"]):
        t = torch.full((b,), ts[i], dtype=torch.int64, device=x.device)
        v = vel(x, t)
        v_ref = reference_velocity(model, ref, x, t, context, neg_context, args.guidance)
        mean, std = sample.ddim_transition(x, v.float(), sig[i], sig[i + 1], args.lpo_eta)
        mean_ref, _ = sample.ddim_transition(x, v_ref.float(), sig[i], sig[i + 1], args.lpo_eta)
        cands = mean.detach()[:, None] + std * draw((b, k, *x.shape[1:]))  # (B, k, C, F, H, W)
        with torch.no_grad():
            members = lrm(cands.flatten(0, 1), context.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0),
                          sigma=sig[i + 1])
            scores = lrm_lib.aggregate(members.float(), args.agg, args.lcb_k).view(b, k)
        best, worst, kept = select_pairs(scores, lpo_threshold(args, sig[i + 1]), args.lpo_temp)
        ranges.append(scores.max(1).values - scores.min(1).values)
        rows = torch.arange(b, device=x.device)
        y_w, y_l = cands[rows, best], cands[rows, worst]
        per_pair = dpo_loss(sample.gaussian_log_prob(y_w, mean, std), sample.gaussian_log_prob(y_l, mean, std),
                            sample.gaussian_log_prob(y_w, mean_ref, std), sample.gaussian_log_prob(y_l, mean_ref, std),
                            args.dpo_beta)
        losses.append((per_pair * kept.to(per_pair.dtype)).sum())
        kept_total += int(kept.sum())
        scores_last, last = scores, (x, v, v_ref, sig[i])
        x = cands[rows, torch.randint(k, (b,), generator=g).to(x.device)]
    x_last, v_last, v_ref_last, sigma_last = last
    kl = (v_last.float() - v_ref_last.float()).pow(2).mean()
    loss = torch.stack(losses).sum() / max(kept_total, 1)
    if args.beta > 0:
        loss = loss + args.beta * kl
    z0 = sample.x0_from_velocity(x_last, sigma_last, v_last.detach())  # for the log and the alignment buffer
    with torch.no_grad():
        members = lrm(z0, context, lengths)
    return {"loss": loss, "reward": scores_last.mean(1), "members": members.detach(), "kl": kl.detach(), "z0": z0.detach(),
            "dropped": 0, "pairs": kept_total, "pair_offers": b * (batch["stop"] - batch["grad_start"]),
            "score_range": torch.cat(ranges).median().item()}


# ----------------------------------------------------------------------------- online alignment

def buffer_policy(lrm) -> str:
    """The replay buffer's policy for this LRM: an ensemble ranks entries by its variance, a
    one-member LRM (variance always 0) gets a FIFO buffer (replay.py)."""
    return "fifo" if lrm is not None and lrm.n_members == 1 else "variance"


def offer_to_buffer(buffer, out, context, lengths, prompts, vae, reward_fn, step, rank, world, bad, log, group=None) -> dict:
    """Algorithm 1's buffer update, every ReFL step: offer every z0 of the global batch with the
    LRM's ensemble variance on it; label (decode without gradient + pixel reward) only the ones the
    buffer admits, each rank its own; insert them. The decision is taken on the all-gathered
    variances, so every rank admits and inserts the same entries in the same (rank) order.
    Non-finite pixel rewards never enter the buffer (counted in bad["rewards_dropped"]).
    Returns {"labelled": how many were labelled over all ranks} and, when any were, the mean true
    reward of the labelled samples and the LRM's mean absolute error on them. rank / world / group
    are the data-parallel ones (under sequence parallelism the ranks of one group hold the same
    samples, so only one of them counts)."""
    z0 = out["z0"]
    variance = out["members"].float().var(0, correction=0)  # (B,), 0 for a one-member LRM
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
        bad["rewards_dropped"] += buffer.insert(*entries)
    finite = mine & torch.isfinite(true)
    err = (out["members"].mean(0).float() - true).abs()
    stats = torch.stack([torch.where(finite, true, 0).sum(), torch.where(finite, err, 0).sum(), finite.sum().float()])
    if world > 1:
        dist.all_reduce(stats, group=group)
    rec = {"labelled": int(admitted.sum())}
    if stats[2] > 0:
        rec.update(true_reward=(stats[0] / stats[2]).item(), lrm_error=(stats[1] / stats[2]).item())
    return rec


def refresh_variance(lrm, buffer, args, device, world, step, log):
    """Rescore every buffer entry's ensemble variance with the current LRM (no gradient, batches of
    --batch-size) and store it; rank 0's values on every rank, so the buffers stay identical."""
    parts = []
    with torch.no_grad(), sample.autocast(device):
        for i in range(0, len(buffer), args.batch_size):
            rows = slice(i, i + args.batch_size)
            members = lrm(buffer.data["z"][rows].to(device), buffer.data["context"][rows].to(device),
                          buffer.data["lengths"][rows].to(device))
            parts.append(members.float().var(0, correction=0))
    variance = torch.cat(parts)
    if world > 1:
        dist.broadcast(variance, 0)
    removed = buffer.set_variance(variance)
    if removed:
        log(f"step {step}: {removed} buffer entries got a non-finite variance from the LRM; removed")


ALIGN_CLEAN_PROB = 0.1  # share of clean latents when a noise-aware LRM is aligned (train_lrm.py's --clean-prob default)


def align_lrm(lrm, lrm_opt, buffer, args, step, device, world, bad, log) -> dict:
    """Re-fit the LRM on the shared buffer (App. C.2): --align-rounds passes, each
    ceil(entries / --batch-size) Huber updates; every member draws its own minibatch (variance-
    weighted, or uniform in a FIFO buffer); a noise-aware LRM gets them re-noised at levels of the
    sampler's schedule (0 with ALIGN_CLEAN_PROB), labels the clean rewards. The generator is seeded
    the same on every rank: same batches, same update. An update with non-finite loss or gradients is not applied (bad["lrm_skipped"])."""
    if args.refresh_variance and len(buffer):
        refresh_variance(lrm, buffer, args, device, world, step, log)
    if not len(buffer):
        return {}
    g = torch.Generator().manual_seed(args.seed * 7919 + step)  # same on every rank: same batches, same update
    n, bs = lrm.n_members, args.batch_size
    updates = args.align_rounds * math.ceil(len(buffer) / bs)
    amp = sample.dtypes(device)["amp"]
    lrm.requires_grad_(True)
    grid = sample.get_sigmas(args.sample_steps, args.shift, args.solver)[:-1]
    for _ in range(updates):
        b = {k: v.unflatten(0, (n, bs)).to(device) for k, v in buffer.sample(n * bs, generator=g).items()}  # (N, B, ...)
        sigma = None
        if getattr(lrm, "noise_aware", False):  # the buffer holds clean z0: re-noise as pretraining does (train_lrm.py --noise-aware)
            sigma = lrm_lib.draw_sigmas((n, bs), grid, ALIGN_CLEAN_PROB, g)
            b["z"] = lrm_lib.noise_latents(b["z"], sigma.to(device), torch.randn(b["z"].shape, generator=g).to(device))
            sigma = sigma.to(device)
        res = lrm_lib.lrm_update(lrm, lrm_opt, b["z"], b["context"], b["lengths"], b["reward"], generator=g, amp_dtype=amp,
                                 sigma=sigma)
        if res["skipped"]:
            bad["lrm_skipped"] += 1
            log(f"step {step}: LRM update skipped (non-finite loss or gradients)")
    lrm.requires_grad_(False)
    if world > 1:
        for p in lrm.parameters():  # float nondeterminism must not let the ranks' LRMs drift apart
            dist.broadcast(p.data, 0)
    return {"lrm_updates": updates}


# ----------------------------------------------------------------------------- evaluation

def eval_pairs(args, prompts: list[str]) -> list[tuple[str, int]]:
    """Fixed (prompt, seed) pairs: prompt i mod len(prompts), seed 10_000 + i."""
    return [(prompts[i % len(prompts)], 10_000 + i) for i in range(args.eval_samples)]


def sample_pairs(model, vae, pairs, table, neg_context, args, sigmas, device, latents=False):
    """Decoded videos (B, 3, T, H, W) of full no-grad rollouts of `model` on (prompt, seed) pairs;
    latents=True returns (final latents, videos)."""
    noise = torch.stack([torch.randn(latent_shape(args), generator=torch.Generator().manual_seed(seed))
                         for _, seed in pairs]).to(device)
    context, _ = text_batch(table, [p for p, _ in pairs], device)
    neg = None if neg_context is None else neg_context[:1].expand(len(pairs), -1, -1)
    with torch.no_grad(), sample.autocast(device):
        z, _ = sample.denoise(lambda x, t: model(x, t, context), noise, sigmas, solver=args.solver,
                              uncond_fn=None if neg is None else (lambda x, t: model(x, t, neg)), guidance=args.guidance)
        video = vae.decode(z)
    return (z, video) if latents else video


def picture(model, ref, vae, pairs, table, neg_context, args, sigmas, device, rank, out_dir):
    """samples/before_after.png: args.picture_rows pairs spread over the evaluation pairs, sampled by
    the reference (the initial model: adapters off, or the frozen copy) and by the trained model.
    Every rank samples (FSDP needs them all in each forward); rank 0 writes."""
    n = min(args.picture_rows, len(pairs))
    chosen = [pairs[i * len(pairs) // n] for i in range(n)]

    def videos(m):
        return torch.cat([sample_pairs(m, vae, chosen[i : i + args.batch_size], table, neg_context, args, sigmas, device)
                          for i in range(0, n, args.batch_size)])

    after = videos(model)
    with nullcontext(ref) if ref is not None else lora.lora_disabled(unwrap(model)) as initial:
        before = videos(initial)
    if rank == 0:
        (Path(out_dir) / "samples").mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / "samples" / "before_after.png"
        imageio.imwrite(path, before_after_image(before, after, [p for p, _ in chosen]))
        return path


def evaluate(model, vae, reward_fn, pairs, table, neg_context, args, sigmas, device, rank, world, out_dir, step,
             bad=None, lrm=None, group=None) -> dict:
    """Mean pixel reward of full rollouts on the fixed pairs (sharded over ranks; under FSDP every
    rank runs the same number of batches); non-finite rewards are left out of the mean and counted
    in bad["eval_dropped"]. Saves the first two videos of rank 0 as mp4. Returns {"true_reward"} and,
    with an `lrm`, the LRM (member mean) on the same final latents: "lrm_err" = mean |LRM - true|,
    "latent_minus_true" = mean (LRM - true). rank / world / group are the data-parallel ones."""
    per_rank = math.ceil(len(pairs) / world)
    mine = [rank + world * j for j in range(per_rank)]  # indices >= len(pairs) are padding, weight 0
    total = torch.zeros(5, device=device)  # reward sum, finite count, non-finite count, |LRM - true| sum, (LRM - true) sum
    for i in range(0, per_rank, args.batch_size):
        chunk = mine[i : i + args.batch_size]
        ps = [pairs[j % len(pairs)][0] for j in chunk]
        z, video = sample_pairs(model, vae, [pairs[j % len(pairs)] for j in chunk], table, neg_context, args, sigmas, device,
                                latents=True)
        with torch.no_grad():
            r = reward_fn(video, ps).float()
        weight = torch.tensor([float(j < len(pairs)) for j in chunk], device=device)
        finite = torch.isfinite(r)
        gap = torch.zeros_like(r)
        if lrm is not None:
            context, lengths = text_batch(table, ps, device)
            with torch.no_grad(), sample.autocast(device):
                gap = lrm(z, context, lengths).float().mean(0) - r
        ok = weight * finite
        total += torch.stack([torch.where(finite, r * weight, 0).sum(), ok.sum(), (weight * ~finite).sum(),
                              torch.where(finite, gap.abs() * ok, 0).sum(), torch.where(finite, gap * ok, 0).sum()])
        if rank == 0 and i == 0 and distributed.global_rank() == 0:
            save_videos(video[:2], Path(out_dir) / "samples", step)
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


def save_videos(video: torch.Tensor, folder: Path, step: int):
    folder.mkdir(parents=True, exist_ok=True)
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()  # (B, T, H, W, 3)
    for i, f in enumerate(frames):
        imageio.mimwrite(folder / f"step{step:06d}_{i}.mp4", f.numpy(), fps=16)


# 3x5 pixel glyphs (rows top to bottom, "#" = ink) for the labels of before_after.png.
GLYPHS = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..", "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###", "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..", "R": "##. #.# ##. #.# #.#", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "W": "#.# #.# #.# ### #.#", "Y": "#.# #.# .#. .#. .#.",
}


def draw_text(canvas: np.ndarray, text: str, y: int, x: int, scale: int = 2, color=(255, 255, 255)):
    """Write `text` (upper-cased) into an (H, W, 3) uint8 image at (y, x) with GLYPHS; other characters are blank."""
    for i, ch in enumerate(text.upper()):
        if ch not in GLYPHS:
            continue
        ink = np.array([[c == "#" for c in row] for row in GLYPHS[ch].split()]).repeat(scale, 0).repeat(scale, 1)
        x0 = x + i * 4 * scale
        patch = canvas[y : y + 5 * scale, x0 : x0 + 3 * scale]
        patch[ink[: patch.shape[0], : patch.shape[1]]] = color


def before_after_image(before: torch.Tensor, after: torch.Tensor, prompts: list[str], frames: int = 3,
                       height: int = 96) -> np.ndarray:
    """One row per prompt: the named colour (word and swatch), then `frames` evenly spaced frames of
    the video before training, then the same frames after. Videos (B, 3, T, H, W) in [-1, 1]; each
    frame is scaled (nearest neighbour) to about `height` pixels. Returns an (H, W, 3) uint8 image."""
    t = before.shape[2]
    picks = torch.linspace(0, t - 1, min(frames, t)).round().long().tolist()
    h, w = before.shape[-2:]
    up = max(1, round(height / h))
    step = max(1, round(h / height))  # large frames are subsampled instead
    fh, fw = len(range(0, h, step)) * up, len(range(0, w, step)) * up
    label_w, gap, top = 60, 8, 16
    width = label_w + 2 * len(picks) * (fw + 2) + gap
    canvas = np.full((top + len(prompts) * (fh + 4), width, 3), 24, np.uint8)
    draw_text(canvas, "before", 4, label_w)
    draw_text(canvas, "after", 4, label_w + len(picks) * (fw + 2) + gap)
    for row, prompt in enumerate(prompts):
        y = top + row * (fh + 4)
        word = rewards.color_word(prompt)
        if word:
            canvas[y : y + 12, 2 : 14] = tuple(int(255 * c) for c in rewards.PALETTE[word])
            draw_text(canvas, word, y + 16, 2, scale=1 if len(word) > 5 else 2)
        for k, video in enumerate((before, after)):
            for j, f in enumerate(picks):
                frame = ((video[row, :, f, ::step, ::step].float().clamp(-1, 1) + 1) * 127.5).round().byte()
                img = frame.permute(1, 2, 0).cpu().numpy().repeat(up, 0).repeat(up, 1)
                x = label_w + k * (len(picks) * (fw + 2) + gap) + j * (fw + 2)
                canvas[y : y + fh, x : x + fw] = img
    return canvas


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model, opt, lrm, lrm_opt, buffer, step: int, history: list, rank: int, args, bad: dict):
    """Trainable weights, optimiser, step, RNG, LRM + optimiser, buffer, evaluation history; rank 0
    writes tmp + os.replace.
    get_state_dict gathers full state dicts under FSDP2 (a collective: every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, opt_state = get_state_dict(model, opt, options=options)
    if rank == 0:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"step": step, "model": model_state, "optimizer": opt_state, "lrm": lrm.state_dict() if lrm else None,
                 "lrm_optimizer": lrm_opt.state_dict() if lrm_opt else None, "buffer": buffer.state_dict(), "rng": rng,
                 "history": history, "nonfinite": dict(bad)}
        bad = nonfinite_tensors({**model_state, **(state["lrm"] or {})})
        if bad:  # never overwrite a good checkpoint with a poisoned one
            raise RuntimeError(f"step {step}: refusing to write {path}: {len(bad)} weight tensors hold NaN or inf "
                               f"(first: {bad[0]})")
        state["run"] = run_settings(args)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # a full disk shows up as "unexpected pos ..." from torch.save
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"step {step}: could not write the checkpoint {tmp} (disk full?): {e}; "
                               f"{path} still holds the previous one") from None
        os.replace(tmp, path)
    distributed.barrier()


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


# The flags that define a run: a checkpoint continues only under the same ones (--steps may grow).
RUN_KEYS = ("mode", "full_finetune", "lora_rank", "lora_alpha", "lora_targets", "batch_size", "sample_steps", "shift",
            "solver", "mid_min", "mid_max", "window", "size", "frames", "agg", "seed", "buffer_size", "toy_world",
            "reward_on", "noise_ensemble", "sp_size", "reward_loss", "sft_weight", "lpo_k", "lpo_eta", "dpo_beta",
            "lpo_threshold", "lpo_temp")


def run_settings(args) -> dict:
    return {k: getattr(args, k) for k in RUN_KEYS}


def check_resume(state: dict, args, path):
    """Refuse a checkpoint made under other run-defining flags, or one past --steps."""
    saved = state.get("run") or {}
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}" for k in RUN_KEYS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise ValueError(f"{path} was written by a run with other settings: {', '.join(changed)}; "
                         f"resume with the same flags, or start a new run in another --out")
    if state["step"] > args.steps:
        raise ValueError(f"{path} is at step {state['step']}, past --steps {args.steps}; give --steps >= {state['step']}")


def read_checkpoint(path) -> dict:
    """ckpt.pt -> its state, or an error that names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path} does not exist (or is not a file); expected a train_refl ckpt.pt")
    if path.stat().st_size == 0:
        raise ValueError(f"--resume {path}: empty file (0 bytes); expected a train_refl ckpt.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises several types for truncated and foreign files
        raise ValueError(f"--resume {path}: not a readable train_refl checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not {"step", "model", "optimizer", "buffer", "rng", "history"} <= state.keys():
        raise ValueError(f"--resume {path}: not a train_refl checkpoint (expected the keys step, model, optimizer, "
                         f"buffer, rng, history)")
    return state


def load_checkpoint(state, model, opt, lrm, lrm_opt, buffer) -> tuple[int, list, dict]:
    """Restore what save_checkpoint saved (read_checkpoint's state) -> (step, evaluation history,
    non-finite counters)."""
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
    if lrm is not None:
        lrm.load_state_dict(state["lrm"])
        lrm_opt.load_state_dict(state["lrm_optimizer"])
    buffer.load_state_dict(state["buffer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["history"], {**new_bad_counts(), **state.get("nonfinite", {})}


def new_bad_counts() -> dict:
    """What non-finite values cost the run: rewards left out (training / evaluation), steps not applied."""
    return {"rewards_dropped": 0, "eval_dropped": 0, "refl_skipped": 0, "lrm_skipped": 0}


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


def check_bad(bad: dict, args, step: int):
    """Stop the run (nothing more is written) once too many steps had non-finite loss or gradients."""
    skipped = bad["refl_skipped"] + bad["lrm_skipped"]
    if skipped > args.max_bad_steps:
        raise RuntimeError(f"step {step}: {bad['refl_skipped']} ReFL steps and {bad['lrm_skipped']} LRM updates were "
                           f"skipped for non-finite loss or gradients (more than --max-bad-steps {args.max_bad_steps}); "
                           f"{bad['rewards_dropped']} non-finite pixel rewards were dropped. Check the reward model "
                           f"and the learning rate; the last checkpoint holds the last good state")


def rank_difference(model, lrm, buffer) -> float:
    """Largest difference of the full trainable weights, the LRM and the replay buffer between the
    ranks (0.0: in sync). A collective: every rank calls it."""
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)  # gathered on every rank
    tensors = list(get_model_state_dict(model, options=options).values())
    tensors += list(lrm.parameters()) if lrm is not None else []
    tensors += list(buffer.data.values()) + [buffer.arrival] if buffer.data is not None else []
    return distributed.max_rank_difference(tensors)


# ----------------------------------------------------------------------------- training

def wrap(dit, args, device, world):
    """(trainable model, frozen reference or None). LoRA: DDP, reference = adapters off.
    Full fine-tuning: FSDP2 per block + root, reference = a frozen copy sharded the same way."""
    if args.full_finetune:
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
    lora.add_lora(dit, args.lora_rank, args.lora_alpha, args.lora_targets, generator=torch.Generator().manual_seed(args.seed))
    dit.to(device)
    if world > 1:
        return DDP(dit, device_ids=[device.index] if device.type == "cuda" else None), None
    return dit, None


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def finish(metrics):
    if metrics:
        metrics.close()
    distributed.cleanup()


def open_metrics(path: Path, start: int):
    """metrics.jsonl for appending: emptied for a new run; on resume the lines of the steps after the
    checkpoint (which are redone) are dropped, and so is a line a kill tore in half."""
    kept = []
    for line in path.read_text().splitlines() if start and path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}: dropped a torn line ({len(line)} characters)")
            continue
        if record["step"] <= start:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))
    return open(path, "a")


def write_atomic(path: Path, text: str):
    """Write a text file through a temporary file, fsync and os.replace: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_out_dir(out_dir: Path, args):
    """A run never silently replaces another: a non-empty --out needs --resume or --overwrite."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (args.resume or args.overwrite):
        raise ValueError(f"--out {out_dir} already holds a run; continue it with --resume {out_dir / 'ckpt.pt'}, "
                         f"replace it with --overwrite, or choose another --out")


RUN_FILES = ("args.json", "metrics.jsonl", "ckpt.pt", "lora.safetensors", "summary.json", "sync.json", "samples")


def clear_run(out_dir: Path):
    """--overwrite: the files of the previous run go before the new one writes any, so a new run that
    stops early (or exports no LoRA) never sits next to the old run's results. Other files stay."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def format_line(r: dict) -> str:
    """One step's log line. labelled: samples decoded and scored for the buffer this step; r_true and
    lrm_err: their mean pixel reward and the LRM's mean absolute error on them ("-" when none)."""
    true = f"{r['true_reward']:.4f}" if "true_reward" in r else "  -   "
    err = f"{r['lrm_error']:.4f}" if "lrm_error" in r else "  -   "
    pairs = f"pairs {r['pairs']}/{r['pair_offers']} (range {r['score_range']:.3g}) | " if "pairs" in r else ""
    evaluation = f" | eval true reward {r['eval_true_reward']:.4f}" if "eval_true_reward" in r else ""
    return (f"step {r['step']:5d} | loss {r['loss']:+.4f} | r_lrm {r['reward']:.4f} ± {r['reward_std']:.4f} | "
            f"kl {r['kl']:.2e} | {pairs}labelled {r.get('labelled', 0):3d} | r_true {true} | lrm_err {err} | "
            f"lr {r['lr']:.1e} | {r['sec']:.2f} s | mem {r['peak_mem_mb']:.0f} MB{evaluation}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.setup_distributed()
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    # Data parallelism over world / sp_size groups of ranks; the sp_size ranks of one group hold the
    # same samples, their tokens split (Ulysses): data_rank / data_world / dp_group are the data's.
    sp_group = dp_group = None
    data_rank, data_world = rank, world
    if args.sp_size > 1:  # sequence_parallel_groups refuses a size that does not divide the world
        sp_group, dp_group = distributed.sequence_parallel_groups(args.sp_size)
        data_rank, data_world = rank // args.sp_size, world // args.sp_size
    out_dir = Path(args.out)
    check_out_dir(out_dir, args)
    resume_state = None
    if args.resume:
        resume_state = read_checkpoint(args.resume)
        check_resume(resume_state, args, args.resume)
    reward_fn = rewards.load_reward(args.reward)
    sft_rows = train_lrm.ShardRows(args.sft_data, "--sft-data") if args.sft_data else None  # read (and checked) before any model
    if sft_rows is not None and not len(sft_rows):
        raise ValueError(f"--sft-data {args.sft_data} holds no samples")
    dit, vae, encoder, tokenizer, lrm, prompts = load_models(args, device, rank, world)
    distributed.barrier()  # every rank has checked and loaded before rank 0 writes: a refused run leaves --out alone
    if rank == 0:
        if args.overwrite and not args.resume:
            clear_run(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "args.json", json.dumps({**vars(args), "world_size": world}, indent=2))
    log = print if rank == 0 else (lambda *a, **k: None)

    pairs = eval_pairs(args, prompts)
    table = embed_prompts(prompts + [sample.WAN_NEGATIVE_PROMPT], tokenizer, encoder, device, dit.cfg.text_len)
    del encoder  # prompts are embedded once; the encoder is not needed again
    neg = text_batch(table, [sample.WAN_NEGATIVE_PROMPT] * args.batch_size, device)[0] if args.guidance != 1.0 else None
    dit = dit.to(device)
    dit.gradient_checkpointing = args.gradient_checkpointing
    model, ref = wrap(dit, args, device, world)
    for m in (dit, ref):  # after wrap: the frozen copy of full fine-tuning is a deepcopy
        if m is not None and sp_group is not None:
            m.set_sequence_parallel(sp_group)
        if m is not None and args.compile:
            m.compile_blocks()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    lrm_opt = None
    if lrm is not None:
        lrm = lrm.to(device).requires_grad_(False)
        if args.gradient_checkpointing and getattr(lrm, "kind", None) == "dit":  # the DiT-backbone LRM's trunk too
            lrm.trunk.gradient_checkpointing = True
        if args.compile:
            lrm.compile()  # in place: its state_dict keys, saves and broadcasts stay the same
        lrm_opt = torch.optim.AdamW(lrm.parameters(), lr=args.align_lr, weight_decay=0.0)
    buffer = replay.ReplayBuffer(args.buffer_size, policy=buffer_policy(lrm))
    sigmas = sample.get_sigmas(args.sample_steps, args.shift, args.solver)
    ckpt_path = out_dir / "ckpt.pt"

    def eval_entry(step: int) -> dict:
        """One evaluation: the true reward and, with an LRM, its error on the same final latents."""
        return {"step": step, **evaluate(model, vae, reward_fn, pairs, table, neg, args, sigmas, device, data_rank,
                                         data_world, out_dir, step, bad, lrm=lrm if args.mode != "pixel" else None,
                                         group=dp_group)}

    if args.resume:
        start, history, bad = load_checkpoint(resume_state, model, opt, lrm, lrm_opt, buffer)
        log(f"resumed {args.resume} at step {start}")
    else:
        start, bad = 0, new_bad_counts()
        history = [eval_entry(0)]
    before = history[0]["true_reward"]
    log(f"eval step 0 | true reward {before:.4f} ({len(pairs)} fixed prompt/seed pairs)")
    metrics = open_metrics(out_dir / "metrics.jsonl", start) if rank == 0 else None
    t_run, lpo_kept = time.time(), 0
    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        batch = step_batch(args, step, data_rank, prompts)
        context, lengths = text_batch(table, batch["prompts"], device)
        with sample.autocast(device):
            if args.mode == "lpo":
                out = lpo_loss(model, ref, lrm, batch, context, lengths, neg, args, sigmas, step, data_rank)
            else:
                out = refl_loss(model, ref, lrm, batch, context, lengths, neg, args, sigmas, vae, reward_fn)
            if sft_rows is not None:  # PRFL's regulariser on real latents, beside (or with --beta 0 instead of) the KL
                out["sft"] = sft_loss(model, sft_rows, args, step, data_rank, device)
                out["loss"] = out["loss"] + args.sft_weight * out["sft"]
        opt.zero_grad(set_to_none=True)
        # DDP / FSDP average over all ranks; under SP each rank holds its tokens' share of the
        # gradient, so x sp_size makes that average the data-parallel mean of whole gradients
        (out["loss"] * args.sp_size).backward()
        bad["rewards_dropped"] += out["dropped"]
        if gradients_finite(model, out["loss"], world):
            opt.step()
        else:  # nothing of this step is applied
            opt.zero_grad(set_to_none=True)
            bad["refl_skipped"] += 1
            log(f"step {step}: non-finite ReFL loss or gradients; the step is skipped")
        rec = {"step": step, "loss": out["loss"].item(), "reward": out["reward"].nanmean().item(),
               "reward_std": out["members"].float().std(0, correction=0).mean().item(), "kl": out["kl"].item(), "lr": args.lr}
        if "sft" in out:
            rec["sft"] = out["sft"].item()
        if "pairs" in out:  # --mode lpo: preference pairs kept / offered this step, the candidates' score range
            rec.update(pairs=out["pairs"], pair_offers=out["pair_offers"], score_range=out["score_range"])
            lpo_kept += out["pairs"]
            if step - start == LPO_WARN_STEPS and lpo_kept == 0:
                log(f"warning: --mode lpo kept no preference pair in {LPO_WARN_STEPS} steps, so nothing trains: the "
                    f"{args.lpo_k} candidates' LRM scores differ by {out['score_range']:.3g} (median max - min), too "
                    f"little for a softmax gap of {args.lpo_threshold[0]}-{args.lpo_threshold[1]} at --lpo-temp "
                    f"{args.lpo_temp}; a temperature near that difference keeps some (LPO's 1 suits logit-scale scores)")
        if args.align_every and args.mode != "pixel":  # online alignment (Algorithm 1)
            rec.update(offer_to_buffer(buffer, out, context, lengths, batch["prompts"], vae, reward_fn, step, data_rank,
                                       data_world, bad, log, group=dp_group))
            if step % args.align_every == 0:
                rec.update(align_lrm(lrm, lrm_opt, buffer, args, step, device, world, bad, log))
        check_bad(bad, args, step)
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            history.append(eval_entry(step))
            rec["eval_true_reward"] = history[-1]["true_reward"]
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(ckpt_path, model, opt, lrm, lrm_opt, buffer, step, history, rank, args, bad)
        rec.update(**bad, sec=time.time() - t0, peak_mem_mb=peak_memory_mb(device))
        log(format_line(rec))
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if step == args.stop_after:
            log(f"--stop-after {step}: exiting without the final evaluation, checkpoint and export")
            finish(metrics)
            return model, lrm, buffer
    seconds = time.time() - t_run
    history.append(eval_entry(args.steps))
    after = history[-1]["true_reward"]
    save_checkpoint(ckpt_path, model, opt, lrm, lrm_opt, buffer, args.steps, history, rank, args, bad)
    if args.picture_rows:
        path = picture(model, ref, vae, pairs, table, neg, args, sigmas, device, rank, out_dir)
        log(f"before/after picture: {path}")
    if world > 1:  # every rank must end with the same weights, LRM and buffer (else N models were trained)
        diff = rank_difference(model, lrm, buffer)
        if rank == 0:
            (out_dir / "sync.json").write_text(json.dumps({"world": world, "max_diff": diff}))
        log(f"largest weight / LRM / buffer difference between ranks: {diff:.3g}")
    if rank == 0:
        if not args.full_finetune:
            lora.save_lora(unwrap(model), out_dir / "lora.safetensors")
        steps_run = max(args.steps - start, 1)
        summary = {"true_reward_before": before, "true_reward_after": after, "eval_history": history,
                   "steps": args.steps, "train_seconds": seconds, "sec_per_step": seconds / steps_run,
                   "peak_mem_mb": peak_memory_mb(device), "world_size": world, "mode": args.mode, "nonfinite": bad}
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"true reward (eval, {len(pairs)} fixed prompt/seed pairs): before {before:.4f} -> after {after:.4f}")
    if any(bad.values()):
        log(f"non-finite values: {bad['rewards_dropped']} training and {bad['eval_dropped']} evaluation rewards dropped, "
            f"{bad['refl_skipped']} ReFL steps and {bad['lrm_skipped']} LRM updates skipped")
    finish(metrics)
    return model, lrm, buffer


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, no traceback
        raise SystemExit(f"train_refl.py: error: {e}") from None
