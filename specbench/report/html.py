"""One self-contained HTML page: speedup, τ and exact match per drafter first, the detail below it.

What every setup shares (target, device, workload, decode settings) is said once
above the tables; each row names only its drafter and whatever else tells it
apart. The page fits a 1300 px screen (scripts/screenshot_report.py checks it in a
browser); the breakdowns fold. Every text that comes from a run is escaped.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from specbench.files import atomic_write_text
from specbench.records import BASELINE, SPEC
from specbench.report import columns
from specbench.report.collect import setup_names
from specbench.report.frames import Report

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.4em; font-size: 1.25em; }
.setup { color: #444; margin: 0 0 1em; } .setup b { color: #222; font-weight: 600; }
table { border-collapse: collapse; font-size: 14px; margin: 0.4em 0 0.6em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; vertical-align: top; }
thead th { background: #f4f4f4; border-bottom: 2px solid #bbb; white-space: nowrap; }
th.name, td.name { text-align: left; max-width: 30em; overflow-wrap: anywhere; }
tr.group th { text-align: left; background: #fafafa; font-weight: 600; padding-top: 8px; }
td.lead { font-weight: 600; } tr.best td { background: #eef7ee; }
.note { color: #555; font-size: 13px; display: grid; grid-template-columns: max-content 1fr max-content 1fr; gap: 0.1em 0.6em; }
.note dt { font-weight: 600; } .note dd { margin: 0; }
.warn { background: #fff6e5; border-left: 4px solid #e0a030; padding: 0.4em 0.8em; margin: 0.6em 0; }
details { margin: 0.8em 0; } summary { cursor: pointer; font-size: 1.1em; font-weight: 600; padding: 0.3em 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
.plots figure { margin: 0; } .plots img { max-width: 100%; border: 1px solid #eee; }
"""

# what a reader came for, then what it cost
HEADLINE = ["speedup", "tau", "exact_match_rate", "acceptance_rate", "tokens_per_s", "baseline_tokens_per_s", "prompts"]
COSTS = ["draft_ms_per_step", "verify_ms_per_step", "overhead_ms_per_step", "cost_coefficient", "mbsu", "steps", "runs"]
CURVE = ["speedup", "tokens_per_s", "baseline_tokens_per_s", "tau", "exact_match_rate", "ms_per_token", "prompts"]
BREAKDOWN = ["speedup", "tau", "exact_match_rate", "acceptance_rate", "tokens_per_s", "baseline_tokens_per_s",
             "draft_ms_per_step", "verify_ms_per_step", "prompts"]


def _cell(key: str, value, row=None) -> str:
    text = columns.cell(key, value)
    if key == "exact_match_rate" and row is not None:  # how the answers that differ were classified, where they were
        counts = (("near_ties", "near-tie"), ("divergences", "divergence"))
        kinds = [f"{int(row[k])} {word}{'' if row[k] == 1 else 's'}" for k, word in counts if k in row and pd.notna(row[k]) and row[k]]
        text += f" ({', '.join(kinds)})" if kinds else ""
    return f"<td{' class=lead' if key in ('speedup', 'tau', 'exact_match_rate') else ''}>{html.escape(text)}</td>"


def _head(first: str, keys: list[str]) -> str:
    cells = [f"<th class=name>{html.escape(first)}</th>"]
    for key in keys:
        meaning = columns.COLUMNS[key].meaning if key in columns.COLUMNS else ""
        title = f" title='{html.escape(meaning, quote=True)}'" if meaning else ""
        cells.append(f"<th{title}>{html.escape(columns.header(key))}</th>")
    return f"<thead><tr>{''.join(cells)}</tr></thead>"


def setup_table(frame: pd.DataFrame, keys: list[str], names: dict[str, str], best: bool = False) -> str:
    """One row per setup, named by its short name; `best` shades the highest measured speedup."""
    top = frame["speedup"].astype(float).idxmax() if best and len(frame) > 1 and frame["speedup"].notna().any() else None
    rows = []
    for index, row in frame.iterrows():
        shade = " class=best" if index == top else ""
        name = html.escape(names.get(row["setup"], row["setup"]))
        rows.append(f"<tr{shade}><td class=name>{name}</td>{''.join(_cell(k, row.get(k), row) for k in keys)}</tr>")
    return f"<table>{_head('drafter', keys)}<tbody>{''.join(rows)}</tbody></table>"


