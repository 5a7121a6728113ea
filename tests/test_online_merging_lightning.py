"""OnDARE / OnTIES under Lightning on CPU: closure, precisions, clipping, resume, DDP, the callback.

Every scenario runs under both Lightning packages (the ``L`` fixture).
"""

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning_sr.testing import make_tokenizer, save_tiny_generator, tiny_llama
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_sr.callbacks.online_merging import OnlineMerging
from lightning_sr.lightning_packages import LightningModule
from lightning_sr.optim import OnDARE, OnTIES

VOCAB = len(make_tokenizer())


class RecordingOnDARE(OnDARE):
    """OnDARE that records whether Lightning passed a closure and the gradient norm it saw."""

    def step(self, closure=None):
        self.__dict__.setdefault("closures", []).append(closure is not None)
        norms = self.__dict__.setdefault("grad_norms", [])

        def recorded():
            loss = closure()
            norms.append(self._grad_norm())
            return loss

        if closure is None:
            norms.append(self._grad_norm())
        return super().step(recorded if closure is not None else None)

    def _grad_norm(self):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        return torch.linalg.vector_norm(norms).item()


class PolicyModule(LightningModule):
    """A LightningModule holding a tiny HF Llama as ``self.policy`` (names ``policy.model...``)."""

    def __init__(self, optimizer=partial(OnDARE, lr=1e-2, keep_rate=0.3, merge_weight=0.05), out_dir=None, seed=0):
        super().__init__()
        self.policy = tiny_llama(seed=seed).train()
        self.optimizer = optimizer
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        # Tokens depend on the optimizer step (and rank), not on the loader's epoch bookkeeping,
        # so a resumed run sees exactly the batches the uninterrupted run saw.
        g = torch.Generator().manual_seed(1000 * self.global_step + self.global_rank)
        tokens = torch.randint(4, VOCAB, batch.shape, generator=g)
        return self.policy(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return self.optimizer(self.policy.parameters())

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = [torch.randint(4, VOCAB, (6,), generator=g) for _ in range(8)]
        return DataLoader(data, batch_size=2, shuffle=False)

    def on_train_end(self):
        if self.out_dir is not None:
            torch.save(
                {n: p.detach().clone() for n, p in self.named_parameters()},
                Path(self.out_dir) / f"rank{self.global_rank}.pt",
            )


def trainer(L, tmp_path, base, **kwargs):
    kwargs.setdefault("max_steps", 4)
    kwargs.setdefault("devices", 1)
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OnlineMerging(base_model=base)],
        **kwargs,
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_closure_is_called_and_training_moves_the_policy(L, tmp_path, precision):
    model = PolicyModule(optimizer=partial(RecordingOnDARE, lr=1e-2, keep_rate=0.3, merge_weight=0.05))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(L, tmp_path, tiny_llama(seed=1), precision=precision)
    t.fit(model)
    optimizer = t.optimizers[0]
    assert optimizer.closures == [True] * 4
    assert len(optimizer.state[model.policy.lm_head.weight]["tau_val"]) > 0  # the base was set
    report = t.callbacks[0].reports[0]
    assert "policy.model.layers.0.self_attn.q_proj.weight" in report.matched and not report.unmatched
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # Lightning keeps fp32 params


def test_16_mixed_with_grad_scaler_steps_without_closure(L, tmp_path):
    """Lightning turns '16-mixed' into bf16 on CPU unless given the plugin with a GradScaler."""
    model = PolicyModule(optimizer=partial(RecordingOnDARE, lr=1e-2, keep_rate=0.3, merge_weight=0.05))
    start = model.policy.lm_head.weight.detach().clone()
    plugin = L.sub("plugins.precision").MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    t = trainer(L, tmp_path, tiny_llama(seed=1), plugins=[plugin])
    t.fit(model)
    optimizer = t.optimizers[0]
    assert optimizer.closures == [False] * len(optimizer.closures) and optimizer.closures
    assert not torch.equal(start, model.policy.lm_head.weight)
    assert optimizer.state[model.policy.lm_head.weight]["step"] == len(optimizer.closures)


