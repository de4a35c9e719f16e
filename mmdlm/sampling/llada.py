"""LLaDA's reference sampler: semi-autoregressive blocks, a fixed number of commits per step, low-confidence
remasking, Gumbel-max temperature and unsupervised CFG — batched, seeded, with LLaDA's EOS/CFG bugs fixed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Generator = Union[torch.Generator, Sequence[torch.Generator], None]
REMASKING = ("low_confidence", "random")


@dataclass
class SamplerOutput:
    """``sequences`` [B, prompt + gen_length]; ``nfe`` = denoiser forward calls (a CFG step's conditional and
    unconditional rows share one batched call and count once)."""

    sequences: torch.Tensor
    nfe: int


def rand_rows(shape: tuple[int, ...], generator: Generator, device: Any, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) of ``shape`` [B, ...]. A list of generators gives row i its own stream, so a row gets the same
    noise alone as in any batch; a single generator (or None) draws the whole tensor at once."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} rows; pass one per row or a single one.")
        return torch.stack(
            [torch.rand(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
        )
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where, dtype=dtype).to(device)


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each of ``steps`` steps, [B, steps]: n // steps each, plus one for the first n % steps
    steps (n = masked positions per row in ``mask_index`` [B, L]); LLaDA's linear schedule, sums to n."""
    n = mask_index.sum(dim=1, keepdim=True).long()
    counts = (n // steps).expand(-1, steps).clone()
    counts += torch.arange(steps, device=mask_index.device)[None] < (n % steps)
    return counts


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: Generator) -> torch.Tensor:
    """argmax(l + τ·Gumbel) in float64 — LLaDA's exp(l)/(−log u)^τ in log space; τ = 0 is plain argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = rand_rows(tuple(logits.shape), generator, logits.device, torch.float64)
    gumbel = -torch.log(-torch.log(u))
    return (logits.double() + temperature * gumbel).argmax(dim=-1)


def _check_inputs(model, input_ids, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                  remasking, mask_id) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor [batch, prompt_length]; got {shape}. Use ids[None] for one prompt.")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; use .long().")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt {tuple(input_ids.shape)}: give at least one prompt token per row (e.g. BOS).")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} (1 = token, 0 = left "
                f"padding), got {got}."
            )
        if bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("a row of attention_mask is all zeros (empty prompt); give every row a token.")
    if mask_id is None:
        raise ValueError("no mask id: pass mask_id or set model.config.mask_token_id.")
    real = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    if bool((real == mask_id).any()):
        raise ValueError(
            f"the prompt contains the mask token {mask_id}; the sampler treats it as a slot to fill. Remove it "
            "(or pin a partial answer by putting it after the prompt yourself)."
        )
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}).")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = gen_length / block_length) "
            f"so that each block gets the same number of steps; e.g. steps={num_blocks * max(1, steps // num_blocks)}."
        )
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature and cfg_scale must be >= 0, got {temperature} and {cfg_scale}.")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}.")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and input_ids.shape[1] + gen_length > max_pos:
        raise ValueError(
            f"prompt ({input_ids.shape[1]}) + gen_length ({gen_length}) exceeds max_position_embeddings ({max_pos})."
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    generator: Generator = None,
    image_features: Optional[torch.Tensor] = None,
    banned_token_ids: Optional[Sequence[int]] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    return_dict: bool = False,
) -> Union[torch.Tensor, SamplerOutput]:
    """LLaDA's ``generate``: fill ``gen_length`` masks after the prompt, block by block, left to right.

    Each block gets ``steps / num_blocks`` steps; a step predicts every masked slot of the block
    (Gumbel-max at ``temperature``), scores it (``low_confidence``: softmax probability of the prediction;
    ``random``: uniform) and commits the ``num_transfer_tokens`` best. Later blocks and committed tokens are
    never touched. ``cfg_scale`` w > 0 adds a copy whose real prompt tokens (image slots too) are masks:
    logits = l_u + (w+1)(l_c − l_u).

    Batched prompts are left-padded with ``attention_mask`` (1 = token); positions come from the mask so each row
    gets the tokens it gets alone (at temperature 0; pass one generator per row for sampling too). This is exact
    in fp32 (checked on CPU and an H200); in bf16 the padded kernels round differently, so near-ties can flip.

    Fixes and additions to LLaDA: ``logits_eos_inf`` bans EOS; ``confidence_eos_eot_inf`` gives predicted EOS/EoT
    −inf confidence (committed only when a step's quota cannot be met otherwise); ``banned_token_ids`` (default
    ``model.config.banned_token_ids``) and the mask token itself never fill a slot; CFG works without a mask;
    ``callback(step, x)`` runs after every step. Returns x [B, prompt + gen_length] (or :class:`SamplerOutput`).
    """
    config = model.config
    mask_id = config.mask_token_id if mask_id is None else mask_id
    _check_inputs(model, input_ids, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                  remasking, mask_id)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device).long()
    B, P = input_ids.shape
    x = torch.cat([input_ids, torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], dim=1)
    prompt_real = torch.ones_like(input_ids, dtype=torch.bool)
    am = position_ids = None
    if attention_mask is not None:
        prompt_real = attention_mask.to(device).bool()
        am = torch.cat([prompt_real.long(), torch.ones(B, gen_length, dtype=torch.long, device=device)], dim=1)
        position_ids = (am.cumsum(-1) - 1).clamp(min=0)

    eos_id, eot_id = getattr(config, "eos_token_id", None), getattr(config, "eot_token_id", None)
    banned = list(config.banned_token_ids if banned_token_ids is None else banned_token_ids) + [mask_id]
    if logits_eos_inf:
        if eos_id is None:
            raise ValueError("logits_eos_inf needs model.config.eos_token_id.")
        banned.append(eos_id)
    banned_t = torch.tensor(sorted(set(int(t) for t in banned)), dtype=torch.long, device=device)
    suppress = [t for t in (eos_id, eot_id) if t is not None] if confidence_eos_eot_inf else []
    suppress_t = torch.tensor(suppress, dtype=torch.long, device=device)

    use_cfg = cfg_scale > 0
    if use_cfg:
        am_in = None if am is None else am.repeat(2, 1)
        pos_in = None if position_ids is None else position_ids.repeat(2, 1)
    else:
        am_in, pos_in = am, position_ids

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    nfe = 0
    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        keep = torch.arange(start, end, device=device)[None].expand(B, -1)
        quota = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            if use_cfg:
                uncond = x.clone()
                uncond[:, :P][prompt_real] = mask_id  # image placeholders go too: that row gets no features
                both = model(input_ids=torch.cat([x, uncond]), attention_mask=am_in, position_ids=pos_in,
                             image_features=image_features, logits_to_keep=keep.repeat(2, 1)).logits
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1.0) * (cond - un)
            else:
                logits = model(input_ids=x, attention_mask=am_in, position_ids=pos_in,
                               image_features=image_features, logits_to_keep=keep).logits
            nfe += 1
            logits = logits.index_fill(-1, banned_t, float("-inf"))
            x0 = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = F.softmax(logits.double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                confidence = rand_rows((B, block_length), generator, device, torch.float64)
            if len(suppress):
                # Finite but below every real confidence (those are >= 0): last in line, yet still eligible.
                confidence = confidence.masked_fill(torch.isin(x0, suppress_t), -1e300)
            block = x[:, start:end]
            masked = block == mask_id
            confidence = confidence.masked_fill(~masked, float("-inf"))
            rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            commit = masked & (rank < quota[:, i : i + 1])
            x[:, start:end] = torch.where(commit, x0, block)
            if callback is not None:
                callback(b * steps_per_block + i, x.clone())
    return SamplerOutput(sequences=x, nfe=nfe) if return_dict else x
