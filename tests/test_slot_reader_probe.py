"""benchmarks/slot_reader_probe.py: its per-slot targets follow the scene's cells, and its question rows carry the
right answers and random-object baselines."""

import importlib.util
import math
from pathlib import Path

import torch

from mmdlm.data.shapes import COLORS, SHAPES, ShapesWorld

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("slot_reader_probe", ROOT / "benchmarks" / "slot_reader_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _scenes(split, n):
    return [(s.scene.shapes, s.qas) for s in ShapesWorld(split, n)]


def _oracle_features(scenes, cells_of=lambda cell: cell):
    """One-hot colour and shape of each cell's object in slot cells_of(cell)."""
    x = torch.zeros(len(scenes), 9, len(COLORS) + len(SHAPES))
    for i, (objects, _) in enumerate(scenes):
        for o in objects:
            x[i, cells_of(o.cell), list(COLORS).index(o.color)] = 1
            x[i, cells_of(o.cell), len(COLORS) + SHAPES.index(o.shape)] = 1
    return x


def test_slot_probe_reads_each_cell_from_its_own_slot():
    train, test = _scenes("train", 600), _scenes("test", 100)
    torch.manual_seed(0)
    right = probe.slot_probe((_oracle_features(train), train), (_oracle_features(test), test), steps=300)
    assert min(right.values()) > 0.99, right
    # The same features in the wrong slots (each object one cell on) cannot be read as their own cells.
    shifted = lambda cell: (cell + 1) % 9  # noqa: E731
    wrong = probe.slot_probe((_oracle_features(train, shifted), train), (_oracle_features(test, shifted), test),
                             steps=300)
    assert wrong["colour"] < 0.5, wrong


def test_question_rows_hold_the_answers_and_the_random_object_baseline():
    scenes = _scenes("test", 50)
    qas = [qa for _, q in scenes for qa in q]
    vocab = {w: i for i, w in enumerate(sorted({w for qa in qas for w in qa.question.rstrip("?").split()}) + ["<sep>"])}
    answers = {a: i for i, a in enumerate(sorted({qa.answer for qa in qas}))}
    rows = probe.question_rows(scenes, vocab, answers)
    assert len(rows) == len(qas)
    words = {i: w for w, i in vocab.items()}
    inverse = {i: a for a, i in answers.items()}
    k = 0
    for index, (objects, scene_qas) in enumerate(scenes):
        for qa in scene_qas:
            scene, ids, answer, qtype, chance = rows[k]
            k += 1
            assert (scene, inverse[answer], qtype) == (index, qa.answer, qa.qtype)
            assert " ".join(words[i] for i in ids) == qa.question.rstrip("?") + " <sep>"
            if qtype == "position":
                assert chance == sum(o.position == qa.answer for o in objects) / len(objects)
                assert 0 < chance <= 1 and (len(objects) > 1 or chance == 1)
            elif qtype in ("count", "exist", "size"):
                assert math.isnan(chance)
