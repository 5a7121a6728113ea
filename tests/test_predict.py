"""Speculative rejection in Lightning: the module, prompt data, the JSONL writer and the CLI."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from lightning_sr.testing import make_tokenizer, save_tiny_generator, save_tiny_reward, tiny_llama
from user_callbacks import FailAtBatch, RecordingCallback

from lightning_sr import SpeculativeRejectionModule
from lightning_sr.callbacks import JSONLPredictionWriter
from lightning_sr.cli import main
from lightning_sr.data import PromptDataModule
from lightning_sr.data.prompts import read_prompts
from lightning_sr.generation import FixedSchedule, SamplingParams
from lightning_sr.rewards import FunctionReward

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the good day", "thanks", "please help you", "we are not happy", "sorry", "help", "i love paris"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(save_tiny_generator(root / "generator")), str(save_tiny_reward(root / "reward"))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    lines[2]["prompt"] = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "please help you"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def cli_args(config, models, prompt_file, output, *extra):
    generator, reward = models
    return [
        "predict", f"--config={ROOT / 'configs' / config}",
        f"--model.generator={generator}", f"--model.reward_model={reward}",
        f"--data.path={prompt_file}", "--data.limit=null", "--data.batch_size=3",
        "--model.n=16", "--model.sampling.max_new_tokens=24", "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks+={output}", *extra,
    ]


def writer_file(tmp_path, output):
    path = tmp_path / "writer.yaml"
    path.write_text(
        "- class_path: lightning_sr.callbacks.JSONLPredictionWriter\n"
        f"  init_args: {{output_path: {output}}}\n"
    )
    return path


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("config, method", [("predict_sr.yaml", "speculative_rejection"), ("predict_bon.yaml", "best_of_n")])
def test_cli_predict_writes_one_line_per_prompt(tmp_path, monkeypatch, models, prompt_file, config, method):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out" / "predictions.jsonl"
    cli = main(cli_args(config, models, prompt_file, writer_file(tmp_path, output)))
    assert cli.model.method == method
    records = read_lines(output)
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(len(PROMPTS)))
    for record in records:
        assert isinstance(record["response"], str) and isinstance(record["reward"], float)
        stats = record["stats"]
        assert stats["tokens_generated"] > 0 and stats["reward_calls"] >= 1
        assert stats["live_rows_per_round"][0] == 16
        if method == "best_of_n":
            assert stats["rounds"] == 0
    assert records[2]["prompt"][0] == {"role": "system", "content": "be kind"}


def test_interrupted_run_resumes_to_every_prompt_exactly_once(tmp_path, models, prompt_file):
    generator, reward = models
    output = tmp_path / "predictions.jsonl"

    def run(*callbacks):
        module = SpeculativeRejectionModule(
            generator, reward, n=4, schedule=FixedSchedule([4]), sampling=SamplingParams(max_new_tokens=8)
        )
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False,
            callbacks=[JSONLPredictionWriter(str(output)), *callbacks],
        )
        trainer.predict(module, datamodule=PromptDataModule(str(prompt_file), batch_size=2), return_predictions=False)

    with pytest.raises(RuntimeError, match="simulated crash at batch 2"):
        run(FailAtBatch(2))
    assert [r["id"] for r in read_lines(output)] == ["p0", "p1", "p2", "p3"]
    with open(output, "a") as file:  # a run killed in the middle of a write
        file.write('{"id": "p4", "resp')
    seen = tmp_path / "seen.json"
    run(RecordingCallback(str(seen)))
    assert [r["id"] for r in read_lines(output)] == [f"p{i}" for i in range(len(PROMPTS))]
    assert json.loads(seen.read_text())["results"] == len(PROMPTS) - 4  # only the rest was generated


def test_resume_false_keeps_the_old_output(tmp_path, models, prompt_file):
    generator, reward = models
    output = tmp_path / "predictions.jsonl"
    output.write_text('{"id": "old"}\n')
    module = SpeculativeRejectionModule(generator, reward, method="best_of_n", n=2, sampling=SamplingParams(max_new_tokens=4))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[JSONLPredictionWriter(str(output), resume=False)])
    with pytest.warns(UserWarning, match="was kept as"):
        trainer.predict(module, datamodule=PromptDataModule(str(prompt_file), limit=2), return_predictions=False)
    assert [r["id"] for r in read_lines(output)] == ["p0", "p1"]
    (backup,) = tmp_path.glob("predictions.jsonl.*.bak")
    assert backup.read_text() == '{"id": "old"}\n'


def test_user_callback_from_a_yaml_file_runs_alongside_ours(tmp_path, monkeypatch, models, prompt_file):
    monkeypatch.chdir(tmp_path)
    output, seen = tmp_path / "predictions.jsonl", tmp_path / "seen.json"
    user = tmp_path / "user_callbacks.yaml"
    user.write_text(f"- class_path: user_callbacks.RecordingCallback\n  init_args:\n    path: {seen}\n")
    main(cli_args("predict_sr.yaml", models, prompt_file, writer_file(tmp_path, output),
                  f"--trainer.callbacks+={user}", "--model.schedule=lightning_sr.generation.FixedSchedule",
                  "--model.schedule.lengths=[4, 8]"))
    assert len(read_lines(output)) == len(PROMPTS)
    seen = json.loads(seen.read_text())
    assert seen["batches"] == 3 and seen["results"] == len(PROMPTS)
    assert seen["decisions"] == 3 * 2  # every batch decides at 4 and 8 tokens
    assert seen["steps"] >= 3 * 8


def test_plain_python_predict_with_model_objects(caplog):
    tokenizer = make_tokenizer()
    module = SpeculativeRejectionModule(
        generator=tiny_llama(tokenizer), tokenizer=tokenizer,
        reward_model=FunctionReward(lambda prompt, response: float(len(response))),
        n=4, alpha=0.5, schedule=FixedSchedule([3]), sampling=SamplingParams(max_new_tokens=6),
        return_candidates=True,
    )
    prompts = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:3])]
    datamodule = PromptDataModule.__new__(PromptDataModule)
    PromptDataModule.__init__(datamodule, path="unused", batch_size=2)
    datamodule.prompts = prompts
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="lightning_sr"):
        batches = trainer.predict(module, datamodule=datamodule)
    records = [record for batch in batches for record in batch]
    assert [r["id"] for r in records] == [0, 1, 2]
    for record in records:
        finals = [c["reward"] for c in record["candidates"] if c["final"]]
        assert record["reward"] == max(finals) and len(record["candidates"]) == 4
    assert "decision 1 at 3 tokens" in caplog.text
    assert not module.generator.training and not any(p.requires_grad for p in module.generator.parameters())


def test_models_load_lazily(models):
    module = SpeculativeRejectionModule(*models)
    assert module.generator is None and module.reward is None
    module.configure_model()
    assert module.generator is not None and module.reward.score(["a"], ["b"]).shape == (1,)


def test_prompt_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(text) == [{"id": 1, "prompt": "first prompt"}, {"id": 3, "prompt": "second prompt"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(bad)
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "text": "hi"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'prompt' field"):
        read_prompts(bad)
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 1, "prompt": "again"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: id 1 already used on line 1"):
        read_prompts(bad)
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"key": "a", "question": "hi"}\n{"question": "there"}\n')
    assert read_prompts(custom, prompt_field="question", id_field="key") == [
        {"id": "a", "prompt": "hi"}, {"id": 2, "prompt": "there"}]


@pytest.mark.slow
def test_two_process_ddp_predict_covers_every_prompt_once(tmp_path, models, prompt_file):
    output = tmp_path / "predictions.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [str(Path(sys.executable).parent / "lightning-sr"), *cli_args(
        "predict_sr.yaml", models, prompt_file, writer_file(tmp_path, output),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--data.batch_size=2", "--model.n=4", "--model.sampling.max_new_tokens=8")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [r["id"] for r in read_lines(output)]
    assert sorted(ids) == sorted(f"p{i}" for i in range(len(PROMPTS)))
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))
    assert "Predictions:" in done.stdout


def test_memory_profiler_draws_figure_one_from_speculative_rejection(tmp_path, models, prompt_file):
    import csv

    from lightning_sr.callbacks import GPUMemoryProfiler

    module = SpeculativeRejectionModule(*models, n=8, alpha=0.5, schedule=FixedSchedule([3, 6]),
                                        sampling=SamplingParams(max_new_tokens=10))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[GPUMemoryProfiler(dirpath=str(tmp_path))])
    trainer.predict(module, datamodule=PromptDataModule(str(prompt_file), batch_size=4), return_predictions=False)
    rows = list(csv.DictReader(open(tmp_path / "memory_predict_generation.csv")))
    assert {row["batch_idx"] for row in rows} == {"0", "1"}
    for batch in ("0", "1"):
        steps = [row for row in rows if row["batch_idx"] == batch]
        assert [int(row["step"]) for row in steps] == list(range(1, len(steps) + 1))
        for before, row in zip(steps, steps[1:]):
            dropped = int(before["live_rows"]) - int(row["live_rows"])
            assert dropped == int(row["rejected_rows"]) + int(row["ended_rows"])
            assert (row["decision"] in ("True", "1")) == (int(row["step"]) in (3, 6))
    assert (tmp_path / "memory_predict_generation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leftover_rank_files_are_merged_on_a_single_process_resume(tmp_path, models, prompt_file):
    output = tmp_path / "predictions.jsonl"
    output.write_text('{"id": "p0", "response": "from rank 0"}\n')
    (tmp_path / "predictions.rank1.jsonl").write_text('{"id": "p1", "response": "from rank 1"}\n')
    module = SpeculativeRejectionModule(*models, method="best_of_n", n=2, sampling=SamplingParams(max_new_tokens=4))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[JSONLPredictionWriter(str(output))])
    trainer.predict(module, datamodule=PromptDataModule(str(prompt_file), limit=4), return_predictions=False)
    records = read_lines(output)
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3"]
    assert records[1]["response"] == "from rank 1"
    assert not list(tmp_path.glob("*.rank*.jsonl"))


def test_outputs_are_strict_jsonl_whatever_the_text(tmp_path):
    from lightning_sr.callbacks.predictions import _without_nan, read_jsonl

    record = {"id": 1, "response": "line\u2028separator\u0085next", "reward": float("nan"),
              "candidates": [{"reward": float("nan")}]}
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_without_nan(record), ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    (read,) = read_jsonl(path)
    assert read["response"] == record["response"] and read["reward"] is None and read["candidates"][0]["reward"] is None
