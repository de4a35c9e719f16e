"""Decoding defaults of an mmdlm model (text diffusion sampler + MaskGIT image sampler), saved next to the weights as
``generation_config.json`` by Hugging Face's ``save_pretrained`` and read back by ``from_pretrained``."""

from __future__ import annotations

import os
from typing import Any, Optional

from transformers import GenerationConfig

SAMPLERS = ("llada", "fast")
CACHES = ("prefix", "dual", "none")
REMASKING = ("low_confidence", "random")


class MMDLMGenerationConfig(GenerationConfig):
    """Hugging Face ``GenerationConfig`` with the knobs of masked-diffusion decoding.

    Text: ``sampler`` ("fast" = cached/parallel sampler, "llada" = reference), ``steps`` (denoising steps in all),
    ``gen_length`` (answer canvas), ``block_length`` (semi-autoregressive block), ``temperature`` (Gumbel noise;
    0 = argmax), ``remasking`` ("low_confidence" | "random"), ``cfg_scale`` (unsupervised CFG weight),
    ``threshold`` (fast sampler: commit every token with confidence above it), ``cache`` ("prefix" | "dual" | "none").
    Images: ``image_steps`` (MaskGIT steps), ``guidance_scale`` (CFG weight w in (1+w)·cond − w·uncond) and
    ``image_candidates`` (drawings per prompt; above 1 the pipeline keeps the one the model reads back best).

    ``temperature`` and ``guidance_scale`` keep transformers' attribute names, but with diffusion meanings:
    temperature 0 is valid (argmax) and needs no ``do_sample`` flag.
    """

    def __init__(
        self,
        sampler: str = "fast",
        steps: int = 128,
        gen_length: int = 128,
        block_length: int = 32,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        cfg_scale: float = 0.0,
        threshold: float = 0.9,
        cache: str = "prefix",
        image_steps: int = 16,
        guidance_scale: float = 3.5,
        image_candidates: int = 1,
        **kwargs: Any,
    ) -> None:
        # Our attributes exist before GenerationConfig.__init__ runs validate(); temperature and guidance_scale are
        # transformers' own attributes and must go through its __init__, which would otherwise reset them to None.
        self.sampler = sampler
        self.steps = steps
        self.gen_length = gen_length
        self.block_length = block_length
        self.remasking = remasking
        self.cfg_scale = cfg_scale
        self.threshold = threshold
        self.cache = cache
        self.image_steps = image_steps
        self.image_candidates = image_candidates
        super().__init__(temperature=temperature, guidance_scale=guidance_scale, **kwargs)

    @classmethod
    def from_model_config(cls, model_config: Any) -> "MMDLMGenerationConfig":
        """Defaults plus the special-token ids of the model config (the model config holds no decoding knobs)."""
        config = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        generation_config = cls(**ids)
        generation_config._original_object_hash = hash(generation_config)
        return generation_config

    def validate(self, strict: bool = False, user_set_attributes: Optional[set[str]] = None) -> None:
        """Check the diffusion fields, then transformers' own checks minus its greedy-vs-sampling temperature rule."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {self.cache!r}.")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}.")
        for name in ("steps", "gen_length", "block_length", "image_steps", "image_candidates"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length}); "
                "choose block_length dividing gen_length."
            )
        for name in ("temperature", "cfg_scale", "guidance_scale"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}.")
        # transformers warns (and refuses to save) when temperature != 1 without do_sample=True; a diffusion
        # temperature of 0 is argmax, so we tell its validator that do_sample was set on purpose.
        attributes = set(self.__dict__) if user_set_attributes is None else set(user_set_attributes)
        super().validate(strict=strict, user_set_attributes=(attributes - {"temperature"}) | {"do_sample"})

    def sampler_kwargs(self) -> dict[str, Any]:
        """The text-sampler options this config sets (for ``mmdlm.sampling.generate``)."""
        keys = ["steps", "gen_length", "block_length", "temperature", "remasking", "cfg_scale"]
        if self.sampler == "fast":
            keys += ["threshold", "cache"]
        return {k: getattr(self, k) for k in keys if getattr(self, k, None) is not None}


def load_generation_config(directory: str | os.PathLike, **kwargs: Any) -> MMDLMGenerationConfig:
    """Read ``generation_config.json`` from a local model folder as an :class:`MMDLMGenerationConfig`
    (defaults when the folder has none)."""
    path = os.path.join(os.fspath(directory), "generation_config.json")
    if not os.path.isfile(path):
        return MMDLMGenerationConfig(**kwargs)
    return MMDLMGenerationConfig.from_pretrained(os.fspath(directory), local_files_only=True, **kwargs)


class MMDLMGenerationMixin:
    """Put first in the model's bases: transformers then gives the model a ``generation_config``
    (:class:`MMDLMGenerationConfig`), writes it on ``save_pretrained`` and reads it back on ``from_pretrained``.

    transformers enables this for classes whose direct bases mention ``GenerationMixin`` (``can_generate``);
    ``adjust_generation_fn`` is its load hook, reimplemented so the file is read as our subclass.
    """

    generation_config_class = MMDLMGenerationConfig

    def adjust_generation_fn(
        self,
        generation_config: Optional[GenerationConfig],
        from_auto_class: bool,
        from_pipeline: Any,
        pretrained_model_name_or_path: Optional[str | os.PathLike],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if generation_config is not None:
            self.generation_config = MMDLMGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        loading = {k: kwargs[k] for k in _LOADING_KWARGS if kwargs.get(k) is not None}
        try:
            self.generation_config = MMDLMGenerationConfig.from_pretrained(pretrained_model_name_or_path, **loading)
        except OSError:
            pass  # no generation_config.json: keep the defaults built in __init__


_LOADING_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
