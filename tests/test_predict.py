"""Speculative rejection in Lightning: the module, prompt data, the JSONL writer and the CLI.

Every Trainer and CLI scenario runs under both Lightning packages (the ``L`` fixture).
"""

import csv
import json
import logging
import os
import re
import subprocess
from contextlib import nullcontext
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader
from lightning_sr.testing import make_tokenizer, save_tiny_generator, save_tiny_reward, tiny_llama
from user_callbacks import _FailAtBatch as FailAtBatch
from user_callbacks import _RecordingCallback as RecordingCallback

from lightning_sr.callbacks.memory import GPUMemoryProfiler
from lightning_sr.callbacks.predictions import JSONLPredictionWriter
from lightning_sr.cli import main
from lightning_sr.data.prompts import PromptDataModule, read_prompts
from lightning_sr.generation import FixedSchedule, MemorySchedule, SamplingParams
from lightning_sr.lightning_packages import Callback as LightningCallback
from lightning_sr.modules.generation import SpeculativeRejectionModule
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


def predict(L, module, datamodule, *callbacks, **kwargs):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=list(callbacks), **kwargs)
    return trainer.predict(module, datamodule=datamodule, return_predictions=False)


def small_module(models, **kwargs):
    options = dict(n=4, schedule=FixedSchedule([4]), sampling=SamplingParams(max_new_tokens=8))
    return SpeculativeRejectionModule(*models, **{**options, **kwargs})


@pytest.mark.parametrize("config, method", [("predict_sr.yaml", "speculative_rejection"), ("predict_bon.yaml", "best_of_n")])
def test_cli_predict_writes_one_line_per_prompt(L, tmp_path, monkeypatch, models, prompt_file, config, method, capsys):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out" / "predictions.jsonl"
    cli = main(cli_args(config, models, prompt_file, writer_file(tmp_path, output), "--trainer.enable_progress_bar=true"))
    printed = capsys.readouterr().out
    # one summary per writer (the config's and the test's), printed after the progress bar's last line
    assert printed.count("Predictions: ") == 2 and f"Predictions: {output}" in printed
    assert printed.rfind("Predicting") < printed.find("Predictions: ")
    assert isinstance(cli.model, L.LightningModule) and isinstance(cli.trainer, L.Trainer)
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


def test_interrupted_run_resumes_to_what_an_uninterrupted_run_writes(L, tmp_path, models, prompt_file):
    def run(output, *callbacks):
        datamodule = PromptDataModule(str(prompt_file), batch_size=2, completed=str(output))
        predict(L, small_module(models), datamodule, JSONLPredictionWriter(str(output)), *callbacks)

    reference = tmp_path / "uninterrupted.jsonl"
    run(reference)
    output = tmp_path / "predictions.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash at batch 2"):
        run(output, FailAtBatch(2))
    assert [r["id"] for r in read_lines(output)] == ["p0", "p1", "p2", "p3"]
    with open(output, "a") as file:  # a run killed in the middle of a write
        file.write('{"id": "p4", "resp')
    seen = tmp_path / "seen.json"
    run(output, RecordingCallback(str(seen)))
    assert read_lines(output) == [
        {**record, "stats": {**record["stats"], **_seconds(r)}}
        for record, r in zip(read_lines(reference), read_lines(output))
    ]
    assert json.loads(seen.read_text())["results"] == len(PROMPTS) - 4  # only the rest was generated


def _seconds(record):
    """The wall-clock fields, which two runs never share."""
    return {key: record["stats"][key] for key in ("generation_seconds", "reward_seconds")}


