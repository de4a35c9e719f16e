"""Training: YAML recipes, the accelerate loop, atomic checkpoints and the multi-task collator.

``mmdlm train RECIPE.yaml [--output DIR] [--resume] [--max-steps N] [--stop-after N] [--cpu]``, also as
``python -m mmdlm.training RECIPE.yaml``, ``accelerate launch -m mmdlm.training RECIPE.yaml`` or
``torchrun --nproc_per_node 2 -m mmdlm.training RECIPE.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "train", "main"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

EPILOG = """multi-process:
  torchrun --nproc_per_node 2 -m mmdlm.training RECIPE.yaml --cpu          (2 CPU processes, gloo)
  accelerate launch --multi_gpu --num_processes 2 -m mmdlm.training RECIPE.yaml --cpu
  accelerate launch --config_file configs/accelerate/ddp.yaml -m mmdlm.training RECIPE.yaml
Note: `accelerate launch --cpu --num_processes 2` silently runs ONE process; use one of the lines above.

Outputs in the output folder: one folder per stage (the last denoiser stage's, `model/`, is the final
model, loadable with MMDLMForConditionalGeneration.from_pretrained and MMDLMProcessor.from_pretrained),
checkpoints/<stage>/step-N, metrics.jsonl, curves.png and a copy of the recipe."""


def train(*args, **kwargs):
    """Run a recipe; see :func:`mmdlm.training.stages.train`."""
    from .stages import train as _train

    return _train(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdlm train", description="Train an mmdlm model from a YAML recipe.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file (see configs/)")
    p.add_argument("--output", default=None, metavar="DIR", help="output folder (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue unfinished stages from their latest checkpoint")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="cap every trainable stage at N optimizer steps (their schedules shrink too)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="train N steps of the current stage, checkpoint and exit (continue later with --resume)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 runtime failure, 2 bad recipe or arguments)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        recipe = load_recipe(args.recipe)
    except (RecipeError, FileNotFoundError) as e:
        print(f"mmdlm train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .trainer import TrainingDiverged

    try:
        train(recipe, output_dir=args.output, resume=args.resume, max_steps=args.max_steps, cpu=args.cpu,
              stop_after=args.stop_after)
    except TrainingDiverged as e:
        print(f"mmdlm train: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"mmdlm train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
