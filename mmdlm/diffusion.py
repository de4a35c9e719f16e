"""Masked-diffusion noise schedules and training objectives (LLaDA / MDLM / MMaDA / LaViDa), kept apart from the
network: the forward (masking) process, the 1/p-weighted ELBO losses, MaskGIT's cosine image loss, the next-token
objective of the causal (AR twin) baseline, and the Monte-Carlo ELBO likelihood used for scoring answers."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

EPS = 1e-3  # LLaDA/SMDM: p_mask = (1 - eps) t + eps, so no sample is ever completely clean
TASK_TEXT, TASK_UNDERSTANDING, TASK_T2I = 0, 1, 2
TASK_NAMES = {TASK_TEXT: "text", TASK_UNDERSTANDING: "understanding", TASK_T2I: "t2i"}


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


def trailing_padding(targets: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, L] bool: the EOS padding of each row, i.e. its trailing run of EOS *except the first one* (which is the
    real end of the answer and stays a target)."""
    is_eos = targets == eos_token_id
    run = is_eos.flip(1).long().cumprod(1).flip(1).bool()  # from the start of the trailing EOS run to the end
    pad = torch.zeros_like(run)
    pad[:, 1:] = run[:, 1:] & run[:, :-1]
    return pad


def _padding(targets, pad_counts_as_answer, eos_token_id, attention_mask) -> Optional[torch.Tensor]:
    if pad_counts_as_answer:
        return None
    if eos_token_id is None and attention_mask is None:
        raise ValueError(
            "pad_counts_as_answer=False needs eos_token_id (trailing EOS after the first are padding) or an "
            "attention_mask (0 = padding) to find the padding."
        )
    pad = torch.zeros_like(targets, dtype=torch.bool)
    if eos_token_id is not None:
        pad |= trailing_padding(targets, eos_token_id)
    if attention_mask is not None:
        pad |= ~attention_mask.to(device=targets.device, dtype=torch.bool)
    return pad


def _reduce(
    ce: torch.Tensor,
    rows: torch.Tensor,
    p_mask: torch.Tensor,
    region: torch.Tensor,
    objective: str,
    weighting: str,
    pretrain_denominator: Optional[int],
) -> torch.Tensor:
    """Reduce per-masked-token CE (``rows`` = batch row of each) to the loss; ``region`` [B, L] = counted targets."""
    if weighting == "mean":
        return ce.sum() / max(ce.numel(), 1)
    weighted = ce / p_mask[rows]
    B = region.shape[0]
    if objective == "pretrain":
        denominator = pretrain_denominator if pretrain_denominator is not None else int(region.sum())
        return weighted.sum() / max(denominator, 1)
    answer_len = region.sum(1).clamp(min=1).to(ce.dtype)
    return (weighted / answer_len[rows]).sum() / max(B, 1)


