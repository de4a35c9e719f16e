"""Token-id prompts for the tasks that skip the chat template: text-to-image (MMaDA's `<|t2i|> BOS text EOS`),
plain text (`BOS text`), and understanding from image codes (`<|mmu|> <|soi|> codes <|eoi|>` + chat)."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _text_ids(processor: Any, texts: str | Sequence[str]) -> list[list[int]]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("pass a string or a non-empty list of strings.")
    return [processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def build_t2i_prompt(processor: Any, texts: str | Sequence[str]) -> list[list[int]]:
    """Text-to-image prompts ``<|t2i|> BOS text EOS`` (MMaDA; the empty text gives the unconditional prompt);
    the sampler appends ``<|soi|> MASK*N <|eoi|>``."""
    t = processor.token_ids
    return [[t["t2i_token_id"], t["bos_token_id"], *ids, t["eos_token_id"]] for ids in _text_ids(processor, texts)]


def build_text_prompt(processor: Any, texts: str | Sequence[str], add_eos: bool = False) -> list[list[int]]:
    """Plain-text prompts ``BOS text`` (no chat template, as for a base model); ``add_eos`` closes them."""
    t = processor.token_ids
    tail = [t["eos_token_id"]] if add_eos else []
    return [[t["bos_token_id"], *ids, *tail] for ids in _text_ids(processor, texts)]


def build_mmu_codes_prompt(processor: Any, codes: Any, question: str | Sequence[str]) -> list[list[int]]:
    """Understanding from image codes (MMaDA): ``<|mmu|> <|soi|> codes+offset <|eoi|>`` followed by the
    chat-templated question with the assistant header. ``codes`` is [N] or [B, N]."""
    if processor.image_token_offset is None:
        raise ValueError(
            "image_token_offset is unknown; build the processor with MMDLMProcessor.from_config(config, tokenizer) "
            "for a model that has image codes."
        )
    codes_t = torch.as_tensor(codes)
    if codes_t.dim() == 1:
        codes_t = codes_t[None]
    if codes_t.dim() != 2 or codes_t.is_floating_point():
        raise ValueError(f"codes must be integer ids of shape [N] or [B, N], got {tuple(codes_t.shape)}.")
    too_big = processor.codebook_size and codes_t.numel() and int(codes_t.max()) >= processor.codebook_size
    if codes_t.numel() and (int(codes_t.min()) < 0 or too_big):
        raise ValueError(
            f"image codes must lie in [0, {processor.codebook_size or 'codebook_size'}), got "
            f"[{int(codes_t.min())}, {int(codes_t.max())}]; pass raw codes, not token ids."
        )
    questions = [question] * codes_t.shape[0] if isinstance(question, str) else list(question)
    if len(questions) != codes_t.shape[0]:
        raise ValueError(f"{codes_t.shape[0]} code rows but {len(questions)} questions; give one question per row.")
    t = processor.token_ids
    out = []
    for row, q in zip(codes_t.tolist(), questions):
        chat = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        chat_ids = processor.tokenizer(chat, add_special_tokens=False)["input_ids"]
        image_ids = [c + processor.image_token_offset for c in row]
        out.append([t["mmu_token_id"], t["soi_token_id"], *image_ids, t["eoi_token_id"], *chat_ids])
    return out
