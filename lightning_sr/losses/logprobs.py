"""Response log-probabilities of a causal LM on padded prompt+response batches.

``loss_mask`` marks the response tokens (1) against prompt tokens and padding (0); only those
tokens' log-probs are summed, or averaged when ``average=True`` (IPO). Position ids are derived
from the attention mask, so left- and right-padded batches give the same numbers as unpadded rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, L-1)`` log-prob of each token ``input_ids[:, 1:]`` given its prefix, in fp32."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits[:, :-1]
    logits = logits.float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return (logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1))


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    average: bool = False,
) -> Tensor:
    """``(B,)`` summed (or per-token mean) log-probs of the tokens where ``loss_mask`` is 1.

    ``loss_mask[:, 0]`` is ignored: the first token has no prefix to predict it from.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    if (mask.sum(-1) == 0).any():
        rows = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response tokens to score")
    logps = (token_logprobs(model, input_ids, attention_mask) * mask).sum(-1)
    return logps / mask.sum(-1) if average else logps
