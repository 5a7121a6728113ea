"""What OnDARE and OnTIES share: the one signature, the state, ``set_base``, ``step`` and step-K.

:class:`OnlineMergingOptimizer` is the whole optimizer except two decisions, which each subclass
makes (:mod:`.ondare`, :mod:`.onties`): how the reference delta τ = θ_SFT − θ_base is sparsified
once (``_sparsify_reference``, at :meth:`~OnlineMergingOptimizer.set_base`) and how a step's Adam
delta Δ is sparsified and merged with τ̃ (``_merge``; the paper's Eq. 2, θ ← θ + F(Δ) ⊕ F(τ)).
Everything else is here:

- the one signature (``lr`` ... ``seed``, documented in :data:`.online_merging.ARGUMENTS`) and
  the validation of every param group as it is added;
- the per-parameter state, created on first use (:mod:`.adam`'s moments, an fp32 master copy of
  half-precision parameters, OnDARE's random stream, step-K's buffer), and its checkpointed form
  (:mod:`.state_dict`);
- ``set_base``: pairing the parameters with the base (:mod:`.reference`: by name through
  :mod:`.names`, or by position for bare parameters) and storing τ̃; or, with ``base_model``
  given at construction, the same at the first ``step`` (:meth:`~OnlineMergingOptimizer._base_at_first_step`);
- ``step``: the AdamW moments and decay of a param group with foreach kernels, then per
  parameter a plain, an accumulated or a merging update. Step-K (``merge_every=K``, the paper's
  Alg. 2) is the few lines of ``_update`` that accumulate K − 1 plain Adam steps and roll them
  back before the merge, so it stays with the update rather than in a module of its own.

At about 500 lines this module is over the project's 400-line guide, knowingly: it is one state
machine (a parameter's state is created, checkpointed, given its τ̃ and stepped here), and
splitting it would spread one parameter's state over several modules. The pieces without state
live apart: pairing (:mod:`.reference`, :mod:`.names`), the Adam math (:mod:`.adam`), the saved
form (:mod:`.state_dict`), the sparsifiers (:mod:`.sparsify`), the shards (:mod:`.shards`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_sr.optim.adam import AdamDelta, update_moments
from lightning_sr.optim.online_merging import arguments_doc, check_hyperparameters, log
from lightning_sr.optim.reference import BaseMatch, load_base, ordered_base, pair_by_position, pair_with_base
from lightning_sr.optim.shards import FlatShard, base_part, flat_shard, is_sharded, local
from lightning_sr.optim.sparsify import index_dtype
from lightning_sr.optim.state_dict import restored_entry, saved_entry

__all__ = ["OnlineMergingOptimizer", "extended_signature"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def extended_signature(init, **extra: tuple[object, object]) -> inspect.Signature:
    """``init``'s signature followed by the keyword-only arguments ``extra`` (``name=(annotation,
    default)``): how a subclass adds its own hyperparameters to the one signature (OnDARE's
    ``clamp_reference``), for ``inspect.signature`` and so for LightningCLI."""
    signature = inspect.signature(init, eval_str=True)
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in extra.items()
    ]
    return signature.replace(parameters=[*signature.parameters.values(), *added])


class OnlineMergingOptimizer(Optimizer):
    __doc__ = f"""Shared machinery of :class:`OnDARE` and :class:`OnTIES`: Adam moments, state, step-K.

    Both take this signature, OnDARE one more argument. Subclasses define how the reference delta
    is sparsified once (``_sparsify_reference``) and how a step's delta is merged with it
    (``_merge``); one that adds hyperparameters sets ``_extra_defaults`` before calling this
    ``__init__`` and publishes them with :func:`extended_signature`. Every param group's
    hyperparameters are validated when it is added.

    Where the base model comes from: ``base_model`` here (any training loop: plain PyTorch,
    Fabric, litgpt, LightningCLI's ``--optimizer``, Hugging Face ``Trainer``; τ is computed at the
    first :meth:`step`), or :meth:`set_base` (what the ``OnlineMerging`` callback calls at fit
    start). Parameters given with names (``model.named_parameters()``, or param groups of
    ``(name, parameter)`` pairs: torch's named param groups) are matched with the base by name,
    bare ones (``model.parameters()``) by position. :attr:`base_match` reports what was paired.

{arguments_doc()}"""

    _uses_rng = False
    _extra_defaults: dict = {}  # a subclass's own hyperparameters (name → value), after the shared ones

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        keep_rate: float = 0.01,
        merge_weight: float = 1e-7,
        merge_every: int = 1,
        seed: int = 0,
        *,
        base_model: str | nn.Module | dict[str, torch.Tensor] | None = None,
        base_load_kwargs: dict[str, Any] | None = None,
        rename: dict[str, str | None] | None = None,
    ):
        hyperparameters = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, keep_rate=keep_rate,
            merge_weight=merge_weight, merge_every=merge_every, seed=seed,
        )
        if isinstance(base_model, os.PathLike):
            base_model = os.fspath(base_model)
        # Not hyperparameters of the param groups: a state dict or module does not belong in
        # state_dict()'s param_groups, and a resumed run needs none of them (τ̃ is in the state).
        # One dict, mutated in place and never rebound: a wrapper holding a copy of this
        # ``__dict__`` (as Fabric's optimizer wrapper once did) still sees what the first step
        # records here (``base_match``).
        self._base: dict[str, Any] = {"source": base_model, "load_kwargs": dict(base_load_kwargs or {}), "match": None}
        self.rename = dict(rename or {})
        super().__init__(params, {**hyperparameters, **self._extra_defaults})
        self._generators: dict[torch.device, torch.Generator] = {}
        self._shards: dict[int, FlatShard] = {}
        self._planned: dict[int, torch.Tensor] = {}  # this step's kept indices of Δ, by state (OnTIES)
        self._create_sharded_state()

    @property
    def base_match(self) -> BaseMatch | None:
        """What the last :meth:`set_base` paired (also at the first step, from ``base_model``):
        the pairs, the parameters left as plain AdamW and why; None before any base is set."""
        return self._base["match"]

    def __getstate__(self) -> dict:  # torch's own fields, and where the base comes from
        return {**super().__getstate__(), "_base": self._base, "rename": self.rename}

    def __setstate__(self, state: dict) -> None:  # copy / pickle keep only the fields above
        super().__setstate__(state)
        self._generators, self._shards, self._planned = {}, {}, {}
        self.__dict__.setdefault("_base", {"source": None, "load_kwargs": {}, "match": None})
        self.__dict__.setdefault("rename", {})

    def add_param_group(self, param_group: dict) -> None:
        """Validate and add a param group; ``(name, parameter)`` pairs become torch's named group
        (``params`` and ``param_names``) on any torch version, so the names can pair with the
        base's."""
        check_hyperparameters(type(self).__name__, {**self.defaults, **param_group})
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
            param_group = {**param_group, "params": [p for _, p in params], "param_names": [n for n, _ in params]}
        elif any(isinstance(p, tuple) for p in params):
            raise ValueError(
                f"{type(self).__name__}: a param group mixes (name, parameter) pairs with bare parameters"
            )
        else:
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)
        if hasattr(self, "_shards"):  # a group added after construction
            self._create_sharded_state()

    def _create_sharded_state(self) -> None:
        """Create the state of sharded (``DTensor``) parameters now, not at their first step.

        torch's distributed checkpointing (which Lightning's ``ModelParallelStrategy`` uses)
        fills the state it finds: a state that does not exist yet is made by a fake step at
        lr 0, which would merge τ̃ into the weights and count a step.
        """
        positions = self._positions()
        for group in self.param_groups:
            for param in group["params"]:
                if param.requires_grad and is_sharded(param):
                    self._state_for(param, group, positions[id(param)])

    # ---------------------------------------------------------------- state ----------------------

    def _positions(self) -> dict[int, int]:
        """Each parameter's position over all groups (the index ``state_dict`` uses)."""
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        return {id(p): i for i, p in enumerate(params)}

    def _shard(self, param: torch.Tensor) -> FlatShard:
        """Where the parameter's local elements sit in the whole flattened parameter (cached)."""
        if id(param) not in self._shards:
            self._shards[id(param)] = flat_shard(param)
        return self._shards[id(param)]

    def _state_for(self, param: torch.Tensor, group: dict, position: int) -> dict:
        """The parameter's state, created on first use: moments, fp32 master, generator, step-K.

        Every tensor in it has the shape of the parameter's local part (its shard under FSDP2).
        """
        state = self.state[param]
        if "step" in state:
            return state
        part = local(param)
        work_dtype = torch.float32 if part.dtype in _LOW_PRECISION else part.dtype
        state["step"] = 0
        state["exp_avg"] = torch.zeros(part.shape, dtype=work_dtype, device=part.device)
        state["exp_avg_sq"] = torch.zeros(part.shape, dtype=work_dtype, device=part.device)
        if part.dtype != work_dtype or not part.is_contiguous():
            state["master"] = part.detach().to(work_dtype, copy=True).contiguous()
        if group["merge_every"] > 1:
            state["accumulated"] = torch.zeros(part.shape, dtype=work_dtype, device=part.device)
        if self._uses_rng:
            self._seed(state, group, position, part.device)
        return state

    @staticmethod
    def _weight(param: torch.Tensor, state: dict) -> torch.Tensor:
        """The tensor the update is applied to: the fp32 master copy if there is one (refreshed
        from the parameter until the first step, so weights loaded after construction count),
        else the parameter's local part."""
        if "master" not in state:
            return local(param)
        if state["step"] == 0:
            state["master"].copy_(local(param))
        return state["master"]

    def _generator(self, device: torch.device) -> torch.Generator:
        """This optimizer's generator on ``device``; each parameter's stream is its saved state."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _seed(self, state: dict, group: dict, position: int, device: torch.device) -> None:
        """Start the parameter's stream from ``seed`` and its position: the same on every rank."""
        generator = self._generator(device).manual_seed(group["seed"] * 1_000_003 + position)
        state["rng_state"] = generator.get_state()

    def _draw(self, state: dict, device: torch.device, fn, *args):
        """Run ``fn(*args, generator)`` on the parameter's stream (on ``device``) and save it back."""
        generator = self._generator(device)
        generator.set_state(state["rng_state"])
        out = fn(*args, generator)
        state["rng_state"] = generator.get_state()
        return out

    def _has_base(self) -> bool:
        return any("tau_idx" in s for s in self.state.values())

    def state_dict(self) -> dict:
        """torch's optimizer state dict; a sharded parameter's state is given as ``DTensor`` s.

        Its moments, master copy and step-K buffer are wrapped (no copy) in the parameter's own
        layout, and τ̃ is given densely in that layout (``tau``, zeros where nothing is kept,
        with ``has_tau`` saying whether a base was set), so that torch's distributed checkpoint
        saves every rank's part and loads it back on any number of ranks. The mask generator's
        state and the step are the same on every rank. Unsharded parameters keep τ̃ sparse
        (``tau_idx``, ``tau_val``). The conversions are :mod:`.state_dict`'s.
        """
        saved = super().state_dict()
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for index, param in enumerate(params):
            if index in saved["state"]:
                saved["state"][index] = saved_entry(param, saved["state"][index])
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``, keeping each tensor's own dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor, and the
        integer ones too, to the parameter's dtype: that would round τ̃'s int32 indices,
        corrupt the generator state and turn fp32 masters of bf16 parameters into bf16. Here the
        tensors are only moved to the parameter's device (the generator state, a byte tensor
        for the generator on the parameter's device, stays on the CPU where torch keeps it).
        ``DTensor`` values (the sharded form of :meth:`state_dict`) are laid out like their
        parameter and replaced by their local part; a dense ``tau`` becomes sparse again.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in saved_state:
                self.state[param] = restored_entry(param, saved_state[saved_id])

    # ---------------------------------------------------------------- base -----------------------

    @torch.no_grad()
    def set_base(
        self,
        model: nn.Module | None,
        base: nn.Module | Mapping[str, torch.Tensor],
        rename: Mapping[str, str | None] | None = None,
    ) -> BaseMatch:
        """Compute and store the sparsified reference delta τ̃ from the base model.

        ``model`` is the module whose parameters this optimizer holds: it names them (a
        LightningModule wrapping the policy works; prefixes, inner segments and wrappers are
        aligned by :func:`~lightning_sr.optim.names.match_names`, the longest unique dotted
        suffix of equal shape). ``None`` uses the optimizer's own names (built from
        ``model.named_parameters()``), or pairs bare parameters by position with the base's
        tensors in module order (:func:`~lightning_sr.optim.reference.pair_by_position`, every
        shape checked). ``base`` is the pre-trained model the policy was fine-tuned from, as a
        module or a state dict. ``rename`` (default: the optimizer's ``rename``) maps name
        prefixes the matching cannot pair to the base's, or to None for plain AdamW.

        For each trainable parameter τ = current value − base value (the policy starts at the
        SFT weights, so this is τ_r = θ_SFT − θ_base), sparsified once and stored as kept
        indices and values. Parameters without a base counterpart get plain AdamW updates (they
        are listed, with the reason, in the returned :class:`BaseMatch`, which is also
        :attr:`base_match` and logged once); a shape mismatch raises ``ValueError`` naming the
        parameter, before any state changes. Frozen parameters are skipped. A ``base_model``
        given at construction and not used yet is replaced by this base.

        τ must come from the weights *before* training. A parameter that has already taken steps
        keeps the τ̃ in the optimizer state, so calling ``set_base`` after ``load_state_dict``
        resumes with the checkpoint's τ̃; such parameters are listed in ``BaseMatch.restored``
        and logged. (Lightning's order, ``set_base`` at fit start on a fresh optimizer and then
        ``load_state_dict``, needs no such care: the loaded state replaces what was set.) A
        parameter that has taken steps without any base is an error.

        Sharded (FSDP2) parameters: each rank computes τ on its own shard only, from the rows of
        the base that the shard covers, and keeps the part of the whole parameter's τ̃ that falls
        there. The base's values may be whole tensors, ``DTensor`` s (a base sharded like the
        policy is read locally, with no communication), or lazily read tensors
        (:func:`lightning_sr.loading.load_weights` of a ``.safetensors`` file or a Hugging Face
        folder reads only those rows), so no rank needs the whole base in memory at once.
        """
        cls = type(self).__name__
        positions = self._positions()
        rename = self.rename if rename is None else dict(rename)
        labels = self._labels(model)
        if labels is None:  # bare parameters: the i-th parameter with the base's i-th tensor
            ordered = ordered_base(base)
            params = list(chain.from_iterable(g["params"] for g in self.param_groups))
            by_position, unpaired = pair_by_position(cls, params, ordered, self.state)
            labels = {id(p): f"#{i}" for i, p in enumerate(params)}
            base_tensors = dict(ordered)
            pairs = {f"#{i}": name for i, name in by_position.items()}
            reasons = {f"#{i}": why for i, why in unpaired.items()}
            by = "position"
        else:
            base_tensors = base.state_dict() if isinstance(base, nn.Module) else base
            trainable = {labels[id(p)]: p for g in self.param_groups for p in g["params"] if p.requires_grad}
            pairs, reasons = pair_with_base(cls, trainable, base_tensors, self.state, rename)
            by = "name"
        self._base["source"] = None  # this base replaces one given at construction
        entries = [(g, p, labels[id(p)]) for g in self.param_groups for p in g["params"] if p.requires_grad]
        report = BaseMatch(by=by)
        for group, param, name in entries:
            state = self._state_for(param, group, positions[id(param)])
            if state["step"] > 0:  # trained: keep the stored τ̃ (or plain AdamW) as it is
                report.restored.append(name)
                continue
            state.pop("tau_idx", None)
            state.pop("tau_val", None)
            if name not in pairs:  # no counterpart in the base: plain AdamW from now on
                state["plain"] = True
                state.pop("accumulated", None)
                report.unmatched.append(name)
                report.reasons[name] = reasons.get(name, "no counterpart in the base")
                continue
            state.pop("plain", None)
            if self._uses_rng:  # M₀ from the start of the stream, however often set_base is called
                self._seed(state, group, positions[id(param)], param.device)
            current = self._weight(param, state).detach()
            base_values = base_part(base_tensors[pairs[name]], param, self._shard(param))
            tau = current - base_values.to(device=current.device, dtype=current.dtype)
            idx, values = self._sparsify_reference(tau.reshape(-1), state, group, self._shard(param))
            nonzero = values != 0
            state["tau_idx"] = idx[nonzero].to(device=param.device, dtype=index_dtype(tau.numel()))
            state["tau_val"] = values[nonzero].contiguous()
            report.matched[name] = pairs[name]
            report.kept += int(nonzero.sum())
            report.dense += tau.numel()
        if report.restored:
            log.warning(
                "%s.set_base: %d parameters have already taken steps (state from load_state_dict, "
                "or training had started); they keep the reference delta τ̃ stored in the optimizer "
                "state instead of recomputing it from trained weights. Build a new optimizer to "
                "start over from another base.",
                cls,
                len(report.restored),
            )
        self._base["match"] = report
        if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
            log.info("%s", report.summary(cls))
        return report

    def _labels(self, model: nn.Module | None) -> dict[int, str] | None:
        """Each parameter's name (by ``id``): from ``model``, else from the optimizer's named
        param groups; None when the parameters are bare (they pair by position)."""
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            for i, param in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)):
                if id(param) not in names:
                    raise ValueError(
                        f"{type(self).__name__}.set_base: parameter #{i} of shape {tuple(param.shape)} "
                        "is not a parameter of the given model; pass the module whose parameters the "
                        "optimizer was built from"
                    )
            return names
        if self.param_groups and all("param_names" in g for g in self.param_groups):
            return {id(p): n for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}
        return None

    @torch.no_grad()
    def _base_at_first_step(self) -> None:
        """Set the ``base_model`` given at construction, at the first :meth:`step`.

        Why then and not at construction: τ = θ_SFT − θ_base needs the fine-tuned weights, and
        several loops load them after building the optimizer (litgpt's ``finetune_full`` loads
        the checkpoint after ``fabric.setup_optimizers``; Hugging Face ``Trainer`` and Lightning
        restore a checkpoint after creating it). At the first step the weights are the ones
        training starts from, and nothing has moved them yet, so τ is the same as ``set_base``
        before training would compute (the ``OnlineMerging`` callback's route: the two agree bit
        for bit). A resumed optimizer (``load_state_dict`` before the first step, every trainable
        parameter with steps taken) keeps the checkpoint's τ̃ and loads no base at all, so a
        resumed run ends where an uninterrupted one would.
        """
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        labels = self._labels(None)
        if trainable and all(self.state.get(p, {}).get("step", 0) > 0 for p in trainable):
            positions = self._positions()
            restored = [labels[id(p)] if labels else f"#{positions[id(p)]}" for p in trainable]
            self._base["source"] = None
            self._base["match"] = BaseMatch(by="position" if labels is None else "name", restored=restored)
            log.info("%s: resumed, so the τ̃ in the optimizer state is kept; base_model is not loaded",
                     type(self).__name__)
            return
        base = load_base(self._base["source"], labels is None, **self._base["load_kwargs"])
        self.set_base(None, base)

    def reference_bytes(self) -> int:
        """Bytes held by the stored τ̃ (indices and values) over all parameters."""
        return sum(
            s[k].numel() * s[k].element_size()
            for s in self.state.values()
            for k in ("tau_idx", "tau_val")
            if k in s
        )

    # ---------------------------------------------------------------- step -----------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; calls ``closure`` (under ``torch.enable_grad``) first if given.

        Works without a closure too (the GradScaler path of 16-bit mixed precision, where the
        caller has already run the backward pass and unscaled the gradients).
        """
        if self._base["source"] is not None:  # base_model given at construction: τ from the weights now
            self._base_at_first_step()
        if any(g["merge_weight"] > 0 for g in self.param_groups) and not self._has_base():
            raise RuntimeError(
                f"{type(self).__name__}: merge_weight > 0 but no base model is set. Pass "
                f"{type(self).__name__}(..., base_model=<path, hub id or state dict>) (a bare class "
                "path takes no arguments: use the class_path + init_args form, e.g. litgpt's "
                "--optimizer '{\"class_path\": ..., \"init_args\": {\"base_model\": ...}}'), call "
                "optimizer.set_base(model, base_model) before training, or add the "
                "lightning_sr.callbacks.OnlineMerging(base_model=...) callback to the Trainer "
                "(or set merge_weight=0)."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        positions = self._positions()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            states = [self._state_for(p, group, positions[id(p)]) for p in params]
            weights = [self._weight(p, s) for p, s in zip(params, states)]
            grads = [local(p.grad).to(w.dtype) for p, w in zip(params, weights)]  # no copy if it has w's dtype
            update_moments(weights, grads, states, group)
            self._plan(params, states, group)
            for param, weight, state in zip(params, weights, states):
                self._update(param, weight, state, group)
        return loss

    def _plan(self, params: list, states: list, group: dict) -> None:
        """Work for the whole group before the per-parameter updates (moments already updated)."""

    def _update(self, param: torch.Tensor, weight: torch.Tensor, state: dict, group: dict) -> None:
        """Apply Δ (moments and decay already updated): plain, accumulated, or merged."""
        state["step"] += 1
        t = state["step"]
        adam = AdamDelta.of(state, group)
        if state.get("plain"):
            weight.add_(adam.dense())
        elif t % group["merge_every"] != 0:
            if "accumulated" not in state:  # merge_every was raised after the state was made
                state["accumulated"] = torch.zeros_like(weight)
            delta = adam.dense()
            weight.add_(delta)
            state["accumulated"].add_(delta)
        else:
            accumulated = state.get("accumulated")
            if accumulated is not None:
                weight.sub_(accumulated)  # back to the last merge point
            self._merge(weight.view(-1), adam, accumulated, state, group, self._shard(param))
            if accumulated is not None:
                accumulated.zero_()
        if "master" in state:
            local(param).copy_(weight)

    def _sparsify_reference(self, tau: torch.Tensor, state: dict, group: dict, shard: FlatShard):
        """Kept local indices and values of τ̃ from the local part of τ (flat)."""
        raise NotImplementedError

    def _merge(self, flat, adam, accumulated, state, group, shard: FlatShard) -> None:
        """Merge this step's Δ (plus the step-K ``accumulated`` deltas) and α·τ̃ into ``flat``,
        the local part of the weights."""
        raise NotImplementedError
