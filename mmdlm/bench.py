"""Sampler benchmark (`mmdlm bench`): the reference, fast and AR samplers run in alternation on the same prompts;
reports tokens/s, forwards, tokens per forward, wall-time ratio and agreement with the reference (Markdown + JSON)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from .configuration_mmdlm import MMDLMConfig
from .modeling_mmdlm import MMDLMForConditionalGeneration
from .sampling import fast, llada
from .sampling.autoregressive import generate_autoregressive

# name -> (sampler, options, exact by construction). "fast" is exact: logits only at masked slots, embeddings once,
# per-row early stop; everything after it trades exactness for speed.
SETTINGS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "llada": ("llada", {}, True),
    "fast": ("fast", {}, True),
    "fast+prefix": ("fast", {"cache": "prefix"}, False),
    "fast+dual": ("fast", {"cache": "dual"}, False),
    "fast+prefix-dlm": ("fast", {"cache": "prefix", "cache_refresh": "never"}, False),
    "fast+dual+t0.9": ("fast", {"cache": "dual", "threshold": 0.9}, False),
    "fast+dual+f1": ("fast", {"cache": "dual", "factor": 1.0}, False),
    "ar": ("ar", {}, False),
}
QUICK_SETTINGS = ["llada", "fast", "fast+prefix", "fast+dual+t0.9", "ar"]
LLADA_8B = dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, rope_theta=500000.0, max_position_embeddings=4096,
                mask_token_id=126336, eos_token_id=126081, eot_token_id=126348)
TaskEval = Callable[[Any, Callable[..., torch.Tensor], argparse.Namespace], dict[str, float]]


def build_parser() -> argparse.ArgumentParser:
    """Options of ``mmdlm bench``."""
    p = argparse.ArgumentParser(
        prog="mmdlm bench", description=__doc__,
        epilog="Speed AND accuracy of each sampler on a trained model's tasks (Shapes VQA and captions, digits), with "
        "the AR twin beside it: `mmdlm bench quality --help`.")
    p.add_argument("--quick", action="store_true", help="tiny model, gen 64 and 256, batch 1: < 1 minute on 2 CPU cores")
    p.add_argument("--settings", default=None, help=f"comma list from {list(SETTINGS)} (default: all; --quick: a subset)")
    p.add_argument("--gen-lengths", default=None, help="comma list of answer lengths (default 64,256,1024; --quick 64,256)")
    p.add_argument("--batch-sizes", default=None, help="comma list of batch sizes (default 1)")
    p.add_argument("--grid", default=None, help="explicit GENxBATCH list, e.g. 256x1,256x8,1024x1 (overrides the two above)")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps-per-token", type=float, default=1.0, help="steps = gen_length x this (reference baseline: 1)")
    p.add_argument("--prompt-length", type=int, default=None, help="default 32 (--quick 16)")
    p.add_argument("--answer-length", type=int, default=None,
                   help="emulate a trained model that pads with EOS: the random model's EOS wins from this many tokens "
                        "into the answer (default: none, pure random weights)")
    p.add_argument("--repeats", type=int, default=1, help="alternation rounds (A B C A B C ...)")
    p.add_argument("--model", default=None, help="local trained model folder (default: a random-weight model)")
    p.add_argument("--llada-8b-shape", action="store_true", help="random model with LLaDA-8B's shapes (GPU)")
    p.add_argument("--layers", type=int, default=None, help="random model depth (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="random model width (default 128; --quick 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=None, help="random model vocabulary (default 1024; --quick 512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bf16", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: 1 with --quick, else torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-eval", default=None, help="MODULE:FUNCTION(model, generate, args) -> {metric: value}")
    p.add_argument("--out-dir", default="bench_results")
    return p


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(args: argparse.Namespace) -> MMDLMForConditionalGeneration:
    """The model under test: a local checkpoint, or random weights (LLaDA-8B-shaped or small)."""
    dtype, device = _dtype(args.dtype), torch.device(args.device)
    if args.model:
        return MMDLMForConditionalGeneration.from_pretrained(args.model, local_files_only=True, dtype=dtype).to(device).eval()
    if args.llada_8b_shape:
        cfg = MMDLMConfig(**LLADA_8B)
    else:
        cfg = MMDLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, mask_token_id=args.vocab - 1, eos_token_id=1, eot_token_id=2,
                          max_position_embeddings=4096)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B fp32 copy would not be needed
    try:
        with torch.device(device):
            model = MMDLMForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def add_eos_after(model, answer_start: int, answer_length: int):
    """Make EOS win at absolute positions >= answer_start + answer_length (a trained model's EOS padding)."""
    eos, limit = model.config.eos_token_id, answer_start + answer_length

    def hook(module, args, kwargs, output):
        pos, keep = kwargs.get("position_ids"), kwargs.get("logits_to_keep")
        if pos is None or output.logits is None:
            return output
        if isinstance(keep, int) or keep is None:
            n = output.logits.shape[1]
            p = pos[:, -n:]
        else:
            p = pos.gather(1, keep.to(pos.device))
        if module.config.is_causal:
            p = p + 1  # a causal model's logits at p predict position p + 1
        output.logits[..., eos] += 30.0 * (p >= limit).to(output.logits.dtype)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def make_prompts(batch: int, length: int, vocab: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts; real lengths spread over [length/2, length] so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(batch, length, dtype=torch.long)
    am = torch.zeros(batch, length, dtype=torch.long)
    for r in range(batch):
        n = length - (r * length) // (2 * batch)
        ids[r, length - n:] = torch.randint(3, min(vocab - 2, 100000), (n,), generator=g)  # below special ids
        am[r, length - n:] = 1
    return ids.to(device), am.to(device)


@contextlib.contextmanager
def causal_twin(model):
    """The same weights as an autoregressive model (the forward reads config.is_causal)."""
    before = model.config.is_causal
    model.config.is_causal = True
    try:
        yield model
    finally:
        model.config.is_causal = before


def answer(row: torch.Tensor, P: int, stops: set[int]) -> list[int]:
    """Answer tokens up to and including the first stop token."""
    out = []
    for t in row[P:].tolist():
        out.append(t)
        if t in stops:
            break
    return out


def run_one(model, name: str, ids, am, gen: int, args) -> tuple[torch.Tensor, int, int, float]:
    """(sequences, nfe, query tokens, seconds) of one sampler call."""
    kind, options, _ = SETTINGS[name]
    steps = max(gen // args.block_length, round(gen * args.steps_per_token))
    steps -= steps % (gen // args.block_length)
    common = dict(steps=steps, gen_length=gen, block_length=args.block_length, return_dict=True)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if kind == "llada":
        out = llada.generate(model, ids, am, **common)
        q = out.nfe * ids.shape[0] * (ids.shape[1] + gen)
    elif kind == "fast":
        out = fast.generate(model, ids, am, **common, **options)
        q = out.query_tokens
    else:
        with causal_twin(model):
            out = generate_autoregressive(model, ids, am, max_new_tokens=gen, eos_token_id=fast.stop_token_ids(model),
                                          return_dict=True)
        q = out.nfe * ids.shape[0]  # approximately: one query per row per step after the prefill
    sync()
    return out.sequences, out.nfe, q, time.perf_counter() - t0


def load_task_eval(spec: Optional[str]) -> Optional[TaskEval]:
    """A task-accuracy hook given as MODULE:FUNCTION; it gets (model, generate(ids, am) -> sequences, args)."""
    if not spec:
        return None
    if ":" not in spec:
        raise ValueError(f"--task-eval must look like package.module:function, got {spec!r}.")
    module, fn = spec.split(":", 1)
    return getattr(importlib.import_module(module), fn)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the grid; returns {"env": ..., "records": [one per (setting, gen, batch)]} and writes Markdown + JSON."""
    defaults = dict(layers=2, hidden=128, vocab=1024, prompt_length=32, gen_lengths="64,256,1024", batch_sizes="1")
    if args.quick:
        defaults.update(hidden=64, vocab=512, prompt_length=16, gen_lengths="64,256")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None and args.quick and args.device == "cpu":
        args.threads = 1  # tiny matrices gain nothing from threads, and spinning threads on busy cores cost 10-100x
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.settings.split(",") if args.settings else (QUICK_SETTINGS if args.quick else list(SETTINGS))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}.")
    if "llada" not in names:
        names = ["llada"] + names  # ratios and agreement are against the reference, run in the same loop
    if args.grid:
        grid = [tuple(int(v) for v in cell.lower().split("x")) for cell in args.grid.split(",")]
    else:
        grid = [(int(g), int(b)) for g in args.gen_lengths.split(",") for b in args.batch_sizes.split(",")]
    for gen, _ in grid:
        if gen % args.block_length:
            raise ValueError(f"gen length {gen} is not a multiple of --block-length {args.block_length}.")

    model = build_model(args)
    device = next(model.parameters()).device
    handle = add_eos_after(model, args.prompt_length, args.answer_length) if args.answer_length else None
    stops = set(fast.stop_token_ids(model))
    records = []
    with torch.no_grad():
        # Warm-up (discarded): kernels, allocator, lazy init, on a short answer.
        ids, am = make_prompts(1, args.prompt_length, model.config.vocab_size, args.seed, device)
        for name in names:
            run_one(model, name, ids, am, args.block_length, args)
        for gen, bsz in grid:
            ids, am = make_prompts(bsz, args.prompt_length, model.config.vocab_size, args.seed + gen + bsz, device)
            stats = {n: {"seconds": [], "nfe": [], "query_tokens": [], "tokens": 0, "match": 0, "agree": 0, "total": 0}
                     for n in names}
            for _ in range(args.repeats):
                ref_answers = None
                for name in names:  # alternation: every setting once per round, same prompts
                    seqs, nfe, q, sec = run_one(model, name, ids, am, gen, args)
                    st = stats[name]
                    st["seconds"].append(sec)
                    st["nfe"].append(nfe)
                    st["query_tokens"].append(q)
                    answers = [answer(seqs[r], ids.shape[1], stops) for r in range(bsz)]
                    st["tokens"] += sum(len(a) - (a[-1] in stops if a else 0) for a in answers)
                    if name == "llada":
                        ref_answers = answers
                    for a, ref in zip(answers, ref_answers):
                        st["match"] += a == ref
                        st["agree"] += sum(x == y for x, y in zip(a, ref))
                        st["total"] += len(ref)
            ref_seconds = sum(stats["llada"]["seconds"])
            for name in names:
                st = stats[name]
                sec, nfe = sum(st["seconds"]), sum(st["nfe"])
                records.append({
                    "setting": name, "gen_length": gen, "batch": bsz, "exact": SETTINGS[name][2],
                    "seconds": sec, "tokens": st["tokens"], "tokens_per_s": st["tokens"] / sec,
                    "nfe": nfe / args.repeats, "tokens_per_forward": st["tokens"] / max(nfe, 1) / bsz,
                    "query_tokens": sum(st["query_tokens"]) / args.repeats,
                    "speedup_vs_llada": ref_seconds / sec,
                    "exact_match_vs_llada": st["match"] / (bsz * args.repeats),
                    "token_agreement_vs_llada": st["agree"] / max(st["total"], 1),
                })
                print(_row(records[-1]), flush=True)
            # Written after every cell, so a run cut short still leaves its finished rows.
            write_reports({"env": environment(args, model), "records": records, "task_eval": {}}, args)
    if handle is not None:
        handle.remove()
    task = load_task_eval(args.task_eval)
    task_results = {}
    if task is not None:
        for name in names:
            kind, options, _ = SETTINGS[name]
            fn = (lambda i, a, o=options: fast.generate(model, i, a, **o)) if kind == "fast" else (
                lambda i, a: llada.generate(model, i, a)) if kind == "llada" else None
            if fn is not None:
                task_results[name] = task(model, fn, args)
    result = {"env": environment(args, model), "records": records, "task_eval": task_results}
    write_reports(result, args)
    return result


def environment(args: argparse.Namespace, model) -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = next(model.parameters()).device
    return {
        "torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype),
        "model": args.model or ("random LLaDA-8B shape" if args.llada_8b_shape else
                                f"random {args.layers}L d{args.hidden} h{args.heads} V{args.vocab}"),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "prompt_length": args.prompt_length, "block_length": args.block_length, "steps_per_token": args.steps_per_token,
        "answer_length": args.answer_length, "repeats": args.repeats,
    }


HEADER = ("| setting | gen | batch | exact | tokens/s | NFE | tokens/forward | query tokens | speed vs llada "
          "| exact match | token agreement |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['setting']} | {r['gen_length']} | {r['batch']} | {'yes' if r['exact'] else 'no'} | "
            f"{r['tokens_per_s']:.1f} | {r['nfe']:.0f} | {r['tokens_per_forward']:.2f} | {r['query_tokens']:.3g} | "
            f"{r['speedup_vs_llada']:.2f}x | {r['exact_match_vs_llada']:.0%} | {r['token_agreement_vs_llada']:.0%} |")


def write_reports(result: dict[str, Any], args: argparse.Namespace) -> None:
    """bench_samplers.md (table + notes) and bench_samplers.json in --out-dir."""
    os.makedirs(args.out_dir, exist_ok=True)
    env = result["env"]
    lines = ["# Sampler benchmark", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), "", HEADER]
    lines += [_row(r) for r in result["records"]]
    lines += ["", "Notes:",
              "* speed vs llada = total reference time / total time of the setting, same prompts, same process, "
              "alternating order; tokens/s counts answer tokens before the first EOS/EoT.",
              "* tokens/forward = those tokens / NFE / batch; query tokens = sum over forwards of rows x query positions.",
              "* exact match / token agreement: answer up to the first EOS compared with the reference's.",
              "* ar = greedy KV-cached decoding of the causal twin (same weights, causal mask): cost only; its text "
              "is not comparable."]
    if not args.model:
        lines.append("* Random weights: confidences are near-uniform, so threshold rules commit ~1 token per step and "
                     "agreement of approximate settings says little; these numbers are about cost, not quality.")
    if result["task_eval"]:
        lines += ["", "Task evaluation:", ""] + [f"* {k}: {v}" for k, v in result["task_eval"].items()]
    with open(os.path.join(args.out_dir, "bench_samplers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out_dir, "bench_samplers.json"), "w") as f:
        json.dump(result, f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mmdlm bench`` and ``benchmarks/bench_samplers.py``; ``mmdlm bench quality ...`` runs
    :mod:`mmdlm.eval.sampler_quality` (the task half of the benchmark)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quality"]:
        from .eval.sampler_quality import main as quality_main

        return quality_main(argv[1:], prog="mmdlm bench quality")
    args = build_parser().parse_args(argv)
    result = run_benchmark(args)
    print("\n".join([HEADER] + [_row(r) for r in result["records"]]))
    print(f"wrote {os.path.join(args.out_dir, 'bench_samplers.md')} and bench_samplers.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
