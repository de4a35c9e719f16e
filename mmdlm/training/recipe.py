"""Training recipes: a YAML file -> nested dataclasses, validated strictly (unknown keys and wrong types are errors
that name the key path, e.g. ``stages[2].lr: expected float, got str 'fast'``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .data_recipe import DataRecipe, check_source
from .schema import RecipeError, build, check_positive, describe

TASKS = ("text", "understanding", "t2i")


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class ModelRecipe:
    """Denoiser sizes (see :class:`mmdlm.MMDLMConfig`), the vision tower dict (given to
    ``mmdlm.vision.towers.create_vision_tower``; ``None`` = no understanding), and the VQ image tokenizer's
    :class:`~mmdlm.vision.image_tokenizer.VQConfig` fields (``None`` = the model cannot draw).
    ``image_tokenizer_path`` reuses a VQ tokenizer trained by another run (instead of an image_tokenizer stage).
    ``generation`` holds decoding defaults saved with the model as ``generation_config.json``
    (:class:`mmdlm.generation_config.MMDLMGenerationConfig` fields such as ``gen_length``, ``steps``).
    ``init_from`` starts from a saved mmdlm model folder (fine-tuning); its tokenizer, processor and image
    tokenizer are reused (``image_tokenizer_path`` given: that image tokenizer replaces the saved one, with the
    same codebook size, and drawing must be learned again) and the size fields here are ignored.
    ``vision_tower_from`` copies only the vision tower's weights from a saved mmdlm model folder with the same
    ``vision_tower`` config (e.g. the ``vision_pretrain`` output of another run): a pretrained tower, as LLaVA
    starts from CLIP's.
    ``shift_logits`` reads position i's prediction from the output at i - 1 (Dream / Dimple): a causal first stage's
    next-token head then keeps its meaning after the switch to diffusion. ``image_slot_embeddings`` adds a learned
    embedding per image slot to the projected features, so that what is read from a slot says where it is.
    ``image_code_positions`` adds a learned embedding per code-grid cell to the image-code slots of drawing rows;
    with ``init_from`` it is added (zeros) to a loaded model that lacks it, the one size field that is not ignored.
    ``residual_dropout`` (LLaDA's name; ``None`` = the model's own, 0 for a new one) drops that share of each
    block's attention and MLP outputs while training; with ``init_from`` it replaces the loaded model's value."""

    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    is_causal: bool = False
    shift_logits: bool = False
    initializer_range: float = 0.02
    vision_tower: Optional[dict[str, Any]] = None
    mm_projector_type: str = "mlp2x_gelu"
    use_image_newline: bool = False
    image_slot_embeddings: bool = False
    image_code_positions: bool = False
    residual_dropout: Optional[float] = None
    image_processor: Optional[dict[str, Any]] = None
    image_tokenizer: Optional[dict[str, Any]] = None
    image_tokenizer_path: Optional[str] = None
    generation: Optional[dict[str, Any]] = None
    init_from: Optional[str] = None
    vision_tower_from: Optional[str] = None


@dataclass
class TokenizerRecipe:
    """Train a byte-level BPE of ``vocab_size`` on the mixture's texts, or load one from ``path``."""

    vocab_size: int = 1024
    min_frequency: int = 1
    path: Optional[str] = None


# ---------------------------------------------------------------------------------------------------- stages


@dataclass
class ImageTokenizerStage:
    """Train the VQ image tokenizer on the mixture's t2i images; ``holdout`` images give the reconstruction MSE."""

    type: Literal["image_tokenizer"] = "image_tokenizer"
    name: Optional[str] = None
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    holdout: int = 32
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1


@dataclass
class TokenizerStage:
    """Train (or load, when ``tokenizer.path`` is set) the text tokenizer."""

    type: Literal["tokenizer"] = "tokenizer"
    name: Optional[str] = None


