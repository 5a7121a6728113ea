"""GPUMemoryProfiler: CPU path end to end, generation view, CUDA path with torch.cuda mocked."""

from __future__ import annotations

import csv
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import lightning_sr.callbacks.memory as memory
import lightning_sr.callbacks.memory_csv as memory_csv
import lightning_sr.callbacks.memory_samplers as memory_samplers
from lightning_sr.callbacks import config_path
from lightning_sr.callbacks.memory import GPUMemoryProfiler
from lightning_sr.generation.results import StepEvent
from lightning_sr.lightning_packages import LightningModule

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


class Recording:
    """Keeps every (metrics, step) a logger was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((dict(metrics), step))
        if hasattr(super(), "log_metrics"):
            super().log_metrics(metrics, step)

    def keys(self) -> set[str]:
        return {k for metrics, _ in self.logged for k in metrics}


def recording_logger(L, path):
    """A CSVLogger of package ``L`` that also keeps every (metrics, step) it was given."""
    return type("RecordingLogger", (Recording, L.sub("loggers").CSVLogger), {})(path)


def boring(L):
    return L.sub("demos.boring_classes").BoringModel


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_matplotlib_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert b"Matplotlib" in data, f"{path} was not written by matplotlib"


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


# ------------------------------------------------------------------------------- CPU end to end


def test_fit_writes_rows_per_batch_png_and_logs(L, tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(memory, "rank_zero_info", said.append)
    logger = recording_logger(L, tmp_path)
    profiler = GPUMemoryProfiler()
    trainer = L.Trainer(callbacks=[profiler], logger=logger, **trainer_kwargs(tmp_path))
    trainer.fit(boring(L)())

    out = Path(logger.log_dir)  # default dirpath: the logger's log directory
    rows = read_csv(out / "memory_fit.csv")
    # 4 train batches and 2 validation batches; the sanity check is not recorded.
    assert [(r["phase"], r["batch_idx"]) for r in rows] == [("train", str(i)) for i in range(4)] + [
        ("validation", "0"),
        ("validation", "1"),
    ]
    assert {r["device"] for r in rows} == {"cpu"}
    for r in rows:
        assert int(r["rss_bytes"]) > 0
        assert int(r["peak_rss_bytes"]) >= int(r["rss_bytes"])
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0  # seconds since the stage began
    assert "allocated_bytes" not in rows[0]  # CPU numbers are labelled as RSS, not GPU memory
    assert_matplotlib_png(out / "memory_fit.png")

    keys = logger.keys()
    assert {
        "memory/train/rss_bytes",
        "memory/train/peak_rss_bytes",
        "memory/validation/rss_bytes",
    } <= keys
    train_steps = [step for metrics, step in logger.logged if "memory/train/rss_bytes" in metrics]
    assert train_steps == [0, 1, 2, 3]
    # The metrics reached the CSVLogger's file too.
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "memory/train/rss_bytes" in header

    # The CPU fallback is announced once, even across stages.
    trainer.validate(boring(L)(), verbose=False)
    assert len([m for m in said if "recording process RSS" in m]) == 1


def test_predict_every_n_steps_logs_through_loggers(L, tmp_path):
    logger = recording_logger(L, tmp_path)
    profiler = GPUMemoryProfiler(every_n_steps=2, dirpath=tmp_path / "mem")
    trainer = L.Trainer(callbacks=[profiler], logger=logger, **trainer_kwargs(tmp_path))
    model = boring(L)()
    trainer.predict(
        model,
        dataloaders=DataLoader(model.val_dataloader().dataset, batch_size=2),
        return_predictions=False,
    )

    rows = read_csv(tmp_path / "mem" / "memory_predict.csv")
    assert len(model.val_dataloader().dataset) // 2 == 32
    assert [int(r["batch_idx"]) for r in rows] == list(range(0, 32, 2))
    assert {r["phase"] for r in rows} == {"predict"}
    assert_matplotlib_png(tmp_path / "mem" / "memory_predict.png")
    predict_logs = [(m, s) for m, s in logger.logged if "memory/predict/rss_bytes" in m]
    assert [s for _, s in predict_logs] == list(range(0, 32, 2))


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_stages(L, tmp_path, stage):
    profiler = GPUMemoryProfiler(dirpath=tmp_path)
    trainer = L.Trainer(
        callbacks=[profiler], logger=False, **trainer_kwargs(tmp_path, limit_test_batches=3)
    )
    getattr(trainer, stage)(boring(L)(), verbose=False)
    rows = read_csv(tmp_path / f"memory_{stage}.csv")
    assert len(rows) == (2 if stage == "validate" else 3)
    assert {r["stage"] for r in rows} == {stage}
    assert_matplotlib_png(tmp_path / f"memory_{stage}.png")


def test_default_dirpath_without_logger_is_root_dir(L, tmp_path):
    trainer = L.Trainer(callbacks=[GPUMemoryProfiler()], logger=False, **trainer_kwargs(tmp_path))
    trainer.fit(boring(L)())
    assert len(read_csv(tmp_path / "memory_fit.csv")) == 6


def test_exception_keeps_rows_and_propagates(L, tmp_path):
    class Failing(boring(L)):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom at batch 2")
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(
        callbacks=[GPUMemoryProfiler(dirpath=tmp_path)], logger=False, **trainer_kwargs(tmp_path)
    )
    with pytest.raises(RuntimeError, match="boom at batch 2"):
        trainer.fit(Failing())
    rows = read_csv(tmp_path / "memory_fit.csv")
    assert [r["batch_idx"] for r in rows] == ["0", "1"]


def test_failing_to_save_after_an_exception_warns_and_keeps_the_runs_error(L, tmp_path):
    class Failing(boring(L)):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom at batch 2")
            return super().training_step(batch, batch_idx)

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the profiler wants a folder")
    trainer = L.Trainer(
        callbacks=[GPUMemoryProfiler(dirpath=blocker / "mem")], logger=False, **trainer_kwargs(tmp_path)
    )
    with pytest.warns(UserWarning, match="could not save memory records after exception"):
        with pytest.raises(RuntimeError, match="boom at batch 2"):
            trainer.fit(Failing())


def test_cpu_peak_rss_is_in_bytes_and_outlives_a_freed_allocation():
    sampler = memory_samplers.CpuSampler(torch.device("cpu"))
    spike = torch.ones(32 * 2**20, dtype=torch.float32)  # 128 MiB, touched
    during = sampler.current()
    del spike
    sample = sampler.sample()
    # ru_maxrss is KiB on Linux: read as bytes it would be ~1000x below the RSS
    assert sample["peak_rss_bytes"] >= during - 2**20
    assert sample["peak_rss_bytes"] >= sample["rss_bytes"] + 64 * 2**20  # the freed spike still counts


def test_without_matplotlib_writes_csv_and_says_plot_skipped(L, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(
            sys.modules, name, None
        )  # `import matplotlib...` now raises ImportError
    monkeypatch.delitem(sys.modules, "lightning_sr.callbacks.memory_plots", raising=False)
    trainer = L.Trainer(
        callbacks=[GPUMemoryProfiler(dirpath=tmp_path)], logger=False, **trainer_kwargs(tmp_path)
    )
    with pytest.warns(UserWarning, match="plot skipped"):
        trainer.fit(boring(L)())
    assert len(read_csv(tmp_path / "memory_fit.csv")) == 6
    assert not (tmp_path / "memory_fit.png").exists()


def test_snapshot_on_cpu_warns_once_and_does_nothing(L, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(("record", a, k))
    )
    monkeypatch.setattr(
        torch.cuda.memory, "_dump_snapshot", lambda *a, **k: calls.append(("dump", a, k))
    )
    profiler = GPUMemoryProfiler(dirpath=tmp_path, snapshot=True)
    trainer = L.Trainer(callbacks=[profiler], logger=False, **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="needs a CUDA device") as record:
        trainer.fit(boring(L)())
        trainer.validate(boring(L)(), verbose=False)
    assert len([w for w in record if "needs a CUDA device" in str(w.message)]) == 1
    assert calls == []
    assert not list(tmp_path.glob("*.pickle"))


# ------------------------------------------------------------------------------- composition


def test_runs_with_device_stats_checkpoint_user_callback_and_a_second_instance(L, tmp_path):
    class CountBatches(L.Callback):
        def __init__(self):
            self.batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1

    every, every_other = GPUMemoryProfiler(dirpath=tmp_path / "a"), GPUMemoryProfiler(
        2, dirpath=tmp_path / "b"
    )
    assert every.state_key != every_other.state_key
    assert GPUMemoryProfiler(dirpath="x").state_key != GPUMemoryProfiler(dirpath="y").state_key
    counter = CountBatches()
    logger = recording_logger(L, tmp_path)
    callbacks = [
        L.sub("callbacks").DeviceStatsMonitor(),
        L.sub("callbacks").ModelCheckpoint(dirpath=tmp_path / "ckpt"),
        every,
        every_other,
        counter,
    ]
    trainer = L.Trainer(
        callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, enable_checkpointing=True)
    )
    trainer.fit(boring(L)())

    assert counter.batches == 4
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 1
    assert [r["phase"] for r in read_csv(tmp_path / "a" / "memory_fit.csv")].count("train") == 4
    assert [r["phase"] for r in read_csv(tmp_path / "b" / "memory_fit.csv")].count("train") == 2
    keys = logger.keys()
    assert "memory/train/rss_bytes" in keys
    assert any(k.startswith("DeviceStatsMonitor") for k in keys)


@pytest.mark.parametrize("spelling", ["repo file", "packaged file", "class path", "short name"])
def test_a_projects_own_cli_appends_the_profiler(L, tmp_path, spelling):
    entries = yaml.safe_load(config_path("memory").read_text())
    assert [e["class_path"] for e in entries] == ["lightning_sr.callbacks.GPUMemoryProfiler"]
    assert (REPO / "callbacks" / "memory.yaml").read_text() == config_path("memory").read_text()
    added = {
        "repo file": f"--trainer.callbacks+={REPO / 'callbacks' / 'memory.yaml'}",
        "packaged file": f"--trainer.callbacks+={config_path('memory')}",
        "class path": "--trainer.callbacks+=lightning_sr.callbacks.GPUMemoryProfiler",
        "short name": "--trainer.callbacks+=GPUMemoryProfiler",
    }[spelling]
    if spelling == "short name":
        import lightning_sr.lightning_packages as packages

        packages.for_package(GPUMemoryProfiler, L.name)  # a short name needs the class imported
    cli = L.sub("cli").LightningCLI(
        boring(L),
        run=False,
        save_config_callback=None,
        seed_everything_default=0,
        args=["--trainer.callbacks+=ModelCheckpoint", added,
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
    )
    profilers = [cb for cb in cli.trainer.callbacks if isinstance(cb, GPUMemoryProfiler)]
    assert len(profilers) == 1 and isinstance(profilers[0], L.Callback)
    assert any(isinstance(cb, L.sub("callbacks").ModelCheckpoint) for cb in cli.trainer.callbacks)


def test_fast_dev_run_writes_under_default_root_dir(L, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    trainer = L.Trainer(callbacks=[GPUMemoryProfiler()], fast_dev_run=2, default_root_dir=root,
                        logger=L.sub("loggers").CSVLogger(tmp_path / "logs"),  # fast_dev_run swaps it out
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(boring(L)())
    assert len(read_csv(root / "memory_fit.csv")) == 4  # 2 train + 2 validation batches
    assert not list(tmp_path.glob("memory_*"))


def test_two_named_profilers_have_their_own_keys_and_files_and_a_clash_warns(L, tmp_path):
    logger = recording_logger(L, tmp_path)
    fast, slow = GPUMemoryProfiler(name="fast", plot=False), GPUMemoryProfiler(every_n_steps=2, name="slow", plot=False)
    assert fast.state_key != slow.state_key
    trainer = L.Trainer(callbacks=[fast, slow], logger=logger, **trainer_kwargs(tmp_path))
    trainer.fit(boring(L)())
    out = Path(logger.log_dir)
    assert len(read_csv(out / "memory_fast_fit.csv")) == 6 and len(read_csv(out / "memory_slow_fit.csv")) == 3
    keys = logger.keys()
    assert {"memory/fast/train/rss_bytes", "memory/slow/train/rss_bytes"} <= keys
    assert not any(key.startswith("memory/train") for key in keys)
    clash = L.Trainer(callbacks=[GPUMemoryProfiler(dirpath=tmp_path), GPUMemoryProfiler(2, dirpath=tmp_path)],
                      logger=False, **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="two profilers write memory_\\* files"):
        clash.fit(boring(L)())


# ------------------------------------------------------------------------------- generation view


def decoding_events(
    rows: int, steps: int, rejections: dict[int, int], prompt_len: int = 5, ended: dict[int, int] | None = None
) -> list[StepEvent]:
    """Synthetic StepEvents: ``rows`` live rows, ``rejections[step]`` rows dropped at that step,
    ``ended[step]`` rows ending there."""
    events, live, rounds = [], rows, 0
    ended = ended or {}
    for step in range(1, steps + 1):
        dropped = rejections.get(step, 0)
        live -= dropped + ended.get(step, 0)
        rounds += step in rejections
        events.append(
            StepEvent(
                step=step,
                sequence_length=prompt_len + step,
                live_rows=live,
                kv_bytes=live * (prompt_len + step) * 64,
                rejected_rows=dropped,
                ended_rows=ended.get(step, 0),
                decision=step in rejections,
                round=rounds,
                num_prompts=2,
            )
        )
    return events


class SyntheticGeneration(LightningModule):
    """predict_step calls the generation hooks on trainer.callbacks, as SpeculativeRejectionModule does."""

    def __init__(self, schedules: list[list[StepEvent]]):
        super().__init__()
        self.schedules = schedules
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        for event in self.schedules[batch_idx]:
            for callback in self.trainer.callbacks:
                if callable(getattr(callback, "on_generation_step", None)):
                    callback.on_generation_step(self.trainer, self, event)
        for callback in self.trainer.callbacks:
            if callable(getattr(callback, "on_generation_end", None)):
                callback.on_generation_end(self.trainer, self, [])
        return batch_idx


def test_generation_view_records_each_decoding_step_and_rejections(L, tmp_path):
    schedules = [
        decoding_events(rows=8, steps=12, rejections={4: 4, 8: 2}, ended={10: 1}),
        decoding_events(rows=6, steps=9, rejections={3: 3}),
        # one batch, two decoding runs: the step counter starts again
        decoding_events(rows=4, steps=3, rejections={2: 2}) + decoding_events(rows=4, steps=2, rejections={}),
    ]
    logger = recording_logger(L, tmp_path)
    trainer = L.Trainer(
        callbacks=[GPUMemoryProfiler(dirpath=tmp_path)], logger=logger, **trainer_kwargs(tmp_path)
    )
    trainer.predict(SyntheticGeneration(schedules), dataloaders=DataLoader(range(3), batch_size=1))

    rows = read_csv(tmp_path / "memory_predict_generation.csv")
    assert len(rows) == 12 + 9 + 3 + 2  # one row per decoding step
    fields = ("step", "sequence_length", "live_rows", "kv_bytes", "rejected_rows", "ended_rows", "round",
              "num_prompts")
    for batch_idx, events in enumerate(schedules):
        got = [r for r in rows if r["batch_idx"] == str(batch_idx)]
        assert [tuple(int(r[f]) for f in fields) for r in got] == [
            tuple(getattr(e, f) for f in fields) for e in events
        ]
        assert [int(r["decision"]) for r in got] == [int(e.decision) for e in events]
        assert all(r["memory_kind"] == "rss_bytes" and int(r["memory_bytes"]) > 0 for r in got)
        assert {r["phase"] for r in got} == {"predict"}
    assert [int(r["ended_rows"]) for r in rows if r["batch_idx"] == "0"].count(1) == 1
    runs = [r["run"] for r in rows]
    assert runs == ["0"] * 12 + ["1"] * 9 + ["2"] * 3 + ["3"] * 2
    assert_matplotlib_png(tmp_path / "memory_predict_generation.png")
    assert len(read_csv(tmp_path / "memory_predict.csv")) == 3


def test_generation_view_follows_every_n_steps(L, tmp_path):
    schedules = [decoding_events(4, 3, {2: 2}) for _ in range(3)]
    trainer = L.Trainer(
        callbacks=[GPUMemoryProfiler(every_n_steps=2, dirpath=tmp_path, plot=False)],
        logger=False,
        **trainer_kwargs(tmp_path),
    )
    trainer.predict(SyntheticGeneration(schedules), dataloaders=DataLoader(range(3), batch_size=1))
    rows = read_csv(tmp_path / "memory_predict_generation.csv")
    assert sorted({r["batch_idx"] for r in rows}) == ["0", "2"]
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------------- CUDA path, mocked


class FakeAllocator:
    """Stands in for the CUDA caching allocator's statistics."""

    def __init__(self, base: int = 1000):
        self.current = self.peak = base
        self.reserved = 4096
        self.num_ooms = 0
        self.retries = 0
        self.resets: list = []

    def alloc(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)
        self.reserved = max(self.reserved, self.current)

    def free(self, n: int) -> None:
        self.current -= n

    def memory_stats(self, device=None):
        return {
            "allocated_bytes.all.current": self.current,
            "allocated_bytes.all.peak": self.peak,
            "reserved_bytes.all.current": self.reserved,
            "num_ooms": self.num_ooms,
            "num_alloc_retries": self.retries,
        }

    def reset_peak_memory_stats(self, device=None):
        self.resets.append(device)
        self.peak = self.current


