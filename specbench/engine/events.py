"""Process-wide counts of the fast engine's costly one-off events (CUDA graph captures,
compilations of the CPU step, cache regrowths), so a benchmark can tell the ones that
happened while it was timing (runner.py, scripts/gpu_check.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace


@dataclass
class EngineEvents:
    """Process-wide counts of the costly events of every StaticDecoder (target and draft
    decoders alike), so a benchmark can tell the ones that happened while it was timing."""

    captures: int = 0
    capture_ms: float = 0.0
    compiles: int = 0  # first runs of a compiled step shape (engine/compiled_step.py)
    compile_ms: float = 0.0
    regrowths: int = 0  # storage grown while a sequence was running (its prefix copied)

    def __sub__(self, before: EngineEvents) -> EngineEvents:
        return EngineEvents(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def __bool__(self) -> bool:
        return bool(self.captures or self.compiles or self.regrowths)


EVENTS = EngineEvents()


@contextmanager
def counted() -> Iterator[EngineEvents]:
    """The events that happen inside the block, filled in when it ends (however it ends):
    `with counted() as seen: decode(...)`, then `seen.captures`."""
    before, seen = replace(EVENTS), EngineEvents()
    try:
        yield seen
    finally:
        for f in fields(seen):
            setattr(seen, f.name, getattr(EVENTS - before, f.name))
