"""`MMDLMProcessor`: one object that turns chats with images (or image codes) into model inputs and answers back
into text, following transformers' processor conventions (`apply_chat_template`, `__call__`, save/load)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import AutoTokenizer, BatchFeature

from . import prompts
from .conversations import normalize_conversation
from .tokenization import IMAGE_TOKEN, special_token_ids
from .vision.image_processing import MMDLMImageProcessor, load_image

PROCESSOR_CONFIG_NAME = "processor_config.json"


def _tower_geometry(vision_config: dict[str, Any], vision_tower: Any = None) -> dict[str, Any]:
    """The tower's ``num_patches``, ``image_size``, ``image_mean`` and ``image_std``, read from a built tower.

    Without one, the tower is built on the meta device (no memory, no weights; checkpoint_path ignored) so the
    answer always matches what :func:`mmdlm.vision.towers.create_vision_tower` builds; towers that cannot be
    built on meta are built on CPU.
    """
    if vision_tower is None:
        from .vision.towers import create_vision_tower

        cfg = {k: v for k, v in dict(vision_config).items() if k != "checkpoint_path"}
        try:
            with torch.device("meta"):
                vision_tower = create_vision_tower(cfg)
        except (NotImplementedError, RuntimeError):  # e.g. open_clip moves its model to a device
            vision_tower = create_vision_tower(cfg)
    return {
        "num_patches": int(vision_tower.num_patches),
        "image_size": int(vision_tower.image_size),
        "image_mean": tuple(vision_tower.image_mean),
        "image_std": tuple(vision_tower.image_std),
    }


class MMDLMProcessor:
    """Tokenizer + image processor + the bookkeeping that places image features in the prompt.

    ``num_image_tokens`` is the number of feature slots of a one-view image (the tower's ``num_patches``, +1 when
    ``use_image_newline``). An anyres image with ``v`` views takes ``v * num_patches (+1)`` slots, matching
    :meth:`mmdlm.MMDLMModel.image_features`, which appends one newline per image. ``max_length`` is the model's
    context (``config.max_position_embeddings``); ``image_token_offset``/``codebook_size`` place image codes.
    """

    attributes = ["image_processor", "tokenizer"]
    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Optional[MMDLMImageProcessor] = None,
        num_image_tokens: int = 0,
        use_image_newline: bool = False,
        image_token_offset: Optional[int] = None,
        codebook_size: int = 0,
        max_length: int = 4096,
    ) -> None:
        if num_image_tokens < int(use_image_newline):
            raise ValueError(f"num_image_tokens={num_image_tokens} is too small (use_image_newline adds one slot).")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}.")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = int(num_image_tokens)
        self.use_image_newline = bool(use_image_newline)
        self.image_token_offset = image_token_offset
        self.codebook_size = int(codebook_size)
        self.max_length = int(max_length)
        self.token_ids = special_token_ids(tokenizer)
        self.image_token_id = self.token_ids["image_token_id"]
        self.image_token = IMAGE_TOKEN

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        model_config: Any,
        tokenizer: Any,
        image_processor: Optional[MMDLMImageProcessor] = None,
        vision_tower: Any = None,
    ) -> "MMDLMProcessor":
        """Build the processor that matches an :class:`~mmdlm.MMDLMConfig`: feature slots per image from the
        tower (pass the model's built ``vision_tower`` to skip building one on the meta device), an image
        processor at the tower's resolution and normalisation (unless given), the context length and code range."""
        ids = special_token_ids(tokenizer)
        num_image_tokens, use_newline = 0, False
        vision = model_config.vision_config
        if vision is not None:
            if model_config.image_token_id != ids["image_token_id"]:
                raise ValueError(
                    f"config.image_token_id={model_config.image_token_id} but the tokenizer's {IMAGE_TOKEN} is "
                    f"{ids['image_token_id']}; build the config with mmdlm.tokenization.config_token_fields(tokenizer)."
                )
            geometry = _tower_geometry(vision, vision_tower)
            use_newline = bool(model_config.use_image_newline)
            num_image_tokens = geometry["num_patches"] + int(use_newline)
            if image_processor is None:
                image_processor = MMDLMImageProcessor(
                    image_size=geometry["image_size"],
                    image_mean=geometry["image_mean"],
                    image_std=geometry["image_std"],
                    aspect_ratio=model_config.image_aspect_ratio,
                    image_grid_pinpoints=model_config.image_grid_pinpoints,
                )
            elif image_processor.image_size != geometry["image_size"]:
                raise ValueError(
                    f"the image processor makes {image_processor.image_size}px views but the tower takes "
                    f"{geometry['image_size']}px; use MMDLMImageProcessor(image_size={geometry['image_size']})."
                )
        return cls(
            tokenizer,
            image_processor,
            num_image_tokens=num_image_tokens,
            use_image_newline=use_newline,
            image_token_offset=model_config.image_token_offset,
            codebook_size=model_config.codebook_size,
            max_length=model_config.max_position_embeddings,
        )

    def to_dict(self) -> dict[str, Any]:
        """The processor's own settings (what ``processor_config.json`` holds)."""
        return {
            "processor_class": type(self).__name__,
            "num_image_tokens": self.num_image_tokens,
            "use_image_newline": self.use_image_newline,
            "image_token_offset": self.image_token_offset,
            "codebook_size": self.codebook_size,
            "max_length": self.max_length,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write tokenizer files, ``preprocessor_config.json`` (if there is an image processor) and
        ``processor_config.json`` into ``save_directory``; returns the written processor files."""
        os.makedirs(save_directory, exist_ok=True)
        written = list(self.tokenizer.save_pretrained(save_directory))
        if self.image_processor is not None:
            written.append(self.image_processor.save_pretrained(save_directory))
        path = os.path.join(save_directory, PROCESSOR_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        written.append(path)
        return written

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MMDLMProcessor":
        """Load what :meth:`save_pretrained` wrote (local folders only; nothing is downloaded)."""
        d = Path(directory)
        if not (d / PROCESSOR_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"no {PROCESSOR_CONFIG_NAME} in {str(d)!r}; it is written by MMDLMProcessor.save_pretrained(dir)."
            )
        settings = json.loads((d / PROCESSOR_CONFIG_NAME).read_text(encoding="utf-8"))
        settings.pop("processor_class", None)
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        image_processor = None
        if (d / "preprocessor_config.json").is_file():
            image_processor = MMDLMImageProcessor.from_pretrained(d)
        return cls(tokenizer, image_processor, **settings)

    # ------------------------------------------------------------------------------------------------ images

    def image_slots(self, image_size_wh: tuple[int, int]) -> int:
        """Feature slots the model fills for one image of this (w, h)."""
        if self.image_processor is None or self.num_image_tokens <= 0:
            raise ValueError(
                "this processor has no image processor / num_image_tokens, so it cannot place images; build it with "
                "MMDLMProcessor.from_config(model_config, tokenizer) for a model with a vision tower."
            )
        views = self.image_processor.num_views(image_size_wh)
        patches = self.num_image_tokens - int(self.use_image_newline)
        return views * patches + int(self.use_image_newline)

    def _encode_rows(
        self,
        texts: list[str],
        images: list[list[Any]],
        return_tensors: Optional[str],
        padding_side: str,
    ) -> BatchFeature:
        """Tokenize rendered texts, expand each <image> into its slots, pad, and process the images."""
        with_images = [i for i, row in enumerate(images) if row]
        without = [i for i, row in enumerate(images) if not row]
        if with_images and without:
            raise ValueError(
                f"batch rows {without} have no image while rows {with_images} do; mixing them is not supported. "
                "Split the batch: call the processor once for the conversations with images and once for those without."
            )
        pil_rows = [[load_image(im) for im in row] for row in images]
        rows: list[list[int]] = []
        for r, (text, pil) in enumerate(zip(texts, pil_rows)):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            n_placeholders = sum(1 for t in ids if t == self.image_token_id)
            if n_placeholders != len(pil):
                raise ValueError(
                    f"row {r} has {n_placeholders} {IMAGE_TOKEN} placeholder(s) but {len(pil)} image(s); give exactly "
                    f"one image per placeholder (don't write {IMAGE_TOKEN} in text blocks when using image blocks)."
                )
            expanded: list[int] = []
            images_iter = iter(pil)
            for t in ids:
                if t == self.image_token_id:
                    expanded.extend([t] * self.image_slots(next(images_iter).size))
                else:
                    expanded.append(t)
            if len(expanded) > self.max_length:
                n_slots = len(expanded) - len(ids) + n_placeholders
                raise ValueError(
                    f"row {r} is {len(expanded)} tokens long ({n_slots} of them image slots), more than the model's "
                    f"context of max_length={self.max_length} tokens (config.max_position_embeddings), and the answer "
                    "needs room too; shorten the text or use fewer/smaller images."
                )
            rows.append(expanded)
        out = self.pad(rows, padding_side=padding_side, return_tensors=return_tensors)
        flat = [im for row in pil_rows for im in row]
        if flat:
            processed = self.image_processor(flat)
            out["pixel_values"], out["image_sizes"] = processed["pixel_values"], processed["image_sizes"]
        else:
            out["pixel_values"], out["image_sizes"] = None, None
        return BatchFeature(out)

    def pad(
        self, sequences: Sequence[Sequence[int]], padding_side: str = "left", return_tensors: Optional[str] = "pt"
    ) -> dict[str, Any]:
        """Pad id lists to one length with the pad token (EOS): ``{"input_ids", "attention_mask"}``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}.")
        if not sequences:
            raise ValueError("nothing to pad: the batch is empty.")
        width = max(len(s) for s in sequences)
        pad_id = self.token_ids["pad_token_id"]
        ids, mask = [], []
        for s in sequences:
            fill = width - len(s)
            if padding_side == "left":
                ids.append([pad_id] * fill + list(s))
                mask.append([0] * fill + [1] * len(s))
            else:
                ids.append(list(s) + [pad_id] * fill)
                mask.append([1] * len(s) + [0] * fill)
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
            }
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        conversation: Any,
        images: Optional[Sequence[Any]] = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: Optional[str] = "pt",
        padding_side: str = "left",
    ) -> Any:
        """Render one conversation (a list of messages) or a batch (a list of conversations) and encode it.

        Content is a string (``<image>`` placeholders allowed, filled from ``images``) or transformers-5 blocks
        ``{"type": "image", "image"|"path"|"url": ...}`` / ``{"type": "text", "text": ...}``. ``images`` is a flat
        list for one conversation, a list of lists for a batch. Returns a ``BatchFeature`` with ``input_ids`` and
        ``attention_mask`` [B, L] (left-padded), ``pixel_values`` (all images, row-major; ``None`` without images)
        and ``image_sizes``; ``tokenize=False`` returns the rendered string(s).
        """
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("apply_chat_template needs a non-empty list of messages (or a list of conversations).")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        if images is None:
            per_row: list[list[Any]] = [[] for _ in conversations]
        elif batched:
            if len(images) != len(conversations) or not all(isinstance(r, (list, tuple)) for r in images):
                raise ValueError("for a batch, pass images as one list per conversation (use [] for none).")
            per_row = [list(r) for r in images]
        else:
            per_row = [list(images)]
        normalized = [normalize_conversation(c, extra, r) for r, (c, extra) in enumerate(zip(conversations, per_row))]
        texts = [
            self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
            for msgs, _ in normalized
        ]
        if not tokenize:
            return texts if batched else texts[0]
        out = self._encode_rows(texts, [imgs for _, imgs in normalized], return_tensors, padding_side)
        return out if return_dict else out["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str],
        images: Optional[Sequence[Any]] = None,
        return_tensors: Optional[str] = "pt",
        padding_side: str = "left",
    ) -> BatchFeature:
        """LLaVA-style call: ``text`` already holds one ``<image>`` per image (e.g. a rendered chat); ``images``
        is a flat list consumed in order across the texts, or one list per text."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings.")
        images = [] if images is None else list(images)
        if images and all(isinstance(r, (list, tuple)) for r in images):
            if len(images) != len(texts):
                raise ValueError(f"got {len(images)} image lists for {len(texts)} texts; give one list per text.")
            per_row = [list(r) for r in images]
        else:
            per_row, start = [], 0
            for t in texts:
                n = self.tokenizer(t, add_special_tokens=False)["input_ids"].count(self.image_token_id)
                per_row.append(images[start : start + n])
                start += n
            if start != len(images):
                raise ValueError(
                    f"the texts hold {start} {IMAGE_TOKEN} placeholder(s) but {len(images)} images were given; "
                    "write one placeholder per image."
                )
        return self._encode_rows(texts, per_row, return_tensors, padding_side)

    # ------------------------------------------------------------------------------------------------ task prompts

    def build_t2i_prompt(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Text-to-image prompts ``<|t2i|> BOS text EOS`` (MMaDA; the empty text gives the unconditional prompt);
        the sampler appends ``<|soi|> MASK*N <|eoi|>``."""
        return prompts.build_t2i_prompt(self, texts)

    def build_text_prompt(self, texts: str | Sequence[str], add_eos: bool = False) -> list[list[int]]:
        """Plain-text prompts ``BOS text`` (no chat template, as for a base model); ``add_eos`` closes them."""
        return prompts.build_text_prompt(self, texts, add_eos=add_eos)

    def build_mmu_codes_prompt(self, codes: Any, question: str | Sequence[str]) -> list[list[int]]:
        """Understanding from image codes (MMaDA): ``<|mmu|> <|soi|> codes+offset <|eoi|>`` followed by the
        chat-templated question with the assistant header. ``codes`` is [N] or [B, N]."""
        return prompts.build_mmu_codes_prompt(self, codes, question)

    # ------------------------------------------------------------------------------------------------ decoding

    def _answer_text(self, ids: Sequence[int]) -> str:
        stops = {self.token_ids["eot_token_id"], self.token_ids["eos_token_id"]}
        kept = []
        for t in ids:
            if t in stops:
                break
            if 0 <= t < len(self.tokenizer):  # image codes and padding rows of the embedding table are not text
                kept.append(t)
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    def batch_decode_answers(self, sequences: Any, prompt_lengths: int | Sequence[int]) -> list[str]:
        """Answers of a batch: drop each row's prompt, cut at the first ``<|eot_id|>``/``<|endoftext|>``,
        drop special tokens and strip whitespace."""
        rows = torch.as_tensor(sequences)
        if rows.dim() != 2:
            raise ValueError(f"sequences must be [B, L], got shape {tuple(rows.shape)}.")
        lengths = [int(prompt_lengths)] * rows.shape[0] if isinstance(prompt_lengths, int) else list(prompt_lengths)
        if len(lengths) != rows.shape[0]:
            raise ValueError(f"{rows.shape[0]} sequences but {len(lengths)} prompt lengths.")
        return [self._answer_text(r[n:].tolist()) for r, n in zip(rows, lengths)]

    def decode(self, sequences: Any, prompt_length: int = 0) -> str | list[str]:
        """The answer text of one sequence ([L] -> str) or of each row ([B, L] -> list of str)."""
        rows = torch.as_tensor(sequences)
        if rows.dim() == 1:
            return self.batch_decode_answers(rows[None], prompt_length)[0]
        return self.batch_decode_answers(rows, prompt_length)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()}, image_processor={self.image_processor!r})"
