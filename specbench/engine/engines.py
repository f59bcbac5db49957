"""The engines a target runs on, picked with `--engine`:

- `eager`: a transformers DynamicCache, the tree mask built per step
  (targets/hf.py); simple, for debugging and for models the fast engine
  cannot take.
- `fast`: one preallocated KV tensor, masks built once per tree shape, every
  verify padded to a fixed bucket; on CUDA each bucket replayed as a CUDA graph
  (engine/cuda_graphs.py), on a CPU the linear weights prepacked for oneDNN
  (engine/packed.py) and each verify padded to the bucket measured cheapest,
  all prepared before anything is timed (engine/static_cache.py,
  targets/fast.py). The compiled CPU steps (engine/compiled_step.py,
  engine/frozen_step.py) are measured by scripts/bench_engine.py: the frozen
  whole step runs plain decoding twice as fast, but compiles for minutes per
  bucket in every process, so it is not picked.
- `auto`: the engine AUTO names for the device: what scripts/bench_engine.py
  measured faster there (docs/engine.md has the measurements).

The decode loop is the same on either; the baseline of a run runs on the
drafter's engine, so a speedup compares like with like.
"""

from __future__ import annotations

import torch

from specbench.errors import UserError

ENGINES = ("auto", "eager", "fast")
# device type -> the engine `auto` picks; measured with scripts/bench_engine.py (docs/engine.md)
AUTO = {"cuda": "fast", "cpu": "fast"}
ENGINE_HELP = (f"auto ({', '.join(f'{engine} on {device.upper()}' for device, engine in AUTO.items())}), eager (DynamicCache), "
               "fast (static KV cache; CUDA graphs on CUDA, oneDNN-prepacked weights on CPU); the baseline runs on the same engine")


def resolve_engine(engine: str, device: torch.device) -> str:
    """'eager' or 'fast' for this device."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}': use {', '.join(ENGINES)}")
    if engine == "auto":
        return AUTO.get(device.type, "eager")
    return engine
