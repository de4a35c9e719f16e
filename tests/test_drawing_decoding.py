"""benchmarks/drawing_decoding.py: its figure is the eval's drawing figure at the same settings, and its outputs."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("drawing_decoding", ROOT / "benchmarks" / "drawing_decoding.py")
drawing_decoding = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drawing_decoding)


def test_binomial_halfwidth():
    assert drawing_decoding.binomial_halfwidth(0.5, 100) == pytest.approx(0.098)
    assert drawing_decoding.binomial_halfwidth(0.0, 50) == 0.0
    assert drawing_decoding.binomial_halfwidth(0.48, 400) < drawing_decoding.binomial_halfwidth(0.48, 100)


def test_scores_match_the_evaluation_at_the_same_scenes_and_seeds(tiny_pipeline):
    from mmdlm.data.shapes import ShapesWorld
    from mmdlm.eval.evaluate import EVAL_SEED, evaluate_shapes

    drawing = {"guidance_scale": 2.0, "steps": 4, "temperature": 1.0}
    metrics, _ = evaluate_shapes(tiny_pipeline, "test", 6, batch_size=4, drawing=drawing)
    samples = list(ShapesWorld("test", 6, EVAL_SEED))
    row = drawing_decoding.draw_and_score(tiny_pipeline, samples, batch_size=4, seed=EVAL_SEED, **drawing)
    assert row["all_correct"] == metrics["t2i_all_correct"]
    assert row["attributes"] == metrics["t2i_attribute_accuracy"]
    assert row["by_objects"] == metrics["t2i_by_objects"] and set(row["by_objects"]) <= {"1", "2", "3"}


def test_main_sweeps_every_combination_and_writes_the_plot(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mmdlm

    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: tiny_pipeline)
    drawing_decoding.main(["--n", "3", "--guidance-scales", "0", "3", "--image-steps", "2", "4",
                           "--batch-size", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    settings = {(r["guidance_scale"], r["image_steps"], r["temperature"]) for r in result["settings"]}
    assert settings == {(0.0, 2, 1.0), (0.0, 4, 1.0), (3.0, 2, 1.0), (3.0, 4, 1.0)}
    assert result["scene_seed"] == 1 and result["prompts"] == 3
    assert all(set(r["attributes"]) == set(drawing_decoding.ATTRIBUTES) for r in result["settings"])
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(SystemExit):
        drawing_decoding.main(["--image-steps", "0"])


def _result(scales, seed=0, all_correct=0.5):
    rows = [{"guidance_scale": g, "image_steps": 16, "temperature": 1.0, "all_correct": all_correct, "ci95": 0.1,
             "attributes": {a: 0.9 for a in drawing_decoding.ATTRIBUTES}, "seconds": 1.0} for g in scales]
    return {"model": "m", "split": "test", "scene_seed": 1, "prompts": 300, "sampling_seed": seed, "batch_size": 50,
            "settings": rows}


def test_merge_joins_runs_of_the_same_scenes_and_refuses_others(tmp_path, capsys):
    merged = drawing_decoding.merge_results([_result([3.5, 1.0]), _result([0.0, 1.0])])
    assert [r["guidance_scale"] for r in merged["settings"]] == [0.0, 1.0, 3.5]
    with pytest.raises(ValueError, match="sampling_seed"):
        drawing_decoding.merge_results([_result([1.0]), _result([2.0], seed=7)])
    with pytest.raises(ValueError, match="measured twice"):
        drawing_decoding.merge_results([_result([1.0]), _result([1.0], all_correct=0.6)])
    files = []
    for i, scales in enumerate(([2.0], [0.5])):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(_result(scales)))
    drawing_decoding.main(["--merge", *map(str, files), "--out", str(tmp_path / "merged")])
    saved = json.loads((tmp_path / "merged" / "result.json").read_text())
    assert [r["guidance_scale"] for r in saved["settings"]] == [0.5, 2.0]
    assert json.loads(capsys.readouterr().out) == saved
    assert (tmp_path / "merged" / "sweep.png").stat().st_size > 1000
