"""OfflineMerge: the offline model-merging baselines (linear, DARE, TIES) at the end of fit.

Lu et al. (arXiv 2405.17931) compare online merging with merging *after* training. This callback
does that merge once fit ends, with :func:`lightning_sr.merging.merge_state_dicts` (linear, DARE or
TIES; formulas there).

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
from typing import TYPE_CHECKING, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_sr.lightning_packages import Callback
from lightning_sr.loading import load_tokenizer, load_weights
from lightning_sr.optim.shards import is_sharded
from lightning_sr.merging import MERGE_METHODS, merge_state_dicts

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)

class OfflineMerge(Callback):
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
        if method not in MERGE_METHODS:
            raise ValueError(f"OfflineMerge: method must be one of {MERGE_METHODS}, got {method!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"OfflineMerge: density must be in (0, 1], got {density}")
        self.method, self.weight, self.density, self.seed = method, weight, density, seed
        self.output_dir, self.base_model = output_dir, base_model
        self.saved_to: Path | None = None

    def _target(self, trainer: Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / f"merged-{self.method}"

    @torch.no_grad()
    def merge(self, pl_module: LightningModule) -> nn.Module:
        """The merged model (a new module; the policy is left as trained)."""
        policy, reference = getattr(pl_module, "policy", None), getattr(pl_module, "reference", None)
        if not isinstance(policy, nn.Module) or not isinstance(reference, nn.Module):
            raise TypeError(
                "OfflineMerge needs a module with `policy` and `reference` models, "
                f"got {type(pl_module).__name__}"
            )
        if any(is_sharded(p) for p in policy.parameters()):
            raise RuntimeError(
                "OfflineMerge needs whole models, not FSDP2 shards: export the run's checkpoint "
                "(python -m lightning_sr.export) and merge the exported weights with "
                "lightning_sr.merging.merge_state_dicts"
            )
        policy_state = {k: v.cpu() for k, v in policy.state_dict().items()}
        reference_state = {k: v.cpu() for k, v in reference.state_dict().items()}
        if self.base_model is None:
            anchor, models, weights = reference_state, [policy_state], [self.weight]
        else:
            anchor = load_weights(self.base_model)
            models, weights = [policy_state, reference_state], [self.weight, 1.0 - self.weight]
        merged_state = merge_state_dicts(anchor, models, weights, self.method, self.density, self.seed)
        merged = copy.deepcopy(reference).cpu()
        merged.load_state_dict(merged_state)
        return merged

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
    def _tokenizer(trainer: Trainer, pl_module: LightningModule):
        """The policy's tokenizer, as the module names it (None when it was given as an object)."""
        name = getattr(pl_module, "tokenizer_name_or_path", None)
        return load_tokenizer(name) if name else None
