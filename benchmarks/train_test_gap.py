"""Does a model read its training images better than held-out ones? Digit answers on a sample of the train digits,
exact captions on train and test Shapes scenes, and how recognisable re-scanned digits (``augment_scan``) are to the
digit classifier of ``mmdlm eval``. A diagnostic of memorisation, not an evaluation (``mmdlm eval`` is that).

    python benchmarks/train_test_gap.py --model shapes-tiny --out benchmarks/results/recipe-sweep/round9/gap-read.json
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from mmdlm.data.digits import DIGIT_WORDS, digit_examples, load_digit_images
from mmdlm.data.shapes import CAPTION_PROMPT, ShapesWorld
from mmdlm.eval.checkers import DigitClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digit_errors import wrong_digits  # noqa: E402
from json_report import print_and_save  # noqa: E402

TEST_CAPTION_SEED = 1234  # other scenes than the `mmdlm eval` report's


def digit_accuracy(pipe: Any, pairs: Sequence[tuple[Any, int]], batch_size: int = 50) -> float:
    """Share of (image, label) pairs whose answer to "what digit is this?" is the label's word."""
    return 1 - len(wrong_digits(pipe, pairs, batch_size)) / len(pairs)


def caption_exact_match(pipe: Any, samples: Sequence[Any], batch_size: int = 50) -> float:
    """Share of Shapes samples whose caption is exactly the canonical one."""
    right = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        captions = pipe.answer([s.image for s in chunk], [CAPTION_PROMPT] * len(chunk))
        right += sum(c.strip() == s.caption for s, c in zip(chunk, captions))
    return right / len(samples)


def measure(pipe: Any, n: int = 400, batch_size: int = 50) -> dict[str, float]:
    """Train digits (a seeded sample of n), train captions (the first n scenes of the seed-0 train split, the
    caption source of the shapes-tiny recipes) and test captions (n test scenes)."""
    train_digits = random.Random(0).sample(load_digit_images("train"), n)
    return {"train_digit_accuracy": digit_accuracy(pipe, train_digits, batch_size),
            "train_caption_exact_match": caption_exact_match(pipe, list(ShapesWorld("train", n, 0)), batch_size),
            "test_caption_exact_match": caption_exact_match(pipe, list(ShapesWorld("test", n, TEST_CAPTION_SEED)),
                                                            batch_size)}


def rescanned_recognisability(seed: int = 0) -> dict[str, float]:
    """The eval's digit classifier (trained on the real train scans) on the 297 real test digits and on one
    re-scanned copy of each."""
    rows = digit_examples("test", tasks=("vqa",), augment=1, seed=seed)  # per image: the real scan, then its copy
    labels = [DIGIT_WORDS.index(r["messages"][1]["content"]) for r in rows[::2]]
    clf = DigitClassifier().fit()
    return {"real": clf.score([r["images"][0] for r in rows[::2]], labels),
            "rescanned": clf.score([r["images"][0] for r in rows[1::2]], labels)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-tiny", help="bundled model name or saved mmdlm model folder")
    ap.add_argument("--n", type=int, default=400, help="train digits and train / test scenes (default 400)")
    ap.add_argument("--rescanned", action="store_true", help="also score re-scanned test digits with the classifier")
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    import mmdlm

    result: dict[str, Any] = {"model": args.model, "n": args.n, **measure(mmdlm.load(args.model), args.n)}
    if args.rescanned:
        result["digit_classifier"] = rescanned_recognisability()
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
