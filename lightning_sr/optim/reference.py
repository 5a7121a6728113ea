"""Pairing an optimizer's parameters with the base model, before τ = θ_SFT − θ_base is computed.

``set_base`` (:class:`~lightning_sr.optim.base.OnlineMergingOptimizer`) first decides, for every
trainable parameter, which tensor of the base is its counterpart and checks that τ can be computed
at all, raising before any optimizer state changes; then it stores τ̃ and reports what it paired
in a :class:`BaseMatch`. Two ways to pair:

- by name (:func:`pair_with_base`, through :func:`~lightning_sr.optim.names.match_names`), when
  the names are known: from the module given to ``set_base``, or from the optimizer's own param
  groups when it was built from ``model.named_parameters()``;
- by position (:func:`pair_by_position`), when the optimizer was built from bare
  ``model.parameters()`` (litgpt, LightningCLI's ``--optimizer``): the i-th parameter over all
  groups with the i-th tensor of the base *in module order*, every shape checked.

:func:`pair_parameters` is that first part of ``set_base`` (names from :func:`parameter_names`,
then either way; the result is a :class:`Pairing`), :func:`log_match` logs the report, and
:func:`named_group` turns param groups of ``(name, parameter)`` pairs into torch's named groups.
:func:`load_base` turns what a user gives as ``base_model`` (a path, a hub id, an embedded name, a
state dict, a module) into the tensors each way needs, through :mod:`lightning_sr.loading`;
:func:`resumed_match` tells a resumed optimizer, which needs none, and :func:`no_base_error` says
how to give one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lightning_sr.optim.names import match_names
from lightning_sr.optim.online_merging import log
from lightning_sr.optim.shards import is_sharded

__all__ = [
    "BaseMatch", "Pairing", "named_group", "parameter_names", "pair_parameters", "pair_with_base",
    "pair_by_position", "ordered_base", "resumed_match", "log_match", "load_base", "no_base_error",
    "check_untrained",
]


@dataclass
class BaseMatch:
    """What :meth:`OnlineMergingOptimizer.set_base` paired: parameter name → base name.

    ``by`` says how: ``"name"``, or ``"position"`` for an optimizer built from bare parameters
    (their names are then ``"#i"``, the position over all param groups). ``unmatched`` lists
    trainable parameters with no base counterpart, which get plain AdamW updates, and
    ``reasons`` says why for each. ``kept`` / ``dense`` count the stored τ̃ entries against the
    matched elements. ``restored`` lists parameters that had already taken steps (their state
    came from ``load_state_dict``, or training had started) and kept the τ̃ already in the
    optimizer state instead of recomputing τ from trained weights; they are in none of the
    other fields.
    """

    matched: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    kept: int = 0
    dense: int = 0
    restored: list[str] = field(default_factory=list)
    by: str = "name"
    reasons: dict[str, str] = field(default_factory=dict)

    def summary(self, cls: str = "", examples: int = 3) -> str:
        """One line for the log: how many parameters merge with the base, how they were paired
        (a few pairs whose names differ), and every parameter left as plain AdamW, with why."""
        head = f"{cls}: " if cls else ""
        if self.restored and not self.matched and not self.unmatched:
            return f"{head}{len(self.restored)} parameters keep the τ̃ of the optimizer state (resumed)"
        kept = self.kept / max(self.dense, 1)
        text = (
            f"{head}τ from the base for {len(self.matched)} of {len(self.matched) + len(self.unmatched)} "
            f"trainable parameters, by {self.by} (stored τ̃ keeps {kept:.4f} of their elements)"
        )
        aligned = [(n, b) for n, b in self.matched.items() if n != b]
        if aligned and self.by == "name":
            shown = ", ".join(f"{n!r} ← {b!r}" for n, b in aligned[:examples])
            text += f"; {len(aligned)} under another name, e.g. {shown}"
        if self.unmatched:
            why = self.reasons
            text += "; plain AdamW for " + ", ".join(f"{n!r} ({why.get(n, 'no counterpart')})" for n in self.unmatched)
        if self.restored:
            text += f"; {len(self.restored)} keep the τ̃ of the optimizer state"
        return text


@dataclass
class Pairing:
    """What ``set_base`` needs from the pairing (:func:`pair_parameters`), before any state changes.

    ``labels`` names every parameter (by ``id``; ``"#i"`` by position), ``base`` holds the base's
    tensors by base name, ``pairs`` maps a trainable parameter's name to its base name and
    ``reasons`` says why each unpaired one has none.
    """

    by: str
    labels: dict[int, str]
    base: Mapping[str, torch.Tensor]
    pairs: dict[str, str]
    reasons: dict[str, str]


def _shape(value) -> tuple:
    return tuple(value.shape)


def named_group(cls: str, param_group: dict) -> dict:
    """``param_group`` with ``(name, parameter)`` pairs made torch's named group (``params`` and
    ``param_names``) on any torch version, so the names can pair with the base's; bare
    parameters stay as they are (a single tensor becomes a list). Mixing both raises."""
    params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
        return {**param_group, "params": [p for _, p in params], "param_names": [n for n, _ in params]}
    if any(isinstance(p, tuple) for p in params):
        raise ValueError(f"{cls}: a param group mixes (name, parameter) pairs with bare parameters")
    return {**param_group, "params": params}


def parameter_names(cls: str, param_groups: list[dict], model: nn.Module | None = None) -> dict[int, str] | None:
    """Each parameter's name (by ``id``): from ``model``, else from the optimizer's named
    param groups; None when the parameters are bare (they pair by position)."""
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for i, param in enumerate(chain.from_iterable(g["params"] for g in param_groups)):
            if id(param) not in names:
                raise ValueError(
                    f"{cls}.set_base: parameter #{i} of shape {tuple(param.shape)} "
                    "is not a parameter of the given model; pass the module whose parameters the "
                    "optimizer was built from"
                )
        return names
    if param_groups and all("param_names" in g for g in param_groups):
        return {id(p): n for g in param_groups for n, p in zip(g["param_names"], g["params"])}
    return None


def pair_parameters(
    cls: str,
    param_groups: list[dict],
    model: nn.Module | None,
    base: nn.Module | Mapping[str, torch.Tensor],
    state: Mapping,
    rename: Mapping[str, str | None],
) -> Pairing:
    """Pair the trainable parameters of ``param_groups`` with ``base``: by name when they have
    names (:func:`parameter_names`, :func:`pair_with_base`), else the i-th parameter with the
    base's i-th tensor (:func:`ordered_base`, :func:`pair_by_position`). Raises before any
    state changes."""
    labels = parameter_names(cls, param_groups, model)
    if labels is None:  # bare parameters: the i-th parameter with the base's i-th tensor
        ordered = ordered_base(base)
        params = list(chain.from_iterable(g["params"] for g in param_groups))
        by_position, unpaired = pair_by_position(cls, params, ordered, state)
        return Pairing(
            by="position",
            labels={id(p): f"#{i}" for i, p in enumerate(params)},
            base=dict(ordered),
            pairs={f"#{i}": name for i, name in by_position.items()},
            reasons={f"#{i}": why for i, why in unpaired.items()},
        )
    base_tensors = base.state_dict() if isinstance(base, nn.Module) else base
    trainable = {labels[id(p)]: p for g in param_groups for p in g["params"] if p.requires_grad}
    pairs, reasons = pair_with_base(cls, trainable, base_tensors, state, rename)
    return Pairing(by="name", labels=labels, base=base_tensors, pairs=pairs, reasons=reasons)


def check_untrained(cls: str, label: str, entry: Mapping) -> None:
    """Raise if a parameter has taken steps without any base: τ can no longer be computed."""
    if entry.get("step", 0) > 0 and "tau_idx" not in entry and not entry.get("plain"):
        raise ValueError(
            f"{cls}.set_base: parameter {label!r} has already taken {entry['step']} steps "
            "without a base, so τ = θ_SFT − θ_base can no longer be computed from its "
            "weights. Call set_base before the first step, or on a new optimizer over the "
            "SFT weights."
        )


def pair_with_base(
    cls: str,
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    state: Mapping,
    rename: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """``({parameter name: base name}, {unpaired name: why})`` for the trainable ``params`` (name →
    parameter) of optimizer class ``cls`` with optimizer ``state``, matched by name
    (:func:`~lightning_sr.optim.names.match_names`, equal shapes, ``rename`` applied).

    Raises ``ValueError`` if no name matches (with a few names of both sides), if a parameter's
    evident counterpart (the same name up to prefixes and wrappers) has another shape, or if a
    parameter has taken steps without any base (τ can no longer be computed from its weights).
    """
    match = match_names(
        params, base, {n: _shape(p) for n, p in params.items()}, {n: _shape(t) for n, t in base.items()}, rename
    )
    for name, base_name in match.mismatched.items():
        raise ValueError(
            f"{cls}.set_base: parameter {name!r} has shape {tuple(params[name].shape)} but its "
            f"base {base_name!r} has shape {tuple(base[base_name].shape)} (map it elsewhere, or to "
            f"None for plain AdamW, with rename={{{name!r}: ...}})"
        )
    if not match.pairs:
        raise ValueError(
            f"{cls}.set_base: no parameter name matches the base model. Parameters look like "
            f"{list(params)[:3]}, the base has {list(base)[:3]}; pass rename={{'their prefix': "
            "'the base prefix'} to map them"
        )
    for name, param in params.items():
        check_untrained(cls, name, state.get(param, {}))
    return match.pairs, match.unmatched


def ordered_base(base: nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The base's tensors in module order, as bare parameters line up with them.

    A module gives its ``named_parameters()`` (no buffers, tied weights once, as
    ``model.parameters()`` lists them). A state dict is taken in its own order, without the
    entries that cannot be a parameter's counterpart: non-floating tensors (integer buffers) and a
    second name for a tensor already listed (tied weights saved twice, which ``torch.load``
    restores as one storage).
    """
    if isinstance(base, nn.Module):
        return list(base.named_parameters())
    ordered, seen = [], set()
    for name, value in base.items():
        if not hasattr(value, "shape"):
            continue
        if isinstance(value, torch.Tensor) and not is_sharded(value):
            if not (value.is_floating_point() or value.is_complex()):
                continue
            if value.device.type != "meta" and value.numel():
                key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
                if key in seen:
                    continue
                seen.add(key)
        ordered.append((name, value))
    return ordered


