"""Sampler speed *and* quality on a trained model's real tasks (Shapes VQA and captions, digit recognition):
each sampler setting runs in alternation on the same batches; reports accuracy, tokens/s, forward passes,
tokens per forward, speed-up over the reference sampler and exact agreement with the reference's answers.
An autoregressive twin (``configs/ar-twin.yaml``), when given, runs on the same batches as one more row."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.digits import DIGIT_QUESTION, DIGIT_WORDS, load_digit_images
from ..data.shapes import CAPTION_PROMPT, ShapesWorld
from .checkers import normalize_answer, score_caption
from .evaluate import EVAL_SEED

# name -> sampling options for mmdlm.sampling.generate (None disables a rule; the reference takes no fast options).
SETTINGS: dict[str, dict[str, Any]] = {
    "llada": dict(sampler="llada"),
    "fast-exact": dict(sampler="fast", threshold=None, cache="none"),
    "fast+t0.9": dict(sampler="fast", threshold=0.9, cache="none"),
    "fast+t0.7": dict(sampler="fast", threshold=0.7, cache="none"),
    "fast+prefix+t0.9": dict(sampler="fast", threshold=0.9, cache="prefix"),
    "fast+dual+t0.9": dict(sampler="fast", threshold=0.9, cache="dual"),
}


def build_tasks(n: int, seed: int = EVAL_SEED) -> list[dict]:
    """(image, question, reference answer, task) items: one VQA question and one caption per Shapes test scene,
    and ``n`` held-out digits."""
    rng = random.Random(seed)
    items = []
    for s in ShapesWorld("test", n, seed):
        if s.qas:
            qa = rng.choice(s.qas)
            items.append({"image": s.image, "question": qa.question, "reference": qa.answer, "task": "vqa"})
        items.append({"image": s.image, "question": CAPTION_PROMPT, "reference": s.scene, "task": "caption"})
    for img, label in load_digit_images("test")[:n]:
        items.append({"image": img, "question": DIGIT_QUESTION, "reference": DIGIT_WORDS[label], "task": "digit"})
    return items


def _correct(task: str, answer: str, reference: Any) -> bool:
    if task == "caption":
        return bool(score_caption(answer, reference)["exact_match"])
    return normalize_answer(answer) == str(reference).lower()


AR_TWIN = "ar-twin"


def _chat_inputs(proc, chunk: Sequence[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    messages = [[{"role": "user", "content": [{"type": "image", "image": it["image"]},
                                              {"type": "text", "text": it["question"]}]}] for it in chunk]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    return inputs["input_ids"].to(device), inputs["attention_mask"].to(device), inputs["pixel_values"].to(device)


def run_sampler_quality(pipe, *, n: int = 100, batch_size: int = 16, settings: Sequence[str] | None = None,
                        gen_length: int | None = None, ar_pipe=None) -> dict[str, Any]:
    """Run every setting on the same batches in alternation; returns per-setting totals and per-task accuracy.

    ``ar_pipe`` (optional) is a pipeline around a causal model (``config.is_causal``), e.g. the AR twin; it decodes
    greedily with its KV cache on the same items, after the diffusion settings of each batch, as row "ar-twin"."""
    from ..sampling import generate
    from ..sampling.autoregressive import generate_autoregressive
    from ..sampling.fast import stop_token_ids

    names = list(settings or SETTINGS)
    if "llada" not in names:
        names.insert(0, "llada")
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown sampler settings {unknown}; choose from {list(SETTINGS)}.")
    model, proc = pipe.model, pipe.processor
    stops = set(stop_token_ids(model))
    gen = gen_length or int(pipe.generation_config.gen_length)
    items = build_tasks(n)
    if ar_pipe is not None and not getattr(ar_pipe.model.config, "is_causal", False):
        raise ValueError("ar_pipe must hold a causal model (config.is_causal=True), e.g. one trained by "
                         "configs/ar-twin.yaml; got a bidirectional one.")
    rows_of = names + ([AR_TWIN] if ar_pipe is not None else [])
    stats = {s: {"seconds": 0.0, "nfe": 0, "tokens": 0, "rows": 0, "agree": 0, "correct": {}, "count": {}}
             for s in rows_of}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids, am, pixels = _chat_inputs(proc, chunk, pipe.device)
        # The twin's prompts are tokenized before timing, as the diffusion settings' are.
        ar_inputs = _chat_inputs(ar_pipe.processor, chunk, ar_pipe.device) if ar_pipe is not None else None
        reference = None
        for name in rows_of:  # alternation: every setting once per batch, same inputs
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == AR_TWIN:
                    a_ids, a_am, a_pixels = ar_inputs
                    P = a_ids.shape[1]
                    out = generate_autoregressive(ar_pipe.model, a_ids, a_am, max_new_tokens=gen, return_dict=True,
                                                  image_features=ar_pipe.model.image_features(a_pixels))
                else:
                    P = ids.shape[1]
                    out = generate(model, ids, am, pixel_values=pixels, gen_length=gen, block_length=gen, steps=gen,
                                   **SETTINGS[name])
            seconds = time.perf_counter() - t0
            answers = (ar_pipe.processor if name == AR_TWIN else proc).batch_decode_answers(out.sequences,
                                                                                             [P] * len(chunk))
            st = stats[name]
            st["seconds"] += seconds
            st["nfe"] += int(out.nfe or 0)
            st["rows"] += len(chunk)
            for row in out.sequences[:, P:].tolist():
                st["tokens"] += next((i for i, t in enumerate(row) if t in stops), len(row))
            if name == "llada":
                reference = answers
            st["agree"] += sum(a == r for a, r in zip(answers, reference))
            for it, a in zip(chunk, answers):
                st["correct"][it["task"]] = st["correct"].get(it["task"], 0) + _correct(it["task"], a, it["reference"])
                st["count"][it["task"]] = st["count"].get(it["task"], 0) + 1
    ref_seconds = stats["llada"]["seconds"]
    results = {}
    for name, st in stats.items():
        results[name] = {
            "options": SETTINGS.get(name, {"decoding": "greedy autoregressive, KV cache"}),
            "accuracy": {t: st["correct"][t] / st["count"][t] for t in sorted(st["count"])},
            "tokens_per_s": st["tokens"] / st["seconds"],
            "nfe_per_batch": st["nfe"] / -(-len(items) // batch_size),
            "tokens_per_forward": st["tokens"] / max(st["nfe"], 1) / batch_size,
            "speedup_vs_llada": ref_seconds / st["seconds"],
            "agreement_vs_llada": st["agree"] / st["rows"],
            "seconds": st["seconds"],
        }
    return {"n_items": len(items), "batch_size": batch_size, "gen_length": gen, "threads": torch.get_num_threads(),
            "device": str(pipe.device), "settings": results}


def format_quality_table(result: dict[str, Any]) -> str:
    """Markdown table of one run of :func:`run_sampler_quality`."""
    tasks = sorted(next(iter(result["settings"].values()))["accuracy"])
    head = ["setting", *[f"{t} acc" for t in tasks], "tokens/s", "speed vs llada", "tokens/forward", "agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["settings"].items():
        lines.append("| " + " | ".join([name, *[f"{100 * r['accuracy'][t]:.1f}%" for t in tasks],
                                          f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_llada']:.2f}x",
                                          f"{r['tokens_per_forward']:.2f}", f"{100 * r['agreement_vs_llada']:.0f}%"]) + " |")
    return "\n".join(lines)


def build_parser(prog: str = "python -m mmdlm.eval.sampler_quality") -> argparse.ArgumentParser:
    """Options of ``mmdlm bench quality`` (= ``python -m mmdlm.eval.sampler_quality``)."""
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        epilog="example: mmdlm bench quality --model shapes-tiny --ar-model runs/ar-twin/model --n 24 --batch-size 8 "
        "--out docs/benchmark")
    p.add_argument("--model", default="shapes-tiny")
    p.add_argument("--n", type=int, default=100, help="Shapes test scenes (one VQA + one caption each) and digits")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--settings", default=None, help=f"comma list from {list(SETTINGS)} (default: all)")
    p.add_argument("--ar-model", default=None,
                   help="folder of a trained AR twin (configs/ar-twin.yaml) to run on the same items as one more row")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for sampler-quality.json and sampler-quality.md")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m mmdlm.eval.sampler_quality") -> int:
    """``mmdlm bench quality`` / ``python -m mmdlm.eval.sampler_quality``: the task half of the sampler benchmark."""
    args = build_parser(prog).parse_args(argv)
    from .. import load

    pipe = load(args.model, device=args.device)
    ar_pipe = load(args.ar_model, device=args.device) if args.ar_model else None
    result = run_sampler_quality(pipe, n=args.n, batch_size=args.batch_size, ar_pipe=ar_pipe,
                                 settings=args.settings.split(",") if args.settings else None)
    table = format_quality_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sampler-quality.json").write_text(json.dumps(result, indent=2))
        (out / "sampler-quality.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
