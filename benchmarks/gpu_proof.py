"""The GPU proof: every CUDA path and the headline figures in one command, within one short GPU window.

GPU time comes in windows of about 15 minutes, minutes of them spent starting the machine, at
most 10 minutes a command and at most 8 files back. This script is that one command. It runs its
phases in order of value, each in a process of its own under a time cap, so a slow or hung
phase is stopped and the next one still runs:

1. ``environment``: GPU, driver, CUDA, torch, transformers and Lightning versions and the date;
   the device's copy bandwidth (bytes read + written per second: the roofline's bandwidth); the
   embedded models built into the cache (the first use of SmolLM2 converts its GGUF file).
2. ``cuda_tests``: ``pytest -m cuda`` (CUDA graphs, sync-free decoding, the memory schedule's
   budget, the optimizers' device-side masks, FSDP2 on one GPU), then a quick subset of the suite.
3. ``sr_vs_bon``: Speculative Rejection against Best-of-N (N up to 512) on the embedded models,
   ``benchmarks/sr_vs_bon.py`` (the paper's metrics; target: >= 16x less compute at equal mean
   reward). It writes its results after every chunk of prompts: a phase stopped at its cap keeps
   its finished chunks.
4. ``memory``: GPUMemoryProfiler on CUDA: the paper's Figure 1 (memory and live rows over the
   generated length) of a Speculative Rejection predict whose KV budget comes from free GPU
   memory, beside Best-of-N's; a DPO fit with OnDARE (per-batch CSV); the allocator snapshot
   loaded by ``torch.cuda._memory_viz``; a forced out-of-memory error (the rows before it kept,
   the snapshot dumped); NVML; the profiler's step overhead (target <= 2%).
5. ``engine``: tokens/s of the engine against ``model.generate`` and against the HBM roofline at
   1, 64, 256 and 1,024 rows x 256 new tokens, bf16, SmolLM2-135M and a random 1B Llama
   (``benchmarks/engine_throughput.py``); CUDA-graph captures per call and their time.
6. ``optimizers``: OnDARE / OnTIES step time and state against ``torch.optim.AdamW(foreach=True)``
   on the 1B Llama (``benchmarks/optimizer_step.py``; targets <= 1.5x and <= 2x).

A phase's cap is its share of the time left (``--budget`` seconds in all): time one phase leaves
unused passes on to the later ones. At its cap a phase gets SIGTERM, then SIGKILL.

Files in ``--out`` (at most 8, what a GPU command can return): ``gpu_proof.json`` (every figure,
with the environment), ``gpu_proof.log`` (everything printed), ``sr_vs_bon.png``,
``engine_throughput.png``, ``memory_predict.png`` (Figure 1, SR beside BoN), ``memory_fit.csv``,
``memory_snapshot.pickle`` (the SR predict's allocator history, for pytorch.org/memory_viz) and
``oom_snapshot.pickle`` (dumped by the forced out-of-memory error). Intermediate files stay in a
temporary folder (``--work``).

Usage::

    python3 benchmarks/gpu_proof.py --out "$OUT"                       # GPU machine, ~9 minutes
    .venv/bin/python benchmarks/gpu_proof.py --dry-run --out /tmp/proof   # CPU, tiny random models

``--dry-run`` runs every phase on tiny random models on the CPU in about a minute (pytest only
collects): the test suite runs it, so the script cannot rot between GPU windows. README, "The
GPU proof", says how to stage the embedded models on the GPU machine first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
OUTPUT_FILES = ("gpu_proof.json", "gpu_proof.log", "sr_vs_bon.png", "engine_throughput.png", "memory_predict.png",
                "memory_fit.csv", "memory_snapshot.pickle", "oom_snapshot.pickle")  # fmt: skip
MAX_FILE_BYTES = 16 * 2**20
QUICK_TESTS = ["tests/test_generation.py", "tests/test_online_merging.py", "tests/test_memory_profiler.py",
               "tests/test_losses.py"]  # the engine, the optimizers, the profiler, the losses  # fmt: skip


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the time left when it starts (over the shares of the phases left)
    artifacts: tuple[tuple[str, str], ...] = ()  # (file in the work folder, name in --out)


PHASES = (
    Phase("environment", 0.12),
    Phase("cuda_tests", 0.13),
    Phase("sr_vs_bon", 0.28, (("sr_vs_bon/sr_vs_bon.png", "sr_vs_bon.png"),)),
    Phase("memory", 0.17, (("memory/memory_predict.png", "memory_predict.png"), ("memory/fit/memory_fit.csv", "memory_fit.csv"),
                           ("memory/sr/memory_snapshot_predict.pickle", "memory_snapshot.pickle"),
                           ("memory/oom/memory_snapshot_predict_oom.pickle", "oom_snapshot.pickle"))),
    Phase("engine", 0.20, (("engine/engine_throughput.png", "engine_throughput.png"),)),
    Phase("optimizers", 0.10),
)  # fmt: skip


# ----------------------------------------------------------------------------------- the driver


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the (at most 8) result files")
    parser.add_argument("--budget", type=float, default=520, help="seconds for all phases together (default 520)")
    parser.add_argument("--dry-run", action="store_true", help="tiny random models on the CPU; pytest only collects")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PHASES], help="run these phases only")
    parser.add_argument("--work", type=Path, help="folder for intermediate files (default: a temporary one)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument("--cap", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return run_phase(args.phase, args.work, args.cap, args.dry_run)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_proof: no CUDA GPU here; --dry-run checks the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_proof_"))
    work.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "gpu_proof.log", "w")
    say = _teller(log)
    say(f"gpu proof: budget {args.budget:.0f} s, {'dry run (CPU, tiny models)' if args.dry_run else 'GPU'}, work {work}")
    phases = [p for p in PHASES if not args.only or p.name in args.only]
    start, report = time.monotonic(), {"budget_s": args.budget, "dry_run": args.dry_run, "phases": {}}
    for i, phase in enumerate(phases):
        left = args.budget - (time.monotonic() - start)
        cap = left * phase.share / sum(p.share for p in phases[i:])
        if cap < 5:
            report["phases"][phase.name] = {"status": "skipped: budget spent", "seconds": 0.0, "cap_s": cap}
            say(f"== {phase.name}: skipped, {left:.0f} s left")
            continue
        say(f"== {phase.name} (cap {cap:.0f} s)")
        report["phases"][phase.name] = result = spawn_phase(phase, work, cap, args.dry_run, say)
        report["environment"] = report["phases"].get("environment", {}).get("figures", {})
        say(f"== {phase.name}: {result['status']} in {result['seconds']:.0f} s")
        copy_artifacts(phase, work, args.out, result)
        write_report(args.out, report)
    report["seconds"] = time.monotonic() - start
    write_report(args.out, report)
    say("\n" + summary_table(report))
    log.close()
    return report


def spawn_phase(phase: Phase, work: Path, cap: float, dry_run: bool, say) -> dict:
    """Run ``phase`` in a child process; SIGTERM at ``cap`` seconds, SIGKILL 15 s later."""
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "--phase", phase.name, "--work", str(work),
               "--cap", f"{cap:.1f}", "--out", str(work)] + (["--dry-run"] if dry_run else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)  # fmt: skip
    deadline, stopped = started + cap, False
    os.set_blocking(child.stdout.fileno(), False)
    while True:
        line = child.stdout.readline()
        if line:
            say(f"  [{phase.name}] {line.rstrip()}")
            continue
        if child.poll() is not None:
            break
        if not stopped and time.monotonic() > deadline:
            stopped = True
            os.killpg(child.pid, signal.SIGTERM)
            deadline += 15
        elif stopped and time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
        time.sleep(0.05)
    for line in child.stdout.read().splitlines():
        say(f"  [{phase.name}] {line}")
    figures_file = work / f"{phase.name}.json"
    figures = json.loads(figures_file.read_text()) if figures_file.exists() else {}
    status = "stopped at its cap" if stopped else "ok" if child.returncode == 0 else f"failed (exit {child.returncode})"
    return {"status": status, "seconds": time.monotonic() - started, "cap_s": cap, "figures": figures}


def copy_artifacts(phase: Phase, work: Path, out: Path, result: dict) -> None:
    for source, name in phase.artifacts:
        path = work / source
        if not path.exists():
            result.setdefault("missing_files", []).append(name)
        elif path.stat().st_size > MAX_FILE_BYTES:
            result.setdefault("files_too_large", []).append(f"{name} ({path.stat().st_size} bytes)")
        else:
            shutil.copyfile(path, out / name)


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_proof.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def _teller(log):
    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    return say


def summary_table(report: dict) -> str:
    """One line per phase: status, seconds, and its headline figures."""
    lines = [f"{'phase':<12} {'status':<22} {'s':>5}  headline"]
    for name, result in report["phases"].items():
        lines.append(f"{name:<12} {result['status']:<22} {result['seconds']:>5.0f}  {headline(name, result.get('figures', {}))}")
    env = report.get("environment", {})
    lines.append(f"{env.get('gpu', '?')}, driver {env.get('driver', '?')}, torch {env.get('torch', '?')}, "
                 f"transformers {env.get('transformers', '?')}, {env.get('date', '?')}")  # fmt: skip
    return "\n".join(lines)


def headline(name: str, figures: dict) -> str:
    def get(*keys, default="?"):
        value = figures
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return f"{value:.3g}" if isinstance(value, float) else value

    if name == "environment":
        return f"{get('gpu')}; copy bandwidth {get('copy_bandwidth_gb_s')} GB/s"
    if name == "cuda_tests":
        return "; ".join(f"{k}: {v['collected']} collected" if "collected" in v else
                         f"{k}: {v.get('passed', '?')} passed, {v.get('failed', '?')} failed, {v.get('skipped', '?')} skipped"
                         for k, v in figures.items() if isinstance(v, dict))  # fmt: skip
    if name == "sr_vs_bon":
        return f"{get('prompts_done')} prompts; best SR speedup at equal mean reward {get('target', 'best_speedup_reward')}"
    if name == "memory":
        return (f"overhead {get('overhead', 'hook_cost_pct_of_step')}% of a step; OOM kept {get('oom', 'rows_kept')} rows, "
                f"snapshot {get('oom', 'snapshot_loads')}")  # fmt: skip
    if name == "engine":
        return f"engine/generate min {get('engine_vs_generate_min')}; of roofline at 1024 rows {get('of_roofline_1024')}"
    if name == "optimizers":
        return ", ".join(f"{k} {v:.2f}x AdamW" for k, v in figures.get("time_ratio", {}).items())
    return ""


# ------------------------------------------------------------------------------------ the phases


class Figures(dict):
    """A phase's figures, rewritten to ``<work>/<phase>.json`` at every assignment, so that a
    phase stopped at its cap keeps what it had measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.path.write_text(json.dumps(self, indent=1, default=str))

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def run_phase(name: str, work: Path, cap: float, dry_run: bool) -> dict:
    """Run one phase in this process. SIGTERM (the cap) raises ``SystemExit``, so that the
    phase's ``finally`` blocks still collect what it had finished."""

    def stop(signum, frame):
        raise CapReached(f"{name}: stopped at its cap of {cap:.0f} s")

    signal.signal(signal.SIGTERM, stop)
    sys.path.insert(0, str(BENCHMARKS))
    sys.argv = sys.argv[:1]  # the phase's own benchmarks and CLI runs take their arguments as lists
    shutil.rmtree(work / name, ignore_errors=True)  # its files; a rerun starts afresh (no resumed predicts)
    figures = Figures(work / f"{name}.json")
    globals()[f"phase_{name}"](figures, work, cap, dry_run)
    return figures


