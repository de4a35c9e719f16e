"""Train several variants of the shapes-tiny recipe side by side and evaluate each: a recipe sweep for one GPU.

Each variant is one of a few base recipes with some denoiser-stage settings changed; all variants of one invocation
reuse one finished run's image tokenizer, text tokenizer and pretrained vision tower (a run of their base, whose
first three stages they share), so only the denoiser stages train.
Round 1 (2026-11-27, base configs/experiments/shapes-tiny-a2d.yaml and the diffusion-only recipe): on one H200, six
variants trained concurrently in 6 to 8 minutes (the same recipes take ~70 min each on 2 CPU cores).
Round 2 (S*, base configs/shapes-tiny.yaml: shifted logits, a tower pretrained 5 000 steps):
prepared and smoke-tested (--max-steps 2 --cpu); its shared first stages are committed in
benchmarks/results/recipe-sweep/round2-prefix/ (pass it as --reuse). S1 alone was then trained on a CPU and shipped as
shapes-tiny; S2 was later trained on a CPU.
Round 3 (2026-11-28, same base; S5-S9): one H200 trained S1 and S3-S8; S9, the lead it left, was then trained on a
CPU and shipped as shapes-tiny, so the base's causal stage now has S9's 3 000 steps (round3/README.md).
Round 4 (2026-11-28, base: the shipped recipe): S10's causal stage on the CPU (round4/README.md).
Round 5 (2026-11-28, same base): causal stages of S9-seed1 and S11-S13 on the CPU (round5/README.md).
Round 6 (2026-12-01, same base): causal stages of S14 and S15 on the CPU, after benchmarks/slot_reader_probe.py
(round6/README.md); S16 and S17 prepared for the next round.
Results: benchmarks/results/recipe-sweep/ and docs/shapes-tiny-history.md.

    python benchmarks/recipe_sweep.py --write-only                # just write the variant recipes, to read them
    python benchmarks/recipe_sweep.py --reuse runs/shapes-tiny-a2d    # train + evaluate round 1 (GPU recommended)
    python benchmarks/recipe_sweep.py --variants S1-shift2800 S2-arfrac S3-understand53 S4-ar1500 \\
        --reuse benchmarks/results/recipe-sweep/round2-prefix --pack runs/sweep2-pack   # round 2
    python benchmarks/recipe_sweep.py --variants S9-ar3000 --reuse benchmarks/results/recipe-sweep/round2-prefix \\
        --pack runs/sweep5-pack      # round 3's lead (a GPU: minutes; 2 CPU cores: about 2.5 hours)
    python benchmarks/recipe_sweep.py --variants E-diffusion-only --deadline 3600 --cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
A2D = ROOT / "configs/experiments/shapes-tiny-a2d.yaml"
DIFFUSION_ONLY = ROOT / "configs/experiments/shapes-tiny-diffusion-only.yaml"  # shipped recipe until 2026-11-27
# Round 2's base (shifted logits), trained as S1 and shipped on 2026-11-28: the shipped recipe itself.
SHIFT2800 = ROOT / "configs/shapes-tiny.yaml"
MAX3050 = ROOT / "configs/experiments/shapes-tiny-max3050.yaml"  # shipped 2026-11-27 to 11-28
REUSED_STAGES = ("image_tokenizer", "tokenizer", "vision_pretrain")

class Variant(NamedTuple):
    """One variant: a base recipe with some denoiser-stage settings changed (None keeps the base's)."""

    base: Path
    ar_steps: Optional[int] = None        # the causal (first denoiser) stage's steps
    diff_steps: Optional[int] = None      # the last (diffusion) stage's steps
    lr: Optional[float] = None            # the last stage's lr
    # Source weights in the base's order (shapes caption, shapes vqa, shapes t2i, digits vqa+caption, digits t2i).
    weights: Optional[list[float]] = None
    loss: Optional[dict] = None           # loss options of the last stage, merged into the base's
    # Field overrides of the base's sources by index ({1: {"n": 30000}}), then sources appended. The reused first
    # stages saw the base's data; the variant changes only what its denoiser stages see.
    sources: Optional[dict[int, dict]] = None
    add_sources: Optional[list[dict]] = None
    # Model options merged into the base's; only the denoiser stages are trained with them (the reused tower is not).
    model: Optional[dict] = None
    causal: Optional[dict] = None         # fields of the causal (first denoiser) stage, merged into the base's
    diffusion: Optional[dict] = None      # fields of the last (diffusion) stage, merged into the base's
    seed: Optional[int] = None            # the run's seed (the reused first stages keep the ones they were built with)


def _chat_source(weight: float) -> dict:
    """A source of Shapes conversations (caption and every question of a training scene in one row)."""
    return {"type": "shapes", "split": "train", "n": 6000, "tasks": ["chat"], "weight": weight}


def _questions_source(weight: float) -> dict:
    """Every question of 30 000 training scenes that the base's sources (seed 0) do not hold."""
    return {"type": "shapes", "split": "train", "n": 30000, "seed": 1, "tasks": ["vqa"], "weight": weight}


def _position_source(weight: float) -> dict:
    """Position questions only ("where is the blue square?"), one per scene of 30 000 training scenes that the base's
    sources (seed 0) do not hold."""
    return {"type": "shapes", "split": "train", "n": 30000, "seed": 1, "tasks": ["vqa"], "question_types": ["position"],
            "weight": weight}


# Round 6's causal stages: next-token loss without the EOS padding targets, on 64 unpadded rows a step, and a
# mixture of questions only (the caption source becomes 30 000 other scenes' questions; digits keep their question).
_AR_WITHOUT_PADDING = {"objective": "ar", "pad_counts_as_answer": False}
_UNPADDED_64 = {"batch_size": 64, "min_answer_length": 0, "loss": _AR_WITHOUT_PADDING}
_QUESTIONS_ONLY = {0: {"tasks": ["vqa"], "n": 30000, "seed": 1}, 3: {"tasks": ["vqa"]}}


VARIANTS: dict[str, Variant] = {
    "A-a2d": Variant(A2D),
    "B-a2d-lr2e-4": Variant(A2D, lr=2e-4),
    "C-ar3000": Variant(A2D, 3000, 2200, 2e-4),
    "C2-ar4500": Variant(A2D, 4500, 1700, 2e-4),
    "D-understand-heavy": Variant(A2D, lr=2e-4, weights=[3.0, 3.0, 2.0, 1.0, 1.0]),
    "E-diffusion-only": Variant(DIFFUSION_ONLY),
    # R = configs/shapes-tiny.yaml as shipped on 2026-11-27 until it got a max-pooled tower and 3 050 diffusion steps
    # (MAX3050, shipped until 2026-11-28).
    "R-ar1000-t2i57": Variant(A2D, 1000, 2650, weights=[1.2, 1.2, 3.0, 0.6, 1.0]),
    # S* variants state their causal steps: the base had 1 000 until S9 (3 000) shipped on 2026-11-28.
    # Round 2, all at about the cost of the max3050 recipe on 2 CPU cores. A drawing batch costs ~5x an understanding
    # one (`python benchmarks/recipe_cost.py configs/shapes-tiny.yaml --cpu`, 2-core AVX2 CPU,
    # fp32: 3.9 vs 0.75 s per diffusion step), so S3 and S4 trade drawing steps for cheap reading steps:
    "S1-shift2800": Variant(SHIFT2800, 1000),
    # a quarter of the understanding batches of the diffusion stage trained by next-token loss (same cost)
    "S2-arfrac": Variant(SHIFT2800, 1000, loss={"ar_fraction": 0.25}),
    # 53% understanding batches instead of 43%, 3 160 steps: S1's cost, about as many drawing batches (1 490 vs 1 600)
    "S3-understand53": Variant(SHIFT2800, 1000, 3160, weights=[1.8, 1.8, 3.0, 0.9, 1.0]),
    # 500 more (cheap) causal steps, 100 fewer diffusion steps (about 2 CPU minutes more than S1)
    "S4-ar1500": Variant(SHIFT2800, 1500, 2700),
    # Round 3, against S1's binding failure (VQA 88% on one-object scenes, 55% on three). S1's understanding rows
    # come from 6 000 scenes with one question of each type each (train understanding loss about 0.2 over its last
    # 400 steps, held-out 0.53: docs/shapes-tiny-history/shift2800/training-metrics.jsonl), so: the captions and
    # questions of 30 000 scenes (same rows per step, same cost)...
    "S5-scenes30k": Variant(SHIFT2800, 1000, sources={0: {"n": 30000}, 1: {"n": 30000}}),
    # ...half of the VQA rows replaced by conversations asking all of a scene's questions (and its caption) at once:
    # one image, up to 7 supervised answers in one (longer) row...
    "S6-chat": Variant(SHIFT2800, 1000, weights=[1.2, 0.6, 3.0, 0.6, 1.0], add_sources=[_chat_source(0.6)]),
    # ...and S4's longer causal stage on S5's scenes.
    "S7-ar1500-scenes30k": Variant(SHIFT2800, 1500, 2700, sources={0: {"n": 30000}, 1: {"n": 30000}}),
    # S3's mixture and steps with half of its VQA rows as S6's conversations.
    "S8-chat53": Variant(SHIFT2800, 1000, 3160, weights=[1.8, 0.9, 3.0, 0.9, 1.0],
                         add_sources=[_chat_source(0.9)]),
    # Round 3's reading evals (n 1 000) found existence answered by one constant word by every S model, while round
    # 1's C (3 000 causal steps) answered it right 94%: 3 000 causal steps before S1's whole diffusion stage. Its
    # causal stage alone, trained on the 2-core CPU (35.9 min vs S1's 11.9), answers existence right 82.5%; the whole
    # model (VQA 83.8% vs S1's 73.6% on 1 000 test scenes) was shapes-tiny from 2026-11-28 to 2026-12-05 and is the
    # base's own model (the bundled one continues it with configs/shapes-tiny-questions.yaml).
    "S9-ar3000": Variant(SHIFT2800, ar_steps=3000),
    # Round 4: the shipped S9's wrong answers to position questions mostly name another object's cell (33.5% of
    # them; an empty cell 9.0%): the max-pooled slots say what is in a cell, not which cell, and RoPE puts position
    # into attention scores only, not into what a lookup by content reads. A learned embedding per slot. (Its causal
    # stage did not answer position questions better: round4/README.md; and round 6's small readers learn position
    # questions with RoPE alone, so a slot's cell does reach a reader without the embedding.)
    "S10-slotpos": Variant(SHIFT2800, model={"image_slot_embeddings": True}),
    # Round 5: the shipped model captions positions right 99% of the time but answers "where is the blue square?"
    # 57%. Perhaps its tower's features suit a captioner that reads the cells in order, not questions that look one
    # object up by colour and shape: this causal stage trains the tower too (a quarter of the stage's lr); the
    # diffusion stage keeps it as the causal stage left it. (At 1 000 steps: no change; round5/README.md.)
    "S11-tower-tuned": Variant(SHIFT2800, 1000, causal={"freeze": [], "vision_tower_lr": 2e-4}),
    # Round 4 found existence questions learned by S9's causal stage and not by S10's: the shipped recipe again with
    # another seed (model initialization, batches and noise of the denoiser stages) tells whether that is chance.
    # (Its causal stage learned them too: 90.1%.)
    "S9-seed1": Variant(SHIFT2800, ar_steps=3000, seed=1),
    # Every model answers position questions no better than naming a random object's cell (61%), though the object
    # found by its colour alone would give 96%: S10's slot embeddings (the cell in what a lookup reads) plus a source
    # of position questions only, from 30 000 other scenes, about 5x the position rows per step. (Position 66.5% at
    # 1 000 steps against 59.9% for S10; colour-of-shape fell to 28.2%.)
    "S12-slotpos-where": Variant(SHIFT2800, 1000, model={"image_slot_embeddings": True},
                                 add_sources=[_position_source(1.2)]),
    # S12's position questions on the shipped recipe as it is (no slot embeddings, 3 000 causal steps). (Position
    # 59.9%, the random-object level: not a shortage of examples.)
    "S13-where": Variant(SHIFT2800, 3000, add_sources=[_position_source(1.2)]),
    # Round 6: a 4-layer RoPE reader on the frozen tower's slots, trained on the questions alone (one answer per row),
    # answers colour-of-shape and position questions at 97% and 89% (round6/README.md), so the slots and RoPE suffice.
    # The causal stage's next-token loss is a mean over every target token, and each understanding row is EOS-padded
    # to 32 answer tokens: a one-word answer is ~2 of its row's 32 targets, the rest trivial padding. Here the padding
    # after the closing EOS is not a target (pad_counts_as_answer: false). (No change at 1 000 steps.)
    "S14-ar-nopad": Variant(SHIFT2800, 1000, causal={"loss": _AR_WITHOUT_PADDING}),
    # The same reader needs its questions in number: trained on 48 000 question rows it answers colour-of-shape,
    # position and existence questions at the random-object level, as every causal stage so far (S9's saw about
    # 38 000 Shapes question rows); on 192 000, at 94%, 81%, 76% (round6/README.md). A causal-stage probe, not a
    # recipe: questions only (the caption source becomes 30 000 other scenes' questions, digits keep their
    # question), 64 unpadded rows a step (about the tokens of S9's 32 padded ones), 3 000 steps: ~150 000 Shapes
    # question rows. Its diffusion stage would draw no captions. (Colour-of-shape and position still at the
    # random-object level, existence at chance, shape-of-colour 62.8% against S9's 89.0%; the 6 x 256 probe reader
    # learned the lookups from 192 000 rows, not from 96 000, so more rows are the next probe.)
    "S15-questions": Variant(SHIFT2800, 3000, sources=_QUESTIONS_ONLY, causal=_UNPADDED_64),
    # Prepared for the next probes (not trained yet): S15 with about 230 000 question rows (4 500 steps), past the
    # 192 000 the probe readers learned from...
    "S16-questions-230k": Variant(SHIFT2800, 4500, sources=_QUESTIONS_ONLY, causal=_UNPADDED_64),
    # ...and a whole recipe built on it: the causal stage draws the shipped sources plus 30 000 other scenes'
    # questions (source_weights: about 77% Shapes questions, 15% captions, 8% digits; ~220 000 question rows), the
    # diffusion stage the shipped mixture without the added source.
    "S17-questions-captions": Variant(SHIFT2800, 4500, add_sources=[_questions_source(1.0)],
                                      causal={**_UNPADDED_64, "source_weights": [1.2, 1.2, 3.0, 0.6, 1.0, 4.8]},
                                      diffusion={"source_weights": [1.2, 1.2, 3.0, 0.6, 1.0, 0.0]}),
}


def variant_recipe(name: str, out_dir: Path) -> dict:
    """The recipe of one variant, as a dict, writing its outputs to ``out_dir / name``."""
    v = VARIANTS[name]
    recipe = copy.deepcopy(yaml.safe_load(v.base.read_text()))
    recipe["output_dir"] = str(out_dir / name)
    if v.seed is not None:
        recipe["seed"] = v.seed
    denoisers = [s for s in recipe["stages"] if s["type"] == "denoiser"]
    if v.ar_steps is not None:
        if not denoisers[0].get("is_causal"):
            raise ValueError(f"{name}: AR steps given but {v.base.name} has no causal denoiser stage")
        denoisers[0]["steps"] = v.ar_steps
    if v.causal:
        if not denoisers[0].get("is_causal"):
            raise ValueError(f"{name}: causal-stage fields given but {v.base.name} has no causal denoiser stage")
        denoisers[0].update(copy.deepcopy(v.causal))
    if v.diffusion:
        denoisers[-1].update(copy.deepcopy(v.diffusion))
    if v.diff_steps is not None:
        denoisers[-1]["steps"] = v.diff_steps
    if v.lr is not None:
        denoisers[-1]["lr"] = v.lr
    sources = recipe["data"]["sources"]
    if v.weights is not None:
        if len(sources) != len(v.weights):
            raise ValueError(f"{name}: {len(v.weights)} weights for {len(sources)} sources in {v.base.name}")
        for src, w in zip(sources, v.weights):
            src["weight"] = w
    for index, fields in (v.sources or {}).items():
        sources[index].update(copy.deepcopy(fields))
    sources.extend(copy.deepcopy(v.add_sources or []))
    if v.loss:
        denoisers[-1]["loss"] = {**denoisers[-1].get("loss", {}), **v.loss}
    reused = sorted(set(v.model or {}) & {"vision_tower", "image_tokenizer", "image_processor"})
    if reused:
        raise ValueError(f"{name}: model options {reused} shape the reused first stages; a variant cannot change them")
    recipe["model"].update(copy.deepcopy(v.model or {}))
    return recipe


def write_recipes(names: list[str], out_dir: Path) -> dict[str, Path]:
    """Write each variant's recipe to ``out_dir/recipes/NAME.yaml``; return their paths."""
    folder = out_dir / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        base = VARIANTS[name].base.relative_to(ROOT)
        text = f"# recipe-sweep variant {name} (from {base}; written by benchmarks/recipe_sweep.py)\n"
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(text + yaml.safe_dump(variant_recipe(name, out_dir), sort_keys=False))
    return paths


def _tail(path: Path, n: int = 200) -> str:
    try:
        return path.read_text(errors="replace")[-n:].replace("\n", " | ").replace("\r", " ")
    except OSError:
        return ""


def run_sweep(args: argparse.Namespace) -> dict[str, dict]:
    """Train all variants concurrently, evaluate each one that finishes; return {name: status and eval summary}."""
    out_dir = Path(args.out)
    recipes = write_recipes(args.variants, out_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads), TQDM_MININTERVAL="5",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.time()
    jobs: dict[str, dict] = {}
    for name, recipe in recipes.items():
        run_dir = out_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        for stage in REUSED_STAGES:  # the trainer skips a stage whose output folder exists
            shutil.copytree(Path(args.reuse) / stage, run_dir / stage, dirs_exist_ok=True)
        cmd = [sys.executable, "-m", "mmdlm.training", str(recipe)] + (["--cpu"] if args.cpu else []) + \
            (["--max-steps", str(args.max_steps)] if args.max_steps else [])
        jobs[name] = {"phase": "train", "dir": run_dir, "start": time.time()}
        jobs[name]["proc"] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(run_dir / "train.log", "w"),
                                              stderr=subprocess.STDOUT)
    device = "cpu" if args.cpu else args.device
    last_report = 0.0
    while any(j["proc"] is not None for j in jobs.values()):
        now = time.time() - t0
        for name, job in jobs.items():
            proc = job["proc"]
            if proc is None or proc.poll() is None:
                continue
            job[f"{job['phase']}_s"] = round(time.time() - job["start"], 1)
            print(f"[{now:5.0f}s] {name}: {job['phase']} exited with {proc.returncode}", flush=True)
            if job["phase"] == "train" and proc.returncode == 0:
                cmd = [sys.executable, "-m", "mmdlm.cli", "eval", "--model", str(job["dir"] / "model"),
                       "--splits", *args.splits, "--n", str(args.eval_n), "--batch-size", str(args.eval_batch_size),
                       "--device", device,
                       "--out", str(job["dir"] / "eval")]
                job.update(phase="eval", start=time.time())
                job["proc"] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(job["dir"] / "eval.log", "w"),
                                               stderr=subprocess.STDOUT)
            else:
                if proc.returncode != 0:
                    print(_tail(job["dir"] / f"{job['phase']}.log", 2000), flush=True)
                job.update(phase="done" if proc.returncode == 0 else f"failed in {job['phase']}", proc=None)
        if now > args.deadline:
            for name, job in jobs.items():
                if job["proc"] is not None:
                    job["proc"].kill()
                    job.update(phase=f"stopped by --deadline in {job['phase']}", proc=None)
            break
        if time.time() - last_report > 30:
            last_report = time.time()
            for name, job in jobs.items():
                if job["proc"] is not None:
                    print(f"[{now:5.0f}s] {name} {job['phase']}: {_tail(job['dir'] / (job['phase'] + '.log'))}",
                          flush=True)
        time.sleep(2)
    summary = {}
    for name, job in jobs.items():
        report = job["dir"] / "eval" / "eval.json"
        summary[name] = {"status": job["phase"], "train_s": job.get("train_s"), "eval_s": job.get("eval_s"),
                         "eval": json.loads(report.read_text()) if report.exists() else None}
    return summary