class FakeNVML(types.ModuleType):
    """A pynvml module: one device whose used memory is settable; can be told to fail."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.used = 7 * 2**30
        self.fail = False
        self.asked_uuid = None

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked_uuid = uuid
        return "handle"

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.fail:
            raise self.NVMLError("driver went away")
        return types.SimpleNamespace(used=self.used, total=80 * 2**30, free=0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory functions and NVML replaced by fakes; a cuda:0 root device."""
    allocator = FakeAllocator()
    nvml = FakeNVML()
    calls: list = []

    def record_history(*args, **kwargs):
        calls.append(("record", args, kwargs))

    def dump_snapshot(path):
        calls.append(("dump", path))
        with open(path, "wb") as f:
            pickle.dump({"segments": [], "device_traces": [[]]}, f)

    monkeypatch.setattr(torch.cuda, "memory_stats", allocator.memory_stats)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", allocator.reset_peak_memory_stats)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="abc-123")
    )
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record_history)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump_snapshot)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return types.SimpleNamespace(allocator=allocator, nvml=nvml, calls=calls)


MODULE = torch.nn.Linear(3, 2)  # what the fake trainer trains: 8 float32 parameters


def fake_trainer(tmp_path, device="cuda", world_size=1, global_rank=0, stepped=7):
    logger = Recording()
    return types.SimpleNamespace(
        callbacks=[],
        default_root_dir=str(tmp_path),
        strategy=types.SimpleNamespace(
            root_device=torch.device(device, 0) if device == "cuda" else torch.device(device)
        ),
        loggers=[logger],
        log_dir=str(tmp_path),
        global_rank=global_rank,
        world_size=world_size,
        sanity_checking=False,
        optimizers=[],
        global_step=stepped,
        fit_loop=types.SimpleNamespace(
            epoch_loop=types.SimpleNamespace(_batches_that_stepped=stepped)
        ),
    )


