"""benchmarks/drawn_digits.py: a model's digit drawings become a VQA table that the table loader reads back."""

import importlib.util
import json
from pathlib import Path

from PIL import Image

from mmdlm.data import load_table
from mmdlm.data.digits import DIGIT_QUESTION, DIGIT_WORDS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("drawn_digits", ROOT / "benchmarks" / "drawn_digits.py")
drawn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drawn)


class _Drawer:
    """Draws each prompt as a grey level that encodes its digit word, and records the seeds it was given."""

    def __init__(self):
        self.seeds = []

    def generate_image(self, prompts, seed=0):
        self.seeds.append(seed)
        return [Image.new("RGB", (64, 64), (DIGIT_WORDS.index(p.split()[-1]) * 20,) * 3) for p in prompts]


def test_drawings_become_question_rows_with_their_digit(tmp_path):
    pipe = _Drawer()
    rows = drawn.write_drawn_digits(pipe, tmp_path, per_digit=3, batch_size=4)
    assert len(rows) == 30 and pipe.seeds == list(range(8))  # a new seed per batch
    assert [r["label"] for r in rows] == [d for d in range(10) for _ in range(3)]
    for r in rows:  # each file holds the drawing of its own row's digit
        assert Image.open(tmp_path / r["image"]).getpixel((0, 0))[0] == r["label"] * 20
    assert [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == rows
    again = _Drawer()
    drawn.write_drawn_digits(again, tmp_path / "more", per_digit=3, batch_size=4, seed=100)
    assert again.seeds == list(range(100, 108))  # another seed: batches that differ from the first run's
    examples = load_table(tmp_path / "rows.jsonl", task="vqa", text_column="answer")
    assert len(examples) == 30
    first = examples[4]
    assert first["messages"][1]["content"] == DIGIT_WORDS[1] and DIGIT_QUESTION in first["messages"][0]["content"]
