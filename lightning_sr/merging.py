"""Offline model merging of state dicts: linear (task arithmetic), DARE and TIES.

The baselines Lu et al. (arXiv 2405.17931) compare online merging with, applied once after
training. With task vectors ``delta_i = theta_i - anchor`` and weights ``w_i`` the merged model is
``anchor + sum_i w_i * F(delta_i)``, where ``F`` is

- ``linear``: the identity (task arithmetic);
- ``dare``: a Bernoulli(``density``) drop, survivors divided by ``density`` (Yu et al. 2024; the
  1/p rescale of the mergekit version the paper used), one seeded mask per tensor;
- ``ties``: keep the ``floor(density * numel)`` largest magnitudes per tensor (all if that is 0),
  then with several task vectors keep only the entries whose sign agrees with the elected sign
  ``sign(sum_i w_i * F(delta_i))`` (+1 at 0) (Yadav et al. 2023). Unlike mergekit's default TIES,
  the sum is not renormalised by the weights of the agreeing entries (the paper's set-up).

Pure PyTorch: no Lightning, no transformers (:class:`lightning_sr.callbacks.OfflineMerge` runs it at
the end of fit).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MERGE_METHODS", "sparsify", "merge_state_dicts"]

MERGE_METHODS = ("linear", "dare", "ties")
"""The offline merge methods ``F`` (module docstring): the values of ``method`` here and of
:class:`~lightning_sr.callbacks.OfflineMerge`'s ``method``."""


def sparsify(delta: Tensor, method: str, density: float, generator: torch.Generator | None = None) -> Tensor:
    """``F(delta)`` for one tensor (see the module docstring)."""
    if method == "linear" or density >= 1.0:
        return delta
    if method == "dare":
        keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
        return torch.where(keep.to(delta.device), delta / density, torch.zeros_like(delta))
    if method == "ties":
        k = int(density * delta.numel())
        if k < 1:
            return delta
        flat = delta.reshape(-1)
        kept = torch.zeros_like(flat)
        idx = flat.abs().topk(k).indices
        kept[idx] = flat[idx]
        return kept.view_as(delta)
    raise ValueError(f"unknown merge method {method!r}; choose one of {MERGE_METHODS}")


def merge_state_dicts(
    anchor: dict[str, Tensor],
    models: list[dict[str, Tensor]],
    weights: list[float],
    method: str = "linear",
    density: float = 1.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """``anchor + sum_i w_i * F(model_i - anchor)`` per floating tensor; other tensors from ``anchor``.

    Raises ``KeyError`` / ``ValueError`` naming the tensor when a model lacks it or its shape differs.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {MERGE_METHODS}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name, anchor_t in anchor.items():
        if not anchor_t.is_floating_point():
            merged[name] = anchor_t.clone()
            continue
        deltas = []
        for i, state in enumerate(models):
            if name not in state:
                raise KeyError(f"merge: model #{i} has no tensor {name!r}")
            if state[name].shape != anchor_t.shape:
                raise ValueError(
                    f"merge: tensor {name!r} has shape {tuple(state[name].shape)} in model #{i} "
                    f"but {tuple(anchor_t.shape)} in the anchor"
                )
            delta = state[name].detach().float() - anchor_t.detach().float()
            deltas.append(weights[i] * sparsify(delta, method, density, generator))
        total = torch.stack(deltas).sum(0)
        if method == "ties" and len(deltas) > 1:
            elected = torch.where(total >= 0, 1.0, -1.0)
            total = sum(torch.where(torch.sign(d) == elected, d, torch.zeros_like(d)) for d in deltas)
        merged[name] = (anchor_t.float() + total).to(anchor_t.dtype)
    return merged