def test_a_partly_written_batch_is_finished_on_resume(L, tmp_path, models, prompt_file):
    """A batch with only some of its prompts in the output is served again whole: the rest of it is
    written (not lost), the written prompt is not written twice, and the result is what an
    uninterrupted run writes (the batch is re-decoded with its own composition and seed)."""
    def run(output, *callbacks):
        datamodule = PromptDataModule(str(prompt_file), batch_size=3, completed=str(output))
        predict(L, small_module(models), datamodule, JSONLPredictionWriter(str(output)), *callbacks)

    reference = tmp_path / "uninterrupted.jsonl"
    run(reference)
    output = tmp_path / "predictions.jsonl"  # batches [p0 p1 p2] [p3 p4 p5] [p6]: the 2nd only has p3
    output.write_text("".join(json.dumps(record) + "\n" for record in read_lines(reference)[:4]))
    seen = tmp_path / "seen.json"
    run(output, RecordingCallback(str(seen)))
    assert [r["id"] for r in read_lines(output)] == [f"p{i}" for i in range(len(PROMPTS))]
    assert read_lines(output) == [
        {**record, "stats": {**record["stats"], **_seconds(r)}}
        for record, r in zip(read_lines(reference), read_lines(output))
    ]
    assert json.loads(seen.read_text())["batches"] == 2  # [p3 p4 p5] and [p6]; [p0 p1 p2] skipped


def test_resume_with_another_batch_size_writes_every_prompt_once(L, tmp_path, models, prompt_file):
    """Batches of 2 interrupted after p0-p3, resumed in batches of 3: [p0 p1 p2] is skipped and
    [p3 p4 p5] is partly written; every prompt still ends in the output exactly once."""
    output = tmp_path / "predictions.jsonl"

    def run(batch_size, *callbacks):
        datamodule = PromptDataModule(str(prompt_file), batch_size=batch_size, completed=str(output))
        predict(L, small_module(models), datamodule, JSONLPredictionWriter(str(output)), *callbacks)

    with pytest.raises(RuntimeError, match="simulated crash at batch 2"):
        run(2, FailAtBatch(2))
    assert [r["id"] for r in read_lines(output)] == ["p0", "p1", "p2", "p3"]
    run(3)
    ids = [r["id"] for r in read_lines(output)]
    assert sorted(ids) == sorted(f"p{i}" for i in range(len(PROMPTS))) and len(ids) == len(set(ids))


def test_nothing_left_to_do_is_said(L, tmp_path, models, prompt_file, caplog):
    output = tmp_path / "predictions.jsonl"
    for run in range(2):
        datamodule = PromptDataModule(str(prompt_file), batch_size=4, limit=4, completed=str(output))
        with caplog.at_level(logging.INFO, logger="lightning_sr"):
            with pytest.warns(UserWarning, match="Total length of `DataLoader` across ranks is zero") if run else nullcontext():
                predict(L, small_module(models), datamodule, JSONLPredictionWriter(str(output)))
    assert "4 of 4 prompts are already in" in caplog.text and "nothing left to do" in caplog.text
    assert len(read_lines(output)) == 4


def test_resume_false_keeps_the_old_output(L, tmp_path, models, prompt_file, caplog):
    output = tmp_path / "predictions.jsonl"
    output.write_text('{"id": "old"}\n')
    module = small_module(models, method="best_of_n", n=2, schedule=None)
    with caplog.at_level(logging.WARNING, logger="lightning_sr"):
        predict(L, module, PromptDataModule(str(prompt_file), limit=2), JSONLPredictionWriter(str(output), resume=False))
    assert "was kept as" in caplog.text
    assert [r["id"] for r in read_lines(output)] == ["p0", "p1"]
    (backup,) = tmp_path.glob("predictions.jsonl.*.bak")
    assert backup.read_text() == '{"id": "old"}\n'


def test_user_callback_from_a_yaml_file_runs_alongside_ours(L, tmp_path, monkeypatch, models, prompt_file):
    monkeypatch.chdir(tmp_path)
    output, seen = tmp_path / "predictions.jsonl", tmp_path / "seen.json"
    user = tmp_path / "user_callbacks.yaml"
    user.write_text(f"- class_path: user_callbacks.RecordingCallback\n  init_args:\n    path: {seen}\n")
    main(cli_args("predict_sr.yaml", models, prompt_file, writer_file(tmp_path, output),
                  f"--trainer.callbacks+={user}", "--model.schedule=FixedSchedule",
                  "--model.schedule.lengths=[4, 8]"))
    assert len(read_lines(output)) == len(PROMPTS)
    seen = json.loads(seen.read_text())
    assert seen["batches"] == 3 and seen["results"] == len(PROMPTS)
    assert seen["decisions"] == 3 * 2  # every batch decides at 4 and 8 tokens
    assert seen["steps"] >= 3 * 8


