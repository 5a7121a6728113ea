"""Faults: real processes killed mid-run, a full disk, a reward model that fails mid-batch.

After each fault the same command or call is run again; the results must equal an
uninterrupted run's, with nothing lost or written twice. ``benchmarks/fault_soak.py`` runs the
kill cycles at length (figures in benchmarks/RESULTS.md).
"""

import errno
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning_sr.testing import make_tokenizer, tiny_llama

from lightning_sr.callbacks.predictions import JSONLPredictionWriter
from lightning_sr.data.loaders import EpochShuffle
from lightning_sr.data.preferences import PreferenceDataModule
from lightning_sr.data.prompts import PromptDataModule
from lightning_sr.generation import FixedSchedule, SamplingParams
from lightning_sr.modules.generation import SpeculativeRejectionModule
from lightning_sr.modules.preference import PreferenceModule
from lightning_sr.optim import OnDARE
from lightning_sr.rewards import FunctionReward



@pytest.mark.slow
def test_predict_killed_at_random_moments_ends_like_an_uninterrupted_run(soak, workspace, tmp_path):
    row = soak.soak_predict(workspace, tmp_path, cycles=3, seed=1)
    assert row["lost"] == 0 and row["duplicated"] == 0 and row["records_equal"], row


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_same_weights(soak, workspace, tmp_path):
    row = soak.soak_fit(workspace, tmp_path, cycles=3, seed=1)
    assert row["steps"] == [24, 24] and row["max_weight_difference"] == 0.0, row


def test_epoch_shuffle_shards_one_permutation_over_processes_and_resumes_mid_epoch():
    alone = EpochShuffle(7, seed=3)
    alone.set_epoch(2)
    ranks = [EpochShuffle(7, seed=3, num_replicas=2, rank=rank) for rank in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    first, second = (list(sampler) for sampler in ranks)
    assert len(first) == len(second) == len(ranks[0]) == 4  # 7 items padded to 8
    assert [i for pair in zip(first, second) for i in pair][:7] == list(alone)  # the one order, dealt out
    # rank 1 stopped after 3 items of epoch 2: a fresh sampler given its state draws the rest
    stopped = EpochShuffle(7, seed=3, num_replicas=2, rank=1)
    stopped.set_epoch(2)
    items = iter(stopped)
    drawn = [next(items) for _ in range(3)]
    resumed = EpochShuffle(7, seed=3, num_replicas=2, rank=1)
    resumed.load_state_dict(stopped.state_dict())  # restores the epoch too
    assert drawn + list(resumed) == second
    resumed.load_state_dict({"epoch": 2, "drawn": 4})  # saved at the epoch's end: the next epoch
    nxt = EpochShuffle(7, seed=3, num_replicas=2, rank=1)
    nxt.set_epoch(3)
    assert list(resumed) == list(nxt) != second


def preference_run(L, path, tmp_path, max_steps, ckpt=None, every=None, processes=1):
    tokenizer = make_tokenizer(chat_template=True)
    module = PreferenceModule(tiny_llama(tokenizer), optimizer=partial(OnDARE, lr=1e-2, keep_rate=0.5, merge_weight=0.0))
    callbacks = [L.sub("callbacks").ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)] if every else []
    distributed = {"devices": processes, "strategy": "ddp_spawn"} if processes > 1 else {}
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks, **distributed)
    trainer.fit(module, PreferenceDataModule(str(path), tokenizer=tokenizer, batch_size=2), ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("resume_at", [4, 18], ids=["mid-epoch", "epoch boundary"])
def test_fit_resumes_bit_exactly_from_any_checkpoint(L, soak, workspace, tmp_path, resume_at):
    pairs = workspace["pairs"]  # 36 pairs, 18 batches an epoch
    full = preference_run(L, pairs, tmp_path / "full", max_steps=22)
    preference_run(L, pairs, tmp_path / "first", max_steps=resume_at, every=resume_at)
    (ckpt,) = (tmp_path / "first").glob(f"*step={resume_at}.ckpt")
    with pytest.warns(UserWarning, match="exists and is not empty"):  # resuming into the run's own folder
        resumed = preference_run(L, pairs, tmp_path / "first", max_steps=22, ckpt=str(ckpt), every=resume_at)
    for (name, a), b in zip(full.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_two_process_fit_resumes_bit_exactly_in_a_later_epoch(L, soak, workspace, tmp_path):
    pairs = workspace["pairs"]  # 36 pairs: 9 batches of 2 an epoch on each of the 2 processes
    full = preference_run(L, pairs, tmp_path / "full", max_steps=16, processes=2)
    preference_run(L, pairs, tmp_path / "first", max_steps=12, every=12, processes=2)
    (ckpt,) = (tmp_path / "first").glob("*step=12.ckpt")  # the 3rd batch of the 2nd epoch
    resumed = preference_run(L, pairs, tmp_path / "resumed", max_steps=16, ckpt=str(ckpt), processes=2)
    for (name, a), b in zip(full.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b), name


def predict_once(L, models, prompts, output, reward=None, callbacks=()):
    module = SpeculativeRejectionModule(
        models[0], reward or models[1], n=4, schedule=FixedSchedule([3]), sampling=SamplingParams(max_new_tokens=6)
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[JSONLPredictionWriter(str(output)), *callbacks])
    datamodule = PromptDataModule(str(prompts), batch_size=2, completed=str(output))
    trainer.predict(module, datamodule=datamodule, return_predictions=False)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_seconds(records):
    return [{**r, "stats": {k: v for k, v in r["stats"].items() if not k.endswith("_seconds")}} for r in records]


def test_a_full_disk_stops_the_run_and_keeps_what_was_written(L, workspace, tmp_path, monkeypatch):
    models = (str(workspace["generator"]), str(workspace["reward"]))
    reference = tmp_path / "reference.jsonl"
    predict_once(L, models, workspace["prompts"], reference)
    output = tmp_path / "predictions.jsonl"
    writes = {"count": 0}
    append = JSONLPredictionWriter._append

    def append_until_the_disk_fills(self, new_lines):
        writes["count"] += 1
        if writes["count"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        append(self, new_lines)

    monkeypatch.setattr(JSONLPredictionWriter, "_append", append_until_the_disk_fills)
    with pytest.raises(OSError, match="No space left"):
        predict_once(L, models, workspace["prompts"], output)
    assert len(lines(output)) == 4  # the two batches written before the disk filled
    monkeypatch.setattr(JSONLPredictionWriter, "_append", append)
    predict_once(L, models, workspace["prompts"], output)
    assert without_seconds(lines(output)) == without_seconds(lines(reference))


def test_a_reward_model_failing_mid_batch_keeps_earlier_batches(L, workspace, tmp_path):
    from lightning_sr.rewards import HFRewardModel

    models = (str(workspace["generator"]), str(workspace["reward"]))
    real = HFRewardModel(models[1])
    calls = {"count": 0}

    def flaky(prompts, responses):
        calls["count"] += 1
        if calls["count"] == 5:  # the third batch's first scoring call
            raise RuntimeError("reward server went away")
        return real.score(prompts, responses).tolist()

    output = tmp_path / "predictions.jsonl"
    with pytest.raises(RuntimeError, match="reward server went away"):
        predict_once(L, models, workspace["prompts"], output, reward=FunctionReward(flaky, batched=True))
    assert [r["id"] for r in lines(output)] == ["p0", "p1", "p2", "p3"]
    predict_once(L, models, workspace["prompts"], output)
    assert sorted(r["id"] for r in lines(output)) == sorted(f"p{i}" for i in range(12))
