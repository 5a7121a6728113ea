"""OnDARE / OnTIES against reference formulas (docs/DESIGN.md, "Online merging optimizers")."""

import inspect
import io
import logging
import math
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_sr.optim import OnDARE, OnTIES, match_names, online_merging
from lightning_sr.optim.sparsify import (
    MIN_KEEP_RATE,
    bernoulli_indices,
    bernoulli_mask,
    magnitude_indices,
    top_indices,
)

BETAS, EPS = (0.9, 0.999), 1e-8


class TwoTensors(nn.Module):
    """Two parameters of different shapes, float64 so formula checks can be tight."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(6, 7, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(9, generator=g, dtype=dtype))


def perturbed(model, scale=0.1, seed=1):
    """A state dict playing the pre-trained base: the model's weights minus a random τ."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: p.detach() - scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def grads_for(model, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


class RefAdam:
    """torch.optim.AdamW's moments and bias correction, returning Δ = −lr·m̂/(√v̂ + eps)."""

    def __init__(self, shape, lr):
        self.m = torch.zeros(shape, dtype=torch.float64)
        self.v = torch.zeros(shape, dtype=torch.float64)
        self.t, self.lr = 0, lr

    def delta(self, grad):
        self.t += 1
        b1, b2 = BETAS
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1**self.t)
        return -self.lr * m_hat / (self.v.sqrt() / math.sqrt(1 - b2**self.t) + EPS)


def ref_topk(x, p):
    """Keep the ⌊p·n⌋ largest |x| with a full sort (the reference may sort)."""
    k = int(p * x.numel())
    if p >= 1 or k < 1:
        return x.clone()
    flat = x.reshape(-1)
    keep = torch.zeros_like(flat)
    idx = torch.argsort(flat.abs(), descending=True)[:k]
    keep[idx] = flat[idx]
    return keep.view_as(x)


def ref_ties_merge(delta, tau, alpha):
    s = torch.where(tau + delta >= 0, 1.0, -1.0).to(delta.dtype)
    return (1 - alpha) * delta * (torch.sign(delta) == s) + alpha * tau * (torch.sign(tau) == s)


# ------------------------------------------------------------------ reductions to AdamW ----------


def test_ondare_with_keep_all_and_no_merge_equals_adamw_with_weight_decay():
    torch.manual_seed(0)
    model, ref = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), None
    ref = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())

    def groups(m):  # two param groups with their own lr / weight decay
        return [{"params": m[0].parameters(), "lr": 3e-3}, {"params": m[2].parameters(), "weight_decay": 0.0}]

    ours = OnDARE(groups(model), lr=1e-2, weight_decay=0.1, keep_rate=1.0, merge_weight=0.0)
    adamw = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
    for _ in range(60):
        x = torch.randn(5, 8)
        for net, opt in ((model, ours), (ref, adamw)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(model[0].weight, nn.Linear(8, 16).weight)  # it did train


def test_onties_with_base_equal_to_policy_equals_adamw():
    torch.manual_seed(0)
    model, ref = nn.Linear(12, 6), nn.Linear(12, 6)
    ref.load_state_dict(model.state_dict())
    ours = OnTIES(model.parameters(), lr=1e-2, weight_decay=0.05, keep_rate=1.0, merge_weight=0.0)
    report = ours.set_base(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert set(report.matched) == {"weight", "bias"} and report.kept == 0  # zero τ
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(40):
        x = torch.randn(3, 12)
        for net, opt in ((model, ours), (ref, adamw)):
            opt.zero_grad()
            net(x).sin().sum().backward()
            opt.step()
    torch.testing.assert_close(model.weight, ref.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias, ref.bias, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ formulas ---------------------


@pytest.mark.parametrize("keep_rate", [0.3, 1.0, 0.01])
def test_onties_matches_the_formula(keep_rate):
    """τ̃, Δ̃ top-k, unweighted sign election, weighted merge; decay first. ⌊0.01·n⌋ = 0 keeps all."""
    model = TwoTensors()
    base = perturbed(model)
    alpha, lr, wd = 0.4, 0.05, 0.1
    opt = OnTIES(model.parameters(), lr=lr, weight_decay=wd, keep_rate=keep_rate, merge_weight=alpha)
    opt.set_base(model, base)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    taus = {n: ref_topk(expected[n] - base[n], keep_rate) for n in expected}
    adams = {n: RefAdam(p.shape, lr) for n, p in model.named_parameters()}
    for step in range(4):
        grads_for(model, step)
        for n, p in model.named_parameters():
            delta = ref_topk(adams[n].delta(p.grad), keep_rate)
            expected[n] = expected[n] * (1 - lr * wd) + ref_ties_merge(delta, taus[n], alpha)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12)


def test_onties_election_drops_disagreeing_adam_coordinates_even_without_merging():
    p = nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    opt = OnTIES([p], lr=0.1, keep_rate=1.0, merge_weight=0.0)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)})
    p.grad = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)  # Δ = +0.1 everywhere
    opt.step()
    # τ = [+1, -1, 0]: coordinate 1 disagrees with the SFT direction and |τ| wins the election.
    torch.testing.assert_close(p.detach(), torch.tensor([1.1, 1.0, 1.1], dtype=torch.float64))


