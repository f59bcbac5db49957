"""KV caches: the engine's preallocated ones and the surgery every cache shares.

`StaticKV` (batch 1: the fast engine's target cache, and every drafter's own draft cache) and
`RowsKV` (batch > 1: a length per row) hold keys and values in place, in transformers' Cache
interface so that a model's own attention writes them; the decoders that run over them are
in engine/static_cache.py. `truncate` and `compact` roll back or keep an accepted path in
these or in transformers' DynamicCache (the eager engine's), whose layers hold keys/values
of shape [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch

from transformers.cache_utils import Cache, CacheLayerMixin

from specbench.engine import buckets
from specbench.engine.events import EVENTS


class _Layer(CacheLayerMixin):
    """One layer's view of a StaticKV, in the shape transformers' attention expects."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: StaticKV, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span or self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.capacity


class StaticKV(Cache):
    """A preallocated KV cache for batch 1. `length` counts the valid positions
    (host side); a forward writes its keys/values at the slots in `slots` and
    attention reads the first `span` positions (all `capacity` when None), masked
    by the caller. It is also the own KV cache of drafters that run their own
    attention (EAGLE, DFlash): they write by position (`put`) and read a layer's
    prefix (`layer_kv`), and set `length` themselves once every layer is written."""

    def __init__(self, num_layers: int, capacity: int = buckets.CAPACITY_STEP) -> None:
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])
        self.num_layers = num_layers
        self.capacity = capacity
        self.kv: torch.Tensor | None = None  # [layers, 2, kv_heads, capacity, head_dim]
        self.length = 0
        self.slots: torch.Tensor | None = None  # [q] long: where this forward's keys/values go
        self.span: int | None = None
        self.generation = 0  # bumped when storage is reallocated: graphs captured over it are then stale

    def _allocate(self, heads: int, head_dim: int, like: torch.Tensor) -> None:
        """The storage, on the first write: its shape, dtype and device are those of the first keys."""
        self.kv = torch.zeros(self.num_layers, 2, heads, self.capacity, head_dim, dtype=like.dtype, device=like.device)

    def write(self, index: int, keys: torch.Tensor, values: torch.Tensor):
        """transformers' attention: keys/values [1, kv_heads, q, head_dim] at `slots`; returns the
        layer's first `span` positions [1, kv_heads, span, head_dim]."""
        if self.kv is None:
            _, heads, _, head_dim = keys.shape
            self._allocate(heads, head_dim, keys)
        layer = self.kv[index]
        layer[0].index_copy_(1, self.slots, keys[0])
        layer[1].index_copy_(1, self.slots, values[0])
        span = self.span or self.capacity
        return layer[0, :, :span][None], layer[1, :, :span][None]

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` positions, keeping the valid ones. Reallocates (at least
        doubling, so it stays rare) and bumps `generation`; a StaticDecoder plans the
        capacity between sequences so that this never happens while one runs."""
        if tokens <= self.capacity:
            return
        capacity = buckets.grown_capacity(self.capacity, tokens)
        if self.kv is not None:
            grown = self.kv.new_zeros(*self.kv.shape[:3], capacity, self.kv.shape[-1])
            if self.length:
                grown[..., : self.length, :] = self.kv[..., : self.length, :]
            self.kv = grown
            self.generation += 1
        self.capacity = capacity

    def put(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A drafter's write: keys/values [q, kv_heads, head_dim] (a row per position, as its own
        attention computes them) at positions start..start+q-1, within the reserved capacity.
        `length` is the caller's to advance."""
        if self.kv is None:
            _, heads, head_dim = keys.shape
            self._allocate(heads, head_dim, keys)
        self.kv[layer, 0, :, start : start + keys.shape[0]] = keys.transpose(0, 1)
        self.kv[layer, 1, :, start : start + keys.shape[0]] = values.transpose(0, 1)

    def layer_kv(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A drafter's read: the layer's first `length` positions, (keys, values) [kv_heads, length, head_dim] views."""
        return self.kv[layer, 0, :, :length], self.kv[layer, 1, :, :length]

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` positions (the rest is stale and masked out)."""
        self.length = min(self.length, length)

    def compact(self, base: int, keep: list[int]) -> None:
        """Keep positions base + keep[i] at base + i (ascending keep, keep[i] >= i), for
        every layer in one gather, and set the length to base + len(keep)."""
        if keep != list(range(len(keep))):  # a prefix is already in place
            index = torch.tensor(keep, device=self.kv.device) + base
            self.kv[..., base : base + len(keep), :] = self.kv.index_select(3, index)
        self.length = base + len(keep)


class _RowsLayer(_Layer):
    """One layer's view of a RowsKV."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return min(self.owner.lengths)  # only read when no positions are given (never here)


