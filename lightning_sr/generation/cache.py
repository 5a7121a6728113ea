"""A preallocated KV cache, written in place, that transformers causal LMs accept as their cache.

Every row of the batch shares one column layout (left padding), so decoding a token writes one
column for all rows at once: ``keys[:, :, t] = k``. Nothing is concatenated or re-gathered per
step, unlike ``DynamicCache`` which copies the whole cache with ``torch.cat`` at every token.

The keys and values of all layers are views of one flat *arena*, laid out as
``[layers, 2, rows, kv_heads, capacity, head_dim]`` for the rows and capacity of the current
round (the authors of the paper allocate ``[layers, rows, cur_len + gen_len, kv_heads,
head_dim]`` per round). Between two decision points the shape is fixed; at a decision the
survivors are moved within the same arena into the next round's shape (:meth:`resize`), so an
arena sized to a memory budget is allocated once and never exceeded (a move stages one layer's
keys or values of the survivors in a scratch tensor). Each layer's block stays contiguous, which
is what attention kernels read best.

The model sees an ordinary ``transformers.Cache``: ``update`` writes the new column at
``write_index`` (a device tensor, so the step can be replayed from a CUDA graph) and returns the
first ``visible`` columns; the query offset is that same device tensor; ``is_compileable`` is
true so the mask code never reads device values back. Sliding-window layers are stored in full
and the model's own sliding-window mask restricts what they attend to. Models with other layer
kinds (linear attention, chunked attention, shared KV) are refused with a clear error.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lightning_sr.generation.memory import kv_shape


class _ArenaLayer(CacheLayerMixin):
    """One layer's view of the arena; all bookkeeping lives in the owning :class:`StaticKVCache`."""

    is_compileable = True
    is_sliding = False  # the full history is kept; the model's mask applies the window
    supports_early_init = False

    def __init__(self, cache: "StaticKVCache"):
        super().__init__()
        # A weak reference: a cycle would keep the arena allocated until the garbage collector
        # runs, after the call returned (and, on CUDA, out of the next call's free memory).
        self.cache = weakref.proxy(cache)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the arena is allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache._write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache._mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return self.cache.capacity


