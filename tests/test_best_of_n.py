"""benchmarks/best_of_n.py: the best-of-k curve, the drawing order it shares with the pipeline, and its outputs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("best_of_n", ROOT / "benchmarks" / "best_of_n.py")
best_of_n = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(best_of_n)


def test_best_of_k_follows_the_scores_and_the_oracle_any():
    correct = np.array([[False, True, False], [False, False, True], [True, False, False]])
    scores = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [-1.0, 0.0, 3.0]])
    curve = best_of_n.best_of_k(correct, scores)
    # k=1: first drawings (1 of 3 right); k=2: picks 1, 0, 1 -> only row 0 right; k=3: picks 1, 0, 2 -> row 0
    assert curve["picked"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert curve["oracle"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="prompts, candidates"):
        best_of_n.best_of_k(correct, scores[:, :2])


def test_candidates_are_drawn_and_scored_as_the_pipeline_does(tiny_pipeline):
    prompts = ["a large red circle at the center.", "a small blue square at the top."]
    images, scores = best_of_n.draw_candidates(tiny_pipeline, prompts, candidates=3, batch_size=2, seed=4)
    assert len(images) == len(scores) == 6
    picked = tiny_pipeline.generate_image(prompts, seed=4, candidates=3)
    assert tiny_pipeline.last_image_scores == [scores[:3], scores[3:]]
    for i, im in enumerate(picked):
        assert np.array_equal(np.asarray(im), np.asarray(images[3 * i + int(np.argmax(scores[3 * i:3 * i + 3]))]))


def test_main_writes_the_result_and_the_plot(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mmdlm

    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: tiny_pipeline)
    best_of_n.main(["--n", "3", "--candidates", "2", "--batch-size", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["prompts"], result["candidates"]) == (3, 2)
    assert len(result["all_correct"]["picked"]) == len(result["all_correct"]["oracle"]) == 2
    assert all(p <= o for p, o in zip(result["all_correct"]["picked"], result["all_correct"]["oracle"]))
    assert set(result["attributes_first_vs_picked"]) == set(best_of_n.ATTRIBUTES)
    with Image.open(tmp_path / "curve.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
