"""Target backends: how a target model is loaded (`hf`, or `deepspeed` tensor parallel) and
the engine it runs on (`eager` | `fast`, engine/engines.py). Every combination is a `Target`
(engine/protocol.py); `parallel.py` wraps a run over tensor-parallel ranks."""

from __future__ import annotations

import torch

from specbench.progress import SILENT, Progress

BACKENDS = ("hf", "deepspeed")


def load_target(name: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", engine: str = "auto",
                backend: str = "hf", tp: int = 1, progress: Progress = SILENT):
    """The target `name` on `device` in `dtype` (as the --device / --dtype flags give them, `auto`
    included, or resolved), loaded by `backend`, running on `engine`; `progress` shows the load.
    Every command that loads a target loads it here."""
    from specbench.engine.engines import resolve_engine
    from specbench.targets.fast import target_class
    from specbench.targets.loading import resolve_device, resolve_dtype

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    engine = resolve_engine(engine, device)
    with progress.status(f"loading {name}"):
        if backend == "deepspeed":
            from specbench.targets import deepspeed

            return deepspeed.load(name, device, dtype, tp, engine)
        return target_class(engine).load(name, device, dtype)
