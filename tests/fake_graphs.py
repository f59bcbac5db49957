"""A stand-in for torch.cuda graphs, so that the fast engine's capture/replay path runs on CPU.

A capture runs the step function once and keeps it; a replay runs it again and copies
the results into the tensors the capture returned, as a CUDA graph overwrites its
static outputs from its static inputs. A step that forgot to refresh an input (a mask
band, a slot) therefore replays stale data here as it would on a GPU.

The pool bookkeeping copies the CUDA caching allocator's: a graph captured into a pool
holds one use of it until the graph object dies; capturing into a pool whose uses all
ended fails as CUDACachingAllocator's `use_count > 0` assert does.
"""

from __future__ import annotations

import itertools
import time


class FakeGraph:
    def __init__(self, backend: FakeGraphs, fn, outputs, pool) -> None:
        self.backend, self.fn, self.outputs, self.pool = backend, fn, outputs, pool

    def __del__(self) -> None:
        self.backend.pools[self.pool] -= 1


class FakeGraphs:
    def __init__(self, fail_on_capture: int | None = None) -> None:
        self.pools: dict[tuple, int] = {}  # pool handle -> live graphs captured into it (freed at 0)
        self.handles: list[tuple] = []
        self.captures = 0
        self.replays = 0
        self.fail_on_capture = fail_on_capture  # the n-th capture (1-based) raises, as a failed capture does
        self._ids = itertools.count(1)

    def new_pool(self):
        handle = (0, next(self._ids))
        self.handles.append(handle)
        return handle

    def capture(self, fn, pool):
        if pool in self.pools:
            if self.pools[pool] <= 0:
                raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED (capture into a freed pool)")
            self.pools[pool] += 1
        else:
            self.pools[pool] = 1
        self.captures += 1
        graph = FakeGraph(self, fn, None, pool)  # holds its use of the pool from here on
        if self.captures == self.fail_on_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph.outputs = fn()
        return graph, graph.outputs

    def replay(self, graph: FakeGraph) -> None:
        self.replays += 1
        for static, fresh in zip(graph.outputs, graph.fn()):
            if static is not None:
                static.copy_(fresh)

    def now(self) -> float:
        return time.perf_counter() * 1000

    def live_graphs(self) -> int:
        return sum(self.pools.values())
