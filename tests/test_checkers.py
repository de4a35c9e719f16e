"""Tests of the generator-free checkers: Shapes detector, drawn-scene and caption scoring, digit classifier."""

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmdlm.data import Scene, ShapesWorld, caption, load_digit_images, render_scene, sample_scene
from mmdlm.eval.checkers import DigitClassifier, detect_shapes, score_caption, score_drawn_scene

ATTRS = ("color", "shape", "size", "position")


def test_detector_on_ground_truth_renders():
    scenes = list(ShapesWorld("test", 300, seed=11)) + list(ShapesWorld("compositional", 100, seed=11))
    correct = 0
    for s in scenes:
        det = detect_shapes(s.image)
        truth = [(o.color, o.shape, o.size, o.cell) for o in s.scene.shapes]
        correct += [(d["color"], d["shape"], d["size"], d["cell"]) for d in det] == truth
    assert correct / len(scenes) >= 0.99


def test_detector_tolerates_blur_noise_and_specks():
    rs = np.random.RandomState(0)
    ok = 0
    worlds = list(ShapesWorld("train", 100, seed=4))
    for s in worlds:
        arr = np.asarray(s.image.filter(ImageFilter.GaussianBlur(0.8)), dtype=float)
        arr += rs.normal(0, 6, arr.shape)
        for y, x in rs.randint(0, 64, size=(3, 2)):  # isolated dark specks must not count as shapes
            arr[y, x] = 0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        ok += score_drawn_scene(img, s.caption)["all_correct"]
    assert ok / len(worlds) >= 0.95


def test_score_drawn_scene_pinpoints_the_wrong_attribute():
    rng = random.Random(0)
    checked = 0
    while checked < 20:
        scene = sample_scene(rng, "train")
        if len(scene.shapes) < 2:
            continue
        checked += 1
        n = len(scene.shapes)
        good = score_drawn_scene(render_scene(scene), caption(scene))
        assert good["all_correct"] and good["count"] and all(good[a] == 1.0 for a in ATTRS)
        # Recolour one object: only colour drops, by exactly one object's share.
        wrong = Scene([s.__class__(**vars(s)) for s in scene.shapes])
        target = wrong.shapes[0]
        target.color = "black" if target.color != "black" else "yellow"
        target.rgb = {"black": (20, 20, 20), "yellow": (235, 200, 30)}[target.color]
        res = score_drawn_scene(render_scene(wrong), scene)
        assert not res["all_correct"] and res["count"]
        assert res["color"] == pytest.approx((n - 1) / n)
        assert res["shape"] == res["size"] == res["position"] == 1.0
        # Drop an object: the count is wrong and the missing object scores zero on every attribute.
        res = score_drawn_scene(render_scene(Scene(scene.shapes[1:])), scene)
        assert not res["count"] and all(res[a] == pytest.approx((n - 1) / n) for a in ATTRS)
    blank = score_drawn_scene(Image.new("RGB", (64, 64), "white"), "a small red circle at the top.")
    assert blank["detected"] == [] and not blank["all_correct"] and blank["color"] == 0.0


def test_score_caption():
    a, b, c = "a large red circle at the top left", "a small blue square at the center", "a small gray diamond at the bottom"
    ref = f"{a}, {b} and {c}."
    reordered = f"{c}, {a} and {b}."
    s = score_caption(reordered, ref)
    assert s["parsed"] and s["exact_match"] and s["all_correct"]
    s = score_caption(ref.replace("blue square", "blue circle"), ref)
    assert not s["exact_match"] and s["count"]
    assert s["shape"] == pytest.approx(2 / 3) and s["color"] == s["size"] == s["position"] == 1.0
    s = score_caption("a large red circle at the top left.", ref)
    assert not s["count"] and s["color"] == pytest.approx(1 / 3)
    s = score_caption("a cat on a mat", ref)
    assert not s["parsed"] and not s["exact_match"] and s["color"] == 0.0
    with pytest.raises(ValueError):
        score_caption(ref, "not a shapes caption")


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier().fit()


def test_digit_classifier_accuracy(classifier):
    test = load_digit_images("test")
    images, labels = [im for im, _ in test], [y for _, y in test]
    assert classifier.score(images, labels) >= 0.95
    # Generated-looking inputs: a slightly blurred, fainter digit is still recognised most of the time.
    faint = [Image.blend(im.filter(ImageFilter.GaussianBlur(1)), Image.new("RGB", im.size, "white"), 0.3)
             for im in images[:100]]
    assert classifier.score(faint, labels[:100]) >= 0.9


def test_digit_classifier_interface(classifier):
    images = [im for im, _ in load_digit_images("test")[:5]]
    preds = classifier.predict(images)
    assert len(preds) == 5 and all(isinstance(p, int) and 0 <= p <= 9 for p in preds)
    assert classifier.predict([]) == []
    with pytest.raises(ValueError, match="labels"):
        classifier.score(images, [1, 2])
    with pytest.raises(TypeError):
        classifier.predict(images[0])


def test_summarize_drawn_scenes_averages_each_attribute():
    from mmdlm.eval.checkers import DRAWING_ATTRIBUTES, summarize_drawn_scenes

    scores = [{"all_correct": True, "count": True, "color": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0},
              {"all_correct": False, "count": False, "color": 0.5, "shape": 0.0, "size": 1.0, "position": 0.5}]
    summary = summarize_drawn_scenes(scores)
    assert summary["t2i_all_correct"] == 0.5
    assert summary["t2i_attribute_accuracy"] == {"count": 0.5, "color": 0.75, "shape": 0.5, "size": 1.0,
                                                 "position": 0.75}
    assert list(summary["t2i_attribute_accuracy"]) == list(DRAWING_ATTRIBUTES)
    assert summary["t2i_by_objects"] == {}  # these scores do not say how many objects were asked for
    empty = summarize_drawn_scenes([])
    assert empty["t2i_all_correct"] != empty["t2i_all_correct"]  # NaN, as `mmdlm eval` reports an empty split


def test_drawings_are_summarised_by_the_number_of_objects_asked_for():
    from mmdlm.eval.checkers import summarize_drawn_scenes

    scenes = [s.scene for s in ShapesWorld("test", 40, 3)]
    scores = []
    for scene in scenes:  # scenes of two objects drawn blank: every one of them wrong, the others right
        image = render_scene(scene) if len(scene.shapes) != 2 else Image.new("RGB", (64, 64), "white")
        scores.append(score_drawn_scene(image, scene))
    assert [s["requested"] for s in scores] == [len(s.shapes) for s in scenes]
    by_objects = summarize_drawn_scenes(scores)["t2i_by_objects"]
    assert set(by_objects) == {"1", "2", "3"} and by_objects["2"] == 0.0
    assert by_objects["1"] >= 0.9 and by_objects["3"] >= 0.9  # the checker passes real renders