def test_onties_sign_election_breaks_a_tie_toward_plus():
    """Where τ̃ + Δ̃ is exactly 0 the elected sign is +1: the positive term is kept, the negative dropped."""
    grad = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    probe = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # Δ itself, bit for bit
    probe.grad = grad.clone()
    OnTIES([probe], lr=0.1, keep_rate=1.0, merge_weight=0.0).step()
    delta = probe.detach().clone()
    assert delta[0] > 0 > delta[1]
    alpha = 0.25
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = OnTIES([p], lr=0.1, keep_rate=1.0, merge_weight=alpha)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": delta.clone()})  # τ = 0 − Δ = −Δ exactly
    p.grad = grad.clone()
    opt.step()
    # coordinate 0: Δ > 0 wins, τ < 0 is dropped; coordinate 1: τ > 0 wins, Δ < 0 is dropped
    expected = torch.tensor([(1 - alpha) * delta[0].item(), alpha * -delta[1].item()], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)


def _onties_one_step(tau, grad, alpha, keep_rate, lr=0.1):
    """One OnTIES step from θ = 0 with τ = ``tau`` (base = −τ), and the reference formula's θ.

    Returns (θ after the step, expected θ, Δ̃, τ̃); Δ comes from :class:`RefAdam`, not the optimizer.
    """
    p = nn.Parameter(torch.zeros_like(tau))
    opt = OnTIES([p], lr=lr, keep_rate=keep_rate, merge_weight=alpha)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": -tau})
    p.grad = grad.clone()
    delta = ref_topk(RefAdam(tau.shape, lr).delta(grad), keep_rate)
    tau_kept = ref_topk(tau, keep_rate)
    opt.step()
    return p.detach(), ref_ties_merge(delta, tau_kept, alpha), delta, tau_kept


# |g| ~ eps makes |Δ| = lr·k/(k + 1) for g = −k·eps: distinct magnitudes, the first four the
# largest (kept by keep_rate 0.5 with the four largest |τ|), and signs +, −, +, −, ...
ELECTION_GRAD = torch.tensor([-19, 9, -4, 3, -0.4, 0.3, -0.2, 0.1], dtype=torch.float64) * EPS
ELECTION_SIGNS = torch.tensor([-1.0, 1, -1, 1, -1, 1, -1, 1], dtype=torch.float64)  # opposite to Δ's


@pytest.mark.parametrize("keep_rate", [1.0, 0.5])  # dense election, and the top-k path
def test_onties_sign_election_where_adam_outvotes_tau(keep_rate):
    """|Δ̃| > |τ̃| with opposite signs: the elected sign is Δ's, so Δ̃ is applied and τ̃ dropped
    (an election that always followed τ would drop Δ̃ and apply α·τ̃ instead)."""
    tau = ELECTION_SIGNS * torch.tensor([0.06, 0.05, 0.04, 0.03, 0.004, 0.003, 0.002, 0.001], dtype=torch.float64)
    alpha = 0.3
    got, expected, delta, tau_kept = _onties_one_step(tau, ELECTION_GRAD, alpha, keep_rate)
    both = (delta != 0) & (tau_kept != 0)
    assert both.sum() >= 4 and (delta.abs() > tau_kept.abs())[both].all()  # Δ outvotes τ wherever both are kept
    assert torch.equal(expected[both], (1 - alpha) * delta[both])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("keep_rate", [1.0, 0.5])
def test_onties_sign_election_where_tau_outvotes_adam(keep_rate):
    """|τ̃| > |Δ̃| with opposite signs: the elected sign is τ's, so α·τ̃ is applied and Δ̃ dropped
    (an election that always followed Δ would apply (1 − α)·Δ̃ and drop τ̃)."""
    tau = ELECTION_SIGNS * torch.tensor([0.5, 0.4, 0.3, 0.2, 0.08, 0.07, 0.06, 0.05], dtype=torch.float64)
    alpha = 0.3
    got, expected, delta, tau_kept = _onties_one_step(tau, ELECTION_GRAD, alpha, keep_rate)
    both = (delta != 0) & (tau_kept != 0)
    assert both.sum() >= 4 and (tau_kept.abs() > delta.abs())[both].all()
    assert torch.equal(expected[both], alpha * tau_kept[both])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_ondare_parameters_draw_their_own_masks():
    """Each parameter's mask stream starts from the seed *and its position*: two parameters of the
    same shape do not share M₀ (or M_t)."""
    model = nn.ParameterDict({"a": nn.Parameter(torch.ones(200)), "b": nn.Parameter(torch.ones(200))})
    opt = OnDARE(model.parameters(), keep_rate=0.3, seed=3)
    opt.set_base(model, {"a": torch.zeros(200), "b": torch.zeros(200)})
    a, b = (opt.state[p]["tau_idx"] for p in model.values())
    assert not torch.equal(a, b)


