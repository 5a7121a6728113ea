"""What a predict run tells its user: nothing left to do, progress that fits the terminal, progress
in a log without a terminal, and a run that wrote nothing (or only NaN rewards) failing loudly.

CLI runs use the tiny ``workspace`` models in-process, under both Lightning packages (``L``).
"""

import fcntl
import io
import json
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path
from types import SimpleNamespace

import pytest

import lightning_sr.modules.generation as module_code
from lightning_sr.callbacks.predictions import JSONLPredictionWriter, problem_of
from lightning_sr.cli import main
from lightning_sr.data.prompts import PromptDataModule
from lightning_sr.generation import FixedSchedule, SamplingParams, StepEvent
from lightning_sr.modules.generation import SpeculativeRejectionModule, _Status
from lightning_sr.progress import MIN_BAR_COLUMNS, show_status
from lightning_sr.rewards import FunctionReward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """The CLI saves its config.yaml into the working folder when there is no logger."""
    monkeypatch.chdir(tmp_path)


def command(workspace, output, *extra, prompts=None):
    """A quick predict of the first 4 prompts, in batches of 2, resuming from ``output``."""
    return [
        "predict", f"--config={ROOT / 'configs' / 'predict_sr.yaml'}",
        f"--model.generator={workspace['generator']}", f"--model.reward_model={workspace['reward']}",
        "--model.n=4", "--model.schedule=FixedSchedule", "--model.schedule.lengths=[3]",
        "--model.sampling.max_new_tokens=8", f"--data.path={prompts or workspace['prompts']}", "--data.limit=4",
        "--data.batch_size=2", f"--data.completed={output}", "--trainer.callbacks=[]",
        "--trainer.callbacks+=lightning_sr.callbacks.JSONLPredictionWriter", f"--trainer.callbacks.output_path={output}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", *extra,
    ]


def refuse_to_load(monkeypatch):
    """Any model load fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_causal_lm", "load_tokenizer", "HFRewardModel"):
        monkeypatch.setattr(module_code, name, refuse)


def too_long_prompts(tmp_path, count=3):
    """Prompts longer than the tiny generator's context (256 tokens): every one is skipped."""
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"id": f"long{i}", "prompt": " ".join(["good"] * 300)}) + "\n" for i in range(count)))
    return path


# 1. Nothing left to do -------------------------------------------------------------------------


def test_a_finished_run_says_nothing_is_left_before_any_model_loads(L, workspace, tmp_path, monkeypatch, capsys):
    output = tmp_path / "predictions.jsonl"
    main(command(workspace, output))
    written = output.read_bytes()
    assert len(written.splitlines()) == 4
    capsys.readouterr()

    with monkeypatch.context() as patch:
        refuse_to_load(patch)
        cli = main(command(workspace, output))  # returns: exit status 0
    printed = capsys.readouterr().out
    assert f"Nothing left to do: all 4 prompts are already in {output}; no model was loaded." in printed
    assert "--trainer.callbacks.resume=false" in printed and "Predictions:" not in printed
    assert output.read_bytes() == written
    assert cli.model.generator is None

    # the way out it names works: the run starts afresh and the old file is kept
    main(command(workspace, output, "--trainer.callbacks.resume=false"))
    assert len(output.read_text().splitlines()) == 4
    (backup,) = tmp_path.glob("predictions.jsonl.*.bak")
    assert backup.read_bytes() == written


