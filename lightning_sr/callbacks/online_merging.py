"""OnlineMerging: hand the pre-trained base model to the online merging optimizers at fit start.

OnDARE / OnTIES need τ = θ_SFT − θ_base for every parameter before their first step. This callback
lets any LightningModule adopt them from a config alone: choose ``lightning_sr.optim.OnDARE`` as
the optimizer (a module's injected ``optimizer`` argument, or LightningCLI's own ``--optimizer``,
which replaces a hard-coded ``configure_optimizers``) and add ``OnlineMerging(base_model=...)`` to
the Trainer. At fit start it
loads the base once, calls :meth:`~lightning_sr.optim.OnlineMergingOptimizer.set_base` on every
online merging optimizer of the module (parameters matched by name, module prefixes such as
``policy.`` aligned), and releases the base again.

Outside Lightning (plain PyTorch, Fabric, litgpt, Hugging Face ``Trainer``) or with LightningCLI's
``--optimizer`` alone, the optimizers take the base themselves, ``OnDARE(..., base_model=...)``, and
set it at their first step. The two routes give the same τ̃ and the same updates; with both, this
callback's base is the one used.

On resume the optimizer state from the checkpoint (τ̃, generator state) replaces what is set here,
because Lightning restores optimizer states after ``on_fit_start`` (the base is still loaded, so it
must stay reachable). τ is computed from the weights at fit start: continue a run by resuming from
its checkpoint, not by calling ``fit`` again on the trained module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_sr.lightning_packages import Callback
from lightning_sr.loading import load_weights
from lightning_sr.optim import OnlineMergingOptimizer
from lightning_sr.sharding import check_strategy

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)
rank_zero_info = rank_zero_only(log.info)

__all__ = ["OnlineMerging"]


class OnlineMerging(Callback):
    """Set the base model on every OnDARE / OnTIES optimizer of the LightningModule at fit start.

    Args:
        base_model: the pre-trained model the policy (the SFT model) was fine-tuned from: a hub
            id, a local Hugging Face folder or an embedded name (loaded with
            ``AutoModelForCausalLM``), a Lightning ``.ckpt`` (of the same LightningModule class or
            any other), a ``.safetensors`` file, a ``torch.save`` file of a state dict
            (``.pt``/``.pth``/``.bin``), a ``torch.nn.Module`` or a state dict.
        load_kwargs: extra keyword arguments for ``from_pretrained`` when ``base_model`` is a
            model name or folder (e.g. ``{"revision": "main"}``).

        rename: maps parameter-name prefixes of the LightningModule to the base's, for what the
            name matching cannot pair (a prefix mapped to null trains with plain AdamW); by default
            the optimizer's own ``rename``.

    Parameters are matched to the base by name (the LightningModule names them): identical
    names, else the longest unique dotted suffix of equal shape, with wrappers (``_orig_mod.``,
    FSDP's and activation checkpointing's) ignored. A LightningModule that holds the Hugging Face
    model as ``self.policy`` (names ``policy.model.layers.0...``) matches a base whose names are
    ``model.layers.0...``, and a reward model around the SFT network
    (``model._orig_mod.backbone.transformer...``) matches the SFT checkpoint
    (``model._orig_mod.transformer...``). Parameters without a counterpart (a new head) train
    with plain AdamW and are listed once in the log (and in each optimizer's ``base_match``); if
    nothing matches, or a matched shape differs, fit stops with an error naming the parameters.
    """

    def __init__(
        self,
        base_model: str | nn.Module | dict[str, torch.Tensor],
        load_kwargs: dict[str, Any] | None = None,
        rename: dict[str, str | None] | None = None,
    ):
        super().__init__()
        self.base_model = base_model
        self.load_kwargs = dict(load_kwargs or {})
        self.rename = rename
        self.reports: list = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = [o for o in trainer.optimizers if isinstance(o, OnlineMergingOptimizer)]
        if not optimizers:
            rank_zero_warn(
                "OnlineMerging: the LightningModule has no OnDARE / OnTIES optimizer; nothing to do. "
                "Set its optimizer to lightning_sr.optim.OnDARE or lightning_sr.optim.OnTIES."
            )
            return
        for optimizer in optimizers:
            if optimizer._base["source"] is not None:
                rank_zero_info(
                    f"OnlineMerging: {type(optimizer).__name__} was given its own base_model; the "
                    "callback's base_model is used instead"
                )
        base = load_weights(self.base_model, lazy=True, **self.load_kwargs)
        # Each optimizer logs what it paired (once, on rank 0) and keeps it as ``base_match``.
        try:
            self.reports = [optimizer.set_base(pl_module, base, rename=self.rename) for optimizer in optimizers]
        except ValueError as error:  # a base that does not fit the policy: name the argument that gave it
            raise ValueError(f"OnlineMerging(base_model={self.base_model}): {error}") from None
        del base
