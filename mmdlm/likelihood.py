"""Monte-Carlo ELBO lower bound of log p(answer | prompt) under a masked-diffusion model (LLaDA's
``get_log_likelihood``), used to score candidate answers."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .masking import _rand


def stratified_mask_counts(k: int, total: int, batch: int) -> torch.Tensor:
    """LLaDA's stratified mask counts for one Monte-Carlo batch: round(linspace(k, k + (b-1)·T/b, b)) wrapped into
    1..T (``((x - 1) mod T) + 1``), so the b rows cover the noise levels evenly."""
    x = torch.round(torch.linspace(float(k), k + (batch - 1) * (total / batch), steps=batch, dtype=torch.float64))
    return (x.long() - 1) % total + 1


@torch.no_grad()
def elbo_log_likelihood(
    model: torch.nn.Module,
    prompt_ids: Any,
    answer_ids: Any,
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    mask_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    image_features: Optional[torch.Tensor] = None,
) -> float:
    """Monte-Carlo ELBO lower bound of log p(answer | prompt), LLaDA's ``get_log_likelihood``.

    Each of the ``mc_num / batch_size`` batches draws k ~ U{1..T} (T = answer length), gives its rows the
    :func:`stratified_mask_counts`, masks exactly that many random answer tokens per row (the prompt stays
    clean), and scores Σ_masked CE / (count/T) ÷ batch. Returns −(mean over batches). ``cfg_scale`` > 0 mixes in
    a copy whose prompt is all masks: l_u + (w+1)(l_c − l_u). ``image_features`` fills the prompt's image slots.
    """
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise ValueError(
            f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size}); e.g. mc_num=128, batch_size=16."
        )
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}.")
    from .diffusion import _unwrap  # here, not at the top: mmdlm.diffusion re-exports this module

    config = _unwrap(model).config
    mask_id = config.mask_token_id if mask_id is None else mask_id
    if mask_id is None:
        raise ValueError("no mask id: pass mask_id or set model.config.mask_token_id.")
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    answer = torch.as_tensor(answer_ids, dtype=torch.long, device=device).flatten()
    P, T = prompt.numel(), answer.numel()
    if T == 0:
        raise ValueError("answer_ids is empty; there is nothing to score.")
    if bool((prompt == mask_id).any()) or bool((answer == mask_id).any()):
        raise ValueError(f"prompt/answer contain the mask id {mask_id}; score clean text only.")
    b = batch_size
    seq = torch.cat([prompt, answer])[None].expand(b, -1)
    keep = torch.arange(P, P + T, device=device)[None].expand(b, -1)
    targets = answer[None].expand(b, -1)
    features = None if image_features is None else image_features.repeat(b, 1)
    scores = []
    for _ in range(mc_num // b):
        k = int(torch.randint(1, T + 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
        counts = stratified_mask_counts(k, T, b).to(device)
        rank = _rand((b, T), generator, device).argsort(1).argsort(1)
        is_mask = rank < counts[:, None]
        noisy = seq.clone()
        noisy[:, P:] = torch.where(is_mask, mask_id, targets)
        if cfg_scale > 0:
            uncond = noisy.clone()
            uncond[:, :P] = mask_id
            both = model(input_ids=torch.cat([noisy, uncond]), image_features=features, logits_to_keep=keep.repeat(2, 1)).logits
            cond, un = both.chunk(2)
            logits = un + (cfg_scale + 1.0) * (cond - un)
        else:
            logits = model(input_ids=noisy, image_features=features, logits_to_keep=keep).logits
        ce = F.cross_entropy(logits[is_mask].float(), targets[is_mask], reduction="none")
        p = (counts.double() / T)[:, None].expand(b, T)[is_mask]
        scores.append(float((ce.double() / p).sum() / b))
    return -sum(scores) / len(scores)
