"""Write a model's own drawings of handwritten digits as a training table: PNGs and a JSONL with the digit question
and its answer, for a ``{type: table, task: vqa}`` source (round 10: can the reader learn from what the drawer
makes?). Every drawing is kept; ``--check`` also scores them with the eval's digit classifier.

    python benchmarks/drawn_digits.py --model shapes-tiny --per-digit 75 --out runs/drawn-digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmdlm.data.digits import DIGIT_QUESTION, DIGIT_WORDS, digit_caption

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import print_and_save  # noqa: E402


def write_drawn_digits(pipe: Any, out: Path, per_digit: int, batch_size: int = 50, seed: int = 0) -> list[dict]:
    """Draw ``per_digit`` images of each digit (prompts "a handwritten digit seven", seeds seed, seed + 1, ... per
    batch) into ``out/images``; write ``out/rows.jsonl`` (image, question, answer, label) and return its rows."""
    labels = [d for d in range(10) for _ in range(per_digit)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for b, start in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[start:start + batch_size]
        for i, (label, image) in enumerate(zip(chunk, pipe.generate_image([digit_caption(y) for y in chunk],
                                                                          seed=seed + b))):
            name = f"images/{start + i:05d}-{label}.png"
            image.save(out / name)
            rows.append({"image": name, "question": DIGIT_QUESTION, "answer": DIGIT_WORDS[label], "label": label})
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-tiny", help="bundled model name or saved mmdlm model folder")
    ap.add_argument("--per-digit", type=int, default=75, help="drawings of each digit (default 75)")
    ap.add_argument("--out", required=True, help="folder for images/ and rows.jsonl")
    ap.add_argument("--seed", type=int, default=0,
                    help="sampling seed of the first batch (later batches seed + 1, ...); give another seed for "
                         "more drawings that differ from an earlier run's (default 0)")
    ap.add_argument("--check", action="store_true", help="score the drawings with the eval's digit classifier")
    args = ap.parse_args(argv)
    import mmdlm
    from PIL import Image

    out = Path(args.out)
    rows = write_drawn_digits(mmdlm.load(args.model, device="cpu"), out, args.per_digit, seed=args.seed)
    result: dict[str, Any] = {"model": args.model, "seed": args.seed, "rows": len(rows),
                              "table": str(out / "rows.jsonl")}
    if args.check:
        from mmdlm.eval.checkers import DigitClassifier

        images = [Image.open(out / r["image"]).convert("RGB") for r in rows]
        result["recognised_by_the_classifier"] = DigitClassifier().fit().score(images, [r["label"] for r in rows])
    print_and_save(result, str(out / "summary.json"))


if __name__ == "__main__":
    main()
