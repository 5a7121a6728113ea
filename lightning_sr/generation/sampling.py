"""Sampling parameters and next-token sampling (temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How each next token is drawn.

    Args:
        temperature: the logits are divided by this before sampling; 0 is greedy decoding (the
            most likely token, no random draw). At least 0.
        top_k: draw only among the ``top_k`` most likely tokens; 0 disables the filter.
        top_p: nucleus sampling: draw only from the smallest set of most likely tokens whose
            probabilities sum to at least ``top_p`` (within the top-k when both are set). In
            (0, 1]; 1.0 disables the filter.
        max_new_tokens: most tokens a response may generate, the one that ends it included;
            fewer when the generator's context ends first. At least 1.
        stop_token_ids: token ids that end a response in addition to the generator's own EOS
            ids (generation config, model config and tokenizer); the stop token is not part of
            the response.
    """

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = tuple(int(i) for i in self.stop_token_ids)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (rows independent)."""
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of ``logits`` ([rows, vocab]) drawn as ``params`` say.

    With a top-k filter the draw is made among the ``top_k`` candidates only (the same
    distribution as masking the rest of the vocabulary, at a fraction of the cost: a draw over
    the full vocabulary was the largest cost of a decoding step after the model itself). The
    temperature then divides only the ``top_k`` survivors, not a copy of the whole vocabulary:
    dividing by ``T > 0`` keeps the order, so they are the top-k of the scaled logits too, each
    with the same scaled float, and top-p is applied to those scaled values as before; the draws
    for a seed are those of scaling first. One exception: two different float32 logits can
    round to the same value once divided, and where that tie falls inside or at the edge of
    the top-k, the candidates follow the unscaled order.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    if 0 < params.top_k < logits.size(-1):
        values, candidates = torch.topk(logits, params.top_k, dim=-1)  # sorted, best first
        values = values.float() / params.temperature
        if params.top_p < 1.0:
            probs = values.softmax(-1)
            values = values.masked_fill(probs.cumsum(-1) - probs >= params.top_p, float("-inf"))
        return candidates.gather(-1, _draw(values.softmax(-1), generator).unsqueeze(-1)).squeeze(-1)
    return _draw(filter_logits(logits.float() / params.temperature, 0, params.top_p).softmax(dim=-1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row, distributed as ``probs``.

    ``torch.multinomial``'s own method for one sample (an exponential race: the same draws for the
    same generator state), without its validity checks, which read values back to the host and so
    would stall a CUDA decoding loop at every token.
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)
