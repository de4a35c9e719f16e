"""The ceiling of text-to-image accuracy: how often an image tokenizer's own reconstructions of real test images
pass the drawing checkers (a model that draws through the tokenizer cannot score better than its decoder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..data.digits import load_digit_images
from ..data.shapes import ShapesWorld
from .checkers import DigitClassifier, score_drawn_scene, summarize_drawn_scenes
from .evaluate import EVAL_SEED, _batched

SPLITS = ("test", "compositional", "digits")


@torch.no_grad()
def reconstruct(vq: Any, images: Sequence[Image.Image], batch_size: int = 64) -> list[Image.Image]:
    """Encode ``images`` to codes and decode them back with the VQ image tokenizer ``vq``."""
    out: list[Image.Image] = []
    vq.eval()
    device = next(vq.parameters()).device
    for chunk in _batched(list(images), batch_size):
        pixels = vq.preprocess(chunk).to(device)
        out += vq.to_pil(vq.decode(vq.encode(pixels)).cpu())
    return out


def score_reconstructions(vq: Any, *, splits: Sequence[str] = SPLITS, n: int = 200, batch_size: int = 64,
                          seed: int = EVAL_SEED) -> dict[str, dict]:
    """Per split: the drawing checkers' scores of ``vq``'s reconstructions of the split's real images.

    Shapes splits: ``t2i_all_correct`` and ``t2i_attribute_accuracy`` as `mmdlm eval` reports for drawings (scenes
    drawn from the same seed); digits: ``drawn_digit_accuracy`` of the classifier on reconstructed held-out digits
    (at most ``n``), next to its accuracy on the originals.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {SPLITS}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    results: dict[str, dict] = {}
    for split in splits:
        if split == "digits":
            data = load_digit_images("test")[:n]
            images, labels = [img for img, _ in data], [y for _, y in data]
            clf = DigitClassifier().fit()
            results[split] = {"n": len(data),
                              "drawn_digit_accuracy": clf.score(reconstruct(vq, images, batch_size), labels),
                              "original_digit_accuracy": clf.score(images, labels)}
            continue
        samples = list(ShapesWorld(split, n, seed))
        rebuilt = reconstruct(vq, [s.image for s in samples], batch_size)
        scores = [score_drawn_scene(img, s.scene) for img, s in zip(rebuilt, samples)]
        results[split] = {"n": n, **summarize_drawn_scenes(scores)}
    return results


@torch.no_grad()
def code_locality(vq: Any, far: int = 5) -> dict[str, float]:
    """How local ``vq``'s codes are: one small red circle drawn at the centre of each of the 9 Shapes cells of a
    blank canvas; per drawing, the codes that differ from the blank canvas's, and those of them more than ``far``
    codes (Chebyshev) from the circle's patches, which a local tokenizer leaves alone (the default encoder sees
    40 px, so no code more than 5 codes away from a shape sees it). Means over the 9 drawings."""
    from ..data.shapes import COLORS, IMAGE_SIZE, Scene, Shape, render_scene

    vq.eval()
    device = next(vq.parameters()).device
    h, w = vq.grid_size
    patch, third = IMAGE_SIZE / w, IMAGE_SIZE / 3
    circles = [Shape("circle", "red", "small", cell, (cell % 3 + 0.5) * third, (cell // 3 + 0.5) * third, 9.0,
                     COLORS["red"]) for cell in range(9)]
    images = [render_scene(Scene([]))] + [render_scene(Scene([c])) for c in circles]
    codes = vq.encode(vq.preprocess(images).to(device)).cpu()
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    moved, moved_far = [], []
    for circle, c in zip(circles, codes[1:]):
        lo = [int((v - circle.diameter / 2) // patch) for v in (circle.cx, circle.cy)]
        hi = [int((v + circle.diameter / 2) // patch) for v in (circle.cx, circle.cy)]
        dx = (lo[0] - cols).clamp(min=0) + (cols - hi[0]).clamp(min=0)
        dy = (lo[1] - rows).clamp(min=0) + (rows - hi[1]).clamp(min=0)
        changed = c != codes[0]
        moved.append(int(changed.sum()))
        moved_far.append(int((changed & (torch.maximum(dx, dy) > far)).sum()))
    return {"codes": h * w, "far": far, "moved_by_one_small_shape": sum(moved) / len(moved),
            "moved_far_away": sum(moved_far) / len(moved_far)}


def load_image_tokenizer(name_or_path: str) -> Any:
    """A VQ image tokenizer folder (written by its ``save_pretrained``), or the image tokenizer inside a model
    (bundled name or model folder)."""
    from ..vision.image_tokenizer import CONFIG_NAME, MODEL_TYPE, VQImageTokenizer

    config = Path(name_or_path) / CONFIG_NAME
    if config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE:
        return VQImageTokenizer.from_pretrained(name_or_path)
    from .. import load

    vq = getattr(load(name_or_path).model, "image_tokenizer", None)
    if vq is None:
        raise ValueError(f"{name_or_path}: this model has no image tokenizer (it cannot draw); pass a model that "
                         "draws or an image tokenizer folder (e.g. RUN/image_tokenizer)")
    return vq


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmdlm.eval.reconstruction``: print (and optionally save) the reconstruction ceiling."""
    p = argparse.ArgumentParser(
        prog="python -m mmdlm.eval.reconstruction",
        description="Score an image tokenizer's reconstructions of real test images with the drawing checkers: the "
        "most a model drawing through this tokenizer can reach on `mmdlm eval`'s t2i and drawn-digit metrics.",
        epilog="example: python -m mmdlm.eval.reconstruction runs/shapes-tiny/image_tokenizer --n 200",
    )
    p.add_argument("tokenizer", help="image tokenizer folder, model folder or bundled model name (e.g. shapes-tiny)")
    p.add_argument("--splits", nargs="+", default=["test", "digits"], choices=SPLITS)
    p.add_argument("--n", type=int, default=200, help="scenes per Shapes split and max digits (default 200)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    vq = load_image_tokenizer(args.tokenizer)
    results = score_reconstructions(vq, splits=args.splits, n=args.n)
    for split, r in results.items():
        if split == "digits":
            print(f"digits (n={r['n']}): reconstructions recognised {r['drawn_digit_accuracy']:.1%} "
                  f"(originals {r['original_digit_accuracy']:.1%})")
        else:
            attrs = ", ".join(f"{a} {v:.1%}" for a, v in r["t2i_attribute_accuracy"].items())
            print(f"{split} (n={r['n']}): all attributes right {r['t2i_all_correct']:.1%} ({attrs})")
    results["locality"] = locality = code_locality(vq)
    print(f"locality: one small shape changes {locality['moved_by_one_small_shape']:.1f} of {locality['codes']} "
          f"codes, {locality['moved_far_away']:.1f} of them more than {locality['far']} codes away")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
