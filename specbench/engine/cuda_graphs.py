"""CUDA graphs for the fast engine: the capture/replay backend (`CudaGraphs`; tests swap in
tests/fake_graphs.py) and the bookkeeping of a decoder's steps, graphs and their one memory
pool (`GraphSet`). See engine/static_cache.py for what a step is."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from specbench.engine.events import EVENTS
from specbench.errors import SpecbenchWarning

# a step is static_cache's Step (its input/output buffers); typed loosely here so that this
# backend, which static_cache imports, does not import it back
Step = Any


class CudaGraphs:
    """Capture and replay with torch.cuda graphs (the backend a StaticDecoder uses on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    def capture(self, fn, pool):
        """Run fn twice off the capture (lazy inits, kernel selection), then capture it into
        `pool`. Returns (graph, fn's outputs: static tensors that each replay overwrites)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
        return graph, outputs

    def replay(self, graph) -> None:
        graph.replay()

    def now(self) -> float:
        torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000


class GraphSet:
    """A decoder's step buffers, its captured graphs and the one memory pool they share.

    Invariant: `pool` is None or at least one graph captured into it is alive. The pool
    is dropped with the last graph (`release_all`, a failed capture), so a capture never
    receives the handle of a pool the allocator has freed."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.steps: dict[tuple, Step] = {}
        self.pool = None
        self.generation = 0  # the cache generation the steps' buffers and graphs were built for

    @property
    def captured(self) -> int:
        return sum(step.graph is not None for step in self.steps.values())

    def pool_for_capture(self):
        if self.pool is None:
            self.pool = self.backend.new_pool()
        return self.pool

    def capture(self, step: Step, fn) -> None:
        pool = self.pool_for_capture()
        try:
            step.graph, step.outputs = self.backend.capture(fn, pool)
        except RuntimeError:
            step.graph, step.outputs = None, None
            if not self.captured:
                self.pool = None  # the failed graph may have been the pool's only user
            raise

    def release_all(self, generation: int) -> None:
        """Drop every step buffer and graph, then the pool (the graphs' destructors release it)."""
        for step in self.steps.values():
            step.graph = step.outputs = None  # the graph object dies here, not whenever a cycle is collected
        self.steps.clear()
        self.pool = None
        self.generation = generation


def capture_step(graph_set: GraphSet, step: Step, fn, fallback: str) -> float | None:
    """Capture `step` (its function `fn`) into the set's pool; the ms it took (counted in EVENTS),
    or None when the capture failed (e.g. a collective that cannot be captured under tensor
    parallelism): then one warning says the engine runs `fallback` from here on, and every graph
    of the set and its pool are dropped."""
    backend = graph_set.backend
    t0 = backend.now()
    try:
        graph_set.capture(step, fn)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"CUDA graph capture failed ({reason}); {fallback} from here on", SpecbenchWarning, stacklevel=3)
        graph_set.release_all(graph_set.generation)
        return None
    ms = backend.now() - t0
    EVENTS.captures += 1
    EVENTS.capture_ms += ms
    return ms


class CapturingDecoder:
    """What a decoder that captures its steps shares: `graphs` (a backend, or None when uncaptured),
    `graph_set`, its `_compute(step)`, the counts of captures and their ms, and `_capture`, which
    on a failed capture leaves the decoder uncaptured (`fallback` says how it then runs)."""

    fallback = "the engine runs uncaptured"
    graphs: Any
    graph_set: GraphSet
    captures: int
    capture_ms: float

    def _use_graphs(self, graphs, device: torch.device) -> None:
        """graphs: True for CUDA graphs on `device`, a backend object (tests pass a fake one), or None/False."""
        if graphs is True:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            graphs = CudaGraphs(device)
        self.graphs = graphs or None
        self.graph_set = GraphSet(self.graphs)
        self.captures, self.capture_ms = 0, 0.0

    def _compute(self, step: Step):
        raise NotImplementedError

    def _capture(self, step: Step) -> bool:
        ms = capture_step(self.graph_set, step, lambda: self._compute(step), self.fallback)
        if ms is None:
            self.graphs = None
            return False
        self.captures += 1
        self.capture_ms += ms
        return True
