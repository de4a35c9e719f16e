"""Training objectives, kept apart from the network: LLaDA's 1/p-weighted masked-diffusion losses, MaskGIT's image
loss and the mixed-task batch loss, with a next-token variant for the causal AR twin (noise: :mod:`mmdlm.masking`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

# The forward process and the likelihood are also importable from here, where they lived before their own modules.
from .likelihood import elbo_log_likelihood, stratified_mask_counts  # noqa: F401
from .masking import (  # noqa: F401
    EPS,
    _p_mask,
    _rand,
    complementary_forward_process,
    cosine_mask_ratio,
    forward_process,
    mask_image_tokens,
    mask_probability,
    sample_t,
)

TASK_TEXT, TASK_UNDERSTANDING, TASK_T2I = 0, 1, 2
TASK_NAMES = {TASK_TEXT: "text", TASK_UNDERSTANDING: "understanding", TASK_T2I: "t2i"}


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
    padding_weight: str = "token",
    ar_fraction: float = 0.0,
) -> None:
    """Check a combination of :func:`compute_batch_loss` options; raises ``ValueError`` saying what to change.

    The masking options (``weighting``, ``cfg_dropout``, ``eps``, ``antithetic``, ``padding_weight``) belong to
    the masked-diffusion objective; the next-token objective (``"ar"``) masks nothing, so setting any of them with
    it is an error.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"objective must be 'diffusion' (masked diffusion, the denoiser) or 'ar' (next-token, for a causal "
            f"model), got {objective!r}."
        )
    if not 0.0 <= cfg_dropout <= 1.0:
        raise ValueError(f"cfg_dropout is a probability in [0, 1], got {cfg_dropout}.")
    if not 0.0 <= ar_fraction <= 1.0:
        raise ValueError(f"ar_fraction is a probability in [0, 1] (the share of text/understanding batches trained "
                         f"with next-token prediction), got {ar_fraction}.")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps is the least masking ratio, in (0, 1] (LLaDA: 1e-3), got {eps}.")
    if padding_weight not in ("token", "row"):
        raise ValueError(f"padding_weight must be 'token' (each EOS pad a full target, LLaDA) or 'row' (a row's "
                         f"padding weighs as one token), got {padding_weight!r}.")
    if objective == "diffusion":
        _check_options("sft", "elbo" if weighting is None else weighting)
        return
    misplaced = {"weighting": weighting is not None, "cfg_dropout": cfg_dropout > 0, "eps": eps != EPS,
                 "antithetic": bool(antithetic), "padding_weight": padding_weight != "token",
                 "ar_fraction": ar_fraction > 0}
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
    model: torch.nn.Module, input_ids: torch.Tensor, am: torch.Tensor, targets: torch.Tensor, pixel_values: Any,
    is_causal: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-target CE of next-token prediction: the logits at position i score token i + 1, for every target i + 1
    whose predecessor i is a real token (``is_causal=True`` makes a bidirectional model attend causally for it).
    Returns ``(ce, rows, logits)`` with ``rows`` the batch row of each CE."""
    predicts = torch.zeros_like(targets)
    predicts[:, :-1] = targets[:, 1:] & am[:, :-1]
    # A model with shifted logits already scores token i + 1 at position i + 1 (from its output at i).
    shift = int(bool(getattr(_unwrap(model).config, "shift_logits", False)))
    if shift:
        predicts = torch.roll(predicts, 1, dims=1)
    idx, valid = _logit_positions(predicts)
    position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    logits = model(
        input_ids=input_ids, attention_mask=am.long(), position_ids=position_ids, logits_to_keep=idx,
        is_causal=is_causal, **images
    ).logits
    labels = input_ids.gather(1, (idx + 1 - shift).clamp(max=input_ids.shape[1] - 1))
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
    padding_weight: str = "token",
    cfg_dropout: float = 0.0,
    eps: float = EPS,
    antithetic: bool = False,
    ar_fraction: float = 0.0,
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

    ``ar_fraction`` r (diffusion objective): a batch with no t2i rows is, with probability r (drawn from
    ``generator``), trained with next-token prediction under causal attention instead (the model attends causally
    for that forward only), so a denoiser adapted from a causal model keeps practising what it learned; its
    per-task losses are then reported as ``"<task>_ar"``. Batch by task (``group_by_task``) for it to apply.

    ``loss`` = Σ_task ``task_weights[task]`` · loss_task over the tasks present (weights keyed by name or id,
    default 1.0).

    ``cfg_dropout`` q: each row, with probability q, loses its condition so the unconditional branch of CFG is
    trained — text/understanding rows get every real prompt token (image slots included) replaced by the mask,
    as LLaDA's sampler does; t2i rows hide their caption, leaving `<|t2i|> BOS EOS <|soi|> ...` exactly as
    :mod:`mmdlm.sampling.maskgit` builds its unconditional row. With ``pad_counts_as_answer=False`` the EOS
    padding (trailing EOS after the first) is never a target and not counted in answer lengths.

    ``padding_weight`` (diffusion text/understanding rows, with the padding counted): ``"token"`` (LLaDA) makes
    each EOS pad a full target; ``"row"`` keeps every pad a target but weighs a row's padding together as ONE
    token, in the CE sum and in the answer length. With answers EOS-padded to a fixed canvas (say 32 tokens for a
    one-word answer) "token" leaves the informative tokens ~1/30 of the loss; "row" still teaches the model to fill the
    canvas with EOS.

    Returns ``{"loss": total, "text" / "understanding" / "t2i": per-task loss (present tasks only)}``, with
    ``"<task>_ar"`` keys instead for a batch that ``ar_fraction`` trained with next-token prediction.
    """
    validate_loss_options(objective, weighting=weighting, cfg_dropout=cfg_dropout, eps=eps, antithetic=antithetic,
                          padding_weight=padding_weight, ar_fraction=ar_fraction)
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

    # Drawn only when asked for, so ar_fraction=0 leaves the masking noise exactly as before.
    use_ar = objective == "ar" or (ar_fraction > 0 and not bool(is_t2i.any())
                                   and bool(_rand((1,), generator, device)[0] < ar_fraction))
    if use_ar:
        causal = None if objective == "ar" else True
        ce, rows, logits = _next_token_ce(model, input_ids, am, targets, batch.get("pixel_values"), is_causal=causal)
    else:
        ce, rows, logits, p, (idx, valid) = _masked_ce(model, batch, config, input_ids, am, loss_mask, targets,
                                                       task_ids, is_t2i, cfg_dropout, eps, antithetic, generator)
    region = targets
    if not use_ar and padding_weight == "row" and pad_counts_as_answer:
        # Each pad weighs 1/n_pad of its row, so the row's whole padding counts as one answer token.
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            raise ValueError("padding_weight='row' needs config.eos_token_id to find the EOS padding.")
        pos = torch.arange(L, device=device)
        last_word = torch.where(targets & (input_ids != eos), pos, -1).max(1, keepdim=True).values
        ends = targets & (input_ids == eos) & (pos > last_word)  # the answer's closing EOS and its padding
        first_end = torch.where(ends, pos, L).min(1, keepdim=True).values
        pad = ends & (pos > first_end) & ~is_t2i
        weight = torch.where(pad, 1.0 / pad.sum(1, keepdim=True).clamp(min=1), 1.0)
        region = weight * targets
        ce = ce * weight.gather(1, idx)[valid]

    out: dict[str, torch.Tensor] = {}
    total = logits.sum() * 0.0  # keeps the graph (and DDP) happy even if every term is empty
    for task, name in TASK_NAMES.items():
        in_task = task_ids == task
        if not bool(in_task.any()):
            continue
        keep = in_task[rows]
        if task == TASK_T2I or use_ar:
            loss = ce[keep].sum() / max(int(keep.sum()), 1)
        else:
            # Row ids within the task so that the SFT mean is over this task's rows only.
            local = torch.cumsum(in_task.long(), 0) - 1
            loss = _reduce(ce[keep], local[rows[keep]], p[in_task], region[in_task], "sft", weighting, None)
        out[f"{name}_ar" if use_ar and objective != "ar" else name] = loss
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
    return ce, rows, logits, p, (idx, valid)
