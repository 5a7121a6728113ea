"""OnlineMerging: hand the pre-trained base model to the online merging optimizers at fit start.

OnDARE / OnTIES need τ = θ_SFT − θ_base for every parameter before their first step. This callback
lets any LightningModule adopt them from a config alone: choose ``lightning_sr.optim.OnDARE`` as
the module's optimizer and add ``OnlineMerging(base_model=...)`` to the Trainer. At fit start it
loads the base once, calls :meth:`~lightning_sr.optim.OnlineMergingOptimizer.set_base` on every
online merging optimizer of the module (parameters matched by name, module prefixes such as
``policy.`` aligned), and releases the base again.

On resume the optimizer state from the checkpoint (τ̃, generator state) replaces what is set here,
because Lightning restores optimizer states after ``on_fit_start`` (the base is still loaded, so it
must stay reachable). τ is computed from the weights at fit start: continue a run by resuming from
its checkpoint, not by calling ``fit`` again on the trained module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_sr.optim.online_merging import OnlineMergingOptimizer

__all__ = ["OnlineMerging", "load_base_state"]


def load_base_state(
    base_model: str | nn.Module | Mapping[str, torch.Tensor], **load_kwargs: Any
) -> Mapping[str, torch.Tensor]:
    """The base model's tensors by name, from a hub id / local path, a module or a state dict.

    A name is resolved with ``lightning_sr.assets.resolve_model`` (embedded defaults) and loaded
    with ``transformers.AutoModelForCausalLM.from_pretrained`` in the checkpoint's own dtype
    (τ is computed in the policy's precision, so nothing is lost by not upcasting here).
    """
    if isinstance(base_model, nn.Module):
        return base_model.state_dict()
    if isinstance(base_model, Mapping):
        return base_model
    if isinstance(base_model, str):
        from lightning_sr.loading import load_causal_lm

        return load_causal_lm(base_model, **{"dtype": "auto", **load_kwargs}).state_dict()
    raise TypeError(
        f"OnlineMerging: base_model must be a model name or path, a torch.nn.Module or a state "
        f"dict, got {type(base_model).__name__}"
    )


class OnlineMerging(Callback):
    """Set the base model on every OnDARE / OnTIES optimizer of the LightningModule at fit start.

    Args:
        base_model: the pre-trained model the policy (the SFT model) was fine-tuned from: a hub
            id or local folder (loaded with ``AutoModelForCausalLM``; the embedded default names
            work too), a ``torch.nn.Module``, or a state dict.
        load_kwargs: extra keyword arguments for ``from_pretrained`` when ``base_model`` is a
            name (e.g. ``{"revision": "main"}``).

    Parameters are matched to the base by name; a LightningModule that holds the Hugging Face
    model as ``self.policy`` (names ``policy.model.layers.0...``) matches a base whose names are
    ``model.layers.0...``. Parameters without a counterpart (a new head) train with plain AdamW
    and are listed once in the log; if nothing matches, or a matched shape differs, fit stops
    with an error naming the parameters.
    """

    def __init__(
        self,
        base_model: str | nn.Module | dict[str, torch.Tensor],
        load_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.base_model = base_model
        self.load_kwargs = dict(load_kwargs or {})
        self.reports: list = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [o for o in trainer.optimizers if isinstance(o, OnlineMergingOptimizer)]
        if not optimizers:
            rank_zero_warn(
                "OnlineMerging: the LightningModule has no OnDARE / OnTIES optimizer; nothing to do. "
                "Set its optimizer to lightning_sr.optim.OnDARE or lightning_sr.optim.OnTIES."
            )
            return
        base = load_base_state(self.base_model, **self.load_kwargs)
        self.reports = [optimizer.set_base(pl_module, base) for optimizer in optimizers]
        del base
        for optimizer, report in zip(optimizers, self.reports):
            kept = f"{report.kept / max(report.dense, 1):.4f}"
            rank_zero_info(
                f"OnlineMerging: {type(optimizer).__name__} merges {len(report.matched)} parameters "
                f"with the base (stored τ̃ keeps {kept} of their elements)"
                + (f"; plain AdamW for {report.unmatched}" if report.unmatched else "")
            )
