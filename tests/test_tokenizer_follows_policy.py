"""The training data's tokenizer follows the module's model, and a tokenizer or base model that does
not fit the model stops the run before any step with an error naming the options (issue 20)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from lightning_sr.testing import WORDS, make_tokenizer, save_tiny_generator, tiny_llama
from transformers import AutoTokenizer

from lightning_sr.cli import main
from lightning_sr.data.preferences import PreferenceDataModule
from lightning_sr.data.sft import SFTDataModule
from lightning_sr.loading import load_causal_lm
from lightning_sr.modules.preference import PreferenceModule
from lightning_sr.modules.sft import SFTModule

ROOT = Path(__file__).resolve().parents[1]
EXTRA = ["ocean", "river", "mountain"]  # words only the larger tokenizer knows: ids past the model's
PAIRS = [
    {"prompt": "was your day good ?", "chosen": "yes a great day , thanks", "rejected": "a bad day"},
    {"prompt": "is paris the capital of france ?", "chosen": "yes it is", "rejected": "no"},
    {"prompt": "tell me of the ocean", "chosen": "the ocean and the river", "rejected": "mountain"},
]
EXAMPLES = [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS]

# (module, data module, the module's model option, the file of records)
KINDS = {
    "preference": (PreferenceModule, PreferenceDataModule, "--model.policy", "pairs"),
    "sft": (SFTModule, SFTDataModule, "--model.model", "examples"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder, a tokenizer folder with more ids than its embeddings, and the data."""
    root = tmp_path_factory.mktemp("follows")
    bigger = make_tokenizer(chat_template=True, words=list(WORDS) + EXTRA)
    bigger.save_pretrained(root / "bigger")
    found = {"model": save_tiny_generator(root / "model"), "bigger": root / "bigger"}
    found["ids"], found["rows"] = len(bigger), len(make_tokenizer())  # the tiny model has one row per id
    for name, rows in (("pairs", PAIRS), ("examples", EXAMPLES)):
        found[name] = root / f"{name}.jsonl"
        found[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return found


def trainer(L, tmp_path, **kw):
    return L.Trainer(**{**dict(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, max_steps=1), **kw})


def model_of(module):
    return module.policy if isinstance(module, PreferenceModule) else module.model


@pytest.mark.parametrize("kind", KINDS)
def test_a_data_module_without_tokenizer_takes_the_modules(L, kind, files, tmp_path):
    build, data_class, _, data = KINDS[kind]
    module, dm = build(str(files["model"])), data_class(str(files[data]), batch_size=2)
    assert dm.hparams["tokenizer"] is None  # saved as unset: a checkpoint's data module follows its model too
    run = trainer(L, tmp_path)
    run.fit(module, dm)
    assert run.global_step == 1
    assert dm.tokenizer.name_or_path == str(files["model"])
    assert dm.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(files["model"]).get_vocab()


def test_no_tokenizer_and_no_module_names_the_option(files):
    with pytest.raises(ValueError, match=r"^--data.tokenizer is not set and there is no LightningModule .*: set --data.tokenizer$"):
        PreferenceDataModule(str(files["pairs"])).setup("fit")
    with pytest.raises(ValueError, match="set --data.tokenizer"):
        SFTDataModule(str(files["examples"])).setup("fit")


def test_no_tokenizer_and_a_model_object_without_a_name_names_the_option(L, files, tmp_path):
    module = PreferenceModule(tiny_llama(make_tokenizer()))  # built in code: no name_or_path
    with pytest.raises(ValueError, match="PreferenceModule's model is an object without a name_or_path: set --data.tokenizer"):
        trainer(L, tmp_path).fit(module, PreferenceDataModule(str(files["pairs"])))


@pytest.mark.parametrize("kind", KINDS)
def test_a_tokenizer_with_more_ids_than_the_embeddings_stops_before_any_step(L, kind, files, tmp_path):
    build, data_class, option, data = KINDS[kind]
    module, dm = build(str(files["model"])), data_class(str(files[data]), tokenizer=str(files["bigger"]), batch_size=2)
    run = trainer(L, tmp_path)
    role = option.rsplit(".", 1)[-1]
    with pytest.raises(ValueError) as raised:
        run.fit(module, dm)
    assert str(raised.value) == (
        f"the data's tokenizer (--data.tokenizer={files['bigger']}) has {files['ids']} ids but the {role} "
        f"({option}={files['model']}) has {files['rows']} embeddings: leave --data.tokenizer unset to use the "
        f"{role}'s, or give the tokenizer the {role} was trained with"
    )
    assert run.global_step == 0
    loaded = load_causal_lm(str(files["model"])).state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in model_of(module).state_dict().items())