def test_frozen_parameters_are_skipped_by_set_base():
    model = nn.ModuleDict({"frozen": nn.Linear(3, 3), "trained": nn.Linear(3, 2)})
    model["frozen"].requires_grad_(False)
    base = {k: v - 1.0 for k, v in model.state_dict().items()}
    opt = OnTIES(model.parameters(), keep_rate=0.5)
    report = opt.set_base(model, base)
    assert set(report.matched) == {"trained.weight", "trained.bias"} and not report.unmatched
    assert all(p not in opt.state for p in model["frozen"].parameters())


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_non_contiguous_parameters_train_like_contiguous_ones(cls):
    """A transposed (non-contiguous) parameter gets a contiguous master copy and the same updates."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(7, 5, generator=g, dtype=torch.float64)
    strided = nn.Parameter(data.clone().t())
    dense = nn.Parameter(data.clone().t().contiguous())
    assert not strided.is_contiguous()
    kwargs = dict(lr=0.05, keep_rate=0.3, merge_weight=0.1, seed=3)
    opts = [cls([p], **kwargs) for p in (strided, dense)]
    for opt, p in zip(opts, (strided, dense)):
        opt.set_base(nn.ParameterDict({"p": p}), {"p": p.detach() - 0.1})
    for step in range(3):
        grad = torch.randn(5, 7, generator=g, dtype=torch.float64)
        for opt, p in zip(opts, (strided, dense)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(strided.detach(), dense.detach(), rtol=0, atol=0)
    assert not torch.equal(dense.detach(), data.t())


def _mask_indices(numel, keep_rate, generator):
    return bernoulli_mask(numel, keep_rate, generator).nonzero().squeeze(1)


def replay_mask(sampler, rng: dict, name: str, param: torch.Tensor, p_keep: float) -> torch.Tensor:
    """The Bernoulli(p_keep) mask the optimizer draws next for ``param``, replayed from the
    generator state ``rng[name]`` with ``sampler`` (the state is advanced as the optimizer's is)."""
    g = torch.Generator()
    g.set_state(rng[name])
    idx = sampler(param.numel(), p_keep, g)
    rng[name] = g.get_state()
    mask = torch.zeros(param.numel(), dtype=torch.float64)
    mask[idx] = 1
    return mask.view_as(param)


@pytest.mark.parametrize("sampler", [bernoulli_indices, _mask_indices], ids=["gaps", "dense_mask"])
def test_ondare_matches_the_formula_given_the_masks_it_drew(sampler, monkeypatch):
    """Both ways of drawing masks: kept indices (the CPU's) and a dense mask (the GPUs', forced here)."""
    if sampler is _mask_indices:
        monkeypatch.setattr(OnDARE, "_draws_indices", staticmethod(lambda device: False))
    model = TwoTensors()
    base = perturbed(model)
    p_keep, alpha, lr, wd = 0.4, 0.3, 0.05, 0.1
    opt = OnDARE(model.parameters(), lr=lr, weight_decay=wd, keep_rate=p_keep, merge_weight=alpha, seed=7)
    params = dict(model.named_parameters())
    opt.set_base(model, base)
    expected = {n: p.detach().clone() for n, p in params.items()}
    taus = {}
    for n, p in params.items():  # M₀ is the stored kept set: τ̃ = τ ⊙ M₀ / p there
        idx = opt.state[p]["tau_idx"].long()
        taus[n] = torch.zeros(p.numel(), dtype=torch.float64)
        taus[n][idx] = (expected[n] - base[n]).reshape(-1)[idx] / p_keep
        torch.testing.assert_close(opt.state[p]["tau_val"], taus[n][idx])
        assert 0 < idx.numel() < p.numel()
        taus[n] = taus[n].view_as(p)
    rng = {n: opt.state[p]["rng_state"].clone() for n, p in params.items()}

    def replay(name):  # the Bernoulli mask M_t the optimizer draws next for this parameter
        return replay_mask(sampler, rng, name, params[name], p_keep)

    adams = {n: RefAdam(p.shape, lr) for n, p in params.items()}
    for step in range(4):
        grads_for(model, step)
        for n, p in params.items():
            delta = adams[n].delta(p.grad) * replay(n) / p_keep
            expected[n] = expected[n] * (1 - lr * wd) + (1 - alpha) * delta + alpha * taus[n]
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12)


