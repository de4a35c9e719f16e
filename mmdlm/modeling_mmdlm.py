"""The mmdlm denoiser: a LLaMA-shaped transformer with no causal mask (LLaDA), plus the LLaVA-style merge of
projected image features into the token embeddings (LLaDA-V) and an optional VQ image tokenizer (MMaDA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mmdlm import MMDLMConfig
from .generation_config import MMDLMGenerationMixin

KVCache = list  # one (key, value) pair per layer, keys already rotated, shape [B, n_kv_heads, L, head_dim]


@dataclass
class MMDLMOutput(ModelOutput):
    """Output of a forward pass: ``logits`` [B, L or K, V]; ``cache`` (when ``use_cache``) holds the keys
    and values of *this call's* positions only, so callers can assemble prefix/suffix caches freely."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[KVCache] = None
    hidden_states: Optional[torch.Tensor] = None


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and cast back, then scaled (LLaDA / LLaMA)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, L, head_dim] in fp32 for absolute positions (half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key heads: x*cos + rotate_half(x)*sin, in fp32 ("rope_full_precision" as in LLaDA)."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class MMDLMAttention(nn.Module):
    """Multi-head attention with optional grouped-query heads and a bias-free LLaMA layout."""

    def __init__(self, config: MMDLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, past: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), present


class MMDLMMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MMDLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MMDLMDecoderLayer(nn.Module):
    """Pre-norm transformer block (the unit FSDP wraps)."""

    def __init__(self, config: MMDLMConfig) -> None:
        super().__init__()
        self.config = config  # residual_dropout is read at each forward, so a loaded model can be given one
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MMDLMAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MMDLMMLP(config)

    def forward(self, x, cos, sin, mask, past=None):
        p = getattr(self.config, "residual_dropout", 0.0) if self.training else 0.0
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + F.dropout(h, p, training=p > 0)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p, training=p > 0), present


def build_attention_mask(
    attention_mask: Optional[torch.Tensor], batch: int, q_len: int, past_len: int, is_causal: bool, device
) -> Optional[torch.Tensor]:
    """Boolean SDPA mask [B, 1, Lq, Lpast+Lq] (True = may attend), or None when every key is visible.

    The 2-D ``attention_mask`` is a *key-padding* mask over past + current positions and is applied
    bidirectionally: a padded batch never silently becomes causal (a known LLaDA/MMaDA bug).
    """
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, past_len + q_len):
            raise ValueError(
                f"attention_mask must be a 2-D key-padding mask of shape [batch, past + current] = "
                f"[{batch}, {past_len + q_len}], got {tuple(attention_mask.shape)}."
            )
        keys = attention_mask.to(device=device, dtype=torch.bool)
        if bool(keys.all()):
            keys = None
    else:
        keys = None
    if keys is None and not is_causal:
        return None
    mask = torch.ones(batch, 1, q_len, past_len + q_len, dtype=torch.bool, device=device)
    if keys is not None:
        mask = mask & keys[:, None, None, :]
    if is_causal:
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        mask[..., past_len:] &= causal
    # A query whose keys are all padding would give NaN; let it see itself (its output is never used).
    mask[..., past_len:] |= torch.eye(q_len, dtype=torch.bool, device=device)
    return mask


class MMDLMPreTrainedModel(PreTrainedModel):
    """Common Hugging Face plumbing (config class, weight init, FSDP wrap unit)."""

    config_class = MMDLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MMDLMDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Vision towers and the image tokenizer keep their own initialisation (or their loaded weights).
        if getattr(module, "_mmdlm_keep_init", False):
            return
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def _keep_init(module: nn.Module) -> nn.Module:
    for m in module.modules():
        m._mmdlm_keep_init = True
    return module