def test_a_model_folder_whose_own_tokenizer_is_larger_says_to_set_one(L, files, tmp_path):
    folder = tmp_path / "odd"
    load_causal_lm(str(files["model"])).save_pretrained(folder)
    AutoTokenizer.from_pretrained(files["bigger"]).save_pretrained(folder)  # not the model's tokenizer
    with pytest.raises(ValueError, match=r"^the policy's own tokenizer has \d+ ids but the policy \(--model.policy="):
        trainer(L, tmp_path).fit(PreferenceModule(str(folder)), PreferenceDataModule(str(files["pairs"])))


@pytest.mark.parametrize("base", ["wider", "gpt2"])
def test_a_base_model_that_does_not_fit_the_policy_names_the_option(L, base, files, tmp_path):
    from lightning_sr.optim import OnDARE
    from lightning_sr.testing import tiny_gpt2

    other = tiny_llama(make_tokenizer(), hidden_size=48) if base == "wider" else tiny_gpt2(make_tokenizer())
    other.save_pretrained(tmp_path / "base")
    # GPT-2 shares only ``lm_head.weight`` with a Llama (same name and shape), and whether it is
    # saved depends on the weight tying: without it no name matches at all.
    if base == "gpt2":
        save_file({k: v.contiguous() for k, v in other.state_dict().items() if not k.startswith("lm_head.")},
                  str(tmp_path / "base" / "model.safetensors"))
    module = PreferenceModule(str(files["model"]), base_model=str(tmp_path / "base"),
                              optimizer=lambda params: OnDARE(params, lr=1e-3, keep_rate=0.5, merge_weight=0.1))
    run = trainer(L, tmp_path)
    expected = "has shape .* but its base" if base == "wider" else "no parameter name matches the base model"
    with pytest.raises(ValueError, match=rf"^--model.base_model={re.escape(str(tmp_path / 'base'))}: OnDARE.set_base: .*{expected}"):
        run.fit(module, PreferenceDataModule(str(files["pairs"])))
    assert run.global_step == 0


def cli(config, files, tmp_path, *extra):
    return main(["fit", "--config", str(ROOT / "configs" / config), f"--model.policy={files['model']}",
                 f"--data.path={files['pairs']}", "--data.val_fraction=0", "--trainer.max_steps=1",
                 "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", *extra])


def test_a_shipped_config_with_only_the_policy_changed_runs(L, files, tmp_path):
    run = cli("fit_dpo_adamw.yaml", files, tmp_path)
    assert run.trainer.global_step == 1 and isinstance(run.trainer, L.Trainer)
    assert run.datamodule.tokenizer.name_or_path == str(files["model"])


def test_the_cli_reports_a_tokenizer_that_does_not_fit_in_one_line(files, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        cli("fit_dpo_adamw.yaml", files, tmp_path, f"--data.tokenizer={files['bigger']}")
    assert str(stopped.value).splitlines()[0] == (
        f"lightning-sr: the data's tokenizer (--data.tokenizer={files['bigger']}) has {files['ids']} ids but the "
        f"policy (--model.policy={files['model']}) has {files['rows']} embeddings: leave --data.tokenizer unset "
        "to use the policy's, or give the tokenizer the policy was trained with"
    )