def grouped_table(frame: pd.DataFrame, key: str, keys: list[str], names: dict[str, str]) -> str:
    """Rows of several setups under one header row per setup (its short name), first column `key`."""
    keys = [k for k in keys if k in frame.columns]
    rows = []
    order = {label: i for i, label in enumerate(names)}  # the headline table's order
    for setup, part in sorted(frame.groupby("setup", sort=False), key=lambda item: order.get(item[0], len(order))):
        rows.append(f"<tr class=group><th colspan={len(keys) + 1}>{html.escape(names.get(setup, setup))}</th></tr>")
        for _, row in part.iterrows():
            first = row[key]
            shown = columns.cell(key, first) if key in columns.COLUMNS else str(first)
            rows.append(f"<tr><td class=name>{html.escape(shown)}</td>{''.join(_cell(k, row[k], row) for k in keys)}</tr>")
    return f"<table>{_head(key, keys)}<tbody>{''.join(rows)}</tbody></table>"


def _definitions(keys: list[str]) -> str:
    items = "".join(f"<dt>{html.escape(columns.header(k))}</dt><dd>{html.escape(columns.COLUMNS[k].meaning)}</dd>"
                    for k in keys if columns.COLUMNS[k].meaning)
    return f"<dl class=note>{items}</dl>"


def _folded(title: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(title)}</summary>{body}</details>"


def _runs(report: Report, names: dict[str, str]) -> str:
    items = []
    for group in report.groups:
        runs = ", ".join(html.escape(str(r.directory)) + (f" (unfinished: {html.escape(r.unfinished)})" if r.unfinished else "")
                         for r in group.runs)
        options = html.escape(json.dumps(group.setup["drafter_options"], sort_keys=True))
        items.append(f"<li><b>{html.escape(names[group.label])}</b>: {runs}<br><small>setup: {html.escape(group.label)}; "
                     f"options {options}</small></li>")
    return f"<ul>{''.join(items)}</ul>"


def _plots(plots: list[Path]) -> str:
    figures = []
    for plot in plots:
        data = base64.b64encode(plot.read_bytes()).decode()
        figures.append(f"<figure><img alt='{html.escape(plot.stem.replace('_', ' '))}' src='data:image/png;base64,{data}'></figure>")
    return f"<div class=plots>{''.join(figures)}</div>"


def page(report: Report, plots: list[Path]) -> str:
    f = report.frames
    shared, names = setup_names(report.groups)
    overview = f["overview"]
    if overview["speedup"].notna().any():  # the fastest first; setups without a baseline keep their order, last
        overview = overview.sort_values("speedup", ascending=False, na_position="last", kind="stable")
    names = {label: names[label] for label in overview["setup"]}  # in the order shown
    n_runs = sum(len(g.runs) for g in report.groups)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
         f"<title>specbench report</title><style>{STYLE}</style></head><body>"),
        "<h1>specbench report</h1>",
        f"<p class=setup>{len(report.groups)} setup(s) from {n_runs} run(s)"
        + (": " + " · ".join(f"<b>{html.escape(w)}</b>" for k, w in shared.items() if not k.startswith("decode.")) if shared else "")
        + f". Generated {generated}.<br>"
        + " · ".join(html.escape(w) for k, w in shared.items() if k.startswith("decode.")) + "</p>",
    ]
    parts += [f"<p class=warn>warning: {html.escape(w)}</p>" for w in report.warnings]
    parts += ["<h2>Per drafter</h2>", setup_table(overview, HEADLINE, names, best=True), _definitions(HEADLINE)]
    parts += ["<h2>Cost per verification step</h2>", setup_table(overview, COSTS, names), _definitions(COSTS[:3] + ["mbsu"])]
    if not f["batch_curve"].empty:  # setups run at several batch sizes (frames.batch_curve)
        curve = f["batch_curve"].assign(setup=f["batch_curve"]["curve"])
        parts += ["<h2>Against batch size</h2>", grouped_table(curve, "batch_size", CURVE, {}), _definitions(["batch_size", "ms_per_token"])]
    if plots:
        parts.append(_folded("Plots", _plots(plots), open_=True))
    if not f["categories"].empty:
        parts.append(_folded("By category", grouped_table(f["categories"], "category", BREAKDOWN, names)))
    if not f["tasks"].empty and f["tasks"]["task"].nunique() != f["categories"]["category"].nunique():
        parts.append(_folded("By task", grouped_table(f["tasks"], "task", BREAKDOWN, names)))
    if not f["positions"].empty:
        parts.append(_folded("Acceptance per draft position",
                             grouped_table(f["positions"], "position", ["steps_reaching", "unconditional", "conditional"], names)
                             + _definitions(["unconditional", "conditional"])))
    if not f["step_times"].empty:
        times = f["step_times"].assign(mode=f["step_times"]["mode"].map({SPEC: "drafter", BASELINE: "plain decoding"}))
        parts.append(_folded("Time per verification step",
                             grouped_table(times, "mode", ["draft_ms", "verify_ms", "other_ms", "tokens_per_step"], names)))
    parts.append(_folded("Runs", _runs(report, names)))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Report, plots: list[Path], path: Path) -> Path:
    atomic_write_text(path, page(report, plots))
    return path