def test_a_resumed_run_with_work_left_still_runs(L, workspace, tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    main(command(workspace, output, "--data.limit=2"))
    main(command(workspace, output))  # 2 more prompts
    assert "Nothing left" not in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ["p0", "p1", "p2", "p3"]


@pytest.mark.filterwarnings("ignore:Total length of `DataLoader` across ranks is zero")
def test_trainer_predict_with_nothing_left_logs_it_and_is_no_problem(L, workspace, tmp_path, caplog):
    output = tmp_path / "predictions.jsonl"
    models = (str(workspace["generator"]), str(workspace["reward"]))
    for _ in range(2):
        writer = JSONLPredictionWriter(str(output))
        module = SpeculativeRejectionModule(*models, n=2, schedule=FixedSchedule([3]), sampling=SamplingParams(max_new_tokens=4))
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
        with caplog.at_level(logging.INFO, logger="lightning_sr"):
            trainer.predict(module, datamodule=PromptDataModule(str(workspace["prompts"]), limit=2, completed=str(output)),
                            return_predictions=False)
    assert "nothing left to do" in caplog.text
    assert writer.problem is None and "Nothing was written" not in caplog.text


# 2. A status that fits the terminal -------------------------------------------------------------


def event(step=1, live=16, round_=0, decision=False, rejected=0):
    return StepEvent(step=step, sequence_length=20 + step, live_rows=live, kv_bytes=0,
                     rejected_rows=rejected, decision=decision, round=round_)


def test_the_status_comes_long_and_short():
    texts = _Status.texts(event(step=1024, live=120, round_=2), rate=850.4, elapsed=31.2)
    assert texts[0] == "1024 tokens · 120 live rows · round 2 · 850 tok/s · 31s"
    assert texts[1] == "1024 tok · 120 live · r2 · 850 tok/s"
    assert [len(text) for text in texts] == sorted((len(text) for text in texts), reverse=True)
    assert len(texts[-1]) <= 10


class _Terminal:
    """A pseudo-terminal of ``columns``: a stream for tqdm, and what it shows."""

    def __init__(self, columns):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.stream = os.fdopen(slave, "w", encoding="utf-8")

    def last_line(self):
        self.stream.flush()
        chunks = []
        while select.select([self.master], [], [], 0.2)[0]:  # all that was written, however it comes
            chunks.append(os.read(self.master, 1 << 16))
        text = b"".join(chunks).decode("utf-8")
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\n", "\r").split("\r")[-1]

    def close(self):
        self.stream.close()
        os.close(self.master)


def predict_bar(L, stream):
    """Lightning's own predict bar, 83 s into the 13th of 15 batches."""
    bars = L.sub("callbacks.progress.tqdm_progress")
    bar = bars.Tqdm(desc="Predicting DataLoader 0", total=15, file=stream, dynamic_ncols=True, smoothing=0,
                    bar_format=bars.TQDMProgressBar.BAR_FORMAT, leave=True)
    bar.update(12)
    bar.start_t -= 83
    return bar


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_the_bar_line_fits_the_terminal(L, columns):
    terminal = _Terminal(columns)
    try:
        bar = predict_bar(L, terminal.stream)
        trainer = SimpleNamespace(progress_bar_callback=SimpleNamespace(is_enabled=True, _predict_progress_bar=bar))
        texts = _Status.texts(event(step=1024, live=120, round_=2), rate=850.4, elapsed=83.0)
        assert show_status(trainer, texts)
        line = terminal.last_line()
        bar.close()
    finally:
        terminal.close()
    assert len(line) < columns, line  # a line as wide as the terminal wraps on some terminals
    shown = bar.postfix
    assert shown in texts and line.endswith(f", {shown}]"), line  # whole, not cut off
    bar_columns = len(line.split("|")[1])
    if shown != texts[-1]:  # the longest status that leaves the bar 10 columns
        assert bar_columns >= MIN_BAR_COLUMNS, line
    if shown != texts[0]:
        longer = texts[texts.index(shown) - 1]
        assert bar_columns - (len(longer) - len(shown)) < MIN_BAR_COLUMNS, line
    if columns == 200:
        assert shown == texts[0]


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_the_rich_bar_line_fits_the_terminal(L, columns):
    """Lightning's default bar when Rich is installed: a description too long for the line makes
    Rich wrap the time column onto more lines (three at 80 columns, before)."""
    from rich.console import Console

    rich_bars = L.sub("callbacks.progress.rich_progress")
    bar = rich_bars.RichProgressBar()
    console = Console(file=io.StringIO(), width=columns, force_terminal=True, color_system="standard", record=True)
    bar.progress = rich_bars.CustomProgress(*bar.configure_columns(None), console=console, auto_refresh=False)
    bar.predict_progress_bar_id = bar.progress.add_task(bar.predict_description, total=15, completed=12)
    texts = _Status.texts(event(step=1024, live=120, round_=2), rate=850.4, elapsed=83.0)
    assert show_status(SimpleNamespace(progress_bar_callback=bar), texts)
    console.print(bar.progress.make_tasks_table(bar.progress.tasks))  # what Rich's live display draws
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) == 1, lines
    row = lines[0]
    assert len(row) <= columns and "12/15 0:00:00 • -:--:--" in row and "…" not in row, row
    shown = re.search(r"Predicting \[(.*?)\] ", row).group(1)
    assert shown in texts
    assert shown == (texts[0] if columns == 200 else texts[1] if columns == 100 else texts[-1]), row


