"""Training past one device: FSDP2 sharding of our modules' models, and the strategy that runs it.

:class:`~lightning_sr.modules.preference.PreferenceModule` and
:class:`~lightning_sr.modules.sft.SFTModule` shard themselves in ``configure_model`` when the
Trainer runs a ``ModelParallelStrategy``: every *unit* (by default each decoder layer) and then
the whole model become FSDP2 groups (``torch.distributed.fsdp.fully_shard``) over the
data-parallel mesh, so each rank holds ``1/N`` of the parameters, gradients and optimizer state
and gathers one unit's weights at a time for its forward and backward. The frozen DPO reference is
sharded the same way: it costs ``1/N`` of a model per rank, and the ``reference = policy`` base of
the online merging optimizers is then read from the local shard with no communication.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with every process in the
data-parallel (FSDP) dimension and none in tensor parallelism, so one config runs on any number of
devices (``ModelParallelStrategy``'s own default puts one data-parallel rank per *node*).

Only FSDP2 is supported: Lightning's ``FSDPStrategy`` (FSDP1) flattens parameters into shards
that cut across tensors, and DeepSpeed runs its own optimizer step; :func:`check_strategy` stops
either at set-up with the supported way.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from typing_extensions import override

from lightning_sr.lightning_packages import ModelParallelStrategy
from lightning_sr.optim.shards import is_sharded

__all__ = ["FSDP2Strategy", "shard_units", "shard_model", "shard_for_strategy", "data_parallel_mesh", "check_strategy"]

SUPPORTED = "--trainer.strategy=lightning_sr.FSDP2Strategy (FSDP2), or DDP"


def shard_units(model: nn.Module, unit_classes: Sequence[str] | None = None) -> list[nn.Module]:
    """The submodules of ``model`` that become FSDP2 units, in module order.

    ``unit_classes`` names their classes (``["LlamaDecoderLayer"]``). By default they are the
    model's decoder layers, found from the model itself: the classes in transformers'
    ``_no_split_modules`` (the blocks a model must not be split inside), else the class of the
    longest ``nn.ModuleList`` of one class. Raises ``ValueError`` naming the classes present when
    none matches.
    """
    names = set(unit_classes or ())
    if unit_classes is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if not any(type(m).__name__ in names for m in model.modules()):
            lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
            names = {type(max(lists, key=len)[0]).__name__} if lists else set()
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if unit_classes is not None and not units:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"fsdp_units: {type(model).__name__} has no submodule of class {sorted(names)}; it has {present}")
    return units


def shard_model(model: nn.Module, mesh, unit_classes: Sequence[str] | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` over ``mesh`` (a 1-D device mesh): each unit, then the root.

    Units are sharded innermost first (FSDP2 requires children before parents); the root group
    holds what no unit does (embeddings, final norm, the head; tied weights stay tied).
    """
    from torch.distributed.fsdp import fully_shard

    for unit in reversed(shard_units(model, unit_classes)):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_for_strategy(module, models: Sequence[nn.Module], unit_classes: Sequence[str] | None) -> None:
    """Shard each of ``models`` over ``module``'s FSDP mesh when it runs under
    ``ModelParallelStrategy`` (``configure_model`` calls this); models already sharded, and every
    model under any other strategy, are left as they are."""
    mesh = data_parallel_mesh(module)
    if mesh is None:
        return
    for model in models:
        if not any(is_sharded(p) for p in model.parameters()):
            shard_model(model, mesh, unit_classes)


def data_parallel_mesh(module) -> object | None:
    """The FSDP mesh of a LightningModule under ``ModelParallelStrategy``, or ``None`` without one.

    Raises ``ValueError`` when the strategy also asks for tensor parallelism, which our modules
    do not apply.
    """
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"{type(module).__name__} shards with FSDP2 only; tensor parallelism is not supported: "
            "use lightning_sr.FSDP2Strategy or ModelParallelStrategy(tensor_parallel_size=1)"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def check_strategy(trainer, who: str) -> None:
    """Stop at set-up under a sharding strategy other than FSDP2 (FSDP1, DeepSpeed), naming the
    supported ones: the online merging state and our frozen models need whole-tensor shards."""
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    for unsupported in ("FSDPStrategy", "DeepSpeedStrategy"):
        if unsupported in names:
            raise RuntimeError(f"{who} does not support {type(trainer.strategy).__name__}; use {SUPPORTED}")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with all processes sharding in one FSDP2 dimension.

    ``--trainer.strategy=lightning_sr.FSDP2Strategy --trainer.devices=N`` shards over the N
    devices of every node (``data_parallel_size = nodes × devices``, ``tensor_parallel_size = 1``),
    so a config runs unchanged on 1, 2 or 8 devices. Works on CPUs (gloo) for tests.

    Args:
        save_distributed_checkpoint: save checkpoints as one folder of per-rank shards (torch's
            distributed checkpoint, fast, loadable on another number of ranks) rather than one
            consolidated file gathered on rank 0.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; by default the accelerator's.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
