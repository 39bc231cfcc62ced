"""The latent-shard format of an LRM dataset: its one writer (prepare_data.py) and its one reader
(train_lrm.py, and train_refl.py's --sft-data).

A dataset folder holds `shard_00000.safetensors`, ... and `index.json` (+ `report.json`):
- a shard: `latents` (N, 16, T', H', W') fp32, `context` (N, L, C) the prompt embeddings zero-padded
  to the longest prompt of the shard, `lengths` (N,) int64, `rewards` (N,) fp32; metadata (strings)
  `samples` (N), `prompts`, `sources` and `skipped` as JSON. A shard of zero samples (every input
  skipped) holds four empty tensors and still marks its inputs as done.
- `index.json`: {"samples": total, "shards": [{"file", "samples"}, ...]}, built from the shard files.
- `report.json`: the inputs, the samples written and the inputs skipped, counted by SKIP_REASONS.
Every file is written to a temporary name, fsync'ed and renamed, so a file that exists is complete.

Imports torch, safetensors and the standard library only: it works copied alone.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SKIP_REASONS = ("unreadable", "too_short", "non_finite_reward")


def _atomic(path, write):
    """write(tmp) on a temporary file beside `path`, fsync, rename over `path`; on an error the
    temporary file goes and `path` keeps what it held."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_json(path, obj):
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


# ----------------------------------------------------------------------------- writing


def shard_path(out, i):
    return Path(out) / f"shard_{i:05d}.safetensors"


def write_shard(path, rows, skipped):
    """rows: [{"latent", "context" (L, C), "reward", "prompt", "source"}]; skipped: [{"source",
    "reason", "error"}]. Written atomically, so a shard file that exists is complete."""
    n = len(rows)
    if n:
        longest = max(r["context"].shape[0] for r in rows)
        context = torch.zeros(n, longest, rows[0]["context"].shape[1], dtype=rows[0]["context"].dtype)
        for i, r in enumerate(rows):
            context[i, : r["context"].shape[0]] = r["context"]
        tensors = {
            "latents": torch.stack([r["latent"] for r in rows]).float().contiguous(),
            "context": context,
            "lengths": torch.tensor([r["context"].shape[0] for r in rows], dtype=torch.int64),
            "rewards": torch.tensor([r["reward"] for r in rows], dtype=torch.float32),
        }
    else:  # every input of the shard was skipped: an empty shard still marks it finished
        tensors = {k: torch.zeros(0) for k in ("latents", "context", "lengths", "rewards")}
    metadata = {
        "samples": str(n),
        "prompts": json.dumps([r["prompt"] for r in rows]),
        "sources": json.dumps([r["source"] for r in rows]),
        "skipped": json.dumps(skipped),
    }
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def shard_metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def write_index(out, num_shards, num_items):
    """index.json and report.json from the shard files (so they also cover earlier, resumed runs)."""
    shards, skipped = [], []
    for i in range(num_shards):
        meta = shard_metadata(shard_path(out, i))
        shards.append({"file": shard_path(out, i).name, "samples": int(meta["samples"])})
        skipped += json.loads(meta["skipped"])
    written = sum(s["samples"] for s in shards)
    _write_json(Path(out) / "index.json", {"samples": written, "shards": shards})
    counts = {reason: sum(s["reason"] == reason for s in skipped) for reason in SKIP_REASONS}
    report = {"inputs": num_items, "written": written, "skipped": counts, "skipped_files": skipped}
    _write_json(Path(out) / "report.json", report)
    return report


# ----------------------------------------------------------------------------- reading


def check_shards(paths):
    """Every shard holds latents of one shape and prompt embeddings of one width (a dataset extended
    with other --size/--frames or another text encoder would otherwise fail mid-training): a
    ValueError naming the odd shard and its shape, read from the headers only."""
    first = None
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in index.json does not exist")
        try:
            with safe_open(path, "pt") as f:
                latent = tuple(f.get_slice("latents").get_shape()[1:])
                width = f.get_slice("context").get_shape()[-1]
        except Exception as err:  # safetensors raises its own error types for torn files and missing keys
            raise ValueError(f"{path}: not a readable prepare_data.py shard (truncated or corrupt?): "
                             f"{type(err).__name__}: {err}") from None
        if first is None:
            first = (path, latent, width)
        elif latent != first[1]:
            raise ValueError(f"{path} has latents of shape {latent}, {first[0].name} has {first[1]}: "
                             f"the shards were made with different --size/--frames; use one setting per dataset")
        elif width != first[2]:
            raise ValueError(f"{path} has prompt embeddings of width {width}, {first[0].name} has width {first[2]}: "
                             f"the shards were made with different text encoders")


class ShardRows:
    """The samples of a dataset folder's shards, read one row at a time ({"latent", "context" (L, C)
    without padding, "reward"}): a 480p x 81-frame latent is 8 MB, so thousands of them are not
    loaded into memory. `flag` names the folder's command-line flag in errors."""

    def __init__(self, folder, flag="--data"):
        path = Path(folder) / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {folder}: no {path.name}; expected a prepare_data.py dataset folder")
        try:
            shards = [(Path(folder) / s["file"], int(s["samples"])) for s in json.loads(path.read_text())["shards"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a prepare_data.py index ({type(err).__name__}: {err})") from None
        self.rows = [(file, r) for file, n in shards for r in range(n)]
        check_shards([file for file, n in shards if n])

    def __len__(self):
        return len(self.rows)

    def sources(self) -> list[str]:
        """Every row's source (the video or latent file prepare_data.py read it from)."""
        out, seen = [], {}
        for path, r in self.rows:
            if path not in seen:
                with safe_open(path, "pt") as f:
                    seen[path] = json.loads(f.metadata()["sources"])
            out.append(seen[path][r])
        return out

    def prompts_and_rewards(self) -> tuple[list[str], list[float]]:
        """Every row's prompt and reward from the shards' metadata and reward tensors (no latents read)."""
        prompts, labels, seen = [], [], {}
        for path, r in self.rows:
            if path not in seen:
                with safe_open(path, "pt") as f:
                    seen[path] = (json.loads(f.metadata()["prompts"]), f.get_tensor("rewards").tolist())
            prompts.append(seen[path][0][r])
            labels.append(seen[path][1][r])
        return prompts, labels

    def __getitem__(self, i):
        path, r = self.rows[i]
        with safe_open(path, "pt") as f:
            length = int(f.get_slice("lengths")[r : r + 1][0])
            return {
                "latent": f.get_slice("latents")[r : r + 1][0],
                "context": f.get_slice("context")[r : r + 1, :length][0],
                "reward": float(f.get_slice("rewards")[r : r + 1][0]),
            }
