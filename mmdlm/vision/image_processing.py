"""Image loading (any common file/mode -> PIL RGB) and the LLaVA-style image processor (pad / resize / anyres)."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray, memoryview]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# loading


def _check_size(size: tuple[int, int], where: str, max_pixels: int, min_side: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageLoadError(
            f"{where} is {w}x{h} = {w * h:,} pixels, more than max_pixels={max_pixels:,}; "
            "downscale it first or pass a larger max_pixels"
        )
    if min(w, h) < min_side:
        raise ImageLoadError(
            f"{where} is {w}x{h}, smaller than min_side={min_side} on a side; such an image carries no usable content"
        )


def _int_image_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale: rescale to 8 bits instead of PIL's clipping (which turns most of a
    16-bit image pure white)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr8 = arr.astype(np.float64) / 257.0
    elif img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        arr8 = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    else:  # "I": 32-bit ints, often a 16-bit PNG decoded by older Pillow; only rescale when values exceed 8 bits
        arr8 = arr.astype(np.float64)
        if arr8.size and arr8.max() > 255:
            arr8 = arr8 / 257.0
    arr8 = np.clip(np.round(arr8), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return _int_image_to_rgb(img)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageLoadError(
            f"numpy image has shape {arr.shape}; expected HxW, HxWx3 or HxWx4 (channels last). "
            "For a CxHxW array use arr.transpose(1, 2, 0)"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageLoadError("float numpy image contains NaN or infinity")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageLoadError(
                f"float numpy image has values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]. "
                "Undo any normalisation, or pass uint8 values in [0, 255]"
            )
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageLoadError(f"numpy image has dtype {arr.dtype}; expected uint8 in [0, 255] or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(arr))  # 2-D -> L, HxWx3 -> RGB, HxWx4 -> RGBA


def _decode(img: Image.Image, where: str, max_pixels: int, min_side: int) -> Image.Image:
    """Check the header size, force a full decode, apply EXIF orientation and convert to RGB."""
    _check_size(img.size, where, max_pixels, min_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{where} is refused by Pillow as a decompression bomb ({e})") from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{where} is corrupt or truncated and cannot be decoded ({type(e).__name__}: {e})") from e
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make an otherwise good image unusable
        oriented = img
    rgb = _to_rgb(oriented if oriented is not None else img)
    _check_size(rgb.size, where, max_pixels, min_side)
    return rgb


def _open_and_decode(fp: Any, where: str, max_pixels: int, min_side: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(
            f"{where} is too large ({e}); max_pixels={max_pixels:,}. Downscale the image before loading it"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(
            f"{where} is not an image Pillow can read (supported: PNG, JPEG, WebP, GIF, BMP, ...)"
        ) from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{where} could not be opened as an image ({type(e).__name__}: {e})") from e
    with img:
        return _decode(img, where, max_pixels, min_side)


def load_image(image: ImageInput, *, max_pixels: int = 40_000_000, min_side: int = 4) -> Image.Image:
    """Load ``image`` (path, PIL image, numpy array, raw bytes or a binary file object) as an RGB PIL image.

    Transparency is composited onto white, EXIF orientation is applied, GIF/WebP animations give their first
    frame. Raises :class:`ImageLoadError` with a readable reason for anything that is not a usable image.
    """
    if isinstance(image, Image.Image):
        return _decode(image, f"PIL image ({image.mode})", max_pixels, min_side)
    if isinstance(image, np.ndarray):
        img = _array_to_pil(image)
        return _decode(img, f"numpy image {image.shape}", max_pixels, min_side)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageLoadError("image bytes are empty")
        return _open_and_decode(io.BytesIO(data), f"image bytes ({len(data)} bytes)", max_pixels, min_side)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.exists():
            raise ImageLoadError(f"image file {str(path)!r} does not exist; check the path")
        if path.is_dir():
            raise ImageLoadError(f"{str(path)!r} is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"image file {str(path)!r} is empty (0 bytes)")
        return _open_and_decode(path, f"image file {str(path)!r}", max_pixels, min_side)
    if hasattr(image, "read"):
        return _open_and_decode(image, "image file object", max_pixels, min_side)
    raise ImageLoadError(
        f"cannot load an image from {type(image).__name__}; pass a path, PIL.Image, numpy array (HxW[xC]) or bytes"
    )


# --------------------------------------------------------------------------------------------------------------------
# geometry


def expand_to_square(img: Image.Image, background_rgb: Sequence[int]) -> Image.Image:
    """Pad ``img`` to a square with ``background_rgb``, keeping it centred (LLaVA's ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(c) for c in background_rgb))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def resize_keep_aspect(
    img: Image.Image, size: int | tuple[int, int], resample: str = "bicubic"
) -> Image.Image:
    """Resize so the image fits inside ``size`` (an int bounds the longer side, a (w, h) bounds both) keeping its
    aspect ratio; each side is at least 1 pixel."""
    box_w, box_h = (size, size) if isinstance(size, int) else size
    w, h = img.size
    scale = min(box_w / w, box_h / h)
    new_w, new_h = max(1, min(box_w, round(w * scale))), max(1, min(box_h, round(h * scale)))
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _RESAMPLE[resample])


