"""`mmdlm eval`: score a model per split and task (VQA by question type, captions, drawing, digits) with checkers
that never use the generator; prints a table, writes JSON and PNG grids."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from ..data.digits import DIGIT_QUESTION, DIGIT_WORDS, digit_caption, load_digit_images
from ..data.shapes import POSITIONS, QA, Shape, ShapesWorld
from .checkers import DigitClassifier, normalize_answer, score_caption, score_drawn_scene, summarize_drawn_scenes

SPLITS = ("test", "compositional", "digits")
# Evaluation scenes use their own seed so they never coincide with training draws of the same split name.
EVAL_SEED = 12345


def _batched(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def random_object_chance(objects: Sequence[Shape], qa: QA) -> float | None:
    """How often the answer about a random object of the scene is right for a colour, shape or position question
    (the share of the scene's objects that have the asked answer); None for other question types."""
    if qa.qtype not in ("color", "shape", "position"):
        return None
    return sum(getattr(o, qa.qtype) == qa.answer for o in objects) / len(objects)


def _position_answer_kind(answer: str, truth: str, sample) -> str:
    """Which cell a position answer names: the asked object's, another object's, an empty one, or none."""
    said = normalize_answer(answer)
    if said == truth.lower():
        return "right"
    if said in {o.position for o in sample.scene.shapes}:
        return "another object's cell"
    return "an empty cell" if said in POSITIONS else "no position"


def evaluate_shapes(pipe, split: str, n: int, *, batch_size: int = 32, draw: bool = True, sampling: dict | None = None,
                    drawing: dict | None = None, seed: int = EVAL_SEED) -> tuple[dict, dict]:
    """VQA accuracy by question type and by the scene's number of objects, caption exact match / per-attribute
    accuracy, and drawing correctness on ``n`` scenes of a Shapes split. ``sampling`` goes to the text sampler,
    ``drawing`` (``steps``, ``guidance_scale``, ``temperature``, ``candidates``) to ``generate_image``. Returns
    (metrics, samples for the report grids)."""
    sampling, drawing = sampling or {}, drawing or {}
    world = ShapesWorld(split, n, seed)
    samples = list(world)
    rng = random.Random(seed)
    questions = [(s, rng.choice(s.qas)) for s in samples if s.qas]
    by_type: dict[str, list[bool]] = defaultdict(list)
    by_objects: dict[str, list[bool]] = defaultdict(list)  # a question is harder when other objects can be confused
    # "is there a blue triangle?" next to a blue square and a red triangle: answering "yes" to absent pairs shows
    # colour and shape checked apart, not bound to one object.
    exist_by_answer: dict[str, list[bool]] = defaultdict(list)
    # A wrong "where is the blue square?" that names another object's cell found an object but not the one asked.
    position_answers: dict[str, int] = dict.fromkeys(("right", "another object's cell", "an empty cell", "no position"), 0)
    # "What color is the circle?" answered with the colour of a random object of the scene is right as often as the
    # scene's objects share the answer: the bar a model sits at that reads objects but cannot look one up.
    random_object: dict[str, list[float]] = defaultdict(list)
    # "Where is the blue square?" answered with the cell of an object found by its colour alone (or its shape alone):
    # what a model scores that uses one of the two attributes asked.
    partial_lookup: dict[str, list[float]] = defaultdict(list)
    for chunk in _batched(questions, batch_size):
        answers = pipe.answer([s.image for s, _ in chunk], [qa.question for _, qa in chunk], **sampling)
        for (s, qa), a in zip(chunk, answers):
            right = normalize_answer(a) == qa.answer.lower()
            by_type[qa.qtype].append(right)
            by_objects[str(len(s.scene.shapes))].append(right)
            objects = s.scene.shapes
            chance = random_object_chance(objects, qa)
            if chance is not None:
                random_object[qa.qtype].append(chance)
            if qa.qtype == "exist":
                exist_by_answer[qa.answer].append(right)
            if qa.qtype == "position":
                position_answers[_position_answer_kind(a, qa.answer, s)] += 1
                asked = next(o for o in objects if o.position == qa.answer)
                for attr in ("color", "shape"):
                    partial_lookup[attr].append(1 / sum(getattr(o, attr) == getattr(asked, attr) for o in objects))
    captions, cap_scores = [], []
    for chunk in _batched(samples, batch_size):
        preds = pipe.caption([s.image for s in chunk], **sampling)
        captions += preds
        cap_scores += [score_caption(p, s.scene) for p, s in zip(preds, chunk)]
    metrics: dict[str, Any] = {
        "n": n,
        "vqa_accuracy": _mean([x for v in by_type.values() for x in v]),
        "vqa_by_type": {k: _mean(v) for k, v in sorted(by_type.items())},
        "vqa_by_objects": {k: _mean(v) for k, v in sorted(by_objects.items())},
        "vqa_exist_by_answer": {k: _mean(v) for k, v in sorted(exist_by_answer.items(), reverse=True)},
        "vqa_position_answers": ({k: v / len(by_type["position"]) for k, v in position_answers.items()}
                                 if by_type.get("position") else {}),
        "vqa_random_object_chance": {k: _mean(v) for k, v in sorted(random_object.items())},
        "vqa_position_by_one_attribute": {k: _mean(v) for k, v in partial_lookup.items()},
        "caption_exact_match": _mean([c["exact_match"] for c in cap_scores]),
        "caption_attribute_accuracy": {
            a: _mean([c[a] for c in cap_scores]) for a in ("color", "shape", "size", "position")
        },
    }
    report = {"images": [s.image for s in samples[:16]], "captions": captions[:16]}
    if draw and getattr(pipe.model.config, "can_draw_images", False):
        drawn, draw_scores = [], []
        for i, chunk in enumerate(_batched(samples, batch_size)):
            imgs = pipe.generate_image([s.caption for s in chunk], seed=seed + i, **drawing)
            drawn += imgs
            draw_scores += [score_drawn_scene(img, s.scene) for img, s in zip(imgs, chunk)]
        metrics.update(summarize_drawn_scenes(draw_scores))
        report.update(drawn=drawn[:16], prompts=[s.caption for s in samples[:16]])
    return metrics, report


def evaluate_digits(pipe, n: int | None = None, *, batch_size: int = 32, draw: bool = True,
                    sampling: dict | None = None, drawing: dict | None = None,
                    seed: int = EVAL_SEED) -> tuple[dict, dict]:
    """Digit recognition on the held-out digits (1500-1796) and recognisability of drawn digits, judged by a
    classifier trained on the digits train split only (``sampling`` / ``drawing`` as in :func:`evaluate_shapes`)."""
    sampling, drawing = sampling or {}, drawing or {}
    data = load_digit_images("test")[: n or None]
    correct = []
    for chunk in _batched(data, batch_size):
        answers = pipe.answer([img for img, _ in chunk], [DIGIT_QUESTION] * len(chunk), **sampling)
        correct += [normalize_answer(a) == DIGIT_WORDS[y] for (_, y), a in zip(chunk, answers)]
    metrics: dict[str, Any] = {"n": len(data), "digit_accuracy": _mean(correct)}
    report: dict[str, Any] = {}
    if draw and getattr(pipe.model.config, "can_draw_images", False):
        labels = [i % 10 for i in range(len(data))]
        drawn = []
        for i, chunk in enumerate(_batched(labels, batch_size)):
            drawn += pipe.generate_image([digit_caption(y) for y in chunk], seed=seed + i, **drawing)
        metrics["drawn_digit_accuracy"] = DigitClassifier().fit().score(drawn, labels)
        report = {"drawn": drawn[:20], "prompts": [digit_caption(y) for y in labels[:20]]}
    return metrics, report


def format_table(results: dict) -> str:
    """A Markdown table of the headline numbers per split."""
    rows = [("split", "VQA", "caption EM", "t2i all-correct", "digit acc", "drawn digit acc")]
    fmt = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for split, m in results["splits"].items():
        rows.append((split, fmt(m.get("vqa_accuracy")), fmt(m.get("caption_exact_match")), fmt(m.get("t2i_all_correct")),
                     fmt(m.get("digit_accuracy")), fmt(m.get("drawn_digit_accuracy"))))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    def breakdowns(m: dict) -> str:
        def pct(d: dict, sep: str = ", ", fmt: str = "{k} {v}") -> str:
            return sep.join(fmt.format(k=k, v=f"{100 * v:.1f}%") for k, v in d.items())

        # (metric, how its line begins, what it lists): each part is shown when the metric is there
        parts = [("vqa_exist_by_answer", "exist when the answer is ", pct),
                 ("vqa_position_answers", "position answered with ",
                  lambda d: pct({k: v for k, v in d.items() if k != "right"})),
                 ("vqa_random_object_chance", "a random object's answer would score ", pct),
                 ("vqa_position_by_one_attribute", "the cell of an object found by its ",
                  lambda d: pct(d, " or its ", "{k} alone {v}"))]
        return "".join(f"; {lead}{show(m[key])}" for key, lead, show in parts if m.get(key))

    by_type = [f"| {s} | " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m.get("vqa_by_type", {}).items())
               + breakdowns(m) + " |" for s, m in results["splits"].items() if m.get("vqa_by_type")]
    if by_type:
        lines += ["", "| split | VQA accuracy by question type |", "|---|---|"] + by_type
    by_objects = [f"| {s} | " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in m["vqa_by_objects"].items())
                  + " |" for s, m in results["splits"].items() if m.get("vqa_by_objects")]
    if by_objects:
        lines += ["", "| split | VQA accuracy by number of objects in the scene |", "|---|---|"] + by_objects
    drawings = [f"| {s} | " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["t2i_attribute_accuracy"].items())
                + ("; all right by number of objects asked for: " + ", ".join(
                    f"{k}: {100 * v:.1f}%" for k, v in m["t2i_by_objects"].items()) if m.get("t2i_by_objects") else "")
                + " |"
                for s, m in results["splits"].items() if m.get("t2i_attribute_accuracy")]
    if drawings:
        lines += ["", "| split | drawings: attributes right, and all right by number of objects |", "|---|---|"]
        lines += drawings
    return "\n".join(lines)


