"""How the command line shows things on the terminal, and how every failure ends.

- Text is printed as given, never read as rich markup or emoji codes, since so much of it
  is the user's (paths, ids, tree specs, error messages quoting input: `--tree chain:x:`,
  DSD's "[header] ..." prompts). Styling is applied with Text objects instead.
- Progress goes to stderr (stdout is for results, e.g. --json) and leaves nothing behind
  (transient); into a file or pipe there is none, so an error after it is still one line.
- Every error a user can cause ends as one line on stderr and exit code 2 (click's usage
  errors included); ctrl-C as one line and 130. SIGTERM (`kill`, a scheduler's stop) ends the
  same way as ctrl-C, so temporary files are removed and records kept, not left half-written.
- A terminal that cannot show a character (PYTHONIOENCODING=ascii) gets a replacement for it,
  not a UnicodeEncodeError; progress bars of the libraries underneath (tqdm) are off when stderr
  is not a terminal, so no carriage-return frames land in a redirected log.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from specbench.errors import SpecbenchWarning, UserError

console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False)
INTERRUPTED = 130  # the shell's code for a run stopped by ctrl-C


def styled(*parts: str | tuple[str, str]) -> Text:
    """A line of plain text with styled parts: styled(("name", "bold"), "  summary")."""
    return Text.assemble(*parts)


class RichProgress:
    """specbench.progress.Progress drawn on stderr."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[text]}", markup=False), console=err_console,
                            transient=True, disable=not err_console.is_terminal)

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def status(self, text: str):
        return err_console.status(Text(text))

    def task(self, description: str, total: int):
        task = self.bar.add_task(description, total=total, text="")
        return lambda n=1, **fields: self.bar.update(task, advance=n, text=" ".join(str(v) for v in fields.values()))

    def note(self, text: str) -> None:
        err_console.print(Text(text), highlight=False, soft_wrap=True)


def one_line(text: str) -> str:
    """Messages are one line: whatever they quote (an exception, a file's content) is folded into it."""
    return " ".join(str(text).split())


def warn(message: str) -> None:
    err_console.print(styled(("warning:", "yellow"), " ", one_line(message)), soft_wrap=True, highlight=False)


def error(message: str) -> None:
    err_console.print(styled(("error:", "bold red"), " ", one_line(message)), soft_wrap=True, highlight=False)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors: specbench's own as they are, a library's with where it came from."""
    if issubclass(category, SpecbenchWarning):
        warn(str(message))
    else:
        warn(f"{message} ({category.__name__}, {Path(filename).name}:{lineno})")


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # handled exactly as ctrl-C: every `finally` and cleanup runs


def prepare_streams() -> None:
    """Characters a stream cannot encode are replaced, not fatal; library progress bars are off
    when stderr is redirected (see the module docstring)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("_", "-")
        if hasattr(stream, "reconfigure") and encoding not in ("utf-8", "utf8"):
            stream.reconfigure(errors="replace")
    quiet_library_progress()


def quiet_library_progress() -> None:
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        os.environ.setdefault("TQDM_DISABLE", "1")


quiet_library_progress()  # now: tqdm reads its environment once, when imported, and the CLI's imports load it


def run_app(app: typer.Typer) -> None:
    """Run the CLI app so that every failure ends in one line (see the module docstring)."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run_app(app)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_app(app: typer.Typer) -> None:
    prepare_streams()
    warnings.showwarning = show_warning
    # deprecation notices of the libraries underneath are for their callers' developers, not for a user
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        error(str(exc))
        sys.exit(2)
    except typer.exceptions.TyperException as exc:  # click's usage errors: a bad flag, a value of the wrong type
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message:  # an empty one is "no arguments": the help is already printed
            context = getattr(exc, "ctx", None)
            where = f" (see `{context.command_path} --help`)" if context is not None else ""
            error(message + where)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(INTERRUPTED)
    except OSError as exc:  # the last net: a name too long, a permission, a full disk met where no check foresaw it
        where = f"{exc.filename}: " if exc.filename else ""
        error(f"{where}{exc.strerror or exc}")
        sys.exit(2)
    if code == INTERRUPTED:  # typer turns ctrl-C into this code before a command could say more
        error("interrupted")
        sys.exit(INTERRUPTED)
    if isinstance(code, int) and code:
        sys.exit(code)
