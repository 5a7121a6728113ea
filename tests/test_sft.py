"""SFTModule and SFTDataModule on tiny models: the response-only loss, chat rendering, bad lines,
the CLI config, exact mid-epoch resume; the shared data code's warning on identical pairs; the
deterministic SFT data generator."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning_sr.testing import make_tokenizer, save_tiny_generator, tiny_llama

from lightning_sr.cli import main
from lightning_sr.data.preferences import read_preferences
from lightning_sr.data.sft import SFTCollator, SFTDataModule, SFTTokenizer, read_sft
from lightning_sr.modules.sft import SFTModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fit_sft.yaml"
EXAMPLES = [
    {"prompt": "was your day good ?", "response": "yes a great day , thanks"},
    {"prompt": "is paris the capital of france ?", "response": "yes it is"},
    {"prompt": [{"role": "user", "content": "please help"}], "response": [{"role": "assistant", "content": "you are a friend"}]},
    {"prompt": "are you happy today ?", "response": "very happy , thank you"},
    {"prompt": "is it night ?", "response": "no it is day"},
    {"prompt": "you are rude", "response": "sorry , i was rude"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def data_path(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", EXAMPLES)


# ---------------------------------------------------------------- loss
def test_loss_is_the_mean_nll_of_response_tokens_only(chat_tokenizer, tmp_path):
    model = tiny_llama(chat_tokenizer)
    encode = SFTTokenizer(chat_tokenizer, 64, 32)
    examples = [encode(r) for r in read_sft(write_jsonl(tmp_path / "s.jsonl", EXAMPLES[:3]))]
    module = SFTModule(model)
    module.configure_model()
    # Reference: each row alone, unpadded; cross-entropy of the response tokens given everything before.
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e["prompt_ids"] + e["response_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        start = len(e["prompt_ids"]) - 1  # logits[t] predicts token t + 1
        total += F.cross_entropy(logits[start:], ids[0, start + 1 :], reduction="sum").item()
        count += len(e["response_ids"])
    for side in ("right", "left"):
        batch = SFTCollator(chat_tokenizer.pad_token_id, side)(examples)
        loss, tokens = module.compute_loss(batch)
        assert tokens == count
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # prompt tokens contribute nothing: changing them changes the context, not the scored tokens
    batch = SFTCollator(chat_tokenizer.pad_token_id)(examples)
    assert batch["loss_mask"].sum() == count
    prompt_positions = (batch["attention_mask"] == 1) & (batch["loss_mask"] == 0)
    assert prompt_positions.sum() == sum(len(e["prompt_ids"]) for e in examples)


def test_loss_gradient_ignores_prompt_targets(chat_tokenizer, tmp_path):
    """Scoring prompt tokens too would change the loss; the module's loss equals the masked one."""
    model = tiny_llama(chat_tokenizer)
    encode = SFTTokenizer(chat_tokenizer, 64, 32)
    examples = [encode(r) for r in read_sft(write_jsonl(tmp_path / "s.jsonl", EXAMPLES[:2]))]
    batch = SFTCollator(chat_tokenizer.pad_token_id)(examples)
    module = SFTModule(model)
    module.configure_model()
    loss, _ = module.compute_loss(batch)
    everything = dict(batch, loss_mask=batch["attention_mask"])
    assert not torch.isclose(loss, module.compute_loss(everything)[0])


