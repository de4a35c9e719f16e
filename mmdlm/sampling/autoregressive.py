"""KV-cached decoding for causal (``config.is_causal=True``) models, the AR twin of the denoiser that the
diffusion samplers are compared against: greedy text (rows stop at EOS independently) and image codes drawn left
to right. Batched with left padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .llada import Generator, rand_rows
from .maskgit import check_drawing_inputs, left_pad, t2i_prompt_ids


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


def _next_token_logits(model: torch.nn.Module) -> dict[str, bool]:
    """Forward options that make a model with shifted logits (config.shift_logits) return, at position i, the
    prediction of token i + 1 that an AR decoder reads; empty for every other model."""
    return {"shift_logits": False} if getattr(model.config, "shift_logits", False) else {}


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    # Left padding means each row is 0...0 1...1: the mask never drops from 1 back to 0.
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask must be left-padded (zeros first, then ones) for batched autoregressive decoding; "
            "pad prompts on the left (tokenizer.padding_side = 'left')."
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("a prompt row is all padding; every row needs at least one real token.")


def _cache_buffers(cache: Sequence[tuple[torch.Tensor, torch.Tensor]], total: int) -> list:
    """Preallocated [B, H, total, D] key/value buffers holding the prefill's cache, so that each later step writes
    one slot instead of concatenating."""
    kv = []
    for k, v in cache:
        kb = k.new_empty(k.shape[0], k.shape[1], total, k.shape[3])
        vb = v.new_empty(v.shape[0], v.shape[1], total, v.shape[3])
        kb[:, :, : k.shape[2]], vb[:, :, : v.shape[2]] = k, v
        kv.append((kb, vb))
    return kv


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
    unshift = _next_token_logits(model)

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
                        use_cache=use_cache, logits_to_keep=1, **unshift)
            if use_cache:
                kv = _cache_buffers(res.cache, T)
        else:
            last = out[rows, cur - 1 : cur]
            res = model(inputs_embeds=embed(last), attention_mask=am[rows, :cur], position_ids=pos[rows, cur - 1 : cur],
                        cache=[(k[:, :, : cur - 1], v[:, :, : cur - 1]) for k, v in kv], use_cache=True, logits_to_keep=1,
                        **unshift)
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


@torch.no_grad()
def generate_image_tokens_autoregressive(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    num_image_tokens: int,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    generator: Generator = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Draw ``num_image_tokens`` image codes per prompt with a causal model, in raster order; returns [B, N] codes.

    Each row is ``prompt <|soi|>`` (``prompt`` = :func:`~mmdlm.sampling.maskgit.t2i_prompt_ids`), left-padded, and
    gets one prefill then one single-token forward per code. Code t is drawn from softmax(logits / temperature)
    over the image codes only (argmax at temperature 0). ``guidance_scale`` w > 0 also runs the unconditional row
    (``<|t2i|> BOS EOS <|soi|>``) and uses (1+w)·cond − w·uncond; it only helps a model trained with caption
    dropout. ``callback(t, codes)`` gets [B, N] codes with −1 where not drawn yet. A list of generators (one per
    row) makes each row's result independent of the batch.
    """
    config = model.config
    if not getattr(config, "is_causal", False):
        raise ValueError("generate_image_tokens_autoregressive needs a causal model (config.is_causal=True); a "
                         "bidirectional denoiser draws with mmdlm.sampling.maskgit.generate_image_tokens.")
    check_drawing_inputs(config, prompt_ids, num_image_tokens, guidance_scale, temperature)
    N, soi = num_image_tokens, config.soi_token_id
    if soi is None:
        raise ValueError("model.config needs soi_token_id to draw.")
    offset, codebook = config.image_token_offset, config.codebook_size
    prompts = [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in prompt_ids]
    rows = [p + [soi] for p in prompts]
    if guidance_scale > 0:
        rows += [t2i_prompt_ids(config, []) + [soi]] * len(prompts)
    for i, r in enumerate(rows):
        if len(r) + N > config.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(r) - 1} tokens; with {N} image tokens that exceeds "
                             f"max_position_embeddings ({config.max_position_embeddings}). Shorten the prompt.")

    device = next(model.parameters()).device
    B = len(prompts)
    pad_id = config.eos_token_id if getattr(config, "eos_token_id", None) is not None else 0
    ids, am = left_pad(rows, pad_id, device)
    P = ids.shape[1]
    am = torch.cat([am, torch.ones(am.shape[0], N, dtype=torch.long, device=device)], 1)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    unshift = _next_token_logits(model)
    res = model(input_ids=ids, attention_mask=am[:, :P], position_ids=pos[:, :P], use_cache=True, logits_to_keep=1,
                **unshift)
    kv = _cache_buffers(res.cache, P + N)
    codes = torch.full((B, N), -1, dtype=torch.long, device=device)
    for t in range(N):
        logits = res.logits[:, -1, offset : offset + codebook].double()  # only image codes may follow <|soi|>
        if guidance_scale > 0:
            cond, un = logits.chunk(2)
            logits = (1 + guidance_scale) * cond - guidance_scale * un
        if temperature > 0:
            gumbel = -torch.log(-torch.log(rand_rows((B, codebook), generator, device, torch.float64)))
            nxt = (F.log_softmax(logits / temperature, dim=-1) + gumbel).argmax(-1)  # Gumbel-max: a multinomial draw
        else:
            nxt = logits.argmax(-1)
        codes[:, t] = nxt
        if callback is not None:
            callback(t, codes.clone())
        if t == N - 1:
            break
        cur = P + t  # the position of the code just drawn
        token = (nxt + offset).repeat(2 if guidance_scale > 0 else 1)[:, None]
        res = model(input_ids=token, attention_mask=am[:, : cur + 1], position_ids=pos[:, cur : cur + 1],
                    cache=[(k[:, :, :cur], v[:, :, :cur]) for k, v in kv], use_cache=True, logits_to_keep=1,
                    **unshift)
        for (kb, vb), (k, v) in zip(kv, res.cache):
            kb[:, :, cur : cur + 1], vb[:, :, cur : cur + 1] = k, v
    return codes