def _check_options(objective: str, weighting: str) -> None:
    if objective not in ("sft", "pretrain"):
        raise ValueError(f"objective must be 'sft' or 'pretrain', got {objective!r}.")
    if weighting not in ("elbo", "mean"):
        raise ValueError(f"weighting must be 'elbo' (1/p, LLaDA) or 'mean' (LaViDa/Dimple), got {weighting!r}.")


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: Any,
    *,
    objective: str = "sft",
    weighting: str = "elbo",
    answer_mask: Optional[torch.Tensor] = None,
    pad_counts_as_answer: bool = True,
    eos_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy of the clean tokens at masked positions, weighted as in LLaDA.

    * ``objective="pretrain"``: Σ_masked CE / p ÷ (B·L).
    * ``objective="sft"``: (1/B) Σ_i Σ_masked CE / (p_i · answer_len_i), where ``answer_mask`` [B, L] marks the
      non-prompt tokens; masked prompt tokens are ignored. answer_len_i counts the answer *including its EOS
      padding* (LLaDA's choice: the pads are targets, which is how the model learns to end its answers).
    * ``pad_counts_as_answer=False``: the padding (trailing EOS after the first, found with ``eos_token_id``,
      and/or positions where ``attention_mask`` is 0) is dropped from both the CE sum and answer_len (for
      pretrain the denominator becomes the number of non-padding positions). The first EOS stays a target.
    * ``weighting="mean"``: plain mean CE over the counted masked tokens, no 1/p (LaViDa, Dimple).

    Rows with nothing masked add zero; a batch with nothing masked gives a zero loss (no NaN).
    """
    _check_options(objective, weighting)
    if logits.dim() != 3 or logits.shape[:2] != targets.shape or masked.shape != targets.shape:
        raise ValueError(
            f"expected logits [B, L, V] with targets and masked [B, L]; got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(masked.shape)}."
        )
    B, L = targets.shape
    p = _p_mask(p_mask, B, logits.device)
    region = torch.ones_like(targets, dtype=torch.bool)
    if objective == "sft":
        if answer_mask is None:
            raise ValueError("objective='sft' needs answer_mask [B, L] (1 on the answer and its EOS padding).")
        region &= answer_mask.to(device=targets.device, dtype=torch.bool)
    pad = _padding(targets, pad_counts_as_answer, eos_token_id, attention_mask)
    if pad is not None:
        region &= ~pad
    in_loss = masked.to(torch.bool) & region
    rows = in_loss.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[in_loss].float(), targets[in_loss], reduction="none")
    return _reduce(ce, rows, p, region, objective, weighting, B * L if pad is None else None)


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


def image_token_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Unweighted mean CE over the masked image tokens (MMaDA t2i: full-vocabulary softmax, no 1/t)."""
    m = masked.to(torch.bool)
    ce = F.cross_entropy(logits[m].float(), targets[m], reduction="none")
    return ce.sum() / max(ce.numel(), 1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The mmdlm model inside a DDP/accelerate wrapper (for its config and image encoder)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def _caption_positions(input_ids, am, loss_mask, config) -> torch.Tensor:
    """[L] bool for one t2i row laid out as `<|t2i|> BOS text EOS <|soi|> codes <|eoi|>`: the text tokens."""
    real = am.nonzero(as_tuple=True)[0]
    slots = loss_mask.nonzero(as_tuple=True)[0]
    if len(real) == 0 or len(slots) == 0:
        raise ValueError("a t2i row (task id 2) needs real tokens and image-code slots marked in loss_mask.")
    start, first_code = int(real[0]), int(slots[0])
    expected = {start: config.t2i_token_id, first_code - 1: config.soi_token_id}
    for pos, token in expected.items():
        if token is not None and (pos < 0 or int(input_ids[pos]) != token):
            raise ValueError(
                "t2i rows must read `<|t2i|> BOS text EOS <|soi|> codes <|eoi|>` (padding outside); cannot find "
                f"token {token} at position {pos}. Build them with the t2i collator."
            )
    caption = torch.zeros_like(am)
    caption[start + 2 : first_code - 2] = True  # keep <|t2i|> BOS ... EOS <|soi|>: the unconditional prompt
    return caption & am


def _logit_positions(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K] positions of each row's masked tokens first (K = most masked in a row), and which are real."""
    counts = masked.sum(1)
    K = max(int(counts.max()), 1)
    order = (~masked).to(torch.int8).argsort(dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=masked.device)[None] < counts[:, None]
    return order, valid


OBJECTIVES = ("diffusion", "ar")


def validate_loss_options(
    objective: str = "diffusion",
    *,
    weighting: Optional[str] = None,
    cfg_dropout: float = 0.0,
    eps: float = EPS,
    antithetic: bool = False,
) -> None:
    """Check a combination of :func:`compute_batch_loss` options; raises ``ValueError`` saying what to change.

    The masking options (``weighting``, ``cfg_dropout``, ``eps``, ``antithetic``) belong to the masked-diffusion
    objective; the next-token objective (``"ar"``) masks nothing, so setting any of them with it is an error.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"objective must be 'diffusion' (masked diffusion, the denoiser) or 'ar' (next-token, for a causal "
            f"model), got {objective!r}."
        )
    if not 0.0 <= cfg_dropout <= 1.0:
        raise ValueError(f"cfg_dropout is a probability in [0, 1], got {cfg_dropout}.")
    if objective == "diffusion":
        _check_options("sft", "elbo" if weighting is None else weighting)
        return
    misplaced = {"weighting": weighting is not None, "cfg_dropout": cfg_dropout > 0, "eps": eps != EPS,
                 "antithetic": bool(antithetic)}
    for name, is_set in misplaced.items():
        if is_set:
            raise ValueError(
                f"{name} is a masked-diffusion option and does not apply to objective='ar' (next-token prediction "
                f"masks nothing); remove {name}, or train a bidirectional model with objective='diffusion'."
            )


def _task_weights(task_weights: Optional[dict[Any, float]]) -> dict[str, float]:
    weights = {name: 1.0 for name in TASK_NAMES.values()}
    for key, value in (task_weights or {}).items():
        name = TASK_NAMES.get(key, key)
        if name not in weights:
            raise ValueError(f"task_weights keys must be among {list(TASK_NAMES.values())} or 0/1/2, got {key!r}.")
        weights[name] = float(value)
    return weights


def _next_token_ce(
    model: torch.nn.Module, input_ids: torch.Tensor, am: torch.Tensor, targets: torch.Tensor, pixel_values: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-target CE of next-token prediction: the logits at position i score token i + 1, for every target i + 1
    whose predecessor i is a real token. Returns ``(ce, rows, logits)`` with ``rows`` the batch row of each CE."""
    predicts = torch.zeros_like(targets)
    predicts[:, :-1] = targets[:, 1:] & am[:, :-1]
    idx, valid = _logit_positions(predicts)
    position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    logits = model(
        input_ids=input_ids, attention_mask=am.long(), position_ids=position_ids, logits_to_keep=idx, **images
    ).logits
    labels = input_ids.gather(1, (idx + 1).clamp(max=input_ids.shape[1] - 1))
    rows = valid.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
    return ce, rows, logits


def compute_batch_loss(
    model: torch.nn.Module,
    batch: dict[str, Any],
    *,
    objective: str = "diffusion",
    task_weights: Optional[dict[Any, float]] = None,
    weighting: Optional[str] = None,
    pad_counts_as_answer: bool = True,
    cfg_dropout: float = 0.0,
    eps: float = EPS,
    antithetic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """One forward pass and the mixed loss of a collated batch of text, understanding and t2i rows.

    ``batch``: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, L] (1 on diffusion targets: answer + EOS padding
    for text/understanding rows, image-code slots for t2i rows), ``task_ids`` [B] (0 text, 1 understanding,
    2 t2i), optional ``pixel_values`` (the understanding rows' images, in row order) and ``p_mask`` [B].

    ``objective="diffusion"`` (the denoiser). Text and understanding rows: LLaDA SFT loss (1/p weighting,
    answer-length normalisation; ``weighting="mean"`` for LaViDa's plain mean, default ``"elbo"``). t2i rows:
    MaskGIT cosine masking and the unweighted mean CE.

    ``objective="ar"`` (the causal twin, ``config.is_causal=True``): nothing is masked; the logits at position i
    predict token i + 1, and each task's loss is the mean CE over its rows' targets (``loss_mask`` at i + 1; a
    target at position 0 has no predecessor and is skipped). ``p_mask`` is ignored; the masking options
    (``weighting``, ``cfg_dropout``, ``eps``, ``antithetic``) are errors with it (see :func:`validate_loss_options`).

    ``loss`` = Σ_task ``task_weights[task]`` · loss_task over the tasks present (weights keyed by name or id,
    default 1.0).

    ``cfg_dropout`` q: each row, with probability q, loses its condition so the unconditional branch of CFG is
    trained — text/understanding rows get every real prompt token (image slots included) replaced by the mask,
    as LLaDA's sampler does; t2i rows hide their caption, leaving `<|t2i|> BOS EOS <|soi|> ...` exactly as
    :mod:`mmdlm.sampling.maskgit` builds its unconditional row. With ``pad_counts_as_answer=False`` the EOS
    padding (trailing EOS after the first) is never a target and not counted in answer lengths.

    Returns ``{"loss": total, "text" / "understanding" / "t2i": per-task loss (present tasks only)}``.
    """
    validate_loss_options(objective, weighting=weighting, cfg_dropout=cfg_dropout, eps=eps, antithetic=antithetic)
    weighting = "elbo" if weighting is None else weighting
    for key in ("input_ids", "attention_mask", "loss_mask", "task_ids"):
        if key not in batch:
            raise ValueError(f"the batch has no {key!r}; collate input_ids, attention_mask, loss_mask and task_ids.")
    config = _unwrap(model).config
    if objective == "ar" and not getattr(config, "is_causal", False):
        raise ValueError(
            "objective='ar' needs a causal model (config.is_causal=True): a bidirectional model sees the very token "
            "it is asked to predict. Build the model with is_causal=True, or use objective='diffusion'."
        )
    if objective == "diffusion" and config.mask_token_id is None:
        raise ValueError("model.config.mask_token_id is None; set the id of <|mdm_mask|>.")
    input_ids = batch["input_ids"]
    device = input_ids.device
    am = batch["attention_mask"].to(device=device, dtype=torch.bool)
    loss_mask = batch["loss_mask"].to(device=device, dtype=torch.bool)
    task_ids = torch.as_tensor(batch["task_ids"], device=device).long()
    B, L = input_ids.shape
    if am.shape != (B, L) or loss_mask.shape != (B, L) or task_ids.shape != (B,):
        raise ValueError("attention_mask and loss_mask must be [B, L] like input_ids, task_ids [B].")
    if bool(((task_ids < 0) | (task_ids > 2)).any()):
        raise ValueError(f"task_ids must be 0 (text), 1 (understanding) or 2 (t2i), got {task_ids.tolist()}.")
    weights = _task_weights(task_weights)
    is_t2i = (task_ids == TASK_T2I)[:, None]
    targets = loss_mask & am
    if not pad_counts_as_answer:
        pad = _padding(input_ids, False, getattr(config, "eos_token_id", None), None) & ~is_t2i
        targets = targets & ~pad

    if objective == "ar":
        ce, rows, logits = _next_token_ce(model, input_ids, am, targets, batch.get("pixel_values"))
    else:
        ce, rows, logits, p = _masked_ce(model, batch, config, input_ids, am, loss_mask, targets, task_ids, is_t2i,
                                         cfg_dropout, eps, antithetic, generator)

    out: dict[str, torch.Tensor] = {}
    total = logits.sum() * 0.0  # keeps the graph (and DDP) happy even if every term is empty
    for task, name in TASK_NAMES.items():
        in_task = task_ids == task
        if not bool(in_task.any()):
            continue
        keep = in_task[rows]
        if task == TASK_T2I or objective == "ar":
            loss = ce[keep].sum() / max(int(keep.sum()), 1)
        else:
            # Row ids within the task so that the SFT mean is over this task's rows only.
            local = torch.cumsum(in_task.long(), 0) - 1
            loss = _reduce(ce[keep], local[rows[keep]], p[in_task], targets[in_task], "sft", weighting, None)
        out[name] = loss
        total = total + weights[name] * loss
    out["loss"] = total
    return out


def _masked_ce(model, batch, config, input_ids, am, loss_mask, targets, task_ids, is_t2i, cfg_dropout, eps,
               antithetic, generator):
    """Noise the batch (LLaDA masking for text/understanding rows, MaskGIT for t2i rows, CFG condition dropout),
    run the model and return ``(ce, rows, logits, p_mask)`` for the masked targets."""
    mask_id = config.mask_token_id
    B = input_ids.shape[0]
    device = input_ids.device
    noisy_t, masked_t, p = forward_process(
        input_ids, mask_id, maskable=targets & ~is_t2i, p_mask=batch.get("p_mask"), eps=eps,
        antithetic=antithetic, generator=generator,
    )
    noisy_i, masked_i, _ = mask_image_tokens(input_ids, mask_id, generator, maskable=targets & is_t2i)
    noisy = torch.where(is_t2i, noisy_i, noisy_t)
    masked = torch.where(is_t2i, masked_i, masked_t)
    model_am = am.clone()
    dropped = torch.zeros(B, dtype=torch.bool, device=device)
    if cfg_dropout > 0:
        dropped = _rand((B,), generator, device) < cfg_dropout
        for i in dropped.nonzero(as_tuple=True)[0].tolist():
            if bool(is_t2i[i]):
                model_am[i] &= ~_caption_positions(input_ids[i], am[i], loss_mask[i], config)
            else:
                noisy[i] = noisy[i].masked_fill(am[i] & ~loss_mask[i], mask_id)

    forward_images: dict[str, Any] = {}
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        image_id = config.image_token_id
        slots_per_row = (input_ids == image_id).sum(1) if image_id is not None else torch.zeros_like(task_ids)
        if bool((dropped & (slots_per_row > 0)).any()):
            # Dropped rows lost their image slots, so encode once here and keep the other rows' features.
            features = _unwrap(model).image_features(pixel_values)
            if features.shape[0] != int(slots_per_row.sum()):
                raise ValueError(
                    f"pixel_values give {features.shape[0]} features for {int(slots_per_row.sum())} image slots."
                )
            keep = torch.repeat_interleave(~dropped, slots_per_row)
            forward_images["image_features"] = features[keep]
        else:
            forward_images["pixel_values"] = pixel_values

    idx, valid = _logit_positions(masked)
    position_ids = (model_am.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=noisy, attention_mask=model_am.long(), position_ids=position_ids, logits_to_keep=idx, **forward_images
    ).logits
    rows = valid.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[valid].float(), input_ids.gather(1, idx)[valid], reduction="none")
    return ce, rows, logits, p


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
