"""Which rows survive a decision point: the rejection step of the paper's Algorithm 1.

Sun et al. (NeurIPS 2024, arXiv 2410.20290) score every partial response and reject those below
the ``alpha``-quantile of the scores. Here the quantile is taken within each prompt's *pool* and
written as a top-k: the best ``max(1, ceil((1 - alpha) x pool size))`` rows survive. A prompt's
pool holds its live rows (scored as partial responses) and its ended rows not yet ranked out
(scored as final responses), so a row that already ended keeps competing for a slot.
"""

from __future__ import annotations

import math

import torch


def keep_count(group_size: int, alpha: float) -> int:
    """Rows a pool keeps at a decision point: ``max(1, ceil((1 - alpha) x group size))``."""
    return max(1, math.ceil((1.0 - alpha) * group_size - 1e-9))


def _keep_counts(sizes: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`keep_count` of every entry of ``sizes`` (float64, as Python computes it)."""
    return torch.ceil((1.0 - alpha) * sizes.double() - 1e-9).long().clamp(min=1)


def select_survivors(
    scores: torch.Tensor,
    groups: torch.Tensor,
    final: torch.Tensor,
    alpha: float,
    max_live: int | None = None,
) -> torch.Tensor:
    """The rows that survive one decision point, as a boolean mask over the pool rows.

    Args:
        scores: ``[rows]`` score of each pool row; NaN ranks last.
        groups: ``[rows]`` prompt of each row; rows are ranked within their prompt's pool.
        final: ``[rows]`` whether a row's score is final (it ended); such rows take survivor
            slots like the others but need no room in the KV cache.
        alpha: fraction rejected, in [0, 1).
        max_live: at most this many non-final rows may survive (the rows that still fit in the
            memory budget). While more survive, the cut is applied again to the survivors, with
            the same ranking, until they fit or no pool can shrink any further; the caller
            checks the result against ``max_live``.

    Returns:
        ``[rows]`` bool, true for the survivors. Within a pool rows rank by score, descending,
        ties going to the earlier row; every pool keeps at least one row.
    """
    rows = scores.numel()
    if rows == 0:
        return torch.zeros(0, dtype=torch.bool)
    scores, groups, final = scores.float().cpu(), groups.long().cpu(), final.bool().cpu()
    key = torch.where(torch.isnan(scores), torch.tensor(-math.inf), scores)
    order = torch.argsort(-key, stable=True)  # best first, earlier row first among equals
    order = order[torch.argsort(groups[order], stable=True)]  # then grouped, order kept inside
    _, sizes = torch.unique_consecutive(groups[order], return_counts=True)
    starts = (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)
    rank = torch.empty(rows, dtype=torch.long)
    rank[order] = torch.arange(rows) - starts
    pool_size = torch.empty(rows, dtype=torch.long)
    pool_size[order] = sizes.repeat_interleave(sizes)

    kept = _keep_counts(pool_size, alpha)
    while True:
        survivors = rank < kept
        if max_live is None or int((survivors & ~final).sum()) <= max_live:
            return survivors
        fewer = _keep_counts(kept, alpha)
        if torch.equal(fewer, kept):  # every pool is at its floor: the caller must stop rows
            return survivors
        kept = fewer