def test_gradient_clipping_reaches_the_optimizer(L, tmp_path):
    model = PolicyModule(optimizer=partial(RecordingOnDARE, lr=1e-2, keep_rate=0.3, merge_weight=0.05))
    t = trainer(L, tmp_path, tiny_llama(seed=1), gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    t.fit(model)
    norms = t.optimizers[0].grad_norms
    assert len(norms) == 4 and all(n <= 1e-3 * (1 + 1e-4) for n in norms)


def base_in(form, L, tmp_path):
    """The tiny base model (seed 1) in each form ``OnlineMerging(base_model=...)`` accepts."""
    if form == "folder":
        return str(save_tiny_generator(tmp_path / "base", seed=1))
    state = tiny_llama(seed=1).state_dict()
    if form == ".safetensors":
        save_file({k: v.clone().contiguous() for k, v in state.items()}, tmp_path / "base.safetensors")
        return str(tmp_path / "base.safetensors")
    if form == ".pt":
        torch.save(state, tmp_path / "base.pt")
        return str(tmp_path / "base.pt")
    # a Lightning checkpoint of the same LightningModule class, holding the base as its policy
    t = trainer(L, tmp_path / "ckpt", tiny_llama(seed=1), max_steps=0)
    t.fit(PolicyModule(seed=1))
    t.save_checkpoint(tmp_path / "base.ckpt")
    return str(tmp_path / "base.ckpt")


@pytest.mark.parametrize("form", ["folder", ".safetensors", ".pt", ".ckpt"])
def test_base_given_as_a_folder_or_a_weights_file(L, tmp_path, form):
    model = PolicyModule()
    t = trainer(L, tmp_path, base_in(form, L, tmp_path), max_steps=1)
    t.fit(model)
    base = tiny_llama(seed=1)
    state = t.optimizers[0].state[model.policy.lm_head.weight]
    # with zero steps of drift the first τ̃ values are (SFT − base)/p at the kept indices
    idx = state["tau_idx"].long()
    tau = (tiny_llama(seed=0).lm_head.weight - base.lm_head.weight).detach().reshape(-1)[idx] / 0.3
    torch.testing.assert_close(state["tau_val"], tau)


def test_no_online_merging_optimizer_only_warns(L, tmp_path):
    model = PolicyModule(optimizer=partial(torch.optim.AdamW, lr=1e-3))
    with pytest.warns(UserWarning, match="no OnDARE / OnTIES optimizer"):
        trainer(L, tmp_path, tiny_llama(seed=1), max_steps=1).fit(model)


def test_nothing_matching_stops_fit_with_a_clear_error(L, tmp_path):
    with pytest.raises(ValueError, match="no parameter name matches"):
        trainer(L, tmp_path, {"encoder.block.0.weight": torch.zeros(2)}, max_steps=1).fit(PolicyModule())


@pytest.mark.parametrize(
    "optimizer",
    [
        partial(OnDARE, lr=1e-2, keep_rate=0.3, merge_weight=0.05, weight_decay=0.01),
        partial(OnTIES, lr=1e-2, keep_rate=0.3, merge_weight=0.05, merge_every=3),
    ],
    ids=["OnDARE", "OnTIES-K3"],
)
def test_checkpoint_at_k_and_resume_equals_uninterrupted_run(L, tmp_path, optimizer):
    k, base = 4, tiny_llama(seed=1)  # with merge_every=3 the checkpoint falls mid-cycle
    full = PolicyModule(optimizer=optimizer)
    trainer(L, tmp_path / "full", base, max_steps=2 * k).fit(full)

    first = PolicyModule(optimizer=optimizer)
    t1 = trainer(L, tmp_path / "first", base, max_steps=k)
    t1.fit(first)
    ckpt = tmp_path / "k.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = PolicyModule(optimizer=optimizer)
    t2 = trainer(L, tmp_path / "second", base, max_steps=2 * k)
    t2.fit(resumed, ckpt_path=ckpt)
    assert t2.global_step == 2 * k
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_parameters(L, tmp_path):
    model = PolicyModule(out_dir=str(tmp_path))
    t = trainer(L, tmp_path, tiny_llama(seed=1), devices=2, strategy="ddp_spawn", max_steps=3)
    t.fit(model)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start = tiny_llama(seed=0)
    assert not torch.equal(rank0["policy.lm_head.weight"], start.lm_head.weight)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
