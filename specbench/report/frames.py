"""The report's numbers as pandas DataFrames: one row per setup, per (setup, category), per (setup, position), per prompt.

Every figure comes from `specbench.metrics`; the console tables, CSV/parquet
exports, plots and the HTML page all read these frames, so they agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from specbench.metrics import Summary, memory_model, summarise, tau
from specbench.records import BASELINE, SPEC
from specbench.report.collect import Group

METRICS = [
    "tau", "acceptance_rate", "draft_ms_per_step", "verify_ms_per_step", "overhead_ms_per_step",
    "cost_coefficient", "tokens_per_s", "baseline_tokens_per_s", "speedup", "mbsu", "exact_match_rate",
    "near_ties", "divergences",
]


# --by value -> the frame it shows
VIEWS = {"setup": "overview", "category": "categories", "task": "tasks", "position": "positions"}


@dataclass
class Report:
    """What `report` shows: the setups, their frames (named below) and what was skipped or doubtful on the way."""

    groups: list[Group]
    frames: dict[str, pd.DataFrame]
    warnings: list[str] = field(default_factory=list)

    def view(self, by: str) -> pd.DataFrame:
        """The frame `--by` selects (what --csv/--parquet write)."""
        return self.frames[VIEWS[by]]


def report_frames(groups: list[Group]) -> dict[str, pd.DataFrame]:
    return {
        "overview": overview(groups),
        "categories": by_category(groups, "category"),
        "tasks": by_category(groups, "task"),
        "positions": by_position(groups),
        "prompts": per_prompt(groups),
        "step_times": step_times(groups),
    }


def group_summary(group: Group, steps=None, turns=None) -> Summary:
    memory = memory_model(group.runs[0].info.memory)
    return summarise(group.steps if steps is None else steps, group.turns if turns is None else turns, memory)


def _setup_columns(group: Group) -> dict:
    s = group.setup
    return {
        "setup": group.label,
        "target": s["target"],
        "drafter": s["drafter"],
        "drafter_options": json.dumps(s["drafter_options"], sort_keys=True),
        "device": s["device"],
        "workload": s["workload"],
        "runs": len(group.runs),
    }


def _metric_columns(summary: Summary, turns) -> dict:
    row = {m: getattr(summary, m) for m in METRICS}
    row["prompts"] = len({t.prompt_id for t in turns if t.mode == SPEC})
    row["steps"] = summary.steps
    return row


def overview(groups: list[Group]) -> pd.DataFrame:
    rows = []
    for group in groups:
        summary = group_summary(group)
        row = {**_setup_columns(group), **_metric_columns(summary, group.turns)}
        for rate in summary.per_position:
            row[f"conditional_acceptance_{rate.position}"] = rate.conditional
        rows.append(row)
    return pd.DataFrame(rows)


def by_category(groups: list[Group], key: str = "category") -> pd.DataFrame:
    rows = []
    for group in groups:
        for name, (steps, turns) in group.category_steps(key).items():
            summary = group_summary(group, steps, turns)
            rows.append({**_setup_columns(group), key: name, **_metric_columns(summary, turns)})
    return pd.DataFrame(rows)


def by_position(groups: list[Group]) -> pd.DataFrame:
    rows = []
    for group in groups:
        for rate in group_summary(group).per_position:
            rows.append({**_setup_columns(group), "position": rate.position, "steps_reaching": rate.steps,
                         "unconditional": rate.unconditional, "conditional": rate.conditional})
    return pd.DataFrame(rows, columns=[*_SETUP, "position", "steps_reaching", "unconditional", "conditional"])


_SETUP = ["setup", "target", "drafter", "drafter_options", "device", "workload", "runs"]


def per_prompt(groups: list[Group]) -> pd.DataFrame:
    """tokens/s of each prompt (all its turns) in each mode: new tokens / decode wall time."""
    rows = []
    for group in groups:
        totals: dict[tuple, list[float]] = {}
        for run_index, run in enumerate(group.runs):
            for t in run.turns:
                acc = totals.setdefault((run_index, t.prompt_id, t.category, t.mode), [0, 0.0])
                acc[0] += t.new_tokens
                acc[1] += t.wall_ms
        for (_, pid, category, mode), (tokens, wall_ms) in totals.items():
            rows.append({"setup": group.label, "prompt_id": pid, "category": category, "mode": mode,
                         "new_tokens": tokens, "wall_ms": wall_ms,
                         "tokens_per_s": tokens / (wall_ms / 1000) if wall_ms else None})
    return pd.DataFrame(rows, columns=["setup", "prompt_id", "category", "mode", "new_tokens", "wall_ms", "tokens_per_s"])


def step_times(groups: list[Group]) -> pd.DataFrame:
    """Mean ms per verification step, split draft / verify / other, for each setup's drafter and plain decoding."""
    rows = []
    for group in groups:
        for mode in (SPEC, BASELINE):
            steps = [s for s in group.steps if s.mode == mode]
            if not steps:
                continue
            n = len(steps)
            draft = sum(s.draft_ms for s in steps) / n
            verify = sum(s.verify_ms for s in steps) / n
            rows.append({"setup": group.label, "mode": mode, "draft_ms": draft, "verify_ms": verify,
                         "other_ms": sum(s.step_ms for s in steps) / n - draft - verify,
                         "tokens_per_step": tau(steps)})
    return pd.DataFrame(rows, columns=["setup", "mode", "draft_ms", "verify_ms", "other_ms", "tokens_per_step"])
