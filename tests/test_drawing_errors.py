"""benchmarks/drawing_errors.py: the per-object tally of Shapes drawings against their prompts, and its outputs."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from mmdlm.data.shapes import ShapesWorld
from mmdlm.eval.checkers import detect_shapes, match_objects, scene_objects

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("drawing_errors", ROOT / "benchmarks" / "drawing_errors.py")
drawing_errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drawing_errors)


@pytest.fixture(scope="module")
def scenes():
    return list(ShapesWorld("test", 40, 3))


def test_match_objects_pairs_the_most_agreeing_objects_one_to_one():
    wanted = [{"color": "red", "shape": "circle", "size": "large", "cell": 0},
              {"color": "blue", "shape": "square", "size": "small", "cell": 4}]
    found = [{"color": "blue", "shape": "diamond", "size": "small", "cell": 4},
             {"color": "red", "shape": "circle", "size": "large", "cell": 1},
             {"color": "gray", "shape": "circle", "size": "small", "cell": 8}]
    assert sorted(match_objects(found, wanted)) == [(0, 1), (1, 0)]
    assert match_objects([], wanted) == [] and match_objects(found, []) == []


def test_real_renders_tally_as_drawn_right(scenes):
    result = drawing_errors.tally_objects([s.image for s in scenes], [s.scene for s in scenes])
    objects = sum(len(s.scene.shapes) for s in scenes)
    counts = {size: result["confusion"][size]["counts"] for size in drawing_errors.SIZES}
    assert sum(sum(map(sum, c)) for c in counts.values()) == objects
    for size, c in counts.items():
        diagonal = sum(c[i][i] for i in range(len(drawing_errors.SHAPES)))
        assert diagonal >= 0.95 * sum(map(sum, c)), (size, c)
        assert all(row[-1] == 0 for row in c), f"{size}: a real render's object was reported missed"
    for size in drawing_errors.SIZES:
        r = result["by_size"][size]
        assert r["n"] == sum(map(sum, counts[size])) and r["found"] == 1.0 and r["color"] >= 0.95
    both = result["by_size"]["all"]
    assert both["n"] == objects and both["shape"] == pytest.approx(
        sum(result["by_size"][s]["shape"] * result["by_size"][s]["n"] for s in drawing_errors.SIZES) / objects)
    assert sum(v["n"] for v in result["by_objects"].values()) == objects


def test_blank_and_swapped_images_are_tallied_as_missed_or_wrong(scenes):
    blank = [Image.new("RGB", (64, 64), "white")] * len(scenes)
    result = drawing_errors.tally_objects(blank, [s.scene for s in scenes])
    for size in drawing_errors.SIZES:
        assert all(row[:-1] == [0, 0, 0, 0] for row in result["confusion"][size]["counts"])
        assert result["by_size"][size]["found"] == 0.0 and result["by_size"][size]["shape"] == 0.0
    # Each image checked against the next scene's prompt: objects are found but mostly wrong.
    shifted = [s.image for s in scenes[1:] + scenes[:1]]
    swapped = drawing_errors.tally_objects(shifted, [s.scene for s in scenes])
    right = drawing_errors.tally_objects([s.image for s in scenes], [s.scene for s in scenes])
    assert (sum(v["all_right"] * v["n"] for v in swapped["by_objects"].values())
            < 0.5 * sum(v["all_right"] * v["n"] for v in right["by_objects"].values()))
    with pytest.raises(ValueError, match="one image per scene"):
        drawing_errors.tally_objects(blank[:3], [s.scene for s in scenes])


def test_main_scores_drawings_like_the_eval_and_writes_the_plot(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mmdlm
    from mmdlm.eval.evaluate import EVAL_SEED

    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: tiny_pipeline)
    drawing_errors.main(["--n", "3", "--batch-size", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["n"], result["images"]) == (3, "drawings")
    # The same drawings as the eval's: the seeds per batch of prompts are EVAL_SEED + batch index.
    samples = list(ShapesWorld("test", 3, EVAL_SEED))
    drawn = (tiny_pipeline.generate_image([s.caption for s in samples[:2]], seed=EVAL_SEED)
             + tiny_pipeline.generate_image([samples[2].caption], seed=EVAL_SEED + 1))
    expected = drawing_errors.tally_objects(drawn, [s.scene for s in samples])
    assert result["confusion"] == expected["confusion"]
    found = sum(len(match_objects(detect_shapes(im), scene_objects(s.scene))) for im, s in zip(drawn, samples))
    requested = sum(len(s.scene.shapes) for s in samples)
    found_rate = result["by_size"]["all"]["found"]
    assert found_rate == pytest.approx(found / requested)
    with Image.open(tmp_path / "confusion.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
