"""Drawing decoding sweep: Shapes text-to-image correctness (the eval's checker) for each combination of classifier-free
guidance scale, MaskGIT steps and sampling temperature, on validation scenes: the test split's distribution drawn
at a scene seed of its own (default 1), so that picking a default here does not tune on the report's scenes (seed
12345). Every setting draws the same prompts with the same sampling seeds.

    python benchmarks/drawing_decoding.py --model shapes-tiny --n 300 --guidance-scales 1 2 3.5 5 \\
        --out runs/drawing-decoding/a

``--merge`` joins the settings of runs on the same model, scenes and seeds into one result and plot:

    python benchmarks/drawing_decoding.py --merge runs/drawing-decoding/a/result.json \\
        runs/drawing-decoding/b/result.json --out benchmarks/results/drawing-decoding/read-mix-2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import add_shapes_arguments, print_and_save, save_figure  # noqa: E402

ATTRIBUTES = ("count", "color", "shape", "size", "position")


def binomial_halfwidth(p: float, n: int) -> float:
    """Half-width of a 95% normal-approximation interval of a rate ``p`` measured on ``n`` trials."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def draw_and_score(pipe: Any, samples: Sequence[Any], batch_size: int, seed: int, **drawing: Any) -> dict[str, Any]:
    """Draw every sample's caption (``batch_size`` a call, sampling seeds seed, seed + 1, ...) and score the drawings
    with the eval's Shapes checker; returns all-correct, per-attribute accuracy, all-correct by the number of objects
    asked for and the drawing time."""
    from mmdlm.eval.checkers import score_drawn_scene, summarize_drawn_scenes

    checks, start = [], time.perf_counter()
    for b, first in enumerate(range(0, len(samples), batch_size)):
        chunk = samples[first:first + batch_size]
        images = pipe.generate_image([s.caption for s in chunk], seed=seed + b, **drawing)
        checks += [score_drawn_scene(im, s.scene) for im, s in zip(images, chunk)]
    summary = summarize_drawn_scenes(checks)
    all_correct = summary["t2i_all_correct"]
    return {"all_correct": all_correct, "ci95": binomial_halfwidth(all_correct, len(checks)),
            "attributes": summary["t2i_attribute_accuracy"], "by_objects": summary["t2i_by_objects"],
            "seconds": round(time.perf_counter() - start, 1)}


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """All-correct (with 95% intervals) against the guidance scale, one line per (steps, temperature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    series = sorted({(r["image_steps"], r["temperature"]) for r in rows})
    for i, (steps, temp) in enumerate(series):
        line = sorted((r for r in rows if (r["image_steps"], r["temperature"]) == (steps, temp)),
                      key=lambda r: r["guidance_scale"])
        dx = 0.06 * (i - (len(series) - 1) / 2)  # side by side where series share a guidance scale
        ax.errorbar([r["guidance_scale"] + dx for r in line], [100 * r["all_correct"] for r in line],
                    yerr=[100 * r["ci95"] for r in line], marker="o", capsize=3,
                    label=f"{steps} steps, temperature {temp:g}")
    ax.set(xlabel="classifier-free guidance scale", ylabel="all attributes right (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


SAME_RUN_KEYS = ("model", "split", "scene_seed", "prompts", "sampling_seed", "batch_size")


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of this script on the same model, scenes and seeds: their settings together,
    sorted; a setting measured twice must agree, since the same seeds draw the same images."""
    first = results[0]
    for r in results[1:]:
        differ = [k for k in SAME_RUN_KEYS if r[k] != first[k]]
        if differ:
            raise ValueError(f"cannot merge runs that differ in {differ}: rerun them with the same arguments")
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        for row in r["settings"]:
            key = (row["guidance_scale"], row["image_steps"], row["temperature"])
            if key in rows and rows[key]["all_correct"] != row["all_correct"]:
                raise ValueError(f"setting {key} was measured twice with different results")
            rows.setdefault(key, row)
    return {**{k: first[k] for k in SAME_RUN_KEYS}, "settings": [rows[k] for k in sorted(rows)]}


def _title(result: dict[str, Any]) -> str:
    return (f"{result['model']}: drawing decoding\n({result['split']} split at scene seed {result['scene_seed']}, "
            f"{result['prompts']} prompts)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shapes_arguments(ap, "prompts (scenes of the split; default 100)")
    ap.add_argument("--guidance-scales", type=float, nargs="+", default=[3.5], help="CFG scales (default 3.5)")
    ap.add_argument("--image-steps", type=int, nargs="+", default=[16], help="MaskGIT steps (default 16)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0], help="MaskGIT temperatures (default 1)")
    ap.add_argument("--scene-seed", type=int, default=1,
                    help="seed of the validation scenes (default 1; the eval report's scenes use 12345)")
    ap.add_argument("--batch-size", type=int, default=50, help="prompts drawn per call (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first call (default 0)")
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON", default=None,
                    help="merge these result.json files of earlier runs instead of drawing")
    ap.add_argument("--out", default=None, help="folder for result.json and sweep.png")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else None
    if args.merge:
        result = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
        if out:
            out.mkdir(parents=True, exist_ok=True)
            plot_sweep(result["settings"], out / "sweep.png", _title(result))
        print_and_save(result, str(out / "result.json") if out else None)
        return
    if args.n < 1 or args.batch_size < 1 or min(args.image_steps) < 1:
        ap.error("--n, --batch-size and --image-steps must be positive")
    if min(args.guidance_scales) < 0 or min(args.temperatures) < 0:
        ap.error("--guidance-scales and --temperatures must be >= 0")
    import mmdlm
    from mmdlm.data.shapes import ShapesWorld

    pipe = mmdlm.load(args.model, device="cpu")
    world = ShapesWorld(args.split, args.n, seed=args.scene_seed)
    samples = [world[i] for i in range(args.n)]
    rows = []
    for scale, steps, temp in itertools.product(args.guidance_scales, args.image_steps, args.temperatures):
        row = draw_and_score(pipe, samples, args.batch_size, args.seed,
                             guidance_scale=scale, steps=steps, temperature=temp)
        rows.append({"guidance_scale": scale, "image_steps": steps, "temperature": temp, **row})
        print(f"guidance {scale:g}, {steps} steps, temperature {temp:g}: all correct "
              f"{100 * row['all_correct']:.1f}% ± {100 * row['ci95']:.1f} ({row['seconds']} s)", file=sys.stderr)
    result = {"model": args.model, "split": args.split, "scene_seed": args.scene_seed, "prompts": args.n,
              "sampling_seed": args.seed, "batch_size": args.batch_size, "settings": rows}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        plot_sweep(rows, out / "sweep.png", _title(result))
    print_and_save(result, str(out / "result.json") if out else None)


if __name__ == "__main__":
    main()
