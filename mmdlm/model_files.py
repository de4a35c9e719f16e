"""Where a pipeline's model comes from: bundled model names, local folders, and the processor and decoding defaults
that go with a loaded checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Bundled model names -> folders inside the installed package.
BUNDLED_MODELS: dict[str, str] = {"shapes-tiny": "weights/shapes-tiny"}


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model name (see :data:`BUNDLED_MODELS`) or an existing local folder -> its folder."""
    key = str(name_or_path)
    if key in BUNDLED_MODELS:
        path = Path(__file__).resolve().parent / BUNDLED_MODELS[key]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled model {key!r} is not installed (expected its files in {path}); "
                "reinstall mmdlm, or pass the path of a model folder"
            )
        return path
    path = Path(key).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no model named {key!r}: it is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor an existing folder"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{key!r} is a file; pass the folder that holds the model's config.json")
    return path


def load_processor(path: Path, tokenizer: Any, model: Any) -> Any:
    """The folder's saved processor, else one built from the model config and the checkpoint's tokenizer."""
    from .processing import PROCESSOR_CONFIG_NAME, MMDLMProcessor

    if (path / PROCESSOR_CONFIG_NAME).is_file():
        return MMDLMProcessor.from_pretrained(path)
    if tokenizer is None:
        raise FileNotFoundError(f"{str(path)!r} has neither {PROCESSOR_CONFIG_NAME} nor a tokenizer; "
                                "save one with MMDLMProcessor.save_pretrained(folder)")
    return MMDLMProcessor.from_config(model.config, tokenizer, vision_tower=getattr(model.model, "vision_tower", None))


def load_generation_defaults(path: Path, info: Any, model: Any) -> Any:
    """Decoding defaults: the checkpoint loader's, else the folder's generation_config.json, else the model's."""
    from .generation_config import MMDLMGenerationConfig, load_generation_config

    found = info.get("generation_config") if isinstance(info, dict) else getattr(info, "generation_config", None)
    if isinstance(found, MMDLMGenerationConfig):
        return found
    if (path / "generation_config.json").is_file():
        return load_generation_config(path)
    own = getattr(model, "generation_config", None)
    return own if isinstance(own, MMDLMGenerationConfig) else MMDLMGenerationConfig()
