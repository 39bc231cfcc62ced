"""Run plumbing that every script shares: a config dataclass as the command line, the run folder,
atomic files, checkpoints and resume checks, metrics.jsonl and non-finite bookkeeping.

A training script declares one dataclass whose fields are its flags: `name: type = default  # help`.
`parse_config` derives the argparse parser from it (the trailing comment is the flag's --help, a
`Literal[...]` annotation its choices, a standalone comment line the title of the following
group), applies a named preset (a dict of field values) and lets every flag given on the command
line win over it. Files are written to a temporary name, fsync'ed and renamed, so a kill never
leaves half of one; a run folder is never replaced unless the user asks for it.
"""

import argparse
import dataclasses
import inspect
import io
import json
import math
import os
import re
import shutil
import tokenize
import typing
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- atomic files

def atomic_write(path, write):
    """Call write(tmp) on a temporary file beside `path`, fsync it and rename it over `path`;
    on any error the temporary file goes and `path` keeps what it held."""
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


def write_text(path, text: str):
    """A text file, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def finite(obj):
    """obj with every NaN or inf float (in nested dicts, lists and tuples) replaced by None: result
    files stay strict JSON, and a missing value reads as missing, never as a number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_line(obj) -> str:
    """One metrics.jsonl line: strict JSON (non-finite values as null) and a newline."""
    return json.dumps(finite(obj), allow_nan=False) + "\n"


def write_json(path, obj, indent=2):
    write_text(path, json.dumps(finite(obj), indent=indent, allow_nan=False))


def save_torch(path, state):
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# ----------------------------------------------------------------------------- non-finite values

def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


# ----------------------------------------------------------------------------- run folder

def check_out_dir(out_dir, resume, overwrite):
    """A run never silently replaces another: a non-empty --out needs --resume or --overwrite."""
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a run folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise ValueError(f"--out {out_dir} already holds a run; continue it with --resume {out_dir / 'ckpt.pt'}, "
                         f"replace it with --overwrite, or choose another --out")


def clear_run(out_dir, names):
    """--overwrite: the named files and folders of the previous run go before the new one writes
    any, so a new run that stops early never sits next to the old run's results. Others stay."""
    for name in names:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def open_metrics(path, start: int, key: str = "step"):
    """metrics.jsonl for appending: emptied for a new run (start 0); on resume the lines after the
    checkpoint's `start` (which are redone) are dropped, and so is a line a kill tore in half, and so
    is a `record_changes` line at `start` (the resume that wrote it is redone, and records its own)."""
    path = Path(path)
    kept = []
    for line in path.read_text().splitlines() if start and path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}: dropped a torn line ({len(line)} characters)")
            continue
        if record[key] < start or (record[key] == start and "changed" not in record):
            kept.append(line + "\n")  # a "changed" line of the resume step is written again by this resume
    write_text(path, "".join(kept))
    return open(path, "a")


# ----------------------------------------------------------------------------- checkpoints

