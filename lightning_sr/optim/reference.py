"""Pairing an optimizer's parameters with the base model, before τ = θ_SFT − θ_base is computed.

``set_base`` (:class:`~lightning_sr.optim.base.OnlineMergingOptimizer`) first decides, for every
trainable parameter, which tensor of the base is its counterpart (:func:`pair_with_base`, by name
through :func:`~lightning_sr.optim.names.align_names`) and checks that τ can be computed at all,
raising before any optimizer state changes; then it stores τ̃ and reports what it paired in a
:class:`BaseMatch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lightning_sr.optim.names import align_names

__all__ = ["BaseMatch", "pair_with_base"]


@dataclass
class BaseMatch:
    """What :meth:`OnlineMergingOptimizer.set_base` paired: parameter name → base name.

    ``unmatched`` lists trainable parameters with no base counterpart; they get plain AdamW
    updates. ``kept`` / ``dense`` count the stored τ̃ entries against the matched elements.
    ``restored`` lists parameters that had already taken steps (their state came from
    ``load_state_dict``, or training had started) and kept the τ̃ already in the optimizer state
    instead of recomputing τ from trained weights; they are in none of the other fields.
    """

    matched: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    kept: int = 0
    dense: int = 0
    restored: list[str] = field(default_factory=list)


def pair_with_base(
    cls: str, params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], state: Mapping
) -> dict[str, str]:
    """``{parameter name: base name}`` for the trainable ``params`` (name → parameter) of optimizer
    class ``cls`` with optimizer ``state``; names without a counterpart in ``base`` are left out.

    Raises ``ValueError`` if no name matches (with a few names of both sides), if a paired base
    tensor's shape differs from its parameter's, or if a parameter has taken steps without any
    base (τ can no longer be computed from its weights).
    """
    pairs = align_names(params, base)
    if not pairs:
        raise ValueError(
            f"{cls}.set_base: no parameter name matches the base model. Parameters look like "
            f"{list(params)[:3]}, the base has {list(base)[:3]}"
        )
    for name, param in params.items():
        if name in pairs and tuple(base[pairs[name]].shape) != tuple(param.shape):
            raise ValueError(
                f"{cls}.set_base: parameter {name!r} has shape {tuple(param.shape)} but its "
                f"base {pairs[name]!r} has shape {tuple(base[pairs[name]].shape)}"
            )
        entry = state.get(param, {})
        if entry.get("step", 0) > 0 and "tau_idx" not in entry and not entry.get("plain"):
            raise ValueError(
                f"{cls}.set_base: parameter {name!r} has already taken {entry['step']} steps "
                "without a base, so τ = θ_SFT − θ_base can no longer be computed from its "
                "weights. Call set_base before the first step, or on a new optimizer over the "
                "SFT weights."
            )
    return pairs
