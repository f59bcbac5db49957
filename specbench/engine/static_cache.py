"""The fast engine's core: decoder steps over a preallocated KV cache.

The caches are engine/kv.py's: `StaticKV` keeps every layer's keys and values in one tensor
[layers, 2, kv_heads, capacity, head_dim]. Its capacity is planned at the start
of a sequence for the most positions the sequence can reach (`StaticDecoder.plan`),
so it never grows while a sequence runs; it is reused across sequences and grows
only between them. Rolling back is moving a length pointer; keeping an accepted
tree path is one in-place gather over all layers at once. `RowsKV` is the same with a
length per row, for `RowsDecoder` (batch > 1).

`StaticDecoder` runs a transformers decoder stack (the model's `get_decoder()`)
and an LM head over a StaticKV for one "root + tree" forward: a causal chunk (a
prefill, a draft model's feed) is the chain-shaped tree. A sequence's first
forward (at length 0: a prefill) runs at its exact size. Later forwards, with
`bucketed`, run as a *step*: the query padded to a bucket (engine/buckets.py) and
attention reading a *span* of the cache, through static input buffers (ids,
positions, slots, mask) kept per (bucket, span, taps). Per step only the mask band
that changed is rewritten: the positions that became visible since the buffer's
last use and the tree block at its new place. A step then runs one of three ways:
- captured once as a CUDA graph and replayed (`graphs`, engine/cuda_graphs.py),
  leaving no host-device sync inside;
- compiled (`compiler`, engine/compiled_step.py: torch.compile's CPU backend),
  every step at one span, the whole capacity, so that a handful of compilations
  serve every step;
- as it is: on a CPU (with the linear weights prepacked, engine/packed.py), and to test the
  bucketing against the eager engine.
Captures and compilations happen in `warm_up`, before anything is timed; with a
measured latency per bucket (`measure_profile`) a forward is padded to the
cheapest bucket that holds it, not merely the next one.

Bounds: per taps tuple there are at most len(buckets) x MAX_SPANS graphs (8 x 16 =
128 for trees up to 127 nodes); they share one private memory pool. Graphs read
the KV storage by address, so when the storage is reallocated (growth between
sequences) the graphs and their pool are dropped together (`GraphSet`) and the
next capture gets a fresh pool: a pool whose graphs were all released is freed
by the CUDA allocator, and capturing into it again fails.

On CPU the bucketing, spans, band updates and step functions are tested against
the eager engine token for token; the capture and replay bookkeeping is tested
with a fake graph backend that recomputes a step from its static buffers on every
replay (tests/test_fast_engine.py), the compiled step in tests/test_cpu_engine.py.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from specbench.engine.buckets import (GRAPH_MAX_BUCKET, MAX_BUCKET_PADDING, all_spans, bucket_size, buckets_up_to, cheapest_bucket,
                                      span_for)
from specbench.engine.compat import cache_kwargs
from specbench.engine.cuda_graphs import CapturingDecoder
from specbench.engine.events import EVENTS
from specbench.engine.kv import RowsKV, StaticKV
from specbench.engine.lean_layer import LeanStack
from specbench.engine.protocol import Taps
from specbench.engine.tapped import is_final, tapped_forward, tapped_rows
from specbench.engine.tree import DraftTree

SHAPE_CACHE = 512  # tree shapes whose masks are kept; dynamic trees (EAGLE-2) bring a new shape nearly every step
PROFILE_REPS = 5  # repetitions per bucket when measuring the latency profile


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


class _Step:
    """One (bucket, span, taps) forward: static inputs the caller fills, and the outputs
    of the captured graph (None when not captured)."""

    def __init__(self, bucket: int, span: int, taps: Taps, dtype: torch.dtype, device) -> None:
        self.bucket, self.span, self.taps = bucket, span, taps
        self.ids = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=device)
        self.slots = torch.arange(bucket, dtype=torch.long, device=device)
        self.mask = torch.full((1, 1, bucket, span), torch.finfo(dtype).min, dtype=dtype, device=device)
        # the mask holds 0 before mask_start, a tree block at [mask_start, mask_start + bucket), min after
        self.mask_start = 0
        self.graph = None
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None


class StaticDecoder(CapturingDecoder):
    """A decoder stack and its LM head over their own StaticKV. `forward(ids, parents, taps)`
    runs root + tree (parents=None: a causal chunk) at the current length and returns
    (logits [q, V] fp32, tapped hidden states [q, H * len(taps)] or None); the caller then
    commits (`cache.compact`) or advances `cache.length`.

    head: the LM head (None: logits are not computed, forward returns (None, hidden)).
    bucketed: pad steps to bucket sizes and read spans (needed by graphs and compiled steps).
    exact_rows: with bucketed, steps run at their own row count, not padded: where every row is
    computed alone (the bf16 kernels: a row's result does not depend on the others), padding
    only adds work (a 5-row verify padded to 8 costs 8 rows' arithmetic).
    graphs: True for CUDA graphs, or a backend object (tests pass a fake one), or None/False.
    compiler: a CompiledStep (engine/compiled_step.py) that compiles the step function, or its
    FrozenCompiler (engine/frozen_step.py) that compiles the whole step with frozen weights, or None.
    """

    fallback = "the fast engine runs uncaptured (static KV cache, no graphs)"

    def __init__(self, backbone, head, device: torch.device, dtype: torch.dtype, bucketed: bool = False, graphs=None,
                 compiler=None, exact_rows: bool = False) -> None:
        self._use_graphs(graphs, device)
        self.exact_rows = exact_rows and self.graphs is None and compiler is None  # graphs and compilations are per bucket
        self.backbone, self.head = backbone, head
        self.device, self.dtype = device, dtype
        self.cache = StaticKV(backbone.config.num_hidden_layers)
        self.compiler = compiler
        self.bucketed = bucketed or self.graphs is not None or compiler is not None
        self.min = torch.finfo(dtype).min
        self.arange = torch.arange(GRAPH_MAX_BUCKET, device=device)
        self._shapes: OrderedDict[tuple, ShapeMasks] = OrderedDict()  # least recently used first
        self._cache_kwargs = cache_kwargs(backbone, self.cache)  # once: a compiled step should not trace the lookup
        self._compute = compiler.wrap(self._compute_step, self) if compiler is not None else self._compute_step
        self.profile: dict[int, float] | None = None  # measured ms per bucket (measure_profile)
        # a lean stack on the bf16 kernels runs its layers in one call (not captured, not compiled)
        self.lean_stack = LeanStack.make(backbone) if self.graphs is None and compiler is None else None

    # --- capacity ---------------------------------------------------------------

    def plan(self, positions: int) -> None:
        """Size the cache for a sequence that reaches `positions` positions (prompt + output +
        the largest verify), bucket padding included. Call between sequences: growing then
        copies nothing and drops the graphs and their pool together."""
        self._reserve(positions + (MAX_BUCKET_PADDING if self.bucketed else 0))
        self._drop_stale()

    def _reserve(self, tokens: int) -> None:
        """Grow the cache to hold `tokens` positions. Growing while a sequence runs copies its prefix:
        an engine event a benchmark counts. (The decoder counts it, not StaticKV: drafters' own caches
        grow with their context by design, and are not planned.)"""
        cache = self.cache
        if tokens > cache.capacity and cache.kv is not None and cache.length:
            EVENTS.regrowths += 1
        cache.reserve(tokens)

    def _drop_stale(self) -> None:
        if self.graph_set.generation != self.cache.generation:
            self.graph_set.release_all(self.cache.generation)

    def span(self, end: int) -> int:
        """The cache positions a step ending at `end` reads. A compiled step reads the whole
        capacity: every span would be another compilation, and on a CPU attention over a few
        hundred more masked positions costs far less than the weights a forward reads."""
        return self.cache.capacity if self.compiler is not None else span_for(end, self.cache.capacity)

    def bucket_for(self, q: int) -> int:
        return q if self.exact_rows else cheapest_bucket(q, self.profile)

    # --- the forward ------------------------------------------------------------

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

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, parents: tuple[int, ...] | None = None, taps: Taps = ()):
        """ids [q] on the device (root first); parents: the tree's parent tuple, or None for causal.
        Returns (logits [q, V] fp32, hidden [q, H * len(taps)] or None), fresh tensors."""
        q = ids.numel()
        start = self.cache.length
        stepped = self.bucketed and start > 0 and q <= GRAPH_MAX_BUCKET
        bucket = self.bucket_for(q) if stepped else q
        if start + bucket > self.cache.capacity:  # unplanned: grows mid-sequence (copies; counted)
            self._reserve(start + bucket)
        self._drop_stale()
        shape = self.shape(parents, q, bucket)
        if not stepped:
            return self._exact(ids, shape, start, taps)
        step = self._step(bucket, self.span(start + bucket), taps)
        self._fill(step, ids, shape, start)
        if self.graphs is None:
            logits, hidden = self._uncaptured(step)
            return logits[:q] if logits is not None else None, (hidden[:q] if hidden is not None else None)
        if step.graph is None and not self._capture(step):  # failed: uncaptured from here on
            logits, hidden = self._uncaptured(step)
            return logits[:q] if logits is not None else None, (hidden[:q] if hidden is not None else None)
        self.graphs.replay(step.graph)
        logits, hidden = step.outputs
        # the static outputs are overwritten by the next replay: hand out copies
        return (logits[:q].clone() if logits is not None else None), (hidden[:q].clone() if hidden is not None else None)

    def _uncaptured(self, step: _Step):
        if self.compiler is not None:
            return self.compiler.run(self._compute, step)
        return self._compute(step)

    def _exact(self, ids: torch.Tensor, shape: ShapeMasks, start: int, taps: Taps):
        """A forward at its exact size, uncaptured and not compiled (prefills; forwards over GRAPH_MAX_BUCKET)."""
        q = ids.numel()
        span = start + q
        mask = torch.full((1, 1, q, span), self.min, dtype=self.dtype, device=self.device)
        mask[..., :start] = 0
        mask[0, 0, :, start:] = shape.block
        slots = torch.arange(start, span, device=self.device)
        return self._run(ids, shape.depths + start, slots, span, mask, taps)

    def _step(self, bucket: int, span: int, taps: Taps) -> _Step:
        key = (bucket, span, taps)
        step = self.graph_set.steps.get(key)
        if step is None:
            step = self.graph_set.steps[key] = _Step(bucket, span, taps, self.dtype, self.device)
        return step

    def _fill(self, step: _Step, ids: torch.Tensor, shape: ShapeMasks, start: int) -> None:
        """Write this forward into the step's static inputs. Padding rows keep whatever ids
        they held (any token works: they see only the context and themselves). Only the
        mask band between the old and the new tree block changes: [0, start) is visible,
        the block sits at [start, start + bucket), everything after is masked."""
        step.ids[: ids.numel()].copy_(ids)
        torch.add(shape.depths, start, out=step.positions)
        torch.add(self.arange[: step.bucket], start, out=step.slots)
        old, bucket = step.mask_start, step.bucket
        lo, hi = min(old, start), max(old, start) + bucket
        band = step.mask[0, 0, :, lo:hi]
        if start > lo:
            band[:, : start - lo] = 0
        band[:, start - lo : start - lo + bucket] = shape.block
        if hi > start + bucket:
            band[:, start - lo + bucket :] = self.min
        step.mask_start = start

    def _compute_step(self, step: _Step):
        """The step function a graph captures (or torch.compile compiles): decoder stack, taps
        and LM head over the step's static buffers."""
        return self._run(step.ids, step.positions, step.slots, step.span, step.mask, step.taps)

    def _run(self, ids, positions, slots, span, mask, taps: Taps):
        self.cache.slots, self.cache.span = slots, span
        if self.lean_stack is not None and self.lean_stack.runs(self.cache) and all(is_final(j, len(self.backbone.layers)) for j in taps):
            # the stack in one call gives the final normed state, all that taps of None (or of the
            # layer count) ask for: the heads' and EAGLE-1's verifies run it too
            last = self.lean_stack.forward(ids, positions, self.cache, mask)
            hidden = torch.cat([last[0]] * len(taps), dim=-1) if taps else None
        else:
            last, hidden = tapped_forward(
                self.backbone, taps, input_ids=ids[None], position_ids=positions[None], attention_mask=mask, use_cache=True,
                **self._cache_kwargs,
            )
        # the head sees [1, L, H], as in the model's own forward
        logits = self.head(last)[0].float() if self.head is not None else None
        return logits, hidden

    # --- capture ----------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self, max_rows: int, taps: Taps = (), max_positions: int | None = None) -> float:
        """Between sequences: plan the capacity for `max_positions` (if given), then prepare the
        step of every bucket a forward of 1..max_rows tokens uses, for these taps: with graphs
        captured at every span of the capacity, with a compiler compiled (at its one span).
        Returns the ms spent capturing or compiling (0 for neither)."""
        if max_positions:
            self.plan(max_positions)
        if self.graphs is None and self.compiler is None:
            return 0.0
        self.cache.truncate(0)
        if self.cache.kv is None:  # allocate the storage with one exact forward
            self.forward(torch.zeros(1, dtype=torch.long, device=self.device))
        before = self.capture_ms + (self.compiler.compile_ms if self.compiler is not None else 0.0)
        spans = [self.cache.capacity] if self.compiler is not None else all_spans(self.cache.capacity)
        for bucket in buckets_up_to(max_rows):
            shape = self.shape(None, bucket, bucket)
            for span in spans:
                if self.graphs is None and self.compiler is None:  # a capture failed (one warning): uncaptured from here on
                    return self.capture_ms - before
                step = self._step(bucket, span, taps)
                if self.graphs is not None and step.graph is not None:
                    continue
                # any valid inputs: a graph records kernels, not values (slots [0, bucket) are scratch now)
                self._fill(step, step.ids, shape, 0)
                if self.graphs is not None:
                    self._capture(step)
                else:
                    self.compiler.run(self._compute, step)
        after = self.capture_ms + (self.compiler.compile_ms if self.compiler is not None else 0.0)
        return after - before

    @torch.inference_mode()
    def measure_profile(self, max_rows: int, taps: Taps = (), reps: int = PROFILE_REPS) -> dict[int, float]:
        """After warm_up: the median ms of one step of each bucket up to max_rows (its steps
        interleaved), kept as `profile`, from which every later forward picks its bucket."""
        times: dict[int, list[float]] = {b: [] for b in buckets_up_to(max_rows)}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for _ in range(reps + 1):
            for bucket in times:
                step = self._step(bucket, self.span(bucket), taps)
                self._fill(step, step.ids, self.shape(None, bucket, bucket), 0)
                sync()
                t0 = time.perf_counter()
                if step.graph is not None:
                    self.graphs.replay(step.graph)
                else:
                    self._uncaptured(step)
                sync()
                times[bucket].append((time.perf_counter() - t0) * 1000)
        measured = {b: statistics.median(ts[1:]) for b, ts in times.items()}  # the first round warms up
        self.profile = {**(self.profile or {}), **measured}
        return measured

    def stats(self) -> dict:
        out = {"graphs": self.graph_set.captured, "captures": self.captures, "capture_ms": round(self.capture_ms, 3),
               "capacity": self.cache.capacity}
        if self.compiler is not None:
            out.update(self.compiler.stats())
        if self.profile:
            out["profile_ms"] = {b: round(ms, 3) for b, ms in sorted(self.profile.items())}
        return out


# --- batch > 1: rows, each with its own length ------------------------------------------


class _RowsStep:
    """One captured (bucket, span, taps) forward of every row: static inputs the caller fills
    (a row not in the forward as padding that sees only itself) and the graph's outputs."""

    def __init__(self, rows: int, bucket: int, span: int, taps: Taps, dtype: torch.dtype, device) -> None:
        self.bucket, self.span, self.taps = bucket, span, taps
        self.ids = torch.zeros(rows, bucket, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, bucket, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, bucket, dtype=torch.long, device=device)
        self.mask = torch.full((rows, 1, bucket, span), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.graph = None
        self.outputs: tuple[torch.Tensor | None, torch.Tensor | None] | None = None


class RowsDecoder(CapturingDecoder):
    """A decoder stack and its LM head over a RowsKV: one forward runs several rows, each its own
    root + tree (or causal chunk) at its own length, padded to the forward's largest row with
    masked nodes (a padding node sees only itself). The batch > 1 equivalent of StaticDecoder.

    graphs (CUDA graphs: True, or a backend object in tests): a verify step runs every row at
    the bucket of its largest tree and a span bucket, captured once per (bucket, span, taps) in
    `warm_up` and replayed after (a row not in the step is padding over slots of its own that
    hold nothing live: every live row is in every verify). Prefills run uncaptured at their
    exact size. Without graphs (CPU, eager), forwards run the live rows at their exact width."""

    fallback = "the batch engine runs uncaptured"

    def __init__(self, backbone, head, rows: int, device: torch.device, dtype: torch.dtype, graphs=None) -> None:
        self._use_graphs(graphs, device)
        self.backbone, self.head = backbone, head
        self.device, self.dtype = device, dtype
        self.cache = RowsKV(backbone.config.num_hidden_layers, rows)
        self.min = torch.finfo(dtype).min
        self._cache_kwargs = cache_kwargs(backbone, self.cache)
        self._shapes: OrderedDict[tuple, ShapeMasks] = OrderedDict()
        self.every_row = torch.arange(rows, device=device)
        self.arange = torch.arange(GRAPH_MAX_BUCKET, device=device)

    def plan(self, positions: int) -> None:
        """Size every row for sequences of up to `positions` (prompt + output + the largest verify),
        with the bucket padding of a captured step."""
        self.cache.reserve(positions + (MAX_BUCKET_PADDING if self.graphs is not None else 0))
        self._drop_stale()

    def _drop_stale(self) -> None:
        if self.graph_set.generation != self.cache.generation:
            self.graph_set.release_all(self.cache.generation)

    def _shape(self, parents, rows: int, width: int) -> ShapeMasks:
        key = (parents, rows, width)
        found = self._shapes.get(key)
        if found is None:
            found = shape_masks(parents, rows, width, self.dtype, self.device)
            if width <= GRAPH_MAX_BUCKET:
                self._shapes[key] = found
                if len(self._shapes) > SHAPE_CACHE:
                    self._shapes.popitem(last=False)
        else:
            self._shapes.move_to_end(key)
        return found

    @torch.inference_mode()
    def forward(self, rows: list[int], ids: list[torch.Tensor], parents: list[tuple[int, ...] | None], taps: Taps = ()):
        """Row rows[i] runs ids[i] (root first) with tree parents[i] (None: causal) at its own
        length. Returns per row (logits [q_i, V] fp32 or None without a head, hidden [q_i, H·len(taps)] or None)."""
        cache = self.cache
        width = max(t.numel() for t in ids)
        starts = [cache.lengths[r] for r in rows]
        if self.graphs is not None and min(starts) > 0 and width <= GRAPH_MAX_BUCKET:
            return self._stepped(rows, ids, parents, taps, starts)
        span = max(starts) + width
        if span > cache.capacity:  # unplanned: grows (copies; counted)
            cache.reserve(span)
        b = len(rows)
        mask = torch.full((b, 1, width, span), self.min, dtype=self.dtype, device=self.device)
        positions = torch.empty(b, width, dtype=torch.long, device=self.device)
        padded = torch.empty(b, width, dtype=torch.long, device=self.device)
        arange = torch.arange(width, device=self.device)
        for i, (start, row_ids, row_parents) in enumerate(zip(starts, ids, parents)):
            shape = self._shape(row_parents, row_ids.numel(), width)
            mask[i, 0, :, :start] = 0
            mask[i, 0, :, start : start + width] = shape.block
            positions[i] = shape.depths + start
            padded[i, : row_ids.numel()] = row_ids
            padded[i, row_ids.numel() :] = row_ids[0]  # any token: a padding node sees only itself
        cache.active = torch.tensor(rows, device=self.device)
        cache.all_rows = rows == list(range(cache.rows))
        cache.slots = arange[None] + torch.tensor(starts, device=self.device)[:, None]
        cache.span = span
        last, hidden = tapped_rows(self.backbone, taps, input_ids=padded, position_ids=positions, attention_mask=mask,
                                   use_cache=True, **self._cache_kwargs)
        logits = self.head(last).float() if self.head is not None else None
        sizes = [t.numel() for t in ids]
        return ([logits[i, :q] for i, q in enumerate(sizes)] if logits is not None else [None] * b,
                [hidden[i, :q] for i, q in enumerate(sizes)] if hidden is not None else [None] * b)

    # --- captured steps (CUDA graphs) -------------------------------------------

    def _step(self, bucket: int, span: int, taps: Taps) -> _RowsStep:
        key = (bucket, span, taps)
        step = self.graph_set.steps.get(key)
        if step is None:
            step = self.graph_set.steps[key] = _RowsStep(self.cache.rows, bucket, span, taps, self.dtype, self.device)
        return step

    def _fill(self, step: _RowsStep, rows: list[int], ids: list[torch.Tensor], parents, starts: list[int]) -> None:
        """Write this forward into the step's static inputs, every row: a row of the forward at its
        own length and slots; any other row as padding at slots [0, bucket) of its own, each node
        seeing only itself (nothing live is there: every live row is in every verify)."""
        bucket = step.bucket
        step.mask.fill_(self.min)
        idle = self._shape(None, 1, bucket)  # a causal chunk of 1: node 0 and every padding node see only themselves
        given = {row: i for i, row in enumerate(rows)}
        for row in range(self.cache.rows):
            i = given.get(row)
            if i is None:
                step.mask[row, 0, :, :bucket] = idle.block
                step.positions[row].zero_()
                step.slots[row].copy_(self.arange[:bucket])
                step.ids[row].zero_()
                continue
            start, row_ids = starts[i], ids[i]
            shape = self._shape(parents[i], row_ids.numel(), bucket)
            step.mask[row, 0, :, :start] = 0
            step.mask[row, 0, :, start : start + bucket] = shape.block
            torch.add(shape.depths, start, out=step.positions[row])
            torch.add(self.arange[:bucket], start, out=step.slots[row])
            step.ids[row, : row_ids.numel()] = row_ids
            step.ids[row, row_ids.numel() :] = row_ids[0]  # any token: a padding node sees only itself

    def _compute(self, step: _RowsStep):
        """The step function a graph captures: every row over the step's static buffers."""
        cache = self.cache
        cache.active, cache.all_rows, cache.slots, cache.span = self.every_row, True, step.slots, step.span
        last, hidden = tapped_rows(self.backbone, step.taps, input_ids=step.ids, position_ids=step.positions,
                                   attention_mask=step.mask, use_cache=True, **self._cache_kwargs)
        logits = self.head(last).float() if self.head is not None else None
        return logits, hidden

    def _stepped(self, rows: list[int], ids: list[torch.Tensor], parents, taps: Taps, starts: list[int]):
        bucket = bucket_size(max(t.numel() for t in ids))
        end = max(starts) + bucket
        if end > self.cache.capacity:  # unplanned: grows (copies; counted), and the graphs with it
            self.cache.reserve(end)
        self._drop_stale()
        step = self._step(bucket, span_for(end, self.cache.capacity), taps)
        self._fill(step, rows, ids, parents, starts)
        if step.graph is None and not self._capture(step):  # failed: this and every later forward uncaptured
            logits, hidden = self._compute(step)
        else:
            self.graphs.replay(step.graph)
            logits, hidden = step.outputs
        sizes = [t.numel() for t in ids]
        # the static outputs are overwritten by the next replay: hand out copies
        return ([logits[row, :q].clone() for row, q in zip(rows, sizes)] if logits is not None else [None] * len(rows),
                [hidden[row, :q].clone() for row, q in zip(rows, sizes)] if hidden is not None else [None] * len(rows))

    @torch.inference_mode()
    def warm_up(self, max_rows: int, taps: Taps = ()) -> float:
        """Before anything is timed (after `plan`): capture the step of every bucket a verify of
        1..max_rows tokens per row uses, at every span of the capacity, for these taps. Returns
        the ms spent capturing (0 without graphs). The captures write keys and values at slots
        [0, bucket) of every row: call it between sequences."""
        if self.graphs is None:
            return 0.0
        if self.cache.kv is None:  # allocate the storage with one exact forward of one row
            self.cache.lengths[0] = 0
            self.forward([0], [torch.zeros(1, dtype=torch.long, device=self.device)], [None])
            self.cache.lengths[0] = 0
        self._drop_stale()
        before = self.capture_ms
        for bucket in buckets_up_to(max_rows):
            for span in all_spans(self.cache.capacity):
                if self.graphs is None:  # a capture failed (one warning): uncaptured from here on
                    return self.capture_ms - before
                if span < bucket:
                    continue
                step = self._step(bucket, span, taps)
                if step.graph is None:
                    self._fill(step, [], [], [], [])  # any valid inputs: a graph records kernels, not values
                    self._capture(step)
        return self.capture_ms - before

    def stats(self) -> dict:
        return {"cuda_graphs": self.graphs is not None, "captures": self.captures, "capture_ms": round(self.capture_ms, 3)}

