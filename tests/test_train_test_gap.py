"""benchmarks/train_test_gap.py: its scores count right answers and exact captions, and nothing else."""

import importlib.util
from pathlib import Path

from mmdlm.data.digits import DIGIT_WORDS, load_digit_images
from mmdlm.data.shapes import ShapesWorld

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_test_gap", ROOT / "benchmarks" / "train_test_gap.py")
gap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gap)


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
