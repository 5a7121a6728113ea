"""Memory samplers for GPUMemoryProfiler: one reading of a device's memory per call.

:func:`sampler_for` picks :class:`CudaSampler` (``torch.cuda.memory_stats``, plus NVML's
device-wide used memory through :class:`NvmlReader` when ``pynvml`` is importable) or
:class:`CpuSampler` (process RSS and peak RSS) for the trainer's root device. A sampler is built
once per stage and is cheap to call; its ``metrics`` are the CSV columns and logged keys it fills.
:func:`held_bytes` counts what this process holds of the model and the optimizers.

The callback decides *when* to sample; these classes only know *how*, so they can be used (and
tested) without a Trainer.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import psutil
import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn

from lightning_sr.optim.shards import local

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)
rank_zero_info = rank_zero_only(log.info)

try:  # peak RSS; not available on Windows
    import resource
except ImportError:  # pragma: no cover - platform dependent
    resource = None

CUDA_METRICS = (
    "allocated_bytes",
    "reserved_bytes",
    "peak_allocated_bytes",
    "nvml_used_bytes",
    "num_ooms",
    "num_alloc_retries",
)
CPU_METRICS = ("rss_bytes", "peak_rss_bytes")


def sampler_for(device: torch.device) -> CudaSampler | CpuSampler:
    """The sampler for ``device``: CUDA statistics on a CUDA device, process RSS on any other."""
    return CudaSampler(device) if device.type == "cuda" else CpuSampler(device)


class CudaSampler:
    """Reads ``torch.cuda.memory_stats`` (and NVML when present) for one CUDA device.

    ``peak_allocated_bytes`` is the allocator's peak since the last ``begin_batch``.
    """

    metrics = CUDA_METRICS
    memory_kind = "allocated_bytes"
    """What :meth:`current` measures (the generation CSV's ``memory_kind``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = str(device)
        self._nvml = NvmlReader(device)

    def begin_batch(self) -> None:
        """Start a new peak: resets the device's peak statistics for the whole process."""
        # Process-wide: every reader of max_memory_allocated() on this device sees the reset.
        torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> dict[str, int | None]:
        stats = torch.cuda.memory_stats(self.device)
        return {
            "allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "peak_allocated_bytes": int(stats.get("allocated_bytes.all.peak", 0)),
            "nvml_used_bytes": self._nvml.used_bytes(),
            "num_ooms": int(stats.get("num_ooms", 0)),
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
        }

    def current(self) -> int:
        """Bytes allocated now (one per decoding step: no NVML call, no sync)."""
        return int(torch.cuda.memory_stats(self.device).get("allocated_bytes.all.current", 0))


class CpuSampler:
    """Process resident set size (RSS) and its lifetime peak, for runs without a GPU."""

    metrics = CPU_METRICS
    memory_kind = "rss_bytes"
    """What :meth:`current` measures (the generation CSV's ``memory_kind``)."""

    def __init__(self, device: torch.device) -> None:
        self.label = device.type
        self._process = psutil.Process()

    def begin_batch(self) -> None:
        pass  # the OS keeps only a lifetime peak; there is nothing to reset

    def sample(self) -> dict[str, int | None]:
        rss = self.current()
        peak = _peak_rss_bytes(self._process)
        # The kernel's high-water mark can trail the current RSS by a page or two.
        return {"rss_bytes": rss, "peak_rss_bytes": None if peak is None else max(peak, rss)}

    def current(self) -> int:
        return int(self._process.memory_info().rss)


class NvmlReader:
    """Device-wide used memory from NVML (every process on the GPU, not only this one).

    Answers None when ``pynvml`` (package ``nvidia-ml-py``) is missing or NVML cannot be
    initialised (said at info level), and from the first NVML error on (one warning), so a flaky
    driver costs one warning per stage, not one per batch.
    """

    def __init__(self, device: torch.device) -> None:
        self._pynvml, self._handle = _nvml_handle(device)

    def used_bytes(self) -> int | None:
        if self._handle is None:
            return None
        try:
            return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except self._pynvml.NVMLError as err:
            rank_zero_warn(
                f"GPUMemoryProfiler: NVML stopped answering ({err}); dropping nvml_used_bytes."
            )
            self._handle = None
            return None


def held_bytes(module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of the module's parameters and of the optimizers' state tensors held by this
    process (a sharded tensor counts its local shard, so under FSDP2 this is the rank's share)."""

    def size(tensors) -> int:
        unique = {id(t): local(t) for t in tensors if isinstance(t, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in unique.values())

    states = (v for opt in optimizers for state in opt.state.values() for v in state.values())
    return {"parameter_bytes": size(module.parameters()), "optimizer_state_bytes": size(states)}


def _peak_rss_bytes(process: psutil.Process) -> int | None:
    """The process's peak RSS since it started (ru_maxrss is KiB on Linux, bytes on macOS)."""
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    peak = getattr(process.memory_info(), "peak_wset", None)  # Windows
    return None if peak is None else int(peak)


def _nvml_handle(device: torch.device) -> tuple[Any, Any]:
    """(pynvml module, handle) for ``device``, or (None, None) when NVML is unavailable.

    The handle is looked up by the device's UUID, so it is right under CUDA_VISIBLE_DEVICES.
    """
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            handle = pynvml.nvmlDeviceGetHandleByUUID(_nvml_uuid(uuid))
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return pynvml, handle
    except pynvml.NVMLError as err:
        rank_zero_info(
            f"GPUMemoryProfiler: NVML unavailable ({err}); not recording nvml_used_bytes."
        )
        return None, None


def _nvml_uuid(uuid: Any) -> str:
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
