"""OnDARE / OnTIES outside our callback: the optimizer takes ``base_model`` itself.

One test per training loop that builds the optimizer by class and arguments alone: plain
PyTorch, Lightning Fabric (both packages), LightningCLI's ``--optimizer`` without the
``OnlineMerging`` callback (both packages), Hugging Face ``Trainer`` (``optimizer_cls_and_kwargs``),
TRL's ``DPOTrainer`` (``optimizers=``: it takes no ``optimizer_cls_and_kwargs``; skipped without trl)
and litgpt's ``finetune_full`` (skipped unless litgpt is importable: its pins conflict with
transformers 5, so it is not in the test extras). Each runs a few steps on a tiny random model and
checks that τ ≠ 0 was merged; the plain-PyTorch, Fabric, Lightning, LightningCLI and TRL routes are
checked bit for bit against ``set_base`` / the callback. Then the name matching (inner segments,
wrappers, shapes, rename) and resuming.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sr.callbacks.online_merging import OnlineMerging
from lightning_sr.optim import OnDARE, OnTIES
from lightning_sr.optim.names import match_names
from lightning_sr.testing import make_tokenizer, save_tiny_generator, spawn_gloo, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(make_tokenizer())
HYPER = dict(lr=1e-2, keep_rate=0.3, merge_weight=0.05, seed=3)


def batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (2, 6), generator=g) for _ in range(steps)]


def train(model, optimizer, steps: int = 3) -> None:
    for tokens in batches(steps):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_run(a_model, a_opt, b_model, b_opt):
    """Bit-identical weights and stored τ̃ of two runs over the same architecture."""
    for (name, a), b in zip(a_model.named_parameters(), b_model.parameters()):
        assert torch.equal(a, b), name
        for key in ("tau_idx", "tau_val"):
            assert torch.equal(a_opt.state[a][key], b_opt.state[b][key]), (name, key)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """The base (seed 1) of the tiny Llama SFT model (seed 0), saved as a Hugging Face folder."""
    return save_tiny_generator(tmp_path_factory.mktemp("base") / "base", seed=1)


def reference_run(cls, steps: int = 3, **kwargs):
    """The SFT model trained with ``set_base(model, base)`` before the first step."""
    model = tiny_llama(seed=0).train()
    opt = cls(model.parameters(), **{**HYPER, **kwargs})
    opt.set_base(model, tiny_llama(seed=1))
    train(model, opt, steps)
    return model, opt


# ------------------------------------------------------------------ plain PyTorch ------------------


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
@pytest.mark.parametrize("params", ["named", "bare"])
def test_plain_torch_loop_with_base_model_equals_set_base(cls, params, base_folder):
    model = tiny_llama(seed=0).train()
    given = model.named_parameters() if params == "named" else model.parameters()
    opt = cls(given, **HYPER, base_model=str(base_folder))
    assert opt.base_match is None  # nothing loaded before the first step
    train(model, opt)
    report = opt.base_match
    assert report.by == ("name" if params == "named" else "position")
    assert len(report.matched) == len(list(model.parameters())) and not report.unmatched
    assert report.kept > 0 and opt.state[model.lm_head.weight]["tau_val"].abs().sum() > 0  # norms: τ = 0
    assert_same_run(*reference_run(cls), model, opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_loaded_after_the_optimizer_is_built_give_tau_from_them(dtype, tmp_path):
    """litgpt's order: optimizer over fresh weights, then the SFT checkpoint is loaded in place."""
    sft, base = tiny_llama(seed=0).to(dtype), tiny_llama(seed=1).to(dtype)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = tiny_llama(seed=7).to(dtype).train()
    opt = OnDARE(model.parameters(), lr=0.0, keep_rate=1.0, merge_weight=0.1, base_model=tmp_path / "base.pt")
    model.load_state_dict(sft.state_dict())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # lr 0, p = 1: θ ← θ + α·τ exactly, with τ from the loaded SFT weights
    for (name, p), s, b in zip(model.named_parameters(), sft.parameters(), base.parameters()):
        expected = s.float() + 0.1 * (s.float() - b.float())
        got = opt.state[p]["master"] if dtype == torch.bfloat16 else p
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)


