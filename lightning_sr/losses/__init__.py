"""Preference losses (DPO, IPO, KTO) as pure functions of sequence log-probabilities."""

from lightning_sr.losses.preference import (
    KTOLoss,
    PairLoss,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
)

__all__ = ["KTOLoss", "PairLoss", "dpo_loss", "ipo_loss", "kto_kl_estimate", "kto_loss"]
