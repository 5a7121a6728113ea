"""Fault injection: kill ``lightning-sr predict`` and ``fit`` at random moments, rerun, compare.

Each cycle starts the real command in a fresh process (tiny random models saved to disk), kills
it with SIGKILL at a random moment (seeded), and runs the same command again, resuming, until a
run completes. Then it compares with one uninterrupted run:

- predict: every prompt exactly once in the output, and every record equal to the uninterrupted
  run's (wall-clock seconds aside): batches keep their composition and seeds when resuming.
- fit: resumed from ``last.ckpt`` each time; the final weights against the uninterrupted run's
  (the maximum absolute difference; 0 is bit-exact). ``--sharded`` runs fit with FSDP2
  (``configs/fit_dpo_ondare_fsdp.yaml``: sharded checkpoints, optimizer state in shards).

Usage::

    .venv/bin/python benchmarks/fault_soak.py --cycles 10            # table + results/fault_soak.json
    .venv/bin/python benchmarks/fault_soak.py --cycles 4 --processes 2
    .venv/bin/python benchmarks/fault_soak.py --cycles 4 --processes 2 --sharded

The test suite runs a few cycles of each (``tests/test_faults.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from lightning_sr.lightning_packages import Callback, resolve

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "good bad kind rude thanks sorry happy sad great awful nice terrible friend day night".split()
TIMING_KEYS = ("generation_seconds", "reward_seconds")


class _SlowDown(Callback):
    """Sleeps after every batch, so that a kill lands in the middle of a run."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)

    def on_predict_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


def __getattr__(name):  # ``fault_soak.SlowDown`` as a class path: built for the CLI's package
    if name == "SlowDown":
        return resolve(_SlowDown)
    raise AttributeError(name)