def summary_table(summary: dict[str, dict]) -> str:
    """A Markdown table: one row per variant, the test split's headline metrics and digits."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.0f}%"

    rows = ["| variant | status | train s | VQA | caption EM | t2i all-correct | digit acc | drawn digit acc |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        splits = (s["eval"] or {}).get("splits", {})
        test, digits = splits.get("test", {}), splits.get("digits", {})
        rows.append(f"| {name} | {s['status']} | {s['train_s'] or '-'} | {pct(test.get('vqa_accuracy'))} | "
                    f"{pct(test.get('caption_exact_match'))} | {pct(test.get('t2i_all_correct'))} | "
                    f"{pct(digits.get('digit_accuracy'))} | {pct(digits.get('drawn_digit_accuracy'))} |")
    return "\n".join(rows) + "\n"


def rank_key(report: dict | None) -> tuple:
    """Sort key of a variant's eval report, best first when sorted in reverse: shippable drawing (drawn digits
    >= 90%) first, then VQA + caption exact match on the test split, then drawn digits."""
    splits = (report or {}).get("splits", {})
    drawn = splits.get("digits", {}).get("drawn_digit_accuracy") or 0.0
    test = splits.get("test", {})
    return drawn >= 0.9, (test.get("vqa_accuracy") or 0.0) + (test.get("caption_exact_match") or 0.0), drawn


STAGE_FOLDERS = {"model", "checkpoints", "image_tokenizer", "tokenizer", "vision_pretrain"}


def pack(sweep_dir: Path, dest: Path, models: int = 2, part_bytes: int = 15 << 20) -> list[Path]:
    """Bundle a finished sweep for transfer (a GPU machine's output folder takes few, small files): ``results.tar``
    with every log, metrics file, recipe and evaluation (no weights), and the ``models`` best-ranked variants' final
    model folders as ``NAME.model.tar.part-NN`` pieces of at most ``part_bytes`` (``cat NAME.model.tar.part-* | tar
    xf -`` restores ``model/``). Returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "results.tar", "w") as tar:
        for path in sorted(sweep_dir.rglob("*")):
            rel = path.relative_to(sweep_dir)
            if path.is_file() and not STAGE_FOLDERS.intersection(rel.parts) and \
                    not any(part.startswith("denoiser") for part in rel.parts[:-1]):
                tar.add(path, arcname=str(rel))
    written = [dest / "results.tar"]
    done = [d for d in sorted(sweep_dir.iterdir()) if (d / "model" / "config.json").is_file()]

    def report(d: Path) -> dict | None:
        path = d / "eval" / "eval.json"
        return json.loads(path.read_text()) if path.is_file() else None

    for d in sorted(done, key=lambda d: rank_key(report(d)), reverse=True)[:models]:
        bundle = dest / f"{d.name}.model.tar"
        with tarfile.open(bundle, "w") as tar:
            tar.add(d / "model", arcname="model")
        with open(bundle, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(part_bytes), b"")):
                part = dest / f"{bundle.name}.part-{i:02d}"
                part.write_bytes(chunk)
                written.append(part)
        bundle.unlink()
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="variants:\n" + "\n".join(f"  {n}" for n in VARIANTS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--reuse", default="runs/shapes-tiny-a2d",
                   help="finished run whose image_tokenizer, tokenizer and vision_pretrain folders are reused: one of "
                        "configs/experiments/shapes-tiny-a2d.yaml (the variants' average-pooled tower)")
    p.add_argument("--out", default="runs/sweep", help="folder for the recipes, runs and summary")
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds; variants still running are stopped")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    p.add_argument("--splits", nargs="+", default=["test", "digits"])
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda", help="evaluation device (training picks the GPU if there is one)")
    p.add_argument("--cpu", action="store_true", help="train and evaluate on the CPU")
    p.add_argument("--max-steps", type=int, default=None, help="cap every stage's steps (a smoke test of the sweep)")
    p.add_argument("--pack", default=None, metavar="DIR",
                   help="afterwards, bundle the results and the 2 best models into DIR for transfer (see pack())")
    p.add_argument("--write-only", action="store_true", help="write the variant recipes and stop")
    args = p.parse_args(argv)
    if args.write_only:
        for path in write_recipes(args.variants, Path(args.out)).values():
            print(path)
        return
    bases = sorted({str(VARIANTS[name].base.relative_to(ROOT)) for name in args.variants})
    if len(bases) > 1:
        p.error(f"the variants come from different base recipes ({', '.join(bases)}), whose first stages differ: "
                "sweep each base's variants separately, each with --reuse pointing at a run of its base")
    missing = [s for s in REUSED_STAGES if not (Path(args.reuse) / s).is_dir()]
    if missing:
        p.error(f"--reuse {args.reuse} lacks {', '.join(missing)}: train {bases[0]} first "
                "(or point --reuse at a finished run of it)")
    summary = run_sweep(args)
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    table = summary_table(summary)
    Path(args.out, "summary.md").write_text(table)
    print(table)
    if args.pack:
        for path in pack(Path(args.out), Path(args.pack)):
            print(f"packed {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
