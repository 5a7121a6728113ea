"""Preference losses (DPO, IPO, KTO) as pure functions of sequence log-probabilities, and those log-probabilities.

The public names are the functions users call. The named tuples they return
(:class:`~lightning_sr.losses.preference.PairLoss`, :class:`~lightning_sr.losses.preference.KTOLoss`)
are importable from :mod:`lightning_sr.losses.preference`.
"""

from lightning_sr.losses.logprobs import sequence_logprobs, token_logprobs
from lightning_sr.losses.preference import dpo_loss, ipo_loss, kto_kl_estimate, kto_loss

__all__ = ["sequence_logprobs", "token_logprobs", "dpo_loss", "ipo_loss", "kto_kl_estimate", "kto_loss"]
