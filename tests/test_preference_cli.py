"""The fit configs run end to end through the ``lightning-sr`` CLI on a tiny model passed by path;
checkpoints resume; the offline merge writes a loadable model."""

import json
from pathlib import Path

import pytest
import torch
from lightning_sr.testing import save_tiny_generator
from transformers import AutoModelForCausalLM

from lightning_sr.callbacks import OfflineMerge
from lightning_sr.merging import merge_state_dicts, sparsify
from lightning_sr.cli import main
from lightning_sr.modules.preference import PreferenceModule

ROOT = Path(__file__).resolve().parents[1]
# The preference-training configs (fit_sft.yaml trains an SFTModule: tests/test_sft.py).
# One process each, in this process; the sharded config starts processes of its own, so its runs
# are in test_sharded_training.py.
CONFIGS = sorted(
    c for c in (ROOT / "configs").glob("fit_*.yaml") if "PreferenceModule" in c.read_text() and not c.stem.endswith("_fsdp")
)
PAIRS = [
    {"prompt": "was your day good ?", "chosen": "yes a great day , thanks", "rejected": "a bad day"},
    {"prompt": "is paris the capital of france ?", "chosen": "yes it is", "rejected": "no"},
    {"prompt": "please help", "chosen": "you are a great friend", "rejected": "i hate you"},
    {"prompt": "are you happy today ?", "chosen": "very happy , thank you", "rejected": "sad and awful"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def data_path(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def cli_args(config, tiny_dir, data_path, out, *extra):
    args = [
        "fit", "--config", str(config),
        f"--model.policy={tiny_dir}",
        f"--data.path={data_path}",
        f"--data.tokenizer={tiny_dir}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]
    if "base_model:" in config.read_text():
        args.append(f"--model.base_model={tiny_dir}")
    return args + list(extra)


def test_all_five_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert {"fit_dpo_adamw", "fit_dpo_ondare", "fit_dpo_onties", "fit_ipo_ondare", "fit_kto_ondare"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_fit_config_runs_two_steps(L, config, tiny_dir, data_path, tmp_path):
    cli = main(cli_args(config, tiny_dir, data_path, tmp_path))
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2 and isinstance(trainer, L.Trainer)
    assert isinstance(module, PreferenceModule) and isinstance(module, L.LightningModule)
    assert module.loss_name in config.stem
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/accuracy", "val/margin", "val/rewards_chosen"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    expected_opt = config.stem.split("_")[-1]
    assert type(trainer.optimizers[0]).__name__.lower() == expected_opt
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    # checkpoints hold only plain data: they load with weights_only=True
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    if "adamw" in config.stem:  # this config carries the offline-merge baseline callback
        assert (Path(trainer.log_dir) / "merged-dare" / "config.json").is_file()


def test_resume_from_checkpoint_continues_like_an_uninterrupted_run(L, tiny_dir, data_path, tmp_path):
    config = ROOT / "configs" / "fit_dpo_ondare.yaml"
    # 3 training pairs in one batch per epoch, so the data order cannot differ after resuming;
    # keep_rate 0.5 so the per-step random masks matter (they must continue from the checkpoint).
    common = ["--data.batch_size=4", "--model.optimizer.init_args.keep_rate=0.5",
              "--model.optimizer.init_args.lr=0.01"]
    full = main(cli_args(config, tiny_dir, data_path, tmp_path / "full", "--trainer.max_steps=4", *common))
    first = main(cli_args(config, tiny_dir, data_path, tmp_path / "a", *common))
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    with pytest.warns(UserWarning, match="dirpath has changed"):  # a resumed run with an output folder of its own
        resumed = main(
            cli_args(config, tiny_dir, data_path, tmp_path / "b", "--trainer.max_steps=4", f"--ckpt_path={ckpt}",
                     *common)
        )
    assert first.trainer.global_step == 2 and resumed.trainer.global_step == 4
    want = full.model.policy.state_dict()
    for name, value in resumed.model.policy.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    # the reference after resuming is the policy as loaded, not the checkpoint's trained weights
    initial = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    for name, value in resumed.model.reference.state_dict().items():
        assert torch.equal(value, initial[name]), name
    # and the checkpoint loads back into a module outside the CLI
    loaded = PreferenceModule.load_from_checkpoint(ckpt, weights_only=True)
    for name, value in first.model.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[name], value), name


# ---------------------------------------------------------------- offline merge
def test_offline_linear_merge_writes_the_formula(L, tiny_dir, data_path, tmp_path):
    config = ROOT / "configs" / "fit_dpo_adamw.yaml"
    out = tmp_path / "merged"
    cli = main(cli_args(
        config, tiny_dir, data_path, tmp_path,
        "--model.optimizer.init_args.lr=0.01",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=lightning_sr.callbacks.OfflineMerge",
        "--trainer.callbacks.method=linear", "--trainer.callbacks.weight=0.3",
        f"--trainer.callbacks.output_dir={out}",
    ))
    merged = AutoModelForCausalLM.from_pretrained(out)
    policy, reference = cli.model.policy.state_dict(), cli.model.reference.state_dict()
    moved = 0
    for name, value in merged.state_dict().items():
        expected = reference[name] + 0.3 * (policy[name] - reference[name])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(policy[name], reference[name]))
    assert moved > 0
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    # the paper's two-model form onto a base: with base = the initial policy (= the reference)
    # base + 0.3 (policy - base) + 0.7 (reference - base) is the same linear merge
    onto_base = OfflineMerge(method="linear", weight=0.3, base_model=str(tiny_dir)).merge(cli.model)
    for name, value in onto_base.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[name], rtol=0, atol=1e-6, msg=name)


def test_dare_and_ties_sparsify_as_documented():
    delta = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 1.0, 0.0, -4.0])
    ties = sparsify(delta, "ties", 0.25)
    assert ties.tolist() == [0, 0, 0, 3.0, 0, 0, 0, -4.0]
    g = torch.Generator().manual_seed(0)
    dare = sparsify(delta.repeat(1000), "dare", 0.5, g)
    kept = dare != 0
    assert torch.allclose(dare[kept], (delta.repeat(1000) / 0.5)[kept])
    assert 0.45 < kept[delta.repeat(1000) != 0].float().mean() < 0.55
    # two task vectors with TIES: disagreeing signs are dropped after the weighted sign election
    anchor = {"w": torch.zeros(3)}
    a, b = {"w": torch.tensor([1.0, -1.0, 2.0])}, {"w": torch.tensor([-3.0, 1.0, 1.0])}
    merged = merge_state_dicts(anchor, [a, b], [0.5, 0.5], "ties", 1.0)
    # elected signs of 0.5a + 0.5b = [-1, 0, 1.5] -> [-, +, +]
    assert merged["w"].tolist() == [-1.5, 0.5, 1.5]
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        merge_state_dicts(anchor, [{"w": torch.zeros(4)}], [1.0])


