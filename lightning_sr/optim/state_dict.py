"""One parameter's online merging state, fresh and checkpointed, sharded (FSDP2) or not.

A parameter's state holds its step, the Adam moments, an fp32 master copy (half-precision or
non-contiguous parameters), the step-K buffer (``accumulated``), OnDARE's generator state
(``rng_state``) and τ̃ as sorted local flat indices and values (``tau_idx``, ``tau_val``).
Every tensor in it has the shape of the parameter's local part. :func:`new_entry` makes the
state of a parameter's first use (all but the generator state and τ̃).

Unsharded parameters are saved as they are. A sharded (``DTensor``) parameter's moments, master
copy and step-K buffer are wrapped (no copy) as ``DTensor`` s in the parameter's own layout, and
τ̃ is given densely in that layout (``tau``, zeros where nothing is kept, with ``has_tau`` saying
whether a base was set), so that torch's distributed checkpoint saves every rank's part and loads
it back on any number of ranks. The generator state and the step are the same on every rank.

Loading keeps each tensor's own dtype: ``torch.optim.Optimizer.load_state_dict`` casts every
floating state tensor, and the integer ones too, to the parameter's dtype, which would round τ̃'s
int32 indices, corrupt the generator state and turn fp32 masters of bf16 parameters into bf16.
The tensors are only moved to the parameter's device (the generator state, a byte tensor for the
generator on the parameter's device, stays on the CPU where torch keeps it). ``DTensor`` values
become the local part of the current layout, a dense ``tau`` becomes sorted local indices and
values again.
"""

from __future__ import annotations

from itertools import chain

import torch

from lightning_sr.optim.shards import is_sharded, local, local_part
from lightning_sr.optim.sparsify import index_dtype

__all__ = ["new_entry", "saved_entry", "restored_entry", "saved_entries", "restored_entries", "tau_bytes"]

_ELEMENTWISE_STATE = ("exp_avg", "exp_avg_sq", "master", "accumulated")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def new_entry(part: torch.Tensor, merge_every: int) -> dict:
    """The state of a parameter whose local part is ``part``, at its first use: step 0, zero
    moments (fp32 for half precision), an fp32 master copy if ``part`` is half-precision or not
    contiguous, and the step-K buffer if ``merge_every > 1``."""
    work_dtype = torch.float32 if part.dtype in _LOW_PRECISION else part.dtype
    entry = {
        "step": 0,
        "exp_avg": torch.zeros(part.shape, dtype=work_dtype, device=part.device),
        "exp_avg_sq": torch.zeros(part.shape, dtype=work_dtype, device=part.device),
    }
    if part.dtype != work_dtype or not part.is_contiguous():
        entry["master"] = part.detach().to(work_dtype, copy=True).contiguous()
    if merge_every > 1:
        entry["accumulated"] = torch.zeros(part.shape, dtype=work_dtype, device=part.device)
    return entry


def saved_entry(param: torch.Tensor, entry: dict) -> dict:
    """``param``'s state entry as ``state_dict`` gives it: as it is, or if ``param`` is sharded
    with its tensors as ``DTensor`` s in ``param``'s layout and τ̃ dense (``tau``, ``has_tau``)."""
    if not is_sharded(param):
        return entry
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


def restored_entry(param: torch.Tensor, saved: dict) -> dict:
    """The state entry of ``param`` from its saved form (:func:`saved_entry`, either kind).

    Tensors keep their dtype and are copied to the device of ``param``'s local part; the
    generator state, a byte tensor for the generator on the parameter's device, stays on the CPU
    where torch keeps it. ``DTensor`` values are laid out like their parameter and replaced by
    their local part; a dense ``tau`` becomes sparse again.
    """
    restored = {}
    for key, value in saved.items():
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
    return restored


def tau_bytes(entries) -> int:
    """Bytes held by the stored τ̃ (indices and values) of the state ``entries``."""
    return sum(e[k].numel() * e[k].element_size() for e in entries for k in ("tau_idx", "tau_val") if k in e)


def saved_entries(saved: dict, param_groups: list[dict]) -> dict:
    """torch's optimizer state dict ``saved`` (from ``param_groups``) with every entry in its saved
    form (:func:`saved_entry`; entries are keyed by position over all groups)."""
    params = chain.from_iterable(g["params"] for g in param_groups)
    for index, param in enumerate(params):
        if index in saved["state"]:
            saved["state"][index] = saved_entry(param, saved["state"][index])
    return saved


def restored_entries(state_dict: dict, param_groups: list[dict]) -> dict:
    """``{parameter: state entry}`` from a saved ``state_dict`` (:func:`restored_entry`), its saved
    ids paired in order with the parameters of ``param_groups``."""
    saved_state = state_dict["state"]
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in param_groups)
    return {param: restored_entry(param, saved_state[i]) for i, param in zip(saved_ids, params) if i in saved_state}
