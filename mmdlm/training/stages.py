"""Run a recipe's stages in order — VQ image tokenizer, BPE tokenizer, vision-tower pretraining, denoiser(s) — each
skipped when its output folder already exists, each resumable from its atomic checkpoints."""

from __future__ import annotations

import copy
import dataclasses
from functools import partial
from pathlib import Path
from typing import Optional

from .checkpointing import remove_leftovers
from .denoiser_stage import _denoiser_stage, _fresh_model, _initial_model, _load_model, _resolve_tokenizers
from .mixture import build_mixture
from .plots import MetricsLog
from .recipe import ImageTokenizerStage, Recipe, TokenizerStage, VisionPretrainStage, assign_stage_names
# RunContext, StageStopped and ROLE_TEXTS are also importable from here, where they lived before their own modules.
from .run_context import RunContext, StageStopped  # noqa: F401
from .tokenizer_stages import ROLE_TEXTS, _image_tokenizer_stage, _tokenizer_stage  # noqa: F401


def _accelerator(cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Each stage sets find_unused_parameters on this handler before its model is wrapped.
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs()])


def _vision_pretrain_stage(ctx: RunContext, stage: VisionPretrainStage, index: int, mixture, eval_examples,
                           tokenizer, vq) -> Path:
    """Train the recipe's vision tower under a small causal decoder (next-token prediction on the understanding
    rows); returns the saved captioner's folder, whose tower the first denoiser stage starts from."""
    tokenizer, vq = _resolve_tokenizers(ctx, tokenizer, vq)
    m = dataclasses.replace(
        ctx.recipe.model, hidden_size=stage.hidden_size, num_hidden_layers=stage.num_hidden_layers,
        num_attention_heads=stage.num_attention_heads, num_key_value_heads=None, intermediate_size=None,
        head_dim=None, is_causal=True, generation=None,
    )
    # The captioner draws nothing: it gets the image tokenizer only when its tower reads through the VQ's codes.
    reads_codes = (m.vision_tower or {}).get("kind") == "vq"
    start = partial(_fresh_model, m, ctx.recipe.seed, tokenizer, vq if reads_codes else None, index)
    return _denoiser_stage(ctx, stage.as_denoiser_stage(), index, mixture, eval_examples, start,
                           generation_overrides={})


def train(recipe: Recipe, output_dir: Optional[str | Path] = None, resume: bool = False,
          max_steps: Optional[int] = None, cpu: bool = False, stop_after: Optional[int] = None) -> Optional[Path]:
    """Run every stage of ``recipe``; returns the final model folder (None when ``stop_after`` paused a stage).

    ``max_steps`` caps every trainable stage's steps (its schedule included); ``stop_after`` ends the run after
    that many steps of the current stage with a checkpoint, so ``resume=True`` continues it exactly.
    """
    import yaml

    recipe = copy.deepcopy(recipe)
    assign_stage_names(recipe.stages)
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        for s in recipe.stages:
            if hasattr(s, "steps"):
                s.steps = min(s.steps, max_steps)
    out = Path(output_dir if output_dir is not None else recipe.output_dir)
    acc = _accelerator(cpu)
    ctx = RunContext(recipe, out, acc, resume, stop_after, MetricsLog(out / "metrics.jsonl", acc.is_main_process))
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    acc.wait_for_everyone()
    ctx.log(f"output: {out} ({acc.num_processes} process(es) on {acc.device})")

    mixture, eval_examples = build_mixture(recipe.data, recipe.seed)
    skipped = mixture.skipped
    ctx.log(f"data: {sum(len(s.examples) for s in mixture.sources)} examples from {len(mixture.sources)} source(s), "
            f"{len(eval_examples)} eval examples" + (f", {len(skipped)} skipped (missing images)" if skipped else ""))

    tokenizer = vq = None
    final: Optional[Path] = None
    tower: Optional[Path] = None
    try:
        for index, stage in enumerate(recipe.stages):
            if isinstance(stage, ImageTokenizerStage):
                vq = _image_tokenizer_stage(ctx, stage, index, mixture)
            elif isinstance(stage, TokenizerStage):
                tokenizer = _tokenizer_stage(ctx, stage, mixture, eval_examples)
            elif isinstance(stage, VisionPretrainStage):
                tower = _vision_pretrain_stage(ctx, stage, index, mixture, eval_examples, tokenizer, vq)
            else:
                # A later denoiser stage continues from the previous one's saved model.
                start = partial(_load_model, final) if final is not None else \
                    partial(_initial_model, ctx, tokenizer, vq, index, tower_from=tower)
                final = _denoiser_stage(ctx, stage, index, mixture, eval_examples, start)
    except StageStopped as e:
        ctx.log(f"stopped during stage {e.args[0]!r} as asked; continue with --resume")
        ctx.plot()
        return None
    ctx.plot()
    if skipped:
        ctx.log(f"data: {len(skipped)} example(s) were skipped for missing images; first: {skipped[0]}")
        ctx.metrics.write({"stage": "data", "skipped_examples": len(skipped)})
    if final is not None:
        ctx.log(f"done: model saved to {final}")
    return final
