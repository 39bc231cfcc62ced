"""Pixel-space video rewards: the interface, the loader for user rewards, and weight-free built-ins.

A reward is any callable fn(video, prompts) -> rewards: video a (B, 3, T, H, W) float tensor in
[-1, 1] (RGB, what the Wan VAE decodes to), prompts a list of B strings, rewards a (B,) tensor, one
scalar per video, higher = better. The LRM regresses exactly this ("VELR: Efficient Video Reward
Feedback via Ensemble Latent Reward Models", OpenReview TctJWv7Suz, §4.1: the target is
R(Dec(z), prompt)); pixel-space ReFL (the memory baseline of VELR §5, Table 1) backpropagates
through it, so for that use it must be differentiable with respect to `video`. Training the LRM
and labelling data only need values.

`load_reward(spec)` turns a command-line `--reward SPEC` into such a callable: a built-in name,
"module:attr" or "path/to/file.py:attr" (its docstring shows a wrapper around a large video reward
model). A user reward's every output is checked (`check_reward_output`). The built-ins, "color",
"sharpness", "smoothness" and "motion", need no weights and no network, are differentiable, map the
video to [0, 1] intensities and return values in [0, 1]; they are toy rewards for tests and the
offline demo, not quality metrics, and each one's docstring states what it measures.

Left out: any learned video reward model (VideoAlign, VideoScore, ...): the user brings one
through `load_reward`.
"""

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import torch

# Named colours, RGB in [0, 1]. The first of these words in a prompt (whole word, any case) is its colour.
PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.6, 0.3, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}
NEUTRAL = 0.5  # the color reward of a prompt that names no colour
_COLOR_WORD = re.compile(r"\b(" + "|".join(PALETTE) + r")\b", re.IGNORECASE)


def unit_range(video: torch.Tensor) -> torch.Tensor:
    """Check the shape and map [-1, 1] to [0, 1] intensities (B, 3, T, H, W), in fp32."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
    return (video.float() + 1) / 2


def _frame_diffs(video: torch.Tensor) -> torch.Tensor:
    x = unit_range(video)
    if x.shape[2] < 2:
        raise ValueError(f"temporal rewards need at least 2 frames, got {x.shape[2]}")
    return x[:, :, 1:] - x[:, :, :-1]  # (B, 3, T-1, H, W)


def color_word(prompt: str):
    """The first palette word in the prompt (lower case), or None."""
    match = _COLOR_WORD.search(prompt)
    return None if match is None else match.group(1).lower()


def prompt_color(prompt: str):
    """The RGB of the first palette word in the prompt, or None."""
    word = color_word(prompt)
    return None if word is None else PALETTE[word]


def color(video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """How well the video's mean colour (over all frames and pixels) matches the colour the prompt
    names: 1 - |mean_rgb - target|^2 / 3, in [0, 1] (1 = exact match, 0 = opposite corner of the
    RGB cube). It sees only the average colour: half red, half blue scores like purple. A prompt
    without a palette word gets NEUTRAL (0.5) with zero gradient."""
    x = unit_range(video)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {x.shape[0]} videos")
    colors = [prompt_color(p) for p in prompts]
    named = torch.tensor([c is not None for c in colors], device=x.device)
    target = x.new_tensor([c or (0.0, 0.0, 0.0) for c in colors])  # (B, 3)
    match = 1 - (x.mean((2, 3, 4)) - target).pow(2).sum(1) / 3  # mean colour (B, 3) vs target
    return torch.where(named, match, torch.full_like(match, NEUTRAL))


def sharpness(video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Spatial detail, prompt-independent: mean |horizontal| and |vertical| difference of
    neighbouring pixel intensities, averaged; 0 for flat frames, lower after blurring, 1 only for a
    one-pixel black/white checkerboard. Noise counts as detail."""
    x = unit_range(video)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3, 4))
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3, 4))
    return (dx + dy) / 2


