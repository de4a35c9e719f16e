"""Handwritten digits: scikit-learn's bundled 8x8 scans (UCI optdigits, 1797 images), upscaled to 64x64 RGB.

Images 0-1499 are the "train" split and 1500-1796 the "test" split; no download is needed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

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


def load_digit_images(split: str) -> list[tuple[Image.Image, int]]:
    """(64x64 RGB image, label 0-9) pairs of the "train" (1500) or "test" (297) split."""
    if split not in DIGIT_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; use one of {tuple(DIGIT_SPLITS)}")
    scans, labels = _digits_arrays()
    sel = DIGIT_SPLITS[split]
    return [(_to_image(s), int(y)) for s, y in zip(scans[sel], labels[sel])]


def digit_caption(label: int) -> str:
    """Caption of a digit image, also used as its drawing prompt: 7 -> "a handwritten digit seven"."""
    if not isinstance(label, (int, np.integer)) or not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be an int in 0..9, got {label!r}")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def digit_examples(split: str, tasks: Sequence[str] = DIGIT_TASKS) -> list[dict]:
    """Training examples for every image of a split: a VQA example (qtype "digit", answer the digit's word),
    a caption example (qtype "caption") and a t2i example, as `tasks` selects."""
    unknown = set(tasks) - set(DIGIT_TASKS)
    if unknown:
        raise ValueError(f"unknown digit tasks {sorted(unknown)}; use any of {DIGIT_TASKS}")
    examples = []
    for image, label in load_digit_images(split):
        if "vqa" in tasks:
            examples.append(understanding_example(image, DIGIT_QUESTION, DIGIT_WORDS[label], "digit"))
        if "caption" in tasks:
            examples.append(understanding_example(image, CAPTION_PROMPT, digit_caption(label), "caption"))
        if "t2i" in tasks:
            examples.append({"task": "t2i", "prompt": digit_caption(label), "image": image})
    return examples
