"""The preference losses equal their formulas on hand-computed inputs."""

import math

import pytest
import torch

from lightning_sr.losses import dpo_loss, ipo_loss, kto_kl_estimate, kto_loss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


PC, PR, RC, RR = [-3.0, -10.0], [-7.0, -4.0], [-5.0, -6.0], [-6.0, -5.0]


def tensors(*lists):
    return [torch.tensor(x, dtype=torch.float64) for x in lists]


def test_dpo_matches_formula_without_and_with_label_smoothing():
    beta = 0.5
    # z = (pc - pr) - (rc - rr): pair 0: 4 - 1 = 3; pair 1: -6 - (-1) = -5
    zs = [3.0, -5.0]
    out = dpo_loss(*tensors(PC, PR, RC, RR), beta=beta)
    assert out.losses.tolist() == pytest.approx([-logsig(beta * z) for z in zs])
    eps = 0.2
    smooth = dpo_loss(*tensors(PC, PR, RC, RR), beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * logsig(beta * z) - eps * logsig(-beta * z) for z in zs]
    assert smooth.losses.tolist() == pytest.approx(expected)
    assert smooth.losses[0] > out.losses[0]  # smoothing penalises over-confident pairs
    assert out.chosen_rewards.tolist() == pytest.approx([beta * 2.0, beta * -4.0])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * -1.0, beta * 1.0])


def test_dpo_rewards_are_detached_and_loss_has_grad():
    pc = torch.tensor(PC, requires_grad=True)
    out = dpo_loss(pc, *tensors(PR, RC, RR), beta=0.1)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
    out.losses.sum().backward()
    # d/dpc of -log sigmoid(beta z) = -beta * sigmoid(-beta z)
    assert pc.grad.tolist() == pytest.approx([-0.1 * sig(-0.3), -0.1 * sig(0.5)], rel=1e-5)


def test_dpo_rejects_bad_label_smoothing_and_shapes():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*tensors(PC, PR, RC, RR), label_smoothing=0.5)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(*tensors(PC, PR, RC, [1.0]))


def test_ipo_matches_formula():
    beta = 0.25
    out = ipo_loss(*tensors(PC, PR, RC, RR), beta=beta)
    assert out.losses.tolist() == pytest.approx([(3.0 - 2.0) ** 2, (-5.0 - 2.0) ** 2])
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])
    with pytest.raises(ValueError, match="same shape"):
        ipo_loss(*tensors(PC, PR, [1.0], RR))


def test_kto_matches_formula_with_weights():
    beta, wd, wu = 0.5, 2.0, 0.75
    policy = torch.tensor([-2.0, -8.0, -4.0], dtype=torch.float64)
    ref = torch.tensor([-3.0, -6.0, -4.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, False])
    # mismatched pairs: log-ratios 0.5 and 1.5 -> kl = 1.0
    pkl, rkl = torch.tensor([-5.0, -6.5]), torch.tensor([-5.5, -8.0])
    out = kto_loss(policy, ref, desirable, pkl, rkl, beta, wd, wu)
    assert out.kl.item() == pytest.approx(1.0)
    ratios = [1.0, -2.0, 0.5]
    expected = [
        wd * (1 - sig(beta * (ratios[0] - 1.0))),
        wu * (1 - sig(beta * (1.0 - ratios[1]))),
        wu * (1 - sig(beta * (1.0 - ratios[2]))),
    ]
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.rewards.tolist() == pytest.approx([beta * r for r in ratios])
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(policy, ref, desirable[:2], pkl, rkl)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(policy, ref, desirable, pkl, rkl[:1])


def test_kto_kl_is_clamped_at_zero_and_detached():
    pkl = torch.tensor([-9.0, -7.0], requires_grad=True)
    rkl = torch.tensor([-5.0, -6.0])
    kl = kto_kl_estimate(pkl, rkl)
    assert kl.item() == 0.0 and not kl.requires_grad
    policy, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    out = kto_loss(policy, ref, torch.tensor([True]), pkl, rkl, beta=1.0)
    # with kl clamped to 0 (the raw mean is -2.5), the loss uses the plain log-ratio
    assert out.losses.item() == pytest.approx(1 - sig(1.0))
