"""Fast diffusion sampler: LLaDA's decoding with exact engine savings (logits only at masked slots, embeddings and
image features computed once, per-row early stop at EOS) plus opt-in approximations (Fast-dLLM prefix/dual K/V
caches, LaViDa prefix-DLM, threshold / factor / entropy-bound / confident parallel commits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .cache import BlockCache, Refresh
from .commit_rules import make_rule, select_commits
from .llada import Generator, SamplerOutput, _check_inputs, num_transfer_tokens, rand_rows


@dataclass
class FastSamplerOutput(SamplerOutput):
    """:class:`~mmdlm.sampling.llada.SamplerOutput` plus cost counters: ``nfe_per_row`` [B] forward passes each row
    took part in (finished rows leave the batch), ``query_tokens`` = sum over forwards of rows x query positions
    (CFG rows included) — the quantity caches shrink."""

    nfe_per_row: Optional[torch.Tensor] = None
    query_tokens: int = 0


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(model, eos_token_id: Optional[Union[int, Sequence[int]]] = None) -> list[int]:
    """Ids that end an answer: ``eos_token_id`` if given, else the config's EOS and EoT (first = fill id)."""
    if eos_token_id is not None:
        return _ids(eos_token_id)
    ids = _ids(getattr(model.config, "eos_token_id", None)) + _ids(getattr(model.config, "eot_token_id", None))
    return list(dict.fromkeys(ids))