# ---------------------------------------------------------------- data
def test_chat_messages_render_through_the_template(chat_tokenizer, tmp_path):
    rows = [
        {"prompt": "please help", "response": "you are a friend"},
        {"prompt": [{"role": "user", "content": "please help"}], "response": [{"role": "assistant", "content": "you are a friend"}]},
        {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "please help"}], "response": "you are a friend"},
    ]
    plain, messages, with_system = (SFTTokenizer(chat_tokenizer, 64, 32)(r) for r in read_sft(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert plain == messages  # a string is one user / assistant turn
    conversation = [{"role": "user", "content": "please help"}, {"role": "assistant", "content": "you are a friend"}]
    full = chat_tokenizer.apply_chat_template(conversation, tokenize=False)
    head = chat_tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert chat_tokenizer.decode(plain["prompt_ids"]) == chat_tokenizer.decode(chat_tokenizer(head, add_special_tokens=False)["input_ids"])
    assert plain["prompt_ids"] + plain["response_ids"] == chat_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert plain["response_ids"][-1] == chat_tokenizer.convert_tokens_to_ids("</s>")  # learns to end its turn
    assert with_system["prompt_ids"][: len(plain["prompt_ids"])] != plain["prompt_ids"]
    assert with_system["response_ids"] == plain["response_ids"]


def test_plain_text_without_a_template_ends_with_eos(tmp_path):
    tokenizer = make_tokenizer()
    enc = SFTTokenizer(tokenizer, 64, 32, chat_template=False)(read_sft(write_jsonl(tmp_path / "p.jsonl", EXAMPLES[:1]))[0])
    assert enc["response_ids"] == tokenizer("yes a great day , thanks", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_truncation_cuts_the_prompt_from_the_left_then_the_response(chat_tokenizer, tmp_path):
    row = {"prompt": "was your day good ? " * 4, "response": "yes a great day , thanks " * 3}
    record = read_sft(write_jsonl(tmp_path / "t.jsonl", [row]))[0]
    full = SFTTokenizer(chat_tokenizer, 256, 128)(record)
    cut = SFTTokenizer(chat_tokenizer, 24, 8)(record)
    assert len(cut["prompt_ids"]) == 8 and cut["prompt_ids"] == full["prompt_ids"][-8:]
    assert cut["response_ids"] == full["response_ids"][:16]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "hi"}, "missing field\\(s\\) 'response'"),
        ({"response": "hi"}, "missing field\\(s\\) 'prompt'"),
        ({"prompt": "hi", "response": "  "}, "field 'response' is empty"),
        ({"prompt": "hi", "response": 3}, "field 'response' must be a string or a non-empty list"),
        ({"prompt": [{"content": "hi"}], "response": "yes"}, "field 'prompt' must hold messages with 'role' and 'content'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [EXAMPLES[0], line, EXAMPLES[1]])
    with pytest.raises(ValueError, match=f"sft.jsonl:2: {message}"):
        read_sft(path)


def test_messages_without_a_template_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", EXAMPLES[:3])
    encode = SFTTokenizer(make_tokenizer(), 64, 32)
    with pytest.raises(ValueError, match="sft.jsonl:3: chat messages need a tokenizer with a chat template"):
        [encode(r) for r in read_sft(path)]


def test_data_module_splits_and_batches(chat_tokenizer, data_path):
    dm = SFTDataModule(str(data_path), chat_tokenizer, val_fraction=0.34, batch_size=2, seed=0)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 3
    sources = {r.source for r in dm.train_set.records} | {r.source for r in dm.val_set.records}
    assert len(sources) == 6
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"} and batch["input_ids"].shape[0] == 2


# ---------------------------------------------------------------- identical preference pairs
def test_identical_preference_pairs_warn_once_with_count_and_first_line(tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "a good day", "rejected": "a bad day"},
        {"prompt": "hi", "chosen": "same reply", "rejected": "same reply "},
        {"prompt": "yo", "chosen": "a good day", "rejected": "a bad day"},
        {"prompt": "yo", "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "x"}]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserWarning, match="2 preference pair\\(s\\) have the same chosen and rejected response \\(first at .*p.jsonl:2\\)") as record:
        assert len(read_preferences(path)) == 4  # kept: the split and order do not change
    assert len([w for w in record if "same chosen and rejected" in str(w.message)]) == 1


def test_distinct_preference_pairs_do_not_warn(tmp_path, recwarn):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "a good day", "rejected": "a bad day"}])
    read_preferences(path)
    assert not [w for w in recwarn if "same chosen and rejected" in str(w.message)]


