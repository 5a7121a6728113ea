"""Batched decoding state over a transformers ``DynamicCache`` whose rows can be dropped.

The prompts are prefilled once, then each prompt's cache rows are repeated ``n`` times so the
prompt is never recomputed per sample. Positions are padding-aware
(``attention_mask.cumsum(-1) - 1``) so left-padded rows decode exactly as they would alone, and
dropping rows prunes ids, mask, positions and cache together (``batch_select_indices``), never by
re-prefilling.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lightning_sr.generation.memory import cache_bytes


class Rollout:
    """The live rows of one batched generation.

    Attributes:
        logits: next-token logits of every live row, ``[rows, vocab]`` (float32).
        attention_mask: ``[rows, cache length]``; zeros mark left padding.
        positions: position id of each row's last token, ``[rows]``.
        row_ids: for each live row, its index in the rows created by :func:`prefill`.
    """

    def __init__(self, model, cache: DynamicCache, logits, attention_mask, positions, row_ids):
        self.model = model
        self.cache = cache
        self.logits = logits
        self.attention_mask = attention_mask
        self.positions = positions
        self.row_ids = row_ids

    @property
    def num_rows(self) -> int:
        return self.attention_mask.size(0)

    @property
    def sequence_length(self) -> int:
        return self.attention_mask.size(1)

    @property
    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)

    def step(self, tokens: torch.Tensor) -> None:
        """Append one token per live row and compute the next logits."""
        ones = self.attention_mask.new_ones(self.num_rows, 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.positions = self.positions + 1
        output = self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=self.attention_mask,
            position_ids=self.positions.unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.logits = output.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the live rows, in order); drop the rest everywhere."""
        rows = rows.to(self.attention_mask.device)
        if rows.numel() == self.num_rows:
            return
        if rows.numel() == 0:
            self.cache = None
        else:
            self.cache.batch_select_indices(rows)
        self.logits = self.logits[rows]
        self.attention_mask = self.attention_mask[rows]
        self.positions = self.positions[rows]
        self.row_ids = self.row_ids[rows]


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and the matching attention mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def prefill(model, prompt_ids: list[list[int]], n: int, pad_id: int = 0) -> Rollout:
    """Run every prompt once and repeat its cache rows ``n`` times (rows ``p*n ... p*n+n-1``)."""
    device = model.device
    ids, mask = left_pad(prompt_ids, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = output.logits[:, -1].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
    return Rollout(
        model,
        cache,
        logits.repeat_interleave(n, dim=0),
        mask.repeat_interleave(n, dim=0),
        positions[:, -1].repeat_interleave(n, dim=0),
        torch.arange(len(prompt_ids) * n, device=device),
    )