@dataclass
class DenoiserStage:
    """Train the denoiser (+ vision tower + projector) with the masked-diffusion losses of ``mmdlm.diffusion``.

    ``batch_size`` is per process and per micro-step; one optimizer step sees
    ``batch_size * grad_accum * num_processes`` examples. ``freeze`` lists parameter-name prefixes that
    do not train (e.g. ``["vision_tower", "model.layers"]``; a prefix also matches after any leading module
    path); ``projector_only`` trains only the projector (LLaVA stage 1). ``vision_tower_lr`` gives the tower
    its own learning rate (LLaDA-V: 2e-6 vs 1e-5). ``loss`` holds extra keyword options for
    ``mmdlm.diffusion.compute_batch_loss``. ``bf16`` autocasts on GPUs that support it; ``bf16_cpu`` autocasts
    CPU runs, on CPUs with native bf16 kernels only (emulated bf16 is several times slower than fp32 there).
    ``group_by_task`` draws each micro-batch from one task, which avoids padding short understanding rows to
    the length of t2i rows (cheaper on CPU). ``tasks`` restricts the stage to some of the mixture's tasks
    (e.g. ``[understanding]`` for a first stage that only learns to read); ``None`` trains on all of them.
    ``source_weights`` gives the stage its own weight for each of ``data.sources``, in their order (0 leaves a
    source out of the stage, as LLaVA trains its stages on different data): they replace the sources' own
    ``weight`` for that stage (they do not multiply it); ``None`` keeps the sources' weights. Each stage logs the
    share of batches it draws from each source.
    ``is_causal`` overrides the model's attention for this stage and the model it saves: ``true`` with
    ``loss: {objective: ar}`` for a next-token first stage, then a bidirectional diffusion stage continues from it
    (AR-to-diffusion adaptation, as Dream-7B starts from an AR model). ``ema_decay`` keeps an exponential moving
    average of the trainable parameters (MDLM: 0.9999 over a long run; the decay ramps up over the first steps)
    and saves the averaged weights as the stage's model; ``ema_save_raw`` also writes the final weights without
    averaging to ``<stage name>-raw`` beside it, to compare the two."""

    type: Literal["denoiser"] = "denoiser"
    name: Optional[str] = None
    steps: int = 1000
    lr: float = 3e-4
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    vision_tower_lr: Optional[float] = None
    freeze: list[str] = field(default_factory=list)
    projector_only: bool = False
    task_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    loss: dict[str, Any] = field(default_factory=dict)
    max_length: int = 512
    min_answer_length: int = 0
    group_by_task: bool = False
    tasks: Optional[list[str]] = None
    source_weights: Optional[list[float]] = None
    is_causal: Optional[bool] = None
    ema_decay: Optional[float] = None
    ema_save_raw: bool = False
    bf16: bool = True
    bf16_cpu: bool = False
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1


@dataclass
class VisionPretrainStage:
    """Pretrain the vision tower by captioning (CapPa-style) before the denoiser sees it.

    LLaVA-style models start from a pretrained CLIP/SigLIP tower; none can be downloaded here, and a tower
    trained from scratch inside the denoiser learns to tell shapes and colours apart slowly. This stage trains
    the recipe's vision tower and a projector under a small causal decoder (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``) with next-token prediction on the mixture's understanding
    rows; the first denoiser stage then starts from its tower (the decoder and projector are dropped). Its
    output folder is itself a causal mmdlm model (greedy decoding: ``mmdlm.sampling.autoregressive``)."""

    type: Literal["vision_pretrain"] = "vision_pretrain"
    name: Optional[str] = None
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    steps: int = 1500
    lr: float = 2e-3
    batch_size: int = 32
    grad_accum: int = 1
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    max_length: int = 256
    bf16: bool = True
    bf16_cpu: bool = False
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1

    def as_denoiser_stage(self) -> DenoiserStage:
        """The same schedule as a :class:`DenoiserStage` that trains next-token prediction on understanding rows."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in {g.name for g in dataclasses.fields(DenoiserStage)} and f.name != "type"}
        return DenoiserStage(**shared, loss={"objective": "ar"}, tasks=["understanding"], is_causal=True)


Stage = Union[ImageTokenizerStage, TokenizerStage, VisionPretrainStage, DenoiserStage]


@dataclass
class Recipe:
    """A full training recipe: model, data, tokenizer and the ordered stages."""

    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    stages: list[Stage] = field(default_factory=list)
    output_dir: str = "runs/mmdlm"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (YAML-serialisable)."""
        return dataclasses.asdict(self)


