"""One self-contained HTML page: the tables and the plots (embedded as base64 PNGs)."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path

from specbench.files import atomic_write_text
from specbench.report.build import Report

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.warn { color: #a60; }
"""

COLUMNS = ["setup", "runs", "prompts", "steps", "tau", "acceptance_rate", "draft_ms_per_step", "verify_ms_per_step",
           "overhead_ms_per_step", "tokens_per_s", "baseline_tokens_per_s", "speedup", "mbsu", "exact_match_rate"]


def _table(frame, columns) -> str:
    present = [c for c in columns if c in frame.columns]
    return frame[present].to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0)


def page(report: Report, plots: list[Path]) -> str:
    f = report.frames
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>specbench report</title><style>{STYLE}</style></head><body>",
             "<h1>specbench report</h1>",
             f"<p>{len(report.groups)} setup(s) from {sum(len(g.runs) for g in report.groups)} run(s); "
             f"generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}. "
             "τ counts the bonus token; acceptance = accepted / drafted; speedup = drafter tokens/s ÷ plain tokens/s in the same run.</p>"]
    for warning in report.warnings:
        parts.append(f"<p class='warn'>warning: {html.escape(warning)}</p>")
    parts += ["<h2>Setups</h2>", _table(f["overview"], COLUMNS + [c for c in f["overview"].columns if c.startswith("conditional_")])]
    parts += ["<h2>Runs</h2><ul>"] + [
        f"<li>{html.escape(g.label)}: {', '.join(html.escape(str(r.directory)) for r in g.runs)}</li>" for g in report.groups
    ] + ["</ul>"]
    parts += ["<h2>By category</h2>", _table(f["categories"], ["setup", "category", *COLUMNS[1:]])]
    if not f["tasks"].empty and (f["tasks"]["task"].nunique() != f["categories"]["category"].nunique()):
        parts += ["<h2>By task</h2>", _table(f["tasks"], ["setup", "task", *COLUMNS[1:]])]
    parts += ["<h2>Per-position acceptance</h2>", _table(f["positions"], ["setup", "position", "steps_reaching", "unconditional", "conditional"])]
    parts += ["<h2>Time per step (ms)</h2>", _table(f["step_times"], ["setup", "mode", "draft_ms", "verify_ms", "other_ms", "tokens_per_step"])]
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            data = base64.b64encode(plot.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(plot.stem.replace('_', ' '))}</h3><img alt='{html.escape(plot.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Report, plots: list[Path], path: Path) -> Path:
    atomic_write_text(path, page(report, plots))
    return path
