"""GPUMemoryProfiler: memory per batch for fit/validate/test/predict, and per decoding step.

Per recorded batch the callback samples the device's memory once at the end of the batch and
logs it through ``trainer.loggers`` under ``memory/<phase>/...`` keys (``pl_module.log`` is not
allowed in predict hooks, ``logger.log_metrics`` is). Rows are buffered and written as
``memory_<stage>.csv`` at stage end (and every ``_FLUSH_EVERY`` rows), then plotted to
``memory_<stage>.png``. Inside generation the SpeculativeRejectionModule calls
:meth:`GPUMemoryProfiler.on_generation_step` once per decoding step; those rows go to
``memory_<stage>_generation.csv`` and a plot in the style of the paper's Figure 1 (memory and live
rows over generated length, rejection points marked).

On CUDA the sample is ``torch.cuda.memory_stats`` (allocated, reserved, peak allocated since the
batch began, OOM and allocator-retry counts) plus NVML's device-wide used memory when
``pynvml`` (package ``nvidia-ml-py``) is importable. On any other device it is the process RSS
and peak RSS, labelled as such.

Every row also counts what this process holds of the model and the optimizers
(``parameter_bytes``, ``optimizer_state_bytes``): under sharding (FSDP2) that is this rank's shard,
so the per-rank files show how parameter and optimizer memory fall with the number of ranks,
which process RSS (imports, allocator caches, gathered layers) hides.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn

from lightning_sr.lightning_packages import Callback
from lightning_sr.optim.shards import local

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)
rank_zero_info = rank_zero_only(log.info)

try:  # peak RSS; not available on Windows
    import resource
except ImportError:  # pragma: no cover - platform dependent
    resource = None

_FLUSH_EVERY = 1000
"""Buffered rows per file before they are appended to disk (bounds memory on long runs)."""

BATCH_KEYS = ("stage", "phase", "step", "batch_idx", "dataloader_idx", "elapsed_s", "device",
              "parameter_bytes", "optimizer_state_bytes")
CUDA_METRICS = (
    "allocated_bytes",
    "reserved_bytes",
    "peak_allocated_bytes",
    "nvml_used_bytes",
    "num_ooms",
    "num_alloc_retries",
)
CPU_METRICS = ("rss_bytes", "peak_rss_bytes")
GENERATION_KEYS = (
    "phase",
    "batch_idx",
    "run",
    "step",
    "sequence_length",
    "live_rows",
    "kv_bytes",
    "memory_bytes",
    "memory_kind",
    "device",
    "decision",
    "rejected_rows",
    "ended_rows",
    "round",
    "num_prompts",
)


# --------------------------------------------------------------------------------------------
# Samplers: one reading of the device's memory. Created once per stage, cheap to call.
# --------------------------------------------------------------------------------------------


class _CudaSampler:
    """Reads ``torch.cuda.memory_stats`` (and NVML when present) for one CUDA device."""

    metrics = CUDA_METRICS
    memory_kind = "allocated_bytes"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = str(device)
        self._nvml, self._nvml_handle = _nvml_handle(device)

    def begin_batch(self) -> None:
        # Process-wide: every reader of max_memory_allocated() on this device sees the reset.
        torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> dict[str, int | None]:
        stats = torch.cuda.memory_stats(self.device)
        return {
            "allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "peak_allocated_bytes": int(stats.get("allocated_bytes.all.peak", 0)),
            "nvml_used_bytes": self._nvml_used(),
            "num_ooms": int(stats.get("num_ooms", 0)),
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
        }

    def current(self) -> int:
        return int(torch.cuda.memory_stats(self.device).get("allocated_bytes.all.current", 0))

    def _nvml_used(self) -> int | None:
        if self._nvml_handle is None:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
        except self._nvml.NVMLError as err:
            rank_zero_warn(
                f"GPUMemoryProfiler: NVML stopped answering ({err}); dropping nvml_used_bytes."
            )
            self._nvml_handle = None
            return None


class _CpuSampler:
    """Process resident set size (RSS) and its lifetime peak, for runs without a GPU."""

    metrics = CPU_METRICS
    memory_kind = "rss_bytes"

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


def _held_bytes(pl_module: LightningModule, optimizers) -> dict[str, int]:
    """Bytes of the module's parameters and of the optimizers' state tensors held by this
    process (a sharded tensor counts its local shard)."""
    def size(tensors) -> int:
        unique = {id(t): local(t) for t in tensors if isinstance(t, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in unique.values())

    states = (v for opt in optimizers for state in opt.state.values() for v in state.values())
    return {"parameter_bytes": size(pl_module.parameters()), "optimizer_state_bytes": size(states)}


def _peak_rss_bytes(process: psutil.Process) -> int | None:
    """The process's peak RSS since it started (ru_maxrss is KiB on Linux, bytes on macOS)."""
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    peak = getattr(process.memory_info(), "peak_wset", None)  # Windows
    return None if peak is None else int(peak)


