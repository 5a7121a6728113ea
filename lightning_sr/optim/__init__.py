"""Optimizers: online merging Adam variants OnDARE and OnTIES (plain PyTorch, no Lightning)."""

from lightning_sr.optim.online_merging import BaseMatch, OnDARE, OnlineMergingOptimizer, OnTIES, align_names

__all__ = ["OnDARE", "OnTIES", "OnlineMergingOptimizer", "BaseMatch", "align_names"]
