"""The data part of a training recipe: one dataclass per source kind (Shapes, digits, LLaVA JSON, imagefolder,
tables, plain text) and the mixture that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..data.shapes import QUESTION_TYPES
from .schema import RecipeError, check_positive


@dataclass
class ShapesSource:
    """The procedural Shapes world: the first ``n`` scenes of ``split`` (``mmdlm.data.shapes.shapes_examples``)."""

    type: Literal["shapes"] = "shapes"
    split: str = "train"
    n: int = 1000
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: ["caption", "vqa", "t2i"])
    question_types: Optional[list[str]] = None  # only these questions in "vqa" / "chat" rows (default: all)
    objects: Optional[list[int]] = None  # only the scenes (of the n) with these numbers of objects (default: all)
    weight: float = 1.0


@dataclass
class DigitsSource:
    """scikit-learn's handwritten digits upscaled to 64 px (``mmdlm.data.digits.digit_examples``)."""

    type: Literal["digits"] = "digits"
    split: str = "train"
    tasks: list[str] = field(default_factory=lambda: ["vqa", "caption", "t2i"])
    augment: int = 0  # extra re-scanned copies (rotated, scaled, sheared, shifted) per image for reading rows
    seed: int = 0  # draws of the augmented copies
    # the copies' strokes move outwards by [lo, hi] eighths of a scan pixel (negative: thinner); [0, 0] = unchanged
    augment_stroke: list[int] = field(default_factory=lambda: [0, 0])
    weight: float = 1.0


@dataclass
class LlavaJsonSource:
    """A LLaVA conversation JSON/JSONL file; image paths are relative to ``image_folder``."""

    type: Literal["llava_json"] = "llava_json"
    path: str = ""
    image_folder: Optional[str] = None
    weight: float = 1.0


@dataclass
class ImageFolderSource:
    """``datasets``' imagefolder layout (images + metadata.jsonl); ``task`` is "caption" or "t2i"."""

    type: Literal["imagefolder"] = "imagefolder"
    dir: str = ""
    task: str = "caption"
    split: str = "train"
    text_column: str = "text"
    prompt: Optional[str] = None
    weight: float = 1.0


@dataclass
class TableSource:
    """A JSON/JSONL/Parquet table with an image column and a text column; ``task`` is caption, vqa or t2i."""

    type: Literal["table"] = "table"
    path: str = ""
    image_column: str = "image"
    text_column: str = "text"
    task: str = "caption"
    image_root: Optional[str] = None
    prompt: Optional[str] = None
    question_column: str = "question"
    weight: float = 1.0


@dataclass
class TextSource:
    """Plain text for the text task: a .txt file (one example per non-empty line) or JSON/JSONL records
    holding ``field``."""

    type: Literal["text"] = "text"
    path: str = ""
    field: str = "text"
    weight: float = 1.0


Source = Union[ShapesSource, DigitsSource, LlavaJsonSource, ImageFolderSource, TableSource, TextSource]


@dataclass
class DataRecipe:
    """The training mixture (each source is drawn with probability proportional to its ``weight``), optional
    held-out ``eval_sources`` (their first ``eval_examples`` examples give the eval loss), and what to do with
    an example whose image is missing: ``"error"`` stops before training, ``"skip"`` drops it and reports a count."""

    sources: list[Source] = field(default_factory=list)
    eval_sources: list[Source] = field(default_factory=list)
    eval_examples: int = 64
    on_missing: str = "error"


def check_source(src: Any, path: str) -> None:
    """Value checks of one source (positive weight and size, the path its kind requires)."""
    check_positive(src.weight, f"{path}.weight")
    required = {"llava_json": "path", "imagefolder": "dir", "table": "path", "text": "path"}.get(src.type)
    if required and not getattr(src, required):
        raise RecipeError(f"{path}.{required}: required for a {src.type!r} source")
    if isinstance(src, DigitsSource) and src.augment < 0:
        raise RecipeError(f"{path}.augment: got {src.augment}; use 0 (no copies) or more copies per image")
    if isinstance(src, DigitsSource):
        lo_hi = src.augment_stroke
        if len(lo_hi) != 2 or not -8 <= lo_hi[0] <= lo_hi[1] <= 8:
            raise RecipeError(f"{path}.augment_stroke: got {lo_hi}; use [lo, hi] with -8 <= lo <= hi <= 8 (eighths "
                              "of a scan pixel that the strokes of augmented copies move outwards)")
        if lo_hi != [0, 0] and src.augment == 0:
            raise RecipeError(f"{path}.augment_stroke: needs augment > 0 (it changes the augmented copies only)")
    if isinstance(src, ShapesSource):
        check_positive(src.n, f"{path}.n")
        if src.question_types is not None and (not src.question_types
                                               or not set(src.question_types) <= set(QUESTION_TYPES)):
            raise RecipeError(f"{path}.question_types: got {src.question_types}; choose one or more of "
                              f"{list(QUESTION_TYPES)}, or leave it out for all")
        if src.objects is not None and (not src.objects or not set(src.objects) <= {1, 2, 3}):
            raise RecipeError(f"{path}.objects: got {src.objects}; choose one or more of [1, 2, 3] (objects in a "
                              "scene), or leave it out for all")