def test_bare_parameters_in_another_order_fail_naming_the_first_mismatch(base_folder, tmp_path):
    # Hugging Face Trainer's grouping: weights with decay first, then norms (no names given)
    model = tiny_llama(seed=0).train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = OnDARE([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], base_model=str(base_folder))
    model(input_ids=batches(1)[0]).logits.sum().backward()
    first_mismatch = r"parameter #8 of shape \(32, 32\).*'model\.layers\.0\.input_layernorm\.weight'.*named_parameters"
    with pytest.raises(ValueError, match=first_mismatch):
        opt.step()
    from safetensors.torch import save_file

    save_file(tiny_llama(seed=1).state_dict(), tmp_path / "base.safetensors")
    opt = OnDARE(model.parameters(), base_model=str(tmp_path / "base.safetensors"))
    with pytest.raises(ValueError, match="sorted by name, not in module order"):
        opt.step()
    named = OnDARE(model.named_parameters(), base_model=str(tmp_path / "base.safetensors"))
    named.step()  # by name a .safetensors file is fine
    assert named.base_match.by == "name" and not named.base_match.unmatched


def test_class_path_defaults_without_a_base_say_how_to_give_one():
    model = nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match=r"OnDARE\(\.\.\., base_model=.*set_base.*OnlineMerging"):
        OnDARE(model.parameters()).step()


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
@pytest.mark.parametrize("merge_every", [1, 3])
def test_resumed_run_ends_where_the_uninterrupted_one_does_and_loads_no_base(cls, merge_every, tmp_path):
    torch.save(tiny_llama(seed=1).state_dict(), tmp_path / "base.pt")
    kwargs = dict(HYPER, merge_every=merge_every, base_model=str(tmp_path / "base.pt"))
    data = batches(8)

    def fit(model, opt, steps):
        for tokens in steps:
            opt.zero_grad()
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()

    full = tiny_llama(seed=0).train()
    full_opt = cls(full.parameters(), **kwargs)
    fit(full, full_opt, data)
    half = tiny_llama(seed=0).train()
    opt = cls(half.parameters(), **kwargs)
    fit(half, opt, data[:4])
    saved = {"model": half.state_dict(), "opt": opt.state_dict()}
    (tmp_path / "base.pt").unlink()  # a resumed optimizer must not need the base any more
    resumed = tiny_llama(seed=5).train()
    resumed.load_state_dict(saved["model"])
    opt = cls(resumed.parameters(), **kwargs)
    opt.load_state_dict(saved["opt"])
    fit(resumed, opt, data[4:])
    assert len(opt.base_match.restored) == len(list(resumed.parameters()))
    assert_same_run(full, full_opt, resumed, opt)


# ------------------------------------------------------------------ Fabric -------------------------


@pytest.mark.parametrize("package", ["lightning.fabric", "lightning_fabric"])
def test_fabric_loop_with_base_model(package, base_folder):
    Fabric = __import__(package, fromlist=["Fabric"]).Fabric
    fabric = Fabric(accelerator="cpu", devices=1)
    model = tiny_llama(seed=0).train()
    model, opt = fabric.setup(model, OnDARE(model.parameters(), **HYPER, base_model=str(base_folder)))
    for tokens in batches(3):
        opt.zero_grad()
        fabric.backward(model(input_ids=tokens, labels=tokens).loss)
        opt.step()
    assert opt.base_match.by == "position" and opt.base_match.kept > 0
    assert_same_run(*reference_run(OnDARE), model.module, opt.optimizer)


# ------------------------------------------------------------------ Lightning ----------------------


def lightning_trainer(L, tmp_path, callbacks=(), **kwargs):
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs,
    )


