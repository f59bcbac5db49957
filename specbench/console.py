"""How the command line shows things on the terminal: progress on stderr (stdout is for results,
e.g. --json), one-line warnings. User-given text is escaped before rich renders it, so a name like
`chain:x` is printed as typed, never as markup or an emoji."""

from __future__ import annotations

import warnings

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

console = Console()
err_console = Console(stderr=True)
PYTHON_SHOWWARNING = warnings.showwarning


class RichProgress:
    """specbench.progress.Progress drawn on stderr (stdout is for results, e.g. --json)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[text]}"), console=err_console)

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def status(self, text: str):
        return err_console.status(escape(text))

    def task(self, description: str, total: int):
        task = self.bar.add_task(escape(description), total=total, text="")
        return lambda n=1, **fields: self.bar.update(task, advance=n, text=escape(" ".join(str(v) for v in fields.values())))

    def note(self, text: str) -> None:
        self.bar.console.print(escape(text), highlight=False)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """specbench's own warnings as one line, like its errors; others as Python prints them."""
    from specbench.errors import SpecbenchWarning

    if issubclass(category, SpecbenchWarning):
        warn(str(message))
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def error(text: str) -> None:
    err_console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
