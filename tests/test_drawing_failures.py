"""benchmarks/drawing_failures.py: failure kinds and confusions on drawings with known faults, and its outputs."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from mmdlm.data import Scene, ShapesWorld, render_scene
from mmdlm.data.shapes import COLORS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("drawing_failures", ROOT / "benchmarks" / "drawing_failures.py")
drawing_failures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drawing_failures)


def _scenes(k: int, n: int = 6) -> list[Scene]:
    """``n`` test scenes of ``k`` objects, no two of one colour."""
    return [s.scene for s in ShapesWorld("test", 200, 5)
            if len(s.scene.shapes) == k and len({o.color for o in s.scene.shapes}) == k][:n]


def test_known_faults_land_in_their_kind_and_confusion():
    two, three = _scenes(2), _scenes(3)
    # half take the other object's colour (bound to the wrong object), half one that no object of theirs has
    drawn_as = [sc.shapes[1].color if i % 2 else
                next(c for c in ("red", "blue", "green") if c not in {o.color for o in sc.shapes})
                for i, sc in enumerate(two)]
    recoloured = [Scene([dataclasses.replace(sc.shapes[0], color=c, rgb=COLORS[c]), *sc.shapes[1:]])
                  for sc, c in zip(two, drawn_as)]
    scenes = two + two + three
    images = ([render_scene(s) for s in recoloured]  # the first object in another colour
              + [Image.new("RGB", (64, 64), "white") for _ in two]  # nothing drawn
              + [render_scene(Scene(s.shapes[1:])) for s in three])  # the first object left out
    result = drawing_failures.tally_failures(scenes, images)
    assert result["by_objects"]["2"]["prompts"] == 12 and result["by_objects"]["3"]["prompts"] == 6
    assert result["by_objects"]["2"]["wrong color"] == 6 and result["by_objects"]["2"]["fewer objects"] == 6
    assert result["by_objects"]["3"] == {"prompts": 6, "fewer objects": 6} and result["all_correct"] == 0.0
    assert sum(result["color_confusions"].values()) == 6
    assert all(f"{sc.shapes[0].color} -> {c}" in result["color_confusions"] for sc, c in zip(two, drawn_as))
    assert result["borrowed_from_another_object"] == {"color": 3, "shape": 0}
    assert result["objects"] == 2 * 2 * 6 + 3 * 6
    assert sum(result["missing_objects"].values()) == 2 * 6 + 6  # the blank canvases' objects and the left-out ones


def test_classify_drawing():
    right = {"all_correct": True, "detected": [{}], "requested": 1}
    assert drawing_failures.classify_drawing(right) == "right"
    extra = {"all_correct": False, "detected": [{}, {}], "requested": 1, "color": 1.0}
    assert drawing_failures.classify_drawing(extra) == "more objects"
    wrong = {"all_correct": False, "detected": [{}], "requested": 1, "color": 0.0, "shape": 0.0, "size": 1.0,
             "position": 1.0}
    assert drawing_failures.classify_drawing(wrong) == "wrong color+shape"


def test_main_matches_the_decoding_sweep_and_writes_the_plot(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mmdlm

    spec = importlib.util.spec_from_file_location("drawing_decoding", ROOT / "benchmarks" / "drawing_decoding.py")
    drawing_decoding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drawing_decoding)
    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: tiny_pipeline)
    drawing_failures.main(["--n", "5", "--batch-size", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert sum(g["prompts"] for g in result["by_objects"].values()) == 5 and result["scene_seed"] == 1
    samples = [s for s in ShapesWorld("test", 5, seed=1)]
    cfg = tiny_pipeline.model.generation_config
    default = {k: getattr(cfg, k) for k in ("guidance_scale",) if getattr(cfg, k, None) is not None}
    row = drawing_decoding.draw_and_score(tiny_pipeline, samples, batch_size=2, seed=0, **default)
    assert result["all_correct"] == row["all_correct"]  # the same drawings as the sweep at the default settings
    with Image.open(tmp_path / "failures.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert result["images"] == "drawings"
    with pytest.raises(SystemExit):
        drawing_failures.main(["--n", "0"])


def test_reconstructions_are_tallied_instead_of_drawings(tiny_pipeline, monkeypatch, capsys):
    import mmdlm
    from mmdlm.eval.reconstruction import reconstruct

    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: tiny_pipeline)
    drawing_failures.main(["--n", "4", "--reconstructions"])
    result = json.loads(capsys.readouterr().out)
    samples = [s for s in ShapesWorld("test", 4, seed=1)]
    own = drawing_failures.tally_failures([s.scene for s in samples],
                                          reconstruct(tiny_pipeline.model.image_tokenizer, [s.image for s in samples]))
    assert result["images"] == "reconstructions" and result["all_correct"] == own["all_correct"]
    assert result["by_objects"] == own["by_objects"]