@pytest.mark.parametrize("params", ["bare", "named"])
def test_lightning_own_base_model_equals_the_callback_and_resumes_exactly(L, tmp_path, params):
    from test_online_merging_lightning import PolicyModule

    base = tiny_llama(seed=1).state_dict()
    hyper = dict(lr=1e-2, keep_rate=0.3, merge_weight=0.05, merge_every=3)

    def module(**kwargs):
        m = PolicyModule(optimizer=partial(OnTIES, **hyper, **kwargs))
        if params == "named":
            m.configure_optimizers = lambda: m.optimizer(m.policy.named_parameters())
        return m

    by_callback = module()
    lightning_trainer(L, tmp_path / "cb", [OnlineMerging(base_model=base)], max_steps=8).fit(by_callback)
    own = module(base_model=base)
    t = lightning_trainer(L, tmp_path / "own", max_steps=8)
    t.fit(own)
    assert t.optimizers[0].base_match.by == ("name" if params == "named" else "position")
    assert t.optimizers[0].base_match.kept > 0
    for (name, a), b in zip(by_callback.named_parameters(), own.parameters()):
        assert torch.equal(a, b), name

    first = module(base_model=base)  # checkpoint mid step-K cycle, resume with the optimizer's own base
    t1 = lightning_trainer(L, tmp_path / "first", max_steps=4)
    t1.fit(first)
    t1.save_checkpoint(tmp_path / "k.ckpt")
    resumed = module(base_model={"not": torch.zeros(1)})  # a resumed optimizer never looks at it
    t2 = lightning_trainer(L, tmp_path / "second", max_steps=8)
    t2.fit(resumed, ckpt_path=tmp_path / "k.ckpt")
    assert t2.optimizers[0].base_match.restored
    for (name, a), b in zip(own.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_a_base_that_does_not_fit_names_the_argument_that_gave_it(L, tmp_path):
    """The optimizer's own ``base_model`` and the callback's: the error says which one to change."""
    from test_online_merging_lightning import PolicyModule

    wider = tmp_path / "wider"
    tiny_llama(hidden_size=48).save_pretrained(wider)
    shape = r"OnDARE.*\(\d+, 32\).*\(\d+, 48\)"  # the policy's width, then the base's
    own = PolicyModule(optimizer=partial(OnDARE, **HYPER, base_model=str(wider)))
    with pytest.raises(ValueError, match=rf"^OnDARE\(base_model='{re.escape(str(wider))}'\): {shape}"):
        lightning_trainer(L, tmp_path / "own", max_steps=1).fit(own)
    with pytest.raises(ValueError, match=rf"^OnlineMerging\(base_model={re.escape(str(wider))}\): {shape}"):
        lightning_trainer(L, tmp_path / "cb", [OnlineMerging(base_model=str(wider))], max_steps=1).fit(PolicyModule())


@pytest.mark.parametrize("route", ["hard-coded AdamW, --optimizer", "injected optimizer"])
def test_lightning_cli_optimizer_init_args_base_model_without_the_callback(L, tmp_path, route, base_folder):
    from test_drop_in import project_module, run_project_cli

    injected = route == "injected optimizer"
    flag = "--model.optimizer" if injected else "--optimizer"
    args = [f"{flag}=OnDARE", f"{flag}.lr=1e-2", f"{flag}.keep_rate=0.3", f"{flag}.merge_weight=1e-2"]
    runs = {}
    for how, extra in {
        "callback": ["--trainer.callbacks+=lightning_sr.callbacks.OnlineMerging",
                     f"--trainer.callbacks.base_model={base_folder}"],
        "init_args": [f"{flag}.base_model={base_folder}"],
    }.items():
        overridden = pytest.warns(UserWarning, match="configure_optimizers` will be overridden")
        with overridden if not injected else _no_warning():
            cli = run_project_cli(L, project_module(L, injected), tmp_path / how, *args, *extra)
        assert not any(isinstance(c, OnlineMerging) for c in cli.trainer.callbacks) or how == "callback"
        cli.trainer.fit(cli.model)
        runs[how] = cli
    optimizer = runs["init_args"].trainer.optimizers[0]
    assert isinstance(optimizer, OnDARE) and optimizer.base_match.kept > 0 and not optimizer.base_match.unmatched
    a, b = runs["callback"].model, runs["init_args"].model
    assert_same_run(a.policy, runs["callback"].trainer.optimizers[0], b.policy, optimizer)


def _no_warning():
    from contextlib import nullcontext

    return nullcontext()


# ------------------------------------------------------------------ Hugging Face Trainer -----------


def test_hugging_face_trainer_with_optimizer_cls_and_kwargs(base_folder, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed=0).train()
    start = weights(model)
    tokens = torch.randint(4, VOCAB, (8, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
    )
    kwargs = {"params": list(model.named_parameters()), "base_model": str(base_folder), **HYPER}
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(OnDARE, kwargs))
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, OnDARE) and optimizer.base_match.by == "name" and not optimizer.base_match.unmatched
    state = optimizer.state[model.lm_head.weight]
    tau = (tiny_llama(seed=0).lm_head.weight - tiny_llama(seed=1).lm_head.weight).detach().reshape(-1)
    torch.testing.assert_close(state["tau_val"], tau[state["tau_idx"].long()] / 0.3)
    assert state["step"] == 3 and all(not torch.equal(start[n], p) for n, p in model.named_parameters())

    # Trainer's own grouping (decay / no decay) reorders bare parameters: a clear error, not a silent mismatch
    trainer = Trainer(model=tiny_llama(seed=0).train(), args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(OnDARE, {"base_model": str(base_folder), **HYPER}))
    with pytest.raises(ValueError, match="matched with the base by position"):
        trainer.train()


