"""GPUMemoryProfiler: memory per batch for fit/validate/test/predict, and per decoding step.

Like Lightning's ``DeviceStatsMonitor``, the callback samples the device once per recorded batch,
at the batch's end, and logs the sample through ``trainer.loggers`` under ``memory/<phase>/...``
keys (``pl_module.log`` is not allowed in predict hooks, ``logger.log_metrics`` is). Unlike it, it
also keeps every sample as a CSV row, ``memory_<stage>.csv``, plotted to ``memory_<stage>.png`` at
stage end. Inside generation the SpeculativeRejectionModule calls
:meth:`GPUMemoryProfiler.on_generation_step` once per decoding step; those rows go to
``memory_<stage>_generation.csv`` and a plot in the style of the paper's Figure 1 (memory and live
rows over generated length, rejection points marked).

What a sample holds is the sampler's business (:mod:`lightning_sr.callbacks.memory_samplers`):
on CUDA ``torch.cuda.memory_stats`` (allocated, reserved, peak allocated since the batch began,
OOM and allocator-retry counts) plus NVML's device-wide used memory when ``pynvml`` (package
``nvidia-ml-py``) is importable; on any other device the process RSS and peak RSS, labelled as
such. Rows are buffered by :class:`~lightning_sr.callbacks.memory_csv.CsvBuffer` and written
every ``FLUSH_EVERY`` rows, at stage end and when the run raises.

Every row also counts what this process holds of the model and the optimizers
(``parameter_bytes``, ``optimizer_state_bytes``): under sharding (FSDP2) that is this rank's shard,
so the per-rank files show how parameter and optimizer memory fall with the number of ranks,
which process RSS (imports, allocator caches, gathered layers) hides.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_sr.callbacks.memory_csv import CsvBuffer
from lightning_sr.callbacks.memory_samplers import held_bytes, sampler_for
from lightning_sr.lightning_packages import Callback

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)
rank_zero_info = rank_zero_only(log.info)

BATCH_KEYS = ("stage", "phase", "step", "batch_idx", "dataloader_idx", "elapsed_s", "device",
              "parameter_bytes", "optimizer_state_bytes")
"""The first columns of ``memory_<stage>.csv``; the sampler's ``metrics`` follow."""
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
"""The columns of ``memory_<stage>_generation.csv``, one row per decoding step."""


def _root_device(trainer: Trainer) -> torch.device:
    """The device this process computes on (one place, so tests can pretend it is CUDA)."""
    return trainer.strategy.root_device


class GPUMemoryProfiler(Callback):
    """Record device memory per batch (all stages) and per decoding step (generation).

    Args:
        every_n_steps: record every n-th batch of each phase (train, validation, test, predict),
            counting from the first. Decoding steps are recorded for recorded batches only.
        dirpath: folder for ``memory_<stage>.csv/.png``, generation files and snapshots.
            Default: ``trainer.log_dir`` (the first logger's log directory), else the trainer's
            ``default_root_dir`` (e.g. under ``fast_dev_run``, which has no real logger). With
            several processes every rank writes its own files, suffixed ``_rank<global_rank>``.
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
        sees it too. It is the only such reset in lightning-sr (the generation engine does not
        reset), so a predict batch's peak includes its decoding.
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
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, dirpath=str(self.dirpath), name=self.name)

    def output_dir(self, trainer: Trainer) -> Path:
        """Where this profiler writes its files in ``trainer``'s run."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    # ---------------------------------------------------------------- stage start / end

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._reset_stage_state()
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum)
        self._stage = stage
        device = _root_device(trainer)
        self._device_type = device.type
        self._sampler = sampler_for(device)
        if device.type != "cuda" and not self._said_cpu:
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
        self._batches = CsvBuffer(
            self._path(f"{self._prefix}_{stage}", ".csv"), BATCH_KEYS + self._sampler.metrics
        )
        self._generation = CsvBuffer(
            self._path(f"{self._prefix}_{stage}_generation", ".csv"), GENERATION_KEYS
        )
        self._t0 = time.perf_counter()
        self._start_snapshot()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish(snapshot_name=f"{self._prefix}_snapshot_{self._stage}")

    @override
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
            **held_bytes(pl_module, trainer.optimizers),
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

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start(trainer, "train", batch_idx)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_end(trainer, pl_module, "train", batch_idx)

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(trainer, "validation", batch_idx)

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._batch_end(trainer, pl_module, "validation", batch_idx, dataloader_idx)

    @override
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(trainer, "test", batch_idx)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, pl_module, "test", batch_idx, dataloader_idx)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(trainer, "predict", batch_idx)

    @override
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

    def _plot(self, buffers: list[CsvBuffer]) -> None:
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