def _root_device(trainer: Trainer) -> torch.device:
    return trainer.strategy.root_device


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


# --------------------------------------------------------------------------------------------
# Buffered CSV file
# --------------------------------------------------------------------------------------------


class _CsvBuffer:
    """Rows kept in memory and appended to ``path`` every ``flush_every`` rows and on close."""

    def __init__(
        self, path: Path, columns: tuple[str, ...], flush_every: int = _FLUSH_EVERY
    ) -> None:
        self.path = path
        self.columns = columns
        self.flush_every = flush_every
        self.rows: list[dict] = []
        self.count = 0
        self._started = False

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.rows and self._started:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a" if self._started else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if not self._started:
                writer.writeheader()
            writer.writerows(self.rows)
        self._started = True
        self.rows.clear()


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------

_PHASES = {"train": "train", "validation": "validation", "test": "test", "predict": "predict"}


class GPUMemoryProfiler(Callback):
    """Record device memory per batch (all stages) and per decoding step (generation).

    Args:
        every_n_steps: record every n-th batch of each phase (train, validation, test, predict),
            counting from the first. Decoding steps are recorded for recorded batches only.
        dirpath: folder for ``memory_<stage>.csv/.png``, generation files and snapshots.
            Default: ``trainer.log_dir`` (the first logger's log directory), else the trainer's
            ``default_root_dir`` (e.g. under ``fast_dev_run``, which has no real logger). With several processes every rank writes its own files,
            suffixed ``_rank<global_rank>``.
        plot: write PNG plots next to the CSVs (needs matplotlib; skipped with a warning without).
        snapshot: on CUDA, record the caching allocator's history from stage start and dump a
            pickle for https://pytorch.org/memory_viz at stage end and when the run raises (an
            out-of-memory error included). Ignored with a warning on other devices.
        snapshot_max_entries: allocation events kept by the snapshot's ring buffer.
        name: tells several profilers of one run apart: files become ``memory_<name>_<stage>...``
            and logged keys ``memory/<name>/<phase>/...``. Two profilers that would write the
            same files warn at setup.

    Note:
        On CUDA the callback calls ``torch.cuda.reset_peak_memory_stats`` at the start of every
        recorded batch so that ``peak_allocated_bytes`` is the peak *of that batch*. The reset is
        process-wide: anything else that reads ``torch.cuda.max_memory_allocated`` in this process
        sees it too.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        dirpath: str | Path | None = None,
        plot: bool = True,
        snapshot: bool = False,
        snapshot_max_entries: int = 100_000,
        name: str | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"GPUMemoryProfiler: every_n_steps must be an integer >= 1, got {every_n_steps!r}"
            )
        if snapshot_max_entries < 1:
            raise ValueError(
                f"GPUMemoryProfiler: snapshot_max_entries must be >= 1, got {snapshot_max_entries!r}"
            )
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self.plot = plot
        self.snapshot = snapshot
        self.snapshot_max_entries = snapshot_max_entries
        self.name = name
        self._prefix = f"memory_{name}" if name else "memory"
        self._said_cpu = False
        self._said_snapshot_cpu = False
        self._reset_stage_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, dirpath=str(self.dirpath), name=self.name)

    def output_dir(self, trainer: Trainer) -> Path:
        """Where this profiler writes its files in ``trainer``'s run."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    # ---------------------------------------------------------------- stage start / end

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._reset_stage_state()
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum)
        self._stage = stage
        device = _root_device(trainer)
        self._device_type = device.type
        if device.type == "cuda":
            self._sampler = _CudaSampler(device)
        else:
            self._sampler = _CpuSampler(device)
            if not self._said_cpu:
                rank_zero_info(
                    f"GPUMemoryProfiler: no CUDA device (running on {device.type!r}); recording process RSS "
                    "(`rss_bytes`) and peak RSS (`peak_rss_bytes`) instead of GPU memory."
                )
                self._said_cpu = True
        self._dir = self.output_dir(trainer)
        for other in trainer.callbacks:
            if other is not self and isinstance(other, GPUMemoryProfiler) and other._prefix == self._prefix:
                if other.output_dir(trainer) == self._dir:
                    rank_zero_warn(
                        f"GPUMemoryProfiler: two profilers write {self._prefix}_* files to {self._dir}: "
                        "give each a different `name` (or `dirpath`)."
                    )
        self._suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self._batches = _CsvBuffer(
            self._path(f"{self._prefix}_{stage}", ".csv"), BATCH_KEYS + self._sampler.metrics
        )
        self._generation = _CsvBuffer(
            self._path(f"{self._prefix}_{stage}_generation", ".csv"), GENERATION_KEYS
        )
        self._t0 = time.perf_counter()
        self._start_snapshot()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish(snapshot_name=f"{self._prefix}_snapshot_{self._stage}")

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Keep what was recorded, and dump the allocator snapshot before the exception propagates."""
        if self._stage is None:
            return
        kind = "oom" if isinstance(exception, torch.OutOfMemoryError) else "exception"
        try:
            self._finish(snapshot_name=f"{self._prefix}_snapshot_{self._stage}_{kind}")
        except Exception as err:  # never mask the run's own error
            rank_zero_warn(f"GPUMemoryProfiler: could not save memory records after {kind}: {err}")

    def _finish(self, snapshot_name: str) -> None:
        if self._stage is None:
            return
        written = []
        for buffer in (self._batches, self._generation):
            if buffer.count:
                buffer.flush()
                written.append(buffer)
        self._stop_snapshot(snapshot_name)
        if self.plot and written:
            self._plot(written)
        self._stage = None

    def _reset_stage_state(self) -> None:
        self._stage: str | None = None
        self._sampler = None
        self._seen: dict[str, int] = {}
        self._record_current = False
        self._phase = None
        self._batch_idx = -1
        self._run = -1
        self._last_step: int | None = None
        self._last_run_batch: tuple | None = None
        self._snapshot_active = False

    def _path(self, stem: str, ext: str) -> Path:
        return self._dir / f"{stem}{self._suffix}{ext}"

    # ---------------------------------------------------------------- per batch

    def _batch_start(self, trainer: Trainer, phase: str, batch_idx: int) -> None:
        if self._stage is None or trainer.sanity_checking:
            self._record_current = False
            return
        seen = self._seen.get(phase, 0)
        self._seen[phase] = seen + 1
        self._phase = phase
        self._batch_idx = batch_idx
        self._record_current = seen % self.every_n_steps == 0
        if self._record_current:
            self._sampler.begin_batch()

    def _batch_end(
        self, trainer: Trainer, pl_module: LightningModule, phase: str, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._record_current or self._stage is None:
            return
        self._record_current = False
        metrics = self._sampler.sample()
        step = self._log_step(trainer, phase)
        row = {
            "stage": self._stage,
            "phase": phase,
            "step": step,
            "batch_idx": batch_idx,
            "dataloader_idx": dataloader_idx,
            "elapsed_s": round(time.perf_counter() - self._t0, 6),
            "device": self._sampler.label,
            **_held_bytes(pl_module, trainer.optimizers),
            **metrics,
        }
        self._batches.add(row)
        if trainer.loggers:
            key = f"memory/{self.name}/{phase}" if self.name else f"memory/{phase}"
            logged = {f"{key}/{k}": float(v) for k, v in metrics.items() if v is not None}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)

    def _log_step(self, trainer: Trainer, phase: str) -> int:
        """Fit shares the step of ``self.log``; other stages count their own batches."""
        if self._stage == "fit":
            loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
            return int(getattr(loop, "_batches_that_stepped", trainer.global_step))
        return self._seen[phase] - 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start(trainer, "train", batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_end(trainer, pl_module, "train", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(trainer, "validation", batch_idx)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._batch_end(trainer, pl_module, "validation", batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(trainer, "test", batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, pl_module, "test", batch_idx, dataloader_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(trainer, "predict", batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, pl_module, "predict", batch_idx, dataloader_idx)

    # ---------------------------------------------------------------- generation view

    def on_generation_step(
        self, trainer: Trainer, pl_module: LightningModule, event: Any
    ) -> None:
        """One decoding step (a ``StepEvent``) of the batch being decoded; called by the module."""
        if self._stage is None or not self._record_current:
            return
        # A new decoding run starts with a new batch or when the step counter does not advance.
        key = (self._phase, self._seen[self._phase])
        if key != self._last_run_batch or self._last_step is None or event.step <= self._last_step:
            self._run += 1
            self._last_run_batch = key
        self._last_step = event.step
        self._generation.add(
            {
                "phase": self._phase,
                "batch_idx": self._batch_idx,
                "run": self._run,
                "step": event.step,
                "sequence_length": event.sequence_length,
                "live_rows": event.live_rows,
                "kv_bytes": event.kv_bytes,
                "memory_bytes": self._sampler.current(),
                "memory_kind": self._sampler.memory_kind,
                "device": self._sampler.label,
                "decision": int(bool(event.decision)),
                "rejected_rows": event.rejected_rows,
                "ended_rows": event.ended_rows,
                "round": event.round,
                "num_prompts": event.num_prompts,
            }
        )

    # ---------------------------------------------------------------- snapshots

    def _start_snapshot(self) -> None:
        if not self.snapshot:
            return
        if self._device_type != "cuda":
            if not self._said_snapshot_cpu:
                rank_zero_warn(
                    f"GPUMemoryProfiler(snapshot=True) needs a CUDA device; running on {self._device_type!r}, "
                    "so no allocator snapshot will be recorded."
                )
                self._said_snapshot_cpu = True
            return
        try:
            torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
        except Exception as err:  # private API: a profiling aid must not stop the run
            rank_zero_warn(
                f"GPUMemoryProfiler: could not start recording allocator history ({err}); no snapshot."
            )
            return
        self._snapshot_active = True

    def _stop_snapshot(self, name: str) -> None:
        if not self._snapshot_active:
            return
        self._snapshot_active = False
        path = self._path(name, ".pickle")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            rank_zero_info(
                f"GPUMemoryProfiler: allocator snapshot saved to {path} (open it at pytorch.org/memory_viz)"
            )
        except Exception as err:
            rank_zero_warn(
                f"GPUMemoryProfiler: could not write the allocator snapshot {path}: {err}"
            )
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    # ---------------------------------------------------------------- plots

    def _plot(self, buffers: list[_CsvBuffer]) -> None:
        """Draw the PNGs from the written CSVs. A missing matplotlib or a plotting error is a warning."""
        try:
            from lightning_sr.callbacks import memory_plots

            for buffer in buffers:
                target = buffer.path.with_suffix(".png")
                if buffer is self._generation:
                    memory_plots.plot_generation(buffer.path, target)
                else:
                    memory_plots.plot_batches(buffer.path, target)
        except ImportError as err:
            rank_zero_warn(
                f"GPUMemoryProfiler: matplotlib is not importable ({err}); plot skipped, CSVs are in {self._dir}"
            )
        except Exception as err:  # a plot must never fail the run
            rank_zero_warn(
                f"GPUMemoryProfiler: plot skipped after an error ({type(err).__name__}: {err})"
            )
