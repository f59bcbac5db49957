"""`specbench report`: runs → groups → frames → tables, CSV/parquet, plots, HTML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from specbench.errors import UserError
from specbench.files import atomic_write
from specbench.report import frames
from specbench.report.collect import Group, group_runs, load_runs

# --by value -> the frame it shows
VIEWS = {"setup": "overview", "category": "categories", "task": "tasks", "position": "positions"}


@dataclass
class Report:
    groups: list[Group]
    frames: dict[str, pd.DataFrame]
    warnings: list[str] = field(default_factory=list)

    def view(self, by: str) -> pd.DataFrame:
        """The frame `--by` selects (what --csv/--parquet write)."""
        return self.frames[VIEWS[by]]


def build(paths: list[Path]) -> Report:
    warnings: list[str] = []
    groups = group_runs(load_runs(paths, warnings), warnings)
    return Report(
        groups,
        {
            "overview": frames.overview(groups),
            "categories": frames.by_category(groups, "category"),
            "tasks": frames.by_category(groups, "task"),
            "positions": frames.by_position(groups),
            "prompts": frames.per_prompt(groups),
            "step_times": frames.step_times(groups),
        },
        warnings,
    )


def export(frame: pd.DataFrame, csv: Path | None, parquet: Path | None) -> list[Path]:
    written = []
    if csv:
        atomic_write(csv, lambda tmp: frame.to_csv(tmp, index=False))
        written.append(csv)
    if parquet:
        try:
            atomic_write(parquet, lambda tmp: frame.to_parquet(tmp, index=False))
        except ImportError:
            raise UserError("--parquet needs pyarrow: `pip install pyarrow`") from None
        written.append(parquet)
    return written
