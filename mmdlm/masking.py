"""The masked-diffusion forward process: noise schedules (LLaDA's log-linear, MaskGIT's cosine) and the random
masking of text answers (LLaDA, LaViDa's complementary pairs) and image-code slots (MaskGIT / MMaDA)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

EPS = 1e-3  # LLaDA/SMDM: p_mask = (1 - eps) t + eps, so no sample is ever completely clean


def _rand(shape: tuple[int, ...], generator: Optional[torch.Generator], device: Any) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (a CPU generator then works for CUDA tensors too)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def sample_t(
    batch: int, *, antithetic: bool = False, generator: Optional[torch.Generator] = None, device: Any = None
) -> torch.Tensor:
    """Diffusion times t ~ U[0, 1), shape [batch]. ``antithetic`` spreads them as (u/B + i/B) mod 1 (MDLM), which
    lowers the variance of the batch loss."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    u = _rand((batch,), generator, device)
    if antithetic:
        u = (u / batch + torch.arange(batch, device=u.device, dtype=u.dtype) / batch) % 1.0
    return u


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token masking probability of the log-linear schedule: (1 - eps) t + eps."""
    return (1.0 - eps) * t + eps


def _p_mask(p_mask: Any, batch: int, device: Any) -> torch.Tensor:
    p = torch.as_tensor(p_mask, dtype=torch.float32, device=device)
    p = p.expand(batch) if p.dim() == 0 else p
    if p.shape != (batch,):
        raise ValueError(f"p_mask must be a scalar or a [batch] = [{batch}] tensor, got {tuple(p.shape)}.")
    if bool((p <= 0).any()) or bool((p > 1).any()):
        raise ValueError("p_mask must lie in (0, 1]; 1/p_mask weights the loss.")
    return p


def forward_process(
    input_ids: torch.Tensor,
    mask_id: int,
    *,
    maskable: Optional[torch.Tensor] = None,
    p_mask: Any = None,
    eps: float = EPS,
    antithetic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each maskable token independently with probability p_mask (one p per row).

    ``maskable`` [B, L] (default: every position) marks the diffusion targets (the answer in SFT: the prompt is
    never masked). ``p_mask`` (scalar or [B]) defaults to ``mask_probability(sample_t(B))``.
    Returns ``(noisy_ids, masked [B, L] bool, p_mask [B])``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}.")
    B, L = input_ids.shape
    device = input_ids.device
    if p_mask is None:
        p = mask_probability(sample_t(B, antithetic=antithetic, generator=generator, device=device), eps)
    else:
        p = _p_mask(p_mask, B, device)
    masked = _rand((B, L), generator, device) < p[:, None]
    if maskable is not None:
        if maskable.shape != input_ids.shape:
            raise ValueError(f"maskable must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(maskable.shape)}.")
        masked &= maskable.to(device=device, dtype=torch.bool)
    return input_ids.masked_fill(masked, mask_id), masked, p


def complementary_forward_process(
    input_ids: torch.Tensor,
    mask_id: int,
    *,
    maskable: Optional[torch.Tensor] = None,
    p_mask: Any = None,
    eps: float = EPS,
    antithetic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LaViDa's complementary masking: every maskable token is masked in exactly one of two copies.

    Returns ``(noisy_ids [2B, L], masked [2B, L], p_mask [2B])``: rows ``B..2B-1`` mask the complement (within
    ``maskable``) of rows ``0..B-1``; their p_mask is 1 - p (floored at ``eps``). Use ``input_ids.repeat(2, 1)`` as
    targets (and repeat the image features) so one forward trains on every answer token.
    """
    noisy, masked, p = forward_process(
        input_ids, mask_id, maskable=maskable, p_mask=p_mask, eps=eps, antithetic=antithetic, generator=generator
    )
    allowed = torch.ones_like(masked) if maskable is None else maskable.to(device=masked.device, dtype=torch.bool)
    masked_c = allowed & ~masked
    noisy_c = input_ids.masked_fill(masked_c, mask_id)
    return torch.cat([noisy, noisy_c]), torch.cat([masked, masked_c]), torch.cat([p, (1.0 - p).clamp(min=eps)])


def cosine_mask_ratio(t: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: the fraction of image tokens masked at time t is cos(π t / 2)."""
    return torch.cos(math.pi * t / 2)


def mask_image_tokens(
    codes: torch.Tensor,
    mask_id: int,
    generator: Optional[torch.Generator] = None,
    *,
    maskable: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MaskGIT/MMaDA corruption: per row t ~ U[0,1), n = max(1, round(N·cos(πt/2))) random slots set to ``mask_id``.

    ``codes`` [B, N] are the image tokens (or a whole sequence with ``maskable`` marking its N_i image slots).
    Returns ``(noisy, masked [B, N] bool, mask_ratio [B])``.
    """
    B, N = codes.shape
    region = torch.ones_like(codes, dtype=torch.bool) if maskable is None else maskable.to(codes.device, torch.bool)
    t = sample_t(B, generator=generator, device=codes.device) if t is None else t.to(codes.device)
    ratio = cosine_mask_ratio(t)
    available = region.sum(1)
    n = (available * ratio).round().long().clamp(min=1)
    n = torch.minimum(n, available)
    scores = _rand((B, N), generator, codes.device).masked_fill(~region, 2.0)  # non-slots sort last
    rank = scores.argsort(1).argsort(1)
    masked = rank < n[:, None]
    return codes.masked_fill(masked, mask_id), masked, ratio
