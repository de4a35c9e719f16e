"""Greedy KV-cached decoding for the causal (``config.is_causal=True``) twin of the denoiser: the AR baseline
that the diffusion samplers are compared against. Batched with left padding; rows stop at EOS independently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class AutoregressiveOutput:
    """``sequences`` [B, prompt + max_new_tokens] (EOS-filled after a row stops); ``nfe`` forward passes in all;
    ``nfe_per_row`` [B] forward passes each row took part in (a finished row is dropped from the batch)."""

    sequences: torch.Tensor
    nfe: int
    nfe_per_row: torch.Tensor


def _stop_ids(model, eos_token_id: Optional[int | Sequence[int]]) -> list[int]:
    if eos_token_id is None:
        found = [getattr(model.config, "eos_token_id", None), getattr(model.config, "eot_token_id", None)]
        ids = []
        for f in found:
            ids += list(f) if isinstance(f, (list, tuple)) else ([f] if f is not None else [])
        return ids
    return list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    # Left padding means each row is 0...0 1...1: the mask never drops from 1 back to 0.
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask must be left-padded (zeros first, then ones) for batched autoregressive decoding; "
            "pad prompts on the left (tokenizer.padding_side = 'left')."
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("a prompt row is all padding; every row needs at least one real token.")


@torch.no_grad()
def generate_autoregressive(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 128,
    eos_token_id: Optional[int | Sequence[int]] = None,
    return_dict: bool = False,
    *,
    image_features: Optional[torch.Tensor] = None,
    use_cache: bool = True,
) -> torch.Tensor | AutoregressiveOutput:
    """Greedy decoding of ``max_new_tokens`` tokens after a (left-padded) prompt.

    ``eos_token_id`` (int or list; default: the config's ``eos_token_id`` and ``eot_token_id``) ends a row; the
    rest of that row is filled with the first stop id and the row leaves the batch. ``image_features`` are the
    projected features for the prompt's image slots (as for the model's forward). ``use_cache=False`` recomputes
    the whole sequence every step (slow; for checking the cache). Returns ``sequences`` [B, P + max_new_tokens]
    or, with ``return_dict``, an :class:`AutoregressiveOutput`.
    """
    if not getattr(model.config, "is_causal", False):
        raise ValueError(
            "generate_autoregressive needs a causal model (config.is_causal=True); for the bidirectional denoiser "
            "use mmdlm.sampling.generate (diffusion decoding)."
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt_length], got {tuple(input_ids.shape)}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    B, P = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, P, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.shape != (B, P):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, P)}, got {tuple(attention_mask.shape)}.")
    _check_left_padded(attention_mask)
    stop = _stop_ids(model, eos_token_id)
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    fill = stop[0] if stop else 0
    T = P + max_new_tokens

    out = torch.full((B, T), fill, dtype=torch.long, device=device)
    out[:, :P] = input_ids
    am = torch.cat([attention_mask, torch.ones(B, max_new_tokens, dtype=torch.long, device=device)], 1)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    embed = model.get_input_embeddings()
    prompt_embeds = model.model.embed(input_ids, image_features)

    rows = torch.arange(B, device=device)  # original row index of each active row
    nfe_per_row = torch.zeros(B, dtype=torch.long, device=device)
    nfe = 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in range(max_new_tokens):
        cur = P + t
        if not use_cache or t == 0:
            # Prefill (or full recompute): every position so far, causal + key padding.
            embeds = prompt_embeds if t == 0 else torch.cat([prompt_embeds, embed(out[rows, P:cur])], 1)
            res = model(inputs_embeds=embeds, attention_mask=am[rows, :cur], position_ids=pos[rows, :cur],
                        use_cache=use_cache, logits_to_keep=1)
            if use_cache:
                # Preallocated buffers: later steps write one slot instead of concatenating.
                kv = []
                for k, v in res.cache:
                    kb = k.new_empty(k.shape[0], k.shape[1], T, k.shape[3])
                    vb = v.new_empty(v.shape[0], v.shape[1], T, v.shape[3])
                    kb[:, :, :P], vb[:, :, :P] = k, v
                    kv.append((kb, vb))
        else:
            last = out[rows, cur - 1 : cur]
            res = model(inputs_embeds=embed(last), attention_mask=am[rows, :cur], position_ids=pos[rows, cur - 1 : cur],
                        cache=[(k[:, :, : cur - 1], v[:, :, : cur - 1]) for k, v in kv], use_cache=True, logits_to_keep=1)
            for (kb, vb), (k, v) in zip(kv, res.cache):
                kb[:, :, cur - 1 : cur], vb[:, :, cur - 1 : cur] = k, v
        nfe += 1
        nfe_per_row[rows] += 1
        nxt = res.logits[:, -1].argmax(-1)
        out[rows, cur] = nxt
        if len(stop):
            done = torch.isin(nxt, stop_t)
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                rows = rows[keep]
                if use_cache:
                    kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in kv]
                prompt_embeds = prompt_embeds.index_select(0, keep)
                if rows.numel() == 0:
                    break
    if return_dict:
        return AutoregressiveOutput(sequences=out, nfe=nfe, nfe_per_row=nfe_per_row.cpu())
    return out
