"""The denoiser stage of a run: build (or load) the model, check the recipe's loss options and freezing against
it, train it on the task mixture with :func:`mmdlm.diffusion.compute_batch_loss`, and save the final folder."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpointing import atomic_directory
from .collators import TASK_IDS, MultiTaskCollator, precompute_image_codes
from .mixture import Mixture
from .recipe import DenoiserStage, ModelRecipe
from .run_context import RunContext, StageStopped, _fingerprint
from .tokenizer_stages import _load_tokenizer
from .trainer import StageTrainer, build_param_groups, name_matches, step_seed


def _config_fingerprint(config: Any, tokenizer: Any) -> str:
    d = {k: v for k, v in config.to_dict().items()
         if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")}
    return _fingerprint(d, sorted(tokenizer.get_vocab().items()))


def _fresh_model(m: ModelRecipe, seed: int, tokenizer: Any, vq: Any, index: int):
    """A model built from ``m`` with random weights (seeded by the run's seed and the stage index)."""
    from ..configuration_mmdlm import MMDLMConfig
    from ..modeling_mmdlm import MMDLMForConditionalGeneration
    from ..processing import MMDLMProcessor
    from ..tokenization import config_token_fields
    from ..vision.image_processing import MMDLMImageProcessor

    sizes = {k: getattr(m, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size", "head_dim", "max_position_embeddings", "rope_theta",
                                        "tie_word_embeddings", "is_causal", "shift_logits",
                                        "initializer_range")}
    fields = config_token_fields(tokenizer, codebook_size=vq.codebook_size if vq is not None else 0)
    vision_config = m.vision_tower
    reads_codes = bool(vision_config) and vision_config.get("kind") == "vq"
    if reads_codes:
        if vq is None:
            raise ValueError("model.vision_tower: kind 'vq' reads images through the image tokenizer's codes; add "
                             "model.image_tokenizer (and its stage)")
        vision_config = {**vision_config, "vq": {**dataclasses.asdict(vq.config),
                                                 "channel_mult": list(vq.config.channel_mult)}}
    try:
        config = MMDLMConfig(
            **sizes, **fields, vision_config=vision_config, mm_projector_type=m.mm_projector_type,
            use_image_newline=m.use_image_newline, image_slot_embeddings=m.image_slot_embeddings,
            image_code_positions=m.image_code_positions, residual_dropout=m.residual_dropout or 0.0,
            image_tokenizer_config=({**dataclasses.asdict(vq.config), "channel_mult": list(vq.config.channel_mult)}
                                    if vq is not None else None),
        )
        torch.manual_seed(step_seed(seed, index, 0))
        model = MMDLMForConditionalGeneration(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model: cannot build the model from the recipe: {e}") from e
    if vq is not None:
        model.image_tokenizer.load_state_dict(vq.state_dict())
    if reads_codes:
        model.model.vision_tower.load_image_tokenizer(vq)
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
        # The VQ (and a 'vq' tower's copy of its encoder) is trained by its own stage only.
        trainable = not name.startswith("image_tokenizer.") and not getattr(p, "_mmdlm_frozen", False)
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
            "true for the AR twin (see configs/ar-twin.yaml), is_causal: true on this stage for a next-token first "
            "stage, or drop objective: ar to train the masked-diffusion denoiser"
        )
    if causal and objective != "ar":
        raise ValueError(
            f"{path}.loss.objective: the model is causal (model.is_causal: true) but the stage trains the "
            f"{objective!r} objective, which needs bidirectional attention; set loss: {{objective: ar}} for the AR "
            "twin, or model.is_causal: false (is_causal: false on this stage, after a causal stage) for the "
            "masked-diffusion denoiser"
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


def _check_projector_only(stage: DenoiserStage, examples: list[dict], path: str) -> None:
    """A projector-only stage learns from rows with images only: refuse drawing rows, which never reach the
    projector, and a mixture without any image to read, before training."""
    if not stage.projector_only:
        return
    if any(ex["task"] == "t2i" for ex in examples):
        raise ValueError(
            f"{path}.projector_only: only the projector trains, and drawing (t2i) rows never pass through it; add "
            "tasks: [understanding] to the stage, or give the drawing sources source_weights of 0"
        )
    if not any(ex.get("images") for ex in examples):
        raise ValueError(f"{path}.projector_only: the stage's mixture has no rows with images, so the projector "
                         "would learn nothing; add an image source")


def _denoiser_stage(ctx: RunContext, stage: DenoiserStage, index: int, mixture: Mixture, eval_examples: list[dict],
                    start: Any, generation_overrides: Optional[dict[str, Any]] = None) -> Path:
    from .. import diffusion

    out = ctx.output_dir / stage.name
    if (out / "config.json").is_file() and (out / "processor_config.json").is_file():
        ctx.log(f"stage {stage.name!r}: output exists at {out}, skipping")
        return out
    ctx.check_fresh(stage)
    acc, seed, path = ctx.accelerator, ctx.recipe.seed, f"stages[{index}]"
    try:
        mixture = mixture.reweighted(stage.source_weights)
    except ValueError as e:
        raise ValueError(f"{path}.source_weights: {e}") from None
    try:
        mixture = mixture.restricted(stage.tasks)
    except ValueError as e:
        raise ValueError(f"{path}.tasks: {e}") from None
    if stage.tasks is not None:
        eval_examples = [ex for ex in eval_examples if ex["task"] in stage.tasks]
    model, processor = start()
    config = model.config
    if stage.is_causal is not None:
        config.is_causal = stage.is_causal  # read at every forward; saved with this stage's model
    drawn = mixture.drawn_examples()
    everything = drawn + eval_examples
    _check_capabilities(config, everything, path)
    _check_projector_only(stage, drawn, path)
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
    ctx.log(f"stage {stage.name!r}: source shares "  # stage source_weights replace the sources' own weights
            + ", ".join(f"{k} {v:.3f}" for k, v in mixture.source_shares().items()))
    trainer = StageTrainer(acc, model, stage, index, ctx.checkpoint_dir(stage), ctx.metrics, seed, groups,
                           betas=tuple(stage.betas), on_save=ctx.plot,
                           fingerprint=_config_fingerprint(config, processor.tokenizer),
                           # "<task>_ar": the next-token batches of a stage with loss.ar_fraction
                           metric_keys=("loss", *TASK_IDS, *(f"{t}_ar" for t in TASK_IDS)),
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
        # The same diffusion loss at every eval: no condition dropout, no next-token batches.
        eval_options = {k: v for k, v in options.items() if k != "ar_fraction"}
        if "cfg_dropout" in eval_options:
            eval_options["cfg_dropout"] = 0.0
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
    final = acc.unwrap_model(trainer.model)
    overrides = ctx.recipe.model.generation if generation_overrides is None else generation_overrides
    generation = _generation_config(final, overrides or {})

    def writer(state_dict: dict) -> Any:
        def write(tmp: Path) -> None:
            final.save_pretrained(str(tmp), state_dict=state_dict)
            processor.save_pretrained(tmp)
            generation.save_pretrained(str(tmp))
        return write

    if trainer.ema is not None:
        if stage.ema_save_raw:
            raw = {k: v.detach().clone() for k, v in acc.get_state_dict(trainer.model).items()}
            if ctx.main:
                atomic_directory(ctx.output_dir / f"{stage.name}-raw", writer(raw))
        trainer.ema.copy_to(final)
        ctx.log(f"stage {stage.name!r}: saving the moving average of the weights (ema_decay {stage.ema_decay})")
    ctx.finish(stage, out, writer(acc.get_state_dict(trainer.model)))
    return out


def _resolve_tokenizers(ctx: RunContext, tokenizer: Any, vq: Any) -> tuple[Any, Any]:
    """This run's text tokenizer and VQ image tokenizer: from earlier stages, the recipe's paths, or the run's
    folders."""
    m = ctx.recipe.model
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
    return tokenizer, vq


def _initial_model(ctx: RunContext, tokenizer: Any, vq: Any, index: int, tower_from: Optional[Path] = None):
    """The model the first denoiser stage starts from: ``model.init_from``, or a fresh one built from the recipe
    with this run's tokenizer and image tokenizer, its vision tower copied from ``tower_from`` (a vision_pretrain
    stage's output) or ``model.vision_tower_from`` when given."""
    m = ctx.recipe.model
    if m.init_from is not None:
        model, processor = _load_model(Path(m.init_from))
        if m.image_code_positions and not model.config.image_code_positions:
            model.model.add_image_code_positions()
            ctx.log("model.image_code_positions: added zero code-position embeddings to the loaded model")
        if m.residual_dropout is not None:
            model.config.residual_dropout = m.residual_dropout  # read by every block at each training forward
        if m.image_tokenizer_path is not None:
            _, vq = _resolve_tokenizers(ctx, processor.tokenizer, None)
            model.set_image_tokenizer(vq.to(next(model.parameters()).device))
            ctx.log(f"model.image_tokenizer_path: drawing through the image tokenizer at {m.image_tokenizer_path} "
                    f"(norm {vq.config.norm}) instead of the loaded model's")
        return model, processor
    tokenizer, vq = _resolve_tokenizers(ctx, tokenizer, vq)
    model, processor = _fresh_model(m, ctx.recipe.seed, tokenizer, vq, index)
    source = tower_from if tower_from is not None else m.vision_tower_from
    if source is not None:
        load_vision_tower(model, Path(source))
        ctx.log(f"vision tower weights copied from {source}")
    return model, processor


def load_vision_tower(model: Any, path: Path) -> None:
    """Copy the vision tower's weights from the mmdlm model saved at ``path`` into ``model``.

    Both towers must be built from the same ``vision_tower`` config; the rest of the saved model is not read."""
    import json

    from safetensors import safe_open

    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"model.vision_tower_from: no saved mmdlm model at {path} (config.json and "
                                "model.safetensors expected)")
    tower = getattr(model.model, "vision_tower", None)
    if tower is None:
        raise ValueError("model.vision_tower_from: the model has no vision tower; set model.vision_tower")
    theirs = json.loads(config_file.read_text(encoding="utf-8")).get("vision_config")
    ours = model.config.vision_config
    if json.loads(json.dumps(theirs)) != json.loads(json.dumps(ours)):
        raise ValueError(f"model.vision_tower_from: the tower saved at {path} was built from {theirs}, but this "
                         f"recipe's model.vision_tower is {ours}; use the same tower config")
    prefix = "model.vision_tower."
    with safe_open(str(weights), framework="pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    own = tower.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"model.vision_tower_from: the tower weights at {path} do not fit this tower (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    if (ours or {}).get("kind") == "vq" and getattr(model, "image_tokenizer", None) is not None:
        # A 'vq' tower's frozen encoder and codebook belong to this run's image tokenizer, not the source's.
        tower.load_image_tokenizer(model.image_tokenizer)