class MMDLMModel(MMDLMPreTrainedModel):
    """Backbone: token embeddings, decoder layers, final norm, and (optionally) LLaVA's vision_tower +
    mm_projector + image_newline, named as in LLaDA-V so its weights load without renaming."""

    def __init__(self, config: MMDLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MMDLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.vision_config is not None:
            from .vision.projector import build_projector
            from .vision.towers import create_vision_tower

            self.vision_tower = _keep_init(create_vision_tower(dict(config.vision_config)))
            self.mm_projector = build_projector(
                config.mm_projector_type, self.vision_tower.hidden_size, config.hidden_size
            )
            if config.use_image_newline:
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
            if config.image_slot_embeddings:
                # zeros: the model reads images exactly as without it until training moves it
                self.image_slot_embed = nn.Parameter(torch.zeros(self.vision_tower.num_patches, config.hidden_size))
        if getattr(config, "image_code_positions", False):
            self.add_image_code_positions()
        self.post_init()

    def add_image_code_positions(self) -> None:
        """Give the model a learned embedding per code-grid cell, zeros (so it draws as before until trained), and
        set ``config.image_code_positions``; used by ``__init__`` and to add them to a trained model."""
        if not self.config.can_draw_images:
            raise ValueError("image_code_positions needs a model that draws (image_tokenizer_config and codebook_size).")
        if getattr(self, "image_code_pos_embed", None) is None:
            w = self.embed_tokens.weight
            self.image_code_pos_embed = nn.Parameter(torch.zeros(self.config.num_image_tokens, w.shape[1],
                                                                 dtype=w.dtype, device=w.device))
        self.config.image_code_positions = True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def image_features(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Project images to embedding space: a flat [total_slots, hidden] tensor, images in order.

        ``pixel_values`` is [N, 3, S, S] (one view per image) or a list with one [views, 3, S, S] tensor per
        image (anyres: base view first). Each image gives views * num_patches features (+1 newline).
        """
        if self.config.vision_config is None:
            raise ValueError("this model has no vision tower; it cannot read images (vision_config is None).")
        tower_dtype = next(self.vision_tower.parameters()).dtype
        device = self.embed_tokens.weight.device
        if isinstance(pixel_values, (list, tuple)):
            images = [self.mm_projector(self.vision_tower(v.to(device=device, dtype=tower_dtype))) for v in pixel_values]
        else:  # one view per image: the whole batch goes through the tower at once
            images = list(self.mm_projector(self.vision_tower(pixel_values.to(device=device, dtype=tower_dtype)))[:, None])
        feats = []
        for f in images:  # f: [views, num_patches, hidden]
            if self.config.image_slot_embeddings:
                f = f + self.image_slot_embed.to(f.dtype)
            f = f.reshape(-1, f.shape[-1]).to(self.embed_tokens.weight.dtype)
            if self.config.use_image_newline:
                f = torch.cat([f, self.image_newline[None].to(f.dtype)], dim=0)
            feats.append(f)
        return torch.cat(feats, dim=0)

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with image features written into the placeholder slots, row-major order."""
        image_id = self.config.image_token_id
        slots = (input_ids == image_id) if image_id is not None else None
        n_slots = int(slots.sum()) if slots is not None else 0
        ids = input_ids.masked_fill(slots, 0) if n_slots else input_ids
        embeds = self.embed_tokens(ids)
        if getattr(self, "image_code_pos_embed", None) is not None:
            embeds = embeds + self._code_position_embeds(input_ids)
        if image_features is None:
            if n_slots:
                raise ValueError(
                    f"input_ids hold {n_slots} image placeholder slots (id {image_id}) but no pixel_values were "
                    "given; pass the images, or remove the <image> placeholders."
                )
            return embeds
        if n_slots != image_features.shape[0]:
            raise ValueError(
                f"the prompt has {n_slots} image slots but the images give {image_features.shape[0]} features: "
                "use one <image> placeholder per image and let the processor expand it."
            )
        embeds = embeds.clone()
        embeds[slots] = image_features.to(embeds.dtype)
        return embeds

    def _code_position_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L, d]: the grid cell's embedding at the N slots after each ``<|soi|>``, zeros elsewhere. Rows are
        whole (drawing never runs over a KV cache), so every code slot sees its ``<|soi|>``."""
        table = self.image_code_pos_embed
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_soi = torch.where(input_ids == self.config.soi_token_id, pos, -1).cummax(dim=1).values
        offset = pos - last_soi - 1
        inside = (last_soi >= 0) & (offset >= 0) & (offset < table.shape[0])
        return table[offset.clamp(0, table.shape[0] - 1)] * inside[..., None].to(table.dtype)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        use_cache: bool = False,
        image_features: Optional[torch.Tensor] = None,
        is_causal: Optional[bool] = None,
    ) -> tuple[torch.Tensor, Optional[KVCache]]:
        """Run the transformer; returns (final hidden states [B, L, d], per-layer (k, v) of these positions).
        ``is_causal`` overrides ``config.is_causal`` for this call (a denoiser trained partly with next-token loss)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
                raise ValueError(
                    f"input_ids must be an integer tensor [batch, length], got {tuple(input_ids.shape)} {input_ids.dtype}."
                )
            if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
                raise ValueError(f"input_ids contain ids outside [0, {self.config.vocab_size}).")
            inputs_embeds = self.embed(input_ids, image_features)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, length, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}.")
        B, L, _ = inputs_embeds.shape
        past_len = cache[0][0].shape[2] if cache else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + L, device=inputs_embeds.device)[None].expand(B, L)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        causal = self.config.is_causal if is_causal is None else is_causal
        mask = build_attention_mask(attention_mask, B, L, past_len, causal, inputs_embeds.device)
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, mask, cache[i] if cache else None)
            if use_cache:
                presents.append(present)
        return self.norm(x), (presents if use_cache else None)


def _reads_first_position(logits_to_keep: Optional[int | torch.Tensor], input_ids: Optional[torch.Tensor],
                          inputs_embeds: Optional[torch.Tensor]) -> bool:
    """Whether a forward's kept logits include its first query position."""
    if logits_to_keep is None:
        return True
    if isinstance(logits_to_keep, int):
        n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        return logits_to_keep <= 0 or logits_to_keep >= n
    return bool((logits_to_keep == 0).any())


