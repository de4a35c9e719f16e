"""Text-to-image sampling with MaskGIT (MMaDA's ``t2i_generate``): sample every masked image slot, keep the most
confident, re-mask the rest on a cosine schedule; classifier-free guidance against the empty caption."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .llada import Generator, rand_rows


def t2i_prompt_ids(config: Any, text_ids: Sequence[int]) -> list[int]:
    """The condition of a t2i row, ``<|t2i|> BOS text EOS`` (empty ``text_ids`` = the unconditional prompt)."""
    ids = {"t2i_token_id": config.t2i_token_id, "bos_token_id": getattr(config, "bos_token_id", None),
           "eos_token_id": getattr(config, "eos_token_id", None)}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"model.config lacks {missing}; t2i prompts need the <|t2i|>, BOS and EOS ids.")
    return [ids["t2i_token_id"], ids["bos_token_id"], *[int(t) for t in text_ids], ids["eos_token_id"]]


def cosine_schedule(k: int, T: int, N: int) -> int:
    """How many of N image slots are still masked after step k (0-based) of T: floor(N·cos(π/2·(k+1)/T)),
    clamped to [1, still-masked-before − 1] as MaskGIT does, and 0 after the last step."""
    if not 0 <= k < T:
        raise ValueError(f"step k must be in [0, {T}), got {k}.")
    unknown = N
    for j in range(k + 1):
        if j == T - 1:
            return 0
        raw = math.floor(N * math.cos(math.pi / 2 * (j + 1) / T))
        unknown = max(1, min(unknown - 1, raw))
    return unknown


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as a left-padded [B, L] id tensor and its attention mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    am = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        am[i, length - len(r):] = 1
    return ids.to(device), am.to(device)


def check_drawing_inputs(config: Any, prompt_ids: Sequence, num_image_tokens: int, guidance_scale: float,
                         temperature: float) -> None:
    """The checks every image decoder shares; raises ``ValueError`` saying what to change."""
    if not getattr(config, "can_draw_images", False):
        raise ValueError("this model has no image tokenizer / codebook (config.can_draw_images is False); it cannot draw.")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (0 disables guidance), got {guidance_scale}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}.")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; pass one tokenized prompt per image (t2i_prompt_ids(config, text)).")


@torch.no_grad()
def generate_image_tokens(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    num_image_tokens: int,
    steps: int = 16,
    guidance_scale: float = 3.5,
    temperature: float = 1.0,
    generator: Generator = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    uncond_prompt_ids: Optional[Sequence[int]] = None,
    init_codes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Draw ``num_image_tokens`` image codes per prompt; returns [B, N] codes in [0, codebook_size).

    Each row is ``prompt <|soi|> MASK×N <|eoi|>`` (``prompt`` = :func:`t2i_prompt_ids`), left-padded; with
    ``guidance_scale`` w > 0 every row also runs unconditionally (``<|t2i|> BOS EOS`` + the same image canvas) and
    the logits are (1+w)·cond − w·uncond. Step k samples every masked slot from softmax(logits/temperature) over
    the image codes only, scores it log p + τ_k·Gumbel (τ_k = temperature·(1 − (k+1)/T)), and re-masks the
    :func:`cosine_schedule` lowest-scoring of the slots that were masked (known slots stay). Temperature 0 is
    argmax. ``callback(k, codes)`` gets [B, N] codes with −1 where still masked. A list of generators (one per
    row) makes each row's result independent of the batch. ``init_codes`` ([B, N], −1 where to draw) inpaints:
    the known codes stay and each row's schedule runs over its own unknown slots only.
    """
    config = model.config
    if getattr(config, "is_causal", False):
        raise ValueError("MaskGIT decoding needs a bidirectional denoiser, and this model is causal (config.is_causal: "
                         "an AR twin); draw with mmdlm.sampling.autoregressive.generate_image_tokens_autoregressive "
                         "(the pipeline's generate_image picks it for causal models).")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    check_drawing_inputs(config, prompt_ids, num_image_tokens, guidance_scale, temperature)
    mask_id, N = config.mask_token_id, num_image_tokens
    if mask_id is None or config.soi_token_id is None or config.eoi_token_id is None:
        raise ValueError("model.config needs mask_token_id, soi_token_id and eoi_token_id to draw.")
    offset, codebook = config.image_token_offset, config.codebook_size
    prompts = [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in prompt_ids]
    uncond = list(uncond_prompt_ids) if uncond_prompt_ids is not None else t2i_prompt_ids(config, [])
    canvas = [config.soi_token_id] + [mask_id] * N + [config.eoi_token_id]
    max_pos = config.max_position_embeddings
    for i, p in enumerate(prompts + ([uncond] if guidance_scale > 0 else [])):
        if mask_id in p:
            raise ValueError(f"prompt {i} contains the mask token {mask_id}; remove it.")
        if len(p) + len(canvas) > max_pos:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with {len(canvas)} image tokens that exceeds "
                f"max_position_embeddings ({max_pos}). Shorten the prompt or draw fewer tokens."
            )

    device = next(model.parameters()).device
    B = len(prompts)
    rows = [p + canvas for p in prompts] + ([uncond + canvas] * B if guidance_scale > 0 else [])
    pad_id = config.eos_token_id if getattr(config, "eos_token_id", None) is not None else 0
    ids, am = left_pad(rows, pad_id, device)
    position_ids = (am.cumsum(-1) - 1).clamp(min=0)
    L = ids.shape[1]
    slots = torch.arange(L - N - 1, L - 1, device=device)  # image slots sit just before <|eoi|> in every row
    keep = slots[None].expand(ids.shape[0], -1)
    codes = torch.full((B, N), -1, dtype=torch.long, device=device)
    if init_codes is not None:
        if tuple(init_codes.shape) != (B, N):
            raise ValueError(f"init_codes must be [prompts, num_image_tokens] = [{B}, {N}], got "
                             f"{list(init_codes.shape)}; use -1 for the slots to draw.")
        if bool(((init_codes < -1) | (init_codes >= codebook)).any()):
            raise ValueError(f"init_codes must hold image codes in [0, {codebook}) or -1 (to draw).")
        codes = init_codes.to(device=device, dtype=torch.long).clone()
        tokens = torch.where(codes >= 0, codes + offset, mask_id)
        ids[:, L - N - 1 : L - 1] = tokens.repeat(2, 1) if guidance_scale > 0 else tokens
    to_draw = (codes < 0).sum(1).tolist()

    for k in range(steps):
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids, logits_to_keep=keep).logits
        if guidance_scale > 0:
            cond, un = logits.chunk(2)
            logits = (1 + guidance_scale) * cond - guidance_scale * un
        logits = logits[..., offset : offset + codebook].double()  # image slots only ever receive image codes
        unknown = codes < 0
        if temperature > 0:
            log_probs = F.log_softmax(logits / temperature, dim=-1)
            gumbel = -torch.log(-torch.log(rand_rows(tuple(log_probs.shape), generator, device, torch.float64)))
            sampled = (log_probs + gumbel).argmax(-1)  # Gumbel-max = a multinomial draw, reproducible per row
        else:
            log_probs = F.log_softmax(logits, dim=-1)
            sampled = log_probs.argmax(-1)
        sampled = torch.where(unknown, sampled, codes)
        confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1)
        tau = temperature * (1.0 - (k + 1) / steps)
        if tau > 0:
            confidence = confidence + tau * -torch.log(-torch.log(rand_rows((B, N), generator, device, torch.float64)))
        confidence = confidence.masked_fill(~unknown, float("inf"))  # known slots are never re-masked
        n_mask = torch.tensor([cosine_schedule(k, steps, m) if m else 0 for m in to_draw], device=device)
        rank = confidence.argsort(dim=1, stable=True).argsort(dim=1)
        codes = torch.where(rank < n_mask[:, None], -1, sampled)
        tokens = torch.where(codes >= 0, codes + offset, mask_id)
        ids[:B, L - N - 1 : L - 1] = tokens
        if guidance_scale > 0:
            ids[B:, L - N - 1 : L - 1] = tokens
        if callback is not None:
            callback(k, codes.clone())
    return codes
