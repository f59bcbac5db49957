"""Process-wide counts of the fast engine's costly one-off events (CUDA graph captures,
compilations of the CPU step, cache regrowths), so a benchmark can tell the ones that
happened while it was timing (runner.py, scripts/gpu_check.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineEvents:
    """Process-wide counts of the costly events of every StaticDecoder (target and draft
    decoders alike), so a benchmark can tell the ones that happened while it was timing."""

    captures: int = 0
    capture_ms: float = 0.0
    compiles: int = 0  # first runs of a compiled step shape (engine/compiled_step.py)
    compile_ms: float = 0.0
    regrowths: int = 0  # storage grown while a sequence was running (its prefix copied)


EVENTS = EngineEvents()
