"""The fast engine's core: a preallocated KV cache and a decoder step over it.

`StaticKV` keeps every layer's keys and values in one tensor
[layers, 2, kv_heads, capacity, head_dim] allocated once per run (it grows,
by doubling, only if a sequence outgrows it). Rolling back is moving a length
pointer; keeping an accepted tree path is one in-place gather over all layers
at once; nothing is concatenated per step.

`StaticDecoder` runs a transformers decoder stack (the model's `get_decoder()`)
over a StaticKV for one "root + tree" forward: a causal chunk (prefill, a draft
model's feed) is the chain-shaped tree. Per tree shape it builds once the
additive mask block and the depth offsets; per step it only fills the mask
row band and adds the context length. With `bucketed`, the query is padded to
a bucket size (1, 2, 4, ..., 128) so that shapes repeat; with `graphs` (CUDA
only) each bucket's forward is captured once as a CUDA graph and replayed,
leaving no host-device sync inside the step.

The CUDA-graph path has not been run on a GPU yet (it was written on a CPU-only
machine); on CPU the same bucketing, masks and cache run without capture and
are tested against the eager engine token for token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from specbench.engine.compat import cache_kwargs
from specbench.engine.tree import DraftTree
from specbench.errors import UserError

GRAPH_MAX_BUCKET = 128  # larger forwards (prefills) run uncaptured at their exact size
SHAPE_CACHE = 512  # tree shapes whose masks are kept; dynamic trees (EAGLE-2) bring a new shape nearly every step
CAPACITY_STEP = 256  # capacities are multiples of this, so regrowth is rare


def bucket_size(q: int) -> int:
    """The padded query length for q tokens: the next power of two up to 128, then multiples of 128."""
    if q > GRAPH_MAX_BUCKET:
        return -(-q // GRAPH_MAX_BUCKET) * GRAPH_MAX_BUCKET
    b = 1
    while b < q:
        b *= 2
    return b


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
    attention reads the first `span` positions (all `capacity` when None, as a
    captured graph needs), masked by the caller."""

    def __init__(self, num_layers: int, capacity: int = CAPACITY_STEP) -> None:
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])
        self.num_layers = num_layers
        self.capacity = capacity
        self.kv: torch.Tensor | None = None  # [layers, 2, kv_heads, capacity, head_dim]
        self.length = 0
        self.slots: torch.Tensor | None = None  # [q] long: where this forward's keys/values go
        self.span: int | None = None
        self.generation = 0  # bumped when storage is reallocated: captured graphs are then stale

    def write(self, index: int, keys: torch.Tensor, values: torch.Tensor):
        if self.kv is None:
            _, heads, _, head_dim = keys.shape
            self.kv = torch.zeros(self.num_layers, 2, heads, self.capacity, head_dim, dtype=keys.dtype, device=keys.device)
        layer = self.kv[index]
        layer[0].index_copy_(1, self.slots, keys[0])
        layer[1].index_copy_(1, self.slots, values[0])
        span = self.span or self.capacity
        return layer[0, :, :span][None], layer[1, :, :span][None]

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` positions, keeping the valid ones (reallocates, so rarely)."""
        if tokens <= self.capacity:
            return
        capacity = max(tokens, 2 * self.capacity)
        capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        if self.kv is not None:
            grown = self.kv.new_zeros(*self.kv.shape[:3], capacity, self.kv.shape[-1])
            grown[..., : self.length, :] = self.kv[..., : self.length, :]
            self.kv = grown
            self.generation += 1
        self.capacity = capacity

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


@dataclass(frozen=True)
class ShapeMasks:
    """What one tree shape needs on the device, built once: the additive mask
    over the bucket's own slots and each row's depth (position offset)."""

    rows: int  # 1 + nodes
    bucket: int
    block: torch.Tensor  # [bucket, bucket] additive: 0 allowed, dtype min elsewhere
    depths: torch.Tensor  # [bucket] long


def shape_masks(parents: tuple[int, ...] | None, rows: int, bucket: int, dtype: torch.dtype, device) -> ShapeMasks:
    """parents=None: a causal chunk of `rows` tokens; else root + the tree with these parents.
    Padding rows (rows..bucket-1) see only themselves, at depth 0."""
    allowed = torch.eye(bucket, dtype=torch.bool)
    depths = torch.zeros(bucket, dtype=torch.long)
    if parents is None:
        allowed[:rows, :rows] = torch.ones(rows, rows, dtype=torch.bool).tril()
        depths[:rows] = torch.arange(rows)
    else:
        tree = DraftTree(torch.tensor(parents, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
        allowed[:rows, :rows] = tree.ancestor_mask()
        depths[1:rows] = torch.tensor(tree.depths, dtype=torch.long)
    block = torch.zeros(bucket, bucket, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ShapeMasks(rows, bucket, block.to(device), depths.to(device))


class _Graph:
    """One bucket's captured forward: static inputs filled before each replay, a static output."""

    def __init__(self, bucket: int, capacity: int, dtype: torch.dtype, device) -> None:
        self.ids = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=device)
        self.slots = torch.zeros(bucket, dtype=torch.long, device=device)
        self.mask = torch.zeros(1, 1, bucket, capacity, dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None
        self.tapped: torch.Tensor | None = None


class StaticDecoder:
    """A decoder stack over its own StaticKV. `forward(ids, parents)` runs root + tree
    (parents=None: a causal chunk) at the current length and returns the final hidden
    states [q, H]; the caller then commits (`cache.compact`) or advances `cache.length`.

    bucketed: pad queries to bucket sizes (needed by graphs; on CPU only to test padding).
    graphs: capture each bucket's forward as a CUDA graph (CUDA only; UNTESTED ON GPU).
    """

    def __init__(self, backbone, device: torch.device, dtype: torch.dtype, bucketed: bool = False, graphs: bool = False) -> None:
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.backbone = backbone
        self.device, self.dtype = device, dtype
        self.cache = StaticKV(backbone.config.num_hidden_layers)
        self.bucketed = bucketed or graphs
        self.graphs = graphs
        self.min = torch.finfo(dtype).min
        self.arange = torch.arange(GRAPH_MAX_BUCKET, device=device)
        self._shapes: OrderedDict[tuple, ShapeMasks] = OrderedDict()  # least recently used first
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    def shape(self, parents: tuple[int, ...] | None, rows: int, bucket: int) -> ShapeMasks:
        key = (parents, rows, bucket)
        found = self._shapes.get(key)
        if found is not None:
            self._shapes.move_to_end(key)
            return found
        found = shape_masks(parents, rows, bucket, self.dtype, self.device)
        if bucket <= GRAPH_MAX_BUCKET:  # keep small shapes only: prefills vary in length
            self._shapes[key] = found
            if len(self._shapes) > SHAPE_CACHE:  # a shape changing every step must not grow this without bound
                self._shapes.popitem(last=False)
        return found

    def forward(self, ids: torch.Tensor, parents: tuple[int, ...] | None = None, tap: int | None = None):
        """ids [q] on the device (root first); parents: the tree's parent tuple, or None for causal.
        Returns the final hidden states [q, H], or with `tap` = j the input of decoder layer j
        as well: (final, tapped). A captured graph's outputs are overwritten by its next replay."""
        q = ids.numel()
        bucket = bucket_size(q) if self.bucketed and q <= GRAPH_MAX_BUCKET else q
        shape = self.shape(parents, q, bucket)
        start = self.cache.length
        self.cache.reserve(start + bucket)
        if self.graphs and bucket <= GRAPH_MAX_BUCKET:
            return self._replay(ids, shape, start, tap)
        if bucket > q:
            ids = torch.cat([ids, ids.new_zeros(bucket - q)])
        span = start + bucket
        mask = torch.full((1, 1, bucket, span), self.min, dtype=self.dtype, device=self.device)
        mask[..., :start] = 0
        mask[0, 0, :, start:] = shape.block
        slots = self.arange[:bucket] + start if bucket <= GRAPH_MAX_BUCKET else torch.arange(start, span, device=self.device)
        self.cache.slots, self.cache.span = slots, span
        hidden, tapped = self._run(ids, shape.depths + start, mask, tap)
        return hidden[:q] if tap is None else (hidden[:q], tapped[:q])

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, tap: int | None = None):
        tapped: list[torch.Tensor] = []
        hook = None
        if tap is not None:  # the hidden state entering layer `tap` (its first positional argument)
            hook = self.backbone.layers[tap].register_forward_pre_hook(lambda module, args: tapped.append(args[0]))
        try:
            out = self.backbone(
                input_ids=ids[None], position_ids=positions[None], attention_mask=mask, use_cache=True, **cache_kwargs(self.backbone, self.cache)
            )
        finally:
            if hook is not None:
                hook.remove()
        return out.last_hidden_state[0], (tapped[0][0] if tapped else None)

    # --- CUDA graphs (written without a GPU at hand: untested on GPU) ----------

    def _replay(self, ids: torch.Tensor, shape: ShapeMasks, start: int, tap: int | None):
        key = (shape.bucket, self.cache.generation, tap)
        graph = self._graphs.get(key)
        fresh = graph is None
        if fresh:
            for stale in [k for k in self._graphs if k[1] != self.cache.generation]:
                del self._graphs[stale]  # captured over storage that was reallocated
            graph = self._graphs[key] = _Graph(shape.bucket, self.cache.capacity, self.dtype, self.device)
        q = ids.numel()
        graph.ids.zero_()
        graph.ids[:q].copy_(ids)
        torch.add(shape.depths, start, out=graph.positions)
        torch.add(self.arange[: shape.bucket], start, out=graph.slots)
        graph.mask.fill_(self.min)
        graph.mask[..., :start] = 0
        graph.mask[0, 0, :, start : start + shape.bucket] = shape.block
        if fresh:
            try:
                self._capture(graph, tap)
            except RuntimeError as exc:
                del self._graphs[key]
                raise UserError(f"CUDA graph capture failed ({exc}); rerun with --engine eager") from exc
        graph.graph.replay()
        return graph.hidden[:q] if tap is None else (graph.hidden[:q], graph.tapped[:q])

    def _capture(self, graph: _Graph, tap: int | None) -> None:
        self.cache.slots, self.cache.span = graph.slots, None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up off the capture (lazy inits, autotuning)
            for _ in range(2):
                self._run(graph.ids, graph.positions, graph.mask, tap)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph, pool=self._pool):
            graph.hidden, graph.tapped = self._run(graph.ids, graph.positions, graph.mask, tap)
