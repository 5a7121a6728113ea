"""Online merging optimizers: OnDARE and OnTIES (Lu et al., arXiv 2405.17931), Adam variants.

At every step the Adam update Δ and the reference delta τ = θ_SFT − θ_base are both sparsified
and merged into the weights (the paper's Eq. 2, θ ← θ + F(Δ) ⊕ F(τ)), which keeps the policy
close to the direction the SFT model took away from its pre-trained base:

- **OnDARE** (random drop, linear merge, Eq. 3): ``Δ̃ = Δ ⊙ M_t / p`` with a fresh Bernoulli(p)
  mask every step, ``τ̃ = τ ⊙ M_0 / p`` with a mask drawn once, ``θ ← θ + (1 − α)·Δ̃ + α·τ̃``.
- **OnTIES** (top-k drop, sign consensus, Eq. 7 as in the authors' code): ``Δ̃`` and ``τ̃`` keep
  their ⌊p·n⌋ largest magnitudes, the elected sign is ``s = sign(τ̃ + Δ̃)`` (+1 at 0) on the
  *unweighted* terms, ``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``.

``Δ = −lr · m̂ / (√v̂ + eps)`` uses ``torch.optim.AdamW``'s moments and bias correction, and
weight decay is ``torch.optim.AdamW``'s decoupled ``θ ← θ − lr·wd·θ`` applied first, so with
``keep_rate=1, merge_weight=0`` OnDARE *is* AdamW. p = ``keep_rate``, α = ``merge_weight``
(multiplies τ̃ directly, once per step, no lr factor). ``merge_every=K > 1`` is the paper's
step-K variant (Alg. 2): K − 1 plain Adam steps whose deltas are accumulated, then on the K-th
step the weights go back to the last merge point (the accumulated Adam deltas are subtracted;
weight decay applied in between stays, as in the authors' code) and the accumulated delta plus
this step's is sparsified and merged once with α·τ̃ (α is not multiplied by K). This costs one
extra parameter-sized buffer per parameter.

How it runs (see the README):

- The Adam moments and the weight decay of a param group are updated with foreach kernels; Δ is
  then computed per parameter, and only where it is needed.
- τ̃ is stored sparse, as sorted flat indices and values, computed once by :meth:`set_base`.
- OnDARE's masks come from a ``torch.Generator`` on the parameter's device, seeded from ``seed``
  and the parameter's position, whose state lives in the optimizer state: every data-parallel
  rank draws the same masks and a resumed run continues exactly (on GPUs of one model: torch's
  CUDA random kernels size their grid by the multiprocessor count). On the CPU the kept set is
  drawn as geometric gaps (O(p·n) work, no dense mask) and Δ is computed only there; on a GPU a
  dense Bernoulli mask is drawn on the device and applied to the dense Δ, no host round trip.
- OnTIES ranks every |Δ| and keeps the exact top-k, never with a full sort: on the CPU a sampled
  threshold, then one chunked pass that computes |Δ| and collects the candidates above it, then
  ``torch.topk`` on those; on a GPU ``torch.topk``. Δ itself is computed only at the kept
  coordinates. The sign election finds the overlap of the two sorted index sets with
  ``searchsorted``, without a host sync.
- Half-precision parameters get fp32 master weights and fp32 moments in the state (α·τ̃ per step
  is far below bf16 resolution); the master copy is authoritative, so load new weights before
  the first step.
- FSDP2 (``DTensor``) parameters: each rank keeps the state of its shard only (τ̃ included) and
  makes every mask draw and top-k selection over the whole parameter (:mod:`.shards`,
  :mod:`.sparsify`), so one process and any number of shards end with the same weights;
  :meth:`state_dict` gives the sharded state as ``DTensor`` s, which torch's distributed
  checkpoint saves per rank and reshards on load.

Deliberate differences from the authors' code (QwenLM/online_merging_optimizers):

- τ̃ is not clamped by default. The authors clamp OnDARE's rescaled ``τ ⊙ M_0 / p`` to [−1, 1];
  ``OnDARE(clamp_reference=True)`` does the same, to reproduce their runs.
- Δ and weight decay are ``torch.optim.AdamW``'s: eps is added after the bias correction and the
  decay is applied before the update. The authors use the Hugging Face ``AdamW`` form (eps added
  to √v before the bias correction, decay applied after the update).
- Step-K updates every parameter on non-merge steps; the authors' loop returns after the first
  parameter on those steps.
- Half-precision parameters get fp32 master weights and moments; the authors keep τ and the
  moments in the parameter dtype.
- OnTIES' top-k uses ``topk`` (or a sampled threshold), not a full ``argsort``: the same set,
  up to ties at the k-th magnitude.

This module imports no Lightning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import chain

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_sr.optim.shards import FlatShard, base_part, flat_shard, is_sharded, local, local_part
from lightning_sr.optim.sparsify import (
    MIN_KEEP_RATE,
    index_dtype,
    kept_count,
    TopK,
    magnitude_indices,
    shard_bernoulli_indices,
    shard_bernoulli_mask,
    top_indices_of,
)

__all__ = ["OnDARE", "OnTIES", "OnlineMergingOptimizer", "BaseMatch", "align_names"]

log = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_PAPER_LR_RANGE = (1e-7, 5e-6)  # the learning rates of the paper's experiments
_HIGH_LR = 1e-4  # warn above this: 20x the paper's largest
_warned_high_lr: set[str] = set()  # class names that have warned (once per process per class)


@dataclass
class BaseMatch:
    """What :meth:`OnlineMergingOptimizer.set_base` paired: parameter name → base name.

    ``unmatched`` lists trainable parameters with no base counterpart; they get plain AdamW
    updates. ``kept`` / ``dense`` count the stored τ̃ entries against the matched elements.
    ``restored`` lists parameters that had already taken steps (their state came from
    ``load_state_dict``, or training had started) and kept the τ̃ already in the optimizer state
    instead of recomputing τ from trained weights; they are in none of the other fields.
    """

    matched: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    kept: int = 0
    dense: int = 0
    restored: list[str] = field(default_factory=list)


def align_names(names: Iterable[str], base_names: Iterable[str]) -> dict[str, str]:
    """Pair parameter names with base names that differ only by leading module prefixes.

    A LightningModule that holds a Hugging Face model as ``self.policy`` names its weights
    ``policy.model.layers.0...`` while the base model calls them ``model.layers.0...``. A name is
    paired with, in order: the identical base name; the longest of its own dotted suffixes that
    is a whole base name (the model has an extra prefix); the single base name that ends with it
    (the base has an extra prefix; skipped when several do). Names without a pair are left out.
    """
    base_names = list(base_names)
    base_set = set(base_names)
    ending_with: dict[str, list[str]] = {}
    for base_name in base_names:
        parts = base_name.split(".")
        for i in range(1, len(parts)):
            ending_with.setdefault(".".join(parts[i:]), []).append(base_name)
    pairs = {}
    for name in names:
        if name in base_set:
            pairs[name] = name
            continue
        parts = name.split(".")
        suffixes = (".".join(parts[i:]) for i in range(1, len(parts)))
        found = next((s for s in suffixes if s in base_set), None)
        if found is None and len(ending_with.get(name, ())) == 1:
            found = ending_with[name][0]
        if found is not None:
            pairs[name] = found
    return pairs


def _check_hyperparameters(name: str, group: Mapping) -> None:
    """Reject invalid values of a param group; warn (once per class) about a far too large lr."""
    lr, betas = group["lr"], group["betas"]
    if lr < 0.0:
        raise ValueError(f"{name}: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
    if group["eps"] < 0.0 or group["weight_decay"] < 0.0:
        raise ValueError(
            f"{name}: eps and weight_decay must be >= 0, got {group['eps']}, {group['weight_decay']}"
        )
    if not MIN_KEEP_RATE <= group["keep_rate"] <= 1.0:
        raise ValueError(
            f"{name}: keep_rate must be in [{MIN_KEEP_RATE:g}, 1] (the fraction of coordinates kept; "
            f"the paper uses 0.01), got {group['keep_rate']}"
        )
    if not 0.0 <= group["merge_weight"] <= 1.0:
        raise ValueError(f"{name}: merge_weight must be in [0, 1], got {group['merge_weight']}")
    merge_every, seed = group["merge_every"], group["seed"]
    if int(merge_every) != merge_every or merge_every < 1:
        raise ValueError(f"{name}: merge_every must be an integer >= 1, got {merge_every}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"{name}: seed must be an integer >= 0, got {seed}")
    if lr > _HIGH_LR and name not in _warned_high_lr:
        _warned_high_lr.add(name)
        low, high = _PAPER_LR_RANGE
        warnings.warn(
            f"{name}: lr={lr:g} is far above the paper's range for online merging ({low:g} to {high:g}, "
            "Lu et al. 2024). merge_weight and keep_rate were tuned for that range: merge_weight·τ̃ "
            "is added once per step without an lr factor, so at this lr the Adam update outweighs "
            "the pull toward the SFT model far more than in the paper. Lower lr unless you mean it.",
            UserWarning,
            stacklevel=2,
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


_ELEMENTWISE_STATE = ("exp_avg", "exp_avg_sq", "master", "accumulated")


def _as_dtensors(param: torch.Tensor, entry: dict) -> dict:
    """A sharded parameter's state entry with its tensors as ``DTensor`` s in ``param``'s layout."""
    from torch.distributed.tensor import DTensor

    def wrap(tensor: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(
            tensor, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    out = {k: wrap(v) if k in _ELEMENTWISE_STATE else v for k, v in entry.items() if k not in ("tau_idx", "tau_val")}
    tau = torch.zeros_like(entry["exp_avg"])
    if "tau_idx" in entry:
        tau.view(-1)[entry["tau_idx"].long()] = entry["tau_val"].to(tau.dtype)
    out["tau"], out["has_tau"] = wrap(tau), "tau_idx" in entry
    return out


class OnlineMergingOptimizer(Optimizer):
    """Shared machinery of :class:`OnDARE` and :class:`OnTIES`: Adam moments, state, step-K.

    Subclasses define their arguments (documented there), how the reference delta is sparsified
    once (``_sparsify_reference``) and how a step's delta is merged with it (``_merge``). Every
    param group's hyperparameters are validated when it is added.
    """

    _uses_rng = False

    def __init__(self, params, **hyperparameters):
        super().__init__(params, hyperparameters)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._shards: dict[int, FlatShard] = {}
        self._planned: dict[int, torch.Tensor] = {}  # this step's kept indices of Δ, by state (OnTIES)
        self._create_sharded_state()

    def __setstate__(self, state: dict) -> None:  # copy / pickle keep only torch's own fields
        super().__setstate__(state)
        self._generators, self._shards, self._planned = {}, {}, {}

    def add_param_group(self, param_group: dict) -> None:
        _check_hyperparameters(type(self).__name__, {**self.defaults, **param_group})
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
        (``tau_idx``, ``tau_val``).
        """
        saved = super().state_dict()
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for index, param in enumerate(params):
            if is_sharded(param) and index in saved["state"]:
                saved["state"][index] = _as_dtensors(param, saved["state"][index])
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
            if saved_id not in saved_state:
                continue
            restored = {}
            for key, value in saved_state[saved_id].items():
                if isinstance(value, torch.Tensor):
                    value = local_part(value, param)
                    device = "cpu" if key == "rng_state" else local(param).device
                    value = value.detach().to(device=device, copy=True)
                restored[key] = value
            if "tau" in restored:
                tau, has_tau = restored.pop("tau").view(-1), restored.pop("has_tau", True)
                if has_tau:
                    kept = tau.nonzero().squeeze(1)
                    restored["tau_idx"] = kept.to(index_dtype(tau.numel()))
                    restored["tau_val"] = tau[kept]
            self.state[param] = restored

    # ---------------------------------------------------------------- base -----------------------

    @torch.no_grad()
    def set_base(self, model: nn.Module, base: nn.Module | Mapping[str, torch.Tensor]) -> BaseMatch:
        """Compute and store the sparsified reference delta τ̃ from the base model.

        ``model`` is the module whose parameters this optimizer holds (it names them; a
        LightningModule wrapping the policy works, prefixes are aligned by :func:`align_names`);
        ``base`` is the pre-trained model the policy was fine-tuned from, as a module or a state
        dict. For each trainable parameter τ = current value − base value (the policy starts at
        the SFT weights, so this is τ_r = θ_SFT − θ_base), sparsified once and stored as kept
        indices and values. Parameters without a base counterpart get plain AdamW updates (they
        are listed in the returned :class:`BaseMatch`); a shape mismatch raises ``ValueError``
        naming the parameter, before any state changes. Frozen parameters are skipped.

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
        base_tensors = base.state_dict() if isinstance(base, nn.Module) else base
        names = {id(p): n for n, p in model.named_parameters()}
        positions = self._positions()
        cls = type(self).__name__
        entries = []
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) not in names:
                    raise ValueError(
                        f"{cls}.set_base: parameter #{positions[id(param)]} of shape "
                        f"{tuple(param.shape)} is not a parameter of the given model; pass the "
                        "module whose parameters the optimizer was built from"
                    )
                if param.requires_grad:
                    entries.append((group, param, names[id(param)]))
        pairs = align_names([n for _, _, n in entries], base_tensors)
        if not pairs:
            raise ValueError(
                f"{cls}.set_base: no parameter name matches the base model. Parameters look like "
                f"{[n for _, _, n in entries[:3]]}, the base has {list(base_tensors)[:3]}"
            )
        for _, param, name in entries:
            if name in pairs and tuple(base_tensors[pairs[name]].shape) != tuple(param.shape):
                raise ValueError(
                    f"{cls}.set_base: parameter {name!r} has shape {tuple(param.shape)} but its "
                    f"base {pairs[name]!r} has shape {tuple(base_tensors[pairs[name]].shape)}"
                )
            state = self.state.get(param, {})
            if state.get("step", 0) > 0 and "tau_idx" not in state and not state.get("plain"):
                raise ValueError(
                    f"{cls}.set_base: parameter {name!r} has already taken {state['step']} steps "
                    "without a base, so τ = θ_SFT − θ_base can no longer be computed from its "
                    "weights. Call set_base before the first step, or on a new optimizer over the "
                    "SFT weights."
                )
        report = BaseMatch()
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
        return report

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
        if any(g["merge_weight"] > 0 for g in self.param_groups) and not self._has_base():
            raise RuntimeError(
                f"{type(self).__name__}: merge_weight > 0 but no base model is set. Call "
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
            beta1, beta2 = group["betas"]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_([s["exp_avg"] for s in states], grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            if group["weight_decay"] != 0:
                torch._foreach_mul_(weights, 1 - group["lr"] * group["weight_decay"])
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
        adam = _AdamDelta.of(state, group)
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


class _AdamDelta:
    """The Adam update ``Δ = −lr·m̂/(√v̂ + eps)`` of one parameter, densely or at given indices."""

    def __init__(self, state, step_size, bias_correction2_sqrt, eps):
        self.exp_avg, self.exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        self.step_size, self.bc2_sqrt, self.eps = step_size, bias_correction2_sqrt, eps

    @classmethod
    def of(cls, state: dict, group: dict, step: int | None = None) -> _AdamDelta:
        """Δ of the parameter at ``step`` (default: its state's) with the group's bias correction."""
        (beta1, beta2), t = group["betas"], state["step"] if step is None else step
        return cls(state, group["lr"] / (1 - beta1**t), math.sqrt(1 - beta2**t), group["eps"])

    def magnitude(self, part: slice) -> torch.Tensor:
        """``|Δ| / step_size = |m| / (√v̂ + eps)`` at ``part`` of the flat parameter: ranks like
        |Δ| at one pass less than ``dense``."""
        denom = self.exp_avg_sq.view(-1)[part].sqrt().div_(self.bc2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg.view(-1)[part], denom, out=denom).abs_()

    def dense(self) -> torch.Tensor:
        denom = self.exp_avg_sq.sqrt().div_(self.bc2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg, denom, out=denom).mul_(-self.step_size)

    def dense_at(self, part: slice) -> torch.Tensor:
        """``dense()`` at ``part`` of the flat parameter (a new tensor, the same values)."""
        denom = self.exp_avg_sq.view(-1)[part].sqrt().div_(self.bc2_sqrt).add_(self.eps)
        return torch.div(self.exp_avg.view(-1)[part], denom, out=denom).mul_(-self.step_size)

    def at(self, idx: torch.Tensor) -> torch.Tensor:
        m = self.exp_avg.view(-1)[idx]
        denom = self.exp_avg_sq.view(-1)[idx].sqrt_().div_(self.bc2_sqrt).add_(self.eps)
        return m.div_(denom).mul_(-self.step_size)


def _accumulated_magnitude(adam: _AdamDelta, accumulated: torch.Tensor, part: slice) -> torch.Tensor:
    """``|Δ + accumulated|`` at ``part`` of the flat parameter (step-K's merge-step delta)."""
    return adam.dense_at(part).add_(accumulated[part]).abs_()


class OnDARE(OnlineMergingOptimizer):
    """Online DARE merging Adam (paper Eq. 3): random drop, rescale by 1/p, linear merge.

    Per step: ``Δ̃ = Δ ⊙ M_t / p`` (M_t a fresh Bernoulli(p) mask, only ~p·n coordinates move),
    ``θ ← θ + (1 − α)·Δ̃ + α·τ̃`` with ``τ̃ = τ ⊙ M_0 / p`` fixed at :meth:`set_base`. The Adam
    moments are updated densely every step. The defaults are the paper's starting values. With
    ``keep_rate=1, merge_weight=0`` this is exactly ``torch.optim.AdamW``.

    Args:
        params: the parameters to optimize, or dicts defining parameter groups (a group may set
            any of the arguments below).
        lr: learning rate of the Adam update Δ. The paper uses 1e-7 to 5e-6; a value above 1e-4
            warns once.
        betas: Adam's coefficients for the running averages of the gradient and its square.
        eps: added to √v̂ in Adam's denominator, for numerical stability.
        weight_decay: decoupled weight decay, ``θ ← θ − lr·weight_decay·θ`` before each update.
        keep_rate: p, the probability that a coordinate of Δ (fresh mask every step) or of τ
            (one mask, drawn at ``set_base``) is kept; kept values are rescaled by 1/p. In
            [1e-12, 1]; the paper uses 0.01 and is robust down to about 5e-4.
        merge_weight: α in ``θ ← θ + (1 − α)·Δ̃ + α·τ̃``: how hard each step pulls toward the SFT
            model's direction τ = θ_SFT − θ_base. Multiplies τ̃ directly, once per step, without
            an lr factor. In [0, 1]; the paper searched 1e-7 to 1e-4. 0 needs no base model.
        merge_every: K of the paper's step-K variant (Alg. 2): merge every K-th step, with K − 1
            plain Adam steps accumulated in between (one extra parameter-sized buffer). 1 merges
            every step.
        seed: seeds the masks; each parameter's stream starts from ``seed`` and its position, on
            a generator on the parameter's device, so every data-parallel rank draws the same
            masks. Its state is checkpointed.
        clamp_reference: clamp τ̃ to [−1, 1] after rescaling, ``τ̃ = clamp(τ ⊙ M_0 / p, −1, 1)``,
            as the authors' code does. Off by default; turn it on to reproduce their runs.
    """

    _uses_rng = True

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
        clamp_reference: bool = False,
    ):
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, keep_rate=keep_rate,
            merge_weight=merge_weight, merge_every=merge_every, seed=seed, clamp_reference=clamp_reference,
        )

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


