"""Training recipes: a YAML file -> nested dataclasses, validated strictly (unknown keys and wrong types are errors
that name the key path, e.g. ``stages[2].lr: expected float, got str 'fast'``)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

TASKS = ("text", "understanding", "t2i")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class RecipeError(ValueError):
    """A recipe is malformed; the message starts with the key path of the offending value."""


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class ModelRecipe:
    """Denoiser sizes (see :class:`mmdlm.MMDLMConfig`), the vision tower dict (given to
    ``mmdlm.vision.towers.create_vision_tower``; ``None`` = no understanding), and the VQ image tokenizer's
    :class:`~mmdlm.vision.image_tokenizer.VQConfig` fields (``None`` = the model cannot draw).
    ``image_tokenizer_path`` reuses a VQ tokenizer trained by another run (instead of an image_tokenizer stage).
    ``init_from`` starts from a saved mmdlm model folder (fine-tuning); its tokenizer, processor and image
    tokenizer are reused and the size fields here are ignored."""

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
    initializer_range: float = 0.02
    vision_tower: Optional[dict[str, Any]] = None
    mm_projector_type: str = "mlp2x_gelu"
    use_image_newline: bool = False
    image_processor: Optional[dict[str, Any]] = None
    image_tokenizer: Optional[dict[str, Any]] = None
    image_tokenizer_path: Optional[str] = None
    init_from: Optional[str] = None


# ---------------------------------------------------------------------------------------------------- data sources


@dataclass
class ShapesSource:
    """The procedural Shapes world: the first ``n`` scenes of ``split`` (``mmdlm.data.shapes.shapes_examples``)."""

    type: Literal["shapes"] = "shapes"
    split: str = "train"
    n: int = 1000
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: ["caption", "vqa", "t2i"])
    weight: float = 1.0


@dataclass
class DigitsSource:
    """scikit-learn's handwritten digits upscaled to 64 px (``mmdlm.data.digits.digit_examples``)."""

    type: Literal["digits"] = "digits"
    split: str = "train"
    tasks: list[str] = field(default_factory=lambda: ["vqa", "caption", "t2i"])
    weight: float = 1.0


@dataclass
class LlavaJsonSource:
    """A LLaVA conversation JSON/JSONL file; image paths are relative to ``image_folder``."""

    type: Literal["llava_json"] = "llava_json"
    path: str = ""
    image_folder: Optional[str] = None
    weight: float = 1.0


@dataclass
class ImageFolderSource:
    """``datasets``' imagefolder layout (images + metadata.jsonl); ``task`` is "caption" or "t2i"."""

    type: Literal["imagefolder"] = "imagefolder"
    dir: str = ""
    task: str = "caption"
    split: str = "train"
    text_column: str = "text"
    prompt: Optional[str] = None
    weight: float = 1.0


@dataclass
class TableSource:
    """A JSON/JSONL/Parquet table with an image column and a text column; ``task`` is caption, vqa or t2i."""

    type: Literal["table"] = "table"
    path: str = ""
    image_column: str = "image"
    text_column: str = "text"
    task: str = "caption"
    image_root: Optional[str] = None
    prompt: Optional[str] = None
    question_column: str = "question"
    weight: float = 1.0


@dataclass
class TextSource:
    """Plain text for the text task: a .txt file (one example per non-empty line) or JSON/JSONL records
    holding ``field``."""

    type: Literal["text"] = "text"
    path: str = ""
    field: str = "text"
    weight: float = 1.0


Source = Union[ShapesSource, DigitsSource, LlavaJsonSource, ImageFolderSource, TableSource, TextSource]


