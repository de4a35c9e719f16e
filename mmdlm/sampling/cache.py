"""Approximate K/V caches for block-wise diffusion decoding: Fast-dLLM's prefix and dual caches with a refresh
policy, and LaViDa's prefix-DLM mode (prompt K/V computed once from the prompt alone)."""

from __future__ import annotations

from typing import Optional, Union

import torch

KVCache = list  # one (key, value) per layer, [B, n_kv_heads, L, head_dim], keys already rotated

MODES = ("none", "prefix", "dual")
Refresh = Union[str, int]


def kv_slice(kv: KVCache, start: int, end: Optional[int] = None) -> KVCache:
    """Positions [start, end) of every layer, copied so the full-sequence tensors can be freed."""
    return [(k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in kv]


def kv_cat(a: KVCache, b: KVCache) -> KVCache:
    """Concatenate two caches along positions (a's positions first)."""
    return [(torch.cat([ka, kb], 2), torch.cat([va, vb], 2)) for (ka, va), (kb, vb) in zip(a, b)]


def kv_rows(kv: KVCache, rows: torch.Tensor) -> KVCache:
    """Keep batch rows ``rows`` (e.g. drop finished sequences)."""
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv]


class BlockCache:
    """What a decoding step runs as queries and what it reads from cache.

    * ``"none"``: every step is a full forward (exact).
    * ``"prefix"``: K/V of [0, block start) (prompt, image and finished blocks); cached steps run the block and
      everything after it. ``refresh``: ``"block"`` (full forward at each block's first step, Fast-dLLM),
      int K (also every K steps inside a block, LLaDA-V's hook; K=1 is exact), or ``"never"`` (prefix-DLM, LaViDa:
      the prompt's K/V is computed once from the prompt alone, and every step runs the whole answer).
    * ``"dual"``: K/V of the prefix *and* of the masked suffix after the block; cached steps run only the block.
      ``refresh`` is ``"block"`` or int K.
    A full forward doubles as the step's prediction, so refreshing costs no extra pass.

    ``lead`` (1 for a model with shifted logits, Dream-style: position i is predicted from the output at i - 1)
    moves the first query one position earlier, out of the cache, so the block's first slot has its predecessor's
    output; the logits a step reads then start at query offset ``lead``.
    """

    def __init__(self, mode: str = "none", refresh: Refresh = "block", prompt_length: int = 0, lead: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"cache must be one of {MODES}, got {mode!r}.")
        if isinstance(refresh, bool) or not (refresh in ("block", "never") or (isinstance(refresh, int) and refresh >= 1)):
            raise ValueError(f"cache_refresh must be 'block', 'never' or a positive int (steps), got {refresh!r}.")
        if mode == "dual" and refresh == "never":
            raise ValueError("the dual cache holds the masked suffix, which must be refreshed: use cache_refresh='block' "
                             "or an int, or cache='prefix' with cache_refresh='never' (prefix-DLM).")
        if lead not in (0, 1):
            raise ValueError(f"lead must be 0 or 1 (positions a query window starts before the block), got {lead!r}.")
        if lead and mode != "none" and prompt_length < 1:
            raise ValueError("a model with shifted logits predicts the first answer slot from the prompt's last "
                             "position: cached decoding needs a prompt of at least one token.")
        self.mode, self.refresh, self.prompt_length, self.lead = mode, refresh, prompt_length, lead
        self.kv: Optional[KVCache] = None

    @property
    def needs_prefill(self) -> bool:
        """True when the prompt's K/V must be built once, before any step (prefix-DLM)."""
        return self.mode == "prefix" and self.refresh == "never"

    def is_full_step(self, step_in_block: int) -> bool:
        """Whether this step runs the whole sequence (and rebuilds the cache)."""
        if self.mode == "none":
            return True
        if self.refresh == "never":
            return False
        if self.refresh == "block":
            return step_in_block == 0
        return step_in_block % self.refresh == 0

    def window(self, start: int, end: int, total: int) -> tuple[int, int]:
        """Query positions [qs, qe) of a cached step for the block [start, end) of a sequence of ``total``."""
        if self.mode == "dual":
            return start - self.lead, end
        if self.refresh == "never":
            return self.prompt_length - self.lead, total
        return start - self.lead, total

    def store(self, kv_full: KVCache, start: int, end: int) -> None:
        """Keep what later steps of the block [start, end) read, from a full forward's K/V."""
        cut = start - self.lead
        if self.mode == "prefix":
            self.kv = kv_slice(kv_full, 0, cut)
        elif self.mode == "dual":
            self.kv = kv_cat(kv_slice(kv_full, 0, cut), kv_slice(kv_full, end))

    def prefill(self, model, embeds: torch.Tensor, key_mask: Optional[torch.Tensor], positions: torch.Tensor) -> None:
        """Prefix-DLM: the prompt's K/V from the prompt alone (it never attends to the answer)."""
        P = self.prompt_length - self.lead
        am = None if key_mask is None else key_mask[:, :P]
        empty = torch.zeros(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
        out = model(inputs_embeds=embeds[:, :P], attention_mask=am, position_ids=positions[:, :P], use_cache=True,
                    logits_to_keep=empty)
        self.kv = out.cache

    def key_mask(self, key_mask: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
        """The 2-D key-padding mask over cache + queries for a cached step (cache positions come first)."""
        if key_mask is None:
            return None
        if self.mode == "dual":
            cut = start - self.lead
            return torch.cat([key_mask[:, :cut], key_mask[:, end:], key_mask[:, cut:end]], 1)
        return key_mask  # prefix [0, qs) then queries [qs, total): already in order

    def select_rows(self, rows: torch.Tensor) -> None:
        """Drop batch rows that finished."""
        if self.kv is not None:
            self.kv = kv_rows(self.kv, rows)