def _check_stage(stage: Any, path: str) -> None:
    if isinstance(stage, TokenizerStage):
        return
    for key in ("steps", "batch_size", "lr"):
        check_positive(getattr(stage, key), f"{path}.{key}")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "log_every", "eval_every", "save_every"):
        check_positive(getattr(stage, key), f"{path}.{key}", allow_zero=True)
    if stage.keep_checkpoints < 1:
        raise RecipeError(f"{path}.keep_checkpoints: must be >= 1, got {stage.keep_checkpoints}")
    if stage.schedule not in ("cosine", "linear", "constant"):
        raise RecipeError(f"{path}.schedule: expected 'cosine', 'linear' or 'constant', got {stage.schedule!r}")
    if not 0.0 <= stage.min_lr_ratio <= 1.0:
        raise RecipeError(f"{path}.min_lr_ratio: must be in [0, 1], got {stage.min_lr_ratio}")
    if isinstance(stage, VisionPretrainStage):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            check_positive(getattr(stage, key), f"{path}.{key}")
        if stage.hidden_size % stage.num_attention_heads:
            raise RecipeError(f"{path}.hidden_size: {stage.hidden_size} is not divisible by num_attention_heads "
                              f"{stage.num_attention_heads}")
        stage = stage.as_denoiser_stage()
    if isinstance(stage, DenoiserStage):
        check_positive(stage.grad_accum, f"{path}.grad_accum")
        check_positive(stage.max_length, f"{path}.max_length")
        if stage.vision_tower_lr is not None:
            check_positive(stage.vision_tower_lr, f"{path}.vision_tower_lr", allow_zero=True)
        if len(stage.betas) != 2 or not all(0.0 <= b < 1.0 for b in stage.betas):
            raise RecipeError(f"{path}.betas: expected two values in [0, 1), got {stage.betas}")
        if stage.ema_decay is not None and not 0.0 < stage.ema_decay < 1.0:
            raise RecipeError(f"{path}.ema_decay: must be in (0, 1) (e.g. 0.999), got {stage.ema_decay}")
        if stage.ema_save_raw and stage.ema_decay is None:
            raise RecipeError(f"{path}.ema_save_raw: needs ema_decay (without it the stage's model is the raw one)")
        for task, w in stage.task_weights.items():
            if task not in TASKS:
                raise RecipeError(f"{path}.task_weights.{task}: unknown task; use any of {list(TASKS)}")
            check_positive(w, f"{path}.task_weights.{task}", allow_zero=True)
        if stage.tasks is not None:
            if not stage.tasks:
                raise RecipeError(f"{path}.tasks: empty; list some of {list(TASKS)} or drop the key to train on all")
            for i, task in enumerate(stage.tasks):
                if task not in TASKS:
                    raise RecipeError(f"{path}.tasks[{i}]: unknown task {task!r}; use any of {list(TASKS)}")
        for i, name in enumerate(stage.freeze):
            if not name.strip():
                raise RecipeError(f"{path}.freeze[{i}]: empty parameter prefix")


def validate(recipe: Recipe) -> Recipe:
    """Value checks beyond types (positive sizes, known choices, stage order); returns the recipe."""
    if recipe.data.on_missing not in ("error", "skip"):
        raise RecipeError(f"data.on_missing: expected 'error' or 'skip', got {recipe.data.on_missing!r}")
    for i, src in enumerate(recipe.data.sources):
        check_source(src, f"data.sources[{i}]")
    for i, src in enumerate(recipe.data.eval_sources):
        check_source(src, f"data.eval_sources[{i}]")
    check_positive(recipe.data.eval_examples, "data.eval_examples")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        check_positive(getattr(recipe.model, key), f"model.{key}")
    dropout = recipe.model.residual_dropout
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise RecipeError(f"model.residual_dropout: a probability in [0, 1) (e.g. 0.1), got {dropout}")
    if recipe.model.image_tokenizer is not None:
        _check_vq_fields(recipe.model.image_tokenizer)
    if recipe.model.generation:
        _check_generation_fields(recipe.model.generation)
    if not recipe.stages:
        raise RecipeError("stages: empty; list at least one stage (image_tokenizer, tokenizer, vision_pretrain, "
                          "denoiser)")
    names: set[str] = set()
    for i, stage in enumerate(assign_stage_names(recipe.stages)):
        _check_stage(stage, f"stages[{i}]")
        if stage.name in names:
            raise RecipeError(f"stages[{i}].name: {stage.name!r} is used twice; stage names must be unique")
        names.add(stage.name)
    kinds = [s.type for s in recipe.stages]
    order = {"image_tokenizer": 0, "tokenizer": 1, "vision_pretrain": 2, "denoiser": 3}
    for i in range(1, len(kinds)):
        if order[kinds[i]] < order[kinds[i - 1]]:
            raise RecipeError(
                f"stages[{i}].type: {kinds[i]!r} after {kinds[i - 1]!r}; stages run in the order "
                "image_tokenizer, tokenizer, vision_pretrain, denoiser"
            )
    _check_vision_sources(recipe, kinds)
    for i, stage in enumerate(recipe.stages):
        weights = getattr(stage, "source_weights", None)
        for k, w in enumerate(weights or ()):
            check_positive(w, f"stages[{i}].source_weights[{k}]", allow_zero=True)
        if weights is not None and len(weights) != len(recipe.data.sources):
            raise RecipeError(f"stages[{i}].source_weights: {len(weights)} weights for {len(recipe.data.sources)} "
                              "data.sources; give one weight per source, in their order")
        if weights is not None and not sum(weights) > 0:
            raise RecipeError(f"stages[{i}].source_weights: all 0; give at least one source a positive weight")
    if not recipe.data.sources and any(k != "tokenizer" for k in kinds):
        raise RecipeError("data.sources: empty; a training stage needs at least one data source")
    if recipe.model.init_from is not None and any(k in ("image_tokenizer", "tokenizer") for k in kinds):
        raise RecipeError(
            "model.init_from: a fine-tuning recipe reuses the saved model's tokenizers; remove the "
            "image_tokenizer and tokenizer stages"
        )
    if "image_tokenizer" in kinds and recipe.model.image_tokenizer is None:
        raise RecipeError("model.image_tokenizer: an image_tokenizer stage needs the VQ config here")
    if recipe.model.image_tokenizer_path is not None and (
            "image_tokenizer" in kinds or recipe.model.image_tokenizer is not None):
        raise RecipeError(
            "model.image_tokenizer_path: reuse a trained image tokenizer OR train one (model.image_tokenizer + an "
            "image_tokenizer stage), not both"
        )
    return recipe


