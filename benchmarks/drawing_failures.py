"""Where Shapes drawings fail, scene by scene: each prompt's drawing sorted into right, fewer or more objects than
asked, or which attributes are wrong, by the number of objects asked for; and per requested object, the colours and
shapes drawn in place of the ones asked (and how many of them another object of the prompt asks for) and the objects
not drawn at all. Drawn with the model's default sampler on validation scenes (scene seed 1, as
benchmarks/drawing_decoding.py; the same batches and sampling seeds, so the all-correct figure is that script's at
the model's default settings). benchmarks/drawing_errors.py tallies objects instead, by requested size and shape,
on the report's scenes.

    python benchmarks/drawing_failures.py --model shapes-tiny --n 300 --out runs/drawing-failures

``--reconstructions`` tallies the model's image tokenizer's reconstructions of the real scenes instead: the failures
that drawing through that tokenizer cannot avoid.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import add_shapes_arguments, print_and_save, save_figure, scene_images  # noqa: E402

OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")


def classify_drawing(score: dict[str, Any]) -> str:
    """One drawing's failure kind from its `score_drawn_scene` result: "right", "fewer objects", "more objects", or
    "wrong " and the attributes some requested object has wrong ("wrong color+shape")."""
    if score["all_correct"]:
        return "right"
    found, asked = len(score["detected"]), score["requested"]
    if found != asked:
        return "fewer objects" if found < asked else "more objects"
    return "wrong " + "+".join(a for a in OBJECT_ATTRIBUTES if score[a] < 1)


def tally_failures(scenes: Sequence[Any], images: Sequence[Any]) -> dict[str, Any]:
    """Score each drawing against its scene with the eval's checker and count failure kinds by the number of objects
    asked for, colour and shape confusions (asked -> drawn, among paired objects; how many of the wrong ones another
    object of the prompt asks for) and objects not drawn."""
    from mmdlm.eval.checkers import check_objects, score_drawn_scene

    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    confusions = {"color": collections.Counter(), "shape": collections.Counter()}
    # A wrong colour that another object of the prompt asks for was bound to the wrong object; any other is the
    # object's own colour drawn badly.
    borrowed = {"color": 0, "shape": 0}
    missing: collections.Counter = collections.Counter()
    objects = 0
    for scene, image in zip(scenes, images, strict=True):
        score = score_drawn_scene(image, scene)
        kinds[str(score["requested"])][classify_drawing(score)] += 1
        for j, (want, got) in enumerate(zip(scene.shapes, check_objects(image, scene))):
            objects += 1
            if got["detected"] is None:
                missing[want.shape] += 1
                continue
            for attr, counter in confusions.items():
                if not got[attr]:
                    drawn = got["detected"][attr]
                    counter[f"{getattr(want, attr)} -> {drawn}"] += 1
                    borrowed[attr] += any(getattr(o, attr) == drawn for i, o in enumerate(scene.shapes) if i != j)
    prompts = sum(sum(c.values()) for c in kinds.values())
    return {
        "all_correct": sum(c["right"] for c in kinds.values()) / prompts if prompts else float("nan"),
        "by_objects": {k: {"prompts": sum(c.values()), **dict(c.most_common())} for k, c in sorted(kinds.items())},
        "objects": objects,
        "missing_objects": dict(missing.most_common()),
        "color_confusions": dict(confusions["color"].most_common()),
        "shape_confusions": dict(confusions["shape"].most_common()),
        "borrowed_from_another_object": borrowed,
    }


def plot_failures(result: dict[str, Any], path: Path) -> None:
    """Stacked bars: the share of each failure kind among the prompts of each number of objects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["by_objects"]
    kinds = sorted({k for g in groups.values() for k in g if k not in ("prompts", "right")},
                   key=lambda k: -sum(g.get(k, 0) for g in groups.values()))
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    bottom = [0.0] * len(groups)
    failure_colors = [c for i, c in enumerate(plt.cm.tab10.colors) if i != 2]  # tab10's green is kept for "right"
    for i, kind in enumerate(["right", *kinds]):
        share = [100 * g.get(kind, 0) / g["prompts"] for g in groups.values()]
        color = plt.cm.tab10.colors[2] if kind == "right" else failure_colors[(i - 1) % len(failure_colors)]
        ax.bar(list(groups), share, bottom=bottom, label=kind, color=color)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set(xlabel="objects asked for", ylabel="prompts (%)")
    what = "tokenizer reconstructions" if result.get("images") == "reconstructions" else "drawings"
    ax.set_title(f"{result['model']}: Shapes {what} by outcome ({result['prompts']} validation prompts)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shapes_arguments(ap, "prompts (scenes of the split; default 100)")
    ap.add_argument("--scene-seed", type=int, default=1,
                    help="seed of the validation scenes (default 1; the eval report's scenes use 12345)")
    ap.add_argument("--batch-size", type=int, default=50, help="prompts drawn per call (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first call (default 0)")
    ap.add_argument("--reconstructions", action="store_true",
                    help="tally the image tokenizer's reconstructions of the real scenes instead of drawings")
    ap.add_argument("--out", default=None, help="folder for result.json and failures.png")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        ap.error("--n and --batch-size must be positive")
    from mmdlm.data.shapes import ShapesWorld

    world = ShapesWorld(args.split, args.n, seed=args.scene_seed)
    samples = [world[i] for i in range(args.n)]
    start = time.perf_counter()
    images = scene_images(args.model, samples, args.batch_size, args.seed, args.reconstructions, device="cpu")
    result = {"model": args.model, "images": "reconstructions" if args.reconstructions else "drawings",
              "split": args.split, "scene_seed": args.scene_seed, "prompts": args.n,
              "sampling_seed": args.seed, "batch_size": args.batch_size,
              **tally_failures([s.scene for s in samples], images),
              "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        plot_failures(result, out / "failures.png")
    print_and_save(result, str(out / "result.json") if out else None)


if __name__ == "__main__":
    main()
