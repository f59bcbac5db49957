"""Find run directories, read them, and group them by setup.

A setup is what makes numbers comparable: the target, the drafter and its
options, the hardware, the decode settings and the prompt selection. Runs of
one setup (the shards of a workload, or repeats) are pooled; runs of different
setups are never averaged together. Works on any store written in the result
schema (`specbench run` or a simulation), reading fields it does not know as absent.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from specbench.errors import UserError
from specbench.records import MeasuredExtra, RunInfo, StepRecord, TurnRecord
from specbench.store import RUN_FILE, RunStore

# decode settings that do not change what is measured (shard i of n measures a part of the same selection)
NOT_SETUP = {"shard", "warmup"}


@dataclass
class Run:
    directory: Path
    info: RunInfo
    steps: list[StepRecord]
    turns: list[TurnRecord]

    @property
    def coverage(self) -> tuple[int, int | None]:
        """(prompts measured, prompts the run selected; None where run.json does not say)."""
        selected = self.info.extra.workload.prompts if isinstance(self.info.extra, MeasuredExtra) else None
        return len({t.prompt_id for t in self.turns}), selected if isinstance(selected, int) else None

    @property
    def unfinished(self) -> str | None:
        """'2 of 4 prompts' for a run that measured fewer prompts than it selected, else None."""
        measured, selected = self.coverage
        return f"{measured} of {selected} prompts" if selected is not None and measured < selected else None


@dataclass
class Group:
    setup: dict  # the fields that define the setup, for tables and exports
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        s = self.setup
        options = ",".join(f"{k}={v}" for k, v in s["drafter_options"].items())
        simulated = " · simulated" if s["decode"].get("simulated") else ""
        rows = s["decode"].get("batch_size")  # absent at batch 1 (docs/batch.md)
        batch = f" · batch {rows}{'' if s['decode'].get('refill', True) else ' no refill'}" if rows else ""
        return f"{s['drafter']}{f' ({options})' if options else ''} → {s['target']} · {s['device']}{simulated}{batch}"

    @property
    def batch(self) -> dict | None:
        """The pooled run.json `batch` entries of a setup run at --batch-size > 1 (None at batch 1)."""
        entries = [r.info.extra.batch for r in self.runs if isinstance(r.info.extra, MeasuredExtra) and r.info.extra.batch]
        if not entries:
            return None
        return {**entries[0], "batches": [b for entry in entries for b in entry.get("batches", [])]}

    @property
    def steps(self) -> list[StepRecord]:
        return [s for r in self.runs for s in r.steps]

    @property
    def turns(self) -> list[TurnRecord]:
        return [t for r in self.runs for t in r.turns]

    def category_steps(self, key: str = "category") -> dict[str, tuple[list[StepRecord], list[TurnRecord]]]:
        """Steps and turns per category (or task): a step belongs to its prompt's category in its own run."""
        out: dict[str, tuple[list, list]] = {}
        for run in self.runs:
            of = {t.prompt_id: (getattr(t, key, None) or t.category) for t in run.turns}
            for t in run.turns:
                out.setdefault(of[t.prompt_id], ([], []))[1].append(t)
            for s in run.steps:
                if s.prompt_id in of:
                    out[of[s.prompt_id]][0].append(s)
        return dict(sorted(out.items()))


def _facets(group: Group) -> dict[str, str]:
    """What defines a setup beside its drafter, each as the words a reader sees."""
    s = group.setup
    facets = {"target": f"target {s['target']}", "device": f"on {s['device']}", "workload": f"workload {s['workload']}",
              "selection": f"selection {str(s['selection'])[:12]}"}
    for key, value in s["decode"].items():
        words = key.replace("_", " ")
        if isinstance(value, bool):  # baseline, simulated
            facets[f"decode.{key}"] = words if value else f"no {words}"
        elif value is not None:  # unset (categories, workload_file, ...): nothing to say
            facets[f"decode.{key}"] = f"{words} {value}"
    return facets


def drafter_name(group: Group) -> str:
    options = ", ".join(f"{k}={v}" for k, v in group.setup["drafter_options"].items())
    return f"{group.setup['drafter']} ({options})" if options else group.setup["drafter"]


