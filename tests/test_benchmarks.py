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
    engine_throughput = load_script("engine_throughput")
    argv = ["--preset", "tiny", "--batch-sizes", "1", "2", "--new-tokens", "4", "--prune-batches", "4",
            "--prune-lengths", "2", "--repeats", "1", "--out", str(tmp_path)]  # fmt: skip
    engine_throughput.main(argv)
    rows = read_csv(tmp_path / "engine_throughput_tiny.csv")
    assert [(r["mode"], int(r["batch"]), r["impl"]) for r in rows] == [
        (mode, batch, impl)
        for mode in ("greedy", "sampled")
        for batch in (1, 2)
        for impl in ("generate", "rollout", "best_of_n")
    ]
    for row in rows:
        if row["impl"] in ("generate", "rollout"):  # no early stop: exactly batch x new tokens
            assert float(row["tokens"]) == int(row["batch"]) * 4
        assert float(row["tokens_per_s"]) > 0
    (prune,) = read_csv(tmp_path / "engine_pruning_tiny.csv")
    assert (int(prune["batch"]), int(prune["survivors"]), int(prune["generated"])) == (4, 2, 2)
    # Dropping rows gives the survivors the same next-token logits as re-prefilling them.
    assert float(prune["max_logit_diff"]) < 1e-4
    assert (tmp_path / "engine_throughput_tiny.png").read_bytes()[:8] == PNG_MAGIC
    meta = json.loads((tmp_path / "engine_throughput_tiny.json").read_text())
    assert set(meta["targets"]) == {"loop_vs_generate", "prune_vs_reprefill"}


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
