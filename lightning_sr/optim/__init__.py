"""Optimizers: online merging Adam variants OnDARE and OnTIES (plain PyTorch, no Lightning).

:mod:`lightning_sr.optim.online_merging` describes the method and says which module holds which
part; import the public names from here.
"""

from lightning_sr.optim.base import OnlineMergingOptimizer
from lightning_sr.optim.names import NameMatch, match_names
from lightning_sr.optim.ondare import OnDARE
from lightning_sr.optim.onties import OnTIES
from lightning_sr.optim.reference import BaseMatch

__all__ = ["OnDARE", "OnTIES", "OnlineMergingOptimizer", "BaseMatch", "NameMatch", "match_names"]
