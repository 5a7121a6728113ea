"""Reward models: the protocol the engine scores with, plain functions, and HF classifiers."""

from lightning_sr.rewards.base import FunctionReward, RewardModel
from lightning_sr.rewards.hf import HFRewardModel

__all__ = ["RewardModel", "FunctionReward", "HFRewardModel"]