class StaticKVCache(Cache):
    """Keys and values of ``rows`` sequences of up to ``capacity`` columns, in one arena.

    Args:
        config: the generator's config (layers, KV heads and head size are read from it).
        rows, capacity: the first round's shape.
        dtype, device: of the keys and values.
        arena_tokens: token slots (rows x columns) to allocate; at least ``rows x capacity``.
            Later rounds reuse the arena while they fit in it.

    Attributes:
        length: columns written so far (the padded prompt plus the appended tokens).
        visible: columns the attention reads at the next decoding step (``length + 1`` when
            decoding eagerly, a fixed bucket under a CUDA graph).
        write_index: ``[1]`` device tensor, the column the next decoding step writes.
    """

    def __init__(self, config, rows: int, capacity: int, dtype: torch.dtype, device, arena_tokens: int = 0):
        layers, self.kv_heads, self.head_dim = kv_shape(config)
        super().__init__(layers=[_ArenaLayer(self) for _ in range(layers)])
        self.dtype, self.device = dtype, torch.device(device)
        tokens = max(int(arena_tokens), rows * capacity)
        # Zeros, not empty: columns beyond the written ones are masked, but a NaN bit pattern there
        # would still turn the masked attention weights' 0 x NaN into NaN.
        self.arena = torch.zeros(tokens * self._token_elements, dtype=dtype, device=self.device)
        self.rows, self.capacity, self.length, self.visible = rows, capacity, 0, 0
        self.write_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self._prefill_repeats: int | None = None
        self._layout()

    @property
    def _token_elements(self) -> int:
        return 2 * len(self.layers) * self.kv_heads * self.head_dim

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the arena: what the cache holds on the device, whatever the rows use of it."""
        return self.arena.numel() * self.arena.element_size()

    def _blocks(self, rows: int, capacity: int) -> torch.Tensor:
        """The arena as ``[layers x 2, rows, kv_heads, capacity, head_dim]`` (its first part)."""
        size = len(self.layers) * 2 * rows * self.kv_heads * capacity * self.head_dim
        return self.arena[:size].view(len(self.layers) * 2, rows, self.kv_heads, capacity, self.head_dim)

    def _layout(self) -> None:
        blocks = self._blocks(self.rows, self.capacity)
        for index, layer in enumerate(self.layers):
            layer.keys, layer.values = blocks[2 * index], blocks[2 * index + 1]

    # ------------------------------------------------------------------ what the model calls

    def _write(self, layer: _ArenaLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        if self._prefill_repeats is not None:
            # Prefill of one row per prompt: write each prompt's keys into its `repeats` rows and
            # attend to the fresh states themselves.
            prompts, heads, width, dim = key_states.shape
            if (heads, dim) != (self.kv_heads, self.head_dim):
                raise NotImplementedError(
                    f"the model's keys have {heads} heads of size {dim}, but its config says "
                    f"{self.kv_heads} x {self.head_dim}: the engine's cache cannot hold them"
                )
            shape = (prompts, self._prefill_repeats, heads, self.capacity, dim)
            layer.keys.view(shape)[..., :width, :] = key_states.unsqueeze(1)
            layer.values.view(shape)[..., :width, :] = value_states.unsqueeze(1)
            return key_states, value_states
        layer.keys.index_copy_(2, self.write_index, key_states)
        layer.values.index_copy_(2, self.write_index, value_states)
        return layer.keys[:, :, : self.visible], layer.values[:, :, : self.visible]

    def _mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._prefill_repeats is not None:
            return query_length, 0
        return self.visible, 0

    def get_query_offset(self, layer_idx: int = 0):
        """Column of the first query token: a device tensor, so a replayed graph reads its value."""
        return 0 if self._prefill_repeats is not None else self.write_index[0]

    # ------------------------------------------------------------------ what the engine calls

    def prefill(self, repeats: int):
        """Context for the prefill forward of one row per prompt, each written into ``repeats`` rows."""
        return _Prefill(self, repeats)

    def advance(self) -> None:
        """Account for the column the last decoding step wrote."""
        self.length += 1
        self.write_index.add_(1)

    def resize(self, keep: torch.Tensor, capacity: int) -> None:
        """Keep the rows ``keep`` (ascending indices) and give them ``capacity`` columns.

        The written columns move within the arena when the new shape fits in it, block by block in
        an order that never overwrites a block not yet moved (ascending when blocks shrink,
        descending when they grow); only one block's survivors are staged in a scratch copy.
        Otherwise a larger arena is allocated (only without a memory budget, which sizes the
        arena once).
        """
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} cannot hold the {self.length} columns already written")
        rows = int(keep.numel())
        if (rows, capacity) == (self.rows, self.capacity) and torch.equal(keep, torch.arange(rows)):
            return
        keep = keep.to(self.device)
        old = self._blocks(self.rows, self.capacity)[:, :, :, : self.length]
        if rows * capacity * self._token_elements > self.arena.numel():
            arena = torch.zeros(rows * capacity * self._token_elements, dtype=self.dtype, device=self.device)
            blocks = arena.view(old.size(0), rows, self.kv_heads, capacity, self.head_dim)
            for block in range(old.size(0)):
                blocks[block, :, :, : self.length] = old[block].index_select(0, keep)
            self.arena = arena
        else:
            new = self._blocks(rows, capacity)[:, :, :, : self.length]
            blocks = range(old.size(0))
            for block in blocks if rows * capacity <= self.rows * self.capacity else reversed(blocks):
                new[block].copy_(old[block].index_select(0, keep))
        self.rows, self.capacity = rows, capacity
        self._layout()


class _Prefill:
    def __init__(self, cache: StaticKVCache, repeats: int):
        self.cache, self.repeats = cache, repeats

    def __enter__(self):
        self.cache._prefill_repeats = self.repeats
        return self.cache

    def __exit__(self, *exc):
        self.cache._prefill_repeats = None
