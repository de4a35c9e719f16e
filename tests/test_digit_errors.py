"""benchmarks/digit_errors.py: it lists exactly the digits answered wrong, with their answers, and draws them."""

import importlib.util
from pathlib import Path

from mmdlm.data.digits import DIGIT_WORDS, load_digit_images

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("digit_errors", ROOT / "benchmarks" / "digit_errors.py")
errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(errors)


class _LookupPipe:
    """Answers from a table keyed by image pixels, or a fixed answer for images it does not know."""

    def __init__(self, table, default="Seven."):
        self.table, self.default = table, default

    def answer(self, images, questions):
        return [self.table.get(img.tobytes(), self.default) for img in images]


def test_wrong_digits_lists_the_wrong_answers_only():
    pairs = load_digit_images("test")[:40]
    oracle = _LookupPipe({img.tobytes(): DIGIT_WORDS[y] for img, y in pairs})
    assert errors.wrong_digits(oracle, pairs, batch_size=16) == []
    wrong = errors.wrong_digits(_LookupPipe({}), pairs, batch_size=16)  # "Seven." for everything
    assert [w["index"] for w in wrong] == [i for i, (_, y) in enumerate(pairs) if y != 7]
    assert {w["answer"] for w in wrong} == {"seven"} and wrong[0]["label"] == DIGIT_WORDS[pairs[wrong[0]["index"]][1]]
    grid = errors.error_grid(pairs, wrong, columns=8)
    assert grid.size == (8 * 80, -(-len(wrong) // 8) * 94)
