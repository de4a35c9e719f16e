"""Where Shapes drawings go wrong, object by object: each requested object is paired with a detected one (the eval
checker's matching) and tallied by its requested size and shape, with a confusion matrix of requested against
detected shape ("missed" when nothing was paired with it). Run on a model's drawings of the test prompts (the same
drawings as ``mmdlm eval --splits test --n N`` at the same batch size) or, with ``--reconstructions``, on its image
tokenizer's reconstructions of the real test images: the ceiling of drawing through that tokenizer.
(benchmarks/drawing_failures.py tallies whole scenes instead: failure kinds by the number of objects asked for.)

    python benchmarks/drawing_errors.py --model shapes-tiny --n 100 --out benchmarks/results/drawing-errors/shipped
    python benchmarks/drawing_errors.py --model shapes-tiny --n 1000 --reconstructions \\
        --out benchmarks/results/drawing-errors/reconstructions
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import add_shapes_arguments, print_and_save, save_figure, scene_images  # noqa: E402

SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
DETECTED = SHAPES + ("missed",)


def tally_objects(images: Sequence[Any], scenes: Sequence[Any]) -> dict[str, Any]:
    """Per requested object of each scene: was it found, and with which shape, colour, size and cell.

    Returns ``confusion`` ({size: [requested shape][detected shape or missed] counts}), ``by_size_shape`` (the
    fraction drawn with the right shape, per size and shape), ``by_size`` (per size and for "all": found, and right
    shape / colour / cell / size among all its requested objects) and ``by_objects`` (the fraction of objects drawn with
    every attribute right, by the number of objects in the scene), each with its ``n``.
    """
    from mmdlm.eval.checkers import check_objects, scene_objects

    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes: give one image per scene")
    confusion = {s: np.zeros((len(SHAPES), len(DETECTED)), int) for s in SIZES}
    per_size: dict[str, dict[str, list[bool]]] = {s: {k: [] for k in ("found", "shape", "color", "position", "size")}
                                                  for s in SIZES}
    per_count: dict[int, list[bool]] = {}
    for image, scene in zip(images, scenes):
        wanted = scene_objects(scene)
        for obj, result in zip(wanted, check_objects(image, scene)):
            got, size = result["detected"], obj["size"]
            confusion[size][SHAPES.index(obj["shape"]), DETECTED.index(got["shape"] if got else "missed")] += 1
            for k, checks in per_size[size].items():
                checks.append(result[k])
            per_count.setdefault(len(wanted), []).append(result["all_right"])
    return {
        "confusion": {s: {"rows_requested": list(SHAPES), "columns_detected": list(DETECTED), "counts": m.tolist()}
                      for s, m in confusion.items()},
        "by_size_shape": {s: {shape: _rate(m[i, i], m[i].sum()) for i, shape in enumerate(SHAPES)}
                          for s, m in confusion.items()},
        "by_size": {s: {"n": len(c["found"]), **{k: _rate(sum(v), len(v)) for k, v in c.items()}}
                    for s, c in [*per_size.items(), ("all", {k: per_size["small"][k] + per_size["large"][k]
                                                              for k in per_size["small"]})]},
        "by_objects": {str(k): {"n": len(v), "all_right": _rate(sum(v), len(v))} for k, v in sorted(per_count.items())},
    }


def _rate(hits: int, total: int) -> float | None:
    return float(hits) / total if total else None


def plot_confusion(result: dict[str, Any], path: Path, title: str) -> None:
    """The two confusion matrices (small, large) as heat maps, each row normalised to the requested objects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=120)
    for ax, size in zip(axes, SIZES):
        counts = np.array(result["confusion"][size]["counts"], float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if v > 0.6 else "black")
        ax.set_xticks(range(len(DETECTED)), DETECTED, rotation=30, fontsize=8)
        ax.set_yticks(range(len(SHAPES)), SHAPES, fontsize=8)
        ax.set_xlabel("detected", fontsize=8)
        ax.set_ylabel("requested", fontsize=8)
        ax.set_title(f"{size} ({int(counts.sum())} objects), % of row", fontsize=9)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shapes_arguments(ap, "scenes of the split (default 100)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts drawn per call (default 32, as mmdlm eval)")
    ap.add_argument("--reconstructions", action="store_true",
                    help="score the model's image tokenizer's reconstructions of the real images instead of drawings")
    ap.add_argument("--out", default=None, help="folder for result.json and confusion.png")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        ap.error("--n and --batch-size must be at least 1")

    from mmdlm.data.shapes import ShapesWorld
    from mmdlm.eval.evaluate import EVAL_SEED

    samples = list(ShapesWorld(args.split, args.n, EVAL_SEED))
    start = time.perf_counter()
    images = scene_images(args.model, samples, args.batch_size, EVAL_SEED, args.reconstructions)
    result = {"model": args.model, "split": args.split, "n": args.n,
              "images": "reconstructions" if args.reconstructions else "drawings",
              "seconds": round(time.perf_counter() - start, 1), **tally_objects(images, [s.scene for s in samples])}
    out = Path(args.out) if args.out else None
    print_and_save(result, str(out / "result.json") if out else None)
    if out:
        what = "tokenizer reconstructions" if args.reconstructions else "drawings"
        plot_confusion(result, out / "confusion.png", f"{args.model}: {what} of {args.n} {args.split} scenes")


if __name__ == "__main__":
    main()
