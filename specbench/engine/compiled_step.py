"""The fast engine's step compiled for a CPU: torch.compile (inductor's C++/OpenMP backend)
of a StaticDecoder step (engine/static_cache.py).

Why: on a CPU, a small model's eager decoder step is partly per-op overhead (dozens of small
kernels and their dispatch per layer), which fusing each layer's elementwise work could
remove. Measured on the development machine it does not pay yet: plain decoding through the
compiled step ran at about half the eager engine's speed (docs/engine.md), so the CPU fast
engine prepacks its linear weights instead (engine/packed.py) and this step is a variant
that scripts/bench_engine.py measures (`FastHFTarget(compiled=True)`).

How: compiled with dynamic shapes, so the buckets share compiled code (bucket 1 is compiled
apart: torch specialises sizes 0 and 1), and every step reads one span, the whole capacity
(StaticDecoder.span). A compilation happens the first time a shape runs, which the
decoder's `warm_up` does before anything is timed; every call counts the graphs dynamo
compiled during it (`EVENTS.compiles`, `compile_ms`), so one inside a timed prompt shows.
Inductor's caches live under a directory of specbench's cache (`use_cache_dir`), so a
second process loads the compiled code instead of compiling it again.

Exactness: fused kernels sum in other orders than eager, so compiled and eager logits
differ by rounding; greedy tokens agree except at near-ties, which the divergence
diagnosis (engine/divergence.py) tells apart, and plain decoding in a run uses the same
compiled steps as the drafter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from specbench.engine.events import EVENTS

RECOMPILE_LIMIT = 64  # dynamo's default (8) is too few for buckets x taps x capacities


def use_cache_dir(directory: Path) -> None:
    """Keep inductor's compiled code and FX graph cache under `directory` (unless the user chose
    a TORCHINDUCTOR_CACHE_DIR), so that a second process does not pay the compilation again.
    Importing transformers' models already sets the variable to torch's default (a temporary
    directory), which is not a choice: that value is replaced."""
    import torch._inductor.config as inductor

    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = default_cache_dir()
    except ImportError:  # older torch: the default is a temporary directory of this name
        import getpass
        import tempfile

        default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default):
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    inductor.fx_graph_cache = True


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def raise_recompile_limit() -> None:
    from torch import _dynamo

    for limit in ("recompile_limit", "cache_size_limit"):  # the name varies by torch version
        if hasattr(_dynamo.config, limit):
            setattr(_dynamo.config, limit, max(getattr(_dynamo.config, limit), RECOMPILE_LIMIT))


class CompiledStep:
    """Compiles a StaticDecoder's step function and accounts for the compilations."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        if cache_dir is not None:
            use_cache_dir(cache_dir)
        self.compiles = 0
        self.compile_ms = 0.0

    def wrap(self, fn, decoder=None):
        """fn(step) compiled; `decoder` (the StaticDecoder whose step it is) is for compilers that
        compile the step otherwise (engine/frozen_step.py)."""
        raise_recompile_limit()
        return torch.compile(fn, dynamic=True)

    def run(self, compiled, step):
        """compiled(step), timing it as compilation when dynamo compiled a graph during it."""
        before = graphs_compiled()
        t0 = time.perf_counter()
        out = compiled(step)
        new = graphs_compiled() - before
        if new:
            ms = (time.perf_counter() - t0) * 1000
            self.compiles += new
            self.compile_ms += ms
            EVENTS.compiles += new
            EVENTS.compile_ms += ms
        return out

    def stats(self) -> dict:
        return {"compiled_step": True, "compiles": self.compiles, "compile_ms": round(self.compile_ms, 3)}
