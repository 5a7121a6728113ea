"""OnDARE: online DARE merging Adam (Lu et al., arXiv 2405.17931, Eq. 3).

Random drop, rescale by 1/p, linear merge: ``Δ̃ = Δ ⊙ M_t / p`` with a fresh Bernoulli(p) mask
M_t every step, ``τ̃ = τ ⊙ M_0 / p`` with a mask drawn once at ``set_base``, and
``θ ← θ + (1 − α)·Δ̃ + α·τ̃``. The masks come from the parameter's own random stream
(:class:`~lightning_sr.optim.base.OnlineMergingOptimizer` keeps it in the optimizer state);
on the CPU the kept set is drawn as indices (O(p·n) work, Δ computed only there), on a GPU as a
dense mask on the device (one kernel, no host round trip), both over the whole parameter even
when it is sharded (:mod:`lightning_sr.optim.sparsify`).
"""

from __future__ import annotations

import torch

from lightning_sr.optim.base import OnlineMergingOptimizer
from lightning_sr.optim.online_merging import arguments_doc, extended_signature
from lightning_sr.optim.sparsify import shard_bernoulli_indices, shard_bernoulli_mask

__all__ = ["OnDARE"]

_ARGUMENTS = arguments_doc(
    keep_rate="p, the probability that a coordinate of Δ (fresh mask every step) or of τ (one mask, drawn "
    "at ``set_base``) is kept; kept values are rescaled by 1/p. In [1e-12, 1]; the paper uses 0.01 and "
    "is robust down to about 5e-4.",
    merge_weight="α in ``θ ← θ + (1 − α)·Δ̃ + α·τ̃``: {shared} 0 needs no base model.",
    seed="seeds the masks; each parameter's stream starts from ``seed`` and its position, on a generator "
    "on the parameter's device, so every data-parallel rank draws the same masks. Its state is "
    "checkpointed.",
    clamp_reference="clamp τ̃ to [−1, 1] after rescaling, ``τ̃ = clamp(τ ⊙ M_0 / p, −1, 1)``, as the "
    "authors' code does. Off by default; turn it on to reproduce their runs.",
)


class OnDARE(OnlineMergingOptimizer):
    __doc__ = f"""Online DARE merging Adam (paper Eq. 3): random drop, rescale by 1/p, linear merge.

    Per step: ``Δ̃ = Δ ⊙ M_t / p`` (M_t a fresh Bernoulli(p) mask, only ~p·n coordinates move),
    ``θ ← θ + (1 − α)·Δ̃ + α·τ̃`` with ``τ̃ = τ ⊙ M_0 / p`` fixed at :meth:`set_base`. The Adam
    moments are updated densely every step. The defaults are the paper's starting values. With
    ``keep_rate=1, merge_weight=0`` this is exactly ``torch.optim.AdamW``.

{_ARGUMENTS}"""

    _uses_rng = True

    def __init__(self, params, *args, clamp_reference: bool = False, **kwargs):
        # OnlineMergingOptimizer's one signature plus clamp_reference (keyword-only), which joins
        # the param groups' defaults after the shared hyperparameters.
        self._extra_defaults = {"clamp_reference": clamp_reference}
        super().__init__(params, *args, **kwargs)

    __init__.__signature__ = extended_signature(OnlineMergingOptimizer.__init__, clamp_reference=(bool, False))

    @staticmethod
    def _draws_indices(device: torch.device) -> bool:
        """Whether masks on ``device`` are drawn as kept indices (the CPU: O(p·n) work) rather
        than as a dense mask on the device (GPUs: one kernel, no host round trip)."""
        return device.type == "cpu"

    def _sparsify_reference(self, tau, state, group, shard):
        p = group["keep_rate"]
        if p >= 1:
            idx = torch.arange(tau.numel(), device=tau.device)
        elif self._draws_indices(tau.device):
            idx = self._draw(state, tau.device, shard_bernoulli_indices, shard, tau.numel(), p)
        else:  # once per parameter, so the host sync of nonzero() does not matter
            idx = self._draw(state, tau.device, shard_bernoulli_mask, shard, tau.numel(), p).nonzero().squeeze(1)
        values = tau[idx] / p
        clamp = group.get("clamp_reference", False)  # absent from checkpoints of older versions
        return idx, values.clamp_(-1.0, 1.0) if clamp else values

    def _merge(self, flat, adam, accumulated, state, group, shard):
        p, alpha = group["keep_rate"], group["merge_weight"]
        if p < 1 and self._draws_indices(flat.device):  # Δ only at the ~p·n kept coordinates
            idx = self._draw(state, flat.device, shard_bernoulli_indices, shard, flat.numel(), p)
            delta = adam.at(idx)
            if accumulated is not None:
                delta.add_(accumulated.view(-1)[idx])
            flat.index_add_(0, idx, delta, alpha=(1 - alpha) / p)
        else:  # dense Δ, masked on the device: no index generation, no host round trip
            delta = adam.dense().view(-1)
            if accumulated is not None:
                delta.add_(accumulated.view(-1))
            if p < 1:
                mask = self._draw(state, flat.device, shard_bernoulli_mask, shard, flat.numel(), p)
                flat.addcmul_(delta, mask, value=(1 - alpha) / p)
            else:
                flat.add_(delta, alpha=1 - alpha)
        if alpha != 0 and "tau_idx" in state:
            flat.index_add_(0, state["tau_idx"], state["tau_val"], alpha=alpha)
