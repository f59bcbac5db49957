"""Reading what a user hands in, and writing outputs so that a kill never leaves half a file.

- `read_bytes`: the one reader of a file a user names or a run directory holds: a regular file
  only (a pipe or a device would block or never end), read with a bound, or one line.
- `read_text`: a text file as UTF-8 (a byte-order mark tolerated), or one line naming the
  file, the offending byte and the fix.
- `write_lock`: the one lock every writer of an output takes (run directories, target logs and
  their side files, data and checkpoint directories, report outputs): a second writer is
  refused in one line instead of interleaving with the first.
- `atomic_write` / `atomic_write_text`: the output goes to a temporary file in the target's
  own directory and is renamed over the target only once complete and synced; a kill or an
  error at any point leaves the previous file as it was. A symlink is written through.
- `written_unit` / `check_unit`: a directory written as one unit by a writer that does not write
  its files atomically itself (a training recipe's checkpoint): a marker names the generation
  being written, and once it is complete a manifest holds each file's content hash; a reader
  refuses a half-written directory, a file changed since, and a weights file left from an earlier
  write, in one line, never loading a mix.
- `jsonl_rows`: the one JSON Lines reader (run records, target logs, workloads, DSD prompts,
  VocabTrim calibration): a (line number, object) per non-blank line, a bad line either one
  line naming file:line or, where a reader tolerates it, reported and skipped.
- `reading_weights`: every way a weights file can fail to load (corrupt safetensors, a pickle
  holding more than tensors, a truncated zip, bytes that are not text) becomes one line. Torch's
  advice to retry with `weights_only=False` (which runs whatever code the pickle holds) never
  reaches the user of a benchmark tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from specbench.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the rest works the same)
    fcntl = None


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


# no file specbench reads whole is near this; /dev/zero behind a symlink or a runaway file is refused, not read into memory
MAX_READ_BYTES = 4 << 30


def read_bytes(path: Path | str, what: str = "file", limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or one line saying why not. The file
    is opened without blocking and checked after opening (a pipe, a device or a directory is
    refused, whatever a symlink in front of it is called)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    try:
        info = os.fstat(fd)
        _refuse_irregular(info, path, what)
        if info.st_size > limit:
            raise UserError(f"{what} {path} is {info.st_size:,} bytes, more than the {limit:,} specbench reads; is it the right file?")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise UserError(f"{what} {path} is more than the {limit:,} bytes specbench reads; is it the right file?")
    return data


def _refuse_irregular(info: os.stat_result, path: Path, what: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} {path} is not a regular file (a pipe or a device); give a file")


def check_regular(path: Path | str, what: str = "file") -> None:
    """Refuse, without opening it, a `path` that exists and is not a regular file (what `read_bytes`
    would refuse later), so a reader of several files fails before it starts on any."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    _refuse_irregular(info, Path(path), what)


def read_text(path: Path | str, what: str = "file") -> str:
    return decode_utf8(read_bytes(path, what), str(path))


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
        if (why := io_failure(exc)) is not None:  # a full disk, a read-only mount: the old file stays, one line says why
            raise UserError(f"cannot write {path} ({why}); it was left as it was") from None
        raise
    return path


def io_failure(exc: BaseException) -> str | None:
    """Why a write failed when the system refused it: an OSError, or a library's error that wraps
    one (safetensors reports a full disk as `SafetensorError: ... Os { code: 28, ... }`)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    found = re.search(r"Os \{ code: (\d+)", str(exc))
    return os.strerror(int(found.group(1))) if found else None


class WriteLock:
    """An exclusive `flock` on a lock file, held until `release` (the kernel drops it when the
    process dies, however it dies)."""

    def __init__(self, path: Path, fd: int | None, remove: bool) -> None:
        self.path, self.fd, self.remove = path, fd, remove

    def release(self) -> None:
        if self.fd is None:
            return
        if self.remove:  # still ours (the lock is held): nobody else can have replaced it
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_file_for(output: Path | str) -> Path:
    """Where the lock of an output (a file or a directory) lives: `.NAME.lock` beside it."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the write itself will say so
        return path


