"""Which held-out digits does a model read wrong? For each model: the test digits (index in the 297-digit test split,
label, answer) it gets wrong, which of them the eval's digit classifier (an SVM on the real train scans, no
denoiser) also gets wrong, with ``--tower-probe`` which of them a linear probe on the model's own frozen tower
features (benchmarks/tower_probe.py) gets wrong, and a PNG of the first model's wrong digits with their answers. A
diagnostic, not an evaluation (``mmdlm eval --splits digits --n 297`` is that).

    python benchmarks/digit_errors.py --tower-probe --models shapes-tiny runs/shapes-tiny-read-digits/model \\
        runs/shapes-tiny-read-stroke/model runs/shapes-tiny-read-digits-projector/model \\
        --out benchmarks/results/recipe-sweep/round10/digit-errors.json \\
        --png benchmarks/results/recipe-sweep/round10/digit-errors-shipped.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from mmdlm.data.digits import DIGIT_QUESTION, DIGIT_WORDS, load_digit_images
from mmdlm.eval.checkers import DigitClassifier, normalize_answer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import print_and_save  # noqa: E402


def wrong_digits(pipe: Any, pairs: Sequence[tuple[Image.Image, int]], batch_size: int = 50) -> list[dict[str, Any]]:
    """The (index, label, answer) of every pair whose answer to "what digit is this?" is not the label's word."""
    wrong = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        answers = pipe.answer([img for img, _ in chunk], [DIGIT_QUESTION] * len(chunk))
        wrong += [{"index": start + i, "label": DIGIT_WORDS[y], "answer": normalize_answer(a)}
                  for i, ((_, y), a) in enumerate(zip(chunk, answers)) if normalize_answer(a) != DIGIT_WORDS[y]]
    return wrong


def error_grid(pairs: Sequence[tuple[Image.Image, int]], wrong: Sequence[dict[str, Any]],
               columns: int = 8) -> Image.Image:
    """The wrong digits, each over "label -> answer"."""
    cell, text = 80, 14
    rows = max(1, -(-len(wrong) // columns))
    grid = Image.new("RGB", (columns * cell, rows * (cell + text)), "white")
    draw = ImageDraw.Draw(grid)
    for k, w in enumerate(wrong):
        x, y = (k % columns) * cell, (k // columns) * (cell + text)
        grid.paste(pairs[w["index"]][0].convert("RGB").resize((cell - 8, cell - 8)), (x + 4, y + 4))
        draw.text((x + 4, y + cell - 2), f"{w['label']} -> {w['answer']}", fill="black")
    return grid


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-tiny"], help="bundled model names or saved model folders")
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    ap.add_argument("--png", default=None, help="write the first model's wrong digits to this PNG")
    ap.add_argument("--tower-probe", action="store_true",
                    help="also list the digits a linear probe on each model's frozen tower features gets wrong")
    args = ap.parse_args(argv)
    import mmdlm

    pairs = load_digit_images("test")
    predicted = DigitClassifier().fit().predict([img for img, _ in pairs])
    classifier_wrong = {i for i, (p, (_, y)) in enumerate(zip(predicted, pairs)) if p != y}
    result: dict[str, Any] = {"n": len(pairs), "classifier_wrong": sorted(classifier_wrong), "models": {}}
    for name in args.models:
        wrong = wrong_digits(mmdlm.load(name, device="cpu"), pairs)
        result["models"][name] = {"accuracy": 1 - len(wrong) / len(pairs), "wrong": wrong,
                                  "also_wrong_for_the_classifier": sum(w["index"] in classifier_wrong for w in wrong)}
        if args.tower_probe:
            from tower_probe import digit_features, linear_probe_predictions

            x, y = digit_features(name, "train")
            x_test, y_test = digit_features(name, "test")
            probe_wrong = (linear_probe_predictions(x, y, x_test) != y_test).nonzero().flatten().tolist()
            result["models"][name].update(tower_probe_accuracy=1 - len(probe_wrong) / len(pairs),
                                          tower_probe_wrong=probe_wrong,
                                          also_wrong_for_the_tower_probe=sum(w["index"] in probe_wrong for w in wrong))
        if args.png and name == args.models[0]:
            Path(args.png).parent.mkdir(parents=True, exist_ok=True)
            error_grid(pairs, wrong).save(args.png)
    print_and_save(result, args.out, indent=1)


if __name__ == "__main__":
    main()
