"""Handwritten digits: scikit-learn's bundled 8x8 scans (UCI optdigits, 1797 images), upscaled to 64x64 RGB.

Images 0-1499 are the "train" split and 1500-1796 the "test" split; no download is needed. ``augment_scan`` makes
new scans of the same digit (small rotation, scale, shear and shift) for training.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from .shapes import CAPTION_PROMPT, IMAGE_SIZE, understanding_example

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_QUESTION = "what digit is this?"
DIGIT_SPLITS: dict[str, slice] = {"train": slice(0, 1500), "test": slice(1500, None)}
DIGIT_TASKS = ("vqa", "caption", "t2i")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] as dark ink on white, labels [N]) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ink = bunch.images / 16.0  # pixel values are 0..16, 16 = full ink
    paper = np.clip(np.round(255.0 * (1.0 - ink)), 0, 255).astype(np.uint8)
    return paper, bunch.target.astype(int)


def _to_image(scan: np.ndarray) -> Image.Image:
    # Bicubic on the float image gives smooth strokes; clipping removes the overshoot.
    big = Image.fromarray(scan.astype(np.float32)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    arr = np.clip(np.asarray(big), 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def augment_scan(scan: np.ndarray, rng: np.random.Generator, *, max_rotate: float = 12.0,
                 scale: tuple[float, float] = (0.88, 1.05), max_shear: float = 0.15,
                 max_shift: float = 0.6, stroke: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A new 8x8 scan of the digit in ``scan`` (uint8 paper values, 255 = white): the scan upscaled 8x, moved by a
    random affine map (rotation in degrees, scale, shear, shift in scan pixels), then block-averaged back to 8x8.
    ``stroke`` = (lo, hi) also moves the ink's edges outwards by a whole number of upscaled pixels drawn from
    [lo, hi] (eighths of a scan pixel; negative thins the strokes), as another pen would; (0, 0) draws nothing,
    so copies made without it stay the same.

    Working on the scan rather than on the 64-px image keeps augmented images in the test images' form (a bicubic
    upscale of an 8x8 grid aligned with the image), so the reader does not learn a difference between the two.
    """
    if scan.shape != (8, 8):
        raise ValueError(f"expected an 8x8 scan, got shape {scan.shape}")
    up = 8
    hi = Image.fromarray(scan.astype(np.float32)).resize((8 * up, 8 * up), Image.Resampling.BICUBIC)
    angle = np.deg2rad(rng.uniform(-max_rotate, max_rotate))
    s = rng.uniform(*scale)
    shear = rng.uniform(-max_shear, max_shear)
    shift = rng.uniform(-max_shift, max_shift, size=2) * up
    # Forward map about the centre: x' = c + A (x - c) + t, with A = s * R(angle) @ [[1, shear], [0, 1]].
    cos, sin = np.cos(angle), np.sin(angle)
    a = s * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    c = np.array([4.0 * up, 4.0 * up])
    inv = np.linalg.inv(a)  # PIL wants the map from output to input pixels
    offset = c - inv @ (c + shift)
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    moved = hi.transform(hi.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                         fillcolor=255.0)
    lo, high = stroke
    if lo > high:
        raise ValueError(f"stroke must be (lo, hi) with lo <= hi, got {stroke}")
    if (lo, high) != (0, 0):
        r = int(rng.integers(lo, high + 1))
        if r:  # ink is dark: a min filter widens it, a max filter narrows it
            size = 2 * abs(r) + 1
            moved = moved.filter(ImageFilter.MinFilter(size) if r > 0 else ImageFilter.MaxFilter(size))
    ink = 255.0 - np.asarray(moved, dtype=np.float32).reshape(8, up, 8, up).mean(axis=(1, 3))
    # Averaging blurs strokes lighter; restore the scan's darkest ink so the copy is not a fainter digit.
    ink *= (255.0 - float(scan.min())) / max(float(ink.max()), 1.0)
    return np.clip(np.round(255.0 - ink), 0, 255).astype(np.uint8)


def _split_scans(split: str) -> list[tuple[np.ndarray, int]]:
    """(8x8 scan, label) pairs of a split."""
    if split not in DIGIT_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; use one of {tuple(DIGIT_SPLITS)}")
    scans, labels = _digits_arrays()
    sel = DIGIT_SPLITS[split]
    return [(s, int(y)) for s, y in zip(scans[sel], labels[sel])]


def load_digit_images(split: str) -> list[tuple[Image.Image, int]]:
    """(64x64 RGB image, label 0-9) pairs of the "train" (1500) or "test" (297) split."""
    return [(_to_image(s), y) for s, y in _split_scans(split)]


def digit_caption(label: int) -> str:
    """Caption of a digit image, also used as its drawing prompt: 7 -> "a handwritten digit seven"."""
    if not isinstance(label, (int, np.integer)) or not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be an int in 0..9, got {label!r}")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def digit_examples(split: str, tasks: Sequence[str] = DIGIT_TASKS, *, augment: int = 0,
                   seed: int = 0, stroke: tuple[int, int] = (0, 0)) -> list[dict]:
    """Training examples for every image of a split: a VQA example (qtype "digit", answer the digit's word),
    a caption example (qtype "caption") and a t2i example, as `tasks` selects.

    ``augment`` > 0 adds that many :func:`augment_scan` copies of each image to the reading examples (VQA and
    caption; drawing keeps the real scans), drawn deterministically from ``seed``, with ``stroke`` as in
    :func:`augment_scan`.
    """
    unknown = set(tasks) - set(DIGIT_TASKS)
    if unknown:
        raise ValueError(f"unknown digit tasks {sorted(unknown)}; use any of {DIGIT_TASKS}")
    if not isinstance(augment, int) or augment < 0:
        raise ValueError(f"augment must be a whole number >= 0 (copies per image), got {augment!r}")
    rng = np.random.default_rng(seed)
    examples = []
    for scan, label in _split_scans(split):
        image = _to_image(scan)
        reads = [image] + [_to_image(augment_scan(scan, rng, stroke=stroke)) for _ in range(augment)]
        for read in reads:
            if "vqa" in tasks:
                examples.append(understanding_example(read, DIGIT_QUESTION, DIGIT_WORDS[label], "digit"))
            if "caption" in tasks:
                examples.append(understanding_example(read, CAPTION_PROMPT, digit_caption(label), "caption"))
        if "t2i" in tasks:
            examples.append({"task": "t2i", "prompt": digit_caption(label), "image": image})
    return examples
