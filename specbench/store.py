"""The result store: one directory per run, written incrementally.

Records of a prompt are appended only once the prompt (all its turns, both
modes) is finished, steps first and turns last, each file flushed and synced:
a run killed mid-way loses at most the prompt in flight. On resume, records
of prompts that are not complete (a turn record missing or doubled, a step
record missing or doubled) are dropped and those prompts measured again, so no
prompt is ever counted twice.

One writer at a time: a process writing a run directory holds an exclusive
`flock` on its `.lock` file until it closes the store (the kernel drops it when
the process dies, however it dies), and a second writer gets one line.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import fields
from pathlib import Path

from specbench.errors import UserError
from specbench.files import WriteLock, atomic_write_text, check_regular, decode_utf8, first_line, jsonl_rows, read_bytes, write_lock
from specbench.records import SCHEMA_VERSION, RunInfo, StepRecord, TurnRecord

RUN_FILE, TURNS_FILE, STEPS_FILE, LOCK_FILE = "run.json", "prompts.jsonl", "steps.jsonl", ".lock"
# the type every run.json field must have (a hand-edited file is refused, not half-read)
INFO_TYPES = {"run_id": str, "command": str, "target": str, "target_id": str, "drafter": str, "drafter_options": dict,
              "workload": str, "workload_hash": str, "decode": dict, "environment": dict, "started": str,
              "finished": (str, type(None)), "schema_version": int, "extra": dict}


def read_jsonl(path: Path, record_type, warnings: list[str] | None = None, run_id: str | None = None) -> list:
    """Records of a JSONL file; a corrupt or truncated line is skipped and named in `warnings`.
    Fields this version does not know (a newer writer's) are ignored. With `run_id`, a record that
    names another run (copied in from another run directory) is refused in one line, never counted;
    records written before records named their run name none and are read."""
    if not path.exists():
        return []
    known = {f.name for f in fields(record_type)}

    def skip(number: int, why: str) -> None:
        if warnings is not None:
            warnings.append(f"{path}:{number}: skipped a corrupt record ({why})")

    records = []
    for number, row in jsonl_rows(read_bytes(path, "run record file").splitlines(), str(path), skip):
        owner = row.get("run_id")
        if run_id is not None and owner is not None and owner != run_id:
            raise UserError(f"{path}:{number}: a record of run '{owner}', not of this directory's run '{run_id}' ({RUN_FILE}): "
                            "records copied in from another run are never counted; remove them, or keep each run in its own directory")
        try:
            records.append(record_type(**{k: v for k, v in row.items() if k in known}))
        except TypeError as exc:  # a row missing fields: a torn write
            skip(number, str(exc))
    return records


class RunStore:
    def __init__(self, directory: Path, info: RunInfo) -> None:
        self.directory = directory
        self.info = info
        self.created = False  # True when this process created the directory (create())
        self._lock: WriteLock | None = None

    @classmethod
    def create(cls, directory: Path, info: RunInfo) -> RunStore:
        """A new run directory at `directory`, locked for this process."""
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, info)
        store.lock()
        if any(p.name != LOCK_FILE for p in directory.iterdir()):
            store.close()
            raise UserError(f"result directory {directory} already holds a run; resume it with --resume {directory}")
        store.created = True
        store.write_info()
        return store

    @classmethod
    def create_unique(cls, parent: Path, info: RunInfo) -> RunStore:
        """A new run directory under `parent` named by the run id (with -2, -3, ... when a run
        started in the same second already took the name)."""
        base = info.run_id
        for n in range(1, 1000):
            if n > 1:
                info.run_id = f"{base}-{n}"
            directory = parent / info.run_id
            if directory.exists() and any(directory.iterdir()):
                continue
            try:
                return cls.create(directory, info)
            except UserError:
                continue  # taken between the look and the lock
        raise UserError(f"cannot find a free run directory name under {parent} for {base}")

    @classmethod
    def open(cls, directory: Path) -> RunStore:
        run_file = directory / RUN_FILE
        if not directory.is_dir():
            raise UserError(f"{directory} is not a directory; give a run directory (one holding {RUN_FILE})")
        if not run_file.is_file():
            raise UserError(f"{directory} is not a specbench run directory (no {RUN_FILE})")
        try:
            row = json.loads(decode_utf8(read_bytes(run_file, "run file"), str(run_file)))
            if not isinstance(row, dict):
                raise TypeError("not a JSON object")
            version = row.get("schema_version", SCHEMA_VERSION)
            if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
                raise UserError(f"{run_file} has schema version {version}, written by a newer specbench (this one reads up to "
                                f"{SCHEMA_VERSION}); upgrade specbench to read it")
            for name, kind in INFO_TYPES.items():
                if name in row and not (isinstance(row[name], kind) and not isinstance(row[name], bool)):
                    raise TypeError(f"field '{name}' holds {type(row[name]).__name__}")
            info = RunInfo.from_json(row)
        except UserError:
            raise
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise UserError(f"{run_file} is corrupt ({first_line(exc)}); it cannot be read as a run") from None
        except OSError as exc:
            raise UserError(f"cannot read {run_file} ({exc.strerror or type(exc).__name__})") from None
        for name in (TURNS_FILE, STEPS_FILE):  # a pipe or a device in a run directory: refused before anything starts
            check_regular(directory / name, "run record file")
        return cls(directory, info)

    # --- one writer at a time ----------------------------------------------------------
    def lock(self) -> None:
        """Take the directory's write lock, or refuse in one line when another process holds it."""
        if self._lock is None:
            self._lock = write_lock(self.directory, self.directory / LOCK_FILE,
                                    then="wait for it to finish (then resume it if it was interrupted)")

    def close(self) -> None:
        """Release the write lock (also released when the process ends, however it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write_info(self) -> None:
        atomic_write_text(self.directory / RUN_FILE, json.dumps(self.info.to_json(), indent=2) + "\n")

    def discard(self) -> bool:
        """Remove a directory this process created that holds no finished prompt (a run that
        failed or was interrupted before its first prompt); True when removed."""
        if not self.created or read_jsonl(self.directory / TURNS_FILE, TurnRecord):
            return False
        for name in (STEPS_FILE, TURNS_FILE, RUN_FILE, LOCK_FILE):
            (self.directory / name).unlink(missing_ok=True)
        self.close()
        try:
            self.directory.rmdir()
        except OSError:
            return False  # something else was put there: leave it
        return True

    def load(self, warnings: list[str] | None = None) -> tuple[list[StepRecord], list[TurnRecord]]:
        steps = read_jsonl(self.directory / STEPS_FILE, StepRecord, warnings, self.info.run_id)
        turns = read_jsonl(self.directory / TURNS_FILE, TurnRecord, warnings, self.info.run_id)
        return steps, turns

    def keep_complete(self, records_per_prompt: dict[str, int]) -> set[str]:
        """Drop the records of prompts that are not whole; return the complete prompt ids. A prompt
        is whole when it has exactly the expected turn records, each once, and each turn record
        exactly the step records it counts (a kill, a hand edit or a second writer breaks that)."""
        steps, turns = self.load()
        turn_keys = Counter((t.prompt_id, t.turn, t.mode) for t in turns)
        step_keys = Counter((s.prompt_id, s.turn, s.mode, s.step) for s in steps)
        steps_of = Counter((s.prompt_id, s.turn, s.mode) for s in steps)
        counts = Counter(t.prompt_id for t in turns)
        broken = {t.prompt_id for t in turns if turn_keys[t.prompt_id, t.turn, t.mode] > 1 or steps_of[t.prompt_id, t.turn, t.mode] != t.steps}
        broken |= {key[0] for key, n in step_keys.items() if n > 1}
        complete = {pid for pid, n in counts.items() if n == records_per_prompt.get(pid) and pid not in broken}
        self._rewrite(STEPS_FILE, [s for s in steps if s.prompt_id in complete])
        self._rewrite(TURNS_FILE, [t for t in turns if t.prompt_id in complete])
        return complete

    def _rewrite(self, name: str, records: list) -> None:
        atomic_write_text(self.directory / name, "".join(json.dumps(r.to_json()) + "\n" for r in records))

    def _append(self, name: str, records: list) -> None:
        with open(self.directory / name, "a") as f:
            f.write("".join(json.dumps(r.to_json()) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def append_prompt(self, steps: list[StepRecord], turns: list[TurnRecord]) -> None:
        for record in (*steps, *turns):  # each names its run, so one copied into another run directory is caught
            record.run_id = self.info.run_id
        self._append(STEPS_FILE, steps)
        self._append(TURNS_FILE, turns)