def test_ondare_mean_update_over_seeds_approaches_linear_merge():
    """E[(1−α)Δ⊙M/p + ατ⊙M₀/p] = (1−α)Δ + ατ; tolerance 5 standard errors from the variance."""
    p_keep, alpha, lr, seeds = 0.3, 0.5, 0.1, 600
    start = torch.linspace(-1, 1, 40, dtype=torch.float64)
    tau = torch.linspace(0.5, -0.3, 40, dtype=torch.float64)
    grad = torch.linspace(-2, 3, 40, dtype=torch.float64) + 0.01
    delta = RefAdam(start.shape, lr).delta(grad)
    updates = []
    for seed in range(seeds):
        p = nn.Parameter(start.clone())
        opt = OnDARE([p], lr=lr, keep_rate=p_keep, merge_weight=alpha, seed=seed)
        opt.set_base(nn.ParameterDict({"p": p}), {"p": start - tau})
        p.grad = grad.clone()
        opt.step()
        updates.append(p.detach() - start)
    updates = torch.stack(updates)
    variance = ((1 - alpha) ** 2 * delta**2 + alpha**2 * tau**2) * (1 - p_keep) / p_keep
    error = (updates.mean(0) - ((1 - alpha) * delta + alpha * tau)).abs()
    assert (error <= 5 * (variance / seeds).sqrt()).all()
    assert updates.std(0).gt(0).all()  # and the single updates are random


@pytest.mark.parametrize("sampler", [bernoulli_indices, _mask_indices], ids=["gaps", "dense_mask"])
def test_bernoulli_indices_are_an_iid_bernoulli_mask(sampler):
    """Both samplers (geometric gaps on the CPU, a dense device mask on GPUs) draw i.i.d. Bernoulli(p)."""
    g = torch.Generator().manual_seed(0)
    n, p, draws = 200, 0.05, 2000
    counts = torch.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = sampler(n, p, g)
        assert torch.equal(idx, idx.unique())  # sorted, distinct
        assert idx.min() >= 0 and idx.max() < n
        counts[idx] += 1
        sizes.append(idx.numel())
    per_position_se = math.sqrt(p * (1 - p) / draws)
    assert (counts / draws - p).abs().max() < 5 * per_position_se
    assert abs(counts.mean() / draws - p) < 5 * per_position_se / math.sqrt(n)  # overall rate
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(sizes.var().item() - n * p * (1 - p)) < 0.15 * n * p * (1 - p)  # Binomial spread
    assert torch.equal(sampler(5, 1.0, g), torch.arange(5))


def test_magnitude_indices_keep_floor_p_n_largest():
    x = torch.tensor([0.5, -3.0, 1.0, 0.1, -2.0, 0.2, 4.0])
    assert magnitude_indices(x, 0.5).tolist() == [1, 4, 6]  # ⌊3.5⌋ = 3
    assert magnitude_indices(x, 0.1) is None  # ⌊0.7⌋ = 0 keeps everything
    assert magnitude_indices(x, 1.0) is None


@pytest.mark.parametrize("layout", ["random", "spikes_off_sample", "sample_too_high"])
def test_top_indices_on_large_tensors_equal_a_full_topk(layout):
    """The sampled-threshold path (n large, k small) and its fallback both give the exact top-k."""
    n, k = 400_000, 4_000
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=g, dtype=torch.float64)
    if layout == "spikes_off_sample":  # the large values avoid every strided sample position
        x[1::12][: 2 * k] += 10.0
    if layout == "sample_too_high":  # the sample overestimates the threshold: fallback to topk
        x[::12] += 10.0
    expected = torch.topk(x, k).indices.sort().values
    assert torch.equal(top_indices(x.__getitem__, n, k, x.device), expected)


