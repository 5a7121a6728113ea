"""The reward-model protocol the engine scores with, and a wrapper for plain functions."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RewardModel(Protocol):
    """Anything that scores (prompt, response) pairs: one float per pair, higher is better.

    ``prompts`` are the original prompts (strings or chat message lists); ``responses`` are the
    generated texts, partial or complete: a partial response is scored as if it were a complete
    assistant turn. An implementation may set ``last_token_counts`` (one int per pair) after each
    call so the engine can report how many reward-model tokens were spent.
    """

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor: ...


class FunctionReward:
    """A reward from a plain Python function ``fn(prompt, response) -> float``.

    With ``batched=True`` the function receives the two lists and returns a sequence of floats.
    """

    def __init__(self, fn: Callable, batched: bool = False):
        self.fn = fn
        self.batched = batched

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        if self.batched:
            values = self.fn(list(prompts), list(responses))
        else:
            values = [self.fn(prompt, response) for prompt, response in zip(prompts, responses)]
        return torch.as_tensor(values, dtype=torch.float32).reshape(-1)

    def __repr__(self) -> str:
        return f"FunctionReward({getattr(self.fn, '__name__', self.fn)!r})"


def checked_scores(reward: RewardModel, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """Call ``reward.score`` and check it returned one number per pair."""
    scores = reward.score(prompts, responses)
    scores = torch.as_tensor(scores).detach().float().reshape(-1).cpu()
    if scores.numel() != len(responses):
        raise ValueError(
            f"{type(reward).__name__}.score returned {scores.numel()} scores for {len(responses)} "
            "(prompt, response) pairs: it must return exactly one score per pair"
        )
    return scores.tolist()
