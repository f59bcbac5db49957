"""Export a run's answers in FastChat's `model_answer` JSONL format, so FastChat's judge can score quality.

One line per prompt: {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [answer, ...]}], "tstamp"}.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from specbench.errors import UserError
from specbench.files import atomic_write_text, write_lock
from specbench.records import BASELINE, SPEC
from specbench.store import RunStore


def model_answers(store: RunStore, mode: str = SPEC, model_id: str | None = None) -> list[dict]:
    if mode not in (SPEC, BASELINE):
        raise UserError(f"--mode {mode}: use {SPEC} or {BASELINE}")
    warnings: list[str] = []
    _, turns = store.load(warnings)
    chosen = [t for t in turns if t.mode == mode]
    if not chosen:
        raise UserError(f"{store.directory} has no '{mode}' answers to export")
    if any(t.text is None for t in chosen):
        raise UserError(f"{store.directory} was recorded without answer text (an older run); run it again to export answers")
    by_prompt: dict[str, dict[int, str]] = {}
    for t in chosen:
        by_prompt.setdefault(t.prompt_id, {})[t.turn] = t.text
    model_id = model_id or f"{store.info.target}+{store.info.drafter}"
    stamp = time.time()
    lines = []
    for pid, answers in by_prompt.items():
        answer_id = hashlib.sha256(f"{store.info.run_id}/{pid}/{mode}".encode()).hexdigest()[:22]
        lines.append({
            "question_id": int(pid) if pid.isdigit() else pid,
            "answer_id": answer_id,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [answers[i] for i in sorted(answers)]}],
            "tstamp": stamp,
        })
    return lines


def write_model_answers(store: RunStore, out: Path, mode: str = SPEC, model_id: str | None = None) -> int:
    from specbench.checks import check_output_file
    from specbench.store import RUN_FILE, STEPS_FILE, TURNS_FILE

    check_output_file(out, "--out", inputs=tuple(store.directory / name for name in (RUN_FILE, TURNS_FILE, STEPS_FILE)))
    with write_lock(out):  # one writer of `out`: a second export into it is refused
        lines = model_answers(store, mode, model_id)
        atomic_write_text(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return len(lines)