class RowsKV(Cache):
    """A preallocated KV cache for `rows` sequences, [layers, 2, rows, kv_heads, capacity, head_dim],
    each row with its own valid length (`lengths`, host side). A forward runs over some rows
    (`active`), writes their keys/values at per-row slots ([b, q]) and reads the first `span`
    positions of each; what lies past a row's length is stale and masked by the caller. So a
    row that accepts more never moves, pads or recomputes another row."""

    def __init__(self, num_layers: int, rows: int, capacity: int = buckets.CAPACITY_STEP) -> None:
        super().__init__(layers=[_RowsLayer(self, i) for i in range(num_layers)])
        self.num_layers, self.rows, self.capacity = num_layers, rows, capacity
        self.kv: torch.Tensor | None = None
        self.lengths = [0] * rows
        self.active: torch.Tensor | None = None  # [b] rows of this forward
        self.all_rows = False  # active is every row in order: read a view, not a copy
        self.slots: torch.Tensor | None = None  # [b, q]
        self.span = 0
        self.generation = 0  # bumped when storage is reallocated: graphs captured over it are then stale

    def write(self, index: int, keys: torch.Tensor, values: torch.Tensor):
        if self.kv is None:
            _, heads, _, head_dim = keys.shape
            self.kv = torch.zeros(self.num_layers, 2, self.rows, heads, self.capacity, head_dim, dtype=keys.dtype, device=keys.device)
            self.generation += 1
        layer = self.kv[index]
        rows, slots = self.active[:, None], self.slots
        # advanced indices around a slice: the indexed view is [b, q, heads, head_dim]
        layer[0][rows, :, slots] = keys.transpose(1, 2)
        layer[1][rows, :, slots] = values.transpose(1, 2)
        if self.all_rows:
            return layer[0, :, :, : self.span], layer[1, :, :, : self.span]
        return layer[0, self.active, :, : self.span], layer[1, self.active, :, : self.span]

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` positions in every row, keeping what is there (between sequences: copies)."""
        if tokens <= self.capacity:
            return
        capacity = buckets.grown_capacity(self.capacity, tokens)
        if self.kv is not None:
            grown = self.kv.new_zeros(*self.kv.shape[:4], capacity, self.kv.shape[-1])
            grown[..., : self.capacity, :] = self.kv
            if any(self.lengths):
                EVENTS.regrowths += 1
            self.kv = grown
            self.generation += 1
        self.capacity = capacity

    def compact(self, row: int, base: int, keep: list[int]) -> None:
        """In `row` only: keep positions base + keep[i] at base + i; the row's length becomes base + len(keep)."""
        if keep != list(range(len(keep))):
            index = torch.tensor(keep, device=self.kv.device) + base
            view = self.kv[:, :, row]  # [layers, 2, heads, capacity, head_dim]
            view[..., base : base + len(keep), :] = view.index_select(3, index)
        self.lengths[row] = base + len(keep)



def truncate(cache, length: int) -> None:
    """Drop every cached position from `length` on (roll back to a prefix)."""
    if isinstance(cache, StaticKV):
        return cache.truncate(length)
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


@torch.inference_mode()
def compact(cache, base: int, keep: list[int]) -> None:
    """Keep positions base + keep[i] at base + i and drop the rest after base.

    `keep` is ascending with keep[i] >= i, so gathering into place never reads
    a slot that was already overwritten (the gather is materialised first anyway).
    """
    if isinstance(cache, StaticKV):
        return cache.compact(base, keep)
    if keep != list(range(len(keep))):  # a prefix is already in place
        index = torch.tensor(keep, device=cache.layers[0].keys.device) + base
        for layer in cache.layers:
            layer.keys[..., base : base + len(keep), :] = layer.keys.index_select(-2, index)
            layer.values[..., base : base + len(keep), :] = layer.values.index_select(-2, index)
    truncate(cache, base + len(keep))

