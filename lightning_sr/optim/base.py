"""What OnDARE and OnTIES share: the one signature, the state, ``set_base``, ``step`` and step-K.

:class:`OnlineMergingOptimizer` is the whole optimizer except two decisions, which each subclass
makes (:mod:`.ondare`, :mod:`.onties`): how the reference delta τ = θ_SFT − θ_base is sparsified
once (``_sparsify_reference``, at :meth:`~OnlineMergingOptimizer.set_base`) and how a step's Adam
delta Δ is sparsified and merged with τ̃ (``_merge``; the paper's Eq. 2, θ ← θ + F(Δ) ⊕ F(τ)).
Everything else is here:

- the one signature (``lr`` ... ``seed``, documented in :data:`.online_merging.ARGUMENTS`;
  :func:`.online_merging.extended_signature` adds a subclass's own) and the validation of every
  param group as it is added;
- the per-parameter state, created on first use (:mod:`.adam`'s moments, an fp32 master copy of
  half-precision parameters, OnDARE's random stream, step-K's buffer), and its checkpointed form
  (both made by :mod:`.state_dict`);
- ``set_base``: pairing the parameters with the base (:mod:`.reference`: by name through
  :mod:`.names`, or by position for bare parameters; the report) and storing τ̃; or, with ``base_model``
  given at construction, the same at the first ``step`` (:meth:`~OnlineMergingOptimizer._base_at_first_step`);
- ``step``: the AdamW moments and decay of a param group with foreach kernels, then per
  parameter a plain, an accumulated or a merging update. Step-K (``merge_every=K``, the paper's
  Alg. 2) is the few lines of ``_update`` that accumulate K − 1 plain Adam steps and roll them
  back before the merge, so it stays with the update rather than in a module of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_sr.optim.adam import AdamDelta, update_moments
from lightning_sr.optim.online_merging import arguments_doc, check_hyperparameters, log
from lightning_sr.optim.reference import (
    BaseMatch, load_base, log_match, named_group, no_base_error, pair_parameters, parameter_names, resumed_match,
)
from lightning_sr.optim.shards import FlatShard, base_part, flat_shard, is_sharded, local
from lightning_sr.optim.sparsify import index_dtype
from lightning_sr.optim.state_dict import new_entry, restored_entries, saved_entries, tau_bytes

__all__ = ["OnlineMergingOptimizer"]


class OnlineMergingOptimizer(Optimizer):
    __doc__ = f"""Shared machinery of :class:`OnDARE` and :class:`OnTIES`: Adam moments, state, step-K.

    Both take this signature, OnDARE one more argument. Subclasses define how the reference delta
    is sparsified once (``_sparsify_reference``) and how a step's delta is merged with it
    (``_merge``); one that adds hyperparameters sets ``_extra_defaults`` before calling this
    ``__init__`` and publishes them with :func:`~.online_merging.extended_signature`. Every param
    group's hyperparameters are validated when it is added.

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
        super().add_param_group(named_group(type(self).__name__, param_group))
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
        state.update(new_entry(part, group["merge_every"]))
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
        """torch's optimizer state dict; a sharded parameter's state is given as ``DTensor`` s
        (τ̃ densely, as ``tau``), which torch's distributed checkpoint saves per rank and loads
        back on any number of ranks; unsharded parameters keep τ̃ sparse. See :mod:`.state_dict`.
        """
        return saved_entries(super().state_dict(), self.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``, keeping each tensor's own dtype (torch's
        would cast τ̃'s indices, the generator state and fp32 masters to the parameter's dtype);
        ``DTensor`` values become the local part of the current layout. See :mod:`.state_dict`.
        """
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(restored_entries(state_dict, self.param_groups))

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
        pairing = pair_parameters(cls, self.param_groups, model, base, self.state, rename)
        labels, pairs, reasons = pairing.labels, pairing.pairs, pairing.reasons
        self._base["source"] = None  # this base replaces one given at construction
        entries = [(g, p, labels[id(p)]) for g in self.param_groups for p in g["params"] if p.requires_grad]
        report = BaseMatch(by=pairing.by)
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
            base_values = base_part(pairing.base[pairs[name]], param, self._shard(param))
            tau = current - base_values.to(device=current.device, dtype=current.dtype)
            idx, values = self._sparsify_reference(tau.reshape(-1), state, group, self._shard(param))
            nonzero = values != 0
            state["tau_idx"] = idx[nonzero].to(device=param.device, dtype=index_dtype(tau.numel()))
            state["tau_val"] = values[nonzero].contiguous()
            report.matched[name] = pairs[name]
            report.kept += int(nonzero.sum())
            report.dense += tau.numel()
        self._base["match"] = report
        log_match(cls, report)
        return report

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
        labels = parameter_names(type(self).__name__, self.param_groups)
        resumed = resumed_match(self.param_groups, self.state, labels)
        if resumed is not None:
            self._base["source"] = None
            self._base["match"] = resumed
            log.info("%s: resumed, so the τ̃ in the optimizer state is kept; base_model is not loaded",
                     type(self).__name__)
            return
        source = self._base["source"]
        base = load_base(source, labels is None, **self._base["load_kwargs"])
        try:
            self.set_base(None, base)
        except ValueError as error:  # a base that does not fit: name the argument that gave it
            raise ValueError(f"{type(self).__name__}(base_model={_describe(source)}): {error}") from None

    def reference_bytes(self) -> int:
        """Bytes held by the stored τ̃ (indices and values) over all parameters."""
        return tau_bytes(self.state.values())

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
            raise no_base_error(type(self).__name__)
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


def _describe(source: Any) -> str:
    """A ``base_model`` as a message shows it: a path as given, an object by its type."""
    return repr(str(source)) if isinstance(source, (str, os.PathLike)) else f"<a {type(source).__name__}>"
