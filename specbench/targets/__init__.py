"""Target backends: how a target model is loaded (`hf`, or `deepspeed` tensor parallel) and
the engine it runs on (`eager` | `fast`, engine/engines.py). Every combination is a `Target`
(engine/protocol.py); `parallel.py` wraps a run over tensor-parallel ranks."""

from __future__ import annotations

import torch

BACKENDS = ("hf", "deepspeed")


def load_target(name: str, device: torch.device, dtype: torch.dtype, engine: str = "auto", backend: str = "hf", tp: int = 1):
    """The target `name` on `device`, loaded by `backend`, running on `engine`."""
    from specbench.engine.engines import resolve_engine
    from specbench.targets.fast import target_class

    engine = resolve_engine(engine, device)
    if backend == "deepspeed":
        from specbench.targets import deepspeed

        return deepspeed.load(name, device, dtype, tp, engine)
    return target_class(engine).load(name, device, dtype)
