"""Drafters trained by specbench for the embedded default target, shipped as package data.

Each subdirectory is one trained drafter; `specbench/catalogue/` says which
drafter and target it serves (`bundled:NAME`). A draft model is stored without
its vocabulary tables (they are frozen copies of the target's): `bundle.json`
names the base target they are taken from when the draft is first loaded (see
`specbench.targets.loading`). How each was trained: docs/train.md and
scripts/train_bundled.sh.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PREFIX = "bundled:"


def bundled_dir(name: str) -> Path:
    """The package-data directory of a bundled drafter."""
    return Path(str(files("specbench.bundled").joinpath(name)))


def resolve_bundled(spec: str) -> str:
    """A catalogue's `bundled:NAME` as the directory it names; anything else unchanged."""
    return str(bundled_dir(spec.removeprefix(PREFIX))) if spec.startswith(PREFIX) else spec