def test_onties_matches_the_formula_on_a_large_tensor():
    """A tensor large enough for the sampled-threshold top-k, one step against the formula."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(600, 600, generator=g, dtype=torch.float64))
    base = p.detach() - 0.01 * torch.randn(600, 600, generator=g, dtype=torch.float64)
    keep, alpha, lr = 0.01, 0.3, 1e-3
    opt = OnTIES([p], lr=lr, keep_rate=keep, merge_weight=alpha)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": base})
    p.grad = torch.randn(600, 600, generator=g, dtype=torch.float64)
    delta = ref_topk(RefAdam(p.shape, lr).delta(p.grad), keep)
    expected = p.detach() + ref_ties_merge(delta, ref_topk(p.detach() - base, keep), alpha)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
    assert int((delta != 0).sum()) == int(keep * p.numel())


# ------------------------------------------------------------------ step-K ----------------------


def test_step_k_updates_every_parameter_every_step_and_merges_on_multiples_of_k():
    model = TwoTensors()
    base = perturbed(model)
    k, keep, alpha, lr = 3, 0.3, 0.2, 0.05
    opt = OnTIES(model.parameters(), lr=lr, keep_rate=keep, merge_weight=alpha, merge_every=k)
    opt.set_base(model, base)
    params = dict(model.named_parameters())
    expected = {n: p.detach().clone() for n, p in params.items()}
    taus = {n: ref_topk(expected[n] - base[n], keep) for n in params}
    adams = {n: RefAdam(p.shape, lr) for n, p in params.items()}
    accumulated = {n: torch.zeros_like(expected[n]) for n in params}
    for step in range(1, 7):
        grads_for(model, step)
        before = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            delta = adams[n].delta(p.grad)
            if step % k:
                expected[n] = expected[n] + delta
                accumulated[n] += delta
            else:  # back to the last merge point, merge the accumulated delta once
                merged = ref_ties_merge(ref_topk(accumulated[n] + delta, keep), taus[n], alpha)
                expected[n] = expected[n] - accumulated[n] + merged
                accumulated[n].zero_()
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12)
            moved = p.detach() != before[n]
            if step % k:
                assert moved.all(), f"step {step}: {n} not fully updated"
            else:  # a merge step leaves only the sparse merged coordinates away from the merge point
                assert (p.detach() != before[n] - accumulated[n]).any()
        is_merge = step % k == 0
        assert all(opt.state[p]["accumulated"].eq(0).all() == is_merge for p in params.values())


def test_step_k_ondare_with_keep_all_is_adam_plus_tau_on_merge_steps():
    p = nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
    start, tau = p.detach().clone(), torch.full((10,), 0.5, dtype=torch.float64)
    opt = OnDARE([p], lr=0.01, keep_rate=1.0, merge_weight=0.1, merge_every=3)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": start - tau})
    adam, expected = RefAdam((10,), 0.01), start.clone()
    for step in range(1, 7):
        p.grad = torch.full((10,), float(step), dtype=torch.float64)
        delta = adam.delta(p.grad)
        expected = expected + (delta if step % 3 else 0.9 * delta + 0.1 * tau)
        if step % 3 == 0:  # the rollback undid the first two steps' full-weight deltas
            expected = expected - 0.1 * accumulated
        accumulated = delta if step % 3 == 1 else accumulated + delta
        opt.step()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", [bernoulli_indices, _mask_indices], ids=["gaps", "dense_mask"])
def test_step_k_ondare_with_random_drop_matches_the_formula_given_the_masks_it_drew(sampler, monkeypatch):
    """Step-K at keep_rate < 1: plain Adam steps in between, then the accumulated delta plus this
    step's is dropped with a fresh mask M_t, rescaled and merged once; the decay applied in between stays."""
    if sampler is _mask_indices:
        monkeypatch.setattr(OnDARE, "_draws_indices", staticmethod(lambda device: False))
    model = TwoTensors()
    base = perturbed(model)
    k, p_keep, alpha, lr, wd = 3, 0.4, 0.3, 0.05, 0.1
    opt = OnDARE(model.parameters(), lr=lr, weight_decay=wd, keep_rate=p_keep, merge_weight=alpha,
                 merge_every=k, seed=7)
    params = dict(model.named_parameters())
    opt.set_base(model, base)
    expected = {n: p.detach().clone() for n, p in params.items()}
    taus, rng = {}, {}
    for n, p in params.items():
        idx = opt.state[p]["tau_idx"].long()
        taus[n] = torch.zeros(p.numel(), dtype=torch.float64)
        taus[n][idx] = (expected[n] - base[n]).reshape(-1)[idx] / p_keep
        taus[n] = taus[n].view_as(p)
        rng[n] = opt.state[p]["rng_state"].clone()

    def replay(name):
        return replay_mask(sampler, rng, name, params[name], p_keep)

    adams = {n: RefAdam(p.shape, lr) for n, p in params.items()}
    accumulated = {n: torch.zeros_like(expected[n]) for n in params}
    for step in range(1, 7):
        grads_for(model, step)
        for n, p in params.items():
            delta = adams[n].delta(p.grad)
            expected[n] = expected[n] * (1 - lr * wd)
            if step % k:
                expected[n] = expected[n] + delta
                accumulated[n] += delta
            else:
                merged = (1 - alpha) * (accumulated[n] + delta) * replay(n) / p_keep + alpha * taus[n]
                expected[n] = expected[n] - accumulated[n] + merged
                accumulated[n].zero_()
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12)


def test_merge_every_raised_after_the_first_steps_starts_accumulating():
    p = nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
    start, tau = p.detach().clone(), torch.full((10,), 0.5, dtype=torch.float64)
    opt = OnDARE([p], lr=0.01, keep_rate=1.0, merge_weight=0.1)  # merge_every=1: no buffer
    opt.set_base(nn.ParameterDict({"p": p}), {"p": start - tau})
    adam, expected = RefAdam((10,), 0.01), start.clone()
    for step in range(1, 4):
        if step == 2:
            opt.param_groups[0]["merge_every"] = 3  # the state's step is 1: steps 2 and 3 close a cycle
        p.grad = torch.full((10,), float(step), dtype=torch.float64)
        delta = adam.delta(p.grad)
        if step == 1:
            expected = expected + 0.9 * delta + 0.1 * tau
        elif step == 2:
            expected, accumulated = expected + delta, delta
        else:
            expected = expected - accumulated + 0.9 * (accumulated + delta) + 0.1 * tau
        opt.step()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ storage, state, errors -------


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_stored_reference_is_sparse(cls):
    model = nn.Linear(1000, 1000, bias=False)
    base = perturbed(model, scale=1e-3)
    keep = 0.01
    opt = cls(model.parameters(), keep_rate=keep)
    report = opt.set_base(model, base)
    n = model.weight.numel()
    if cls is OnTIES:
        assert report.kept == int(keep * n)
    else:
        assert abs(report.kept - keep * n) < 5 * math.sqrt(n * keep * (1 - keep))
    dense_bytes = n * model.weight.element_size()
    measured = opt.reference_bytes()
    state = opt.state[model.weight]
    assert state["tau_idx"].dtype == torch.int32 and state["tau_val"].dtype == torch.float32
    assert measured == report.kept * (4 + 4)  # int32 index + fp32 value per kept entry
    assert 0.015 < measured / dense_bytes < 0.025  # ≈ 2·keep_rate of the dense bytes


