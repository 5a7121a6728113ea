"""PreferenceModule, its log-prob gathering and the preference data module, on tiny models."""

import json

import pytest
import torch
from conftest import LightningPackage
from lightning_sr.testing import make_tokenizer, tiny_gpt2, tiny_llama

from lightning_sr.data.preferences import (
    PreferenceCollator,
    PreferenceDataModule,
    PreferenceTokenizer,
    pad_rows,
    read_preferences,
    truncate_pair,
)
from lightning_sr.lightning_packages import PACKAGE_ENV
from lightning_sr.losses import sequence_logprobs
from lightning_sr.modules.preference import PreferenceModule

PAIRS = [
    {"prompt": "was your day good ?", "chosen": "yes a great day , thanks", "rejected": "a bad day"},
    {"prompt": "is paris the capital of france ?", "chosen": "yes it is", "rejected": "no"},
    {"prompt": "please help", "chosen": "you are a great friend", "rejected": "i hate you"},
    {"prompt": "are you happy today ?", "chosen": "very happy , thank you", "rejected": "sad and awful"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer(L, tmp_path, **kw):
    defaults = dict(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kw})


# ---------------------------------------------------------------- log-probs
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_logprobs_mask_prompt_and_padding(side, average, build):
    # Llama's rotary positions are shift-invariant; GPT-2's learned absolute positions are not, so
    # left padding checks that the position ids are derived from the attention mask.
    model = build(make_tokenizer())
    rows = [([2, 10, 11, 12], [13, 14]), ([2, 20], [21, 22, 23, 24, 25]), ([2, 30, 31], [32])]
    batch = pad_rows(rows, pad_id=0, padding_side=side)
    got = sequence_logprobs(model, **batch, average=average)
    for i, (prompt, response) in enumerate(rows):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        token = logp.gather(-1, targets[:, None]).squeeze(-1)[len(prompt) - 1 :]
        expected = token.mean() if average else token.sum()
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_logprobs_error_on_rows_without_response():
    model = tiny_llama(make_tokenizer())
    batch = pad_rows([([2, 10], [11]), ([2, 10], [])], pad_id=0, padding_side="right")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sequence_logprobs(model, **batch)


# ---------------------------------------------------------------- data
def test_truncation_prompt_from_left_first_then_responses_from_right():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102], [200]
    # fits after dropping 3 prompt tokens from the left
    assert truncate_pair(prompt, chosen, rejected, 10, 4) == (list(range(3, 10)), chosen, rejected)
    # the prompt keeps max_prompt_length=8 tokens, then the responses are cut from the right
    assert truncate_pair(prompt, chosen, rejected, 9, 8) == (list(range(2, 10)), [100], [200])
    # nothing to do when it fits
    assert truncate_pair([1, 2], [3], [4, 5], 10, 5) == ([1, 2], [3], [4, 5])


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "hi", "chosen": "yes"}, "missing field\\(s\\) 'rejected'"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "no"}, "field 'chosen' is empty"),
        ({"prompt": "hi", "chosen": "yes", "rejected": []}, "field 'rejected' must be"),
        (
            {"prompt": "hi", "chosen": [{"content": "x"}], "rejected": "no"},
            "field 'chosen' must hold messages with 'role' and 'content'",
        ),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], line])
    with pytest.raises(ValueError, match=f"p.jsonl:2: {message}"):
        read_preferences(path)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n{oops\n")
    with pytest.raises(ValueError, match="p.jsonl:3: not valid JSON"):
        read_preferences(path)


def test_chat_template_rendering_and_masks():
    tok = make_tokenizer(chat_template=True)
    record = read_preferences_from(PAIRS[:1])[0]
    enc = PreferenceTokenizer(tok, max_length=64, max_prompt_length=32)(record)
    prompt = tok.convert_ids_to_tokens(enc["prompt_ids"])
    assert prompt == "<s> user was your day good ? </s> <s> assistant".split()
    assert tok.convert_ids_to_tokens(enc["chosen_ids"]) == "yes a great day , thanks </s>".split()
    # chat messages in the prompt and the responses render the same way
    msgs = dict(
        prompt=[{"role": "user", "content": "was your day good ?"}],
        chosen=[{"role": "assistant", "content": "yes a great day , thanks"}],
        rejected="a bad day",
    )
    enc2 = PreferenceTokenizer(tok, 64, 32)(read_preferences_from([msgs])[0])
    assert enc2 == enc
    plain = PreferenceTokenizer(make_tokenizer(), 64, 32)(record)
    assert plain["chosen_ids"][-1] == tok.eos_token_id  # no template: EOS appended


def read_preferences_from(rows):
    import tempfile
    from pathlib import Path

    directory = Path(tempfile.mkdtemp())
    return read_preferences(write_jsonl(directory / "x.jsonl", rows))


def test_collator_layout_and_kl_rows():
    examples = [
        {"prompt_ids": [2, 5], "chosen_ids": [6, 7], "rejected_ids": [8]},
        {"prompt_ids": [2, 9, 9], "chosen_ids": [10], "rejected_ids": [11, 12, 13]},
    ]
    batch = PreferenceCollator(pad_id=0, max_length=16)(examples)
    assert batch["input_ids"].tolist() == [
        [2, 5, 6, 7, 0, 0], [2, 9, 9, 10, 0, 0], [2, 5, 8, 0, 0, 0], [2, 9, 9, 11, 12, 13]
    ]
    assert batch["loss_mask"][3].tolist() == [0, 0, 0, 1, 1, 1]
    # KL rows: prompt i with the chosen response of pair i+1
    assert batch["kl_input_ids"].tolist() == [[2, 5, 10, 0, 0], [2, 9, 9, 6, 7]]
    assert batch["kl_loss_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]
    # a KL row never exceeds max_length: the borrowed response is cut to the prompt's room
    short = PreferenceCollator(pad_id=0, max_length=4)(examples)
    assert short["kl_input_ids"].tolist() == [[2, 5, 10, 0], [2, 9, 9, 6]]
    assert short["kl_loss_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]


def test_datamodule_split_and_a_missing_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    dm = PreferenceDataModule(str(path), tokenizer=make_tokenizer(), val_fraction=0.25, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 1
    batches = list(dm.train_dataloader())
    # 3 pairs in batches of 2: the last batch of one pair (no mismatched pair for KTO) is dropped
    assert [b["input_ids"].shape[0] for b in batches] == [4]
    with pytest.raises(ValueError, match="set --data.tokenizer"):
        PreferenceDataModule(str(path)).setup("fit")  # no tokenizer, and no module to take it from


def test_order_seed_reorders_training_pairs_and_keeps_the_split(tmp_path):
    rows = [dict(PAIRS[i % len(PAIRS)], prompt=f"prompt {i}") for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)

    def loaded(**seeds):
        dm = PreferenceDataModule(str(path), tokenizer=make_tokenizer(), val_fraction=0.25, batch_size=1, **seeds)
        dm.setup("fit")
        return [r.prompt for r in dm.val_set.records], [b["input_ids"][0].tolist() for b in dm.train_dataloader()]

    held_out, order = loaded(seed=0)
    assert loaded(seed=0, order_seed=0) == (held_out, order)  # None means seed
    other_held_out, other_order = loaded(seed=0, order_seed=1)
    assert other_held_out == held_out and other_order != order and sorted(other_order) == sorted(order)


# ---------------------------------------------------------------- module
def margin_on(module, batch):
    with torch.no_grad():
        out = module.compute_loss(batch)
    return (out["chosen_rewards"] - out["rejected_rewards"]).mean().item()


def full_batch(tok, rows=PAIRS):
    enc = PreferenceTokenizer(tok, 64, 32)
    return PreferenceCollator(tok.pad_token_id, 64)([enc(r) for r in read_preferences_from(rows)])


def fit_tiny(L, tmp_path, optimizer, steps=20, loss="dpo", **kw):
    tok = make_tokenizer(chat_template=True)
    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    module = PreferenceModule(tiny_llama(tok), loss=loss, beta=0.5, optimizer=optimizer, **kw)
    dm = PreferenceDataModule(str(path), tokenizer=tok, batch_size=4)
    L.seed_everything(0)
    trainer(L, tmp_path, max_steps=steps).fit(module, dm)
    return module, full_batch(tok)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto"])
def test_compute_loss_feeds_the_documented_log_probs(loss):
    from lightning_sr.losses import dpo_loss, ipo_loss, kto_loss

    tok = make_tokenizer(chat_template=True)
    module = PreferenceModule(tiny_llama(tok), loss=loss, beta=0.3, label_smoothing=0.1,
                              desirable_weight=1.5, undesirable_weight=0.5)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make the frozen copy differ from the policy (so that KTO's KL is > 0)
        for p in module.reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    batch = full_batch(tok)
    with torch.no_grad():
        out = module.compute_loss(batch)
        logps = {}
        for name, model in (("policy", module.policy), ("ref", module.reference)):
            logps[name] = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                            batch["loss_mask"], average=loss == "ipo")
            logps[name + "_kl"] = sequence_logprobs(model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                                    batch["kl_loss_mask"])
    n = len(PAIRS)
    pol, ref = logps["policy"], logps["ref"]
    if loss == "kto":
        desirable = torch.arange(2 * n) < n  # chosen rows are the desirable examples
        expected = kto_loss(pol, ref, desirable, logps["policy_kl"], logps["ref_kl"], beta=0.3,
                            desirable_weight=1.5, undesirable_weight=0.5)
        assert expected.kl.item() > 0.1  # not clamped to 0: the KL rows and models really count
        assert out["kl"] == pytest.approx(expected.kl.item(), abs=1e-6)
    elif loss == "ipo":  # per-token means
        expected = ipo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.3)
    else:
        expected = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=0.3, label_smoothing=0.1)
    assert out["loss"].item() == pytest.approx(expected.losses.mean().item(), abs=1e-6)
    if loss == "kto":
        chosen, rejected = expected.rewards[:n], expected.rewards[n:]
    else:
        chosen, rejected = expected.chosen_rewards, expected.rejected_rewards
    torch.testing.assert_close(out["chosen_rewards"], chosen)
    torch.testing.assert_close(out["rejected_rewards"], rejected)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto"])
def test_training_raises_margin_and_keeps_reference_frozen(L, tmp_path, loss):
    module, batch = fit_tiny(L, tmp_path, lambda p: torch.optim.AdamW(p, lr=1e-2), loss=loss)
    assert module.reference is not None and not module.reference.training
    # reward margins are measured against the frozen initial copy: 0 before training
    assert margin_on(module, batch) > 0.1
    before = tiny_llama(make_tokenizer(chat_template=True)).state_dict()
    assert all(torch.equal(before[k], v) for k, v in module.reference.state_dict().items())
    assert all(not p.requires_grad for p in module.reference.parameters())


def test_reference_not_in_checkpoint_or_optimizer(L, tmp_path):
    module, _ = fit_tiny(L, tmp_path, lambda p: torch.optim.AdamW(p, lr=1e-3), steps=1)
    keys = module.state_dict().keys()
    assert any(k.startswith("policy.") for k in keys) and not any(k.startswith("reference.") for k in keys)
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.reference.parameters()}
    assert "optimizer" not in module.hparams and "policy" not in module.hparams  # object policy


def test_base_model_needs_set_base(L, tmp_path):
    with pytest.raises(TypeError, match="AdamW has no set_base"):
        fit_tiny(L, tmp_path, lambda p: torch.optim.AdamW(p, lr=1e-3), steps=1, base_model=tiny_llama())


# ---------------------------------------------------------------- online merging optimizers
def perturbed_base(seed=1, scale=0.02):
    """A stand-in 'pre-trained base': the tiny SFT model minus a random delta tau."""
    base = tiny_llama(make_tokenizer(chat_template=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.sub_(scale * torch.randn(p.shape, generator=generator))
    return base


def displacement(module):
    """Flat ``theta - theta_SFT`` over the policy's parameters (the reference is the SFT copy)."""
    ref = dict(module.reference.named_parameters())
    return torch.cat([(p.detach() - ref[n]).flatten() for n, p in module.policy.named_parameters()])


def tau_of(module, base):
    ref, base_p = dict(module.reference.named_parameters()), dict(base.named_parameters())
    return torch.cat([(ref[n] - base_p[n]).flatten() for n, _ in module.policy.named_parameters()])


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the autouse package fixture has not run
        patch.setenv(PACKAGE_ENV, "lightning")
        adamw = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0)  # noqa: E731
        return fit_tiny(LightningPackage("lightning"), tmp_path_factory.mktemp("adamw"), adamw)


def test_onties_raises_margin_and_stays_closer_to_sft_than_adamw(L, adamw_run, tmp_path):
    from lightning_sr.optim import OnTIES

    adamw, batch = adamw_run
    base = perturbed_base()
    onties, _ = fit_tiny(
        L, tmp_path, lambda p: OnTIES(p, lr=1e-2, keep_rate=0.1, merge_weight=1e-3), base_model=base
    )
    assert margin_on(onties, batch) > 1.0
    # top-k sparse updates, and Adam coordinates that disagree with tau's sign are dropped
    distances = displacement(onties).norm().item(), displacement(adamw).norm().item()
    assert distances[0] < 0.75 * distances[1], distances
    # The sign election: where τ̃ is kept, the policy moved along τ's sign (about 80% without it).
    optimizer = onties.trainer.optimizers[0]
    ref, base_p = dict(onties.reference.named_parameters()), dict(base.named_parameters())
    agree = moved = 0
    for name, p in onties.policy.named_parameters():
        kept = optimizer.state[p]["tau_idx"].long()
        shift = (p.detach() - ref[name]).reshape(-1)[kept]
        tau = (ref[name] - base_p[name]).reshape(-1)[kept]  # SFT − base, not the stored copy
        agree += int(((shift != 0) & (torch.sign(shift) == torch.sign(tau))).sum())
        moved += int((shift != 0).sum())
    assert moved > 1000 and agree > 0.95 * moved, (agree, moved)


def test_ondare_raises_margin_and_merges_along_the_sft_direction(L, adamw_run, tmp_path):
    from lightning_sr.optim import OnDARE

    adamw, batch = adamw_run
    base = perturbed_base()
    ondare, _ = fit_tiny(
        L, tmp_path, lambda p: OnDARE(p, lr=1e-2, keep_rate=0.5, merge_weight=0.05), base_model=base
    )
    margins = margin_on(ondare, batch), margin_on(adamw, batch)
    assert min(margins) > 1.0, margins
    tau = tau_of(ondare, base)
    runs = {"ondare": ondare, "adamw": adamw}
    along = {name: (displacement(m) @ tau / tau.norm()).item() for name, m in runs.items()}
    # OnDARE adds alpha * tau~ every step: the policy moves further along tau = SFT - base
    # (computed from the right models: a swapped base would make this negative) than AdamW does.
    assert along["ondare"] > 0.5 * tau.norm().item(), (along, tau.norm())
    assert abs(along["adamw"]) < 0.1 * tau.norm().item(), (along, tau.norm())
