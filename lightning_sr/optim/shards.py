"""Where a parameter's elements live: the whole tensor here, or one FSDP2 shard of it.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` whose local tensor
is a run of whole rows (dim 0) of the parameter, so it is one contiguous slice of the flattened
parameter. A :class:`FlatShard` names that slice (the parameter's element count, the global flat
index of the first local element) and the process group whose ranks hold the other slices. The
online merging optimizers work on the local slice only and make every random draw and every
top-k selection in the *global* flat index space, so the result does not depend on the layout:
one process, or any number of shards (see :mod:`lightning_sr.optim.sparsify`).

An unsharded tensor is ``FlatShard(numel, 0, None)``: one slice, no collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.distributed as dist

__all__ = ["FlatShard", "flat_shard", "local", "is_sharded", "local_part", "base_part"]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 and the other ``torch.distributed.tensor`` users)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` on this rank: a ``DTensor``'s local tensor (same storage), else itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class FlatShard:
    """This rank's slice ``[start, start + local numel)`` of a flattened parameter of ``numel`` elements.

    ``group`` is the process group over the ranks holding the other slices (``None``: the whole
    tensor is here, and the collectives of :mod:`~lightning_sr.optim.sparsify` are skipped).
    """

    numel: int
    start: int = 0
    group: object | None = None

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """``tensor`` reduced (``op``, default sum) over the shards' ranks, in place."""
        if self.group is not None:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every rank of the shards' group (just this one without a group)."""
        if self.group is None:
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, tensor, group=self.group)
        return gathered


def flat_shard(param: torch.Tensor) -> FlatShard:
    """The :class:`FlatShard` of a parameter: its global slice when it is a ``DTensor``.

    Supported layouts are those of FSDP2: the parameter is split along dim 0 over one mesh
    dimension (``Shard(0)``) and replicated over any others (HSDP). Anything else (tensor
    parallelism's ``Shard(1)``, several sharded mesh dimensions) raises ``ValueError``: its local
    part is not one slice of the flat parameter.
    """
    if not is_sharded(param):
        return FlatShard(param.numel())
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = [i for i, p in enumerate(param.placements) if not isinstance(p, Replicate)]
    if len(sharded) > 1 or any(type(param.placements[i]) is not Shard or param.placements[i].dim != 0 for i in sharded):
        raise ValueError(
            f"a parameter of shape {tuple(param.shape)} has placements {param.placements}; the online "
            "merging optimizers support FSDP2 layouts only (Shard(0) over one mesh dimension, "
            "Replicate over the others)"
        )
    if not sharded or param.device_mesh.size(sharded[0]) == 1:  # one shard: the whole parameter
        return FlatShard(param.numel())
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row = prod(param.shape[1:])
    start = min(offset[0], param.shape[0]) * row if param.shape else 0
    return FlatShard(param.numel(), start, param.device_mesh.get_group(sharded[0]))


def local_part(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor as this rank's part of ``param``: a ``DTensor`` is laid out like the
    parameter first (a checkpoint written with another number of ranks), then unwrapped."""
    if not is_sharded(value):
        return value
    if is_sharded(param) and (value.device_mesh, value.placements) != (param.device_mesh, param.placements):
        value = value.redistribute(param.device_mesh, param.placements)
    return value.to_local() if is_sharded(param) else value.full_tensor()


def base_part(value, param: torch.Tensor, shard: FlatShard) -> torch.Tensor:
    """The base's values at ``param``'s local elements: the rows of its shard.

    ``value`` is a tensor, a ``DTensor`` or a lazily read tensor (anything with ``shape`` that
    slices by rows, as :func:`lightning_sr.loading.load_weights` returns for safetensors).
    """
    if is_sharded(value):
        if is_sharded(param) and (value.device_mesh, value.placements) == (param.device_mesh, param.placements):
            return value.to_local()
        value = value.full_tensor()
    if not is_sharded(param):
        return value if isinstance(value, torch.Tensor) else value[:]
    rows = local(param).shape[0]
    row_numel = prod(param.shape[1:])
    first = shard.start // row_numel if row_numel else 0
    return value[first : first + rows]