def test_parameters_without_base_counterpart_get_plain_adamw():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "new_head": nn.Linear(4, 2)})
    ref_head = nn.Linear(4, 2)
    ref_head.load_state_dict(model["new_head"].state_dict())
    base = {"body.weight": torch.zeros(4, 4), "body.bias": torch.zeros(4)}
    opt = OnDARE(model.parameters(), lr=1e-2, keep_rate=0.5, merge_weight=0.1, weight_decay=0.01)
    report = opt.set_base(model, base)
    assert report.unmatched == ["new_head.weight", "new_head.bias"]
    adamw = torch.optim.AdamW(ref_head.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(10):
        x = torch.randn(3, 4)
        opt.zero_grad()
        adamw.zero_grad()
        model["new_head"](model["body"](x)).sum().backward()
        ref_head(model["body"](x).detach()).sum().backward()
        opt.step()
        adamw.step()
    torch.testing.assert_close(model["new_head"].weight, ref_head.weight, rtol=1e-5, atol=1e-7)


def test_shape_mismatch_is_an_error_naming_the_parameter_and_changes_nothing():
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 2)})
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base["b.weight"] = torch.zeros(3, 3)
    opt = OnTIES(model.parameters())
    with pytest.raises(ValueError, match=r"'b\.weight'.*\(2, 3\).*\(3, 3\)"):
        opt.set_base(model, base)
    assert len(opt.state) == 0


