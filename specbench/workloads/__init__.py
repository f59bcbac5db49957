"""Workloads: named prompt sets, and any JSONL file of prompts.

A workload is a list of `Prompt`s. Chat prompts hold one or more user turns
(a later turn is asked after the model's own answer to the earlier ones, in the
target's chat template); completion prompts hold raw text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from specbench.errors import UserError


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: tuple[str, ...]
    chat: bool  # True: user turns through the chat template; False: raw completion text


# name -> (file under specbench/workloads/data, description)
BUILTIN = {
    "builtin": ("builtin.jsonl", "16 short chat prompts written for specbench, 2 per MT-Bench category (offline)"),
    "builtin-completion": ("builtin-completion.jsonl", "6 completion contexts written for specbench (offline)"),
    "pool-train": ("pool-train.jsonl", "392 instructions across the 8 MT-Bench categories, composed for specbench (scripts/make_prompt_pool.py): the self-distillation pool for `specbench train-data`"),
    "pool-heldout": ("pool-heldout.jsonl", "44 held-out instructions from the same composer, never in pool-train: for evaluating trained drafters"),
}


def parse_jsonl(lines: list[str], source: str) -> list[Prompt]:
    """Rows with `turns` (list of user turns), `prompt` (completion text) or `conversations`
    (ShareGPT layout: the human turns are kept, the recorded answers dropped); `id`/`question_id`
    and `category` optional."""
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{source}:{number}: expected a JSON object per line")
        pid = str(row.get("id", row.get("question_id", number)))
        category = str(row.get("category", "default"))
        if isinstance(row.get("conversations"), list):
            humans = [str(m.get("value", "")) for m in row["conversations"] if isinstance(m, dict) and m.get("from") in ("human", "user")]
            if humans:
                prompts.append(Prompt(pid, category, tuple(humans), chat=True))
        elif isinstance(row.get("turns"), list) and row["turns"]:
            prompts.append(Prompt(pid, category, tuple(map(str, row["turns"])), chat=True))
        elif isinstance(row.get("prompt"), str):
            prompts.append(Prompt(pid, category, (row["prompt"],), chat=False))
        else:
            raise UserError(f"{source}:{number}: a row needs a 'turns' list or a 'prompt' string")
    if not prompts:
        raise UserError(f"{source}: no prompts found")
    return prompts


def load_workload(name: str) -> list[Prompt]:
    if name in BUILTIN:
        text = files("specbench.workloads").joinpath("data", BUILTIN[name][0]).read_text()
        return parse_jsonl(text.splitlines(), name)
    path = Path(name)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise UserError(f"workload file '{name}' does not exist")
        text = path.read_text()
        if path.suffix == ".json":  # a JSON list of rows (the ShareGPT dumps ship this way)
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
            if not isinstance(rows, list):
                raise UserError(f"{path}: expected a JSON list of rows")
            return parse_jsonl([json.dumps(r) for r in rows], str(path))
        return parse_jsonl(text.splitlines(), str(path))
    known = ", ".join(BUILTIN)
    raise UserError(f"unknown workload '{name}': use one of {known} or a path to a .jsonl file")


def workload_hash(prompts: list[Prompt]) -> str:
    blob = json.dumps([[p.id, p.category, p.turns, p.chat] for p in prompts]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_turn(tokenizer, prompt: Prompt, turn: int, answers: list[str]) -> list[int]:
    """Token ids for `turn` of `prompt`, given the model's own answers to the earlier turns."""
    if not prompt.chat:
        return tokenizer(prompt.turns[0])["input_ids"]
    if tokenizer.chat_template is None:
        # a base model: the turns and answers as plain text, one after the other
        text = "\n\n".join(t for pair in zip(prompt.turns[: turn + 1], [*answers, ""]) for t in pair if t)
        return tokenizer(text)["input_ids"]
    messages = []
    for i in range(turn + 1):
        messages.append({"role": "user", "content": prompt.turns[i]})
        if i < turn:
            messages.append({"role": "assistant", "content": answers[i]})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