def test_a_bar_that_writes_to_a_file_is_not_repainted(L):
    stream = io.StringIO()
    bar = predict_bar(L, stream)
    written = stream.getvalue()
    trainer = SimpleNamespace(progress_bar_callback=SimpleNamespace(is_enabled=True, _predict_progress_bar=bar))
    texts = _Status.texts(event(), rate=10.0, elapsed=1.0)
    assert not show_status(trainer, texts)  # the caller logs instead
    assert stream.getvalue() == written and bar.postfix == texts[0]  # kept for the bar's next line


# 3. Without a live bar, a line every 30 s -------------------------------------------------------


def test_without_a_bar_decoding_logs_a_line_every_30_seconds(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(module_code.time, "perf_counter", lambda: clock[0])
    status = _Status(None, 3, 4)
    with caplog.at_level(logging.INFO, logger="lightning_sr"):
        for second in range(1, 101):  # a step every 0.5 s for 100 s, a decision at 45 s
            for half in (0.5, 1.0):
                clock[0] = 1000.0 + second - 1 + half
                decision = clock[0] == 1045.0
                status.update(event(step=int(2 * (clock[0] - 1000)), live=40 if clock[0] < 1045 else 20,
                                    round_=int(clock[0] >= 1045), decision=decision, rejected=20 * decision))
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "batch 3: 60 tokens, 40 rows live, round 0, 80 tok/s, 30 s",
        "batch 3: decision 1 at 90 tokens, 20 rejected, 20 rows live",
        "batch 3: 150 tokens, 20 rows live, round 1, 64 tok/s, 75 s",  # 30 s after the decision's line
    ], messages


def test_with_a_live_bar_nothing_is_logged(monkeypatch, caplog):
    shown = []
    monkeypatch.setattr(module_code, "show_status", lambda trainer, texts: shown.append(texts) or True)
    clock = [0.0]
    monkeypatch.setattr(module_code.time, "perf_counter", lambda: clock[0])
    status = _Status(object(), 0, 1)
    with caplog.at_level(logging.INFO, logger="lightning_sr"):
        for step in range(1, 200):
            clock[0] = step
            status.update(event(step=step, decision=step == 50, round_=int(step >= 50)))
    assert shown and not caplog.records


# 4. A run that wrote nothing, or only NaN rewards -----------------------------------------------


def test_a_run_that_wrote_nothing_exits_1_and_keeps_what_was_there(L, workspace, tmp_path, capsys, caplog):
    output = tmp_path / "predictions.jsonl"
    main(command(workspace, output, "--data.limit=2"))
    before = output.read_bytes()
    with caplog.at_level(logging.WARNING, logger="lightning_sr"), pytest.raises(SystemExit) as stopped:
        main(command(workspace, output, prompts=too_long_prompts(tmp_path)))
    assert stopped.value.code == (
        f"lightning-sr: nothing was written to {output}: no prediction came from the 2 batches served "
        "(skipped prompts are named in the warnings above)"
    )
    assert "Skipping prompt 'long0' (line 1): it has " in caplog.text
    assert "Nothing was written" not in caplog.text  # said once, by the command
    assert "this run: 0 prompts written" in capsys.readouterr().out  # the summary still comes first
    assert output.read_bytes() == before