def _environment(work: Path) -> dict:
    """The environment phase's figures (its ``Figures`` file)."""
    path = work / "environment.json"
    return json.loads(path.read_text()) if path.exists() else {}


def phase_environment(figures: Figures, work: Path, cap: float, dry_run: bool) -> None:
    import platform

    import lightning
    import torch
    import transformers

    cuda = torch.cuda.is_available() and not dry_run
    figures.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), python=platform.python_version(),
                   torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
                   lightning=lightning.__version__, cpus=os.cpu_count())  # fmt: skip
    figures["gpu"] = torch.cuda.get_device_name(0) if cuda else "none (dry run)" if dry_run else "none"
    figures["driver"] = _driver_version() if cuda else None
    figures["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory if cuda else None
    figures["copy_bandwidth_gb_s"] = round(copy_bandwidth(torch.device("cuda" if cuda else "cpu"), 2**30 if cuda else 2**24), 1)
    if not dry_run:  # the first use of each embedded model builds it into the cache
        from lightning_sr.assets import GENERATOR, REWARD_MODEL, resolve_model

        for model in (GENERATOR, REWARD_MODEL):
            began = time.perf_counter()
            resolve_model(model)
            figures[f"build_s_{model}"] = round(time.perf_counter() - began, 1)


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)  # fmt: skip
            return done.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None


