"""What a run shows: the evaluation videos as mp4 files and samples/before_after.png, the same
fixed prompts sampled by the initial and the trained model side by side, labelled with a 3x5
pixel font (no font files, no Pillow)."""

from pathlib import Path

import imageio
import numpy as np
import torch

import rewards


def save_videos(video: torch.Tensor, folder: Path, step: int):
    folder.mkdir(parents=True, exist_ok=True)
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()  # (B, T, H, W, 3)
    for i, f in enumerate(frames):
        imageio.mimwrite(folder / f"step{step:06d}_{i}.mp4", f.numpy(), fps=16)


# 3x5 pixel glyphs (rows top to bottom, "#" = ink) for the labels of before_after.png.
GLYPHS = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..", "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#", "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# #.# ### #.#", "X": "#.# #.# .#. #.# #.#", "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
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
                       height: int = 96, images: torch.Tensor | None = None) -> np.ndarray:
    """One row per prompt: the named colour (word and swatch), then `frames` evenly spaced frames of
    the video before training, then the same frames after. Videos (B, 3, T, H, W) in [-1, 1]; each
    frame is scaled (nearest neighbour) to about `height` pixels. images (B, 3, H, W) in [-1, 1]: an
    image-to-video run's conditioning images, shown first in each row (resized to the frames' size).
    Returns an (H, W, 3) uint8 image."""
    t = before.shape[2]
    picks = torch.linspace(0, t - 1, min(frames, t)).round().long().tolist()
    h, w = before.shape[-2:]
    up = max(1, round(height / h))
    step = max(1, round(h / height))  # large frames are subsampled instead
    fh, fw = len(range(0, h, step)) * up, len(range(0, w, step)) * up
    label_w, gap, top = 60, 8, 16
    image_w = 0 if images is None else fw + 2 + gap  # the conditioning image's column
    width = label_w + image_w + 2 * len(picks) * (fw + 2) + gap
    canvas = np.full((top + len(prompts) * (fh + 4), width, 3), 24, np.uint8)
    if images is not None:
        draw_text(canvas, "image", 4, label_w)
        shown = torch.nn.functional.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False)
    draw_text(canvas, "before", 4, label_w + image_w)
    draw_text(canvas, "after", 4, label_w + image_w + len(picks) * (fw + 2) + gap)
    for row, prompt in enumerate(prompts):
        y = top + row * (fh + 4)
        word = rewards.color_word(prompt)
        if word:
            canvas[y : y + 12, 2 : 14] = tuple(int(255 * c) for c in rewards.PALETTE[word])
            draw_text(canvas, word, y + 16, 2, scale=1 if len(word) > 5 else 2)
        if images is not None:
            canvas[y : y + fh, label_w : label_w + fw] = _pixels(shown[row, :, ::step, ::step], up)
        for k, video in enumerate((before, after)):
            for j, f in enumerate(picks):
                x = label_w + image_w + k * (len(picks) * (fw + 2) + gap) + j * (fw + 2)
                canvas[y : y + fh, x : x + fw] = _pixels(video[row, :, f, ::step, ::step], up)
    return canvas


def _pixels(frame: torch.Tensor, up: int) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H up, W up, 3) uint8, each pixel repeated up x up times."""
    frame = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return frame.permute(1, 2, 0).cpu().numpy().repeat(up, 0).repeat(up, 1)
