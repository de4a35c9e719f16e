"""Vision-to-language projector with LLaVA's type strings and parameter names (``mm_projector.0.weight``, ...)."""

from __future__ import annotations

import re

from torch import nn

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")
VALID_PROJECTOR_TYPES = ("identity", "linear", "mlp{N}x_gelu (e.g. mlp2x_gelu)")


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Build the projector from vision features (``mm_hidden_size``) to the denoiser width (``hidden_size``).

    ``"identity"`` needs equal sizes; ``"linear"`` is one ``nn.Linear``; ``"mlp{N}x_gelu"`` is
    ``nn.Sequential(Linear, GELU, Linear, ..., Linear)`` with N linears, so its keys are ``0.*``, ``2.*``, ...
    exactly as in LLaVA / LLaDA-V checkpoints.
    """
    for name, v in (("mm_hidden_size", mm_hidden_size), ("hidden_size", hidden_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ValueError(
                f"projector 'identity' needs mm_hidden_size == hidden_size, got {mm_hidden_size} and {hidden_size}; "
                "use 'linear' or 'mlp2x_gelu' to change the width"
            )
        return nn.Identity()
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    m = _MLP_RE.match(str(projector_type))
    if m and int(m.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, int(m.group(1))):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector_type {projector_type!r}; valid types: {', '.join(VALID_PROJECTOR_TYPES)}")
