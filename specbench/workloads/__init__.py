"""Workloads: named prompt sets (one folder each under the top-level workloads/), and any JSONL file of prompts.

A workload is a list of `Prompt`s. Chat prompts hold one or more user turns
(a later turn is asked after the model's own answer to the earlier ones, in the
target's chat template); completion prompts hold raw text. The published file
formats and their detection live in `formats.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files
from pathlib import Path

from specbench.checks import check_count, check_fits, tokens_at_least
from specbench.errors import UserError
from specbench.files import jsonl_rows, read_text
from specbench.workloads import formats


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: tuple[str, ...]
    chat: bool  # True: user turns through the chat template; False: raw completion text
    task: str = ""  # the task a category belongs to (Spec-Bench's 6), else the category


@dataclass
class Workload:
    name: str
    prompts: list[Prompt]
    format: str  # a key of formats.LABELS
    source: str  # the file or hub dataset read

    def describe(self) -> str:
        categories = len({p.category for p in self.prompts})
        tasks = len({p.task for p in self.prompts})
        grouped = f", {tasks} tasks" if tasks != categories else ""
        return (f"{self.name}: {len(self.prompts)} prompts in {categories} categories{grouped}, "
                f"read from {self.source} as {formats.LABELS[self.format]}")


# the top-level workloads/ folder, installed inside the package (setup.py maps it)
SHIPPED = "specbench.workloads.shipped"


@cache
def registry() -> dict[str, dict]:
    """The declared workloads, name -> spec: workloads/NAME/workload.toml, in their `order`."""
    specs = {folder.name: tomllib.loads(folder.joinpath("workload.toml").read_text())
             for folder in files(SHIPPED).iterdir() if folder.joinpath("workload.toml").is_file()}
    return dict(sorted(specs.items(), key=lambda item: (item[1].get("order", len(specs)), item[0])))


def describe_sources() -> list[tuple[str, str, str]]:
    """(name, summary, where its data comes from) for every declared workload."""
    rows = []
    for name, entry in registry().items():
        if "file" in entry:
            where = "built in"
        else:
            local = data_dir() / entry["local"]
            found = "found" if local.is_file() else "not there yet"
            hub = f", else the hub dataset {entry['hub']}" if "hub" in entry else ""
            where = f"{entry['source']}: --workload-file PATH, or {local} ({found}){hub}"
        rows.append((name, entry["summary"], where))
    return rows


def data_dir() -> Path:
    """Where published prompt files are looked for: $SPECBENCH_DATA, else the user data dir."""
    if env := os.environ.get("SPECBENCH_DATA"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("specbench")) / "workloads"


def _spec_bench_only() -> set[str]:
    tasks = registry()["spec-bench"]["tasks"]
    return {c for c, task in tasks.items() if task != "multi-turn conversation"}


def _with_tasks(prompts: list[Prompt], fmt: str) -> list[Prompt]:
    tasks = registry()["spec-bench"]["tasks"] if fmt == "spec-bench" else {}
    return [replace(p, task=tasks.get(p.category, p.task or p.category)) for p in prompts]


def _check_ids(prompts: list[Prompt], source: str) -> list[Prompt]:
    if not prompts:
        raise UserError(f"{source}: no prompts found")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise UserError(f"{source}: prompt id '{p.id}' appears twice; ids must be unique (resume and reports key on them)")
        seen.add(p.id)
    return prompts


def parse_rows(rows: list[tuple[int, dict]], source: str, fmt: str | None = None) -> tuple[list[Prompt], str]:
    """(prompts, format) from (line number, row) pairs; the format is detected unless given."""
    if not rows:
        raise UserError(f"{source}: no prompts found")
    fmt = fmt or formats.detect([r for _, r in rows], _spec_bench_only())
    prompts = [formats.to_prompt(fmt, row, i, f"{source}:{line}", Prompt) for i, (line, row) in enumerate(rows)]
    for (line, _), prompt in zip(rows, prompts):
        if any(not turn.strip() for turn in prompt.turns):
            raise UserError(f"{source}:{line}: prompt {prompt.id} has an empty turn; give it text or drop the row")
    return _check_ids(_with_tasks(prompts, fmt), source), fmt


def read_rows(lines: list[str], source: str) -> list[tuple[int, dict]]:
    return list(jsonl_rows(lines, source))


def rows_of(text: str, source: str) -> list[tuple[int, dict]]:
    """(line, row) pairs of a prompt file, its layout told by its content, never its name: a JSON
    list of rows (the ShareGPT dumps), one JSON object, or JSON Lines (DSD publishes JSON Lines
    as hellaswag.json)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: starts like a JSON list but is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{source}: a JSON list of rows must hold JSON objects")
        return [(i + 1, r) for i, r in enumerate(rows)]
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        try:  # one pretty-printed object spans lines; JSON Lines would not parse as a whole
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return [(1, row)]
    return read_rows(text.splitlines(), source)


def read_file(path: Path, name: str | None = None) -> Workload:
    if path.is_dir():
        raise UserError(f"workload file '{path}' is a directory; give a .jsonl file")
    if not path.exists():
        raise UserError(f"workload file '{path}' does not exist")
    text = read_text(path, "workload file")
    prompts, fmt = parse_rows(rows_of(text, str(path)), str(path))
    return Workload(name or path.stem, prompts, fmt, str(path))


