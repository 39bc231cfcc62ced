"""The latent dataset the LRM pretrains on (VELR §4.1, App. C.1): for each clip, the Wan VAE latent,
the prompt's UMT5 embedding and the target R(Dec(z), prompt), the pixel reward of the *decoded*
latent, because that is what the LRM is compared against during ReFL (Eq. 6).

Sources, any mix: `--manifest` (jsonl or csv of video, prompt[, reward]), `--videos DIR` (mp4 +
same-name .txt caption), `--latents DIR` (`sample.py --save-latents`, generated data). A video is
read with imageio at `--fps`, resized and centre-cropped to `--size`, encoded, decoded and scored
by `--reward`. Unreadable or too-short videos and non-finite rewards are skipped and counted in
`report.json`. The output is shards.py's format; `dataset.json` records the settings and each
shard's inputs, so a rerun finishes missing shards and appends new inputs, never duplicating one,
and refuses other settings (`plan_dataset`). Under torchrun rank r writes shards r, r+W, ...
Without checkpoints the tiny presets run with random weights (tests, offline demo).

    torchrun --nproc_per_node=8 prepare_data.py --manifest videos.jsonl --out data/lrm \\
        --ckpt-dir Wan2.1-T2V-1.3B --size 832x480 --frames 81 --fps 16 --reward my_rm:score

Left out: scene-cut detection, several clips per video (the first `--frames` are used),
filtering by resolution or aspect (the paper keeps landscape >= 480p; do it in the manifest).
"""

import argparse
import csv
import json
import math
from pathlib import Path

import imageio
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

import distributed
import rewards
import runs
import sample
import shards
import text_encoder
import toy
import vae as vae_lib

# ---------------------------------------------------------------------------------------------
# Sources


def read_manifest(path):
    """jsonl or csv rows -> [{"video", "prompt", "reward" (float or None)}], paths made absolute."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = []
    for i, row in enumerate(rows):
        if "video" not in row or "prompt" not in row:
            raise ValueError(f"{path} row {i} needs 'video' and 'prompt', got keys {sorted(row)}")
        reward = row.get("reward")
        reward = None if reward in (None, "") else float(reward)
        items.append({"video": str(path.parent / row["video"]), "prompt": row["prompt"], "reward": reward})
    return items


def read_video_folder(folder):
    """`name.mp4` + `name.txt` caption pairs; an mp4 without a caption is an error, not a skip."""
    items = []
    for mp4 in sorted(Path(folder).glob("*.mp4")):
        txt = mp4.with_suffix(".txt")
        if not txt.exists():
            raise FileNotFoundError(f"no caption {txt} for {mp4}")
        items.append({"video": str(mp4), "prompt": txt.read_text().strip(), "reward": None})
    return items


# ---------------------------------------------------------------------------------------------
# Video -> clip


class TooShort(ValueError):
    pass


def frame_indices(frames, fps, src_fps):
    """Source frame index of each of `frames` output frames at `fps`, read from a `src_fps` video."""
    return [math.floor(i * src_fps / fps + 1e-6) for i in range(frames)]


def read_frames(path, indices):
    """The frames at `indices` (sorted) of a video -> uint8 (T, H, W, 3). Streams the file and keeps
    only the frames it needs, so a long video costs one frame of memory beyond the clip."""
    wanted, out, count = set(indices), {}, 0
    with imageio.get_reader(path, "ffmpeg") as reader:
        for i, frame in enumerate(reader):
            count = i + 1
            if i in wanted:
                out[i] = frame
            if i >= indices[-1]:
                break
    if len(out) < len(wanted):
        raise TooShort(f"{path} has {count} frames, needs {indices[-1] + 1}")
    return np.stack([out[i] for i in indices])


def resize_crop(frames, width, height):
    """uint8 (T, H, W, 3) -> float (3, T, height, width) in [-1, 1]: shorter side resized to cover
    the target (bilinear, antialiased), then centre-cropped."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(width / w, height / h)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3)  # (3, T, H, W)


def read_clip(path, frames, fps, width, height):
    """A video file -> (3, frames, height, width) in [-1, 1]; TooShort or another error if it fails."""
    with imageio.get_reader(path, "ffmpeg") as reader:
        src_fps = float(reader.get_meta_data()["fps"])
    return resize_crop(read_frames(path, frame_indices(frames, fps, src_fps)), width, height)


