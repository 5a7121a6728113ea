"""Preference losses on sequence log-probabilities: DPO, IPO and KTO.

Pure functions of the policy's and the reference's log-probabilities of whole responses; they know
nothing about models, tokenizers or Lightning, so any training loop can use them. Each returns the
loss *per example* (reduce it yourself, usually with ``.mean()``) and the implicit rewards
``beta * (log pi(y|x) - log r(y|x))``, detached, for logging.

Notation follows docs/DESIGN.md ("Preference losses"): for a pair with chosen ``c`` and rejected ``r`` responses,
``z = (pi_c - pi_r) - (ref_c - ref_r)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLoss(NamedTuple):
    """Per-pair losses and implicit rewards (shape ``(B,)`` each; rewards are detached)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class KTOLoss(NamedTuple):
    """Per-completion losses, implicit rewards (detached) and the KL estimate used (a scalar)."""

    losses: Tensor
    rewards: Tensor
    kl: Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"log-prob tensors must have the same shape, got {shapes}")


def _pair_logits(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    _check_same_shape(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def _rewards(beta: float, policy: Tensor, ref: Tensor) -> Tensor:
    return (beta * (policy - ref)).detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO (Rafailov et al. 2023, Eq. 7) with conservative label smoothing ``eps``.

    ``loss = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)``, where the inputs
    are *summed* response log-probs. ``eps`` is the assumed probability that a label is flipped.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = _pair_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    return PairLoss(
        losses,
        _rewards(beta, policy_chosen_logps, ref_chosen_logps),
        _rewards(beta, policy_rejected_logps, ref_rejected_logps),
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> PairLoss:
    """IPO (Azar et al. 2023, Eq. 17): ``loss = (z - 1 / (2 * beta)) ** 2``.

    The inputs must be *length-averaged* (per-token mean) response log-probs, as in the authors'
    and TRL's implementations; with sums the target margin ``1/(2 beta)`` would depend on length.
    """
    z = _pair_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (z - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(
        losses,
        _rewards(beta, policy_chosen_logps, ref_chosen_logps),
        _rewards(beta, policy_rejected_logps, ref_rejected_logps),
    )


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The KTO reference point: batch mean of ``log pi - log r`` on *mismatched* prompt/completion
    pairs (completion of another example), detached and clamped at 0 (Ethayarajh et al. 2024, §4.1).
    """
    _check_same_shape(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO (Ethayarajh et al. 2024, Eq. 8) on unpaired completions.

    For each completion with log-ratio ``l = log pi(y|x) - log r(y|x)`` (summed log-probs):
    desirable ``w_d * (1 - sigmoid(beta * (l - kl)))``, undesirable
    ``w_u * (1 - sigmoid(beta * (kl - l)))``, with ``kl`` from :func:`kto_kl_estimate`.

    Args:
        policy_logps, ref_logps: ``(N,)`` summed log-probs of each completion.
        desirable: ``(N,)`` bool, whether the completion is desirable.
        policy_kl_logps, ref_kl_logps: ``(M,)`` summed log-probs of mismatched pairs.
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    desirable = desirable.to(torch.bool)
    kl = kto_kl_estimate(policy_kl_logps, ref_kl_logps)
    log_ratio = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio))),
    )
    return KTOLoss(losses, _rewards(beta, policy_logps, ref_logps), kl)
