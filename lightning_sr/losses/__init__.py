"""Preference losses (DPO, IPO, KTO) as pure functions of sequence log-probabilities, and those log-probabilities."""

from lightning_sr.losses.logprobs import sequence_logprobs, token_logprobs
from lightning_sr.losses.preference import (
    KTOLoss,
    PairLoss,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
)

__all__ = ["sequence_logprobs", "token_logprobs", "KTOLoss", "PairLoss", "dpo_loss", "ipo_loss", "kto_kl_estimate", "kto_loss"]
