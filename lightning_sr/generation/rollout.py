"""The rows being decoded: a static KV cache, its attention mask and positions, and row state.

The prompts are prefilled once, each prompt's cache rows written ``n`` times, so a prompt is never
recomputed per sample. Positions are padding-aware (``attention_mask.cumsum(-1) - 1``) so
left-padded rows decode exactly as they would alone. Every buffer (cache, mask, positions,
input ids) is preallocated for the round and written in place; rows are only compacted at a
round's end (:meth:`Rollout.resize`), never per step.

Which rows ended, with which token and at which length, is tracked on the device
(:meth:`Rollout.mark`), so decoding needs no host sync: the engine reads the state back every few
steps (:meth:`Rollout.read_back`). A row that ended meanwhile keeps a slot in the batch until the
next compaction; nothing reads what it computes. On CUDA the decoding forward is replayed from
CUDA graphs, one per round shape and length bucket, with an eager fallback.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch

from lightning_sr.generation.cache import StaticKVCache


@dataclass
class DecodeOptions:
    """How the decoding loop runs, not what it computes.

    Greedy results do not depend on these (bit for bit, CUDA graphs aside). With sampling,
    ``sync_every`` and ``compact_below`` move the points where the batch is compacted, and with
    them which random draws each row gets (one per batch slot): the samples differ, their
    distribution does not.

    Args:
        sync_every: on CUDA, read the rows' state back to the host every this many steps (and at
            every schedule check and round end). On CPU the state is read back every step. On
            both, the steps at which ``compact_below`` is looked at.
        cuda_graphs: replay the decoding forward from CUDA graphs (captured per round shape and
            ``graph_bucket`` of attended columns); falls back to eager decoding with a warning
            when capture fails. Ignored on CPU.
        graph_bucket: columns are attended in multiples of this under a CUDA graph (the unused
            ones masked), so a round needs a new graph only every ``graph_bucket`` tokens.
        compact_below: compact the batch when fewer than this fraction of its rows still decode
            (besides the compaction at every decision point and round end).
        debug_syncs: raise on any host sync between two read-backs
            (``torch.cuda.set_sync_debug_mode("error")``), graph captures excepted. For tests.
    """

    sync_every: int = 8
    cuda_graphs: bool = True
    graph_bucket: int = 256
    compact_below: float = 0.5
    debug_syncs: bool = False

    def __post_init__(self):
        if self.sync_every < 1:
            raise ValueError(f"DecodeOptions.sync_every must be >= 1, got {self.sync_every}")
        if self.graph_bucket < 1:
            raise ValueError(f"DecodeOptions.graph_bucket must be >= 1, got {self.graph_bucket}")
        if not 0.0 <= self.compact_below <= 1.0:
            raise ValueError(f"DecodeOptions.compact_below must be in [0, 1], got {self.compact_below}")


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` since transformers 5.24,
    ``past_key_values`` before (where the old name now warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Rollout:
    """All rows of one generation call, and the batch of those still holding a cache slot.

    Row state (device tensors over every row created by :func:`prefill`, rows ``p*n ...
    p*n+n-1`` for prompt ``p``): ``tokens`` ``[rows, max tokens]``, ``length`` (tokens generated,
    the one that ended the row included), ``live`` (still decoding), ``eos`` (ended by an EOS or
    stop token) and ``limit`` (tokens a row may generate).

    Batch state (one entry per slot of the cache): ``slots`` (the row in each slot),
    ``logits`` ``[slots, vocab]`` (float32), ``attention_mask`` ``[slots, capacity]`` (bool),
    ``positions`` (position id of each slot's last token).
    """

    def __init__(self, model, cache: StaticKVCache, logits, attention_mask, positions, limits, eos_ids, options):
        self.model, self.cache, self.options = model, cache, options or DecodeOptions()
        self.cache_keyword = cache_keyword(model)
        self.device = attention_mask.device
        rows = logits.size(0)
        self.logits = logits
        self.attention_mask = attention_mask
        self.positions = positions
        self.slots = torch.arange(rows, device=self.device)
        self.slot_rows = torch.arange(rows)  # `slots` on the host
        self.limit = limits
        self.tokens = torch.zeros(rows, int(limits.max()), dtype=torch.long, device=self.device)
        self.length = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.live = torch.ones(rows, dtype=torch.bool, device=self.device)
        self.eos = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.eos_ids = torch.as_tensor(list(eos_ids), dtype=torch.long, device=self.device)
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.sampled: torch.Tensor | None = None
        self.graphs = _Graphs() if self.device.type == "cuda" and self.options.cuda_graphs else None

    @property
    def num_slots(self) -> int:
        return self.slot_rows.numel()

    @property
    def sequence_length(self) -> int:
        """Columns of the cache written so far: the padded prompt plus the appended tokens."""
        return self.cache.length

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def mark(self, tokens: torch.Tensor, step: int) -> None:
        """Record each slot's ``step``-th token and which rows it ends (EOS, stop id, length limit).

        On the device only: no host sync. Slots whose row already ended are left as they were. The
        tokens are kept for :meth:`step` (and follow their slots through :meth:`resize`).
        """
        self.sampled = tokens
        rows = self.slots
        live = self.live[rows]
        stop = (tokens.unsqueeze(1) == self.eos_ids).any(1)
        ended = live & (stop | (self.limit[rows] <= step))
        self.tokens[rows, step - 1] = tokens  # past a row's length: never read
        self.length[rows] = torch.where(live, step, self.length[rows])
        self.eos[rows] = self.eos[rows] | (ended & stop)
        self.live[rows] = live & ~ended

    def read_back(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(live, eos, length)`` of every row on the host: the one sync of a read-back."""
        live, eos, length = torch.stack([self.live.long(), self.eos.long(), self.length]).cpu()
        return live.bool(), eos.bool(), length

    def end(self, rows: torch.Tensor) -> None:
        """Stop decoding ``rows`` (rejected, or stopped for lack of memory) without an end token."""
        self.live[rows.to(self.device)] = False

    def step(self, tokens: torch.Tensor | None = None) -> None:
        """Append one token per slot (default: the ones last marked) and compute the next logits,
        from a CUDA graph when possible."""
        if self.cache.length >= self.cache.capacity:
            raise RuntimeError(f"the KV cache is full ({self.cache.capacity} columns): resize it first")
        self.input_ids.copy_((self.sampled if tokens is None else tokens).unsqueeze(1))
        self.attention_mask[:, self.cache.length] = True
        self.positions.add_(1)
        if self.graphs is not None and self.graphs.replay(self):
            self.logits = self.graphs.logits
        else:
            self.cache.visible = self.cache.length + 1
            self.logits = self._forward()
        self.cache.advance()

    def _forward(self) -> torch.Tensor:
        output = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask[:, : self.cache.visible],
            position_ids=self.positions.unsqueeze(1),
            use_cache=True,
            **{self.cache_keyword: self.cache},
        )
        return output.logits[:, -1].float()

    def resize(self, keep: torch.Tensor, capacity: int) -> None:
        """Keep the slots ``keep`` (ascending, on the host) and give the batch ``capacity`` columns."""
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        self.cache.resize(keep, capacity)
        index = keep.to(self.device)
        length = self.cache.length
        mask = torch.zeros(len(keep), capacity, dtype=torch.bool, device=self.device)
        mask[:, :length] = self.attention_mask[index, :length]
        self.attention_mask = mask
        self.logits = self.logits[index]
        if self.sampled is not None:
            self.sampled = self.sampled[index]
        self.positions = self.positions[index]
        self.slots = self.slots[index]
        self.slot_rows = self.slot_rows[keep]
        self.input_ids = torch.zeros(len(keep), 1, dtype=torch.long, device=self.device)
        if self.graphs is not None:
            self.graphs.clear()


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and the matching attention mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def prefill(
    model,
    prompt_ids: list[list[int]],
    n: int,
    pad_id: int = 0,
    *,
    limits: list[int] | None = None,
    capacity: int | None = None,
    arena_tokens: int = 0,
    eos_ids=(),
    dtype: torch.dtype | None = None,
    decode_options: DecodeOptions | None = None,
) -> Rollout:
    """Run every prompt once and write its cache rows ``n`` times (rows ``p*n ... p*n+n-1``).

    Args:
        limits: tokens each prompt's rows may generate (default: until the cache is full).
        capacity: cache columns of the first round (default: the padded prompt plus the largest
            limit minus one, as the last token never enters the cache).
        arena_tokens: token slots to allocate for the cache (see :class:`StaticKVCache`).
        eos_ids: token ids that end a row.
        dtype: of the KV cache (default: the model's).
        decode_options: :class:`DecodeOptions` (CUDA graphs and their bucket).
    """
    device = model.device
    ids, mask = left_pad(prompt_ids, pad_id, device)
    width = ids.size(1)
    if capacity is None:
        capacity = width + (max(limits) - 1 if limits else 0)
    if capacity < width:
        raise ValueError(f"capacity {capacity} is shorter than the padded prompts ({width} tokens)")
    limits = limits or [capacity - width + 1] * len(prompt_ids)
    rows = len(prompt_ids) * n
    cache = StaticKVCache(model.config, rows, capacity, dtype or model.dtype, device, arena_tokens)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with cache.prefill(repeats=n):
        output = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_keyword(model): cache},
            logits_to_keep=1,
        )
    cache.length = width
    cache.write_index.fill_(width)
    attention_mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    attention_mask[:, :width] = mask.bool().repeat_interleave(n, dim=0)
    return Rollout(
        model,
        cache,
        output.logits[:, -1].float().repeat_interleave(n, dim=0),
        attention_mask,
        positions[:, -1].repeat_interleave(n, dim=0),
        torch.tensor(limits, device=device).repeat_interleave(n),
        eos_ids,
        decode_options,
    )