def test_cuda_path_arithmetic(tmp_path, fake_cuda):
    alloc = fake_cuda.allocator
    trainer = fake_trainer(tmp_path)
    profiler = GPUMemoryProfiler(plot=False)
    profiler.setup(trainer, None, "fit")
    assert fake_cuda.nvml.asked_uuid == "GPU-abc-123"

    profiler.on_train_batch_start(trainer, None, None, 0)
    alloc.alloc(500)
    alloc.free(300)  # batch 0: peak 1500, ends at 1200
    alloc.num_ooms, alloc.retries = 1, 3
    profiler.on_train_batch_end(trainer, MODULE, None, None, 0)

    trainer.fit_loop.epoch_loop._batches_that_stepped = 8
    profiler.on_train_batch_start(trainer, None, None, 1)
    alloc.alloc(100)  # batch 1: peak since its start is 1300, not the earlier 1500
    fake_cuda.nvml.used = 9 * 2**30
    profiler.on_train_batch_end(trainer, MODULE, None, None, 1)

    fake_cuda.nvml.fail = True  # NVML errors are caught and the column goes empty
    profiler.on_train_batch_start(trainer, None, None, 2)
    with pytest.warns(UserWarning, match="NVML"):
        profiler.on_train_batch_end(trainer, MODULE, None, None, 2)
    fake_cuda.nvml.fail = False  # once dropped, NVML is not asked again in this stage
    profiler.on_train_batch_start(trainer, None, None, 3)
    profiler.on_train_batch_end(trainer, MODULE, None, None, 3)
    profiler.teardown(trainer, None, "fit")

    assert alloc.resets == [torch.device("cuda", 0)] * 4
    rows = read_csv(tmp_path / "memory_fit.csv")
    assert [r["device"] for r in rows] == ["cuda:0"] * 4
    assert [int(r["allocated_bytes"]) for r in rows] == [1200, 1300, 1300, 1300]
    assert [int(r["peak_allocated_bytes"]) for r in rows] == [1500, 1300, 1300, 1300]
    assert [r["nvml_used_bytes"] for r in rows] == [str(7 * 2**30), str(9 * 2**30), "", ""]
    assert [(r["num_ooms"], r["num_alloc_retries"]) for r in rows] == [("1", "3")] * 4
    assert "rss_bytes" not in rows[0]
    logged = trainer.loggers[0].logged
    assert [step for _, step in logged] == [7, 8, 8, 8]
    assert logged[0][0]["memory/train/peak_allocated_bytes"] == 1500
    assert logged[1][0]["memory/train/nvml_used_bytes"] == 9 * 2**30
    assert "memory/train/nvml_used_bytes" not in logged[2][0]


