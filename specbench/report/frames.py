"""The report's numbers as pandas DataFrames: one row per setup, per (setup, category), per (setup, position), per prompt.

Every figure comes from `specbench.metrics`; the console tables, CSV/parquet
exports, plots and the HTML page all read these frames, so they agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from specbench.metrics import Summary, batch_summary, memory_model, summarise, tau
from specbench.records import BASELINE, SPEC
from specbench.report.collect import Group, drafter_name, setup_names

METRICS = [
    "tau", "acceptance_rate", "draft_ms_per_step", "verify_ms_per_step", "overhead_ms_per_step",
    "cost_coefficient", "tokens_per_s", "baseline_tokens_per_s", "speedup", "mbsu", "exact_match_rate",
    "near_ties", "divergences",
]


# --by value -> the frame it shows
VIEWS = {"setup": "overview", "category": "categories", "task": "tasks", "position": "positions", "batch": "batch_curve"}


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
        "batch_curve": batch_curve(groups),
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


# the decode settings a batch-size curve runs along: setups that differ only in these are one curve
# (the engine too: B = 1 runs on the one-row engine, B > 1 on the batch engine, docs/batch.md)
ALONG_BATCH = ("batch_size", "refill", "engine")
CURVE = ["curve", "setup", "batch_size", "refill", "tokens_per_s", "baseline_tokens_per_s", "speedup", "tau",
         "exact_match_rate", "near_ties", "divergences", "ms_per_token", "prompts"]


def batch_curve(groups: list[Group]) -> pd.DataFrame:
    """Speedup and aggregate throughput against batch size: one row per (curve, B), a curve being the
    setups that differ only in batch size (and the engine it implies), one curve per refill mode.
    Throughput at B > 1 is the aggregate of every row (metrics.BatchSummary: every output token over
    the batch decodes' wall time), at B = 1 the run's tokens/s; the speedup is against plain decoding
    at the same B in the same run. A B = 1 point belongs to both refill modes' curves. A setup with
    a single batch size has no curve and no row here."""
    curves: dict[str, list[Group]] = {}
    for group in groups:
        setup = {**group.setup, "decode": {k: v for k, v in group.setup["decode"].items() if k not in ALONG_BATCH}}
        curves.setdefault(json.dumps(setup, sort_keys=True, default=str), []).append(group)
    curves = {key: members for key, members in curves.items()
              if len({m.setup["decode"].get("batch_size", 1) for m in members}) > 1}
    names = setup_names([Group(json.loads(key)) for key in curves])[1] if len(curves) > 1 else {}
    rows = []
    for key, members in curves.items():
        curve = Group(json.loads(key))
        name = names.get(curve.label, drafter_name(curve))
        refills = sorted({m.setup["decode"].get("refill", True) for m in members if m.setup["decode"].get("batch_size", 1) > 1},
                         reverse=True)
        for refill in refills:
            line = name if refills == [True] else f"{name} · {'refill' if refill else 'no refill'}"
            points = {}
            for member in members:
                size = member.setup["decode"].get("batch_size", 1)
                if size > 1 and member.setup["decode"].get("refill", True) != refill:
                    continue
                points.setdefault(size, member)  # two setups at one B (B = 1 on two engines): the first
            for size, member in sorted(points.items()):
                rows.append({"curve": line, "setup": member.label, "batch_size": size, "refill": refill if size > 1 else None,
                             **_curve_point(member)})
    return pd.DataFrame(rows, columns=CURVE)


def _curve_point(group: Group) -> dict:
    summary = group_summary(group)
    batch = batch_summary(group.batch, group.steps, group.turns) if group.batch else None
    source = batch or summary
    spec = [t for t in group.turns if t.mode == SPEC and t.new_tokens]
    # a simulated run at B holds one row's records (simulate/predict.py): every row busy, the aggregate is B times its tokens/s
    rows = group.setup["decode"].get("batch_size", 1) if group.setup["decode"].get("simulated") else 1
    times = lambda value: None if value is None else value * rows  # noqa: E731
    return {"tokens_per_s": times(source.tokens_per_s), "baseline_tokens_per_s": times(source.baseline_tokens_per_s), "speedup": source.speedup,
            "tau": summary.tau, "exact_match_rate": summary.exact_match_rate,
            "near_ties": summary.near_ties, "divergences": summary.divergences,
            "ms_per_token": batch.ms_per_token if batch else (sum(t.wall_ms / t.new_tokens for t in spec) / len(spec) if spec else None),
            "prompts": len({t.prompt_id for t in spec})}
