"""mmdlm: multimodal masked-diffusion language models (LLaDA-V / MMaDA style) — understand and draw images with one denoiser."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Importing the model module registers the classes with AutoConfig / AutoModel; it is cheap (no tower is built).
from .configuration_mmdlm import MMDLMConfig  # noqa: E402
from .modeling_mmdlm import MMDLMForConditionalGeneration, MMDLMModel  # noqa: E402

__all__ = ["MMDLMConfig", "MMDLMForConditionalGeneration", "MMDLMModel", "load", "__version__"]


def load(name_or_path: str = "shapes-tiny", **kwargs: Any):
    """Load a model by bundled name (``"shapes-tiny"``) or local folder (mmdlm, LLaDA, LLaDA-V or MMaDA layout)
    and return a :class:`mmdlm.pipeline.MMDLMPipeline`. Keyword arguments go to the pipeline (``device``, ``dtype``)."""
    from .pipeline import MMDLMPipeline

    return MMDLMPipeline.from_pretrained(name_or_path, **kwargs)