def parse_grid_pinpoints(grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int) -> list[tuple[int, int]]:
    """Turn LLaVA's ``image_grid_pinpoints`` into pixel (w, h) resolutions.

    ``"(1x1),...,(3x3)"`` expands to every (i*patch, j*patch) for i, j in 1..3 (LLaVA-OneVision); ``"(1x1),(1x2)"``
    lists grids explicitly; a list of (w, h) pairs is taken as pixel sizes.
    """
    if isinstance(grid_pinpoints, str):
        grids = [(int(a), int(b)) for a, b in re.findall(r"\((\d+)\s*x\s*(\d+)\)", grid_pinpoints)]
        if not grids:
            raise ValueError(f"cannot parse image_grid_pinpoints {grid_pinpoints!r}; expected e.g. '(1x1),...,(3x3)'")
        if "..." in grid_pinpoints:
            (i0, j0), (i1, j1) = grids[0], grids[-1]
            grids = [(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
        out = [(i * patch_size, j * patch_size) for i, j in grids]
    else:
        out = [(int(p[0]), int(p[1])) for p in grid_pinpoints]
    if not out or any(w <= 0 or h <= 0 for w, h in out):
        raise ValueError(f"image_grid_pinpoints {grid_pinpoints!r} must name at least one positive resolution")
    return out


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """Pick the (w, h) that keeps the most of the original's pixels after an aspect-preserving fit, then wastes the
    fewest padded pixels (LLaVA-NeXT's rule)."""
    ow, oh = original_size
    best, best_eff, best_waste = None, -1, float("inf")
    for w, h in possible_resolutions:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        effective = min(dw * dh, ow * oh)
        waste = w * h - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), effective, waste
    if best is None:
        raise ValueError("possible_resolutions is empty")
    return best


def anyres_grid_shape(
    image_size_wh: tuple[int, int], grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """Number of crops (columns, rows) that anyres tiling gives an image of ``image_size_wh`` (LLaVA's
    ``get_anyres_image_grid_shape``; ``patch_size`` is the tower's input size)."""
    w, h = select_best_resolution(image_size_wh, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return w // patch_size, h // patch_size


def _resize_and_pad(img: Image.Image, target_wh: tuple[int, int], background_rgb: Sequence[int]) -> Image.Image:
    tw, th = target_wh
    w, h = img.size
    scale = min(tw / w, th / h)
    new_w, new_h = min(tw, max(1, round(w * scale))), min(th, max(1, round(h * scale)))
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (tw, th), tuple(int(c) for c in background_rgb))
    canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def process_anyres_image(
    img: Image.Image,
    image_size: int,
    grid_pinpoints: str | Sequence[Sequence[int]],
    background_rgb: Sequence[int] = (0, 0, 0),
    resample: str = "bicubic",
) -> list[Image.Image]:
    """LLaVA-OneVision anyres views: the whole image resized to ``image_size`` first, then the ``image_size`` crops
    of the image fitted (and padded) into its best grid resolution, row by row."""
    best = select_best_resolution(img.size, parse_grid_pinpoints(grid_pinpoints, image_size))
    padded = _resize_and_pad(img, best, background_rgb)
    crops = [
        padded.crop((x, y, x + image_size, y + image_size))
        for y in range(0, best[1], image_size)
        for x in range(0, best[0], image_size)
    ]
    base = img.resize((image_size, image_size), _RESAMPLE[resample])
    return [base] + crops


# --------------------------------------------------------------------------------------------------------------------
# processor


class MMDLMImageProcessor:
    """Turns images into normalised ``pixel_values`` for a vision tower (LLaVA's ``process_images``)."""

    _FIELDS = ("image_size", "image_mean", "image_std", "aspect_ratio", "image_grid_pinpoints", "resample")

    def __init__(
        self,
        image_size: int = 64,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        aspect_ratio: str = "pad",
        image_grid_pinpoints: str | Sequence[Sequence[int]] | None = None,
        resample: str = "bicubic",
    ):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        mean, std = [float(x) for x in image_mean], [float(x) for x in image_std]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (R, G, B); got {image_mean!r} and {image_std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"image_std values must be positive, got {image_std!r}")
        if aspect_ratio not in ("pad", "resize") and not re.fullmatch(r"anyres(_max_\d+)?", str(aspect_ratio)):
            raise ValueError(f"aspect_ratio must be 'pad', 'resize' or 'anyres' (or 'anyres_max_N'), got {aspect_ratio!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        if aspect_ratio.startswith("anyres") and image_grid_pinpoints is None:
            image_grid_pinpoints = "(1x1),...,(3x3)"
        if image_grid_pinpoints is not None:
            parse_grid_pinpoints(image_grid_pinpoints, image_size)  # validate early
            if not isinstance(image_grid_pinpoints, str):
                image_grid_pinpoints = [[int(p[0]), int(p[1])] for p in image_grid_pinpoints]
        self.image_size = image_size
        self.image_mean, self.image_std = tuple(mean), tuple(std)
        self.aspect_ratio = aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints
        self.resample = resample

    @property
    def is_anyres(self) -> bool:
        return self.aspect_ratio.startswith("anyres")

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The mean colour as 0..255 ints: padding with it becomes ~0 after normalisation."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    def num_views(self, image_size_wh: tuple[int, int]) -> int:
        """How many ``image_size`` views an image of this (w, h) becomes (1 unless anyres)."""
        if not self.is_anyres:
            return 1
        cols, rows = anyres_grid_shape(image_size_wh, self.image_grid_pinpoints, self.image_size)
        return 1 + cols * rows

    def _to_tensor(self, views: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in views]) / 255.0
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def _views(self, img: Image.Image) -> list[Image.Image]:
        size, rs = (self.image_size, self.image_size), _RESAMPLE[self.resample]
        if self.aspect_ratio == "pad":
            return [expand_to_square(img, self.background_rgb).resize(size, rs)]
        if self.aspect_ratio == "resize":
            return [img.resize(size, rs)]
        return process_anyres_image(img, self.image_size, self.image_grid_pinpoints, resample=self.resample)

    def __call__(self, images: ImageInput | Sequence[ImageInput], return_tensors: str | None = "pt") -> dict:
        """Process one image or a list of them.

        Returns ``{"pixel_values", "image_sizes"}``: a float tensor [N, 3, S, S] (pad/resize) or, for anyres, a list
        with one [1 + n_crops, 3, S, S] tensor per image; ``image_sizes`` are the loaded (w, h).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given; pass one image or a non-empty list")
        pil = [load_image(im) for im in batch]
        per_image = [self._to_tensor(self._views(im)) for im in pil]
        pixel_values: Any = per_image if self.is_anyres else torch.cat(per_image, dim=0)
        return {"pixel_values": pixel_values, "image_sizes": [im.size for im in pil]}

    def to_dict(self) -> dict:
        """JSON-serialisable settings (what ``preprocessor_config.json`` holds)."""
        d = {"image_processor_type": type(self).__name__}
        for k in self._FIELDS:
            v = getattr(self, k)
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``preprocessor_config.json`` into ``save_directory`` (atomically); returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, PREPROCESSOR_CONFIG_NAME)
        fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=".preprocessor_config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MMDLMImageProcessor":
        """Load from a directory holding ``preprocessor_config.json`` (or the JSON file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / PREPROCESSOR_CONFIG_NAME
        if not p.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG_NAME} at {str(p)!r}; save one with save_pretrained()")
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        unknown = set(d) - set(cls._FIELDS) - {"image_processor_type"}
        if unknown:
            warnings.warn(f"ignoring unknown keys in {p}: {sorted(unknown)}", stacklevel=2)
        return cls(**{k: d[k] for k in cls._FIELDS if k in d})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._FIELDS)
        return f"{type(self).__name__}({args})"
