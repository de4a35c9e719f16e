"""Pretrain shapes-tiny's vision tower in a few variants (pooling, resolution, depth) and read each with its captioner.

Each variant is configs/experiments/shapes-tiny-max3050.yaml (the previous shapes-tiny's recipe) up to its
`vision_pretrain` stage (the image tokenizer and text tokenizer are reused from a finished run) with the tower
changed; a 2-step causal denoiser stage stays only because a recipe must use the tower it pretrains. The captioner
that pretrains the tower (a 2-layer causal decoder) is then scored by `mmdlm eval --splits test --no-draw`: how well
can a small reader tell colour and shape from the tower's slots?
About 5 minutes per variant on 2 CPU cores. Results: docs/shapes-tiny-history.md.

    python benchmarks/tower_sweep.py --write-only
    python benchmarks/tower_sweep.py --reuse runs/shapes-tiny --variants avg max no-pool
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The recipe of the shapes-tiny shipped 2026-11-27 to 11-28, which the sweep was run against.
BASE = ROOT / "configs/experiments/shapes-tiny-max3050.yaml"
REUSED_STAGES = ("image_tokenizer", "tokenizer")

# name -> changes to BASE's model.vision_tower (model_kwargs unchanged).
VARIANTS: dict[str, dict] = {
    "avg": {"pool_type": "avg"},                              # the tower shipped until 2026-11-27
    "max": {"pool_type": "max"},                              # = the max3050 recipe
    "no-pool": {"pool_grid": None},                           # all 8x8 = 64 slots
    "avg-128px": {"pool_type": "avg", "image_size": 128},     # the same tower on 2x upsampled images
    "max-layer3": {"pool_type": "max", "select_layer": 3},    # stride 16: a 4x4 map pooled to 3x3
    "max-grid4": {"pool_type": "max", "pool_grid": 4},        # 16 slots
}


def variant_recipe(name: str, out_dir: Path) -> dict:
    """BASE cut after `vision_pretrain` (+ a 2-step causal stage) with variant ``name``'s tower."""
    recipe = copy.deepcopy(yaml.safe_load(BASE.read_text()))
    recipe["output_dir"] = str(out_dir / name)
    recipe["model"]["vision_tower"].update(copy.deepcopy(VARIANTS[name]))
    stages = recipe["stages"]
    k = next(i for i, s in enumerate(stages) if s["type"] == "vision_pretrain")
    first_denoiser = stages[k + 1]
    if first_denoiser["type"] != "denoiser":
        raise ValueError(f"{BASE.name}: expected a denoiser stage right after vision_pretrain")
    first_denoiser.update(steps=2, warmup_steps=1)
    recipe["stages"] = stages[: k + 2]
    return recipe


def write_recipes(names: list[str], out_dir: Path) -> dict[str, Path]:
    """Write each variant's recipe to ``out_dir/recipes/NAME.yaml``; return their paths."""
    folder = out_dir / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(f"# tower-sweep variant {name} (written by benchmarks/tower_sweep.py)\n"
                               + yaml.safe_dump(variant_recipe(name, out_dir), sort_keys=False))
    return paths


def run_variant(name: str, recipe: Path, args: argparse.Namespace) -> dict:
    """Pretrain one variant's tower, then evaluate its captioner; returns timings and the eval report."""
    run_dir = Path(args.out) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in REUSED_STAGES:  # the trainer skips a stage whose output folder exists
        shutil.copytree(Path(args.reuse) / stage, run_dir / stage, dirs_exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if args.jobs > 1:  # several small runs at one thread each use 2 cores better than one run at two threads
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        train = subprocess.run([sys.executable, "-m", "mmdlm.training", str(recipe), "--cpu"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    result = {"train_s": round(time.time() - t0, 1), "status": "failed in train", "eval": None}
    if train.returncode != 0:
        return result
    cmd = [sys.executable, "-m", "mmdlm.cli", "eval", "--model", str(run_dir / "vision_pretrain"), "--splits", "test",
           "--n", str(args.eval_n), "--batch-size", "32", "--no-draw", "--device", "cpu",
           "--out", str(run_dir / "eval")]
    with open(run_dir / "eval.log", "w") as log:
        ok = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode == 0
    result["status"] = "done" if ok else "failed in eval"
    if ok:
        result["eval"] = json.loads((run_dir / "eval" / "eval.json").read_text())
    return result


def summary_table(summary: dict[str, dict]) -> str:
    """A Markdown table: one row per variant, the captioner's test-split reading."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = ["| tower variant | status | VQA | caption EM | colour words | shape words | size | position |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        test = ((s["eval"] or {}).get("splits") or {}).get("test", {})
        attr = test.get("caption_attribute_accuracy", {})
        rows.append(f"| {name} | {s['status']} | {pct(test.get('vqa_accuracy'))} | "
                    f"{pct(test.get('caption_exact_match'))} | "
                    + " | ".join(pct(attr.get(a)) for a in ("color", "shape", "size", "position")) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="variants:\n" + "\n".join(f"  {n}: {v}" for n, v in VARIANTS.items()))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--reuse", default="runs/shapes-tiny",
                   help="finished run whose image_tokenizer and tokenizer folders are reused")
    p.add_argument("--out", default="runs/tower-sweep", help="folder for the recipes, runs and summary")
    p.add_argument("--eval-n", type=int, default=100, help="test scenes to evaluate (default 100)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, one thread each if > 1")
    p.add_argument("--write-only", action="store_true", help="write the variant recipes and stop")
    args = p.parse_args(argv)
    paths = write_recipes(args.variants, Path(args.out))
    if args.write_only:
        print("\n".join(str(p) for p in paths.values()))
        return
    missing = [s for s in REUSED_STAGES if not (Path(args.reuse) / s).is_dir()]
    if missing:
        p.error(f"--reuse {args.reuse} lacks {', '.join(missing)}: train configs/shapes-tiny.yaml first "
                "(its tokenizer stages are the same)")
    def one(item: tuple[str, Path]) -> dict:
        print(f"[tower-sweep] {item[0]} ...", flush=True)
        result = run_variant(*item, args)
        print(summary_table({item[0]: result}).splitlines()[-1], flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        summary = dict(zip(paths, pool.map(one, paths.items())))
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    table = summary_table(summary)
    Path(args.out, "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
