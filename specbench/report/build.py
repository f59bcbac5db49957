"""`specbench report`, the top of report/: runs → groups → frames, then CSV/parquet, plots and HTML written.

The modules under it read and compute (collect, frames) or show (columns, tables, plots,
html) and import nothing from here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from specbench.errors import UserError
from specbench.files import atomic_write, write_lock
from specbench.report.collect import group_runs, load_runs, setup_names
from specbench.report.frames import VIEWS, Report, report_frames

__all__ = ["VIEWS", "Report", "build", "check_outputs", "export", "run_summary", "write_outputs"]


def check_outputs(paths: list[Path], csv: Path | None, parquet: Path | None, html: Path | None, plot: Path | None) -> None:
    """Every output can be written, and none is one of the runs' own record files, before anything is read."""
    from specbench.checks import check_distinct_outputs, check_output_dir, check_output_file
    from specbench.store import RUN_FILE, STEPS_FILE, TURNS_FILE

    records = tuple(Path(p) / name for p in paths if (Path(p) / RUN_FILE).is_file() for name in (RUN_FILE, TURNS_FILE, STEPS_FILE))
    outputs = ((csv, "--csv"), (parquet, "--parquet"), (html, "--html"))
    for path, flag in outputs:
        check_output_file(path, flag, inputs=records)
    check_output_dir(plot, "--plot")
    check_distinct_outputs(*outputs)
    for path, flag in outputs:
        if path is not None and plot is not None and path.resolve().parent == plot.resolve() and path.suffix.lower() == ".png":
            raise UserError(f"{flag} {path} lies in the --plot directory, where a plot may replace it: put it elsewhere")


def build(paths: list[Path]) -> Report:
    warnings: list[str] = []
    groups = group_runs(load_runs(paths, warnings), warnings)
    return Report(groups, report_frames(groups), warnings)


# what a spreadsheet reads as the start of a formula (OWASP's list): such a cell is written with a leading '
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralised(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every text cell a spreadsheet would execute (`=HYPERLINK(...)` as a
    category name) made inert by a leading apostrophe; numbers are left as they are."""
    def cell(value):
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value

    frame = frame.copy()
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):  # text columns (object or pandas' string dtype)
            frame[column] = frame[column].map(cell)
    frame.columns = [cell(str(c)) for c in frame.columns]
    return frame


def export(frame: pd.DataFrame, csv: Path | None, parquet: Path | None) -> list[Path]:
    written = []
    if csv:
        with write_lock(csv):
            atomic_write(csv, lambda tmp: neutralised(frame).to_csv(tmp, index=False))
        written.append(csv)
    if parquet:
        try:
            with write_lock(parquet):
                atomic_write(parquet, lambda tmp: frame.to_parquet(tmp, index=False))
        except ImportError:
            raise UserError("--parquet needs pyarrow: `pip install pyarrow`") from None
        written.append(parquet)
    return written


def write_outputs(report: Report, plot: Path | None, html: Path | None) -> list[str]:
    """Plots into `plot` and/or one HTML page; a line per thing written."""
    if not (plot or html):
        return []
    import tempfile

    from specbench.report.plots import write_plots

    lines = []
    names = setup_names(report.groups)[1]
    if plot:
        with write_lock(plot):
            plots = write_plots(report.frames, plot, names)
        lines.append(f"wrote {len(plots)} plots to {plot}")
    if html:
        from specbench.report.html import write_html

        with write_lock(html):
            if plot:
                lines.append(f"wrote {write_html(report, plots, html)}")
            else:  # the page's plots are drawn in a hidden folder beside it, removed whatever happens
                html.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=html.parent, prefix=f".{html.name}.plots.") as folder:
                    lines.append(f"wrote {write_html(report, write_plots(report.frames, Path(folder), names), html)}")
    return lines


def run_summary(directory: Path):
    """(RunInfo, Summary, warnings) of one run directory: what `run` prints when it finishes."""
    from specbench.metrics import memory_model, summarise
    from specbench.store import RunStore

    store = RunStore.open(directory)
    warnings: list[str] = []
    steps, turns = store.load(warnings)
    return store.info, summarise(steps, turns, memory_model(store.info.memory)), warnings


def batch_run_summary(directory: Path):
    """The metrics.BatchSummary of a run at --batch-size > 1 (run.json has a `batch` entry)."""
    from specbench.metrics import batch_summary
    from specbench.store import RunStore

    store = RunStore.open(directory)
    steps, turns = store.load([])
    return batch_summary(store.info.extra.batch, steps, turns)
