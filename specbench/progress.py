"""How a long library call (a run, a resume, a recording, training) tells its caller how it is
going, without knowing how it is shown: the CLI draws a progress bar, scripts and tests pass
nothing (`SILENT`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Progress(Protocol):
    def status(self, text: str) -> contextlib.AbstractContextManager:
        """A phase without a count (loading a model)."""
        ...

    def task(self, description: str, total: int) -> Callable[..., None]:
        """A counted phase; returns `advance(n=1, **fields)`. Fields are extra text a display may show."""
        ...

    def note(self, text: str) -> None:
        """One line worth showing as it happens (a held-out evaluation, a workload summary)."""
        ...


class Silent:
    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        yield

    def task(self, description: str, total: int) -> Callable[..., None]:
        return lambda n=1, **fields: None

    def note(self, text: str) -> None:
        pass


SILENT = Silent()