def write_lock(output: Path | str, lock_file: Path | None = None, then: str = "wait for it to finish") -> WriteLock:
    """Take the write lock of `output`, or refuse in one line when another process holds it.
    By default the lock file sits beside the output and is removed on release (no leftover);
    a `lock_file` given (a run directory's `.lock`) is kept."""
    output = Path(output)
    remove = lock_file is None
    # beside the real file: two writers naming one output through a symlink (or a symlinked folder) share its lock
    path = lock_file_for(_real(output)) if remove else Path(lock_file)
    if fcntl is None:
        return WriteLock(path, None, False)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write {output} ({exc.strerror or type(exc).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{output} is being written by another specbench process{f' (pid {holder})' if holder else ''}; {then}") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the one there now
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return WriteLock(path, fd, remove)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- directories written as one unit -------------------------------------------------------------

WRITING = ".specbench-writing"  # present while a generation is being written: its id
MANIFEST = "specbench_manifest.json"  # the complete generation: {"generation", "files": {name: sha256}}
# what a loader may pick up from a directory: one of these not in the manifest is left from an earlier write
LOADABLE = (".pt", ".bin", ".safetensors", ".json", ".model", ".txt")
CHECKPOINT_FIX = "train it again into an empty --out (or with --overwrite)"


def _files(directory: Path) -> dict[str, tuple[int, int, int]]:
    """The directory's own files (not hidden ones: locks, temporaries, the marker), each with what
    changes when it is written (inode, modification time, size)."""
    found = {}
    for entry in os.scandir(directory) if directory.is_dir() else ():
        if not entry.name.startswith(".") and entry.name != MANIFEST and entry.is_file(follow_symlinks=False):
            info = entry.stat(follow_symlinks=False)
            found[entry.name] = (info.st_ino, info.st_mtime_ns, info.st_size)
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict | None:
    try:
        row = json.loads(read_text(directory / MANIFEST, "manifest"))
    except (UserError, ValueError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("files"), dict) else None


@contextmanager
def written_unit(directory: Path | str) -> Iterator[str]:
    """Write `directory` as one unit (its caller holds its write lock): yields the generation id.
    The marker goes first; afterwards the files written (new or changed) are hashed into the
    manifest, the previous generation's files not written again are removed, and the marker goes.
    A failure or a kill after a file was written leaves the marker: readers refuse the mix. One
    before any file was written leaves the directory as it was (the marker removed, or the
    directory, if this call made it)."""
    import uuid

    directory = Path(directory)
    generation = uuid.uuid4().hex[:16]
    created = not directory.exists()
    before = _files(directory)
    previous = (_manifest(directory) or {}).get("files", {}) if not created else {}
    atomic_write_text(directory / WRITING, generation + "\n")
    try:
        yield generation
    except BaseException:
        if created:  # nothing in it was there before
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
        elif _files(directory) == before:  # nothing written: the old unit is whole
            (directory / WRITING).unlink(missing_ok=True)
        raise
    now = _files(directory)
    written = sorted(name for name, seen in now.items() if before.get(name) != seen)
    for name in previous:
        if name not in written and name in now:  # the earlier generation's, not part of this one
            (directory / name).unlink(missing_ok=True)
    files = {name: file_sha256(directory / name) for name in written}
    atomic_write_text(directory / MANIFEST, json.dumps({"generation": generation, "files": files}, indent=1) + "\n")
    (directory / WRITING).unlink(missing_ok=True)


def check_unit(directory: Path | str, what: str, fix: str) -> None:
    """Refuse, in one line ending in `fix`, a directory written by `written_unit` that is half
    written, holds a file changed since it was written, or a loadable file it did not write.
    A directory without marker or manifest (a published checkpoint) is not checked."""
    directory = Path(directory)
    if (directory / WRITING).exists():
        generation = (directory / WRITING).read_text(errors="replace").strip()
        raise UserError(f"{what} {directory} is half written (generation {generation} was interrupted or failed); {fix}")
    manifest = _manifest(directory)
    if manifest is None:
        return
    files = manifest["files"]
    for name, digest in files.items():
        path = directory / str(name)
        if not path.is_file() or file_sha256(path) != digest:
            state = "is missing" if not path.is_file() else "is not the file written with the rest (changed or replaced since)"
            raise UserError(f"{what} {directory}: {name} {state}, generation {manifest.get('generation')}; {fix}")
    for name in _files(directory):
        if name not in files and name.endswith(LOADABLE):
            raise UserError(f"{what} {directory}: {name} is not part of it (left from an earlier write); remove it, or {fix}")


# --- weights ---------------------------------------------------------------------------

# torch's weights-only loader wraps the real reason in advice that does not apply here (to load with weights_only=False)
TORCH_PREAMBLE = ("Weights only load failed", "Please file an issue", "WeightsUnpickler error", "Check the documentation")


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(TORCH_PREAMBLE)]
    return reasons[0] if reasons else type(exc).__name__


def weights_error(path: Path | str, exc: BaseException, what: str = "weights") -> UserError:
    """One line for a weights file that cannot be read: what is wrong with it and what to do."""
    name, text = type(exc).__name__, str(exc)
    head = f"cannot read {what} {path}"
    carries_code = "GLOBAL" in text or "Unsupported global" in text or "refusing to load global" in text
    if carries_code:
        return UserError(f"{head}: a pickled checkpoint that holds more than plain tensors ({first_line(exc)}); specbench never runs code "
                         "from a checkpoint: use a safetensors copy of it (or one saved as plain tensors)")
    if name == "SafetensorError" or "safetensors" in type(exc).__module__:
        return UserError(f"{head}: not a valid safetensors file ({first_line(exc)}); it is corrupt or truncated: fetch it again")
    if "Weights only load failed" in text:  # an opcode the safe loader refuses: a corrupt file or a raw (non-torch) pickle
        return UserError(f"{head}: not a torch checkpoint of plain tensors ({first_line(exc)}); it is corrupt, or a raw pickle, "
                         "which specbench never unpickles as it never runs code from a checkpoint: fetch it again or use a "
                         "safetensors copy")
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