def setup_names(groups: list[Group]) -> tuple[dict[str, str], dict[str, str]]:
    """(the facets every setup shares, to be said once: key → words, decode settings keyed
    "decode.NAME"; each setup's label → its short name: the drafter with its options and
    whatever else differs between the setups)."""
    facets = [_facets(g) for g in groups]
    keys = list(dict.fromkeys(k for f in facets for k in f))
    shared = [k for k in keys if len({f.get(k) for f in facets}) == 1]
    names = {}
    for group, own in zip(groups, facets):
        differing = [own[k] for k in keys if k not in shared and k in own and k != "selection"]
        if "selection" not in shared:  # the same drafter on another prompt selection: name the selection last
            differing.append(own["selection"])
        names[group.label] = " · ".join([drafter_name(group), *differing])
    return {k: facets[0][k] for k in shared if k != "selection"} if facets else {}, names


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories: each path is one, or a folder searched for them. A directory named twice
    (`report R R`, or R and a folder holding it) is one run, counted once."""
    found: dict[Path, Path] = {}  # the real directory -> the name it was first given by
    for path in paths:
        if (path / RUN_FILE).is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(p.parent for p in path.rglob(RUN_FILE))
        else:
            raise UserError(f"{path} does not exist")
        for directory in candidates:
            found.setdefault(directory.resolve(), directory)
    if not found:
        raise UserError(f"no run directories (with {RUN_FILE}) under {', '.join(map(str, paths))}; run `specbench run` first")
    return list(found.values())


def load_runs(paths: list[Path], warnings: list[str]) -> list[Run]:
    runs = []
    for directory in find_runs(paths):
        try:
            store = RunStore.open(directory)
        except UserError as exc:
            warnings.append(f"skipped: {exc}")
            continue
        try:
            steps, turns = store.load(warnings)
        except UserError as exc:  # a records file that is a pipe, a device or far too large
            warnings.append(f"skipped: {exc}")
            continue
        if not turns:
            warnings.append(f"{directory}: no finished prompts yet; skipped")
            continue
        turns, steps = _first_of_each(directory, turns, steps, warnings)
        finished = {(t.prompt_id, t.turn, t.mode) for t in turns}
        kept = [s for s in steps if (s.prompt_id, s.turn, s.mode) in finished]
        if len(kept) < len(steps):  # a run killed between writing a prompt's steps and its turns
            warnings.append(f"{directory}: {len(steps) - len(kept)} step record(s) of unfinished prompts left out "
                            f"(`specbench run --resume {directory}` measures those prompts again)")
        turns, kept = _whole_prompts(directory, turns, kept, warnings)
        if not turns:
            warnings.append(f"{directory}: no prompt with all its step records; skipped")
            continue
        run = Run(directory, store.info, kept, turns)
        if run.unfinished:
            warnings.append(f"{directory}: unfinished, {run.unfinished} measured; its numbers cover part of the workload "
                            f"(`specbench run --resume {directory}` measures the rest)")
        runs.append(run)
    if not runs:  # the warnings are not printed on this path: name the last reason in the one line
        raise UserError("no run with finished prompts to report" + (f" ({warnings[-1]})" if warnings else ""))
    return runs


def _whole_prompts(directory: Path, turns: list[TurnRecord], steps: list[StepRecord], warnings: list[str]):
    """Leave out prompts whose turn records count more steps than steps.jsonl holds (a file cut
    short, by a disk or a copy): averaging over what is left would report another number than
    was measured. Says how many steps were lost and how to measure those prompts again."""
    held = Counter((s.prompt_id, s.turn, s.mode) for s in steps)
    short = {t.prompt_id: 0 for t in turns if held[t.prompt_id, t.turn, t.mode] < t.steps}
    if not short:
        return turns, steps
    lost = sum(max(t.steps - held[t.prompt_id, t.turn, t.mode], 0) for t in turns if t.prompt_id in short)
    warnings.append(f"{directory}: steps.jsonl is truncated: {lost} step record(s) of {len(short)} prompt(s) are lost, so those "
                    f"prompts are left out of every number (`specbench run --resume {directory}` measures them again)")
    return [t for t in turns if t.prompt_id not in short], [s for s in steps if s.prompt_id not in short]


def _first_of_each(directory: Path, turns: list[TurnRecord], steps: list[StepRecord], warnings: list[str]):
    """Keep the first record of each (prompt, turn, mode) and of each step of it, naming any
    doubles: a run directory written twice over (two processes resuming it at once) must not
    pool the second measurement with the first."""
    seen_turns, seen_steps = set(), set()
    unique_turns = [t for t in turns if not ((t.prompt_id, t.turn, t.mode) in seen_turns or seen_turns.add((t.prompt_id, t.turn, t.mode)))]
    unique_steps = [s for s in steps if not ((k := (s.prompt_id, s.turn, s.mode, s.step)) in seen_steps or seen_steps.add(k))]
    doubled_turns, doubled_steps = len(turns) - len(unique_turns), len(steps) - len(unique_steps)
    if doubled_turns or doubled_steps:
        warnings.append(f"{directory}: {doubled_turns} duplicate prompt record(s) and {doubled_steps} duplicate step record(s) "
                        "(the run was written twice over); only the first of each is counted")
    return unique_turns, unique_steps


def hardware(environment: dict) -> str:
    """The device a run measured on; on CPU with its thread count, which changes every timing."""
    name = environment.get("device_name") or "unknown device"
    threads = environment.get("cpu_threads")
    on_cpu = str(environment.get("device", "cpu")).startswith("cpu")
    return f"{name}, {threads} threads" if on_cpu and threads else name


def setup_of(info: RunInfo) -> dict:
    selection = info.extra.workload.selection_hash if isinstance(info.extra, MeasuredExtra) else None
    return {
        "target": info.target_id or info.target,
        "drafter": info.drafter,
        "drafter_options": dict(sorted((info.drafter_options or {}).items())),
        "device": hardware(info.environment or {}),
        "workload": info.workload,
        "selection": selection or info.workload_hash,
        "decode": {k: v for k, v in sorted((info.decode or {}).items()) if k not in NOT_SETUP},
    }


def group_runs(runs: list[Run], warnings: list[str]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        setup = setup_of(run.info)
        groups.setdefault(json.dumps(setup, sort_keys=True, default=str), Group(setup)).runs.append(run)
    for group in groups.values():
        owners = Counter(pid for run in group.runs for pid in {t.prompt_id for t in run.turns})
        twice = sorted(pid for pid, n in owners.items() if n > 1)
        if twice:
            warnings.append(f"{group.label}: prompt(s) {', '.join(twice[:5])}{'…' if len(twice) > 5 else ''} "
                            f"measured in more than one run of the same setup; all measurements are pooled")
    return list(groups.values())