# ---------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_video(item, vae, args, device):
    """A manifest/folder item -> normalised latent (16, T', H', W'); TooShort or a read error if it fails."""
    width, height = args.size
    try:
        clip = read_clip(item["video"], args.frames, args.fps, width, height)
    except TooShort:
        raise
    except Exception as e:  # imageio/ffmpeg raise several types for missing, empty and corrupt files
        raise OSError(f"cannot read {item['video']}: {type(e).__name__}: {e}") from e
    return vae.encode(clip[None].to(device))[0]


def load_saved_latent(item):
    """A `sample.py --save-latents` file -> (latent (C, T', H', W'), prompt)."""
    with safe_open(item["latent"], "pt") as f:
        return f.get_tensor("latent").float(), f.metadata()["prompt"]


def load_models(args, device):
    """-> (vae, embed) with embed(prompts) -> [context (L_i, C)] through the on-disk PromptCache.
    No files given: the toy world's tiny VAE and UMT5 (toy.build_models) with seeded RANDOM weights."""
    paths = sample.model_paths(args, parts=("vae", "text_encoder", "tokenizer"))
    if paths:
        dt = sample.dtypes(device)
        vae = vae_lib.load_vae(paths["vae"], device=device, dtype=dt["vae"])
        encoder = text_encoder.load_text_encoder(paths["text_encoder"], device=device, dtype=dt["text_encoder"])
        tokenizer = text_encoder.load_tokenizer(paths["tokenizer"])
        tag = f"{Path(paths['text_encoder']).resolve()}|{Path(paths['tokenizer']).resolve()}|{dt['text_encoder']}"
    else:
        print("no --ckpt-dir/--vae/--text-encoder: tiny VAE and UMT5 with RANDOM weights (seeded); "
              "the latents only exercise the pipeline")
        _, vae, encoder, tokenizer = toy.build_models(args.seed)
        vae, encoder, tag = vae.to(device), encoder.to(device), f"tiny-random-seed{args.seed}"
    cache = text_encoder.PromptCache(args.prompt_cache or Path(args.out) / "prompt_cache", tag)

    def embed(prompts):
        context, lengths = cache.encode(prompts, tokenizer, encoder)
        return [c[:n] for c, n in zip(context, lengths.tolist())]

    return vae, embed


@torch.no_grad()
def process_shard(items, vae, embed, reward_fn, args, device):
    """Items -> (rows for write_shard, skipped [{"source", "reason", "error"}])."""
    rows, skipped = [], []
    for item in items:
        source = item.get("video") or item["latent"]
        if "latent" in item:
            z, prompt = load_saved_latent(item)
            z = z.to(device)
        else:
            try:
                z = encode_video(item, vae, args, device)
            except TooShort as e:
                skipped.append({"source": source, "reason": "too_short", "error": str(e)})
                continue
            except OSError as e:
                skipped.append({"source": source, "reason": "unreadable", "error": str(e)})
                continue
            prompt = item["prompt"]
        if args.keep_reward and item.get("reward") is not None:
            reward = item["reward"]
        else:  # the target the LRM will be compared against: R(Dec(z), prompt)
            reward = float(reward_fn(vae.decode(z[None]), [prompt])[0])
        if not math.isfinite(reward):  # a NaN/inf label would poison every LRM trained on it
            print(f"skipped {source} (prompt {prompt!r}): the reward is {reward}, not a finite number")
            skipped.append({"source": source, "reason": "non_finite_reward", "error": f"reward {reward} for prompt {prompt!r}"})
            continue
        rows.append({"latent": z.cpu(), "prompt": prompt, "source": source, "reward": reward})
    for row, context in zip(rows, embed([r["prompt"] for r in rows]) if rows else []):
        row["context"] = context.cpu()
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# Main