def test_a_users_own_schedule_from_the_command_line(L, tmp_path, monkeypatch, models, prompt_file):
    """Any class with the Schedule protocol's three methods works from the command line, no base
    class needed, replacing the config's MemorySchedule (whose arguments are dropped)."""
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "predictions.jsonl"
    main(cli_args("predict_sr.yaml", models, prompt_file, writer_file(tmp_path, output),
                  "--model.schedule=user_callbacks.EveryKTokens", "--model.schedule.k=5"))
    records = read_lines(output)
    assert len(records) == len(PROMPTS)
    assert all(record["stats"]["rounds"] == 24 // 5 for record in records)  # at 5, 10, 15 and 20 tokens


def test_a_schedule_without_the_protocols_methods_is_rejected_at_construction():
    with pytest.raises(TypeError, match="must implement lightning_sr.generation.Schedule"):
        SpeculativeRejectionModule(schedule=object())


def test_plain_python_predict_with_model_objects(L, caplog):
    tokenizer = make_tokenizer()
    module = SpeculativeRejectionModule(
        generator=tiny_llama(tokenizer), tokenizer=tokenizer,
        reward_model=FunctionReward(lambda prompt, response: float(len(response))),
        n=4, alpha=0.5, schedule=FixedSchedule([3]), sampling=SamplingParams(max_new_tokens=6),
        return_candidates=True,
    )
    assert isinstance(module, L.LightningModule)
    batches = [[{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:2])], [{"id": 2, "prompt": PROMPTS[2]}]]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="lightning_sr"):
        outputs = trainer.predict(module, DataLoader(batches, batch_size=None))
    records = [record for batch in outputs for record in batch]
    assert [r["id"] for r in records] == [0, 1, 2]
    for record in records:
        finals = [c["reward"] for c in record["candidates"] if c["final"]]
        assert record["reward"] == max(finals) and len(record["candidates"]) == 4
    assert "decision 1 at 3 tokens" in caplog.text  # no progress bar: decisions are logged
    assert not module.generator.training and not any(p.requires_grad for p in module.generator.parameters())


