"""Write the demo's bundled example images (Shapes "test" split) and their manifest: `python -m mmdlm.demo.make_examples`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.shapes import ShapesWorld

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# (scene index in ShapesWorld("test", seed=0), question type): one of each kind of question the model was taught.
CHOICES: tuple[tuple[int, str], ...] = ((0, "color"), (3, "shape"), (7, "count"), (9, "position"), (11, "size"))
DRAW_SCENES: tuple[int, ...] = (3, 10)


def write_examples(folder: Path = EXAMPLES_DIR) -> list[dict]:
    """Render the chosen scenes to ``folder/shapes_<i>.png`` and write ``examples.json`` (image, question, answer,
    caption per example, plus drawing prompts); returns the manifest's example list."""
    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld("test", max(i for i, _ in CHOICES + tuple((d, "") for d in DRAW_SCENES)) + 1, seed=0)
    examples = []
    for index, qtype in CHOICES:
        sample = world[index]
        qa = next(q for q in sample.qas if q.qtype == qtype)
        name = f"shapes_{index}.png"
        sample.image.save(folder / name, optimize=True)
        examples.append({"image": name, "question": qa.question, "answer": qa.answer, "qtype": qtype,
                         "caption": sample.caption})
    manifest = {"source": "mmdlm.data.shapes.ShapesWorld('test', seed=0)", "examples": examples,
                "draw_prompts": [world[i].caption for i in DRAW_SCENES]}
    (folder / "examples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return examples


if __name__ == "__main__":
    out = write_examples(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLES_DIR)
    print(f"wrote {len(out)} examples")
