"""PreferenceModule: DPO, IPO or KTO training of a causal LM against a frozen reference.

The optimizer is injected (``OptimizerCallable``), so the same module trains with AdamW or with the
online merging optimizers (OnDARE / OnTIES); when ``base_model`` is given the module hands the
pre-trained base to the optimizer's ``set_base`` itself.

Models named by hub id / local path / embedded default name are loaded in ``configure_model``, not
in ``__init__``, so building the module from a config is cheap. ``reference=None`` makes the
reference a frozen copy of the policy as loaded (the SFT model). The reference is never saved in
checkpoints (it is rebuilt from its name, or from the policy's initial weights, when loading), never
in the optimizer, always in eval mode and run under ``torch.no_grad``.

Batch format (see :mod:`lightning_sr.data.preferences`): ``input_ids`` / ``attention_mask`` /
``loss_mask`` with ``2B`` rows, the ``B`` chosen rows first, then the ``B`` rejected rows, and for
KTO ``kl_*`` rows (prompt ``i`` with another pair's response). KTO uses the pairs as unpaired
examples: every chosen response is desirable, every rejected response undesirable.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy
from typing_extensions import override

from lightning_sr.data.exchanges import check_tokenizer_fits, describe_source
from lightning_sr.lightning_packages import LightningModule, LRSchedulerCallable, OptimizerCallable
from lightning_sr.loading import load_causal_lm, load_weights
from lightning_sr.losses import dpo_loss, ipo_loss, kto_loss, sequence_logprobs
from lightning_sr.sharding import check_strategy, shard_for_strategy

LOSSES = ("dpo", "ipo", "kto")


class PreferenceModule(LightningModule):
    """Preference optimization (DPO / IPO / KTO) of ``policy`` against ``reference``.

    Args:
        policy: the model to train (the SFT model): hub id, local folder, embedded name
            (``"smollm2-135m-instruct"``) or a model object.
        reference: the frozen reference model; ``None`` is a frozen copy of the policy as loaded.
        loss: ``"dpo"``, ``"ipo"`` or ``"kto"`` (formulas in :mod:`lightning_sr.losses`).
        beta: the KL-penalty strength of the loss.
        label_smoothing: DPO's ``eps`` (probability that a preference label is wrong).
        desirable_weight, undesirable_weight: KTO's class weights.
        optimizer: builds the optimizer from the policy's trainable parameters (from YAML:
            ``class_path`` + ``init_args``, e.g. ``lightning_sr.optim.OnDARE``). None is
            ``torch.optim.AdamW(lr=1e-6)``, the paper's DPO learning rate; None rather than an
            AdamW default so that choosing another class from YAML starts from that class's own
            defaults.
        scheduler: optional learning-rate scheduler, stepped every optimizer step.
        base_model: the pre-trained base the SFT model was fine-tuned from (name, path or model);
            when set, ``optimizer.set_base(policy, base)`` is called in ``configure_optimizers`` so
            an online merging optimizer gets its reference delta ``tau = SFT - base``.
        dtype: dtype to load named models in; fp32 by default because updates of size ``lr``
            (and OnDARE's ``alpha * tau``) vanish in bf16 weights.
        fsdp_units: under ``ModelParallelStrategy`` (``lightning_sr.FSDP2Strategy``) the policy
            and the reference are sharded with FSDP2, one unit per submodule of these classes
            (e.g. ``["LlamaDecoderLayer"]``); None is the model's decoder layers, found from the
            model (see :func:`lightning_sr.sharding.shard_units`). Ignored by other strategies.
    """

    def __init__(
        self,
        policy: str | nn.Module,
        reference: str | nn.Module | None = None,
        loss: Literal["dpo", "ipo", "kto"] = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        base_model: str | nn.Module | None = None,
        dtype: str | None = "float32",
        fsdp_units: list[str] | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        objects = [n for n, v in (("policy", policy), ("reference", reference), ("base_model", base_model))
                   if isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *objects])
        self.loss_name = loss
        self.beta, self.label_smoothing = beta, label_smoothing
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dtype_name = dtype
        self.fsdp_units = fsdp_units
        # A plain dict, so that model objects given here are not registered as submodules
        # (they would be saved in checkpoints and moved to the device a second time).
        self._specs = {"policy": policy, "reference": reference, "base": base_model}
        self.policy: nn.Module | None = policy if isinstance(policy, nn.Module) else None
        self._frozen: dict[str, nn.Module] = {}  # the reference: outside the module tree, see below
        self.train_accuracy = BinaryAccuracy()
        self.val_accuracy = BinaryAccuracy()

    # ------------------------------------------------------------------ models
    @property
    def tokenizer_name_or_path(self) -> str | None:
        """Where the policy's tokenizer lives, for the data module (None for a model object)."""
        if isinstance(self._specs["policy"], str):
            return self._specs["policy"]
        path = getattr(self._specs["policy"], "name_or_path", None)
        return path or None

    @override
    def setup(self, stage: str) -> None:
        """Stop before any model loads under a strategy we cannot shard with (FSDP1, DeepSpeed)."""
        check_strategy(self.trainer, type(self).__name__)

    @override
    def configure_model(self) -> None:
        """Load the policy and build the frozen reference (once; later calls do nothing); under
        ``ModelParallelStrategy`` shard both (see ``fsdp_units``)."""
        if self.policy is None:
            self.policy = load_causal_lm(self._specs["policy"], self.dtype_name)
        self.policy.train(self.training)  # from_pretrained returns eval mode; Lightning keeps modes
        if self.reference is None:
            if self._specs["reference"] is None:
                reference = copy.deepcopy(self.policy)
            elif isinstance(self._specs["reference"], str):
                reference = load_causal_lm(self._specs["reference"], self.dtype_name)
            else:
                reference = self._specs["reference"]
            self._frozen["reference"] = reference.requires_grad_(False).eval().to(self.device)
        shard_for_strategy(self, [self.policy, self.reference], self.fsdp_units)

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model, or None before ``configure_model``.

        It is kept outside the module tree, so it is never in a checkpoint, in the optimizer, in
        ``train()`` (it stays in eval mode: no dropout) or in Lightning's parameter counts; it
        follows the module's device and dtype moves (``_apply``).
        """
        return self._frozen.get("reference")

    @override
    def _apply(self, fn, *args, **kwargs):
        """``torch.nn.Module._apply`` (``to``, ``cuda``, ``half``, ...), also on the reference."""
        super()._apply(fn, *args, **kwargs)
        if self.reference is not None:
            self.reference._apply(fn, *args, **kwargs)
        return self

    def _base(self) -> nn.Module:
        spec = self._specs["base"]
        if isinstance(spec, nn.Module):
            return spec
        if spec == self._specs["policy"] and self._specs["reference"] is None:
            return self.reference  # the policy as loaded, already in memory (and sharded like it)
        return load_weights(spec, lazy=True)  # read lazily where it can be: set_base takes one tensor (shard) at a time

    @override
    def configure_optimizers(self):
        """The injected optimizer (or AdamW) over the policy's trainable parameters, given the
        base model when ``base_model`` is set, and the scheduler stepped every optimizer step."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer(params) if self.optimizer is not None else torch.optim.AdamW(params, lr=1e-6)
        if self._specs["base"] is not None:
            if not callable(getattr(optimizer, "set_base", None)):
                raise TypeError(
                    f"base_model is set but the optimizer {type(optimizer).__name__} has no set_base(); "
                    "use an online merging optimizer (lightning_sr.optim.OnDARE / OnTIES) or drop base_model"
                )
            base = self._base()
            try:
                optimizer.set_base(self.policy, base)
            except ValueError as error:  # a base that does not fit the policy: name the option
                raise ValueError(f"--model.base_model={describe_source(self._specs['base'])}: {error}") from None
        if self.scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @override
    def on_fit_start(self) -> None:
        """Stop before the first step when the data's tokenizer has ids past the policy's
        embeddings (:func:`~lightning_sr.data.exchanges.check_tokenizer_fits`)."""
        check_tokenizer_fits(self.trainer.datamodule, self.policy, "--model.policy", self._specs["policy"])

    # ------------------------------------------------------------------ steps
    def _logps(self, model: nn.Module, batch: dict, prefix: str = "") -> Tensor:
        return sequence_logprobs(
            model,
            batch[f"{prefix}input_ids"],
            batch[f"{prefix}attention_mask"],
            batch[f"{prefix}loss_mask"],
            average=self.loss_name == "ipo",
        )

    def compute_loss(self, batch: dict) -> dict[str, Tensor]:
        """Loss and per-pair implicit rewards for one batch (one forward per model over 2B rows)."""
        pairs = batch["input_ids"].shape[0] // 2
        policy_logps = self._logps(self.policy, batch)
        with torch.no_grad():
            ref_logps = self._logps(self.reference, batch)
        extra = {}
        if self.loss_name == "kto":
            with torch.no_grad():
                policy_kl = self._logps(self.policy, batch, "kl_")
                ref_kl = self._logps(self.reference, batch, "kl_")
            desirable = torch.arange(2 * pairs, device=policy_logps.device) < pairs
            out = kto_loss(
                policy_logps, ref_logps, desirable, policy_kl, ref_kl,
                self.beta, self.desirable_weight, self.undesirable_weight,
            )
            losses, chosen_rewards, rejected_rewards = out.losses, out.rewards[:pairs], out.rewards[pairs:]
            extra["kl"] = out.kl
        else:
            policy_c, policy_r = policy_logps[:pairs], policy_logps[pairs:]
            args = (policy_c, policy_r, ref_logps[:pairs], ref_logps[pairs:], self.beta)
            if self.loss_name == "dpo":
                out = dpo_loss(*args, label_smoothing=self.label_smoothing)
            else:
                out = ipo_loss(*args)
            losses, chosen_rewards, rejected_rewards = out
        return {
            "loss": losses.mean(),
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            **extra,
        }

    def _shared_step(self, batch: dict, stage: str) -> Tensor:
        out = self.compute_loss(batch)
        chosen, rejected = out["chosen_rewards"], out["rejected_rewards"]
        margin = chosen - rejected
        accuracy = self.train_accuracy if stage == "train" else self.val_accuracy
        accuracy(margin > 0, torch.ones_like(margin, dtype=torch.long))
        # Values averaged over the processes (one small all-reduce each), so that the logged loss
        # of a data-parallel or sharded run is that of its global batch.
        log = partial(self.log, batch_size=margin.shape[0], sync_dist=True)
        log(f"{stage}/loss", out["loss"], prog_bar=True)
        log(f"{stage}/rewards_chosen", chosen.mean())
        log(f"{stage}/rewards_rejected", rejected.mean())
        log(f"{stage}/margin", margin.mean(), prog_bar=True)
        log(f"{stage}/accuracy", accuracy)
        if "kl" in out:
            log(f"{stage}/kl", out["kl"])
        return out["loss"]

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