# ------------------------------------------------------------------ TRL --------------------------

PREFERENCES = {  # plain-text prompts (no chat template needed); TRL appends the EOS token to the completions
    "prompt": ["the day is", "you are", "my friend is", "today we are", "the city is", "this is"],
    "chosen": [" good", " very kind", " happy", " happy", " nice", " great"],
    "rejected": [" bad", " rude", " sad", " not happy", " awful", " terrible"],
}


@pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing` is deprecated:FutureWarning")  # TRL 1.16 on transformers 5.24
@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_trl_dpo_trainer_with_base_model_equals_set_base(cls, base_folder, tmp_path, monkeypatch):
    """TRL's ``DPOTrainer`` (1.16) has no ``optimizer_cls_and_kwargs`` (its SFT and reward trainers
    do): the optimizer goes in built, ``optimizers=(optimizer, None)``, with ``base_model``."""
    pytest.importorskip("trl")
    import huggingface_hub.constants as hub
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read when huggingface_hub was imported
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL reports each trainer it builds
    tokenizer = make_tokenizer()

    def dpo(optimizer_for):
        model = tiny_llama(tokenizer, seed=0).train()
        optimizer = optimizer_for(model)
        args = DPOConfig(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, use_cpu=True, report_to=[],
            save_strategy="no", logging_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
            bf16=False, gradient_checkpointing=False,
        )  # TRL's defaults are bf16 and gradient checkpointing
        # A model built in code has no name TRL could load the reference and tokenizer by: pass both
        trainer = DPOTrainer(model=model, ref_model=tiny_llama(tokenizer, seed=0), args=args,
                             train_dataset=Dataset.from_dict(PREFERENCES), processing_class=tokenizer,
                             optimizers=(optimizer, None))
        trainer.train()
        assert trainer.optimizer.optimizer is optimizer  # accelerate's wrapper around ours
        return model, optimizer

    def by_set_base(model):
        optimizer = cls(model.named_parameters(), **HYPER)
        optimizer.set_base(model, tiny_llama(seed=1))
        return optimizer

    start = weights(tiny_llama(seed=0))
    model, optimizer = dpo(lambda m: cls(m.named_parameters(), **HYPER, base_model=str(base_folder)))
    report = optimizer.base_match
    assert report.by == "name" and len(report.matched) == len(start) and not report.unmatched and report.kept > 0
    state = optimizer.state[model.lm_head.weight]
    tau = (start["lm_head.weight"] - tiny_llama(seed=1).lm_head.weight.detach()).reshape(-1)
    scale = HYPER["keep_rate"] if cls is OnDARE else 1.0  # OnDARE rescales the kept τ by 1/p
    assert state["tau_val"].abs().sum() > 0
    torch.testing.assert_close(state["tau_val"], tau[state["tau_idx"].long()] / scale)
    assert state["step"] == 3 and all(not torch.equal(start[n], p) for n, p in model.named_parameters())
    assert_same_run(*dpo(by_set_base), model, optimizer)


# ------------------------------------------------------------------ litgpt -------------------------


@pytest.mark.slow
def test_litgpt_finetune_full_with_optimizer_init_args(tmp_path):
    """litgpt's CLI: the optimizer from bare parameters, the SFT weights loaded after it."""
    pytest.importorskip("litgpt")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from litgpt_online_merging import command, main
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    main(["prepare", str(tmp_path)])
    litgpt = [sys.executable, "-m", "litgpt", *command(tmp_path, lr=0.0, keep_rate=1.0)[1:]]
    done = subprocess.run(litgpt, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "by position" in done.stdout + done.stderr
    main(["check", str(tmp_path), "--exact"])  # θ_final − θ_SFT = steps·α·τ


# ------------------------------------------------------------------ name matching -------------------


def test_match_names_aligns_inner_segments_and_wrappers():
    base = {
        "model._orig_mod.transformer.h.0.attn.c_attn.weight": (8, 24),
        "model._orig_mod.transformer.h.1.attn.c_attn.weight": (8, 24),
        "model._orig_mod.transformer.wte.weight": (50, 8),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.1.self_attn.q_proj.weight": (8, 8),
        "model.norm.weight": (8,),
        "body.weight": (4, 4),
    }
    names = {
        "model._orig_mod.backbone.transformer.h.0.attn.c_attn.weight": (8, 24),  # a reward model's backbone
        "model._orig_mod.backbone.transformer.h.1.attn.c_attn.weight": (8, 24),
        "_fsdp_wrapped_module.model.layers.1._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight": (8, 8),
        "module.policy.model.norm.weight": (8,),  # DDP
        "new_head.weight": (4, 4),  # one shared segment of equal shape is not a match
        "score.weight": (1, 8),
    }
    match = match_names(names, base, names, base)
    assert match.pairs == {
        "model._orig_mod.backbone.transformer.h.0.attn.c_attn.weight": "model._orig_mod.transformer.h.0.attn.c_attn.weight",
        "model._orig_mod.backbone.transformer.h.1.attn.c_attn.weight": "model._orig_mod.transformer.h.1.attn.c_attn.weight",
        "_fsdp_wrapped_module.model.layers.1._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight":
            "model.layers.1.self_attn.q_proj.weight",
        "module.policy.model.norm.weight": "model.norm.weight",
    }
    assert set(match.unmatched) == {"new_head.weight", "score.weight"}


def test_match_names_uses_shapes_reports_ambiguity_and_takes_a_rename_map():
    base = {"a.proj.weight": (4, 4), "b.proj.weight": (8, 4), "model.embed.weight": (10, 4), "model.x.w": (3,)}
    by_shape = match_names(["head.proj.weight"], base, {"head.proj.weight": (8, 4)}, base)
    assert by_shape.pairs == {"head.proj.weight": "b.proj.weight"}
    ambiguous = match_names(["head.proj.weight"], base)  # without shapes both fit
    assert not ambiguous.pairs and "ambiguous" in ambiguous.unmatched["head.proj.weight"]
    resized = match_names(["policy.model.embed.weight"], base, {"policy.model.embed.weight": (12, 4)}, base)
    assert resized.mismatched == {"policy.model.embed.weight": "model.embed.weight"} and not resized.pairs
    rename = {"enc": "model.x", "policy.model.embed.weight": None}
    renamed = match_names(["enc.w", "policy.model.embed.weight"], base, rename=rename)
    assert renamed.pairs == {"enc.w": "model.x.w"}
    assert renamed.unmatched == {"policy.model.embed.weight": "left out by rename"}
    # two names wanting one base tensor: the longer shared suffix wins
    rivals = match_names(["x.a.proj.weight", "y.c.proj.weight"], {"a.proj.weight": (4, 4)})
    assert rivals.pairs == {"x.a.proj.weight": "a.proj.weight"}


class Holder(nn.Module):
    """A LightningModule-like holder of a compiled network (names ``model._orig_mod...``)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.model = torch.compile(network)  # compiled lazily: nothing runs here


class RewardNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.n_embd, 1)


def test_reward_model_initialised_from_the_sft_checkpoint_pairs_with_it():
    """The issue's layout: ``model._orig_mod.backbone.transformer...`` against the SFT checkpoint's
    ``model._orig_mod.transformer...``; the new head trains as plain AdamW, reported with why."""
    sft = Holder(tiny_gpt2(seed=1))
    reward = Holder(RewardNet(tiny_gpt2(seed=0))).train()
    opt = OnDARE(reward.named_parameters(), lr=1e-3, keep_rate=1.0, merge_weight=0.1, base_model=sft.state_dict())
    for p in reward.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: Δ = 0, so θ ← θ + α·τ exactly where there is a base
    report = opt.base_match
    inner = "transformer.h.1.attn.c_attn.weight"
    assert report.matched[f"model._orig_mod.backbone.{inner}"] == f"model._orig_mod.{inner}"
    assert len(report.matched) == len(list(sft.parameters()))
    assert report.unmatched == ["model._orig_mod.score.weight", "model._orig_mod.score.bias"]
    assert "shares its last two name segments" in report.reasons["model._orig_mod.score.weight"]
    assert "plain AdamW for 'model._orig_mod.score.weight'" in report.summary("OnDARE")
    start = tiny_gpt2(seed=0).transformer.wte.weight.detach()
    expected = start + 0.1 * (start - sft.model.transformer.wte.weight.detach())
    torch.testing.assert_close(reward.model.backbone.transformer.wte.weight.detach(), expected)
    # the callback's route (set_base with the module naming the parameters) pairs the same way
    again = Holder(RewardNet(tiny_gpt2(seed=0)))
    by_set_base = OnDARE(again.parameters(), keep_rate=1.0, merge_weight=0.1).set_base(again, sft)
    assert by_set_base.matched == report.matched and by_set_base.unmatched == report.unmatched


# ------------------------------------------------------------------ FSDP2 -------------------------


SHARDED = [
    {"class": "OnDARE", "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2, "seed": 3}},
    {"class": "OnTIES",
     "init_args": {"lr": 1e-2, "keep_rate": 0.3, "merge_weight": 0.2, "merge_every": 3, "weight_decay": 0.1}},
]


def sharded_own_base(rank: int, processes: int, out: str) -> None:
    """Both optimizers on FSDP2 parameters with ``base_model`` (τ at the first step); rank 0 saves
    the full weights."""
    from sharded_workers import full_weights, sft_model_and_base
    from sharded_workers import train as train_sharded
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_sr import optim
    from lightning_sr.sharding import shard_model

    results = []
    for config in SHARDED:
        model, base = sft_model_and_base()
        shard_model(model, init_device_mesh("cpu", (processes,)))
        opt = getattr(optim, config["class"])(model.named_parameters(), **config["init_args"], base_model=base)
        train_sharded(model, opt, range(4), False)
        results.append(full_weights(model))
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_sharded_parameters_with_base_model_end_where_set_base_does(tmp_path):
    from sharded_workers import build, full_weights
    from sharded_workers import train as train_sharded

    spawn_gloo(sharded_own_base, 2, str(tmp_path / "w.pt"))
    sharded = torch.load(tmp_path / "w.pt")
    for got, config in zip(sharded, SHARDED):
        model, opt = build(config, None)  # one process, set_base
        train_sharded(model, opt, range(4), False)
        for name, weight in full_weights(model).items():
            assert torch.equal(got[name], weight), (config["class"], name)


def test_bare_parameters_skip_base_entries_that_cannot_be_parameters(tmp_path):
    """A ``torch.save`` d state dict lists tied weights twice and integer buffers among the weights;
    neither takes a position."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    base = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    state = base.state_dict()
    state = {"0.weight": state["0.weight"], "0.weight_again": state["0.weight"], "steps": torch.tensor(3),
             "0.bias": state["0.bias"], "1.weight": state["1.weight"], "1.bias": state["1.bias"]}
    torch.save(state, tmp_path / "base.pt")
    opt = OnDARE(model.parameters(), keep_rate=1.0, merge_weight=0.5, base_model=str(tmp_path / "base.pt"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    start = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert list(opt.base_match.matched.values()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for p, s, b in zip(model.parameters(), start, base.parameters()):
        torch.testing.assert_close(p.detach(), s + 0.5 * (s - b.detach()))


def test_base_model_from_a_litgpt_or_fabric_checkpoint_file(tmp_path):
    """``fabric.save(path, {"model": model})`` (litgpt's fine-tuned ``lit_model.pth``) as the base."""
    model, base = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save({"model": base.state_dict()}, tmp_path / "lit_model.pth")
    opt = OnDARE(model.named_parameters(), keep_rate=1.0, merge_weight=0.5, base_model=tmp_path / "lit_model.pth")
    start = model.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.base_match.matched == {"weight": "weight", "bias": "bias"}
    torch.testing.assert_close(model.weight.detach(), start + 0.5 * (start - base.weight.detach()))