def _from_hub(name: str, entry: dict) -> Workload | None:
    """The hub dataset through `datasets`, or None where it cannot be reached."""
    from specbench.hub import prefer_cache

    prefer_cache()  # offline: the cached copy at once, or nothing, instead of five retries over half a minute
    try:
        import datasets
        from datasets.utils.logging import disable_progress_bar, set_verbosity_error
        from huggingface_hub.utils import logging as hub_logging

        set_verbosity_error()
        hub_logging.set_verbosity_error()
        disable_progress_bar()
        rows = list(datasets.load_dataset(entry["hub"], split=entry.get("hub_split", "train")))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - offline, not cached, datasets missing: the caller names the fix
        return None
    fmt = entry.get("hub_format", entry["format"])
    prompts = [formats.to_prompt(fmt, dict(row), i, f"{entry['hub']} row {i}", Prompt) for i, row in enumerate(rows)]
    return Workload(name, _check_ids(_with_tasks(prompts, fmt), entry["hub"]), fmt, f"hub dataset {entry['hub']}")


def open_workload(name: str = "builtin", file: str | Path | None = None) -> Workload:
    """A named workload (from its packaged file, `file`, the data dir or the hub), or a JSONL path."""
    table = registry()
    if not str(name).strip():
        raise UserError("--workload needs a name or a file path")
    if name not in table:
        path = Path(name)
        if path.suffix in (".jsonl", ".json") or path.exists():
            return read_file(path)
        raise UserError(f"unknown workload '{name}': use one of {', '.join(table)} or a path to a .jsonl file")
    entry = table[name]
    if file is not None:
        return read_file(Path(file), name)
    if "file" in entry:
        text = files(SHIPPED).joinpath(name, entry["file"]).read_text(encoding="utf-8")
        prompts, fmt = parse_rows(read_rows(text.splitlines(), name), name)
        return Workload(name, prompts, fmt, f"workloads/{name}/{entry['file']}")
    local = data_dir() / entry["local"]
    if local.is_file():
        return read_file(local, name)
    if "hub" in entry and (workload := _from_hub(name, entry)):
        return workload
    hub = f" (the hub dataset {entry['hub']} could not be reached)" if "hub" in entry else ""
    raise UserError(
        f"workload '{name}' needs {entry['source']}{hub}: put it at {local} or pass --workload-file PATH"
    )


def load_workload(name: str, file: str | Path | None = None) -> list[Prompt]:
    return open_workload(name, file).prompts


def select(prompts: list[Prompt], categories: list[str] | None = None, limit: int | None = None,
           shard: str | None = None) -> list[Prompt]:
    """Keep the given categories (or tasks), then the first `limit`, then shard i of n (1-based, round robin).
    Each `categories` entry is a name, or names separated by commas; an entry that is itself a
    category of the workload ("q&a, short") is that category."""
    if categories is not None:
        known = {p.category for p in prompts} | {p.task for p in prompts}
        categories = [name for text in categories
                      for name in ([text.strip()] if text.strip() in known else [c.strip() for c in text.split(",") if c.strip()])]
    if categories is not None and not categories:
        raise UserError("--categories names no category; give at least one (comma-separated or repeated)")
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}: "
                            f"this workload has {', '.join(sorted(known))}")
        prompts = [p for p in prompts if p.category in categories or p.task in categories]
        if not prompts:
            raise UserError(f"--categories {','.join(categories)} keeps no prompts of this workload")
    if limit is not None:
        prompts = prompts[: check_count(limit, "--limit")]
    if shard:
        index, count = parse_shard(shard)
        prompts = prompts[index - 1 :: count]
        if not prompts:
            raise UserError(f"shard {shard} holds no prompts; use fewer shards")
    return prompts


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise UserError(f"--shard expects i/n, e.g. 1/4 (got '{shard}')") from None
    if not 1 <= index <= count:
        raise UserError(f"--shard {shard}: i must be between 1 and n")
    return index, count


def workload_hash(prompts: list[Prompt]) -> str:
    blob = json.dumps([[p.id, p.category, p.turns, p.chat] for p in prompts]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_turn(tokenizer, prompt: Prompt, turn: int, answers: list[str]) -> list[int]:
    """Token ids for `turn` of `prompt`, given the model's own answers to the earlier turns."""
    ids = _encode(tokenizer, prompt, turn, answers)
    if not ids:
        raise UserError(f"prompt {prompt.id} turn {turn + 1} encodes to no tokens with this tokenizer; give it some text")
    return ids


def check_prompts_fit(prompts: list[Prompt], tokenizer, window: int | None, max_new_tokens: int, model: str,
                      draft_tokens: int = 0) -> None:
    """Refuse, before any prefill, a prompt that cannot fit the context window with `max_new_tokens`
    generated per turn: its text alone, then its first turn exactly (later turns also hold the
    model's answers; they are checked exactly when encoded)."""
    if not window:
        return
    for prompt in prompts:
        budget = window - max_new_tokens - draft_tokens
        text_tokens = 0
        for turn, text in enumerate(prompt.turns):  # every earlier answer adds up to max_new_tokens
            text_tokens += tokens_at_least(tokenizer, text, max(budget, 0))
            what = f"prompt {prompt.id}" + (f" turn {turn + 1} (with the answers before it)" if turn else "")
            check_fits(text_tokens + turn * max_new_tokens, max_new_tokens, window, what, model, draft_tokens)
        check_fits(len(encode_turn(tokenizer, prompt, 0, [])), max_new_tokens, window, f"prompt {prompt.id}", model, draft_tokens)


def _encode(tokenizer, prompt: Prompt, turn: int, answers: list[str]) -> list[int]:
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