def test_cuda_peak_is_reset_only_for_recorded_batches(tmp_path, fake_cuda):
    trainer = fake_trainer(tmp_path)
    profiler = GPUMemoryProfiler(every_n_steps=2, plot=False)
    profiler.setup(trainer, None, "validate")
    for batch_idx in range(5):
        profiler.on_validation_batch_start(trainer, None, None, batch_idx, dataloader_idx=1)
        profiler.on_validation_batch_end(trainer, MODULE, None, None, batch_idx, dataloader_idx=1)
    profiler.teardown(trainer, None, "validate")
    assert fake_cuda.allocator.resets == [torch.device("cuda", 0)] * 3  # batches 0, 2 and 4
    rows = read_csv(tmp_path / "memory_validate.csv")
    assert [(r["batch_idx"], r["dataloader_idx"], r["step"]) for r in rows] == [
        ("0", "1", "0"), ("2", "1", "2"), ("4", "1", "4")
    ]


def test_cuda_generation_steps_record_allocated_memory(tmp_path, fake_cuda):
    trainer = fake_trainer(tmp_path)
    profiler = GPUMemoryProfiler(plot=False)
    profiler.setup(trainer, None, "predict")
    profiler.on_predict_batch_start(trainer, None, None, 0)
    for event in decoding_events(rows=4, steps=3, rejections={2: 2}):
        fake_cuda.allocator.alloc(event.kv_bytes)
        profiler.on_generation_step(trainer, None, event)
    profiler.on_predict_batch_end(trainer, MODULE, None, None, 0)
    profiler.teardown(trainer, None, "predict")
    rows = read_csv(tmp_path / "memory_predict_generation.csv")
    assert [r["memory_kind"] for r in rows] == ["allocated_bytes"] * 3
    expected, total = [], 1000
    for event in decoding_events(rows=4, steps=3, rejections={2: 2}):
        total += event.kv_bytes
        expected.append(total)
    assert [int(r["memory_bytes"]) for r in rows] == expected


