"""The benchmark scripts keep working: tiny presets write their CSV, JSON and plot; metric helpers."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name):
    """Import ``benchmarks/<name>.py`` as a module (its folder on sys.path for ``common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sr_vs_bon():
    return load_script("sr_vs_bon")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sr_vs_bon_tiny_writes_csv_json_and_plot(sr_vs_bon, tmp_path):
    argv = ["--preset", "tiny", "--prompts", "2", "--chunk", "2", "--rows", "16", "--ns", "2", "4", "8",
            "--alphas", "0.5", "--max-new-tokens", "6", "--min-tokens", "2", "--fixed-lengths", "3",
            "--out", str(tmp_path)]  # fmt: skip
    sr_vs_bon.main(argv)
    rows = read_csv(tmp_path / "sr_vs_bon_tiny.csv")
    assert list(rows[0]) == sr_vs_bon.COLUMNS
    assert [(r["method"], r["schedule"], int(r["n"]), float(r["alpha"])) for r in rows] == [
        ("BoN", "-", 2, 0.0),
        ("BoN", "-", 4, 0.0),
        ("BoN", "-", 8, 0.0),
        ("SR", "memory", 8, 0.5),
        ("SR", "fixed[3]", 8, 0.5),
    ]
    reference = rows[0]
    assert float(reference["relative_compute"]) == 1.0 and float(reference["relative_tokens"]) == 1.0
    if int(reference["scored_prompts"]):
        assert float(reference["improvement_score"]) == pytest.approx(100.0)
    for row in rows:
        assert int(row["prompts"]) == 2
        assert 0 < int(row["tokens_generated"]) <= 2 * int(row["n"]) * 6
        assert int(row["reward_tokens"]) > 0 and int(row["peak_kv_bytes"]) > 0
    # Rejection happened: SR generated fewer tokens than Best-of-N at its starting n.
    assert int(rows[3]["tokens_generated"]) < int(rows[2]["tokens_generated"])
    assert float(rows[4]["mean_rounds"]) == 1.0
    assert (tmp_path / "sr_vs_bon_tiny.png").read_bytes()[:8] == PNG_MAGIC
    meta = json.loads((tmp_path / "sr_vs_bon_tiny.json").read_text())
    assert len(meta["per_prompt_final_rewards"]["BoN-8"][0]) == 8  # every BoN sample is final-scored
    (tmp_path / "sr_vs_bon_tiny.csv").unlink()
    assert len(sr_vs_bon.main(["--rederive", str(tmp_path / "sr_vs_bon_tiny.json")])) == 5
    assert read_csv(tmp_path / "sr_vs_bon_tiny.csv") == rows
    assert meta["kv_budget_bytes"] > 0 and set(meta["per_prompt_chosen_reward"]) == {
        "BoN-2", "BoN-4", "BoN-8", "SR-mem-a0.5", "SR-fixed-a0.5"
    }  # fmt: skip


def test_engine_throughput_tiny_writes_csvs_and_plot(tmp_path):
    """The engine, the engine of a git ref (in its own process) and generate, side by side."""
    engine_throughput = load_script("engine_throughput")
    argv = ["--preset", "tiny", "--rows", "1", "3", "--greedy-rows", "3", "--new-tokens", "6", "--decision-rows", "4",
            "--decision-length", "2", "--repeats", "1", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    engine_throughput.main(argv)
    rows = read_csv(tmp_path / "engine_throughput_tiny.csv")
    cells = [("sampled", 1), ("sampled", 3), ("greedy", 3)]
    assert sorted((r["mode"], int(r["rows"]), r["impl"]) for r in rows) == sorted(
        (mode, batch, impl) for mode, batch in cells for impl in ("engine", "baseline", "generate")
    )
    for row in rows:  # EOS disabled: exactly rows x new tokens for every implementation
        assert float(row["tokens"]) == int(row["rows"]) * 6
        assert float(row["tokens_per_s"]) > 0 and float(row["vs_baseline"]) > 0
    steps = read_csv(tmp_path / "engine_step_times_tiny.csv")
    assert {(r["mode"], int(r["rows"]), r["impl"]) for r in steps} == {
        (mode, batch, impl) for mode, batch in cells for impl in ("engine", "baseline", "generate")
    }
    assert all(float(r["ms_per_step"]) > 0 for r in steps)
    (decision,) = read_csv(tmp_path / "engine_decision_tiny.csv")
    assert (int(decision["rows"]), int(decision["survivors"]), int(decision["generated"])) == (4, 2, 2)
    # Moving the survivors within the cache gives the same next-token logits as re-prefilling them.
    assert float(decision["max_logit_diff"]) < 1e-4
    samplers = read_csv(tmp_path / "engine_sampler_tiny.csv")
    assert [int(r["rows"]) for r in samplers] == [1, 3]
    assert all(float(r["engine_ms"]) > 0 and float(r["baseline_over_engine"]) > 0 for r in samplers)
    assert (tmp_path / "engine_throughput_tiny.png").read_bytes()[:8] == PNG_MAGIC
    meta = json.loads((tmp_path / "engine_throughput_tiny.json").read_text())
    assert set(meta["targets"]) == {"engine_vs_baseline", "engine_vs_generate"}
    assert meta["models"]["tiny"]["kv_bytes_per_token"] > 0


def test_step_profile_spreads_bursts_over_their_steps():
    engine_throughput = load_script("engine_throughput")
    # Steps 1-4 one by one (10 ms each after the prefill), then steps 5-8 read back together after
    # 80 ms: 20 ms each. Bins of steps 2-7 (step 1 holds the prefill, the last step is left out).
    marks = [(0, 0.0), (1, 0.5), (2, 0.51), (3, 0.52), (4, 0.53), (8, 0.61)]
    assert engine_throughput.step_bins(8, bins=2) == [(2, 4), (5, 7)]
    assert engine_throughput.step_profile(marks, 8, bins=2) == pytest.approx([10.0, 20.0])
    assert engine_throughput.step_bins(256) == [(2 + 32 * i, min(255, 33 + 32 * i)) for i in range(8)]
    assert engine_throughput.roofline({"prompt_tokens": 10, "kv_bytes_per_token": 100, "weight_bytes": 1000}, 2, 4, 1e-6) \
        == pytest.approx(2 / ((1000 + 2 * 12.5 * 100) / 1000))


def test_improvement_score_follows_the_paper(sr_vs_bon):
    reference = sr_vs_bon.Method("BoN-2", 2)
    reference.chosen, reference.finals = [1.0, 2.0, 5.0], [[1.0, 0.0], [2.0, 1.0], [5.0, 5.0]]
    method = sr_vs_bon.Method("SR", 8, alpha=0.5)
    method.chosen = [1.5, 1.0, 9.0]
    score, used = sr_vs_bon.improvement(method, reference)
    # Prompt 3 has tied reference samples (zero denominator) and is left out.
    assert used == 2
    assert score == pytest.approx(100 * (1 + ((1.5 - 1.0) / 1.0 + (1.0 - 2.0) / 1.0) / 2))


def test_speedup_interpolates_the_bon_curve_log_linearly(sr_vs_bon):
    curve = [(2, 100.0, 1.0, 10), (4, 120.0, 2.0, 20), (8, 130.0, 8.0, 40)]
    n, compute, tokens, note = sr_vs_bon.interpolate_bon(125.0, curve)
    assert note == ""
    assert n == pytest.approx(math.sqrt(4 * 8)) and compute == pytest.approx(4.0)
    assert tokens == pytest.approx(math.sqrt(20 * 40))
    assert sr_vs_bon.interpolate_bon(131.0, curve)[1:] == (8.0, 40, "beyond curve")
    assert sr_vs_bon.interpolate_bon(90.0, curve)[3] == "below curve"
    # A noisy dip of the curve does not make a lower score look more expensive.
    dipped = [(2, 100.0, 1.0, 10), (4, 95.0, 2.0, 20), (8, 130.0, 8.0, 40)]
    assert sr_vs_bon.interpolate_bon(100.0, dipped)[1] == 1.0


@pytest.mark.slow
def test_sharded_step_tiny_counts_tau_bytes_and_communication(tmp_path):
    import subprocess

    command = [sys.executable, str(BENCHMARKS / "sharded_step.py"), "--preset", "tiny", "--processes", "1", "2",
               "--steps", "1", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    rows = {(int(r["processes"]), r["optimizer"]): r for r in read_csv(tmp_path / "sharded_step_tiny.csv")}
    assert json.loads((tmp_path / "sharded_step_tiny.json").read_text())["rows"]
    for name in ("OnDARE", "OnTIES"):  # the same τ̃ in all, split over the ranks
        assert int(rows[1, name]["tau_bytes_total"]) == int(rows[2, name]["tau_bytes_total"]) > 0
        assert int(rows[2, name]["tau_bytes_max_rank"]) < int(rows[1, name]["tau_bytes_max_rank"])
    assert int(rows[2, "OnDARE"]["sent_bytes_per_step"]) == 0  # masks from one stream: nothing to send
    assert int(rows[2, "OnTIES"]["sent_bytes_per_step"]) > 0 == int(rows[1, "OnTIES"]["sent_bytes_per_step"])
    assert int(rows[2, "AdamW"]["tau_bytes_total"]) == 0


@pytest.mark.slow
def test_gpu_proof_dry_run_runs_every_phase_into_at_most_eight_files(tmp_path):
    """The GPU proof's CPU dry run (tiny random models): every phase ends ok, at most 8 files
    come back, and each phase's figures are there (the OOM run kept the batches before it)."""
    import subprocess

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_proof.py"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget", "900"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    gpu_proof = load_script("gpu_proof")
    names = {path.name for path in out.iterdir()}
    assert len(names) <= 8 and names <= set(gpu_proof.OUTPUT_FILES)
    assert names >= {"gpu_proof.json", "gpu_proof.log", "sr_vs_bon.png", "engine_throughput.png", "memory_predict.png",
                     "memory_fit.csv"}  # the snapshots need CUDA  # fmt: skip
    report = json.loads((out / "gpu_proof.json").read_text())
    phases = report["phases"]
    assert list(phases) == [phase.name for phase in gpu_proof.PHASES]
    assert {name: result["status"] for name, result in phases.items()} == {name: "ok" for name in phases}
    assert report["environment"]["torch"] and report["environment"]["copy_bandwidth_gb_s"] > 0
    assert phases["cuda_tests"]["figures"]["cuda"]["collected"] > 0 < phases["cuda_tests"]["figures"]["quick"]["collected"]
    assert phases["sr_vs_bon"]["figures"]["prompts_done"] == 4
    memory = phases["memory"]["figures"]
    assert memory["sr_predict"]["rejections"] > 0 == memory["bon_predict"]["rejections"]
    assert memory["oom"]["raised"].startswith("OutOfMemoryError") and memory["oom"]["batches_kept"] == [0, 1]
    assert len(memory["fit"]["rows"]) == 6 and memory["overhead"]["hook_cost_us_per_batch"] > 0
    assert {r["impl"] for r in phases["engine"]["figures"]["throughput"]} == {"engine", "generate"}
    assert set(phases["optimizers"]["figures"]["time_ratio"]) >= {"OnDARE", "OnTIES"}
    assert "phase" in done.stdout and "optimizers" in done.stdout.splitlines()[-2]  # the summary table
    assert not (BENCHMARKS.parent / "config.yaml").exists()  # the CLI runs wrote their files in the work folder
