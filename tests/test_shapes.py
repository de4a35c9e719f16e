"""Tests of the Shapes world generator against its spec (geometry, colours, captions, questions, splits)."""

import itertools
import math
import random
import re
import time

import numpy as np
import pytest

from mmdlm.data import shapes as S
from mmdlm.data.shapes import (
    CAPTION_PROMPT, COLORS, HELD_OUT_PAIRS, POSITIONS, QUESTION_TYPES, SHAPES, SIZES, Scene, ShapesWorld, caption,
    make_questions, parse_caption, render_scene, sample_scene, shapes_examples,
)

CELL = 64 / 3


def _scenes(split, n, seed=0):
    return [ShapesWorld(split, n, seed)[i] for i in range(n)]


def _alone(shape) -> np.ndarray:
    """Ink coverage (0..1, from the distance to white) of one shape rendered by itself."""
    arr = np.asarray(render_scene(Scene([shape])), dtype=float)
    dist = 255.0 - arr
    ref = 255.0 - np.array(shape.rgb, float)
    return np.clip(dist @ ref / (ref @ ref), 0, 1)


def test_constants_match_spec():
    assert len(POSITIONS) == 9 and POSITIONS[0] == "top left" and POSITIONS[4] == "center"
    assert set(SHAPES) == {"circle", "square", "triangle", "diamond"} and set(SIZES) == {"small", "large"}
    assert len(COLORS) == 8 and COLORS["red"] == (220, 40, 40)
    for color, shape in HELD_OUT_PAIRS:
        assert color in COLORS and shape in SHAPES
    # Nearest-nominal colour is unambiguous even at maximum jitter (+-20 on every channel).
    worst = 2 * math.sqrt(3) * S.COLOR_JITTER
    for a, b in itertools.combinations(COLORS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > worst


def test_render_matches_scene():
    for sample in _scenes("train", 60) + _scenes("compositional", 40):
        img = np.asarray(sample.image, dtype=float)
        assert sample.image.size == (64, 64) and sample.image.mode == "RGB"
        scene = sample.scene
        assert 1 <= len(scene.shapes) <= 3
        cells = [s.cell for s in scene.shapes]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)
        union = np.zeros((64, 64), bool)
        for s in scene.shapes:
            cov = _alone(s)
            mask = cov > 0.02
            assert not (mask & union).any(), "shapes overlap"
            union |= mask
            # Colour at the centre is the shape's jittered colour, which is near nominal.
            px = img[int(s.cy), int(s.cx)]
            assert np.abs(px - np.array(s.rgb)).max() <= 3
            assert np.abs(np.array(s.rgb) - np.array(COLORS[s.color])).max() <= S.COLOR_JITTER
            # The whole shape lies inside its cell.
            ys, xs = np.nonzero(mask)
            row, col = divmod(s.cell, 3)
            assert xs.min() >= col * CELL - 0.5 and xs.max() + 1 <= (col + 1) * CELL + 0.5
            assert ys.min() >= row * CELL - 0.5 and ys.max() + 1 <= (row + 1) * CELL + 0.5
            # Size in pixels: the bounding box width of the ink is "about 9" or "about 17" px.
            width = cov.sum(axis=0).max() if s.shape == "square" else (cov.max(axis=0) > 0.5).sum()
            nominal = {"small": 9, "large": 17}[s.size]
            assert abs(width - nominal) <= 2.0, (s, width)
            # Area / width^2 identifies the shape; the triangle points up, the diamond is widest in the middle.
            fill = cov.sum() / s.diameter**2
            assert abs(fill - {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}[s.shape]) < 0.08
            rows = cov.sum(axis=1)
            inked = np.nonzero(rows > 0.05)[0]
            top, mid, bottom = rows[inked[1]], rows[inked[len(inked) // 2]], rows[inked[-2]]
            if s.shape == "triangle":
                assert top < mid < bottom
            if s.shape == "diamond":
                assert mid > top and mid > bottom
        # Everything that is not a shape is white background.
        assert (img[~union] == 255).all()


def test_caption_grammar_and_round_trip():
    obj = r"a (small|large) ({}) ({}) at the ({})".format("|".join(COLORS), "|".join(SHAPES), "|".join(POSITIONS))
    grammar = re.compile(rf"{obj}\.|{obj} and {obj}\.|{obj}, {obj} and {obj}\.")
    for sample in _scenes("test", 150):
        text = sample.caption
        assert grammar.fullmatch(text), text
        assert text == caption(sample.scene)
        expected = [(s.size, s.color, s.shape, s.cell) for s in sample.scene.shapes]
        assert parse_caption(text) == expected
        # Phrase order, case and spacing do not matter to the parser.
        phrases = re.split(r", | and ", text.rstrip("."))
        assert parse_caption("  " + " and ".join(reversed(phrases)).upper()) == expected


@pytest.mark.parametrize("bad", [
    "", "a huge red circle at the top.", "a small pink circle at the top.", "a small red blob at the top.",
    "a small red circle at the top and a large blue square at the top.", "hello world", "a small red circle",
])
def test_parse_caption_rejects(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def _expected_answer(question: str, qtype: str, scene: Scene) -> str:
    """Recompute the answer from the scene independently, asserting the question is unambiguous."""
    objs = scene.shapes
    if qtype == "color":
        kind = re.fullmatch(r"what color is the (\w+)\?", question)[1]
        hits = [o for o in objs if o.shape == kind]
        assert len(hits) == 1
        return hits[0].color
    if qtype == "shape":
        color = re.fullmatch(r"what shape is the (\w+) object\?", question)[1]
        hits = [o for o in objs if o.color == color]
        assert len(hits) == 1
        return hits[0].shape
    if qtype == "count":
        assert question == "how many shapes are there?"
        return ["one", "two", "three"][len(objs) - 1]
    if qtype == "exist":
        color, kind = re.fullmatch(r"is there an? (\w+) (\w+)\?", question).groups()
        return "yes" if any(o.color == color and o.shape == kind for o in objs) else "no"
    m = re.fullmatch(r"(?:where is|what size is) the (\w+) (\w+)\?", question)
    hits = [o for o in objs if (o.color, o.shape) == m.groups()]
    assert len(hits) == 1
    return POSITIONS[hits[0].cell] if qtype == "position" else hits[0].size


def test_answers_consistent_with_scene():
    yes = total = 0
    for sample in _scenes("train", 300):
        qtypes = [qa.qtype for qa in sample.qas]
        assert len(set(qtypes)) == len(qtypes) and {"count", "exist"} <= set(qtypes)
        for qa in sample.qas:
            assert qa.answer == _expected_answer(qa.question, qa.qtype, sample.scene), qa
            if qa.qtype == "exist":
                yes += qa.answer == "yes"
                total += 1
        # A question type is skipped only when no unambiguous target exists.
        kinds = [o.shape for o in sample.scene.shapes]
        assert ("color" in qtypes) == any(kinds.count(k) == 1 for k in kinds)
    assert 0.4 < yes / total < 0.6


def test_held_out_pairs():
    for split in ("train", "test"):
        for sample in _scenes(split, 400):
            assert not any((o.color, o.shape) in HELD_OUT_PAIRS for o in sample.scene.shapes)
            for qa in sample.qas:  # train/test text never names a held-out pair either
                assert not any(f"{c} {s}" in qa.question for c, s in HELD_OUT_PAIRS)
    seen = set()
    for sample in _scenes("compositional", 200):
        pairs = {(o.color, o.shape) for o in sample.scene.shapes}
        assert pairs & set(HELD_OUT_PAIRS)
        seen |= pairs & set(HELD_OUT_PAIRS)
    assert seen == set(HELD_OUT_PAIRS)


def test_determinism_and_disjoint_splits():
    a, b = ShapesWorld("train", 20, seed=5), ShapesWorld("train", 20, seed=5)
    for i in (0, 7, 19):
        assert a[i].image.tobytes() == b[i].image.tobytes() and a[i].caption == b[i].caption
        assert [vars(q) for q in a[i].qas] == [vars(q) for q in b[i].qas]
    assert a[-1].caption == a[19].caption
    assert ShapesWorld("train", 20, seed=6)[0].image.tobytes() != a[0].image.tobytes()
    with pytest.raises(IndexError):
        a[20]
    # Same scene renders to the same pixels.
    assert render_scene(a[3].scene).tobytes() == a[3].image.tobytes()
    train_seeds = {S.scene_seed(0, "train", i) for i in range(2000)}
    test_seeds = {S.scene_seed(0, "test", i) for i in range(2000)}
    assert not train_seeds & test_seeds
    train_imgs = {s.image.tobytes() for s in _scenes("train", 200)}
    assert not train_imgs & {s.image.tobytes() for s in _scenes("test", 200)}
    assert len(list(ShapesWorld("test", 4))) == 4


def test_sample_scene_validates_split():
    with pytest.raises(ValueError, match="split"):
        sample_scene(random.Random(0), "validation")
    with pytest.raises(ValueError, match="split"):
        ShapesWorld("dev", 3)


def test_generation_speed():
    world = ShapesWorld("train", 200, seed=1)
    start = time.perf_counter()
    for sample in world:
        pass
    assert (time.perf_counter() - start) / 200 < 0.01  # spec: ~1-5 ms per sample


def test_shapes_examples_format():
    examples = shapes_examples("test", 5, seed=2)
    world = ShapesWorld("test", 5, seed=2)
    n_q = sum(len(s.qas) for s in world)
    assert len(examples) == 5 * 2 + n_q
    caps = [e for e in examples if e.get("qtype") == "caption"]
    assert [e["messages"][1]["content"] for e in caps] == [s.caption for s in world]
    for e in examples:
        if e["task"] == "t2i":
            assert set(e) == {"task", "prompt", "image"} and parse_caption(e["prompt"])
            assert e["image"].size == (64, 64)
        else:
            assert e["task"] == "understanding" and len(e["images"]) == 1
            user, assistant = e["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].startswith("<image>\n") and user["content"].count("<image>") == 1
            if e["qtype"] == "caption":
                assert user["content"] == "<image>\n" + CAPTION_PROMPT
    only_t2i = shapes_examples("test", 3, tasks=("t2i",))
    assert len(only_t2i) == 3 and all(e["task"] == "t2i" for e in only_t2i)
    with pytest.raises(ValueError, match="unknown"):
        shapes_examples("test", 3, tasks=("captions",))


def test_shapes_chat_examples_ask_everything_about_one_image():
    world = ShapesWorld("test", 6, seed=2)
    chats = shapes_examples("test", 6, seed=2, tasks=("chat",))
    assert len(chats) == 6
    orders = set()
    for sample, chat in zip(world, chats):
        assert chat["task"] == "understanding" and chat["qtype"] == "chat" and chat["images"] == [sample.image]
        msgs = chat["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(sample.qas) + 1)
        # LLaVA layout: the image in the first user turn only.
        assert msgs[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in msgs) == 1
        pairs = [(u["content"].removeprefix("<image>\n"), a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
        expected = [(CAPTION_PROMPT, sample.caption)] + [(qa.question, qa.answer) for qa in sample.qas]
        assert sorted(pairs) == sorted(expected)
        orders.add(tuple(q for q, _ in pairs).index(CAPTION_PROMPT))
    assert len(orders) > 1  # the turn order is shuffled, so the caption is not always first
    assert [c["messages"] for c in shapes_examples("test", 6, seed=2, tasks=("chat",))] == [c["messages"] for c in chats]


def test_question_types_keep_only_those_questions_of_the_same_scenes():
    world = ShapesWorld("test", 12, seed=2)
    assert {qa.qtype for s in world for qa in s.qas} == set(QUESTION_TYPES)
    asked = shapes_examples("test", 12, seed=2, tasks=("vqa", "chat"), question_types=["position", "exist"])
    vqa = [e for e in asked if e["qtype"] != "chat"]
    expected = [(qa.question, qa.answer) for s in world for qa in s.qas if qa.qtype in ("position", "exist")]
    assert [(e["messages"][0]["content"].removeprefix("<image>\n"), e["messages"][1]["content"]) for e in vqa] == expected
    chats = [e for e in asked if e["qtype"] == "chat"]
    for sample, chat in zip(world, chats):  # the caption turn, then only the kept questions
        questions = {m["content"].removeprefix("<image>\n") for m in chat["messages"][::2]}
        assert questions == {CAPTION_PROMPT} | {qa.question for qa in sample.qas if qa.qtype in ("position", "exist")}
    for bad in (["where"], []):
        with pytest.raises(ValueError, match="choose one or more of"):
            shapes_examples("test", 3, tasks=("vqa",), question_types=bad)


def test_objects_keep_only_the_scenes_of_those_sizes_among_the_same_n():
    world = ShapesWorld("train", 30, seed=4)
    drawn = shapes_examples("train", 30, seed=4, tasks=("t2i",), objects=[2, 3])
    assert [e["prompt"] for e in drawn] == [s.caption for s in world if len(s.scene.shapes) in (2, 3)]
    assert 0 < len(drawn) < 30
    for bad in ([4], []):
        with pytest.raises(ValueError, match="choose one or more of 1, 2, 3"):
            shapes_examples("train", 3, tasks=("t2i",), objects=bad)


def test_make_questions_deterministic_given_rng():
    scene = sample_scene(random.Random(3), "train")
    q1 = make_questions(scene, random.Random(9))
    q2 = make_questions(scene, random.Random(9))
    assert [vars(q) for q in q1] == [vars(q) for q in q2]