def test_nothing_matching_and_foreign_model_are_errors():
    model = nn.Linear(3, 3)
    opt = OnDARE(model.parameters())
    with pytest.raises(ValueError, match="no parameter name matches"):
        opt.set_base(model, {"other.thing": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a parameter of the given model"):
        opt.set_base(nn.Linear(3, 3), model)


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_step_without_base_says_how_to_set_it(cls):
    model = nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    opt = cls(model.parameters(), merge_weight=1e-7)
    with pytest.raises(RuntimeError, match=r"set_base\(model, base_model\).*OnlineMerging"):
        opt.step()
    cls(model.parameters(), merge_weight=0.0).step()  # no base needed without merging


def test_invalid_hyperparameters_are_rejected():
    params = [nn.Parameter(torch.zeros(2))]
    for bad in ({"keep_rate": 0.0}, {"keep_rate": 1.5}, {"merge_weight": -1}, {"merge_weight": 1.5},
                {"merge_every": 0}, {"merge_every": 1.5}, {"lr": -1}, {"eps": -1e-8}, {"weight_decay": -0.1},
                {"betas": (0.9, 1.0)}, {"betas": (0.9,)}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OnDARE(params, **bad)


def test_sparse_gradients_are_refused():
    p = nn.Parameter(torch.zeros(4, 3))
    opt = OnDARE([p], keep_rate=0.5, merge_weight=0.0)
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_too_small_keep_rate_is_rejected_naming_the_valid_range():
    params = [nn.Parameter(torch.zeros(2))]
    for cls in (OnDARE, OnTIES):
        with pytest.raises(ValueError, match=r"keep_rate must be in \[1e-12, 1\].*got 1e-16"):
            cls(params, keep_rate=1e-16)
        with pytest.raises(ValueError, match=r"keep_rate must be in \[1e-12, 1\]"):
            cls([{"params": params, "keep_rate": 1e-20}])  # a param group's own value is checked too
    # the smallest valid rate still gives valid indices (below it the geometric gaps overflow)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = bernoulli_indices(10**9, MIN_KEEP_RATE, g)
        assert ((idx >= 0) & (idx < 10**9)).all()
    p = nn.Parameter(torch.ones(1000))
    opt = OnDARE([p], lr=1e-6, keep_rate=MIN_KEEP_RATE, merge_weight=1e-7)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": torch.zeros(1000)})
    p.grad = torch.ones(1000)
    opt.step()


def test_ondare_clamp_reference_is_the_authors_clamp_of_the_rescaled_reference():
    """``clamp_reference=True``: τ̃ = clamp(τ ⊙ M₀ / p, −1, 1), stored and merged; off by default."""
    model = TwoTensors()
    base = perturbed(model, scale=1.0)  # |τ| / p often exceeds 1
    p_keep = 0.3
    plain = OnDARE(model.parameters(), keep_rate=p_keep, seed=7)
    clamped = OnDARE(model.parameters(), keep_rate=p_keep, seed=7, clamp_reference=True)
    plain.set_base(model, base)
    clamped.set_base(model, base)
    for n, p in model.named_parameters():
        idx = plain.state[p]["tau_idx"].long()
        rescaled = (p.detach() - base[n]).reshape(-1)[idx] / p_keep
        assert rescaled.abs().max() > 1
        torch.testing.assert_close(plain.state[p]["tau_val"], rescaled)  # default: no clamp
        assert torch.equal(clamped.state[p]["tau_idx"], plain.state[p]["tau_idx"])  # same M₀
        torch.testing.assert_close(clamped.state[p]["tau_val"], rescaled.clamp(-1, 1))
    # and the step merges the clamped τ̃: θ + (1 − α)·Δ + α·clamp(τ, −1, 1) at keep_rate 1
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = OnDARE([p], lr=0.1, keep_rate=1.0, merge_weight=0.5, clamp_reference=True)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": torch.tensor([-3.0, 0.5, 2.0], dtype=torch.float64)})
    p.grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    delta = RefAdam((3,), 0.1).delta(p.grad)
    opt.step()
    clamped_tau = torch.tensor([1.0, -0.5, -1.0], dtype=torch.float64)  # τ = [3, −0.5, −2]
    torch.testing.assert_close(p.detach(), 0.5 * delta + 0.5 * clamped_tau, rtol=1e-12, atol=1e-12)


def test_learning_rate_far_above_the_papers_range_warns_once_per_class(monkeypatch):
    monkeypatch.setattr(online_merging, "_warned_high_lr", set())
    params = [nn.Parameter(torch.zeros(2))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OnDARE(params, lr=5e-6)
        OnTIES(params, lr=1e-4)  # the paper's range and up to 1e-4: quiet
        OnDARE(params, lr=1e-3)
        OnDARE(params, lr=1e-2)  # once per class
        OnTIES([{"params": params, "lr": 2e-3}])  # a param group's lr counts too
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2, messages
    assert re.match(r"OnDARE: lr=0\.001 is far above the paper's range .*1e-07 to 5e-06", messages[0])
    assert re.match(r"OnTIES: lr=0\.002 .*1e-07 to 5e-06", messages[1])


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_every_init_argument_is_described_in_the_class_docstring(cls):
    """LightningCLI's --help reads the Google-style ``Args:`` section of the class docstring."""
    docstring_parser = pytest.importorskip("docstring_parser")
    described = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
    arguments = list(inspect.signature(cls).parameters)
    assert "keep_rate" in arguments and "merge_weight" in arguments
    assert all(described.get(a) for a in arguments), set(arguments) - set(described)
    equation = {OnDARE: "Eq. 3", OnTIES: "Eq. 7"}[cls]
    assert equation in cls.__doc__ and "Alg. 2" in cls.__doc__  # the paper's equations stay cited


# ------------------------------------------------------------------ set_base after training ------


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
def test_set_base_after_load_state_dict_keeps_the_checkpointed_reference(cls, caplog):
    """Plain-Python resume (load_state_dict, then set_base): τ is not recomputed from trained weights."""
    kwargs = dict(lr=0.05, weight_decay=0.01, keep_rate=0.3, merge_weight=0.1, seed=3)
    base = perturbed(TwoTensors(dtype=torch.float32))

    def fit(model, opt, steps):
        for step in steps:
            grads_for(model, step)
            opt.step()

    full = TwoTensors(dtype=torch.float32)
    opt = cls(full.parameters(), **kwargs)
    opt.set_base(full, base)
    fit(full, opt, range(8))
    half = TwoTensors(dtype=torch.float32)
    opt = cls(half.parameters(), **kwargs)
    opt.set_base(half, base)
    fit(half, opt, range(4))
    saved = opt.state_dict()
    resumed = cls(half.parameters(), **kwargs)
    resumed.load_state_dict(saved)
    with caplog.at_level(logging.WARNING, logger=online_merging.__name__):
        report = resumed.set_base(half, base)
    assert report.restored == ["w", "b"] and not report.matched and report.kept == 0
    assert "keep the reference delta τ̃ stored in the optimizer state" in caplog.text
    for p in half.parameters():
        assert torch.equal(resumed.state[p]["tau_val"], saved["state"][0 if p is half.w else 1]["tau_val"])
    fit(half, resumed, range(4, 8))
    for a, b in zip(full.parameters(), half.parameters()):
        assert torch.equal(a, b)


def test_set_base_after_steps_without_a_base_is_an_error_and_changes_nothing():
    model = TwoTensors()
    opt = OnTIES(model.parameters(), lr=0.05, keep_rate=0.3, merge_weight=0.0)  # runs without a base
    for step in range(2):
        grads_for(model, step)
        opt.step()
    with pytest.raises(ValueError, match=r"'w' has already taken 2 steps without a base.*before the first step"):
        opt.set_base(model, perturbed(model))
    assert all("tau_idx" not in opt.state[p] and opt.state[p]["step"] == 2 for p in model.parameters())


def test_set_base_twice_before_training_draws_the_same_reference_mask():
    model = TwoTensors()
    base = perturbed(model)
    opt = OnDARE(model.parameters(), keep_rate=0.3, seed=3)
    opt.set_base(model, {n: torch.zeros_like(t) for n, t in base.items()})  # e.g. the wrong base first
    opt.set_base(model, base)
    once = OnDARE(model.parameters(), keep_rate=0.3, seed=3)
    once.set_base(model, base)
    for p in model.parameters():
        for key in ("tau_idx", "tau_val", "rng_state"):
            assert torch.equal(opt.state[p][key], once.state[p][key]), key


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    model = nn.Linear(3, 1)
    opt = OnDARE(model.parameters(), lr=0.1, keep_rate=0.5, merge_weight=0.0)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and loss.requires_grad


def _train(opt_cls, steps, model=None, opt_state=None, **kwargs):
    model = model or TwoTensors(dtype=torch.float32)
    opt = opt_cls(model.parameters(), lr=0.05, weight_decay=0.01, **kwargs)
    opt.set_base(model, perturbed(model))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    done = opt.state[model.w]["step"] if opt.state.get(model.w) and "step" in opt.state[model.w] else 0
    for step in range(done, done + steps):
        grads_for(model, step)
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls", [OnDARE, OnTIES])
@pytest.mark.parametrize("merge_every", [1, 3])
def test_state_dict_round_trip_resumes_exactly(cls, merge_every):
    kwargs = dict(keep_rate=0.3, merge_weight=0.1, merge_every=merge_every, seed=3)
    full, _ = _train(cls, 8, **kwargs)
    half, opt = _train(cls, 4, **kwargs)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # only tensors and primitives in the state
    fresh = TwoTensors(seed=5, dtype=torch.float32)
    fresh.load_state_dict(saved["model"])
    resumed, opt2 = _train(cls, 4, model=fresh, opt_state=saved["opt"], **kwargs)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    state = opt2.state[resumed.w]
    assert state["tau_idx"].dtype == torch.int32 and state["step"] == 8
    if cls is OnDARE:
        assert state["rng_state"].dtype == torch.uint8


def test_same_seed_draws_same_masks_different_seed_does_not():
    a, _ = _train(OnDARE, 3, keep_rate=0.3, merge_weight=0.1, seed=1)
    b, _ = _train(OnDARE, 3, keep_rate=0.3, merge_weight=0.1, seed=1)
    c, _ = _train(OnDARE, 3, keep_rate=0.3, merge_weight=0.1, seed=2)
    assert torch.equal(a.w, b.w) and not torch.equal(a.w, c.w)


def test_bf16_parameters_keep_fp32_master_weights_and_state():
    p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = OnDARE([p], lr=1e-6, keep_rate=1.0, merge_weight=1e-4)
    opt.set_base(nn.ParameterDict({"p": p}), {"p": torch.zeros(64)})  # τ = 1
    state = opt.state[p]
    assert state["master"].dtype == torch.float32 and state["tau_val"].dtype == torch.float32
    for _ in range(3):
        p.grad = torch.zeros(64, dtype=torch.bfloat16)
        opt.step()
    assert state["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(state["master"], torch.full((64,), 1 + 3e-4), rtol=0, atol=1e-6)
    assert torch.equal(p.detach(), state["master"].to(torch.bfloat16))  # bf16 alone would not move
    opt2 = OnDARE([p], lr=1e-6, keep_rate=1.0, merge_weight=1e-4)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["master"].dtype == torch.float32  # not cast down to the param dtype


def test_no_closure_grad_scaler_path():
    """What 16-mixed precision does: scaled backward, unscale, then step() without a closure."""
    model, ref = nn.Linear(4, 2), nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    opt = OnDARE(model.parameters(), lr=1e-2, keep_rate=1.0, merge_weight=0.0)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(5):
        x = torch.randn(3, 4)
        for net, o in ((model, opt), (ref, adamw)):
            o.zero_grad()
            loss = net(x).pow(2).sum()
            if o is opt:
                scaler.scale(loss).backward()
                if step == 2:
                    model.weight.grad[0, 0] = float("inf")  # an overflow: the step is skipped
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
            elif step != 2:
                loss.backward()
                o.step()
    assert opt.state[model.weight]["step"] == 4
    torch.testing.assert_close(model.weight, ref.weight, rtol=1e-5, atol=1e-7)


def test_match_names_strips_prefixes_on_either_side():
    base = ["model.layers.0.w", "model.layers.1.w", "lm_head.weight", "model.norm.weight"]
    names = ["policy.model.layers.0.w", "policy.lm_head.weight", "policy.value_head.weight", "norm.weight"]
    assert match_names(names, base).pairs == {
        "policy.model.layers.0.w": "model.layers.0.w",
        "policy.lm_head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
    }
    # a name that several base names end with is ambiguous and left unmatched
    assert match_names(["w"], ["a.w", "b.w"]).pairs == {}
