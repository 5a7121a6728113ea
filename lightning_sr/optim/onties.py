"""OnTIES: online TIES merging Adam (Lu et al., arXiv 2405.17931, Eq. 7 as the authors implement it).

Top-k drop and sign consensus: ``Δ̃`` and ``τ̃`` keep their ⌊p·n⌋ largest magnitudes, unscaled,
the elected sign is ``s = sign(τ̃ + Δ̃)`` (+1 at 0) on the *unweighted* terms, and
``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``. The top-k is exact and never a full
sort (:mod:`lightning_sr.optim.sparsify`: a sampled threshold and a chunked candidate pass on the
CPU, ``torch.topk`` on a GPU; over the whole parameter when it is sharded, with the collectives of
all the parameters that merge in a step shared). Δ is computed only at the kept coordinates, and
the sign election finds the overlap of the two sorted index sets with ``searchsorted``, without a
host sync.
"""

from __future__ import annotations

from functools import partial

import torch

from lightning_sr.optim.adam import AdamDelta
from lightning_sr.optim.base import OnlineMergingOptimizer
from lightning_sr.optim.online_merging import arguments_doc
from lightning_sr.optim.shards import local
from lightning_sr.optim.sparsify import TopK, kept_count, magnitude_indices, top_indices_of

__all__ = ["OnTIES"]

_ARGUMENTS = arguments_doc(
    keep_rate="p, the fraction of each tensor's coordinates kept: Δ̃ and τ̃ keep their ⌊p·n⌋ largest "
    "magnitudes, unscaled (a tensor where ⌊p·n⌋ = 0 keeps everything). In [1e-12, 1]; the paper uses 0.01.",
    merge_weight="α in ``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``: {shared} 0 still filters Δ "
    "by the sign election but needs no base model.",
    seed="not used (OnTIES draws no random masks); accepted so that a config can switch between OnDARE "
    "and OnTIES by class name alone.",
)


def _agreeing(values: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``values·[sign(values) = s]`` with the elected sign ``s = +1 if total ≥ 0 else −1``."""
    elected = torch.where(total >= 0, 1.0, -1.0).to(values.dtype)
    return torch.where(torch.sign(values) == elected, values, 0.0)


def _lookup(indices: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The sparse vector (sorted ``indices``, ``values``) at the positions ``query``, 0 where absent.

    One ``searchsorted`` and a select, no boolean indexing: nothing waits for the device.
    """
    if not indices.numel():  # a shard that keeps nothing of this parameter
        return torch.zeros(query.shape, dtype=values.dtype, device=values.device)
    pos = torch.searchsorted(indices, query).clamp_(max=indices.numel() - 1)
    return torch.where(indices[pos] == query, values[pos], 0.0)


def _accumulated_magnitude(adam: AdamDelta, accumulated: torch.Tensor, part: slice) -> torch.Tensor:
    """``|Δ + accumulated|`` at ``part`` of the flat parameter (step-K's merge-step delta)."""
    return adam.dense_at(part).add_(accumulated[part]).abs_()


class OnTIES(OnlineMergingOptimizer):
    __doc__ = f"""Online TIES merging Adam (paper Eq. 7 as the authors implement it): top-k, sign election.

    Per step: ``Δ̃`` keeps the ⌊p·n⌋ largest |Δ| (all of Δ if that is 0), ``τ̃`` likewise once at
    :meth:`set_base`; the sign ``s = sign(τ̃ + Δ̃)`` (+1 where the sum is 0) is elected on the
    unweighted terms, and ``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``. Where τ̃ ≠ 0 the
    SFT direction usually wins the election and disagreeing Adam coordinates are dropped, which
    is what regularizes; this filtering happens even with ``merge_weight=0``. Deterministic: no
    random state. The defaults are the paper's starting values.

{_ARGUMENTS}"""

    def _sparsify_reference(self, tau, state, group, shard):
        idx = magnitude_indices(tau, group["keep_rate"], shard)
        if idx is None:
            return torch.arange(tau.numel(), device=tau.device), tau.clone()
        return idx, tau[idx]

    def _plan(self, params, states, group):
        """Choose the kept coordinates of Δ of every parameter that merges this step, all at
        once (:func:`~lightning_sr.optim.sparsify.top_indices_of`: the sharded ones share one
        set of collectives per step instead of one per parameter). Only the kept coordinates of
        Δ are needed: the ranking is by |Δ| (without step-K, by ``|m| / (√v̂ + eps)``, which ranks
        alike), and Δ is computed there afterwards."""
        selections, owners = [], []
        for param, state in zip(params, states):
            t, shard = state["step"] + 1, self._shard(param)
            k = kept_count(shard.numel, group["keep_rate"])
            if state.get("plain") or t % group["merge_every"] != 0 or k is None:
                continue
            adam, accumulated = AdamDelta.of(state, group, t), state.get("accumulated")
            if accumulated is None:
                magnitude = adam.magnitude
            else:  # |Δ + the accumulated deltas|, as _merge computes it
                magnitude = partial(_accumulated_magnitude, adam, accumulated.view(-1))
            part = local(param)
            selections.append(TopK(magnitude, part.numel(), k, part.device, shard))
            owners.append(id(state))
        self._planned = dict(zip(owners, top_indices_of(selections)))

    def _merge(self, flat, adam, accumulated, state, group, shard):
        alpha = group["merge_weight"]
        top = self._planned.pop(id(state), None)  # None: nothing is dropped from Δ
        if accumulated is None and top is not None:
            delta, values = None, adam.at(top)
        else:
            delta = adam.dense().view(-1)
            if accumulated is not None:
                delta.add_(accumulated.view(-1))
            values = None if top is None else delta[top]
        tau_idx = state["tau_idx"].long() if "tau_idx" in state else None
        tau_val = state.get("tau_val")
        if top is None:  # nothing dropped from Δ
            if tau_idx is not None and tau_idx.numel():
                d = delta[tau_idx]
                delta[tau_idx] = _agreeing(d, d + tau_val)
                if alpha != 0:
                    flat.index_add_(0, tau_idx, _agreeing(tau_val, tau_val + d), alpha=alpha)
            flat.add_(delta, alpha=1 - alpha)
            return
        if tau_idx is not None and tau_idx.numel():
            # Elect where both are kept; elsewhere the other term is 0 and each keeps itself.
            if alpha != 0:
                tau_val = _agreeing(tau_val, tau_val + _lookup(top, values, tau_idx))
            values = _agreeing(values, values + _lookup(tau_idx, state["tau_val"], top))
        flat.index_add_(0, top, values, alpha=1 - alpha)
        if alpha != 0 and tau_idx is not None:
            flat.index_add_(0, tau_idx, tau_val, alpha=alpha)