def save_grid(images: Sequence[Image.Image], labels: Sequence[str], path: Path, cols: int = 4, scale: int = 3) -> None:
    """A PNG grid of images, each with its (wrapped) text label underneath."""
    if not images:
        return
    cell_w = images[0].width * scale
    text_h = 48
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (cell_w + 8), rows * (cell_w + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * (cell_w + 8), (i // cols) * (cell_w + text_h + 8)
        grid.paste(img.resize((cell_w, cell_w), Image.NEAREST), (x, y))
        words, line, lines = label.split(), "", []
        for w in words:  # greedy wrap to the cell width (~6 px per character with the default font)
            if len(line) + len(w) + 1 > cell_w // 6:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + cell_w + 2), "\n".join(lines[:4]), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run_evaluation(pipe, *, splits: Sequence[str] = SPLITS, n: int = 200, batch_size: int = 32, draw: bool = True,
                   sampling: dict | None = None, drawing: dict | None = None,
                   out_dir: str | Path | None = None) -> dict:
    """Evaluate ``pipe`` on the chosen splits (``sampling``: text sampler options, ``drawing``: ``generate_image``
    options); write ``eval.json``, ``eval.md`` and PNG grids to ``out_dir``."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown evaluation split(s) {sorted(unknown)}; choose from {SPLITS}.")
    results: dict[str, Any] = {"sampling": sampling or {}, "drawing": drawing or {}, "splits": {}}
    reports = {}
    t0 = time.perf_counter()
    for split in splits:
        if split == "digits":
            results["splits"][split], reports[split] = evaluate_digits(pipe, n, batch_size=batch_size, draw=draw,
                                                                       sampling=sampling, drawing=drawing)
        else:
            results["splits"][split], reports[split] = evaluate_shapes(pipe, split, n, batch_size=batch_size,
                                                                       draw=draw, sampling=sampling, drawing=drawing)
    results["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2))
        (out / "eval.md").write_text(format_table(results) + "\n")
        for split, rep in reports.items():
            if rep.get("captions"):
                save_grid(rep["images"], rep["captions"], out / f"captions-{split}.png")
            if rep.get("drawn"):
                save_grid(rep["drawn"], rep["prompts"], out / f"drawn-{split}.png")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmdlm eval``."""
    p = argparse.ArgumentParser(
        prog="mmdlm eval",
        description="Evaluate a model on the Shapes test and compositional splits and the held-out digits: VQA "
        "accuracy by question type, caption exact match, drawing correctness (procedural detector) and digit "
        "recognition. Prints a Markdown table and writes eval.json, eval.md and PNG grids.",
        epilog="example: mmdlm eval --model shapes-tiny --n 200 --out docs/eval",
    )
    p.add_argument("--model", default="shapes-tiny", help="bundled model name or local folder (default: shapes-tiny)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to evaluate")
    p.add_argument("--n", type=int, default=200, help="scenes per Shapes split and max digits (default 200)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-draw", action="store_true", help="skip text-to-image evaluation")
    p.add_argument("--sampler", choices=["fast", "llada"], default=None, help="text sampler (default: model's config)")
    p.add_argument("--steps", type=int, default=None, help="text denoising steps (default: model's config)")
    p.add_argument("--block-length", type=int, default=None,
                   help="text block length; smaller blocks decode more left to right (default: model's config)")
    p.add_argument("--threshold", type=float, default=None,
                   help="fast sampler's confidence threshold for parallel commits (default: model's config)")
    p.add_argument("--image-steps", type=int, default=None, help="MaskGIT drawing steps (default: model's config)")
    p.add_argument("--image-temperature", type=float, default=None,
                   help="MaskGIT sampling temperature for drawing (default 1.0; 0 = argmax)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance for drawing (default: model's config; 0 = off, e.g. for a model "
                   "trained without caption dropout such as the AR twin)")
    p.add_argument("--candidates", type=int, default=None,
                   help="drawings per prompt, keeping the one the model reads back best (default: model's config, 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for eval.json, eval.md and PNG grids")
    args = p.parse_args(argv)
    from .. import load

    pipe = load(args.model, device=args.device)
    sampling = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("block_length", args.block_length),
                                  ("threshold", args.threshold)) if v is not None}
    drawing = {k: v for k, v in (("steps", args.image_steps), ("guidance_scale", args.guidance_scale),
                                 ("temperature", args.image_temperature), ("candidates", args.candidates))
               if v is not None}
    results = run_evaluation(pipe, splits=args.splits, n=args.n, batch_size=args.batch_size, draw=not args.no_draw,
                             sampling=sampling, drawing=drawing, out_dir=args.out)
    print(format_table(results))
    return 0


__all__ = ["run_evaluation", "evaluate_shapes", "evaluate_digits", "format_table", "save_grid", "main"]
