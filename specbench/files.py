"""Reading what a user hands in, and writing outputs so that a kill never leaves half a file.

- `read_text`: a text file as UTF-8 (a byte-order mark tolerated), or one line naming the
  file, the offending byte and the fix.
- `atomic_write` / `atomic_write_text`: the output goes to a temporary file in the target's
  own directory and is renamed over the target only once complete and synced; a kill or an
  error at any point leaves the previous file as it was. A symlink is written through.
- `jsonl_rows`: the one JSON Lines reader (run records, target logs, workloads, DSD prompts,
  VocabTrim calibration): a (line number, object) per non-blank line, a bad line either one
  line naming file:line or, where a reader tolerates it, reported and skipped.
- `reading_weights`: every way a weights file can fail to load (corrupt safetensors, a pickle
  holding more than tensors, a truncated zip, bytes that are not text) becomes one line. Torch's
  advice to retry with `weights_only=False` (which runs whatever code the pickle holds) never
  reaches the user of a benchmark tool.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from specbench.errors import UserError


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


def read_text(path: Path | str, what: str = "file") -> str:
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # a device or a pipe would never end
            raise UserError(f"{what} {path} is not a regular file")
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    return decode_utf8(data, str(path))


def jsonl_rows(lines: Iterable[str | bytes], source: str,
               bad_line: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSON Lines. A line that is not UTF-8 text
    or not a JSON object calls `bad_line(number, why)` (which may raise its own message, or record
    and return to skip the line); without it, one UserError naming `source:number`."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = decode_utf8(line, f"{source}:{number}") if isinstance(line, bytes) else line
            row = json.loads(text)
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object per line")
        except UserError as exc:  # not UTF-8: the message already names the place
            if bad_line is None:
                raise
            bad_line(number, str(exc))
            continue
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            why = f"not valid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            if bad_line is None:
                raise UserError(f"{source}:{number}: {why}") from None
            bad_line(number, why)
            continue
        yield number, row


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; an output is a normal file
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a read-only mount: the old file stays, one line says why
            raise UserError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); it was left as it was") from None
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- weights ---------------------------------------------------------------------------

def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def weights_error(path: Path | str, exc: BaseException, what: str = "weights") -> UserError:
    """One line for a weights file that cannot be read: what is wrong with it and what to do."""
    name, text = type(exc).__name__, str(exc)
    head = f"cannot read {what} {path}"
    if "weights_only" in text or "Weights only load failed" in text:
        return UserError(f"{head}: a pickled checkpoint that holds more than plain tensors; specbench never runs code "
                         "from a checkpoint: use a safetensors copy of it (or one saved as plain tensors)")
    if name == "SafetensorError" or "safetensors" in type(exc).__module__:
        return UserError(f"{head}: not a valid safetensors file ({first_line(exc)}); it is corrupt or truncated: fetch it again")
    if isinstance(exc, (pickle.UnpicklingError, EOFError)) or "PytorchStreamReader" in text or "zip archive" in text:
        return UserError(f"{head}: not a readable torch checkpoint ({first_line(exc)}); it is corrupt, truncated or another "
                         "kind of file: fetch it again")
    if isinstance(exc, UnicodeDecodeError):
        return UserError(f"{head}: a file that should be UTF-8 text (a config or tokenizer file) is not; fetch it again")
    return UserError(f"{head} ({name}: {first_line(exc)})")


@contextmanager
def reading_weights(path: Path | str, what: str = "weights") -> Iterator[None]:
    """Wrap a weights load: any failure is one UserError (see weights_error); torch's
    warnings about pickle protocols stay quiet."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            yield
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure is the same one line
        raise weights_error(path, exc, what) from None