def test_offline_merge_rejects_bad_options():
    with pytest.raises(ValueError, match="method"):
        OfflineMerge(method="slerp")
    with pytest.raises(ValueError, match="density"):
        OfflineMerge(method="dare", density=0.0)


# ---------------------------------------------------------------- pair generation script
def test_make_preference_pairs_script_on_tiny_models(tiny_dir, tmp_path):
    import importlib.util

    from lightning_sr.testing import save_tiny_reward

    from lightning_sr.data.preferences import read_preferences

    spec = importlib.util.spec_from_file_location("make_pairs", ROOT / "scripts" / "make_preference_pairs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": p["prompt"]}) for i, p in enumerate(PAIRS)]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pairs.jsonl"
    rc = script.main([
        "--prompts", str(prompts), "--output", str(out), "--generator", str(tiny_dir),
        "--reward", str(save_tiny_reward(tmp_path / "reward")), "--n", "4", "--alpha", "0.5",
        "--decisions", "3", "--max-new-tokens", "6", "--batch-size", "2", "--limit", "0",
    ])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["id"] for r in rows} <= {"p0", "p1", "p2", "p3"}
    for row in rows:
        assert row["chosen_reward"] > row["rejected_reward"] and row["chosen"] != row["rejected"]
    assert len(read_preferences(out)) == len(rows)  # the training data module accepts it


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_configs_point_at_a_valid_shipped_preference_file(config):
    import yaml

    from lightning_sr.data.preferences import read_preferences

    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    records = read_preferences(ROOT / data["path"])
    assert len(records) >= 8


def test_a_run_too_short_to_validate_or_checkpoint_says_so(tiny_dir, data_path, tmp_path, caplog):
    config = ROOT / "configs" / "fit_dpo_adamw.yaml"  # val_check_interval 8, last.ckpt every 8 steps
    with caplog.at_level("WARNING", logger="lightning_sr"):
        main(cli_args(config, tiny_dir, data_path, tmp_path, "--trainer.val_check_interval=8"))
    assert "No validation will run: val_check_interval=8 > max_steps=2" in caplog.text
    assert "Only last.ckpt, at the end of the run, will be written: every_n_train_steps=8 > max_steps=2" in caplog.text
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["last.ckpt"]
