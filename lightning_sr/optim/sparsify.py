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

Every selection is made in the *global* flat index space of a parameter that may be sharded
(:class:`~lightning_sr.optim.shards.FlatShard`), so it keeps the same coordinates for any layout:

- a random drop draws the whole parameter's kept set on every rank (the same stream: same seed,
  same position, same step) and keeps the part in the local slice, at about p·n draws per rank
  and no communication (:func:`shard_bernoulli_indices`, :func:`shard_bernoulli_mask`);
- the top-k of a sharded parameter is the top-k of the whole parameter: the ranks agree on a
  candidate threshold (two small all-reduces), then find the exact k-th largest magnitude by a
  radix select over the candidates' float bits, 8 bits a round (four all-reduces of 256 counts
  for float32), and break ties at the k-th value by the lowest global index (one all-gather of
  two numbers). One process keeps the same set by ``kthvalue`` (the same rule, ties included),
  so one process and any number of shards agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_sr.optim.shards import FlatShard

__all__ = [
    "MIN_KEEP_RATE",
    "bernoulli_indices",
    "bernoulli_mask",
    "kept_count",
    "magnitude_indices",
    "top_indices",
    "index_dtype",
    "shard_bernoulli_indices",
    "shard_bernoulli_mask",
    "TopK",
    "top_indices_of",
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


def shard_bernoulli_indices(
    shard: FlatShard, local_numel: int, keep_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """:func:`bernoulli_indices` of the whole parameter, restricted to the local slice (local indices).

    Every rank draws the same ~p·n kept positions and keeps those in its slice, so the mask is
    the one a single process draws, whatever the layout.
    """
    indices = bernoulli_indices(shard.numel, keep_rate, generator)
    if shard.start == 0 and local_numel == shard.numel:
        return indices
    bounds = torch.tensor([shard.start, shard.start + local_numel])
    low, high = torch.searchsorted(indices, bounds).tolist()
    return indices[low:high] - shard.start


def shard_bernoulli_mask(
    shard: FlatShard, local_numel: int, keep_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """:func:`bernoulli_mask` of the whole parameter, restricted to the local slice (a view).

    The whole mask is drawn on every rank (one kernel over n elements, n transient bytes) so that
    the local part is the one a single process draws.
    """
    return bernoulli_mask(shard.numel, keep_rate, generator)[shard.start : shard.start + local_numel]


def kept_count(numel: int, keep_rate: float) -> int | None:
    """⌊keep_rate·numel⌋, the size of TIES' top-k, or ``None`` when nothing is dropped:
    ``keep_rate >= 1`` or ⌊p·n⌋ = 0 (the authors' rule: a top-k that would keep nothing keeps
    everything)."""
    k = int(keep_rate * numel)
    return None if keep_rate >= 1.0 or k < 1 else k


def magnitude_indices(values: torch.Tensor, keep_rate: float, shard: FlatShard | None = None) -> torch.Tensor | None:
    """Flat indices (sorted, int64) of the ⌊keep_rate·numel⌋ largest ``|values|``, or ``None``
    when nothing is dropped (see :func:`kept_count`). Never sorts the tensor: see :func:`top_indices`.

    ``values`` is the local slice of the parameter that ``shard`` describes (the whole tensor by
    default); the count and the selection are those of the whole parameter, the indices local.
    """
    shard = shard or FlatShard(values.numel())
    k = kept_count(shard.numel, keep_rate)
    if k is None:
        return None
    flat = values.reshape(-1)
    return top_indices(lambda part: flat[part].abs(), flat.numel(), k, flat.device, shard)


_SAMPLE = 32768  # elements in the strided sample that sets the candidate threshold
_CHUNK = 1 << 18  # elements per chunk of the candidate pass: its temporaries stay in the cache


@dataclass
class TopK:
    """One top-k selection: the ``k`` largest magnitudes of a parameter (``k`` counted over the
    whole parameter), whose local elements ``magnitude_at(part)`` gives for a slice ``part`` of
    the ``numel`` local flat indices, placed in the whole parameter by ``shard``."""

    magnitude_at: Callable[[slice], torch.Tensor]
    numel: int
    k: int
    device: torch.device
    shard: FlatShard


def top_indices(
    magnitude_at: Callable[[slice], torch.Tensor],
    numel: int,
    k: int,
    device: torch.device,
    shard: FlatShard | None = None,
) -> torch.Tensor:
    """Sorted local indices of the ``k`` largest non-negative magnitudes of a parameter: one
    :class:`TopK` through :func:`top_indices_of` (see there)."""
    return top_indices_of([TopK(magnitude_at, numel, k, device, shard or FlatShard(numel))])[0]


def top_indices_of(selections: list[TopK]) -> list[torch.Tensor]:
    """Sorted local indices of each selection's top-k. Exact; ties at the k-th magnitude keep
    the lowest global indices.

    Computing the magnitudes where they are needed (``magnitude_at``) lets the CPU path fuse
    their computation with the selection, chunk by chunk, instead of writing and re-reading a
    dense tensor. For large n and small k (the usual keep rates) it is much faster than ``topk``
    on the CPU (``topk`` of 1% of 25M elements costs ~10 element-wise passes): a strided sample's
    quantile gives a threshold that about 2k entries exceed (the lowest of the ranks'
    thresholds), one pass over chunks computes the magnitudes and collects those candidates (in
    index order), and the exact k-th magnitude among the candidates is found by
    :func:`_radix_select`. If the sample misjudged the threshold (fewer than k candidates over all
    ranks), the select runs on everything.

    The selections of sharded parameters run together: each collective carries one entry (or
    one histogram) per selection, so a step of the whole model costs a handful of collectives,
    not a handful per parameter. An unsharded tensor on an accelerator takes ``torch.topk`` of
    the dense magnitudes instead (k is known on the host, so nothing waits for the device; ties
    in an implementation-defined order).
    """
    results: list[torch.Tensor | None] = [None] * len(selections)
    together: dict[int, list[int]] = {}  # by process group: one set of collectives each
    for i, selection in enumerate(selections):
        if selection.device.type != "cpu" and selection.shard.group is None:
            magnitudes = selection.magnitude_at(slice(None))
            results[i] = torch.topk(magnitudes, selection.k, sorted=False).indices.sort().values
        else:
            together.setdefault(id(selection.shard.group), []).append(i)
    for members in together.values():
        for i, indices in zip(members, _select_together([selections[i] for i in members])):
            results[i] = indices
    return results


def _select_together(selections: list[TopK]) -> list[torch.Tensor]:
    """:func:`top_indices_of` for selections on one process group (or none)."""
    shard, device = selections[0].shard, selections[0].device  # the group's collectives
    candidates: list[torch.Tensor | None] = [None] * len(selections)
    values: list[torch.Tensor | None] = [None] * len(selections)
    sampled = [i for i, s in enumerate(selections) if s.shard.numel >= 8 * _SAMPLE and 16 * s.k <= s.shard.numel]
    if sampled:  # the same on every rank: decided on the whole parameters' sizes
        thresholds = torch.tensor([_sampled_threshold(selections[i]) for i in sampled], device=device)
        shard.all_reduce(thresholds, dist.ReduceOp.MIN)
        found = [_candidates(selections[i], threshold) for i, threshold in zip(sampled, thresholds)]
        counts = shard.all_reduce(torch.tensor([c.numel() for c, _ in found], device=device))
        for i, (indices, magnitudes), count in zip(sampled, found, counts.tolist()):
            if count >= selections[i].k:
                candidates[i], values[i] = indices, magnitudes
    for i, selection in enumerate(selections):
        if values[i] is None:
            values[i] = selection.magnitude_at(slice(None))
    if shard.group is None:  # the whole tensors are here: the k-th value directly
        chosen = [_local_select(v, s.k) for v, s in zip(values, selections)]
    else:
        chosen = _radix_select(values, [s.k for s in selections], [s.shard.start for s in selections], shard)
    return [positions if c is None else c[positions] for c, positions in zip(candidates, chosen)]


def _local_select(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` largest ``values``, ties at the k-th value kept lowest
    position first: what :func:`_radix_select` keeps with one shard, by ``kthvalue``."""
    kth = torch.kthvalue(values, values.numel() - k + 1).values
    above = (values > kth).nonzero().squeeze(1)
    tied = (values == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def _sampled_threshold(selection: TopK) -> float:
    """A magnitude that about 2k of the whole parameter's exceed, from a strided local sample
    (+inf for an empty shard)."""
    if not selection.numel:
        return math.inf
    sample = selection.magnitude_at(slice(0, selection.numel, max(1, selection.numel // _SAMPLE)))
    rank = max(1, int(sample.numel() * (1 - 2 * selection.k / selection.shard.numel)))
    return float(torch.kthvalue(sample, rank).values)


def _candidates(selection: TopK, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (in order) and magnitudes of the local entries at or above ``threshold``."""
    indices, values = [], []
    for start in range(0, selection.numel, _CHUNK):
        part = selection.magnitude_at(slice(start, start + _CHUNK))
        hits = (part >= threshold).nonzero().squeeze(1)
        values.append(part[hits])
        indices.append(hits.add_(start))
    if not indices:  # an empty shard: empty magnitudes of the same dtype as every other rank's
        return torch.empty(0, dtype=torch.long, device=selection.device), selection.magnitude_at(slice(0, 0))
    return torch.cat(indices), torch.cat(values)


_BITS_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _radix_select(values: list[torch.Tensor], ks: list[int], starts: list[int], shard: FlatShard) -> list[torch.Tensor]:
    """For each selection, the sorted positions in ``values[i]`` (this rank's magnitudes, in
    global index order; this rank's first one at global index ``starts[i]``) of the ``ks[i]``
    largest magnitudes over all shards; ties at the k-th value keep the lowest global index.

    The bit pattern of a non-negative float orders like its value, so the k-th largest value is
    found a byte at a time from the top: count the candidates' next byte over all ranks (a
    histogram of 256), take the byte where the count from the top reaches k, keep everything
    above it and go on with the candidates that share it. Every round all-reduces the histograms
    of all selections at once.
    """
    count = len(values)
    bits = [v.contiguous().view(_BITS_VIEW[v.element_size()]) for v in values]
    positions = [torch.arange(v.numel(), device=v.device) for v in values]
    kept: list[list[torch.Tensor]] = [[] for _ in range(count)]
    remaining = list(ks)
    for round_ in range(max(v.element_size() for v in values)):
        shifts = [8 * (v.element_size() - 1 - round_) for v in values]
        active = [i for i in range(count) if remaining[i] > 0 and shifts[i] >= 0]  # the same on every rank
        if not active:
            break
        digits = {i: ((bits[i] >> shifts[i]) & 0xFF).long() for i in active}
        histograms = torch.zeros(count, 256, dtype=torch.long, device=values[0].device)
        for i in active:
            histograms[i] = torch.bincount(digits[i], minlength=256)
        shard.all_reduce(histograms)
        counts = histograms.tolist()
        for i in active:
            byte, above = 255, 0  # from the top, the byte where the count reaches what is still needed
            while above + counts[i][byte] < remaining[i]:
                above += counts[i][byte]
                byte -= 1
            kept[i].append(positions[i][digits[i] > byte])
            remaining[i] -= above
            same = digits[i] == byte
            positions[i], bits[i] = positions[i][same], bits[i][same]
    tied = [i for i in range(count) if remaining[i] > 0]  # equal magnitudes at the k-th value
    if tied:
        mine = torch.tensor([[starts[i], positions[i].numel()] for i in tied], device=values[0].device)
        gathered = shard.all_gather(mine)
        for row, i in enumerate(tied):
            before = sum(int(g[row, 1]) for g in gathered if int(g[row, 0]) < starts[i])
            kept[i].append(positions[i][: max(0, min(positions[i].numel(), remaining[i] - before))])
    return [torch.cat(parts).sort().values for parts in kept]