def test_a_run_whose_every_reward_is_nan_warns_early_and_exits_1(L, workspace, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(module_code, "HFRewardModel", lambda name, dtype: FunctionReward(lambda prompt, response: float("nan")))
    output = tmp_path / "predictions.jsonl"
    with caplog.at_level(logging.WARNING, logger="lightning_sr"), pytest.raises(SystemExit) as stopped:
        main(command(workspace, output))
    assert stopped.value.code == f"lightning-sr: every reward written to {output} is NaN: 4 of 4 predictions have reward null"
    warnings = [r.getMessage() for r in caplog.records if "Every reward of batch" in r.getMessage()]
    assert warnings == [f"Every reward of batch 0 is NaN: the reward model {workspace['reward']} gives no usable score, "
                        "so responses are chosen by nothing and written with reward null"]  # once, at the first batch
    assert "4 of the 4 rewards written this run are NaN (null)" in capsys.readouterr().out
    assert [json.loads(line)["reward"] for line in output.read_text().splitlines()] == [None] * 4


def test_some_nan_rewards_are_no_failure(L, workspace, tmp_path, monkeypatch, capsys):
    rewards = iter([float("nan")] * 8 + [0.5] * 1000)  # the first batch's: all NaN
    monkeypatch.setattr(module_code, "HFRewardModel", lambda name, dtype: FunctionReward(lambda p, r: next(rewards)))
    output = tmp_path / "predictions.jsonl"
    main(command(workspace, output, "--model.method=best_of_n", "--model.n=4"))
    assert "2 of the 4 rewards written this run are NaN (null)" in capsys.readouterr().out


def test_python_users_of_the_writer_get_a_warning_not_an_exit(L, workspace, tmp_path, caplog):
    output = tmp_path / "predictions.jsonl"
    writer = JSONLPredictionWriter(str(output))
    module = SpeculativeRejectionModule(str(workspace["generator"]), str(workspace["reward"]), n=2,
                                        schedule=FixedSchedule([3]), sampling=SamplingParams(max_new_tokens=4))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    with caplog.at_level(logging.WARNING, logger="lightning_sr"):
        trainer.predict(module, datamodule=PromptDataModule(str(too_long_prompts(tmp_path, 1))), return_predictions=False)
    assert writer.problem.startswith(f"nothing was written to {output}: no prediction came from the 1 batch served")
    assert f"Nothing was written to {output}" in caplog.text


@pytest.mark.parametrize(
    "counts, expected",
    [
        ({}, None),  # a resumed run with nothing left: no batch served
        ({"batches": 2, "duplicates": 4}, None),  # everything was there already
        ({"batches": 2, "written": 4, "null_rewards": 3}, None),
        ({"batches": 2}, "nothing was written to out.jsonl: no prediction came from the 2 batches served"),
        ({"batches": 2, "written": 4, "null_rewards": 4}, "every reward written to out.jsonl is NaN: 4 of 4"),
    ],
)
def test_what_counts_as_a_problem(counts, expected):
    found = problem_of(Path("out.jsonl"), {"batches": 0, "written": 0, "duplicates": 0, "null_rewards": 0, **counts})
    assert found == expected if expected is None else found.startswith(expected)


def test_the_command_exits_with_status_1_and_the_reason_on_stderr(workspace, tmp_path):
    output = tmp_path / "predictions.jsonl"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "lightning-sr"),
         *command(workspace, output, prompts=too_long_prompts(tmp_path, 1))],
        capture_output=True, text=True, env={**os.environ, "LIGHTNING_SR_PACKAGE": "pytorch_lightning"}, timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.rstrip().endswith(f"lightning-sr: nothing was written to {output}: no prediction came from "
                                        "the 1 batch served (skipped prompts are named in the warnings above)")
    assert "Traceback" not in run.stderr