def _schedule(n: int, steps: int) -> list[int]:
    """LLaDA's per-step commit counts for n masked slots (host copy of ``num_transfer_tokens``)."""
    return [n // steps + (i < n % steps) for i in range(steps)]


def _draw(tail: tuple[int, ...], generator: Generator, batch: int, active: list[int], device) -> torch.Tensor:
    """Uniform noise for the active rows, consumed from the generator(s) exactly as the reference does: a single
    generator (or the global RNG) draws for all ``batch`` rows every step, a list draws per row."""
    if isinstance(generator, (list, tuple)):
        return rand_rows((len(active),) + tail, [generator[i] for i in active], device, torch.float64)
    u = rand_rows((batch,) + tail, generator, device, torch.float64)
    return u if len(active) == batch else u[torch.tensor(active, device=device)]


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
    *,
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    entropy_bound: Optional[float] = None,
    confident_decoding: Optional[float] = None,
    cache: str = "none",
    cache_refresh: Refresh = "block",
    early_stop: bool = True,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
) -> Union[torch.Tensor, FastSamplerOutput]:
    """Diffusion decoding with the arguments and semantics of :func:`mmdlm.sampling.llada.generate`, faster.

    Exact (same tokens as the reference): the defaults — no parallel rule, ``cache="none"`` (or any cache with
    ``cache_refresh=1``) — with ``early_stop=True``: a row stops once it has committed a stop token
    (``eos_token_id``, default the config's EOS and EoT) with every slot before it committed; its text up to that
    token is final (committed tokens are never revised) and the rest is filled with the first stop id. Finished
    rows leave the batch. Noise is drawn from ``generator`` in the reference's layout, so seeded sampling matches too.

    Approximate: ``cache`` "prefix" / "dual" with ``cache_refresh`` "block" / int K / "never" (prefix only;
    see :class:`~mmdlm.sampling.cache.BlockCache`; a model with shifted logits runs one extra query position
    before the block); one parallel rule — ``threshold`` τ (every slot with confidence >= τ), ``factor`` f
    (largest n with (n+1)(1 - c_n) < f), ``entropy_bound`` γ (EB-Sampler) or
    ``confident_decoding`` p (Dimple) — each commits at least one slot per step. Blocks advance together across
    the batch; a block ends when its slots are all committed or its ``steps / num_blocks`` steps are used (the last
    step commits what is left). Returns sequences [B, prompt + gen_length] or a :class:`FastSamplerOutput`.
    """
    config = model.config
    mask_id = config.mask_token_id if mask_id is None else mask_id
    _check_inputs(model, input_ids, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                  remasking, mask_id)
    rule = make_rule(threshold, factor, entropy_bound, confident_decoding)
    if rule.kind != "fixed" and remasking != "low_confidence":
        raise ValueError(f"the {rule.kind} commit rule ranks by model confidence; use remasking='low_confidence'.")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device).long()
    B, P = input_ids.shape
    L, G = P + gen_length, gen_length
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"got {len(generator)} generators for {B} rows; pass one per row or a single one.")
    bc = BlockCache(cache, cache_refresh, P, lead=int(bool(getattr(config, "shift_logits", False))))

    x = torch.cat([input_ids, torch.full((B, G), mask_id, dtype=torch.long, device=device)], dim=1)
    out = x.clone()  # every row in its original place; finished rows are written here and leave `x`
    prompt_real = torch.ones_like(input_ids, dtype=torch.bool)
    am = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        prompt_real = attention_mask.to(device).bool()
        am = torch.cat([prompt_real.long(), torch.ones(B, G, dtype=torch.long, device=device)], dim=1)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
    else:
        pos = torch.arange(L, device=device)[None].expand(B, L)

    eos_id, eot_id = getattr(config, "eos_token_id", None), getattr(config, "eot_token_id", None)
    banned = list(config.banned_token_ids if banned_token_ids is None else banned_token_ids) + [mask_id]
    if logits_eos_inf:
        if eos_id is None:
            raise ValueError("logits_eos_inf needs model.config.eos_token_id.")
        banned.append(eos_id)
    banned_t = torch.tensor(sorted(set(int(t) for t in banned)), dtype=torch.long, device=device)
    suppress = [t for t in (eos_id, eot_id) if t is not None] if confidence_eos_eot_inf else []
    suppress_t = torch.tensor(suppress, dtype=torch.long, device=device)
    stops = stop_token_ids(model, eos_token_id) if early_stop else []
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)

    use_cfg = cfg_scale > 0

    def model_rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # CFG: the conditional rows, then their unconditional copies, in one batched forward.
        return t if t is None or not use_cfg else torch.cat([t, t])

    # Embeddings (with the image features merged into their slots) are built once; a commit rewrites one row.
    ids_in = x
    if use_cfg:
        uncond = x.clone()
        uncond[:, :P][prompt_real] = mask_id  # as the reference: real prompt tokens (image slots too) become masks
        ids_in = torch.cat([x, uncond])
    embed_tokens = model.get_input_embeddings()
    if hasattr(model, "model") and hasattr(model.model, "embed"):
        embeds = model.model.embed(ids_in, image_features)
    elif image_features is None:
        embeds = embed_tokens(ids_in)
    else:
        raise ValueError("image_features need a model with a multimodal `model.embed`; this model has none.")
    am_m, pos_m = model_rows(am), model_rows(pos)

    active = list(range(B))
    act_t = torch.arange(B, device=device)
    nfe, query_tokens, step = 0, 0, 0
    nfe_rows = torch.zeros(B, dtype=torch.long, device=device)
    if bc.needs_prefill:
        bc.prefill(model, embeds, am_m, pos_m)
        nfe, query_tokens = 1, embeds.shape[0] * P
        nfe_rows += 1

    num_blocks = G // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        quota = num_transfer_tokens(x[:, s:e] == mask_id, steps_per_block)
        remaining, per_step = block_length, _schedule(block_length, steps_per_block)
        for i in range(steps_per_block):
            block = x[:, s:e]
            masked = block == mask_id
            if rule.kind == "fixed":
                K = remaining  # every row follows the same schedule: known without asking the device
            else:
                K = int(masked.sum(1).max())
                if K == 0:
                    break  # every active row finished this block early
            # Candidate slots: each row's masked positions in order, padded with distinct committed ones.
            idx = (~masked).to(torch.uint8).argsort(dim=1, stable=True)[:, :K]
            valid = masked.gather(1, idx)
            if bc.is_full_step(i):
                qs, qe = 0, L
                res = model(inputs_embeds=embeds, attention_mask=am_m, position_ids=pos_m,
                            use_cache=bc.mode != "none", logits_to_keep=model_rows(idx + s))
                if bc.mode != "none":
                    bc.store(res.cache, s, e)
            else:
                qs, qe = bc.window(s, e, L)
                res = model(inputs_embeds=embeds[:, qs:qe], attention_mask=bc.key_mask(am_m, s, e),
                            position_ids=pos_m[:, qs:qe], cache=bc.kv, logits_to_keep=model_rows(idx + (s - qs)))
            logits = res.logits
            if use_cfg:
                cond, un = logits.chunk(2)
                logits = un + (cfg_scale + 1.0) * (cond - un)
            nfe += 1
            query_tokens += embeds.shape[0] * (qe - qs)
            nfe_rows[act_t] += 1

            logits = logits.index_fill(-1, banned_t, float("-inf"))
            V = logits.shape[-1]
            if temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                u = _draw((block_length, V), generator, B, active, device).gather(1, idx[..., None].expand(-1, -1, V))
                x0 = (logits.double() + temperature * -torch.log(-torch.log(u))).argmax(dim=-1)
            probs = None
            if remasking == "low_confidence":
                probs = F.softmax(logits.double(), dim=-1)
                confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
            else:
                confidence = _draw((block_length,), generator, B, active, device).gather(1, idx)
            entropy = None
            if rule.needs_entropy:
                entropy = torch.special.entr(probs).sum(-1)
            if len(suppress):
                hit = torch.isin(x0, suppress_t)
                confidence = confidence.masked_fill(hit, -1e300)  # last in line, still eligible (as the reference)
                if entropy is not None:
                    entropy = entropy.masked_fill(hit, 1e300)
            confidence = confidence.masked_fill(~valid, float("-inf"))
            commit = select_commits(rule, confidence, valid, quota[:, i], i == steps_per_block - 1, entropy)
            remaining -= per_step[i]

            block.scatter_(1, idx, torch.where(commit, x0, block.gather(1, idx)))
            # Re-embed the block densely (masks map to the same mask embedding): no host sync, few kernels.
            vec = embed_tokens(block).to(embeds.dtype)
            embeds[: len(active), s:e] = vec
            if use_cfg:
                embeds[len(active):, s:e] = vec
            if len(stops):
                gen = x[:, P:]
                is_stop = torch.isin(gen, stop_t)
                first = torch.where(is_stop.any(1), is_stop.to(torch.uint8).argmax(1), G)
                before = torch.arange(G, device=device)[None] < first[:, None]
                done = (first < G) & ~((gen == mask_id) & before).any(1)
                if bool(done.any()):
                    rows = done.nonzero().squeeze(1)
                    after = torch.arange(G, device=device)[None] > first[rows, None]
                    out[act_t[rows], P:] = gen[rows].masked_fill(after, stops[0])
                    keep = (~done).nonzero().squeeze(1)
                    keep_m = keep if not use_cfg else torch.cat([keep, keep + len(active)])
                    x, quota, act_t = x[keep], quota[keep], act_t[keep]
                    embeds, pos_m = embeds[keep_m], pos_m[keep_m]
                    am_m = None if am_m is None or bool(am_m[keep_m].all()) else am_m[keep_m]
                    bc.select_rows(keep_m)
                    active = [active[j] for j in keep.tolist()]
            if callback is not None:
                if active:
                    out[act_t] = x
                callback(step, out.clone())  # finished rows already show their final, EOS-filled text
            step += 1
            if not active:
                break
        if not active:
            break
    if active:
        out[act_t] = x
    if return_dict:
        return FastSamplerOutput(sequences=out, nfe=nfe, nfe_per_row=nfe_rows.cpu(), query_tokens=query_tokens)
    return out
