"""OfflineMerge: the offline model-merging baselines (linear, DARE, TIES) at the end of fit.

Lu et al. (arXiv 2405.17931) compare online merging with merging *after* training. This callback
does that merge once fit ends: with task vectors ``delta_i = theta_i - anchor`` and weights
``w_i``, the merged model is ``anchor + sum_i w_i * F(delta_i)``, where ``F`` is

- ``linear``: the identity (task arithmetic);
- ``dare``: a Bernoulli(``density``) drop, survivors divided by ``density`` (Yu et al. 2024; the
  1/p rescale of the mergekit version the paper used), one seeded mask per tensor;
- ``ties``: keep the ``floor(density * numel)`` largest magnitudes per tensor (all if that is 0),
  then with several task vectors keep only the entries whose sign agrees with the elected sign
  ``sign(sum_i w_i * F(delta_i))`` (+1 at 0) (Yadav et al. 2023); no renormalisation.

Two set-ups:

- no ``base_model`` (default): anchor = the reference (the SFT model), one task vector
  ``tau = policy - reference`` with weight ``weight``: ``reference + weight * F(tau)``; with
  ``linear`` and ``weight=1`` that is the trained policy itself.
- ``base_model`` given (the paper's set-up): anchor = the pre-trained base, task vectors
  ``policy - base`` (weight ``weight``) and ``reference - base`` (weight ``1 - weight``).

The merged model is written with ``save_pretrained`` (plus the tokenizer when one is known) to
``output_dir`` (default ``<log_dir>/merged-<method>``), on global rank zero only. The policy is not
changed: training results and checkpoints are those of the trained policy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn

log = logging.getLogger(__name__)

METHODS = ("linear", "dare", "ties")


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
    raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")


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
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {METHODS}")
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


class OfflineMerge(pl.Callback):
    """Merge the trained policy with its reference (or base) at the end of fit; save the result.

    Needs a LightningModule with ``policy`` and ``reference`` models (``PreferenceModule``) whose
    models have ``save_pretrained``.

    Args:
        method: ``"linear"``, ``"dare"`` or ``"ties"``.
        weight: weight of the trained policy's task vector.
        density: fraction kept by DARE / TIES (ignored by ``linear``).
        seed: seed of the DARE masks.
        output_dir: where to write the merged model (default ``<log_dir>/merged-<method>``).
        base_model: optional pre-trained base (name or path) to merge onto, as in the paper.
    """

    def __init__(
        self,
        method: Literal["linear", "dare", "ties"] = "linear",
        weight: float = 1.0,
        density: float = 1.0,
        seed: int = 0,
        output_dir: str | None = None,
        base_model: str | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"OfflineMerge: method must be one of {METHODS}, got {method!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"OfflineMerge: density must be in (0, 1], got {density}")
        self.method, self.weight, self.density, self.seed = method, weight, density, seed
        self.output_dir, self.base_model = output_dir, base_model
        self.saved_to: Path | None = None

    def _target(self, trainer: pl.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / f"merged-{self.method}"

    @torch.no_grad()
    def merge(self, pl_module: pl.LightningModule) -> nn.Module:
        """The merged model (a new module; the policy is left as trained)."""
        policy, reference = getattr(pl_module, "policy", None), getattr(pl_module, "reference", None)
        if not isinstance(policy, nn.Module) or not isinstance(reference, nn.Module):
            raise TypeError(
                "OfflineMerge needs a module with `policy` and `reference` models, "
                f"got {type(pl_module).__name__}"
            )
        policy_state = {k: v.cpu() for k, v in policy.state_dict().items()}
        reference_state = {k: v.cpu() for k, v in reference.state_dict().items()}
        if self.base_model is None:
            anchor, models, weights = reference_state, [policy_state], [self.weight]
        else:
            from lightning_sr.loading import load_causal_lm

            base = load_causal_lm(self.base_model, dtype=None)
            anchor = base.state_dict()
            models, weights = [policy_state, reference_state], [self.weight, 1.0 - self.weight]
        merged_state = merge_state_dicts(anchor, models, weights, self.method, self.density, self.seed)
        merged = copy.deepcopy(reference).cpu()
        merged.load_state_dict(merged_state)
        return merged

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        merged = self.merge(pl_module)
        if not hasattr(merged, "save_pretrained"):
            raise TypeError(f"OfflineMerge: {type(merged).__name__} has no save_pretrained()")
        target = self._target(trainer)
        target.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(target)
        tokenizer = self._tokenizer(trainer, pl_module)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        else:
            log.warning("OfflineMerge: no tokenizer known; saved the merged weights without one")
        self.saved_to = target
        log.info("OfflineMerge: wrote the %s-merged model to %s", self.method, target)

    @staticmethod
    def _tokenizer(trainer: pl.Trainer, pl_module: pl.LightningModule):
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if hasattr(tokenizer, "save_pretrained"):
            return tokenizer
        name = tokenizer if isinstance(tokenizer, str) else getattr(pl_module, "tokenizer_name_or_path", None)
        if name:
            from lightning_sr.loading import load_tokenizer

            return load_tokenizer(name)
        return None