class _Graphs:
    """CUDA graphs of a rollout's decoding forward, one per (slots, capacity, attended columns).

    The forward reads only buffers that keep their address for a round (input ids, positions,
    attention mask, the cache arena and its ``write_index``), so replaying a graph decodes the
    current token. Graphs share one memory pool and are dropped when the batch is compacted.
    """

    def __init__(self):
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.logits: torch.Tensor | None = None
        self.failed = False

    def clear(self) -> None:
        self.graphs.clear()

    def replay(self, rollout: Rollout) -> bool:
        """Decode the current token from a graph; False when graphs are off (eager fallback)."""
        if self.failed:
            return False
        cache = rollout.cache
        bucket = rollout.options.graph_bucket
        visible = min(cache.capacity, -(-(cache.length + 1) // bucket) * bucket)
        key = (rollout.num_slots, cache.capacity, visible)
        if key not in self.graphs:
            cache.visible = visible
            try:
                self.graphs[key] = self._capture(rollout)
            except Exception as error:  # any capture problem: decode eagerly from here on
                self.failed = True
                self.graphs.clear()
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {type(error).__name__}: {error}")
                return False
        graph, self.logits = self.graphs[key]
        cache.visible = visible
        graph.replay()
        return True

    def _capture(self, rollout: Rollout) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = rollout.device
        with _sync_debug_mode("default"):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up: writes the same column the replay will write
                rollout._forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = rollout._forward()
        return graph, logits


@contextlib.contextmanager
def _sync_debug_mode(mode: str):
    """Set ``torch.cuda.set_sync_debug_mode`` inside the block, restoring the previous mode."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
