"""SFTModule: supervised fine-tuning of a causal LM on prompt → response examples.

The first stage of the alignment pipeline the online merging paper starts from (Lu et al., arXiv
2405.17931): a pre-trained *base* is fine-tuned into the *SFT* model, and ``tau = SFT - base`` is
what OnDARE / OnTIES later keep during preference training
(:class:`~lightning_sr.modules.preference.PreferenceModule` with ``base_model``).

The loss is the mean negative log-likelihood of the *response* tokens of the batch (``loss_mask``
from :class:`~lightning_sr.data.sft.SFTDataModule`); prompt tokens and padding contribute nothing.
The mean is over tokens, not rows, as in the usual SFT trainers: a long response weighs more than a
short one. Conventions are :class:`PreferenceModule`'s: the model is loaded in ``configure_model``
(cheap to build from a config), the optimizer and scheduler are injected (None is AdamW with
lr 1e-5), fp32 by default, and checkpoints hold only plain data (they load with
``weights_only=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_sr.data.exchanges import check_tokenizer_fits
from lightning_sr.lightning_packages import LightningModule, LRSchedulerCallable, OptimizerCallable
from lightning_sr.loading import load_causal_lm
from lightning_sr.losses import token_logprobs
from lightning_sr.sharding import check_strategy, shard_for_strategy


def response_nll(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
    """``(mean NLL of the response tokens, their count)`` over a padded batch.

    ``loss_mask[:, 0]`` is ignored: the first token has no prefix to predict it from.
    """
    mask = batch["loss_mask"][:, 1:].to(torch.float32)
    tokens = mask.sum()
    if tokens == 0:
        raise ValueError("the batch has no response tokens to learn")
    logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    return -(logps * mask).sum() / tokens, tokens


class SFTModule(LightningModule):
    """Supervised fine-tuning of ``model`` on the response tokens of prompt → response examples.

    Args:
        model: the model to fine-tune (the pre-trained base): hub id, local folder, embedded name
            (``"smollm2-135m-instruct"``) or a model object.
        optimizer: builds the optimizer from the model's trainable parameters (from YAML:
            ``class_path`` + ``init_args``). None is ``torch.optim.AdamW(lr=1e-5)``; None rather
            than an AdamW default so that choosing another class from YAML starts from that
            class's own defaults.
        scheduler: optional learning-rate scheduler, stepped every optimizer step.
        dtype: dtype to load a named model in; fp32 by default (small updates vanish in bf16).
        fsdp_units: under ``ModelParallelStrategy`` (``lightning_sr.FSDP2Strategy``) the model is
            sharded with FSDP2, one unit per submodule of these classes (e.g.
            ``["LlamaDecoderLayer"]``); None is the model's decoder layers, found from the model
            (see :func:`lightning_sr.sharding.shard_units`). Ignored by other strategies.
    """

    def __init__(
        self,
        model: str | nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        dtype: str | None = "float32",
        fsdp_units: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *(["model"] if isinstance(model, nn.Module) else [])])
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dtype_name = dtype
        self.fsdp_units = fsdp_units
        self._spec = model  # not registered as a submodule until configure_model
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None

    @property
    def tokenizer_name_or_path(self) -> str | None:
        """Where the model's tokenizer lives, for the data module (None for a model object)."""
        if isinstance(self._spec, str):
            return self._spec
        return getattr(self._spec, "name_or_path", None) or None

    @override
    def setup(self, stage: str) -> None:
        """Stop before the model loads under a strategy we cannot shard with (FSDP1, DeepSpeed)."""
        check_strategy(self.trainer, type(self).__name__)

    @override
    def configure_model(self) -> None:
        """Load the model (once; later calls do nothing); under ``ModelParallelStrategy`` shard
        it (see ``fsdp_units``)."""
        if self.model is None:
            self.model = load_causal_lm(self._spec, self.dtype_name)
        self.model.train(self.training)  # from_pretrained returns eval mode; Lightning keeps modes
        shard_for_strategy(self, [self.model], self.fsdp_units)

    @override
    def configure_optimizers(self):
        """The injected optimizer (or AdamW) over the model's trainable parameters, and the
        scheduler stepped every optimizer step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer(params) if self.optimizer is not None else torch.optim.AdamW(params, lr=1e-5)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    @override
    def on_fit_start(self) -> None:
        """Stop before the first step when the data's tokenizer has ids past the model's
        embeddings (:func:`~lightning_sr.data.exchanges.check_tokenizer_fits`)."""
        check_tokenizer_fits(self.trainer.datamodule, self.model, "--model.model", self._spec)

    def compute_loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """``(loss, response token count)`` of one batch (see :func:`response_nll`)."""
        return response_nll(self.model, batch)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _ = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, tokens = self.compute_loss(batch)
        # Weighted by the token count, the epoch value is the mean NLL over all validation tokens.
        self.log("val/loss", loss, prog_bar=True, batch_size=int(tokens), sync_dist=True)
