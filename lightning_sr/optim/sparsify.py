"""Sparsification helpers for the online merging optimizers: which coordinates are kept.

A sparsified tensor is stored and applied as (indices, values), so the selections return *flat,
sorted* indices; on an accelerator, where index generation would need host round trips, DARE's
random drop is drawn as a dense mask on the device instead:

- :func:`bernoulli_indices` draws the kept set of DARE's random drop, an i.i.d. Bernoulli(p) mask
  (paper Eq. 3, ``F_R``), on the CPU in O(p·n) work by sampling the gaps between kept positions;
- :func:`bernoulli_mask` draws the same distribution as a dense boolean mask on the generator's
  device, in one kernel and without a host sync (for GPUs);
- :func:`magnitude_indices` / :func:`top_indices` keep the ⌊p·n⌋ largest magnitudes (TIES' top-k
  drop): on the CPU by a sampled threshold, one chunked pass that computes the magnitudes and
  collects candidates, and ``torch.topk`` on the few candidates; on an accelerator by
  ``torch.topk`` (no host sync); never a full sort of the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "MIN_KEEP_RATE",
    "bernoulli_indices",
    "bernoulli_mask",
    "kept_count",
    "magnitude_indices",
    "top_indices",
    "index_dtype",
]

# The smallest keep rate the samplers handle exactly. A geometric gap is at most about 37/p (the
# largest -log(1 - u) of a float64 uniform u), and float64 holds whole numbers exactly only below
# 2**53 ≈ 9e15, so below p ≈ 4e-15 the gaps lose precision and soon overflow int64. At 1e-12 a
# tensor of 10**10 elements keeps 0.01 elements on average: smaller rates are never useful.
MIN_KEEP_RATE = 1e-12


def index_dtype(numel: int) -> torch.dtype:
    """The smallest index dtype torch can index with: int32 below 2**31 elements, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def bernoulli_indices(numel: int, keep_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Flat indices (sorted, int64, CPU) of the ones of an i.i.d. Bernoulli(``keep_rate``) mask.

    Instead of drawing ``numel`` uniforms, draw the gaps between consecutive kept positions: in a
    sequence of independent Bernoulli(p) trials the gap to the next success is Geometric(p),
    sampled by inversion as ``1 + floor(log(1 - u) / log(1 - p))``. The kept set has exactly the
    distribution of a dense ``torch.bernoulli`` mask at about p·n random numbers. Uniforms are
    float64 so that gaps stay exact down to ``MIN_KEEP_RATE``. Deterministic given ``generator``'s
    state (a CPU generator).
    """
    if keep_rate >= 1.0:
        return torch.arange(numel)
    if keep_rate <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.long)
    log_q = math.log1p(-keep_rate)
    expected = numel * keep_rate
    chunk = int(expected + 6.0 * math.sqrt(expected * (1.0 - keep_rate)) + 16)
    pieces, last = [], -1
    while last < numel - 1:
        u = torch.rand(chunk, generator=generator, dtype=torch.float64)
        gaps = torch.floor(torch.log1p(-u) / log_q).to(torch.long) + 1
        positions = gaps.cumsum_(0).add_(last)
        pieces.append(positions)
        last = int(positions[-1])
    indices = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return indices[indices < numel]


def bernoulli_mask(numel: int, keep_rate: float, generator: torch.Generator) -> torch.Tensor:
    """A dense i.i.d. Bernoulli(``keep_rate``) boolean mask on ``generator``'s device.

    One ``bernoulli_`` kernel, no host sync: the GPU form of :func:`bernoulli_indices` (same
    distribution, a different random stream). Deterministic given ``generator``'s state.
    """
    mask = torch.empty(numel, dtype=torch.bool, device=generator.device)
    return mask.bernoulli_(keep_rate, generator=generator)


def kept_count(numel: int, keep_rate: float) -> int | None:
    """⌊keep_rate·numel⌋, the size of TIES' top-k, or ``None`` when nothing is dropped:
    ``keep_rate >= 1`` or ⌊p·n⌋ = 0 (the authors' rule: a top-k that would keep nothing keeps
    everything)."""
    k = int(keep_rate * numel)
    return None if keep_rate >= 1.0 or k < 1 else k


def magnitude_indices(values: torch.Tensor, keep_rate: float) -> torch.Tensor | None:
    """Flat indices (sorted, int64) of the ⌊keep_rate·numel⌋ largest ``|values|``, or ``None``
    when nothing is dropped (see :func:`kept_count`). Never sorts the tensor: see :func:`top_indices`.
    """
    k = kept_count(values.numel(), keep_rate)
    if k is None:
        return None
    flat = values.reshape(-1)
    return top_indices(lambda part: flat[part].abs(), flat.numel(), k, flat.device)


_SAMPLE = 32768  # elements in the strided sample that sets the candidate threshold
_CHUNK = 1 << 18  # elements per chunk of the candidate pass: its temporaries stay in the cache


def top_indices(
    magnitude_at: Callable[[slice], torch.Tensor], numel: int, k: int, device: torch.device
) -> torch.Tensor:
    """Sorted indices of the ``k`` largest of ``numel`` non-negative magnitudes (``k <= numel``).

    ``magnitude_at(part)`` returns the magnitudes at ``part``, a slice of the flat index range:
    computing them where they are needed lets the CPU path fuse their computation with the
    selection, chunk by chunk, instead of writing and re-reading a dense tensor. Exact.

    On an accelerator this is ``torch.topk`` of the dense magnitudes (k is known on the host, so
    nothing waits for the device). On the CPU, for large n and small k, it is much faster than
    ``topk`` (``topk`` of 1% of 25M elements costs ~10 element-wise passes): a strided sample's
    quantile gives a threshold that about 2k entries exceed; one pass over chunks computes the
    magnitudes and collects those candidates (in index order), and ``topk`` runs on the
    candidates only. If the sample misjudged the threshold (fewer than k candidates), it falls
    back to ``topk`` on everything. Tied magnitudes at the k-th value are resolved in an
    implementation-defined order, as with ``topk``.
    """
    if device.type == "cpu" and numel >= 8 * _SAMPLE and 16 * k <= numel:
        sample = magnitude_at(slice(0, numel, numel // _SAMPLE))
        rank = max(1, int(sample.numel() * (1 - 2 * k / numel)))
        threshold = torch.kthvalue(sample, rank).values
        indices, values = [], []
        for start in range(0, numel, _CHUNK):
            part = magnitude_at(slice(start, start + _CHUNK))
            hits = (part >= threshold).nonzero().squeeze(1)
            values.append(part[hits])
            indices.append(hits.add_(start))
        candidates = torch.cat(indices)
        if candidates.numel() >= k:
            chosen = torch.topk(torch.cat(values), k, sorted=False).indices
            keep = torch.zeros(candidates.numel(), dtype=torch.bool)
            keep[chosen] = True
            return candidates[keep]
    return torch.topk(magnitude_at(slice(None)), k, sorted=False).indices.sort().values
