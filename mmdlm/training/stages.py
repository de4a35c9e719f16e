"""Run a recipe's stages in order — VQ image tokenizer, BPE tokenizer, denoiser(s) — each skipped when its output
folder already exists, each resumable from its atomic checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpointing import atomic_directory, latest_checkpoint, remove_leftovers
from .collators import TASK_IDS, MultiTaskCollator, precompute_image_codes
from .mixture import Mixture, build_mixture, mixture_texts, t2i_images
from .plots import MetricsLog, plot_metrics
from .recipe import DenoiserStage, ImageTokenizerStage, Recipe, TokenizerStage, assign_stage_names
from .trainer import StageTrainer, build_param_groups, name_matches, step_seed

ROLE_TEXTS = ("user", "assistant", "system")


class StageStopped(Exception):
    """``stop_after`` ended a stage early; its checkpoint lets ``--resume`` continue it."""


@dataclass
class RunContext:
    recipe: Recipe
    output_dir: Path
    accelerator: Any
    resume: bool
    stop_after: Optional[int]
    metrics: MetricsLog

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.main:
            print(f"[mmdlm train] {message}", flush=True)

    def plot(self) -> None:
        if self.main:
            plot_metrics(self.metrics.records(), self.output_dir / "curves.png", title=str(self.output_dir))

    def checkpoint_dir(self, stage: Any) -> Path:
        return self.output_dir / "checkpoints" / stage.name

    def check_fresh(self, stage: Any) -> None:
        """Without --resume, refuse to silently restart a stage that has checkpoints."""
        ckpt = latest_checkpoint(self.checkpoint_dir(stage))
        if ckpt is not None and not self.resume:
            raise FileExistsError(
                f"stage {stage.name!r} has a checkpoint at {ckpt}; pass --resume to continue it, or use a fresh "
                "--output directory"
            )

    def finish(self, stage: Any, out: Path, write) -> None:
        """Write the stage's output folder atomically (rank 0), then drop its checkpoints."""
        if self.main:
            atomic_directory(out, write)
            shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)
        self.accelerator.wait_for_everyone()


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_fingerprint(config: Any, tokenizer: Any) -> str:
    d = {k: v for k, v in config.to_dict().items()
         if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")}
    return _fingerprint(d, sorted(tokenizer.get_vocab().items()))


# ---------------------------------------------------------------------------------------------------- image tokenizer


def _image_tokenizer_stage(ctx: RunContext, stage: ImageTokenizerStage, index: int, mixture: Mixture):
    from ..vision.image_tokenizer import VQConfig, VQImageTokenizer

    out = ctx.output_dir / stage.name
    if (out / "model.safetensors").is_file():
        ctx.log(f"stage {stage.name!r}: output exists at {out}, skipping")
        return VQImageTokenizer.from_pretrained(out)
    ctx.check_fresh(stage)
    seed, acc = ctx.recipe.seed, ctx.accelerator
    images = t2i_images(mixture.examples)
    if len(images) <= stage.holdout:
        raise ValueError(
            f"stage {stage.name!r} trains on the mixture's t2i images but found {len(images)} (holdout={stage.holdout}); "
            "add sources with a 't2i' task or lower holdout"
        )
    torch.manual_seed(step_seed(seed, index, 0))
    vq = VQImageTokenizer(VQConfig(**ctx.recipe.model.image_tokenizer))
    order = np.random.default_rng([seed, index]).permutation(len(images))
    pixels = torch.cat([(vq.preprocess([images[i] for i in order[s:s + 256]]) * 255).round().to(torch.uint8)
                        for s in range(0, len(order), 256)])
    held, train = pixels[:stage.holdout], pixels[stage.holdout:]
    ctx.log(f"stage {stage.name!r}: {len(train)} training images, {len(held)} held out")
    trainer = StageTrainer(acc, vq, stage, index, ctx.checkpoint_dir(stage), ctx.metrics, seed,
                           build_param_groups(vq, stage.lr, stage.weight_decay), on_save=ctx.plot,
                           fingerprint=_fingerprint(dataclasses.asdict(vq.config)),
                           metric_keys=("loss", "recon_loss", "commit_loss"))
    if ctx.resume and trainer.resume_from_latest():
        ctx.metrics.truncate_after(stage.name, trainer.start_step)
        ctx.log(f"stage {stage.name!r}: resumed at step {trainer.start_step}")

    def batch_fn(step: int, micro: int) -> dict:
        rng = np.random.default_rng([seed, index, step, micro, acc.process_index])
        return {"pixel_values": train[rng.integers(len(train), size=stage.batch_size)].float() / 255.0}

    def loss_fn(model, batch, generator) -> dict:
        out = model(batch["pixel_values"])
        return {"loss": out["loss"], "recon_loss": out["recon_loss"], "commit_loss": out["commit_loss"]}

    def eval_fn(model) -> dict:
        net = acc.unwrap_model(model)
        if not len(held):
            return {}
        errors, used = [], set()
        for s in range(0, len(held), 64):
            x = held[s:s + 64].to(acc.device).float() / 255.0
            res = net(x)  # eval mode: the codebook is not updated
            errors.append(float(((res["recon"].clamp(0, 1) - x) ** 2).mean()) * len(x))
            used.update(res["codes"].flatten().tolist())
        return {"recon_mse": sum(errors) / len(held), "codebook_usage": len(used) / vq.codebook_size}

    if not trainer.fit(batch_fn, loss_fn, eval_fn, stop_after=ctx.stop_after):
        raise StageStopped(stage.name)
    ctx.finish(stage, out, lambda tmp: acc.unwrap_model(trainer.model).save_pretrained(tmp))
    return VQImageTokenizer.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------- tokenizer


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer_stage(ctx: RunContext, stage: TokenizerStage, mixture: Mixture, eval_examples: list[dict]):
    out = ctx.output_dir / stage.name
    if (out / "tokenizer_config.json").is_file():
        ctx.log(f"stage {stage.name!r}: output exists at {out}, skipping")
        return _load_tokenizer(out)
    cfg = ctx.recipe.tokenizer
    if ctx.main:
        if cfg.path is not None:
            tok = _load_tokenizer(cfg.path)
        else:
            from ..tokenization import train_tokenizer

            texts = list(mixture_texts(mixture.examples)) + list(mixture_texts(eval_examples)) + list(ROLE_TEXTS)
            ctx.log(f"stage {stage.name!r}: training a {cfg.vocab_size}-token BPE on {len(texts)} texts")
            tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
        atomic_directory(out, lambda tmp: tok.save_pretrained(str(tmp)))
    ctx.accelerator.wait_for_everyone()
    return _load_tokenizer(out)


# ---------------------------------------------------------------------------------------------------- denoiser


def _fresh_model(ctx: RunContext, tokenizer: Any, vq: Any, index: int):
    from ..configuration_mmdlm import MMDLMConfig
    from ..modeling_mmdlm import MMDLMForConditionalGeneration
    from ..processing import MMDLMProcessor
    from ..tokenization import config_token_fields
    from ..vision.image_processing import MMDLMImageProcessor

    m = ctx.recipe.model
    sizes = {k: getattr(m, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size", "head_dim", "max_position_embeddings", "rope_theta",
                                        "tie_word_embeddings", "is_causal", "initializer_range")}
    fields = config_token_fields(tokenizer, codebook_size=vq.codebook_size if vq is not None else 0)
    try:
        config = MMDLMConfig(
            **sizes, **fields, vision_config=m.vision_tower, mm_projector_type=m.mm_projector_type,
            use_image_newline=m.use_image_newline,
            image_tokenizer_config=({**dataclasses.asdict(vq.config), "channel_mult": list(vq.config.channel_mult)}
                                    if vq is not None else None),
        )
        torch.manual_seed(step_seed(ctx.recipe.seed, index, 0))
        model = MMDLMForConditionalGeneration(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model: cannot build the model from the recipe: {e}") from e
    if vq is not None:
        model.image_tokenizer.load_state_dict(vq.state_dict())
    image_processor = MMDLMImageProcessor(**m.image_processor) if m.image_processor else None
    processor = MMDLMProcessor.from_config(config, tokenizer, image_processor=image_processor)
    return model, processor


def _load_model(path: Path):
    from ..modeling_mmdlm import MMDLMForConditionalGeneration
    from ..processing import MMDLMProcessor

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no mmdlm model at {path} (config.json missing)")
    model = MMDLMForConditionalGeneration.from_pretrained(str(path), local_files_only=True)
    return model.float(), MMDLMProcessor.from_pretrained(path)


def _apply_freeze(model: torch.nn.Module, stage: DenoiserStage, path: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    for i, prefix in enumerate(stage.freeze):
        if not any(name_matches(n, prefix) for n in names):
            raise ValueError(
                f"{path}.freeze[{i}]: {prefix!r} matches no parameter; names look like {names[:3]} "
                "(prefixes such as 'vision_tower', 'mm_projector', 'model.layers', 'model.embed_tokens', 'lm_head')"
            )
    for name, p in model.named_parameters():
        trainable = not name.startswith("image_tokenizer.")  # the VQ is trained by its own stage only
        if stage.projector_only:
            trainable = name_matches(name, "mm_projector") or name_matches(name, "image_newline")
        if any(name_matches(name, f) for f in stage.freeze):
            trainable = False
        p.requires_grad_(trainable)
    if stage.projector_only and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{path}.projector_only: the model has no mm_projector (no vision tower in the recipe)")


def _generation_config(model: Any, overrides: dict[str, Any]):
    """The model's decoding defaults (its own, or fresh ones for its special tokens) with the recipe's overrides."""
    from ..generation_config import MMDLMGenerationConfig

    gen = getattr(model, "generation_config", None)
    gen = copy.deepcopy(gen) if isinstance(gen, MMDLMGenerationConfig) else \
        MMDLMGenerationConfig.from_model_config(model.config)
    for key, value in overrides.items():
        setattr(gen, key, value)
    try:
        gen.validate()
    except ValueError as e:
        raise ValueError(f"model.generation: {e}") from e
    return gen


def _check_loss_options(stage: DenoiserStage, config: Any, path: str) -> None:
    """Refuse unknown ``loss`` options, and an objective that does not fit the model's attention: a causal model
    (``model.is_causal: true``) trains with next-token prediction, a bidirectional one with masked diffusion."""
    from .. import diffusion

    params = inspect.signature(diffusion.compute_batch_loss).parameters
    for key in stage.loss:
        if key not in params or key in ("model", "batch", "generator", "task_weights"):
            allowed = [k for k in params if k not in ("model", "batch", "generator", "task_weights")]
            raise ValueError(f"{path}.loss.{key}: unknown loss option; known options are {allowed}")
    objective = stage.loss.get("objective", "diffusion")
    if objective not in diffusion.OBJECTIVES:
        raise ValueError(
            f"{path}.loss.objective: {objective!r} is not an objective; use 'diffusion' (masked diffusion, the "
            "default) or 'ar' (next-token prediction, for a causal model)"
        )
    causal = bool(getattr(config, "is_causal", False))
    if objective == "ar" and not causal:
        raise ValueError(
            f"{path}.loss.objective: 'ar' (next-token prediction) needs a causal model, but this model is "
            "bidirectional (model.is_causal: false), so it would see each token it predicts; set model.is_causal: "
            "true for the AR twin (see configs/ar-twin.yaml), or drop objective: ar to train the masked-diffusion "
            "denoiser"
        )
    if causal and objective != "ar":
        raise ValueError(
            f"{path}.loss.objective: the model is causal (model.is_causal: true) but the stage trains the "
            f"{objective!r} objective, which needs bidirectional attention; set loss: {{objective: ar}} for the AR "
            "twin, or model.is_causal: false for the masked-diffusion denoiser"
        )
    options = {k: v for k, v in stage.loss.items()
               if k in inspect.signature(diffusion.validate_loss_options).parameters}
    try:
        diffusion.validate_loss_options(**options)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}.loss: {e}") from None


def _check_capabilities(config: Any, examples: list[dict], path: str) -> None:
    if any(ex["task"] == "t2i" for ex in examples) and not config.can_draw_images:
        raise ValueError(
            f"{path}: the mixture has t2i examples but the model has no image tokenizer; add model.image_tokenizer "
            "and an image_tokenizer stage, or drop the 't2i' tasks from the sources"
        )
    if any(ex["task"] == "understanding" and ex.get("images") for ex in examples) and not config.can_understand_images:
        raise ValueError(
            f"{path}: the mixture has examples with images but the model has no vision tower; set model.vision_tower"
        )


def _denoiser_stage(ctx: RunContext, stage: DenoiserStage, index: int, mixture: Mixture, eval_examples: list[dict],
                    start: Any) -> Path:
    from .. import diffusion

    out = ctx.output_dir / stage.name
    if (out / "config.json").is_file() and (out / "processor_config.json").is_file():
        ctx.log(f"stage {stage.name!r}: output exists at {out}, skipping")
        return out
    ctx.check_fresh(stage)
    acc, seed, path = ctx.accelerator, ctx.recipe.seed, f"stages[{index}]"
    model, processor = start()
    config = model.config
    everything = list(mixture.examples) + list(eval_examples)
    _check_capabilities(config, everything, path)
    _check_loss_options(stage, config, path)
    _apply_freeze(model, stage, path)
    collator = MultiTaskCollator(processor, max_length=min(stage.max_length, config.max_position_embeddings),
                                 config=config, min_answer_length=stage.min_answer_length)
    if config.can_draw_images:
        model.image_tokenizer.to(acc.device)  # prepare() moves the rest of the model there later
        n = precompute_image_codes(everything, model.image_tokenizer)
        ctx.log(f"stage {stage.name!r}: encoded {n} t2i images into {model.image_tokenizer.num_tokens} codes each")
    for i, ex in enumerate(everything):  # surface over-long or malformed rows before the first step
        try:
            collator.encode(ex)
        except ValueError as e:
            where = "eval example" if i >= len(everything) - len(eval_examples) else "training example"
            raise ValueError(f"{path}: {where} {i} ({ex['task']}): {e}") from e
    special = {"vision_tower": stage.vision_tower_lr} if stage.vision_tower_lr is not None else None
    groups = build_param_groups(model, stage.lr, stage.weight_decay, special)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    ctx.log(f"stage {stage.name!r}: {n_train / 1e6:.2f}M trainable parameters, task shares "
            + ", ".join(f"{k} {v:.2f}" for k, v in mixture.task_shares().items()))
    trainer = StageTrainer(acc, model, stage, index, ctx.checkpoint_dir(stage), ctx.metrics, seed, groups,
                           betas=tuple(stage.betas), on_save=ctx.plot,
                           fingerprint=_config_fingerprint(config, processor.tokenizer),
                           metric_keys=("loss", *TASK_IDS),
                           # batches without images leave the vision tower and projector unused
                           find_unused_parameters=config.can_understand_images)
    if ctx.resume and trainer.resume_from_latest():
        ctx.metrics.truncate_after(stage.name, trainer.start_step)
        ctx.log(f"stage {stage.name!r}: resumed at step {trainer.start_step}")
    options = dict(stage.loss)

    def batch_fn(step: int, micro: int) -> dict:
        examples = mixture.sample(stage.batch_size, index, step, micro, acc.process_index,
                                  group_by_task=stage.group_by_task)
        return collator(examples)

    def loss_fn(model, batch, generator) -> dict:
        return diffusion.compute_batch_loss(model, batch, task_weights=stage.task_weights, generator=generator,
                                            **options)

    eval_batches = [eval_examples[s:s + stage.batch_size] for s in range(0, len(eval_examples), stage.batch_size)]

    def eval_fn(model) -> dict:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        eval_options = {**options, "cfg_dropout": 0.0} if "cfg_dropout" in options else options
        for j, chunk in enumerate(eval_batches):
            batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in collator(chunk).items()}
            gen = torch.Generator().manual_seed(step_seed(seed, index, 1 << 40, j))  # same noise at every eval
            res = diffusion.compute_batch_loss(model, batch, task_weights=stage.task_weights, generator=gen,
                                               **eval_options)
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    if not trainer.fit(batch_fn, loss_fn, eval_fn if eval_batches else None, stop_after=ctx.stop_after):
        raise StageStopped(stage.name)
    state_dict = acc.get_state_dict(trainer.model)
    final = acc.unwrap_model(trainer.model)
    generation = _generation_config(final, ctx.recipe.model.generation or {})

    def write(tmp: Path) -> None:
        final.save_pretrained(str(tmp), state_dict=state_dict)
        processor.save_pretrained(tmp)
        generation.save_pretrained(str(tmp))

    ctx.finish(stage, out, write)
    return out


# ---------------------------------------------------------------------------------------------------- run


def _accelerator(cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Each stage sets find_unused_parameters on this handler before its model is wrapped.
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs()])


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
    try:
        for index, stage in enumerate(recipe.stages):
            if isinstance(stage, ImageTokenizerStage):
                vq = _image_tokenizer_stage(ctx, stage, index, mixture)
            elif isinstance(stage, TokenizerStage):
                tokenizer = _tokenizer_stage(ctx, stage, mixture, eval_examples)
            else:
                # A later denoiser stage continues from the previous one's saved model.
                start = partial(_load_model, final) if final is not None else \
                    partial(_initial_model, ctx, tokenizer, vq, index)
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


def _initial_model(ctx: RunContext, tokenizer: Any, vq: Any, index: int):
    """The model the first denoiser stage starts from: ``model.init_from``, or a fresh one built from the recipe
    with this run's tokenizer and image tokenizer (from earlier stages, ``tokenizer.path``, or their folders)."""
    m = ctx.recipe.model
    if m.init_from is not None:
        return _load_model(Path(m.init_from))
    if tokenizer is None:
        path = ctx.recipe.tokenizer.path or (ctx.output_dir / "tokenizer")
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"no tokenizer: add a 'tokenizer' stage, set tokenizer.path, or keep {ctx.output_dir / 'tokenizer'}"
            )
        tokenizer = _load_tokenizer(path)
    if vq is None and (m.image_tokenizer is not None or m.image_tokenizer_path is not None):
        from ..vision.image_tokenizer import VQImageTokenizer

        path = Path(m.image_tokenizer_path) if m.image_tokenizer_path else ctx.output_dir / "image_tokenizer"
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no trained image tokenizer at {path}; add an 'image_tokenizer' stage or set "
                "model.image_tokenizer_path to a folder written by one"
            )
        vq = VQImageTokenizer.from_pretrained(path)
    return _fresh_model(ctx, tokenizer, vq, index)