def pair_by_position(
    cls: str, params: list[torch.Tensor], base: list[tuple[str, torch.Tensor]], state: Mapping
) -> tuple[dict[int, str], dict[int, str]]:
    """``({position: base name}, {unpaired position: why})``: the i-th parameter (over all param
    groups, frozen ones included) with the i-th tensor of ``base`` (:func:`ordered_base`).

    Only trainable parameters are paired. Parameters past the end of the base are left unpaired
    (a new head after the network); a shape that differs raises ``ValueError`` naming the first
    mismatch, before any state changes.
    """
    pairs, unpaired = {}, {}
    for i, param in enumerate(params):
        if not param.requires_grad:
            continue
        if i >= len(base):
            unpaired[i] = f"past the base's {len(base)} tensors"
            continue
        name, value = base[i]
        if _shape(value) != tuple(param.shape):
            raise ValueError(
                f"{cls}: the optimizer's parameters have no names, so they are matched with the base "
                f"by position, and parameter #{i} of shape {tuple(param.shape)} meets the base's "
                f"tensor #{i} {name!r} of shape {_shape(value)}. Build the optimizer from "
                "model.named_parameters() (torch's named param groups) to match by name, or give the "
                "parameters in the base's order (all of them, frozen ones too)"
            )
        pairs[i] = name
    for i, param in enumerate(params):
        check_untrained(cls, f"#{i}", state.get(param, {}))
    return pairs, unpaired


