"""Configuration of the mmdlm denoiser: a LLaMA-shaped bidirectional transformer, optionally with a vision tower
(understanding) and a VQ image tokenizer (text-to-image), as one Hugging Face `PreTrainedConfig`."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class MMDLMConfig(PreTrainedConfig):
    """Hyper-parameters of :class:`mmdlm.modeling_mmdlm.MMDLMForConditionalGeneration`.

    Text denoiser (LLaDA shapes): ``vocab_size``, ``hidden_size``, ``intermediate_size`` (SwiGLU width),
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (grouped-query attention when smaller),
    ``head_dim``, ``rope_theta``, ``rms_norm_eps``, ``tie_word_embeddings``. ``is_causal=True`` turns the same
    network into an autoregressive twin (used only as a baseline). ``residual_dropout`` (LLaDA's name) drops that
    share of each attention and MLP output before it joins the residual stream, in training mode only.

    Understanding (LLaDA-V / LLaVA names): ``vision_config`` is the dict given to
    :func:`mmdlm.vision.towers.create_vision_tower`; ``mm_projector_type`` is a LLaVA projector string;
    ``image_token_id`` is the placeholder id whose slots receive projected image features; ``use_image_newline``
    appends a learned ``image_newline`` embedding after each image. ``image_slot_embeddings`` adds a learned
    embedding per slot of a view (``model.image_slot_embed``, [num_patches, hidden_size]) to the projected features.

    Generation (MMaDA layout): image code ``c`` is token ``image_token_offset + c`` for ``c < codebook_size``;
    ``image_tokenizer_config`` is the :class:`mmdlm.vision.image_tokenizer.VQConfig` of the bundled tokenizer
    (``None`` when the model cannot draw); ``soi/eoi/t2i/mmu_token_id`` are the task tokens.
    ``image_code_positions`` adds a learned embedding per cell of the code grid (``model.image_code_pos_embed``,
    [grid cells, hidden_size]) to the N slots after each ``<|soi|>``: where a code sits in the image.
    """

    model_type = "mmdlm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = False,
        is_causal: bool = False,
        shift_logits: bool = False,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        eot_token_id: int | None = None,
        vision_config: dict[str, Any] | None = None,
        mm_projector_type: str = "mlp2x_gelu",
        image_token_id: int | None = None,
        use_image_newline: bool = False,
        image_slot_embeddings: bool = False,
        image_aspect_ratio: str = "pad",
        image_grid_pinpoints: Any = None,
        image_tokenizer_config: dict[str, Any] | None = None,
        image_token_offset: int | None = None,
        codebook_size: int = 0,
        image_code_positions: bool = False,
        residual_dropout: float = 0.0,
        soi_token_id: int | None = None,
        eoi_token_id: int | None = None,
        t2i_token_id: int | None = None,
        mmu_token_id: int | None = None,
        banned_token_ids: list[int] | None = None,
        source_layout: str = "mmdlm",
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        # SwiGLU keeps ~8/3 d parameters per MLP, rounded to a multiple of 64 like LLaMA.
        self.intermediate_size = intermediate_size or 64 * ((8 * hidden_size // 3 + 63) // 64)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.tie_word_embeddings = tie_word_embeddings
        self.is_causal = is_causal
        # Dream / Dimple: the prediction for position i is read from the output at i - 1, the next-token alignment
        # an AR-initialised model already has (LLaDA has no shift).
        self.shift_logits = shift_logits
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.eot_token_id = eot_token_id
        self.vision_config = vision_config
        self.mm_projector_type = mm_projector_type
        self.image_token_id = image_token_id
        self.use_image_newline = use_image_newline
        # For towers whose slot features say what is in a slot but not where (pooled convolutions): RoPE puts
        # position into attention scores only, not into what attention reads. On shapes-tiny's tower it did not
        # improve position questions (benchmarks/results/recipe-sweep/round4).
        self.image_slot_embeddings = image_slot_embeddings
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints
        self.image_tokenizer_config = image_tokenizer_config
        self.image_token_offset = image_token_offset
        self.codebook_size = codebook_size
        # RoPE gives a code its distance to other tokens, and the grid cell only as the distance to <|soi|>, which
        # attention reads from scores, not values: a learned table puts "row 3, column 12" into the code's input.
        # On shapes-tiny it did not help drawing in a 300-step A/B (benchmarks/results/recipe-sweep/round8).
        self.image_code_positions = image_code_positions
        self.residual_dropout = residual_dropout
        self.soi_token_id = soi_token_id
        self.eoi_token_id = eoi_token_id
        self.t2i_token_id = t2i_token_id
        self.mmu_token_id = mmu_token_id
        # Tokens a sampler must never write at a masked slot (LLaDA-V bans BOS and the chat header tokens).
        self.banned_token_ids = list(banned_token_ids or [])
        self.source_layout = source_layout
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings.")
        if self.vision_config is not None and self.image_token_id is None:
            raise ValueError("a config with vision_config needs image_token_id (the id of the <image> placeholder).")
        if self.codebook_size and self.image_token_offset is None:
            raise ValueError("codebook_size is set but image_token_offset is not: image code c is token offset + c.")
        if self.codebook_size and self.image_token_offset + self.codebook_size > self.vocab_size:
            raise ValueError(
                f"image codes end at {self.image_token_offset + self.codebook_size} but vocab_size is "
                f"{self.vocab_size}; raise vocab_size."
            )
        if not 0.0 <= self.residual_dropout < 1.0:
            raise ValueError(f"residual_dropout is a probability in [0, 1), got {self.residual_dropout}.")
        if self.image_code_positions and not self.can_draw_images:
            raise ValueError("image_code_positions needs an image tokenizer (image_tokenizer_config and codebook_size).")

    @property
    def num_image_tokens(self) -> int:
        """Codes per image of the bundled image tokenizer (0 when the model cannot draw)."""
        if self.image_tokenizer_config is None:
            return 0
        from .vision.image_tokenizer import VQConfig

        return VQConfig(**self.image_tokenizer_config).grid_side ** 2

    @property
    def can_understand_images(self) -> bool:
        """True when the model has a vision tower and projector."""
        return self.vision_config is not None

    @property
    def can_draw_images(self) -> bool:
        """True when the model has an image tokenizer and a range of image-code tokens."""
        return self.image_tokenizer_config is not None and self.codebook_size > 0
