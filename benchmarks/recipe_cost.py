"""Estimate how long a recipe trains on this machine before running it: train every stage for a few steps (each
step logged), time each kind of step, and scale by the stage's real step count and task mixture.

    python benchmarks/recipe_cost.py configs/shapes-tiny.yaml --cpu                 # 12 probe steps per stage
    python benchmarks/recipe_cost.py configs/experiments/shapes-tiny-max3050.yaml --cpu --probe-steps 20

A stage whose batches hold one task each (``group_by_task``) is costed per task: a drawing batch of shapes-tiny
(~290-token rows) costs several times an understanding batch (~60 tokens), so the mixture sets the cost. The first
probe step of each stage (warm-up, the untrained-baseline eval) is not counted; one-off work (building the data,
the BPE, encoding the t2i images, first steps, the probe's evals and saves) is reported apart, as measured by the
probe. The real run's periodic evals and checkpoints are not in the estimate.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmdlm.training.collators import TASK_IDS  # noqa: E402
from mmdlm.training.mixture import build_mixture  # noqa: E402
from mmdlm.training.recipe import Recipe, VisionPretrainStage, assign_stage_names, load_recipe  # noqa: E402


def probe_recipe(recipe: Recipe) -> Recipe:
    """A copy of ``recipe`` that logs every step and evaluates/saves only where a stage must (its first and last
    step); the step count is capped by ``train(max_steps=...)``."""
    probe = copy.deepcopy(recipe)
    assign_stage_names(probe.stages)
    for stage in probe.stages:
        if hasattr(stage, "steps"):
            stage.log_every, stage.eval_every, stage.save_every = 1, 0, 0
    return probe


def _task_of(row: dict) -> str:
    """The task of a logged step: the one task key of a one-task batch (next-token "<task>_ar" batches count as
    their task), else "mixed"."""
    tasks = {k.removesuffix("_ar") for k in row if k.removesuffix("_ar") in TASK_IDS}
    return tasks.pop() if len(tasks) == 1 else "mixed"


def step_times(rows: list[dict], stage: str, by_task: bool = True) -> dict[str, list[float]]:
    """Seconds of each logged step of ``stage`` but the first (rows logged every step), keyed by the batch's task
    (``by_task``) or all under "mixed"."""
    logged = [r for r in rows if r.get("stage") == stage and "elapsed_s" in r]
    times: dict[str, list[float]] = {}
    for prev, cur in zip(logged, logged[1:]):
        times.setdefault(_task_of(cur) if by_task else "mixed", []).append(cur["elapsed_s"] - prev["elapsed_s"])
    return times


def _probe_seconds(rows: list[dict], stage: str) -> list[float]:
    return [t for ts in step_times(rows, stage).values() for t in ts]


def stage_seconds(steps: int, times: dict[str, list[float]], shares: Optional[dict[str, float]]) -> float:
    """Estimated seconds of ``steps`` steps: the share-weighted mean step time of the tasks (one-task batches), or the
    mean of all probe steps (mixed batches, ``shares=None``)."""
    if shares is None:
        all_times = [t for ts in times.values() for t in ts]
        if not all_times:
            raise ValueError("no probe steps were timed: raise --probe-steps (at least 2)")
        return steps * sum(all_times) / len(all_times)
    missing = [t for t, s in shares.items() if s > 0 and not times.get(t)]
    if missing:
        raise ValueError(f"the probe drew no {' or '.join(missing)} batch: raise --probe-steps")
    return steps * sum(s * sum(times[t]) / len(times[t]) for t, s in shares.items() if s > 0)


def estimate(recipe: Recipe, rows: list[dict], shares_by_stage: dict[str, Optional[dict[str, float]]]) -> list[dict]:
    """One entry per trainable stage: its steps, timed probe steps per task and estimated seconds."""
    out = []
    for stage in assign_stage_names(copy.deepcopy(recipe.stages)):
        if not hasattr(stage, "steps"):
            continue
        shares = shares_by_stage.get(stage.name)
        times = step_times(rows, stage.name, by_task=shares is not None)
        out.append({"stage": stage.name, "steps": stage.steps,
                    "s_per_step": {t: sum(v) / len(v) for t, v in times.items()},
                    "seconds": stage_seconds(stage.steps, times, shares)})
    return out


def batch_shares(recipe: Recipe) -> dict[str, Optional[dict[str, float]]]:
    """The expected task share of a stage's batches where each batch holds one task, else None."""
    mixture, _ = build_mixture(recipe.data, recipe.seed)
    shares: dict[str, Optional[dict[str, float]]] = {}
    for stage in assign_stage_names(copy.deepcopy(recipe.stages)):
        if isinstance(stage, VisionPretrainStage):
            stage = stage.as_denoiser_stage()
        grouped = getattr(stage, "group_by_task", False) or len(getattr(stage, "tasks", None) or []) == 1
        if hasattr(stage, "tasks") and grouped:
            shares[stage.name] = mixture.restricted(stage.tasks).task_shares()
        else:
            shares[stage.name] = None
    return shares


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--probe-steps", type=int, default=12, help="steps trained per stage to time (default 12)")
    p.add_argument("--cpu", action="store_true", help="time the CPU even if a GPU is present")
    p.add_argument("--json", default=None, help="also write the estimate to this JSON file")
    args = p.parse_args(argv)
    if args.probe_steps < 2:
        p.error("--probe-steps must be >= 2 (the first step of each stage is not counted)")
    from mmdlm.training import train

    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="recipe-cost-") as tmp:
        t0 = time.time()
        train(probe_recipe(recipe), output_dir=tmp, max_steps=args.probe_steps, cpu=args.cpu)
        wall = time.time() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line]
    stages = estimate(recipe, rows, batch_shares(recipe))
    timed = sum(t for s in stages for t in _probe_seconds(rows, s["stage"]))
    one_off = max(wall - timed, 0.0)
    lines = [f"# {args.recipe}: estimated training time on this machine ({args.probe_steps} probe steps per stage)",
             "", "| stage | steps | s/step by batch task (probe) | estimate |", "|---|---|---|---|"]
    for s in stages:
        per = ", ".join(f"{t} {v:.2f}" for t, v in sorted(s["s_per_step"].items()))
        lines.append(f"| {s['stage']} | {s['steps']} | {per} | {s['seconds'] / 60:.1f} min |")
    total = sum(s["seconds"] for s in stages)
    lines += ["", f"Steps: {total / 60:.1f} min. One-off work measured by the probe (data, BPE, t2i codes, first "
                  f"steps, evals, saves): {one_off / 60:.1f} min. Total about {(total + one_off) / 60:.0f} min."]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "probe_steps": args.probe_steps,
                                               "stages": stages, "one_off_s": one_off}, indent=1))


if __name__ == "__main__":
    main()