def resumed_match(param_groups: list[dict], state: Mapping, labels: dict[int, str] | None) -> BaseMatch | None:
    """The :class:`BaseMatch` of a resumed optimizer (every trainable parameter has taken steps,
    its state from ``load_state_dict``: it keeps the checkpoint's τ̃ and needs no base), or None
    when it is not resumed. ``labels`` as :func:`parameter_names` gives them."""
    trainable = [p for g in param_groups for p in g["params"] if p.requires_grad]
    if not trainable or not all(state.get(p, {}).get("step", 0) > 0 for p in trainable):
        return None
    positions = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in param_groups))}
    restored = [labels[id(p)] if labels else f"#{positions[id(p)]}" for p in trainable]
    return BaseMatch(by="position" if labels is None else "name", restored=restored)


def log_match(cls: str, report: BaseMatch) -> None:
    """Log what ``set_base`` paired (on rank 0), and warn if some parameters kept their τ̃."""
    if report.restored:
        log.warning(
            "%s.set_base: %d parameters have already taken steps (state from load_state_dict, "
            "or training had started); they keep the reference delta τ̃ stored in the optimizer "
            "state instead of recomputing it from trained weights. Build a new optimizer to "
            "start over from another base.",
            cls,
            len(report.restored),
        )
    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        log.info("%s", report.summary(cls))


def no_base_error(cls: str) -> RuntimeError:
    """The error of a step with ``merge_weight > 0`` and no base set: the ways to give one."""
    return RuntimeError(
        f"{cls}: merge_weight > 0 but no base model is set. Pass "
        f"{cls}(..., base_model=<path, hub id or state dict>) (a bare class "
        "path takes no arguments: use the class_path + init_args form, e.g. litgpt's "
        "--optimizer '{\"class_path\": ..., \"init_args\": {\"base_model\": ...}}'), call "
        "optimizer.set_base(model, base_model) before training, or add the "
        "lightning_sr.callbacks.OnlineMerging(base_model=...) callback to the Trainer "
        "(or set merge_weight=0)."
    )


def load_base(source, by_position: bool, **load_kwargs):
    """The base's tensors from a ``base_model`` argument, for pairing by name or by position.

    By name: :func:`lightning_sr.loading.load_weights` with ``lazy=True`` (a ``.safetensors`` file
    or a local Hugging Face folder is read one tensor, or one shard of it, at a time). By
    position the order matters, and safetensors stores names sorted, not in module order: a
    hub id, a folder or an embedded name is loaded as a model (``AutoModelForCausalLM``) whose
    parameters are in module order, a ``torch.save`` / Lightning file is a state dict in module
    order, and a ``.safetensors`` file is refused.
    """
    from lightning_sr.loading import load_causal_lm, load_weights

    if not by_position:
        return load_weights(source, lazy=True, **load_kwargs)
    if isinstance(source, (nn.Module, Mapping)):
        return source
    path = Path(str(source))
    if path.suffix == ".safetensors":
        raise ValueError(
            f"base_model={str(source)!r}: a .safetensors file stores its tensors sorted by name, not "
            "in module order, so bare parameters cannot be matched with it by position. Build the "
            "optimizer from model.named_parameters(), or give the base as a Hugging Face folder or "
            "a torch.save file of its state_dict()"
        )
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return load_weights(source, **load_kwargs)
    return load_causal_lm(str(source), **{"dtype": "auto", **load_kwargs})
