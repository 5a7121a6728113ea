"""OnDARE / OnTIES on a CUDA GPU: the CPU's results, device-side masks, exact resume, no host syncs.

Marked ``cuda``: skipped without a GPU (tests/conftest.py). On a GPU machine run
``pytest -m cuda tests/test_online_merging_cuda.py``.
"""

import io

import pytest
import torch
from torch import nn

from lightning_sr.optim import OnDARE, OnTIES
from lightning_sr.optim.sparsify import bernoulli_mask
from test_online_merging import RefAdam, TwoTensors, perturbed

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


class ThreeTensors(TwoTensors):
    """TwoTensors plus a 600×600 matrix, large enough for the CPU's sampled-threshold top-k."""

    def __init__(self, dtype=torch.float64):
        super().__init__(dtype=dtype)
        g = torch.Generator().manual_seed(1)
        self.big = nn.Parameter(torch.randn(600, 600, generator=g, dtype=dtype))


def set_grads(model, step):
    """The same random gradients on any device (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)


def train(cls, device, steps, model=None, opt_state=None, **kwargs):
    """Fit ``steps`` steps from the SFT point (or resume from ``opt_state``, Lightning's order)."""
    model = (model or ThreeTensors()).to(device)
    base = {n: t.to(device) for n, t in perturbed(ThreeTensors(), scale=0.01).items()}
    opt = cls(model.parameters(), lr=1e-3, weight_decay=0.01, **kwargs)
    opt.set_base(model, base)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    done = opt.state[model.w].get("step", 0)
    for step in range(done, done + steps):
        set_grads(model, step)
        opt.step()
    return model, opt


@pytest.mark.parametrize("merge_every", [1, 3])
@pytest.mark.parametrize("keep_rate", [0.01, 0.3])
def test_onties_on_cuda_equals_the_same_run_on_the_cpu(keep_rate, merge_every):
    """OnTIES is deterministic: topk on the GPU and the sampled threshold on the CPU pick one set."""
    kwargs = dict(keep_rate=keep_rate, merge_weight=0.1, merge_every=merge_every)
    cpu, _ = train(OnTIES, "cpu", 6, **kwargs)
    gpu, _ = train(OnTIES, CUDA, 6, **kwargs)
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12, msg=name)


def test_ondare_keep_all_on_cuda_equals_adamw_foreach():
    model, ref = ThreeTensors().to(CUDA), ThreeTensors().to(CUDA)
    ours = OnDARE(model.parameters(), lr=1e-3, weight_decay=0.1, keep_rate=1.0, merge_weight=0.0)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    for step in range(10):
        set_grads(model, step)
        set_grads(ref, step)
        ours.step()
        adamw.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ondare_on_cuda_draws_masks_on_the_device_and_matches_the_formula():
    model = TwoTensors().to(CUDA)
    base = {n: t.to(CUDA) for n, t in perturbed(TwoTensors()).items()}
    p_keep, alpha, lr, wd = 0.4, 0.3, 0.05, 0.1
    opt = OnDARE(model.parameters(), lr=lr, weight_decay=wd, keep_rate=p_keep, merge_weight=alpha, seed=7)
    opt.set_base(model, base)
    params = dict(model.named_parameters())
    device_state_bytes = torch.Generator(device=CUDA).get_state().numel()
    expected, taus, rng = {}, {}, {}
    for n, p in params.items():
        state = opt.state[p]
        assert state["rng_state"].numel() == device_state_bytes  # the CUDA generator's, not the CPU's
        assert state["rng_state"].device.type == "cpu" and state["tau_idx"].device.type == "cuda"
        expected[n] = p.detach().cpu().clone()
        idx = state["tau_idx"].long().cpu()
        assert 0 < idx.numel() < p.numel()
        taus[n] = torch.zeros(p.numel(), dtype=torch.float64)
        taus[n][idx] = (expected[n] - base[n].cpu()).reshape(-1)[idx] / p_keep
        torch.testing.assert_close(state["tau_val"].cpu(), taus[n][idx])
        taus[n] = taus[n].view_as(p)
        rng[n] = state["rng_state"].clone()

    def replay(name):  # the mask M_t the optimizer draws next for this parameter, on the GPU
        g = torch.Generator(device=CUDA)
        g.set_state(rng[name])
        mask = bernoulli_mask(params[name].numel(), p_keep, g)
        rng[name] = g.get_state()
        return mask.cpu().to(torch.float64).view_as(params[name])

    adams = {n: RefAdam(p.shape, lr) for n, p in params.items()}
    for step in range(4):
        set_grads(model, step)
        for n, p in params.items():
            delta = adams[n].delta(p.grad.cpu()) * replay(n) / p_keep
            expected[n] = expected[n] * (1 - lr * wd) + (1 - alpha) * delta + alpha * taus[n]
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach().cpu(), expected[n], rtol=1e-10, atol=1e-12)


def test_same_seed_draws_the_same_masks_on_cuda_and_another_seed_does_not():
    kwargs = dict(keep_rate=0.3, merge_weight=0.1)
    a, _ = train(OnDARE, CUDA, 3, seed=1, **kwargs)
    b, _ = train(OnDARE, CUDA, 3, seed=1, **kwargs)
    c, _ = train(OnDARE, CUDA, 3, seed=2, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.big, c.big)


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
@pytest.mark.parametrize("merge_every", [1, 3])
def test_state_dict_round_trip_resumes_exactly_on_cuda(cls, merge_every):
    kwargs = dict(keep_rate=0.01, merge_weight=0.1, merge_every=merge_every, seed=3)
    full, _ = train(cls, CUDA, 8, **kwargs)
    half, opt = train(cls, CUDA, 4, **kwargs)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = ThreeTensors().to(CUDA)
    fresh.load_state_dict(saved["model"])
    resumed, opt2 = train(cls, CUDA, 4, model=fresh, opt_state=saved["opt"], **kwargs)
    assert opt2.state[resumed.big]["step"] == 8
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
@pytest.mark.parametrize("merge_every", [1, 2])
def test_steps_make_no_host_sync(cls, merge_every):
    """Masks, top-k, election and merge stay on the device: no step waits for the GPU."""
    model = nn.ParameterDict({
        "big": nn.Parameter(torch.randn(1000, 1000, device=CUDA)),  # top-k of 10,000 of 1e6
        "small": nn.Parameter(torch.randn(50, device=CUDA)),  # ⌊p·n⌋ = 0: nothing dropped
        "half": nn.Parameter(torch.randn(300, 300, device=CUDA, dtype=torch.bfloat16)),  # fp32 master
    })
    base = {n: (p.detach().float() - 0.01 * torch.randn(p.shape, device=CUDA)).to(p.dtype) for n, p in model.items()}
    opt = cls(model.parameters(), lr=1e-2, keep_rate=0.01, merge_weight=1e-3, merge_every=merge_every)
    opt.set_base(model, base)
    grads = [torch.randn_like(p) for p in model.parameters()]

    def step():
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()

    start = {n: p.detach().clone() for n, p in model.items()}
    step()  # the first step creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * merge_every):  # plain and merge steps
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for n, p in model.items():
        assert torch.isfinite(p.float()).all() and not torch.equal(p, start[n]), n
