"""The AdamW part of the online merging optimizers: moments, decoupled decay, and the update Δ.

``torch.optim.AdamW``'s arithmetic, so that OnDARE with ``keep_rate=1, merge_weight=0`` *is*
AdamW: ``m ← lerp(m, g, 1 − β₁)``, ``v ← β₂·v + (1 − β₂)·g²``, the decay ``θ ← θ − lr·wd·θ``
before the update, and ``Δ = −lr · m̂ / (√v̂ + eps)`` with eps added after the bias correction
(the authors' code uses the Hugging Face form, eps added to √v before it). The moments and the
decay of a whole param group are updated with foreach kernels (:func:`update_moments`); Δ is
then computed per parameter and only where it is needed (:class:`AdamDelta`: densely, on a slice,
or at given indices).
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdamDelta", "update_moments"]


def update_moments(weights: list, grads: list, states: list, group: dict) -> None:
    """Update the moments of ``states`` with ``grads`` and apply the group's weight decay to
    ``weights``, all in place, with foreach kernels (before Δ is computed)."""
    beta1, beta2 = group["betas"]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_([s["exp_avg"] for s in states], grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if group["weight_decay"] != 0:
        torch._foreach_mul_(weights, 1 - group["lr"] * group["weight_decay"])


class AdamDelta:
    """The Adam update ``Δ = −lr·m̂/(√v̂ + eps)`` of one parameter, densely or at given indices."""

    def __init__(self, state, step_size, bias_correction2_sqrt, eps):
        self.exp_avg, self.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        self.step_size, self.bc2_sqrt, self.eps = step_size, bias_correction2_sqrt, eps

    @classmethod
    def of(cls, state: dict, group: dict, step: int | None = None) -> AdamDelta:
        """Δ of the parameter at ``step`` (default: its state's) with the group's bias correction."""
        (beta1, beta2), t = group["betas"], state["step"] if step is None else step
        return cls(state, group["lr"] / (1 - beta1**t), math.sqrt(1 - beta2**t), group["eps"])

    def magnitude(self, part: slice) -> torch.Tensor:
        """``|Δ| / step_size = |m| / (√v̂ + eps)`` at ``part`` of the flat parameter: ranks like
        |Δ| at one pass less than ``dense``."""
        denom = self.exp_avg_sq.view(-1)[part].sqrt().div_(self.bc2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg.view(-1)[part], denom, out=denom).abs_()

    def dense(self) -> torch.Tensor:
        denom = self.exp_avg_sq.sqrt().div_(self.bc2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg, denom, out=denom).mul_(-self.step_size)

    def dense_at(self, part: slice) -> torch.Tensor:
        """``dense()`` at ``part`` of the flat parameter (a new tensor, the same values)."""
        denom = self.exp_avg_sq.view(-1)[part].sqrt().div_(self.bc2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg.view(-1)[part], denom, out=denom).mul_(-self.step_size)

    def at(self, idx: torch.Tensor) -> torch.Tensor:
        m = self.exp_avg.view(-1)[idx]
        denom = self.exp_avg_sq.view(-1)[idx].sqrt_().div_(self.bc2_sqrt).add_(self.eps)
        return m.div_(denom).mul_(-self.step_size)