def test_a_prompt_too_long_for_the_context_is_skipped_by_id(L, tmp_path, models, caplog):
    from transformers import AutoTokenizer

    from lightning_sr.chat import encode_prompt

    overhead = len(encode_prompt(AutoTokenizer.from_pretrained(models[0]), "good")) - 1

    def words(tokens):  # a prompt of exactly ``tokens`` tokens once the chat template is applied
        return " ".join(["good"] * (tokens - overhead))

    prompts = tmp_path / "prompts.jsonl"
    lines = [  # the tiny generator's context is 256 tokens: a prompt must leave room for one more
        {"id": "ok", "prompt": "thanks"}, {"id": "long", "prompt": words(300)},
        {"id": "full", "prompt": words(256)}, {"id": "fits", "prompt": words(255)},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "predictions.jsonl"
    with caplog.at_level(logging.WARNING, logger="lightning_sr"):
        predict(L, small_module(models), PromptDataModule(str(prompts)), JSONLPredictionWriter(str(output)))
    assert [r["id"] for r in read_lines(output)] == ["ok", "fits"]
    assert "Skipping prompt 'long' (line 2): it has 300 tokens" in caplog.text and "context holds 256" in caplog.text
    assert "Skipping prompt 'full' (line 3): it has 256 tokens" in caplog.text
    assert "'fits'" not in caplog.text


def test_models_load_lazily(models):
    module = SpeculativeRejectionModule(*models)
    assert module.generator is None and module.reward is None
    module.configure_model()
    assert module.generator is not None and module.reward.score(["a"], ["b"]).shape == (1,)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n": 0}, "n must be a positive integer"), ({"alpha": 1.5}, r"alpha must be in \[0, 1\)"),
     ({"method": "bon"}, "method must be one of"), ({"dtype": "float33"}, "dtype must be a torch dtype"),
     ({"n": "auto", "method": "best_of_n"}, "give n for Best-of-N")],
)
def test_bad_options_fail_at_construction_before_any_model_loads(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeRejectionModule("no/such/model", "no/such/reward", **kwargs)


def test_prompt_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert [(p["id"], p["prompt"], p["index"]) for p in read_prompts(text)] == [(1, "first prompt", 0), (3, "second prompt", 1)]
    bad = tmp_path / "bad.jsonl"
    for lines, message in [
        ('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": \n', r"bad.jsonl:2: not valid JSON"),
        ('{"id": 1, "prompt": "ok"}\n{"id": 2, "text": "hi"}\n', r"bad.jsonl:2: no 'prompt' field"),
        ('{"id": 1, "prompt": "ok"}\n{"id": 1, "prompt": "again"}\n', r"bad.jsonl:2: id 1 already used on line 1"),
        ('{"id": ["a"], "prompt": "ok"}\n', r"bad.jsonl:1: 'id' must be a string or an integer"),
        ('{"id": 1, "prompt": "  \\t "}\n', r"bad.jsonl:1: 'prompt' is blank"),
        ('{"id": 1, "prompt": "ok", "x": NaN}\n', r"bad.jsonl:1: not valid JSON \(NaN is not JSON\)"),
        ('{"id": true, "prompt": "ok"}\n', r"bad.jsonl:1: 'id' must be a string or an integer, got bool"),
        ('{"id": 1, "prompt": []}\n', r"bad.jsonl:1: 'prompt' must be a non-blank string or a list of chat messages"),
        ('{"id": 1, "prompt": [{"content": "hi"}]}\n', r"bad.jsonl:1: chat messages need a 'role' string and a 'content'"),
        ('{"id": 1, "prompt": [{"role": "user"}]}\n', r"bad.jsonl:1: chat messages need a 'role' string and a 'content'"),
    ]:
        bad.write_text(lines)
        with pytest.raises(ValueError, match=message):
            read_prompts(bad)
    bad.write_bytes(b'{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_prompts(bad)
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"key": "a", "question": "hi"}\n{"question": "there"}\n')
    assert [(p["id"], p["prompt"]) for p in read_prompts(custom, prompt_field="question", id_field="key")] == [
        ("a", "hi"), (2, "there")]


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
    assert not list(tmp_path.glob(".predictions.jsonl.rank*"))
    assert "Predictions:" in done.stdout


def test_memory_profiler_draws_figure_one_from_speculative_rejection(L, tmp_path, models, prompt_file):
    module = small_module(models, n=8, schedule=FixedSchedule([3, 6]), sampling=SamplingParams(max_new_tokens=10))
    predict(L, module, PromptDataModule(str(prompt_file), batch_size=4), GPUMemoryProfiler(dirpath=str(tmp_path)))
    with open(tmp_path / "memory_predict_generation.csv") as file:
        rows = list(csv.DictReader(file))
    assert {row["batch_idx"] for row in rows} == {"0", "1"}
    for batch in ("0", "1"):
        steps = [row for row in rows if row["batch_idx"] == batch]
        assert [int(row["step"]) for row in steps] == list(range(1, len(steps) + 1))
        for before, row in zip(steps, steps[1:]):
            dropped = int(before["live_rows"]) - int(row["live_rows"])
            assert dropped == int(row["rejected_rows"]) + int(row["ended_rows"])
            assert (row["decision"] in ("True", "1")) == (int(row["step"]) in (3, 6))
    assert (tmp_path / "memory_predict_generation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leftover_rank_files_are_merged_and_user_files_are_left_alone(L, tmp_path, models, prompt_file, capsys):
    output = tmp_path / "predictions.jsonl"
    output.write_text('{"id": "p0", "response": "from rank 0"}\n')
    writer = JSONLPredictionWriter(str(output))
    header = '{"lightning_sr_rank_file": {"output": "predictions.jsonl", "rank": 1}}\n'
    # rank 1 also finished p0: the output's record (the first one) wins
    writer.rank_path(1).write_text(header + '{"id": "p1", "response": "from rank 1"}\n{"id": "p0", "response": "again"}\n')
    users = {  # look like ours by name, but they are the user's: never read, merged or deleted
        "predictions.rank_archive.jsonl": '{"id": "p2", "response": "user"}\n',
        "predictions.rankings.jsonl": '{"score": 1}\n',
        ".predictions.jsonl.rank2.part": '{"id": "p3", "response": "no header"}\n',
    }
    for name, text in users.items():
        (tmp_path / name).write_text(text)
    predict(L, small_module(models, method="best_of_n", n=2, schedule=None), PromptDataModule(str(prompt_file), limit=4), writer)
    records = read_lines(output)
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "p3"]
    assert records[0]["response"] == "from rank 0" and records[1]["response"] == "from rank 1"
    assert "user" not in {r["response"] for r in records}
    # p0 and p1 were generated again but not written twice
    assert re.search(r"this run: 2 prompts written in [\d.]+ s, 2 already in the file", capsys.readouterr().out)
    assert not writer.rank_path(1).exists()
    assert {name: (tmp_path / name).read_text() for name in users} == users


def test_outputs_are_strict_json_and_non_finite_numbers_are_counted(L, tmp_path, models, prompt_file, capsys):
    rewards = iter([float("nan"), float("inf")] + [1.0] * 1000)
    reward = FunctionReward(lambda prompt, response: next(rewards))
    module = SpeculativeRejectionModule(models[0], reward, method="best_of_n", n=1, sampling=SamplingParams(max_new_tokens=4))
    output = tmp_path / "predictions.jsonl"
    predict(L, module, PromptDataModule(str(prompt_file), batch_size=2, limit=2), JSONLPredictionWriter(str(output)))

    def refuse(name):
        raise ValueError(name)

    lines = output.read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["reward"] for r in records] == [None, None]
    assert "2 non-finite numbers (NaN/inf) written as null" in capsys.readouterr().out