def smoothness(video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Temporal smoothness, prompt-independent: 1 - mean squared difference between consecutive
    frames' intensities; 1 for a static video (the maximum), 0 for frames flipping black/white."""
    return 1 - _frame_diffs(video).pow(2).mean((1, 2, 3, 4))


def motion(video: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Amount of change, prompt-independent: mean absolute difference between consecutive frames'
    intensities; 0 for a static video, up to 1. Flicker counts as motion."""
    return _frame_diffs(video).abs().mean((1, 2, 3, 4))


BUILTIN = {"color": color, "sharpness": sharpness, "smoothness": smoothness, "motion": motion}


def _import(module: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"reward module file {module} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def _is_factory(obj) -> bool:
    """Callable without arguments: a class or function whose parameters all have defaults."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: treat as the reward itself
        return False
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return not required


def check_reward_output(r, batch: int, name: str = "reward"):
    """r if it is what a reward must return for a batch of `batch` videos (a float tensor of shape
    (batch,)), else a ValueError that states the contract (the scripts print it as one line). Values
    are not checked: a NaN or inf is the caller's to drop and count."""
    contract = f"fn(video, prompts) must return a float tensor of shape (B,) = ({batch},), one scalar per video"
    if not torch.is_tensor(r):
        raise ValueError(f"reward {name!r} returned a {type(r).__name__}; {contract}")
    if not r.is_floating_point():
        raise ValueError(f"reward {name!r} returned a {r.dtype} tensor; {contract}")
    if tuple(r.shape) != (batch,):
        raise ValueError(f"reward {name!r} returned a tensor of shape {tuple(r.shape)}; {contract}")
    return r


class CheckedReward:
    """A user reward whose every output goes through check_reward_output (`fn` is the reward itself)."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, video, prompts):
        return check_reward_output(self.fn(video, prompts), video.shape[0], self.name)


def load_reward(spec: str):
    """A built-in name, "module:attr" or "path/to/file.py:attr" -> reward callable fn(video, prompts) -> (B,).
    User rewards come wrapped in a CheckedReward; built-ins are returned as they are.

    "module:attr": `module` is imported by name (it must be on sys.path, e.g. the working directory);
    "path/to/file.py:attr": the file is imported from its path. `attr` is either the reward callable
    itself (a function or an object with `__call__(video, prompts)`) or a factory: anything callable
    without arguments (a class whose `__init__` needs none, or a function with no required
    parameters) is called once and must return the reward callable. Use a factory when the reward
    loads a model. A wrapper around a large video reward model, e.g. VideoAlign or VideoScore, looks
    like this (`my_rm.py`, run with `--reward my_rm.py:VideoAlignReward`):

        import torch

        class VideoAlignReward:
            def __init__(self):  # called once by load_reward
                self.model = load_videoalign("path/to/checkpoint").eval().requires_grad_(False)

            def __call__(self, video, prompts):
                frames = ((video + 1) / 2).clamp(0, 1)  # this model wants [0, 1] frames
                frames = frames.to(self.model.device, self.model.dtype)
                return self.model.score(frames, prompts).float().flatten()  # (B,), one score per video

    Move the video to the model's device and dtype yourself, resize or subsample frames as the model
    expects, and return one scalar per video. `load_videoalign` / `.score` stand for the model's own
    API. Anything but a float tensor of shape (B,) is an error that says so; non-finite values pass
    (the callers drop and count them)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"reward {spec!r} is neither a built-in {sorted(BUILTIN)} nor 'module:attr'")
    module, attr = spec.rsplit(":", 1)
    try:  # a mistake in the spec is a ValueError (one line from the scripts); errors inside the module are its own
        mod = _import(module)
    except ModuleNotFoundError as err:
        raise ValueError(f"reward {spec!r}: cannot import {module} ({err}); expected a built-in {sorted(BUILTIN)}, "
                         f"'module:attr' or 'path/to/file.py:attr'") from err
    if not hasattr(mod, attr):
        raise ValueError(f"reward module {module} has no attribute {attr!r}")
    obj = getattr(mod, attr)
    fn = obj() if _is_factory(obj) else obj
    if not callable(fn):
        raise ValueError(f"reward {spec} gave {type(fn).__name__}, which is not callable")
    return CheckedReward(fn, spec)