class OnTIES(OnlineMergingOptimizer):
    """Online TIES merging Adam (paper Eq. 7 as the authors implement it): top-k, sign election.

    Per step: ``Δ̃`` keeps the ⌊p·n⌋ largest |Δ| (all of Δ if that is 0), ``τ̃`` likewise once at
    :meth:`set_base`; the sign ``s = sign(τ̃ + Δ̃)`` (+1 where the sum is 0) is elected on the
    unweighted terms, and ``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``. Where τ̃ ≠ 0 the
    SFT direction usually wins the election and disagreeing Adam coordinates are dropped, which
    is what regularizes; this filtering happens even with ``merge_weight=0``. Deterministic: no
    random state. The defaults are the paper's starting values.

    Args:
        params: the parameters to optimize, or dicts defining parameter groups (a group may set
            any of the arguments below).
        lr: learning rate of the Adam update Δ. The paper uses 1e-7 to 5e-6; a value above 1e-4
            warns once.
        betas: Adam's coefficients for the running averages of the gradient and its square.
        eps: added to √v̂ in Adam's denominator, for numerical stability.
        weight_decay: decoupled weight decay, ``θ ← θ − lr·weight_decay·θ`` before each update.
        keep_rate: p, the fraction of each tensor's coordinates kept: Δ̃ and τ̃ keep their
            ⌊p·n⌋ largest magnitudes, unscaled (a tensor where ⌊p·n⌋ = 0 keeps everything). In
            [1e-12, 1]; the paper uses 0.01.
        merge_weight: α in ``θ ← θ + (1 − α)·Δ̃·[sign Δ̃ = s] + α·τ̃·[sign τ̃ = s]``: how hard each
            step pulls toward the SFT model's direction τ = θ_SFT − θ_base. Multiplies τ̃
            directly, once per step, without an lr factor. In [0, 1]; the paper searched 1e-7 to
            1e-4. 0 still filters Δ by the sign election but needs no base model.
        merge_every: K of the paper's step-K variant (Alg. 2): merge every K-th step, with K − 1
            plain Adam steps accumulated in between (one extra parameter-sized buffer). 1 merges
            every step.
        seed: not used (OnTIES draws no random masks); accepted so that a config can switch
            between OnDARE and OnTIES by class name alone.
    """

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
    ):
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, keep_rate=keep_rate,
            merge_weight=merge_weight, merge_every=merge_every, seed=seed,
        )

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
            adam, accumulated = _AdamDelta.of(state, group, t), state.get("accumulated")
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