def test_snapshot_recorded_at_stage_start_and_dumped_at_stage_end(tmp_path, fake_cuda):
    trainer = fake_trainer(tmp_path)
    profiler = GPUMemoryProfiler(plot=False, snapshot=True, snapshot_max_entries=123)
    profiler.setup(trainer, None, "fit")
    assert fake_cuda.calls == [("record", (), {"max_entries": 123})]
    profiler.on_train_batch_start(trainer, None, None, 0)
    profiler.on_train_batch_end(trainer, MODULE, None, None, 0)
    profiler.teardown(trainer, None, "fit")
    path = tmp_path / "memory_snapshot_fit.pickle"
    assert fake_cuda.calls[1:] == [("dump", str(path)), ("record", (), {"enabled": None})]
    assert pickle.loads(path.read_bytes())["segments"] == []


def test_snapshot_failure_warns_and_keeps_the_csv(tmp_path, fake_cuda, monkeypatch):
    def broken_dump(path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", broken_dump)
    trainer = fake_trainer(tmp_path)
    profiler = GPUMemoryProfiler(plot=False, snapshot=True)
    profiler.setup(trainer, None, "fit")
    profiler.on_train_batch_start(trainer, None, None, 0)
    profiler.on_train_batch_end(trainer, MODULE, None, None, 0)
    with pytest.warns(UserWarning, match="could not write the allocator snapshot"):
        profiler.teardown(trainer, None, "fit")
    assert len(read_csv(tmp_path / "memory_fit.csv")) == 1
    assert fake_cuda.calls[-1] == (
        "record",
        (),
        {"enabled": None},
    )  # recording stopped all the same


def test_oom_dumps_snapshot_and_rows_before_the_error_propagates(L, tmp_path, fake_cuda, monkeypatch):
    """A real Trainer on CPU, with the profiler told the root device is cuda:0 (all CUDA calls faked)."""
    monkeypatch.setattr(memory, "_root_device", lambda trainer: torch.device("cuda", 0))
    seen_when_raised = {}

    class OOMAtBatch2(boring(L)):
        def training_step(self, batch, batch_idx):
            fake_cuda.allocator.alloc(10)
            if batch_idx == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().training_step(batch, batch_idx)

    class SeeOnException(L.Callback):  # runs after the profiler's on_exception
        def on_exception(self, trainer, pl_module, exception):
            seen_when_raised["pickles"] = sorted(p.name for p in tmp_path.glob("*.pickle"))

    profiler = GPUMemoryProfiler(
        dirpath=tmp_path, plot=False, snapshot=True, snapshot_max_entries=50
    )
    trainer = L.Trainer(
        callbacks=[profiler, SeeOnException()], logger=False, **trainer_kwargs(tmp_path)
    )
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit(OOMAtBatch2())

    assert seen_when_raised["pickles"] == ["memory_snapshot_fit_oom.pickle"]
    assert fake_cuda.calls[0] == ("record", (), {"max_entries": 50})
    assert fake_cuda.calls[-2:] == [
        ("dump", str(tmp_path / "memory_snapshot_fit_oom.pickle")),
        ("record", (), {"enabled": None}),
    ]
    rows = read_csv(tmp_path / "memory_fit.csv")
    assert [int(r["allocated_bytes"]) for r in rows] == [1010, 1020]


def test_each_rank_writes_its_own_files(tmp_path):
    trainer = fake_trainer(tmp_path, device="cpu", world_size=2, global_rank=1)
    profiler = GPUMemoryProfiler(plot=False)
    profiler.setup(trainer, None, "predict")
    profiler.on_predict_batch_start(trainer, None, None, 0)
    profiler.on_generation_step(trainer, None, decoding_events(2, 1, {})[0])
    profiler.on_predict_batch_end(trainer, MODULE, None, None, 0)
    profiler.teardown(trainer, None, "predict")
    assert sorted(p.name for p in tmp_path.glob("memory_*")) == [
        "memory_predict_generation_rank1.csv",
        "memory_predict_rank1.csv",
    ]


def test_buffer_flushes_in_chunks_without_losing_rows(tmp_path):
    buffer = memory_csv.CsvBuffer(tmp_path / "x.csv", ("a",), flush_every=3)
    for i in range(7):
        buffer.add({"a": i})
    assert len(read_csv(tmp_path / "x.csv")) == 6  # two chunks on disk, one row pending
    buffer.flush()
    assert [int(r["a"]) for r in read_csv(tmp_path / "x.csv")] == list(range(7))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        GPUMemoryProfiler(every_n_steps=0)
    with pytest.raises(ValueError, match="snapshot_max_entries"):
        GPUMemoryProfiler(snapshot_max_entries=0)


def test_rows_count_the_parameter_and_optimizer_bytes_this_process_holds(tmp_path):
    """The per-rank drop under sharding shows in these columns (a shard counts its local part)."""
    trainer = fake_trainer(tmp_path, device="cpu")
    optimizer = torch.optim.Adam(MODULE.parameters())
    MODULE(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    trainer.optimizers = [optimizer]
    profiler = GPUMemoryProfiler(dirpath=str(tmp_path))
    profiler.setup(trainer, MODULE, "fit")
    profiler.on_train_batch_start(trainer, MODULE, None, 0)
    profiler.on_train_batch_end(trainer, MODULE, None, None, 0)
    profiler.teardown(trainer, MODULE, "fit")
    (row,) = read_csv(tmp_path / "memory_fit.csv")
    assert int(row["parameter_bytes"]) == 8 * 4
    # exp_avg and exp_avg_sq of both tensors, plus Adam's two 0-d step counters
    assert int(row["optimizer_state_bytes"]) == 2 * 8 * 4 + 2 * 4