class MMDLMForConditionalGeneration(MMDLMGenerationMixin, MMDLMPreTrainedModel):
    """Backbone + LM head (+ image tokenizer): predicts clean tokens at masked positions.

    ``forward`` accepts ``input_ids`` or ``inputs_embeds``, a 2-D key-padding ``attention_mask``,
    ``position_ids``, ``pixel_values`` (or precomputed ``image_features``), ``cache`` (per-layer (key, value) pairs) for cached
    prefix/suffix keys, ``logits_to_keep``: an int (last k positions) or a LongTensor [B, K] of positions
    where logits are wanted (samplers ask only for still-masked slots), ``is_causal`` to override
    ``config.is_causal`` for one call, and ``shift_logits`` to override ``config.shift_logits`` (with it, position
    i's logits come from the output at i - 1, as in Dream; ``False`` gives the next-token logits an AR decoder reads;
    over a cache, the first query position has no predecessor in the forward, so its logits cannot be asked for).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MMDLMConfig) -> None:
        super().__init__(config)
        self.model = MMDLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.image_tokenizer_config is not None:
            from .vision.image_tokenizer import VQConfig, VQImageTokenizer

            self.image_tokenizer = _keep_init(VQImageTokenizer(VQConfig(**config.image_tokenizer_config)))
        self.post_init()

    def set_image_tokenizer(self, vq: nn.Module) -> None:
        """Draw through another trained VQ image tokenizer with this model's codebook size (its code embeddings
        then mean other pictures: train drawing again). A 'vq' vision tower keeps its own copy of the encoder."""
        import dataclasses

        if not self.config.can_draw_images:
            raise ValueError("this model has no image codes in its vocabulary (codebook_size 0); it cannot draw.")
        if vq.codebook_size != self.config.codebook_size:
            raise ValueError(f"the image tokenizer has {vq.codebook_size} codes but this model's vocabulary holds "
                             f"{self.config.codebook_size}; train one with codebook_size {self.config.codebook_size}.")
        if self.config.image_code_positions and vq.num_tokens != self.config.num_image_tokens:
            raise ValueError(f"the image tokenizer draws {vq.num_tokens} codes but this model's code-position table "
                             f"has {self.config.num_image_tokens}; use a tokenizer with the same grid.")
        self.config.image_tokenizer_config = {**dataclasses.asdict(vq.config),
                                              "channel_mult": list(vq.config.channel_mult)}
        self.image_tokenizer = vq

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def image_features(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Projected image features, flat [total_slots, hidden] (see :meth:`MMDLMModel.image_features`)."""
        return self.model.image_features(pixel_values)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor | list[torch.Tensor]] = None,
        image_features: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        use_cache: bool = False,
        logits_to_keep: Optional[int | torch.Tensor] = None,
        is_causal: Optional[bool] = None,
        shift_logits: Optional[bool] = None,
        **kwargs: Any,
    ) -> MMDLMOutput:
        kwargs.pop("image_sizes", None)  # carried by the processor for anyres; the views already encode it
        kwargs.pop("return_dict", None)
        if kwargs:
            raise TypeError(f"unexpected forward arguments: {sorted(kwargs)}")
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass pixel_values or image_features, not both.")
            image_features = self.image_features(pixel_values)
        shift = getattr(self.config, "shift_logits", False) if shift_logits is None else shift_logits
        if shift and cache is not None and _reads_first_position(logits_to_keep, input_ids, inputs_embeds):
            # Its predecessor lives only in the cache, as K/V: its output is not there to shift in.
            raise ValueError(
                "this model shifts its logits (config.shift_logits): position i's prediction comes from the output at "
                "i - 1, so a forward over cached keys cannot predict its first query position. Start the queries one "
                "position earlier and keep logits only after it (logits_to_keep), as the fast sampler's caches do, "
                "or decode without a KV cache (cache='none')."
            )
        hidden, presents = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            image_features=image_features,
            is_causal=is_causal,
        )
        if shift:  # position 0 has no predecessor: it keeps its own output
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        if logits_to_keep is not None:
            if isinstance(logits_to_keep, int):
                hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            else:
                idx = logits_to_keep.to(hidden.device)
                if idx.dim() != 2 or idx.shape[0] != hidden.shape[0]:
                    raise ValueError(f"logits_to_keep must be an int or a [batch, K] index tensor, got {tuple(idx.shape)}.")
                hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.lm_head(hidden).float()
        return MMDLMOutput(logits=logits, cache=presents)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        """Diffusion decoding of a (multimodal) prompt; see :func:`mmdlm.sampling.generate` for the options.

        Accepts the processor's output as ``**inputs`` (``input_ids``, ``attention_mask``, ``pixel_values``,
        ``image_sizes``) and returns an output whose ``.sequences`` is [B, prompt + gen_length].
        """
        from .sampling import generate as _generate

        return _generate(self, input_ids, attention_mask=attention_mask, **kwargs)


AutoConfig.register("mmdlm", MMDLMConfig)
AutoModel.register(MMDLMConfig, MMDLMForConditionalGeneration)