def read_checkpoint(path, keys, what: str) -> dict:
    """A checkpoint file -> its state dict, or an error that names the file and what is wrong:
    missing, empty, torn, or not a `what` checkpoint (one of `keys` absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file); expected a {what} ckpt.pt")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); expected a {what} ckpt.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises several types for truncated and foreign files
        raise ValueError(f"{path}: not a readable {what} checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not set(keys) <= state.keys():
        raise ValueError(f"{path}: not a {what} checkpoint (expected the keys {', '.join(keys)})")
    return state


def write_checkpoint(path, state: dict, weights: dict, step: int):
    """torch.save(state) atomically, refusing when any tensor of `weights` is non-finite (a good
    checkpoint is never replaced by a poisoned one). A failed write keeps the previous file."""
    bad = nonfinite_tensors(weights)
    if bad:
        raise RuntimeError(f"step {step}: refusing to write {path}: {len(bad)} weight tensors hold NaN or inf "
                           f"(first: {bad[0]})")
    try:
        save_torch(path, state)
    except (OSError, RuntimeError) as e:  # a full disk shows up as "unexpected pos ..." from torch.save
        raise RuntimeError(f"step {step}: could not write the checkpoint {path} (disk full?): {e}; "
                           f"{path} still holds the previous one") from None


def allowed_changes(text: str | None, keys) -> set:
    """--allow-changed "guidance,--align-lr" -> {"guidance", "align_lr"}: the run-defining settings
    (`keys`) a resume may change on purpose; a name that is not one of them is an error."""
    names = {n.strip().lstrip("-").replace("-", "_") for n in (text or "").split(",") if n.strip()}
    unknown = sorted(names - set(keys))
    if unknown:
        raise ValueError(f"--allow-changed {text}: not run-defining settings: {', '.join(unknown)} "
                         f"(those are {', '.join(k.replace('_', '-') for k in keys)})")
    return names


def check_resume(saved: dict, current: dict, path, allowed=()) -> dict:
    """Refuse a checkpoint written under other run-defining settings, naming each difference; the
    keys in `allowed` (--allow-changed) may differ. Keys the checkpoint lacks (it predates them)
    are not compared. -> {key: [old, new]} of the accepted changes."""
    diff = {k: [saved[k], current[k]] for k in current if k in saved and saved[k] != current[k]}
    changed = [f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in diff.items() if k not in allowed]
    if changed:
        raise ValueError(f"{path} was written by a run with other settings: {', '.join(changed)}; "
                         f"resume with the same flags, start a new run in another --out, or accept the change "
                         f"with --allow-changed {','.join(k for k in diff if k not in allowed)}")
    return {k: v for k, v in diff.items() if k in allowed}


def record_changes(metrics, step: int, changed: dict):
    """The settings a resume changed on purpose, one metrics.jsonl line {"step", "changed"}."""
    if changed:
        metrics.write(json_line({"step": step, "changed": changed}))
        metrics.flush()


# ----------------------------------------------------------------------------- config -> command line

def _field_comments(cls) -> tuple[dict, dict]:
    """From the class source: {field: its trailing comment, continued on the comment lines right below
    it whose text is indented ("#     more")} and {field: the standalone comment heading its group}."""
    lines = inspect.getsource(cls).splitlines()
    comments = {tok.start[0] - 1: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
                if tok.type == tokenize.COMMENT}
    helps, groups, title, last = {}, {}, None, None
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        field = re.match(r"    (\w+)\s*:", line)
        if field and indent == 4:
            last = field.group(1)
            groups[last] = title
            helps[last] = comments.get(i, "")
        elif line.strip().startswith("#") and i in comments:
            if last is not None and (indent > 4 or re.match(r"#\s{2,}", line.strip())):  # continues the field's help
                helps[last] = (helps[last] + " " + comments[i]).strip()
            else:
                title, last = comments[i], None
        elif line.strip():
            last = None
    return helps, groups


def _flag_type(annotation):
    """(argparse type, choices, nargs) of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(inner[0])
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        fixed = origin is tuple and Ellipsis not in args
        return args[0], None, len(args) if fixed else "+"
    return annotation, None, None


def build_parser(cls, description: str, presets: dict | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass `cls`. Every flag defaults to
    "not given" (so a preset can fill it); the help shows the field default and each preset's value."""
    helps, groups = {}, {}
    for base in reversed([b for b in cls.__mro__ if dataclasses.is_dataclass(b)]):  # a subclass's comments win
        h, g = _field_comments(base)
        helps.update(h)
        groups.update(g)
    hints = typing.get_type_hints(cls, include_extras=True)
    parser = argparse.ArgumentParser(description=description)
    sections = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        title = groups.get(f.name)
        group = sections.setdefault(title, parser.add_argument_group(title) if title else parser)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = helps.get(f.name, "")
        shown = [f"default {default}"] + [f"{name} {p[f.name]}" for name, p in (presets or {}).items()
                                            if f.name in p and not callable(p[f.name]) and p[f.name] != default]
        flag = "--" + f.name.replace("_", "-")
        kind, choices, nargs = _flag_type(hints[f.name])
        if kind is bool:  # --flag / --no-flag, so a flag a preset turns on can be turned off
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{text} ({'; '.join(shown)})")
        else:
            group.add_argument(flag, type=kind, choices=choices, nargs=nargs, default=argparse.SUPPRESS,
                               help=f"{text} ({'; '.join(shown)})")
    return parser


def parse_config(cls, argv, description: str, presets: dict, choose):
    """argv -> (config, preset names applied). choose(given) names the presets to apply, in order,
    from the flags given; a preset value may be a function of the config built so far. Flags given
    on the command line win over every preset."""
    given = vars(build_parser(cls, description, presets).parse_args(argv))
    names = choose(given)
    values, origin = {}, {}
    for name in names:
        for k, v in presets[name].items():
            values[k] = v(cls(**{**values, **given})) if callable(v) else v
            origin[k] = name
    config = cls(**{**values, **given})
    config.set_by = {k: name for k, name in origin.items() if k not in given}  # for errors: who chose a value
    return config, names


def flag(config, field: str) -> str:
    """A field's command-line flag for an error message, naming the preset that set it when the user did not."""
    name = getattr(config, "set_by", {}).get(field)
    return f"--{field.replace('_', '-')}" + (f" (set by --preset {name})" if name else "")
