"""An exponential moving average of a model's trainable parameters (MDLM and most diffusion models are evaluated
with one), kept in fp32 beside the model, checkpointed with it and copied into it when a stage saves its model."""

from __future__ import annotations

import torch


class ParameterEMA:
    """``ema = d * ema + (1 - d) * param`` after every optimizer step, for the parameters that train.

    ``d`` ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short stage is not dominated by
    the weights it started from; it depends only on ``n``, so a resumed run averages exactly like an uninterrupted
    one. Names are those of ``model.named_parameters()`` (tied weights appear once)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    def decay_at(self, updates: int) -> float:
        """The decay used for update number ``updates + 1``."""
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Fold the current parameters in; ``updates`` is how many updates came before this one."""
        weight = 1.0 - self.decay_at(updates)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averages saved by :meth:`state_dict`; refuses a set of names or shapes that does not fit."""
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        wrong = sorted(k for k in set(state) & set(self.shadow) if state[k].shape != self.shadow[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"the checkpoint's EMA weights do not fit this stage's trainable parameters (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}); resume with the recipe that wrote it "
                "(same freeze list and model)"
            )
        for name, value in state.items():
            self.shadow[name].copy_(value.float())

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite ``model``'s trainable parameters with the averages (in each parameter's dtype)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))
