"""benchmarks/train_test_gap.py and digit_errors.py: their scores count right answers and exact captions, and
nothing else; the error list holds exactly the wrong answers."""

import importlib.util
import json
from pathlib import Path

from mmdlm.data.digits import DIGIT_WORDS, load_digit_images
from mmdlm.data.shapes import ShapesWorld

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_test_gap", ROOT / "benchmarks" / "train_test_gap.py")
gap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gap)
_spec = importlib.util.spec_from_file_location("digit_errors", ROOT / "benchmarks" / "digit_errors.py")
errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(errors)


class _LookupPipe:
    """Answers from a table keyed by image pixels, or a fixed answer for images it does not know."""

    def __init__(self, table, default="seven"):
        self.table, self.default = table, default

    def answer(self, images, questions):
        return [self.table.get(img.tobytes(), self.default) for img in images]


def test_digit_accuracy_counts_right_words():
    pairs = load_digit_images("test")[:40]
    oracle = _LookupPipe({img.tobytes(): DIGIT_WORDS[y] for img, y in pairs})
    assert gap.digit_accuracy(oracle, pairs, batch_size=16) == 1.0
    sevens = sum(y == 7 for _, y in pairs) / len(pairs)
    assert gap.digit_accuracy(_LookupPipe({}), pairs, batch_size=16) == sevens < 0.5


def test_caption_exact_match_needs_the_whole_caption():
    samples = list(ShapesWorld("test", 12, 3))
    exact = _LookupPipe({s.image.tobytes(): f" {s.caption}\n" for s in samples})
    assert gap.caption_exact_match(exact, samples, batch_size=5) == 1.0
    half = _LookupPipe({s.image.tobytes(): s.caption if i % 2 else s.caption.rstrip(".")
                        for i, s in enumerate(samples)})
    assert gap.caption_exact_match(half, samples, batch_size=5) == 0.5


def test_wrong_digits_lists_the_wrong_answers_only():
    pairs = load_digit_images("test")[:40]
    oracle = _LookupPipe({img.tobytes(): DIGIT_WORDS[y] for img, y in pairs})
    assert errors.wrong_digits(oracle, pairs, batch_size=16) == []
    wrong = errors.wrong_digits(_LookupPipe({}, default="Seven."), pairs, batch_size=16)
    assert [w["index"] for w in wrong] == [i for i, (_, y) in enumerate(pairs) if y != 7]
    assert {w["answer"] for w in wrong} == {"seven"} and wrong[0]["label"] == DIGIT_WORDS[pairs[wrong[0]["index"]][1]]
    grid = errors.error_grid(pairs, wrong, columns=8)
    assert grid.size == (8 * 80, -(-len(wrong) // 8) * 94)


def test_results_are_printed_and_saved_as_the_same_json(tmp_path, capsys):
    out = tmp_path / "new" / "result.json"
    errors.print_and_save({"accuracy": 0.5, "wrong": [{"index": 3}]}, str(out), indent=1)
    expected = {"accuracy": 0.5, "wrong": [{"index": 3}]}
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == expected
