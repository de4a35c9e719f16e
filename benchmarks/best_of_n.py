"""Best of N drawings by the model's own reading (``generate_image(candidates=N)``): for k = 1..N, how often the
reader's pick among a prompt's first k drawings is right by the Shapes checker, beside the first drawing alone and an
oracle that knows which drawings are right (the ceiling of any pick). One run draws N per prompt and gives the curve.

    python benchmarks/best_of_n.py --model shapes-tiny --n 100 --candidates 8 --out benchmarks/results/best-of-n
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import add_shapes_arguments, print_and_save, save_figure  # noqa: E402

ATTRIBUTES = ("count", "color", "shape", "size", "position")


def best_of_k(correct: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """``correct`` and ``scores`` are [prompts, N]. For k = 1..N: the mean correctness of the highest-scored of the
    first k candidates (``picked``; ties go to the earlier one) and of "any of the first k" (``oracle``)."""
    if correct.shape != scores.shape or correct.ndim != 2:
        raise ValueError(f"correct {correct.shape} and scores {scores.shape} must both be [prompts, candidates]")
    rows = np.arange(correct.shape[0])
    picked = [float(correct[rows, scores[:, :k].argmax(1)].mean()) for k in range(1, correct.shape[1] + 1)]
    oracle = [float(correct[:, :k].any(1).mean()) for k in range(1, correct.shape[1] + 1)]
    return {"picked": picked, "oracle": oracle}


def draw_candidates(pipe: Any, prompts: Sequence[str], candidates: int, batch_size: int, seed: int
                    ) -> tuple[list[Any], list[float]]:
    """Draw ``candidates`` images of each prompt (``batch_size`` prompts a call, seeds seed, seed + 1, ...) and read
    each back; returns the drawings and their scores, prompt-major (the pipeline's own order for candidates)."""
    from mmdlm.reading_score import caption_log_likelihoods

    images, scores = [], []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        repeated = [p for p in prompts[start:start + batch_size] for _ in range(candidates)]
        drawn = pipe.generate_image(repeated, seed=seed + b)
        images += drawn
        scores += caption_log_likelihoods(pipe.model, pipe.processor, drawn, repeated)
    return images, scores


def plot_curve(curve: dict[str, list[float]], path: Path, title: str) -> None:
    """all-correct against N for the reader's pick and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, len(curve["picked"]) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(ks, [100 * x for x in curve["oracle"]], "o--", color="gray", label="oracle (any of the N right)")
    ax.plot(ks, [100 * x for x in curve["picked"]], "o-", color="tab:blue", label="the model's own pick")
    ax.set(xlabel="drawings per prompt (N)", ylabel="all attributes right (%)", xticks=ks,
           ylim=(0, max(5.0, 115 * max(curve["oracle"]))))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shapes_arguments(ap, "prompts (scenes of the split; default 100)")
    ap.add_argument("--candidates", type=int, default=8, help="drawings per prompt, N (default 8)")
    ap.add_argument("--batch-size", type=int, default=25, help="prompts drawn per call (default 25)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first call (default 0)")
    ap.add_argument("--out", default=None, help="folder for result.json and curve.png")
    args = ap.parse_args(argv)
    if args.n < 1 or args.candidates < 1 or args.batch_size < 1:
        ap.error("--n, --candidates and --batch-size must be positive")
    import mmdlm
    from mmdlm.data.shapes import ShapesWorld
    from mmdlm.eval.checkers import score_drawn_scene

    pipe = mmdlm.load(args.model, device="cpu")
    world = ShapesWorld(args.split, args.n, seed=0)
    samples = [world[i] for i in range(args.n)]
    start = time.perf_counter()
    images, scores = draw_candidates(pipe, [s.caption for s in samples], args.candidates, args.batch_size, args.seed)
    seconds = time.perf_counter() - start
    checks = [score_drawn_scene(im, samples[i // args.candidates].scene) for i, im in enumerate(images)]
    shape = (args.n, args.candidates)
    correct = np.array([c["all_correct"] for c in checks]).reshape(shape)
    score_array = np.array(scores).reshape(shape)
    curve = best_of_k(correct, score_array)
    pick = score_array.argmax(1)
    by_attribute = {a: {"first": float(np.mean([checks[i * args.candidates][a] for i in range(args.n)])),
                        "picked": float(np.mean([checks[i * args.candidates + int(pick[i])][a]
                                                 for i in range(args.n)]))}
                    for a in ATTRIBUTES}
    result = {"model": args.model, "split": args.split, "prompts": args.n, "candidates": args.candidates,
              "seed": args.seed, "all_correct": curve, "attributes_first_vs_picked": by_attribute,
              "mean_score_right": float(score_array[correct].mean()) if correct.any() else None,
              "mean_score_wrong": float(score_array[~correct].mean()) if (~correct).any() else None,
              "seconds_drawing_and_reading": round(seconds, 1)}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        plot_curve(curve, out / "curve.png", f"{args.model}: best of N by its own reading\n"
                                             f"({args.split} split, {args.n} prompts)")
    print_and_save(result, str(out / "result.json") if out else None)


if __name__ == "__main__":
    main()