class _BarWatcher(LightningCallback):
    """Reads what the predict progress bar shows while a batch decodes."""

    def __init__(self):
        self.seen = []

    def on_generation_step(self, trainer, pl_module, event):
        bar = trainer.progress_bar_callback
        if getattr(bar, "_predict_progress_bar", None) is not None:
            self.seen.append(str(bar._predict_progress_bar.postfix))
        else:
            self.seen.append(bar.progress.tasks[bar.predict_progress_bar_id].description)


@pytest.mark.parametrize("bar", ["TQDMProgressBar", "RichProgressBar"])
def test_the_progress_bar_moves_while_a_batch_decodes(L, tmp_path, models, prompt_file, bar):
    watcher = _BarWatcher()
    module = small_module(models, schedule=FixedSchedule([3, 6]))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[getattr(L.sub("callbacks"), bar)(), watcher])
    trainer.predict(module, datamodule=PromptDataModule(str(prompt_file), batch_size=4), return_predictions=False)
    shown = [text for text in watcher.seen if "tok/s" in text]
    assert shown, watcher.seen[:5]
    assert any("live rows" in text and "round 1" in text for text in shown)  # after the first decision


def test_a_budget_cpu_cannot_measure_fails_before_the_models_load(L, tmp_path, models, prompt_file, monkeypatch):
    import lightning_sr.modules.generation as module_code

    loaded = []
    monkeypatch.setattr(module_code, "load_causal_lm", lambda *args, **kwargs: loaded.append(args))
    module = SpeculativeRejectionModule(*models, schedule=MemorySchedule(budget_bytes=None))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"measures free CUDA memory.*--model.schedule.budget_bytes="):
        trainer.predict(module, datamodule=PromptDataModule(str(prompt_file)), return_predictions=False)
    assert loaded == []


def test_a_prompt_file_that_is_not_utf8_ends_in_its_file_and_line(tmp_path, models, capsys):
    """The reader's ``file:line`` message, not the codec error it replaced (``from None``)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args("predict_sr.yaml", models, bad, writer_file(tmp_path, tmp_path / "out.jsonl")))
    message = str(exit_info.value.code)
    assert message.startswith(f"lightning-sr: {bad}:2: not UTF-8 text (byte 0xe9"), message


def test_the_readmes_free_memory_budget_parses_to_none(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", f"--config={ROOT / 'configs' / 'predict_sr.yaml'}", '--model.schedule={"budget_bytes": null}',
              "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "budget_bytes: null" in capsys.readouterr().out
