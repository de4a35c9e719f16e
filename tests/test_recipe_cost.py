"""benchmarks/recipe_cost.py: per-task step times from a probe run's metrics, scaled by steps and task mixture."""

import importlib.util
import json
from pathlib import Path

import pytest

from mmdlm.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("recipe_cost", ROOT / "benchmarks" / "recipe_cost.py")
cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cost)


def _rows(stage, tasks, seconds):
    """Metrics rows logged every step: step i's batch task and duration; the first step takes 100 s (warm-up)."""
    rows, elapsed = [], 0.0
    for i, (task, s) in enumerate(zip(tasks, seconds)):
        elapsed += 100.0 if i == 0 else s
        rows.append({"stage": stage, "step": i + 1, "loss": 1.0, task: 0.5, "elapsed_s": elapsed})
    return rows


def test_a_one_task_batch_stage_is_costed_by_its_task_mixture():
    tasks = ["t2i", "understanding", "t2i", "understanding_ar", "t2i", "understanding"]
    rows = _rows("model", tasks, [0, 1.0, 4.0, 1.0, 4.0, 1.0]) + _rows("other", ["t2i"] * 3, [0, 9.0, 9.0])
    times = cost.step_times(rows, "model")
    assert times == {"understanding": [1.0, 1.0, 1.0], "t2i": [4.0, 4.0]}  # next-token batches count as their task
    shares = {"understanding": 0.4, "t2i": 0.6}
    assert cost.stage_seconds(100, times, shares) == pytest.approx(100 * (0.4 * 1.0 + 0.6 * 4.0))
    # mixed batches: the plain mean of the timed steps
    assert cost.stage_seconds(100, cost.step_times(rows, "model", by_task=False), None) == pytest.approx(
        100 * 11.0 / 5)


def test_a_task_the_probe_never_drew_is_an_error():
    times = cost.step_times(_rows("model", ["t2i"] * 4, [0, 4.0, 4.0, 4.0]), "model")
    with pytest.raises(ValueError, match="no understanding batch: raise --probe-steps"):
        cost.stage_seconds(100, times, {"understanding": 0.4, "t2i": 0.6})


def test_the_probe_logs_every_step_and_leaves_the_recipe_alone():
    recipe = load_recipe(ROOT / "configs" / "shapes-tiny.yaml")
    probe = cost.probe_recipe(recipe)
    trained = [s for s in probe.stages if hasattr(s, "steps")]
    assert trained and all((s.log_every, s.eval_every, s.save_every) == (1, 0, 0) for s in trained)
    assert (recipe.stages[-1].log_every, recipe.stages[-1].eval_every) == (10, 400)


def test_shapes_tiny_denoiser_stages_are_costed_per_task():
    recipe = load_recipe(ROOT / "configs" / "shapes-tiny.yaml")
    shares = cost.batch_shares(recipe)
    assert shares["image_tokenizer"] is None
    assert shares["denoiser1"] == {"understanding": pytest.approx(1.0)}
    assert shares["model"]["t2i"] == pytest.approx(4.0 / 7.0)  # source weights 1.2/1.2/3.0/0.6/1.0


def test_end_to_end_on_the_tiny_recipe(tmp_path):
    out = tmp_path / "cost.json"
    cost.main([str(ROOT / "configs" / "tiny-test.yaml"), "--cpu", "--probe-steps", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    recipe = load_recipe(ROOT / "configs" / "tiny-test.yaml")
    assert [s["stage"] for s in report["stages"]] == ["image_tokenizer", "model"]
    for s, stage in zip(report["stages"], [st for st in recipe.stages if hasattr(st, "steps")]):
        assert s["steps"] == stage.steps and s["seconds"] > 0
        assert s["seconds"] == pytest.approx(stage.steps * s["s_per_step"]["mixed"])