# ---------------------------------------------------------------- CLI and checkpoints
def cli_args(tiny_dir, data_path, out, *extra):
    return [
        "fit", "--config", str(CONFIG),
        f"--model.model={tiny_dir}",
        f"--data.path={data_path}",
        f"--data.val_path={data_path}",
        f"--data.tokenizer={tiny_dir}",
        "--data.batch_size=2",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        *extra,
    ]


def test_fit_sft_config_runs_through_the_cli(L, tiny_dir, data_path, tmp_path):
    cli = main(cli_args(tiny_dir, data_path, tmp_path))
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2 and isinstance(trainer, L.Trainer)
    assert isinstance(module, SFTModule) and isinstance(module, L.LightningModule)
    assert isinstance(cli.datamodule, SFTDataModule) and isinstance(cli.datamodule, L.LightningDataModule)
    assert type(trainer.optimizers[0]).__name__ == "AdamW" and trainer.lr_scheduler_configs
    for key in ("train/loss", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    initial = tiny_llama(make_tokenizer(chat_template=True)).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in module.model.state_dict().items())  # it trained
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)  # plain data only
    assert state["hyper_parameters"]["model"] == str(tiny_dir)
    loaded = SFTModule.load_from_checkpoint(ckpt, weights_only=True)
    loaded.configure_model()
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_resume_mid_epoch_ends_where_an_uninterrupted_run_does(L, tiny_dir, data_path, tmp_path):
    # 6 examples, batch 2: 3 steps per epoch; the checkpoint at step 2 is one batch before the end
    # of the first epoch, and the run goes on into the second epoch. No validation, no scheduler
    # noise: only the data order and the optimizer state can make the runs differ.
    checkpoints = json.dumps([{"class_path": "ModelCheckpoint",
                               "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}}])
    common = ["--data.val_path=null", "--trainer.limit_val_batches=0", "--model.optimizer.init_args.lr=0.01",
              f"--trainer.callbacks={checkpoints}"]
    full = main(cli_args(tiny_dir, data_path, tmp_path / "full", "--trainer.max_steps=5", *common))
    first = main(cli_args(tiny_dir, data_path, tmp_path / "a", "--trainer.max_steps=2", *common))
    ckpt = next((tmp_path / "a").rglob("step=2.ckpt"))
    # resumed in another folder (the first run's checkpoints stay as they are): Lightning warns it
    with pytest.warns(UserWarning, match="dirpath has changed"):
        resumed = main(cli_args(tiny_dir, data_path, tmp_path / "b", "--trainer.max_steps=5", f"--ckpt_path={ckpt}", *common))
    assert first.trainer.global_step == 2 and resumed.trainer.global_step == 5
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0  # saved one batch before the epoch's end
    want = full.model.model.state_dict()
    for name, value in resumed.model.model.state_dict().items():
        assert torch.equal(value, want[name]), name


# ---------------------------------------------------------------- public names, data generator
def test_public_names_resolve_for_each_package(L):
    import lightning_sr
    import lightning_sr.data
    import lightning_sr.modules

    assert issubclass(lightning_sr.SFTModule, L.LightningModule)
    assert issubclass(lightning_sr.modules.SFTModule, L.LightningModule)
    assert issubclass(lightning_sr.data.SFTDataModule, L.LightningDataModule)
    assert "SFTModule" in dir(lightning_sr) and "SFTDataModule" in dir(lightning_sr.data)


def _make_sft_data():
    spec = importlib.util.spec_from_file_location("make_sft_data", ROOT / "scripts" / "make_sft_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_data_generator_is_deterministic_and_matches_the_shipped_files(tmp_path):
    make = _make_sft_data()
    make.main(["--output-dir", str(tmp_path / "a")])
    make.main(["--output-dir", str(tmp_path / "b")])
    for name in ("sft_units_train.jsonl", "sft_units_test.jsonl"):
        shipped = (ROOT / "configs" / "data" / name).read_text()
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text() == shipped, name
    make.main(["--output-dir", str(tmp_path / "c"), "--seed", "1"])
    assert (tmp_path / "c" / "sft_units_test.jsonl").read_text() != (tmp_path / "a" / "sft_units_test.jsonl").read_text()


def test_held_out_conversions_never_occur_in_training():
    question = lambda r: r["response"].split(" = ")[0] + " -> " + r["response"].split(" ")[-1]  # noqa: E731
    train = {question(r.__dict__) for r in read_sft(ROOT / "configs" / "data" / "sft_units_train.jsonl")}
    test = [question(r.__dict__) for r in read_sft(ROOT / "configs" / "data" / "sft_units_test.jsonl")]
    assert len(test) == 80 and not train & set(test)
    make = _make_sft_data()
    for r in read_sft(ROOT / "configs" / "data" / "sft_units_test.jsonl"):
        n, src = r.response.split(" = ")[0].split(" ")
        dst = r.response.split(" ")[-1].rstrip(".")
        factor = next(f for s, d, f in make.CONVERSIONS if (s, d) == (src, dst))
        assert r.response == f"{n} {src} = {int(n) * factor} {dst}."


# ---------------------------------------------------------------- the online merging chain's pieces
CHAIN_CONFIGS = sorted((ROOT / "configs" / "online_merging").glob("dpo_*.yaml"))


def _script(name):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("config", CHAIN_CONFIGS, ids=lambda c: c.stem)
def test_chain_dpo_configs_run_on_a_tiny_sft_model(L, config, tiny_dir, tmp_path):
    pairs = [{"prompt": "hi", "chosen": "a good day , thanks", "rejected": "a bad day"},
             {"prompt": "help", "chosen": "you are a great friend", "rejected": "i hate you"},
             {"prompt": "day ?", "chosen": "a great day", "rejected": "awful"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cli = main(["fit", "--config", str(config), f"--model.policy={tiny_dir}", f"--data.path={path}",
                f"--data.tokenizer={tiny_dir}", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                *([f"--model.base_model={tiny_dir}"] if "base_model:" in config.read_text() else [])])
    assert cli.trainer.global_step == 1 and isinstance(cli.trainer, L.Trainer)
    expected = {"adamw": "AdamW", "ondare": "OnDARE", "onties": "OnTIES", "stepk": "OnDARE"}[config.stem.split("_")[-1]]
    assert type(cli.trainer.optimizers[0]).__name__ == expected
    assert len(cli.datamodule.val_set) == 1  # the held-out split the evaluation reads


def test_pipeline_stages_and_runs_are_consistent():
    pipeline, report = _script("online_merging_pipeline"), _script("online_merging_report")
    names = [s.name for s in pipeline.stages()]
    assert len(names) == len(set(names))
    for stage in pipeline.stages():
        assert all(names.index(n) < names.index(stage.name) for n in stage.needs), stage.name
    for run in pipeline.RUNS.values():
        assert (pipeline.CONFIGS / run.config).is_file()
        options = ("--model.optimizer.init_args.", "--seed_everything=", "--data.init_args.order_seed=",
                   "--trainer.max_steps=", "--model.beta=")
        assert all(o.startswith(options) for o in run.overrides), run
    groups = {}
    for name in pipeline.RUNS:
        groups.setdefault(report.group_of(name), []).append(name)
    assert len(groups["adamw"]) == len(pipeline.SEEDS) and pipeline.MERGED_RUN in groups["adamw"]
    for name in groups["ondare-a1e-4"]:  # the seeds of a group differ in their seeds only
        seed = name.rpartition("-s")[2]
        assert pipeline.RUNS[name].overrides[-3:] == [f"--seed_everything={seed}", f"--data.init_args.order_seed={seed}",
                                                      f"--model.optimizer.init_args.seed={seed}"]
    assert "OnDARE (lr=0.0001, α=0.0001, p=0.01, 40 steps)" in report.describe("dpo/ondare-a1e-4", pipeline.RUNS, pipeline.MERGES)


def test_conversion_scoring_and_frontier():
    evaluation, report = _script("online_merging_eval"), _script("online_merging_report")
    answers = ["7 hours = 420 minutes.", "3 feet = 36 inches."]
    assert evaluation.conversion_scores(["7 hours = 420 minutes.\nextra", "Sure! 3 feet is 36 inches."], answers) == (0.5, 1.0)
    assert evaluation.conversion_scores(["7 hours = 430 minutes.", "3 feet = 36 inches"], answers) == (0.0, 0.5)
    rows = [{"model": "a", "pref_margin": 0.1, "sft_exact": 0.9, "ppl": 9}, {"model": "b", "pref_margin": 0.3, "sft_exact": 0.5, "ppl": 9},
            {"model": "c", "pref_margin": 0.2, "sft_exact": 0.4, "ppl": 9}, {"model": "d", "pref_margin": 0.3, "sft_exact": 0.5, "ppl": 9},
            {"model": "e", "pref_margin": 0.0, "sft_exact": 0.4, "ppl": 5}, {"model": "f", "pref_margin": 0.0, "sft_exact": 0.4, "ppl": 6}]
    assert report.frontier(rows) == ["a", "b", "d", "e"]


def test_report_groups_seeds_and_reads_tax_at_equal_reward():
    pipeline, report = _script("online_merging_pipeline"), _script("online_merging_report")
    metrics = dict(pref_accuracy=0.5, reward=0.2, sft_value=0.5, train_seconds=10.0)
    rows = [{**metrics, "model": "sft", "pref_margin": 0.0, "sft_exact": 0.6, "ppl": 80.0},
            {**metrics, "model": "dpo/adamw-s0", "pref_margin": 1.0, "sft_exact": 0.5, "ppl": 90.0},
            {**metrics, "model": "dpo/adamw-s1", "pref_margin": 1.2, "sft_exact": 0.4, "ppl": 96.0},
            {**metrics, "model": "merges/linear-w0.5", "pref_margin": 0.8, "sft_exact": 0.6, "ppl": 82.0},
            {**metrics, "model": "merges/linear-w0.75", "pref_margin": 1.2, "sft_exact": 0.5, "ppl": 86.0}]
    grouped = {r["model"]: r for r in report.group_rows(rows, pipeline.RUNS, pipeline.MERGES)}
    adamw = grouped["dpo/adamw"]
    assert adamw["seeds"] == 2 and adamw["pref_margin"] == pytest.approx(1.1) and adamw["ppl"] == pytest.approx(93.0)
    assert adamw["ppl_sd"] == pytest.approx(math.sqrt(18.0)) and grouped["sft"]["ppl_sd"] is None
    assert (grouped["merges/linear-w0.5"]["family"], grouped["merges/linear-w0.5"]["setting"]) == ("offline linear", 0.5)
    lines = report.family_lines(list(grouped.values()), merged_run=rows[1])
    assert [p["model"] for p in lines["offline linear"]] == ["sft", "merges/linear-w0.5", "merges/linear-w0.75", "dpo/adamw-s0"]
    table = {e["family"]: e for e in report.equal_reward_table(list(grouped.values()))}
    # The linear merges cross AdamW's margin 1.1 between w 0.5 (0.8, 82) and w 0.75 (1.2, 86): ppl 85.
    assert table["offline linear"]["ppl_at_pref_margin"] == pytest.approx(85.0)
    assert table["offline linear"]["sft_exact_at_pref_margin"] == pytest.approx(0.525)
    assert table["AdamW"]["ppl_at_pref_margin"] == pytest.approx(93.0)
    # With the merged run as the linear line's w = 1 end, the line crosses 1.1 again, from (1.2, 86)
    # to (1.0, 90), at ppl 88 and accuracy 0.5; the family's best stays 85 and 0.525.
    with_end = {e["family"]: e for e in report.equal_reward_table(list(grouped.values()), rows[1])}
    assert with_end["offline linear"]["ppl_at_pref_margin"] == pytest.approx(85.0)
    assert with_end["offline linear"]["sft_exact_at_pref_margin"] == pytest.approx(0.525)
    assert report.tax_at_reward(lines["offline linear"][2:], "pref_margin", "ppl", 1.1, -1) == pytest.approx(88.0)