def make_workspace(folder: Path, prompts: int = 12, pairs: int = 36) -> dict[str, Path]:
    """Tiny generator and reward model folders, a prompt file and a preference file."""
    from lightning_sr.testing import save_tiny_generator, save_tiny_reward

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [{"id": f"p{i}", "prompt": " ".join(rng.sample(WORDS, 3))} for i in range(prompts)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = [
        {"prompt": " ".join(rng.sample(WORDS, 3)), "chosen": " ".join(rng.sample(WORDS, 4)), "rejected": " ".join(rng.sample(WORDS, 2))}
        for _ in range(pairs)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "generator": save_tiny_generator(folder / "generator"),
        "reward": save_tiny_reward(folder / "reward"),
        "prompts": folder / "prompts.jsonl",
        "pairs": folder / "pairs.jsonl",
    }


def _devices(processes: int, sharded: bool = False) -> list[str]:
    return ["--trainer.accelerator=cpu", f"--trainer.devices={processes}"] + (
        ["--trainer.strategy=ddp"] if processes > 1 and not sharded else []
    )


def predict_command(ws: dict, output: Path, processes: int = 1) -> list[str]:
    return [
        "predict", f"--config={ROOT / 'configs' / 'predict_sr.yaml'}",
        f"--model.generator={ws['generator']}", f"--model.reward_model={ws['reward']}",
        "--model.n=4", "--model.schedule=FixedSchedule", "--model.schedule.lengths=[3]",
        "--model.sampling.max_new_tokens=8", f"--data.path={ws['prompts']}", "--data.limit=null",
        "--data.batch_size=2", f"--data.completed={output}", "--trainer.callbacks=[]",
        "--trainer.callbacks+=lightning_sr.callbacks.JSONLPredictionWriter", f"--trainer.callbacks.output_path={output}",
        "--trainer.callbacks+=fault_soak.SlowDown", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        *_devices(processes),
    ]


def fit_command(
    ws: dict, root: Path, max_steps: int, processes: int = 1, sharded: bool = False, extra: tuple[str, ...] = ()
) -> list[str]:
    config = "fit_dpo_ondare_fsdp.yaml" if sharded else "fit_dpo_ondare.yaml"
    command = [
        "fit", f"--config={ROOT / 'configs' / config}",
        f"--model.policy={ws['generator']}", f"--model.base_model={ws['generator']}",
        "--model.optimizer.init_args.lr=0.01", "--model.optimizer.init_args.keep_rate=0.5",
        f"--data.path={ws['pairs']}", f"--data.tokenizer={ws['generator']}", "--data.val_fraction=0",
        "--data.batch_size=2", f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=100",
        "--trainer.callbacks.every_n_train_steps=2", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks+=fault_soak.SlowDown", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0", *_devices(processes, sharded), *extra,
    ]
    last = root / "ckpt" / "last.ckpt"
    return command + ([f"--ckpt_path={last}"] if last.exists() else [])


def fresh_environment() -> dict[str, str]:
    """This process's environment without process-group settings, for a run of its own: Lightning
    leaves MASTER_PORT set after a distributed run here, and that port may still be taken."""
    group = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    return {k: v for k, v in os.environ.items() if k not in group}


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**fresh_environment(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_sr.cli", *args], cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> None:
    _, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"run failed ({process.returncode}):\n{err[-3000:]}")


def timed(args: list[str], cwd: Path) -> float:
    """Run to completion; the seconds it took."""
    start = time.perf_counter()
    finish(launch(args, cwd))
    return time.perf_counter() - start


def kill_cycles(make_args, cwd: Path, cycles: int, rng: random.Random, duration: float) -> int:
    """Start, kill at a random moment of a run as long as ``duration``, again ``cycles`` times;
    then run to completion. Returns how many runs were killed (a run may finish first)."""
    kills = 0
    for _ in range(cycles):
        process = launch(make_args(), cwd)
        try:
            process.wait(timeout=rng.uniform(0.2, 0.95) * duration)  # it finished first: nothing to kill
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
    finish(launch(make_args(), cwd))
    return kills


def _records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        for key in TIMING_KEYS:
            record["stats"].pop(key, None)
    return records


def soak_predict(ws: dict, folder: Path, cycles: int, seed: int, processes: int = 1) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    reference = folder / "uninterrupted.jsonl"
    duration = timed(predict_command(ws, reference, processes), folder)
    output = folder / "interrupted.jsonl"
    kills = kill_cycles(lambda: predict_command(ws, output, processes), folder, cycles, random.Random(seed), duration)
    got, want = _records(output), _records(reference)
    ids = [record["id"] for record in got]
    expected = {record["id"] for record in want}
    return {
        "stage": "predict", "processes": processes, "cycles": cycles, "kills": kills, "prompts": len(expected),
        "lost": len(expected - set(ids)), "duplicated": len(ids) - len(set(ids)),
        "records_equal": sorted(got, key=lambda r: str(r["id"])) == sorted(want, key=lambda r: str(r["id"])),
    }


def soak_fit(
    ws: dict, folder: Path, cycles: int, seed: int, processes: int = 1, max_steps: int = 24, sharded: bool = False,
    extra: tuple[str, ...] = (),
) -> dict:
    from lightning_sr.export import METADATA, model_state_dict

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    duration = timed(fit_command(ws, folder / "uninterrupted", max_steps, processes, sharded, extra), folder)
    root = folder / "interrupted"
    kills = kill_cycles(
        lambda: fit_command(ws, root, max_steps, processes, sharded, extra), folder, cycles, random.Random(seed), duration
    )

    def weights(run: str) -> dict:
        last = folder / run / "ckpt" / "last.ckpt"
        metadata = last / METADATA if last.is_dir() else last
        return torch.load(metadata, map_location="cpu", weights_only=True)["global_step"], model_state_dict(last)

    (steps_a, a), (steps_b, b) = weights("uninterrupted"), weights("interrupted")
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    return {"stage": "fit", "processes": processes, "sharded": sharded, "cycles": cycles, "kills": kills,
            "steps": [steps_a, steps_b], "max_weight_difference": difference}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharded", action="store_true", help="fit with FSDP2 (the predict soak is skipped)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        ws = make_workspace(Path(scratch) / "workspace")
        rows = [] if args.sharded else [soak_predict(ws, Path(scratch) / "predict", args.cycles, args.seed, args.processes)]
        rows.append(soak_fit(ws, Path(scratch) / "fit", args.cycles, args.seed, args.processes, sharded=args.sharded))
    for row in rows:
        print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fault_soak_{args.processes}proc{'_fsdp' if args.sharded else ''}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