def parse_size(text):
    """--size: "832x480" -> (832, 480), multiples of 16 (vae.parse_size: the sizes Wan generates,
    so the LRM trains on latents of the shapes ReFL will score)."""
    try:
        return vae_lib.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv):
    p = argparse.ArgumentParser(description="videos + prompts -> latent dataset for LRM pretraining")
    g = p.add_argument_group("sources (any mix)")
    g.add_argument("--manifest", help="jsonl or csv: video, prompt[, reward]")
    g.add_argument("--videos", help="folder of *.mp4 with same-name .txt captions")
    g.add_argument("--latents", help="folder of sample.py --save-latents files")
    g = p.add_argument_group("clips")
    g.add_argument("--size", type=parse_size, default=(32, 32), help="WIDTHxHEIGHT, multiples of 16, e.g. 832x480 (default 32x32)")
    g.add_argument("--frames", type=int, default=5, help="4k+1, e.g. 81 (default 5)")
    g.add_argument("--fps", type=float, default=16.0, help="frame rate the clip is resampled to (default 16)")
    g = p.add_argument_group("labels")
    g.add_argument("--reward", default="color", help="built-in name or module:attr, see rewards.py (default color)")
    g.add_argument("--keep-reward", action="store_true", help="keep a manifest's reward instead of scoring")
    g = p.add_argument_group("models (none given: tiny presets, random weights)")
    g.add_argument("--ckpt-dir", help="Wan2.1-T2V folder (original or -Diffusers layout)")
    g.add_argument("--vae", help="VAE file or folder (overrides --ckpt-dir)")
    g.add_argument("--text-encoder", help="UMT5 file or folder (overrides --ckpt-dir)")
    g.add_argument("--tokenizer", help="tokenizer folder or file (overrides --ckpt-dir)")
    g.add_argument("--prompt-cache", help="prompt-embedding cache folder (default OUT/prompt_cache)")
    g.add_argument("--seed", type=int, default=0, help="seed of the tiny random models (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="data/lrm", help="dataset folder (default data/lrm)")
    g.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default 64)")
    args = p.parse_args(argv)
    if not (args.manifest or args.videos or args.latents):
        p.error("give at least one source: --manifest, --videos or --latents")
    try:
        vae_lib.check_size(args.frames, args.size[1], args.size[0])
        if args.frames < 5:
            raise ValueError(f"--frames {args.frames} is a still image, not a video: a video reward model needs at least 5 frames")
        paths = sample.model_paths(args, parts=("vae", "text_encoder", "tokenizer"))  # refused before any work
        if paths:  # the VAE's size rule: multiples of 16 (Wan 2.1 VAE), 32 (Wan 2.2, the TI2V-5B's)
            m = vae_lib.read_config(paths["vae"]).size_multiple
            if args.size[0] % m or args.size[1] % m:
                raise ValueError(f"--size {args.size[0]}x{args.size[1]}: {paths['vae']} is a Wan "
                                 f"{'2.2' if m == 32 else '2.1'} VAE, whose videos are multiples of {m}")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.shard_size < 1:
        p.error(f"shard-size must be >= 1, got {args.shard_size}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        p.error(f"--fps must be a finite number > 0, got {args.fps}")
    for flag, path, kind in (("--manifest", args.manifest, "file"), ("--videos", args.videos, "folder"), ("--latents", args.latents, "folder")):
        if path is None:
            continue
        if not Path(path).exists():
            p.error(f"{flag} {path} does not exist")
        if (kind == "file") != Path(path).is_file():
            p.error(f"{flag} {path} is not a {kind}")
    return args


def collect_items(args):
    """Every source in a fixed order (shard i is the same items in every run and on every rank)."""
    items = read_manifest(args.manifest) if args.manifest else []
    items += read_video_folder(args.videos) if args.videos else []
    items += [{"latent": str(p)} for p in sorted(Path(args.latents).glob("*.safetensors"))] if args.latents else []
    return items


# ---------------------------------------------------------------------------------------------
# The record of what a dataset was made from (dataset.json)


RECORD = "dataset.json"


def dataset_settings(args):
    """The flags that define the data: a dataset extended with other values would mix latent shapes,
    frame rates, labels or prompt embeddings across its shards."""
    paths = sample.model_paths(args, parts=("vae", "text_encoder", "tokenizer"))
    models = {k: str(Path(v).resolve()) for k, v in sorted(paths.items())} if paths else f"tiny-random-seed{args.seed}"
    return {"size": "{}x{}".format(*args.size), "frames": args.frames, "fps": args.fps, "reward": args.reward,
            "keep_reward": args.keep_reward, "models": models}


SETTING_FLAGS = {"size": "--size", "frames": "--frames", "fps": "--fps", "reward": "--reward", "keep_reward": "--keep-reward",
                 "models": "--ckpt-dir/--vae/--text-encoder/--tokenizer/--seed"}


def input_entry(item):
    """An input as dataset.json records it: the item (what process_shard needs) with its file's
    absolute path, size and mtime, so a rerun can tell a new input from a recorded one and notice
    a recorded one that changed."""
    path = Path(item.get("video") or item["latent"]).resolve()
    entry = {**item, "path": str(path)}
    for key in ("video", "latent"):
        entry.pop(key, None)
    st = path.stat() if path.exists() else None
    entry["size"], entry["mtime_ns"] = (st.st_size, st.st_mtime_ns) if st else (None, None)
    return entry


def entry_key(entry):
    return entry["path"], entry.get("prompt")


def entry_item(entry):
    """A recorded input back to a process_shard item."""
    item = {k: v for k, v in entry.items() if k not in ("path", "size", "mtime_ns")}
    item["latent" if "prompt" not in entry else "video"] = entry["path"]
    return item


def plan_dataset(out, settings, items, shard_size):
    """-> (record, changed): the shards of the dataset in `out` with the inputs not yet in any shard
    appended as new shards (numbered after the old ones; a function of the folder and the inputs,
    so every rank computes the same). ValueError for a folder it must not extend: shards or other
    files but no record, other settings, or a recorded input that changed since."""
    path = Path(out) / RECORD
    if path.exists():
        try:
            record = json.loads(path.read_text())
            record["settings"], record["shards"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a readable dataset record ({err}); start a new --out") from None
    else:
        if any(Path(out).glob("shard_*.safetensors")):
            raise ValueError(f"{out} holds shards but no {RECORD} (made by an older prepare_data.py): what they were made "
                             f"from is unknown, so it cannot be extended safely; start a new --out")
        if Path(out).is_dir() and any(Path(out).iterdir()):
            raise ValueError(f"--out {out} holds other files and no {RECORD}: it is not a prepare_data.py dataset; "
                             f"choose an empty or new --out")
        record = {"settings": settings, "shards": []}
    diffs = [f"{SETTING_FLAGS[k]} {settings[k]} (this run) vs {record['settings'].get(k)} (dataset)"
             for k in settings if settings[k] != record["settings"].get(k)]
    if diffs:
        raise ValueError(f"{out} was made with other settings: " + "; ".join(diffs) + "; use the dataset's settings or a new --out")
    recorded = set()
    for i, shard in enumerate(record["shards"]):
        for entry in shard:
            recorded.add(entry_key(entry))
            now = Path(entry["path"])
            if not now.exists():
                if not shards.shard_path(out, i).exists():
                    raise ValueError(f"{now} is gone but shard {i} that holds it is not written yet; restore it or start a new --out")
                continue
            st = now.stat()
            if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                raise ValueError(f"{now} changed since it was added to shard {i} (size/mtime differ from {RECORD}); "
                                 f"restore the original file, or start a new --out to use the new one")
    new = []
    for item in items:
        entry = input_entry(item)
        if entry_key(entry) not in recorded:
            recorded.add(entry_key(entry))
            new.append(entry)
    record["shards"] += [new[i : i + shard_size] for i in range(0, len(new), shard_size)]
    return record, bool(new) or not path.exists()


def write_record(out, record):
    """dataset.json, atomically: never torn."""
    runs.write_json(Path(out) / RECORD, record, indent=1)


def main(argv=None):
    args = parse_args(argv)
    reward_fn = rewards.load_reward(args.reward)  # a bad --reward is refused before anything is recorded or loaded
    rank, world, device = distributed.setup_distributed()
    out = Path(args.out)
    # every rank plans from the same folder and inputs (and so refuses the same way) before anything
    # is written; rank 0 records the plan before any shard is written, so a crash leaves planned
    # shards that a rerun redoes
    record, changed = plan_dataset(out, dataset_settings(args), collect_items(args), args.shard_size)
    distributed.barrier()  # no rank plans from a folder rank 0 has begun to write
    if rank == 0 and changed:
        out.mkdir(parents=True, exist_ok=True)
        write_record(out, record)
    distributed.barrier()
    num_shards = len(record["shards"])
    num_items = sum(len(shard) for shard in record["shards"])
    mine = list(range(num_shards))[rank::world]
    todo = [i for i in mine if not shards.shard_path(out, i).exists()]
    print(f"[rank {rank}] {num_items} inputs, {num_shards} shards: {len(todo)} to write, {len(mine) - len(todo)} finished before")
    if todo:
        vae, embed = load_models(args, device)
    for i in todo:
        rows, skipped = process_shard([entry_item(e) for e in record["shards"][i]], vae, embed, reward_fn, args, device)
        shards.write_shard(shards.shard_path(out, i), rows, skipped)
        print(f"[rank {rank}] shard {i}: {len(rows)} samples, {len(skipped)} skipped")
    distributed.barrier()
    report = None
    if rank == 0:
        report = shards.write_index(out, num_shards, num_items)
        print(f"{report['written']} samples in {num_shards} shards; skipped {report['skipped']} (details in {out / 'report.json'})")
    distributed.cleanup()
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, no traceback
        raise SystemExit(f"prepare_data.py: error: {e}") from None
