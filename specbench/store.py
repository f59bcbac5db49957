"""The result store: one directory per run, written incrementally.

Records of a prompt are appended only once the prompt (all its turns, both
modes) is finished, steps first and turns last, each file flushed and synced:
a run killed mid-way loses at most the prompt in flight. On resume, records
of prompts that are not complete are dropped and those prompts measured again,
so no prompt is ever counted twice.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import fields
from pathlib import Path

from specbench.errors import UserError
from specbench.records import RunInfo, StepRecord, TurnRecord

RUN_FILE, TURNS_FILE, STEPS_FILE = "run.json", "prompts.jsonl", "steps.jsonl"


def read_jsonl(path: Path, record_type, warnings: list[str] | None = None) -> list:
    """Records of a JSONL file; a corrupt or truncated line is skipped and named in `warnings`.
    Fields this version does not know (a newer writer's) are ignored."""
    records = []
    if not path.exists():
        return records
    known = {f.name for f in fields(record_type)}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise TypeError("not a JSON object")
            records.append(record_type(**{k: v for k, v in row.items() if k in known}))
        except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            if warnings is not None:
                warnings.append(f"{path}:{number}: skipped a corrupt record ({exc})")
    return records


class RunStore:
    def __init__(self, directory: Path, info: RunInfo) -> None:
        self.directory = directory
        self.info = info

    @classmethod
    def create(cls, directory: Path, info: RunInfo) -> RunStore:
        if directory.exists() and any(directory.iterdir()):
            raise UserError(f"result directory {directory} already holds a run; resume it with --resume {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, info)
        store.write_info()
        return store

    @classmethod
    def open(cls, directory: Path) -> RunStore:
        run_file = directory / RUN_FILE
        if not run_file.exists():
            raise UserError(f"{directory} is not a specbench run directory (no {RUN_FILE})")
        try:
            row = json.loads(run_file.read_text())
            info = RunInfo(**{k: v for k, v in row.items() if k in {f.name for f in fields(RunInfo)}})
        except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise UserError(f"{run_file} is corrupt ({exc})") from None
        return cls(directory, info)

    def write_info(self) -> None:
        tmp = self.directory / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.info.to_json(), indent=2) + "\n")
        tmp.replace(self.directory / RUN_FILE)

    def load(self, warnings: list[str] | None = None) -> tuple[list[StepRecord], list[TurnRecord]]:
        steps = read_jsonl(self.directory / STEPS_FILE, StepRecord, warnings)
        turns = read_jsonl(self.directory / TURNS_FILE, TurnRecord, warnings)
        return steps, turns

    def keep_complete(self, records_per_prompt: dict[str, int]) -> set[str]:
        """Drop the records of prompts with fewer turn records than expected; return the complete prompt ids."""
        steps, turns = self.load()
        counts = Counter(t.prompt_id for t in turns)
        complete = {pid for pid, n in counts.items() if n == records_per_prompt.get(pid)}
        self._rewrite(STEPS_FILE, [s for s in steps if s.prompt_id in complete])
        self._rewrite(TURNS_FILE, [t for t in turns if t.prompt_id in complete])
        return complete

    def _rewrite(self, name: str, records: list) -> None:
        tmp = self.directory / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
        tmp.replace(self.directory / name)

    def _append(self, name: str, records: list) -> None:
        with open(self.directory / name, "a") as f:
            f.write("".join(json.dumps(r.to_json()) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def append_prompt(self, steps: list[StepRecord], turns: list[TurnRecord]) -> None:
        self._append(STEPS_FILE, steps)
        self._append(TURNS_FILE, turns)
