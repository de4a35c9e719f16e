"""All mmdlm samplers behind one entry point: ``generate`` (text answers; "llada" reference or "fast") plus the
MaskGIT image sampler; defaults come from an :class:`mmdlm.generation_config.MMDLMGenerationConfig`."""

from __future__ import annotations

import importlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers.utils import ModelOutput

from ..generation_config import MMDLMGenerationConfig
from . import llada, maskgit
from .llada import SamplerOutput, gumbel_argmax, num_transfer_tokens
from .llada import generate as llada_generate
from .autoregressive import generate_autoregressive, generate_image_tokens_autoregressive
from .maskgit import cosine_schedule, generate_image_tokens, t2i_prompt_ids

__all__ = [
    "GenerateOutput", "SamplerOutput", "generate", "llada", "llada_generate", "maskgit", "generate_image_tokens",
    "cosine_schedule", "t2i_prompt_ids", "num_transfer_tokens", "gumbel_argmax", "resolve_generation_config",
    "generate_autoregressive", "generate_image_tokens_autoregressive",
]

_CONFIG_KEYS = ("steps", "gen_length", "block_length", "temperature", "remasking", "cfg_scale")
_FAST_KEYS = ("threshold", "cache")


@dataclass
class GenerateOutput(ModelOutput):
    """``sequences`` [B, prompt + gen_length]; ``nfe`` denoiser forward calls (None if the sampler does not say);
    ``seconds`` wall-clock time of the sampling loop (image encoding excluded)."""

    sequences: Optional[torch.Tensor] = None
    nfe: Optional[int] = None
    seconds: Optional[float] = None


def resolve_generation_config(model: Any, generation_config: Optional[MMDLMGenerationConfig] = None) -> MMDLMGenerationConfig:
    """The config to take defaults from: the one given, else ``model.generation_config`` when it is an
    :class:`MMDLMGenerationConfig`, else the package defaults."""
    if generation_config is not None:
        if not isinstance(generation_config, MMDLMGenerationConfig):
            raise TypeError(
                f"generation_config must be an MMDLMGenerationConfig, got {type(generation_config).__name__}; "
                "build one with MMDLMGenerationConfig(**its_dict)."
            )
        return generation_config
    own = getattr(model, "generation_config", None)
    return own if isinstance(own, MMDLMGenerationConfig) else MMDLMGenerationConfig()


def _fast_sampler():
    try:
        return importlib.import_module(".fast", __name__).generate
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.fast":
            raise
        return None


def _generate_causal(model, input_ids, attention_mask, sampler, pixel_values, image_features, gen_length,
                     callback) -> GenerateOutput:
    if sampler is not None:
        raise ValueError(f"this model is causal (config.is_causal: an AR twin or a vision_pretrain captioner); it "
                         f"decodes greedily, not with the {sampler!r} diffusion sampler; leave sampler unset")
    if callback is not None:
        raise ValueError("streaming shows the denoising steps of a diffusion model; this model is causal and has "
                         "none, so ask it without streaming")
    if pixel_values is not None:
        if image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both.")
        image_features = model.image_features(pixel_values)
    start = time.perf_counter()
    out = generate_autoregressive(model, input_ids, attention_mask, max_new_tokens=int(gen_length), return_dict=True,
                                  image_features=image_features)
    return GenerateOutput(sequences=out.sequences, nfe=out.nfe, seconds=time.perf_counter() - start)


def _fit_to_length(options: dict[str, Any], explicit: set[str], config: MMDLMGenerationConfig) -> None:
    """When the caller sets gen_length but leaves block_length/steps to the config, keep them valid for it:
    block_length falls back to gen_length if it does not divide it, and steps keep the config's steps per token
    (rounded up to a multiple of the number of blocks)."""
    gen = options["gen_length"]
    if "block_length" not in explicit and gen % options.get("block_length", gen):
        options["block_length"] = gen
    if "steps" not in explicit and "gen_length" in explicit:
        blocks = gen // options.get("block_length", gen)
        per_token = config.steps / config.gen_length
        wanted = max(1, round(gen * per_token))
        options["steps"] = blocks * max(1, -(-wanted // blocks))


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    sampler: Optional[str] = None,
    pixel_values: Any = None,
    image_features: Optional[torch.Tensor] = None,
    image_sizes: Any = None,
    generation_config: Optional[MMDLMGenerationConfig] = None,
    **kwargs: Any,
) -> GenerateOutput:
    """Answer (multimodal) prompts with a diffusion sampler.

    ``sampler``: "llada" (reference, :func:`mmdlm.sampling.llada.generate`) or "fast"
    (``mmdlm.sampling.fast.generate``); default from the generation config. A causal model
    (``config.is_causal``: the AR twin, a ``vision_pretrain`` captioner) decodes greedily with its KV cache
    instead (:func:`mmdlm.sampling.autoregressive.generate_autoregressive`; only ``gen_length`` applies).
    Images are encoded once (``model.image_features(pixel_values)``); ``image_sizes`` is accepted for processor
    outputs and unused (the views already encode it). Options come from ``generation_config`` (or
    ``model.generation_config``) and explicit ``kwargs`` win; ``max_new_tokens`` is an alias of ``gen_length``.
    Remaining kwargs go to the sampler (e.g. ``generator``, ``callback``, ``logits_eos_inf``).
    """
    config = resolve_generation_config(model, generation_config)
    if "max_new_tokens" in kwargs:
        alias = kwargs.pop("max_new_tokens")
        if "gen_length" in kwargs and kwargs["gen_length"] != alias:
            raise ValueError(f"max_new_tokens ({alias}) and gen_length ({kwargs['gen_length']}) disagree; pass one.")
        kwargs["gen_length"] = alias
    if getattr(model.config, "is_causal", False):
        return _generate_causal(model, input_ids, attention_mask, sampler, pixel_values, image_features,
                                kwargs.get("gen_length", config.gen_length), kwargs.get("callback"))
    name = sampler or config.sampler
    if name not in ("llada", "fast"):
        raise ValueError(f"unknown sampler {name!r}; choose 'llada' (reference) or 'fast'.")
    fn = llada_generate
    if name == "fast":
        fn = _fast_sampler()
        if fn is None:
            if sampler == "fast":
                raise ImportError("the 'fast' sampler (mmdlm.sampling.fast) is not available; use sampler='llada'.")
            warnings.warn("mmdlm.sampling.fast is not available; falling back to the reference 'llada' sampler.")
            fn, name = llada_generate, "llada"

    keys = _CONFIG_KEYS + (_FAST_KEYS if name == "fast" else ())
    options = {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
    explicit = set(kwargs)
    options.update(kwargs)
    _fit_to_length(options, explicit, config)

    if pixel_values is not None:
        if image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both.")
        image_features = model.image_features(pixel_values)

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn(model, input_ids, attention_mask, image_features=image_features, return_dict=True, **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if isinstance(out, torch.Tensor):
        return GenerateOutput(sequences=out, nfe=None, seconds=seconds)
    return GenerateOutput(sequences=out.sequences, nfe=getattr(out, "nfe", None), seconds=seconds)
