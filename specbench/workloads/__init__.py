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

from specbench.errors import UserError
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
    return _check_ids(_with_tasks(prompts, fmt), source), fmt


def read_rows(lines: list[str], source: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{source}:{number}: expected a JSON object per line")
        rows.append((number, row))
    return rows


def parse_jsonl(lines: list[str], source: str) -> list[Prompt]:
    """Prompts of a JSONL file in any supported format (detected)."""
    return parse_rows(read_rows(lines, source), source)[0]


def read_file(path: Path, name: str | None = None) -> Workload:
    if not path.is_file():
        raise UserError(f"workload file '{path}' does not exist")
    text = path.read_text()
    if path.suffix == ".json":  # a JSON list of rows: the ShareGPT dumps ship this way
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        text = "\n".join(json.dumps(r) for r in rows)
    prompts, fmt = parse_rows(read_rows(text.splitlines(), str(path)), str(path))
    return Workload(name or path.stem, prompts, fmt, str(path))


def _from_hub(name: str, entry: dict) -> Workload | None:
    """The hub dataset through `datasets`, or None where it cannot be reached."""
    try:
        import datasets
        from datasets.utils.logging import disable_progress_bar, set_verbosity_error

        set_verbosity_error()
        disable_progress_bar()
        rows = list(datasets.load_dataset(entry["hub"], split=entry.get("hub_split", "train")))
    except Exception:  # offline, not cached, datasets missing: the caller names the fix
        return None
    fmt = entry.get("hub_format", entry["format"])
    prompts = [formats.to_prompt(fmt, dict(row), i, f"{entry['hub']} row {i}", Prompt) for i, row in enumerate(rows)]
    return Workload(name, _check_ids(_with_tasks(prompts, fmt), entry["hub"]), fmt, f"hub dataset {entry['hub']}")


def open_workload(name: str = "builtin", file: str | Path | None = None) -> Workload:
    """A named workload (from its packaged file, `file`, the data dir or the hub), or a JSONL path."""
    table = registry()
    if name not in table:
        path = Path(name)
        if path.suffix in (".jsonl", ".json") or path.exists():
            return read_file(path)
        raise UserError(f"unknown workload '{name}': use one of {', '.join(table)} or a path to a .jsonl file")
    entry = table[name]
    if file is not None:
        return read_file(Path(file), name)
    if "file" in entry:
        text = files(SHIPPED).joinpath(name, entry["file"]).read_text()
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
    """Keep the given categories (or tasks), then the first `limit`, then shard i of n (1-based, round robin)."""
    if categories:
        known = {p.category for p in prompts} | {p.task for p in prompts}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}: "
                            f"this workload has {', '.join(sorted(known))}")
        prompts = [p for p in prompts if p.category in categories or p.task in categories]
    if limit is not None:
        if limit < 1:
            raise UserError("--limit must be at least 1")
        prompts = prompts[:limit]
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