@dataclass
class DataRecipe:
    """The training mixture (each source is drawn with probability proportional to its ``weight``), optional
    held-out ``eval_sources`` (their first ``eval_examples`` examples give the eval loss), and what to do with
    an example whose image is missing: ``"error"`` stops before training, ``"skip"`` drops it and reports a count."""

    sources: list[Source] = field(default_factory=list)
    eval_sources: list[Source] = field(default_factory=list)
    eval_examples: int = 64
    on_missing: str = "error"


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
    ``mmdlm.diffusion.compute_batch_loss``. ``bf16`` autocasts on GPUs that support it (CPU runs stay fp32).
    ``group_by_task`` draws each micro-batch from one task, which avoids padding short understanding rows to
    the length of t2i rows (cheaper on CPU)."""

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
    group_by_task: bool = False
    bf16: bool = True
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1


Stage = Union[ImageTokenizerStage, TokenizerStage, DenoiserStage]


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


# ---------------------------------------------------------------------------------------------------- parsing


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in args):
            return "one of the types " + ", ".join(repr(_literal_type(a)) for a in args)
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        val = typing.get_args(tp)[1]
        return "mapping" if val is Any else f"mapping of {_type_name(val)}"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _literal_type(cls: type) -> str:
    return typing.get_args(typing.get_type_hints(cls)["type"])[0]


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build dataclasses; raises RecipeError naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got null")
        choices = [a for a in args if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in choices) and len(choices) > 1:
            return _convert_tagged(value, choices, path)
        errors = []
        for a in choices:
            try:
                return _convert(value, a, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        return value
    if origin is tuple:  # only the homogeneous tuple[X, ...] form (VQConfig.channel_mult)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected list of {_type_name(typing.get_args(tp)[0])}, got {_describe(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(f"{path}: keys must be strings, got {_describe(k)}")
            out[k] = _convert(v, val_tp, f"{path}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected bool, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected int, got {_describe(value)}")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string; accept numbers written that way.
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected str, got {_describe(value)}")
        return value
    raise TypeError(f"recipe annotation {tp!r} at {path} is not supported")  # a bug in this file, not in the recipe


def _convert_tagged(value: Any, choices: list[type], path: str) -> Any:
    tags = {_literal_type(c): c for c in choices}
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: expected a mapping with a 'type' key, got {_describe(value)}")
    if "type" not in value:
        raise RecipeError(f"{path}: missing 'type'; use one of {sorted(tags)}")
    cls = tags.get(value["type"])
    if cls is None:
        raise RecipeError(f"{path}.type: unknown type {value['type']!r}; use one of {sorted(tags)}")
    return _build(cls, value, path)


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in names]
    if unknown:
        raise RecipeError(f"{prefix}{unknown[0]}: unknown key; known keys here are {names}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _positive(value: float | int, path: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_stage(stage: Any, path: str) -> None:
    if isinstance(stage, TokenizerStage):
        return
    for key in ("steps", "batch_size", "lr"):
        _positive(getattr(stage, key), f"{path}.{key}")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "log_every", "eval_every", "save_every"):
        _positive(getattr(stage, key), f"{path}.{key}", allow_zero=True)
    if stage.keep_checkpoints < 1:
        raise RecipeError(f"{path}.keep_checkpoints: must be >= 1, got {stage.keep_checkpoints}")
    if stage.schedule not in ("cosine", "linear", "constant"):
        raise RecipeError(f"{path}.schedule: expected 'cosine', 'linear' or 'constant', got {stage.schedule!r}")
    if not 0.0 <= stage.min_lr_ratio <= 1.0:
        raise RecipeError(f"{path}.min_lr_ratio: must be in [0, 1], got {stage.min_lr_ratio}")
    if isinstance(stage, DenoiserStage):
        _positive(stage.grad_accum, f"{path}.grad_accum")
        _positive(stage.max_length, f"{path}.max_length")
        if stage.vision_tower_lr is not None:
            _positive(stage.vision_tower_lr, f"{path}.vision_tower_lr", allow_zero=True)
        if len(stage.betas) != 2 or not all(0.0 <= b < 1.0 for b in stage.betas):
            raise RecipeError(f"{path}.betas: expected two values in [0, 1), got {stage.betas}")
        for task, w in stage.task_weights.items():
            if task not in TASKS:
                raise RecipeError(f"{path}.task_weights.{task}: unknown task; use any of {list(TASKS)}")
            _positive(w, f"{path}.task_weights.{task}", allow_zero=True)
        for i, name in enumerate(stage.freeze):
            if not name.strip():
                raise RecipeError(f"{path}.freeze[{i}]: empty parameter prefix")


def _check_source(src: Any, path: str) -> None:
    _positive(src.weight, f"{path}.weight")
    required = {"llava_json": "path", "imagefolder": "dir", "table": "path", "text": "path"}.get(src.type)
    if required and not getattr(src, required):
        raise RecipeError(f"{path}.{required}: required for a {src.type!r} source")
    if isinstance(src, ShapesSource):
        _positive(src.n, f"{path}.n")


def validate(recipe: Recipe) -> Recipe:
    """Value checks beyond types (positive sizes, known choices, stage order); returns the recipe."""
    if recipe.data.on_missing not in ("error", "skip"):
        raise RecipeError(f"data.on_missing: expected 'error' or 'skip', got {recipe.data.on_missing!r}")
    for i, src in enumerate(recipe.data.sources):
        _check_source(src, f"data.sources[{i}]")
    for i, src in enumerate(recipe.data.eval_sources):
        _check_source(src, f"data.eval_sources[{i}]")
    _positive(recipe.data.eval_examples, "data.eval_examples")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        _positive(getattr(recipe.model, key), f"model.{key}")
    if recipe.model.image_tokenizer is not None:
        _check_vq_fields(recipe.model.image_tokenizer)
    if not recipe.stages:
        raise RecipeError("stages: empty; list at least one stage (image_tokenizer, tokenizer, denoiser)")
    names: set[str] = set()
    for i, stage in enumerate(assign_stage_names(recipe.stages)):
        _check_stage(stage, f"stages[{i}]")
        if stage.name in names:
            raise RecipeError(f"stages[{i}].name: {stage.name!r} is used twice; stage names must be unique")
        names.add(stage.name)
    kinds = [s.type for s in recipe.stages]
    order = {"image_tokenizer": 0, "tokenizer": 1, "denoiser": 2}
    for i in range(1, len(kinds)):
        if order[kinds[i]] < order[kinds[i - 1]]:
            raise RecipeError(
                f"stages[{i}].type: {kinds[i]!r} after {kinds[i - 1]!r}; stages run in the order "
                "image_tokenizer, tokenizer, denoiser"
            )
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


def _check_vq_fields(vq: dict[str, Any]) -> None:
    """Check the image tokenizer's keys and types against VQConfig when that class is available."""
    try:
        from ..vision.image_tokenizer import VQConfig
    except ImportError:
        return
    if dataclasses.is_dataclass(VQConfig):
        try:
            _build(VQConfig, vq, "model.image_tokenizer")
        except (ValueError, TypeError) as e:
            if isinstance(e, RecipeError):
                raise
            raise RecipeError(f"model.image_tokenizer: {e}") from None


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
    return validate(_build(Recipe, data, ""))


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
        raise RecipeError(f"{path} must hold a mapping at the top level, got {_describe(data)}")
    data.update(overrides or {})
    try:
        return recipe_from_dict(data)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
