"""The engines a target runs on, picked with `--engine`:

- `eager`: a transformers DynamicCache, the tree mask built per step
  (targets/hf.py); simple, for debugging and for models the fast engine
  cannot take.
- `fast`: one preallocated KV tensor, masks built once per tree shape, and on
  CUDA every forward padded to a bucket and replayed as a CUDA graph
  (engine/static_cache.py, targets/fast.py).
- `auto`: fast on CUDA, eager on CPU (where the fast engine saves little:
  scripts/bench_engine.py measures both).

The decode loop is the same on either; the baseline of a run runs on the
drafter's engine, so a speedup compares like with like.
"""

from __future__ import annotations

import torch

from specbench.errors import UserError

ENGINES = ("auto", "eager", "fast")


def resolve_engine(engine: str, device: torch.device) -> str:
    """'eager' or 'fast' for this device."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}': use {', '.join(ENGINES)}")
    if engine == "auto":
        return "fast" if device.type == "cuda" else "eager"
    return engine
