"""How many masked slots a diffusion step commits: LLaDA's fixed schedule, Fast-dLLM's confidence threshold and
factor rules, EB-Sampler's entropy bound and Dimple's confident decoding, vectorised over the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

RULES = ("fixed", "threshold", "factor", "entropy", "confident")


@dataclass(frozen=True)
class CommitRule:
    """``kind`` in :data:`RULES`; ``value`` is τ (threshold), f (factor), γ (entropy) or p (confident)."""

    kind: str = "fixed"
    value: Optional[float] = None

    @property
    def needs_entropy(self) -> bool:
        return self.kind == "entropy"


def make_rule(
    threshold: Optional[float] = None,
    factor: Optional[float] = None,
    entropy_bound: Optional[float] = None,
    confident_decoding: Optional[float] = None,
) -> CommitRule:
    """The rule chosen by the sampler's keyword arguments (at most one may be set; none = LLaDA's fixed schedule)."""
    given = {k: v for k, v in (("threshold", threshold), ("factor", factor), ("entropy_bound", entropy_bound),
                               ("confident_decoding", confident_decoding)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"choose one parallel commit rule, got {sorted(given)}; set the others to None.")
    if not given:
        return CommitRule()
    name, value = next(iter(given.items()))
    value = float(value)
    if name in ("threshold", "confident_decoding") and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {value}.")
    if name == "factor" and value <= 0:
        raise ValueError(f"factor must be > 0 (Fast-dLLM uses about 1), got {value}.")
    if name == "entropy_bound" and value < 0:
        raise ValueError(f"entropy_bound (γ, in nats) must be >= 0, got {value}.")
    kind = {"threshold": "threshold", "factor": "factor", "entropy_bound": "entropy", "confident_decoding": "confident"}
    return CommitRule(kind[name], value)


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in its row, 0 = largest; ties go to the lower index (stable, as in the reference)."""
    return score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


def select_commits(
    rule: CommitRule,
    confidence: torch.Tensor,
    valid: torch.Tensor,
    quota: torch.Tensor,
    last_step: bool = False,
    entropy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean [B, K]: which candidate slots to commit this step.

    ``confidence`` [B, K] (−inf at invalid slots), ``valid`` [B, K] still-masked slots of the active block,
    ``quota`` [B] the fixed schedule's count for this step (used by "fixed" and as Dimple's fallback),
    ``entropy`` [B, K] (for "entropy"). On ``last_step`` every valid slot is committed so every block finishes.
    Every rule but "fixed" commits at least one slot per row that has one (its most confident / lowest entropy).
    """
    if last_step:
        return valid.clone()
    rank = descending_rank(confidence)
    if rule.kind == "fixed":
        n = quota
    elif rule.kind == "threshold":
        # Fast-dLLM: everything at or above τ, plus the single best slot as a progress guarantee.
        return valid & ((confidence >= rule.value) | (rank == 0))
    elif rule.kind == "factor":
        # Fast-dLLM's factor rule: the largest n with (n+1)(1 - c_(n)) < f. Sorted descending, (i+1)(1-c_(i)) never
        # decreases with i, so the slots meeting it form a prefix and counting them gives n.
        c = confidence.sort(dim=1, descending=True, stable=True).values
        i = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=c.dtype)
        n = ((i + 1) * (1 - c) < rule.value).sum(1).clamp(min=1)
    elif rule.kind == "entropy":
        if entropy is None:
            raise ValueError("the entropy rule needs per-slot entropies.")
        # EB-Sampler: the longest lowest-entropy prefix U with sum_U H - max_U H <= γ; sorted ascending that is the
        # entropy of the slots before the last one, so the first slot always passes.
        h = entropy.masked_fill(~valid, float("inf"))
        hs = h.sort(dim=1, stable=True).values
        before = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1].cumsum(1)], dim=1)
        n = (before <= rule.value).cumprod(1).sum(1).clamp(min=1)
        rank = h.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = lowest entropy
    elif rule.kind == "confident":
        # Dimple: every slot above p; when none is, the fixed schedule's count (at least one).
        above = (valid & (confidence > rule.value)).sum(1)
        n = torch.where(above > 0, above, quota.clamp(min=1))
    else:
        raise ValueError(f"unknown commit rule {rule.kind!r}; expected one of {RULES}.")
    return valid & (rank < n[:, None])