def _check_vision_sources(recipe: Recipe, kinds: list[str]) -> None:
    """A vision tower starts from one place: a vision_pretrain stage, ``vision_tower_from``, or ``init_from``."""
    m = recipe.model
    if kinds.count("vision_pretrain") > 1:
        raise RecipeError("stages: more than one vision_pretrain stage; the denoiser starts from one tower")
    if "vision_pretrain" in kinds:
        if not m.vision_tower:
            raise RecipeError("model.vision_tower: a vision_pretrain stage pretrains the vision tower; set one")
        if "denoiser" not in kinds:
            raise RecipeError("stages: a vision_pretrain stage needs a denoiser stage after it to use its tower")
        for key in ("init_from", "vision_tower_from"):
            if getattr(m, key) is not None:
                raise RecipeError(f"model.{key}: the recipe also has a vision_pretrain stage; the tower comes from "
                                  "one place, so drop one of them")
    if m.vision_tower_from is not None:
        if m.init_from is not None:
            raise RecipeError("model.vision_tower_from: init_from already brings its own tower; drop one of them")
        if not m.vision_tower:
            raise RecipeError("model.vision_tower_from: set model.vision_tower to the copied tower's config too")


def _check_vq_fields(vq: dict[str, Any]) -> None:
    """Check the image tokenizer's keys and types against VQConfig when that class is available."""
    try:
        from ..vision.image_tokenizer import VQConfig
    except ImportError:
        return
    if dataclasses.is_dataclass(VQConfig):
        try:
            build(VQConfig, vq, "model.image_tokenizer")
        except (ValueError, TypeError) as e:
            if isinstance(e, RecipeError):
                raise
            raise RecipeError(f"model.image_tokenizer: {e}") from None


def _check_generation_fields(generation: dict[str, Any]) -> None:
    import inspect

    from ..generation_config import MMDLMGenerationConfig

    known = [k for k in inspect.signature(MMDLMGenerationConfig.__init__).parameters if k not in ("self", "kwargs")]
    for key in generation:
        if key not in known:
            raise RecipeError(f"model.generation.{key}: unknown key; known keys here are {known}")


def assign_stage_names(stages: list[Any]) -> list[Any]:
    """Give unnamed stages their default names (in place): ``image_tokenizer``, ``tokenizer``, and ``model``
    for the last denoiser stage (its folder is the final model), ``denoiser<i>`` for earlier ones."""
    denoisers = [s for s in stages if isinstance(s, DenoiserStage)]
    for s in stages:
        if s.name is None:
            if isinstance(s, DenoiserStage):
                s.name = "model" if s is denoisers[-1] else f"denoiser{denoisers.index(s) + 1}"
            else:
                s.name = s.type
    return stages


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from nested dicts (as read from YAML)."""
    return validate(build(Recipe, data, ""))


def load_recipe(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Read a YAML recipe file; ``overrides`` (top-level keys, e.g. ``{"output_dir": ...}``) replace its values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping at the top level, got {describe(data)}")
    data.update(overrides or {})
    try:
        return recipe_from_dict(data)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