def copy_bandwidth(device, nbytes: int, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and the bytes written."""
    import torch

    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - began) / 1e9


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def phase_cuda_tests(figures: Figures, work: Path, cap: float, dry_run: bool) -> None:
    """``pytest -m cuda`` with 60% of the cap, then the quick subset with what is left."""
    runs = [("cuda", ["-m", "cuda"]), ("quick", ["-m", "not slow and not assets and not cuda", *QUICK_TESTS])]
    began = time.monotonic()
    for (name, selection), share in zip(runs, (0.6, 1.0)):
        report = work / f"pytest_{name}.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *selection]
        if dry_run:
            command.append("--collect-only")
        timeout = max(5.0, (cap - (time.monotonic() - began)) * share - 2)
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            output, timed_out = done.stdout + done.stderr, False
        except subprocess.TimeoutExpired as expired:  # its output is bytes whatever ``text`` says
            output, timed_out = (expired.stdout or b"").decode(errors="replace"), True
        print("\n".join(output.strip().splitlines()[-15:]), flush=True)
        counts = junit_counts(report) if report.exists() else progress_counts(output)
        if dry_run:
            counts["collected"] = sum("::" in line for line in output.splitlines())
        figures[name] = {**counts, "timed_out": timed_out, "command": " ".join(command[1:])}


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped counts and the failing tests' ids from a JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"passed": len(cases) - len(failed) - skipped, "failed": len(failed), "skipped": skipped,
            "failures": failed[:20], "seconds": sum(float(c.get("time", 0)) for c in cases)}  # fmt: skip


def progress_counts(output: str) -> dict:
    """Counts from pytest's ``-q`` progress lines (``..F.s  [ 40%]``), for a run stopped before
    it wrote its JUnit report."""
    marks = "".join(line.split("[")[0].strip() for line in output.splitlines()
                    if line.strip() and set(line.split("[")[0].strip()) <= set(".FEsxX"))  # fmt: skip
    return {"passed": marks.count("."), "failed": marks.count("F") + marks.count("E"), "skipped": marks.count("s")}


def phase_sr_vs_bon(figures: Figures, work: Path, cap: float, dry_run: bool) -> None:
    import sr_vs_bon

    out = work / "sr_vs_bon"
    if dry_run:
        argv = ["--preset", "tiny", "--device", "cpu", "--prompts", "4", "--chunk", "2", "--rows", "32", "--ns", "2", "4", "8",
                "--alphas", "0.5", "--max-new-tokens", "6", "--min-tokens", "2", "--fixed-lengths", "3"]  # fmt: skip
    else:  # 24 prompts in chunks of 8; Best-of-4 is the reference (Best-of-2's tiny denominators are noise)
        argv = ["--preset", "embedded", "--device", "cuda", "--dtype", "bfloat16", "--prompts", "24", "--chunk", "8",
                "--rows", "4096", "--ns", "4", "8", "16", "32", "64", "128", "256", "512", "--alphas", "0.5", "0.8",
                "--max-new-tokens", "256", "--min-tokens", "32", "--fixed-lengths", "64", "128"]  # fmt: skip
    figures["command"] = "benchmarks/sr_vs_bon.py " + " ".join(argv)
    try:
        sr_vs_bon.main([*argv, "--out", str(out)])
    finally:  # stopped at the cap or not: what the finished chunks wrote
        saved = next(out.glob("sr_vs_bon_*.json"), None)
        if saved is not None:
            payload = json.loads(saved.read_text())
            rows = payload["rows"]
            figures.update(prompts_done=rows[0]["prompts"], kv_budget_bytes=payload["kv_budget_bytes"], rows=rows,
                           target=best_speedup(rows))  # fmt: skip
            shutil.copyfile(saved.with_suffix(".png"), out / "sr_vs_bon.png")


def best_speedup(rows: list[dict]) -> dict:
    """The SR row with the largest speedup at equal mean reward (seconds and tokens)."""
    sr = [r for r in rows if r["method"] == "SR" and r.get("speedup_reward") is not None]
    if not sr:
        return {"best_speedup_reward": None}
    best = max(sr, key=lambda r: r["speedup_reward"])
    return {"best_speedup_reward": round(best["speedup_reward"], 2), "tokens": best.get("speedup_reward_tokens"),
            "note": best.get("speedup_reward_note"), "method": f"SR {best['schedule']} alpha={best['alpha']}",
            "target": 16, "met": best["speedup_reward"] >= 16}  # fmt: skip


def phase_memory(figures: Figures, work: Path, cap: float, dry_run: bool) -> None:
    import memory_profiler_overhead

    folder = work / "memory"
    models = _predict_models(folder, dry_run)
    attempt(figures, "sr_predict", predict_with_profiler, folder / "sr", models, "sr", dry_run)
    attempt(figures, "bon_predict", predict_with_profiler, folder / "bon", models, "bon", dry_run)
    attempt(figures, "figure_one", figure_one, folder / "sr" / "memory_predict_generation.csv",
            folder / "bon" / "memory_predict_generation.csv", folder / "memory_predict.png")  # fmt: skip
    attempt(figures, "snapshot", snapshot_check, folder / "sr" / "memory_snapshot_predict.pickle")
    attempt(figures, "oom", forced_out_of_memory, folder / "oom", models, dry_run)
    attempt(figures, "fit", fit_with_profiler, folder / "fit", models, dry_run)
    argv = ["--device", "cpu" if dry_run else "cuda", "--out", str(folder / "overhead")]
    argv += ["--reps", "2", "--steps", "8", "--warmup", "2", "--width", "64", "--hidden", "64", "--hook-iterations", "50"] \
        if dry_run else ["--reps", "4", "--steps", "40", "--hook-iterations", "2000"]  # fmt: skip
    attempt(figures, "overhead", memory_profiler_overhead.main, argv)


class CapReached(BaseException):
    """Raised in a phase by SIGTERM at its cap; not an ``Exception``, so ``attempt`` lets it through."""


def attempt(figures: Figures, key: str, measure, *args) -> None:
    """``figures[key] = measure(*args)``, or the error it raised: one failed measurement does not
    cost the phase its others (a CLI's bad-input exit included)."""
    try:
        figures[key] = measure(*args)
    except (Exception, SystemExit) as error:
        traceback.print_exc()
        figures[key] = {"error": f"{type(error).__name__}: {error}"[:1000]}
    finally:
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _predict_models(folder: Path, dry_run: bool) -> dict:
    if not dry_run:
        return {"generator": "smollm2-135m-instruct", "reward": "minilm-positivity", "prompts": str(ROOT / "configs/data/prompts.jsonl"),
                "pairs": str(ROOT / "configs/data/preferences.jsonl")}  # fmt: skip
    from fault_soak import make_workspace

    return {key: str(value) for key, value in make_workspace(folder / "models").items()}


def _cli(args: list[str], folder: Path) -> None:
    """``lightning-sr`` in this process; its run files (``config.yaml``) go to ``folder``."""
    from lightning_sr.cli import main

    main([*args, f"--trainer.default_root_dir={folder}"])


def _profiler(folder: Path, snapshot: bool) -> list[str]:
    return ["--trainer.callbacks+=lightning_sr.callbacks.GPUMemoryProfiler", f"--trainer.callbacks.dirpath={folder}",
            f"--trainer.callbacks.snapshot={str(snapshot).lower()}", "--trainer.callbacks.snapshot_max_entries=5000"]  # fmt: skip


def _predict_args(folder: Path, models: dict, method: str, dry_run: bool) -> list[str]:
    """A predict of 4 prompts x 256 rows x 256 tokens (dry run: 4 x 8 x 8) with the profiler."""
    output = folder / "predictions.jsonl"
    args = ["predict", f"--config={ROOT / 'configs' / ('predict_sr.yaml' if method == 'sr' else 'predict_bon.yaml')}",
            f"--model.generator={models['generator']}", f"--model.reward_model={models['reward']}",
            f"--data.path={models['prompts']}", "--data.limit=4", "--data.batch_size=4", f"--data.completed={output}",
            "--trainer.callbacks=[]", "--trainer.callbacks+=lightning_sr.callbacks.JSONLPredictionWriter",
            f"--trainer.callbacks.output_path={output}", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]  # fmt: skip
    args += [f"--model.n={8 if dry_run else 256}", f"--model.sampling.max_new_tokens={8 if dry_run else 256}"]
    if not dry_run:
        args += ["--trainer.accelerator=cuda", "--model.dtype=bfloat16"]
    return args


def predict_with_profiler(folder: Path, models: dict, method: str, dry_run: bool) -> dict:
    """SR's budget comes from free GPU memory: the margin leaves 3 GiB for the models and the KV
    cache, so that the pool fills and rejects as on a full GPU (dry run: an explicit budget)."""
    import torch

    args = _predict_args(folder, models, method, dry_run) + _profiler(folder, snapshot=method == "sr")
    if method == "sr":
        if dry_run:
            args += ["--model.schedule.budget_bytes=100000", "--model.schedule.min_tokens=2"]
        else:
            free, total = torch.cuda.mem_get_info()
            args += ["--model.schedule.budget_bytes=null", f"--model.schedule.margin_fraction={(free - 3 * 2**30) / total:.4f}"]
    began = time.perf_counter()
    _cli(args, folder)
    rows = _read_csv(folder / "memory_predict_generation.csv")
    return {"seconds": round(time.perf_counter() - began, 1), "command": "lightning-sr " + " ".join(args),
            "generation_rows": len(rows), "rejections": sum(int(r["rejected_rows"] or 0) > 0 for r in rows),
            "peak_memory_bytes": max((int(r["memory_bytes"] or 0) for r in rows), default=None),
            "peak_kv_bytes": max((int(r["kv_bytes"] or 0) for r in rows), default=None),
            "batches": _read_csv(folder / "memory_predict.csv")}  # fmt: skip


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def figure_one(sr_csv: Path, bon_csv: Path, png: Path) -> None:
    """The paper's Figure 1 for the first batch of each run: SR (left) beside Best-of-N (right)."""
    from matplotlib.figure import Figure

    from lightning_sr.callbacks.memory_plots import plot_run

    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, (title, path) in zip(fig.subplots(1, 2), (("Speculative Rejection", sr_csv), ("Best-of-N", bon_csv))):
        rows = [r for r in _read_csv(path) if r["run"] == "0"]
        plot_run(ax, rows)
        ax.set_title(f"{title}: {rows[0]['device'] if rows else 'no rows'}")
    fig.savefig(png, dpi=100)


def snapshot_check(path: Path) -> dict:
    """Does ``torch.cuda._memory_viz`` (the tools behind pytorch.org/memory_viz) read the snapshot?"""
    import pickle

    if not path.exists():
        return {"exists": False}
    from torch.cuda import _memory_viz

    with open(path, "rb") as handle:
        snapshot = pickle.load(handle)
    html = _memory_viz.trace_plot(snapshot)
    return {"exists": True, "bytes": path.stat().st_size, "segments": len(snapshot.get("segments", [])),
            "trace_entries": sum(len(t) for t in snapshot.get("device_traces", [])), "trace_plot_html_bytes": len(html)}  # fmt: skip


def forced_out_of_memory(folder: Path, models: dict, dry_run: bool) -> dict:
    """Best-of-N predict, one prompt a batch, that runs out of memory in its third batch."""
    args = _predict_args(folder, models, "bon", dry_run) + _profiler(folder, snapshot=True)
    args = [a for a in args if not a.startswith("--data.batch_size")] + ["--data.batch_size=1",
            "--trainer.callbacks+=gpu_proof.OutOfMemoryAt", "--trainer.callbacks.batch_idx=2"]  # fmt: skip
    try:
        _cli(args, folder)
        raised = None
    except (Exception, SystemExit) as error:  # the error is the point
        raised = f"{type(error).__name__}: {str(error)[:200]}"
    rows = _read_csv(folder / "memory_predict.csv")
    snapshot = snapshot_check(folder / "memory_snapshot_predict_oom.pickle")
    return {"raised": raised, "rows_kept": len(rows), "batches_kept": sorted({int(r["batch_idx"]) for r in rows}),
            "snapshot_loads": snapshot.get("trace_plot_html_bytes", 0) > 0, "snapshot": snapshot}  # fmt: skip


def _out_of_memory_callback():
    import torch

    from lightning_sr.lightning_packages import Callback

    class OutOfMemoryAt(Callback):
        """Runs out of device memory at the start of predict batch ``batch_idx`` (on the CPU it
        raises ``torch.OutOfMemoryError`` itself)."""

        def __init__(self, batch_idx: int = 2):
            self.batch_idx = batch_idx

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx != self.batch_idx:
                return
            device = trainer.strategy.root_device
            if device.type != "cuda":
                raise torch.OutOfMemoryError("forced out-of-memory error (dry run)")
            torch.empty(2 * torch.cuda.get_device_properties(device).total_memory, dtype=torch.uint8, device=device)

    return OutOfMemoryAt


def __getattr__(name):  # ``gpu_proof.OutOfMemoryAt`` as a class path, built for the CLI's package
    if name == "OutOfMemoryAt":
        from lightning_sr.lightning_packages import resolve

        return resolve(_out_of_memory_callback())
    raise AttributeError(name)


def fit_with_profiler(folder: Path, models: dict, dry_run: bool) -> dict:
    """6 DPO steps with OnDARE (device-side masks) and the profiler: the per-batch CSV."""
    args = ["fit", f"--config={ROOT / 'configs' / 'fit_dpo_ondare.yaml'}", f"--model.policy={models['generator']}",
            f"--model.base_model={models['generator']}", f"--data.path={models['pairs']}",
            f"--data.tokenizer={models['generator']}", "--data.val_fraction=0", "--trainer.limit_val_batches=0",
            "--trainer.max_steps=6", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", *_profiler(folder, snapshot=False)]  # fmt: skip
    if dry_run:
        args += ["--model.optimizer.init_args.keep_rate=0.5", "--trainer.accelerator=cpu"]
    else:
        args += ["--trainer.accelerator=cuda"]
    began = time.perf_counter()
    _cli(args, folder)
    rows = _read_csv(folder / "memory_fit.csv")
    return {"seconds": round(time.perf_counter() - began, 1), "command": "lightning-sr " + " ".join(args), "rows": rows}


def phase_engine(figures: Figures, work: Path, cap: float, dry_run: bool) -> None:
    import engine_throughput

    out = work / "engine"
    attempt(figures, "graph_captures", graph_captures, dry_run)
    bandwidth = _environment(work).get("copy_bandwidth_gb_s")
    if dry_run:
        argv = ["--preset", "tiny", "--device", "cpu", "--rows", "1", "3", "--greedy-rows", "--new-tokens", "6",
                "--repeats", "1", "--decision-rows", "2", "--decision-length", "2", "--threads", "1"]  # fmt: skip
    else:
        argv = ["--preset", "gpu", "--rows", "1", "64", "256", "1024", "--greedy-rows", "--new-tokens", "256", "--repeats", "1",
                "--decision-rows", "256"]  # fmt: skip
    argv += ["--no-baseline", "--out", str(out)] + (["--bandwidth", str(bandwidth)] if bandwidth else [])
    figures["command"] = "benchmarks/engine_throughput.py " + " ".join(argv)
    try:
        throughput, _, decisions = engine_throughput.main(argv)
    finally:  # stopped at the cap: the runs that ended
        runs = out / f"engine_runs_{'tiny' if dry_run else 'gpu'}.jsonl"
        if runs.exists():
            figures["runs"] = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    figures["throughput"], figures["decision"] = throughput, decisions
    engine = [r for r in throughput if r["impl"] == "engine"]
    figures["engine_vs_generate_min"] = min((r["vs_generate"] for r in engine if r["vs_generate"]), default=None)
    figures["of_roofline_1024"] = {r["model"]: r.get("of_roofline") for r in engine if r["rows"] == 1024} or None
    png = next(out.glob("engine_throughput_*.png"), None)
    if png is not None:
        shutil.copyfile(png, out / "engine_throughput.png")


def graph_captures(dry_run: bool) -> dict:
    """CUDA-graph captures and their seconds per ``best_of_n`` call (64 rows x 256 tokens of
    SmolLM2, bf16), cold and warm; the dry run decodes eagerly on the CPU (no graphs)."""
    import torch

    from lightning_sr.generation import SamplingParams, best_of_n, rollout
    from lightning_sr.rewards import FunctionReward

    if dry_run:
        from common import tiny_models

        model, tokenizer, _ = tiny_models()
        rows, tokens = 4, 8
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lightning_sr.assets import resolve_model

        path = resolve_model("smollm2-135m-instruct")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        tokenizer, rows, tokens = AutoTokenizer.from_pretrained(path), 64, 256
    captures: list[float] = []
    capture = rollout._Graphs._capture

    def timed_capture(self, rollout_):
        _sync(rollout_.device)
        began = time.perf_counter()
        result = capture(self, rollout_)
        _sync(rollout_.device)
        captures.append(time.perf_counter() - began)
        return result

    rollout._Graphs._capture = timed_capture
    calls = []
    sampling = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=tokens, stop_token_ids=(model.config.vocab_size + 1,))
    for call in ("cold", "warm"):
        captures.clear()
        began = time.perf_counter()
        (result,) = best_of_n(model, tokenizer, FunctionReward(lambda p, r: 0.0), ["Tell me about the sea."], n=rows,
                              sampling=sampling, seed=0)  # fmt: skip
        calls.append({"call": call, "captures": len(captures), "capture_s": round(sum(captures), 3),
                      "call_s": round(time.perf_counter() - began, 3), "tokens": result.stats.tokens_generated})  # fmt: skip
    rollout._Graphs._capture = capture
    return {"rows": rows, "new_tokens": tokens, "calls": calls}


def phase_optimizers(figures: Figures, work: Path, cap: float, dry_run: bool) -> None:
    import optimizer_step

    argv = ["--preset", "tiny", "--rounds", "1", "--warmup", "0"] if dry_run else \
        ["--device", "cuda", "--preset", "1b", "--rounds", "6", "--warmup", "2"]  # fmt: skip
    figures["command"] = "benchmarks/optimizer_step.py " + " ".join(argv)
    rows = optimizer_step.main([*argv, "--out", str(work / "optimizers" / "optimizer_step")])
    figures["rows"] = [{k: v for k, v in row.items() if not k.endswith("_all")} for row in rows]
    figures["time_ratio"] = {r["optimizer"]: r["time_ratio"] for r in rows if r["optimizer"] != "AdamW"}
    figures["targets_met"] = {r["optimizer"]: r["time_target_met"] for r in rows if r["time_target"] is not None}


if __name__ == "__main__":
    main()
