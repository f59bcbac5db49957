"""PNG plots of the report frames (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from specbench.files import atomic_write, write_lock  # noqa: E402
from specbench.records import BASELINE, SPEC  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def _short(label: str, width: int = 48) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def speedup_by_category(categories: pd.DataFrame, path: Path) -> Path | None:
    """Bars: speedup per category, one bar per setup (drafter); None when no run has a baseline."""
    table = categories.pivot_table(index="category", columns="setup", values="speedup", aggfunc="first")
    if table.empty or table.isna().all().all():  # --no-baseline runs: no speedup was measured
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(table) * max(1, len(table.columns) / 2) + 2), 4.5))
    table.rename(columns=_short).plot.bar(ax=ax, rot=30)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel("speedup vs plain decoding (×)")
    ax.set_title("Speedup per category")
    ax.legend(fontsize=7)
    return _save(fig, path)


def tau_vs_draft_latency(overview: pd.DataFrame, path: Path) -> Path:
    """The DSD view: τ against draft ms per step; the frontier joins setups no other beats on both."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for _, row in overview.iterrows():
        ax.scatter(row.draft_ms_per_step, row.tau, s=40)
        ax.annotate(_short(row.setup, 40), (row.draft_ms_per_step, row.tau), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    points = overview.sort_values(["draft_ms_per_step", "tau"], ascending=[True, False])
    frontier, best = [], float("-inf")
    for _, row in points.iterrows():
        if row.tau > best:
            frontier.append((row.draft_ms_per_step, row.tau))
            best = row.tau
    if len(frontier) > 1:
        ax.plot(*zip(*frontier), color="black", linewidth=0.8, linestyle=":", label="frontier")
        ax.legend(fontsize=7)
    ax.set_xlabel("draft ms per step")
    ax.set_ylabel("τ (tokens per verification step)")
    ax.set_title("τ vs draft latency")
    return _save(fig, path)


def acceptance_by_position(positions: pd.DataFrame, path: Path) -> Path:
    """Per-position acceptance: conditional (solid) and unconditional (dashed), one colour per setup."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (setup, rows) in enumerate(positions.groupby("setup", sort=False)):
        colour = f"C{i % 10}"
        ax.plot(rows.position, rows.conditional, marker="o", color=colour, label=_short(setup) + " (conditional)")
        ax.plot(rows.position, rows.unconditional, marker=".", linestyle="--", color=colour, label="unconditional")
    ax.set_xlabel("draft position (depth)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    if len(positions):
        ax.set_xticks(sorted(positions.position.unique()))
    ax.set_title("Acceptance per position")
    ax.legend(fontsize=6)
    return _save(fig, path)


def time_per_step(step_times: pd.DataFrame, path: Path) -> Path:
    """Stacked bars: draft vs verify vs other ms per step, for each drafter and for plain decoding."""
    rows = step_times.copy()
    rows["name"] = [_short(s, 40) + (" · plain" if m == BASELINE else "") for s, m in zip(rows.setup, rows["mode"])]
    rows = rows.drop_duplicates("name")
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(rows)))
    left = [0.0] * len(rows)
    for column, colour in (("draft_ms", "C1"), ("verify_ms", "C0"), ("other_ms", "C7")):
        ax.barh(rows.name, rows[column], left=left, color=colour, label=column.removesuffix("_ms"))
        left = [a + b for a, b in zip(left, rows[column])]
    ax.set_xlabel("ms per verification step")
    ax.set_title("Time per step")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))  # below the axis: the bars fill it
    ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path)


def tokens_per_s_distribution(prompts: pd.DataFrame, path: Path) -> Path:
    """Box plots of per-prompt tokens/s, drafter and plain decoding side by side."""
    data, names = [], []
    for setup, rows in prompts.groupby("setup", sort=False):
        for mode, name in ((SPEC, "drafter"), (BASELINE, "plain")):
            values = rows[rows["mode"] == mode].tokens_per_s.dropna()
            if len(values):
                data.append(values)
                names.append(f"{_short(setup, 34)}\n{name}")
    fig, ax = plt.subplots(figsize=(min(max(6, 0.9 * len(data)), 10), 4.5))  # at most 10 in: legible in the page's half width
    ax.boxplot(data, tick_labels=names)
    ax.set_ylabel("tokens/s per prompt")
    ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    ax.set_title("tokens/s over prompts")
    return _save(fig, path)


def against_batch_size(curve: pd.DataFrame, path: Path) -> Path | None:
    """Two panels against batch size (log2 axis), one colour per drafter (frames.batch_curve): the
    speedup over plain decoding at the same B, and aggregate tokens/s (drafter solid, plain dashed).
    None when no setup was run at more than one batch size."""
    if curve.empty:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, rows) in enumerate(curve.groupby("curve", sort=False)):
        colour, label = f"C{i % 10}", _short(name)
        rows = rows.sort_values("batch_size")
        if rows.speedup.notna().any():
            left.plot(rows.batch_size, rows.speedup, marker="o", color=colour, label=label)
        right.plot(rows.batch_size, rows.tokens_per_s, marker="o", color=colour, label=label)
        if rows.baseline_tokens_per_s.notna().any():
            right.plot(rows.batch_size, rows.baseline_tokens_per_s, marker=".", linestyle="--", color=colour, label=f"plain ({label})")
    sizes = sorted(curve.batch_size.unique())
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for ax, ylabel in ((left, "speedup vs plain decoding at the same B (×)"), (right, "aggregate tokens/s (every row)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(int(b)) for b in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    left.set_title("Speedup against batch size")
    right.set_title("Throughput against batch size")
    return _save(fig, path)


PLOTS = {
    "speedup_by_category.png": ("categories", speedup_by_category),
    "tau_vs_draft_ms.png": ("overview", tau_vs_draft_latency),
    "acceptance_by_position.png": ("positions", acceptance_by_position),
    "time_per_step.png": ("step_times", time_per_step),
    "tokens_per_s.png": ("prompts", tokens_per_s_distribution),
    "against_batch_size.png": ("batch_curve", against_batch_size),
}


def write_plots(frames: dict[str, pd.DataFrame], directory: Path, names: dict[str, str] | None = None) -> list[Path]:
    """The plots the runs can show (a plot with nothing measured to draw is left out); `names`
    (setup label → short name, collect.setup_names) names the setups in the legends."""
    directory.mkdir(parents=True, exist_ok=True)
    rename = (lambda frame: frame.assign(setup=frame["setup"].map(lambda s: names.get(s, s)))) if names else (lambda frame: frame)
    written = [plot(rename(frames[frame]), directory / name) for name, (frame, plot) in PLOTS.items()]
    return [path for path in written if path is not None]


def tune_frontiers(frontiers, path: Path, title: str = "") -> Path:
    """`specbench tune`: predicted τ and speedup against tree size (or k), one line per frontier
    (e.g. one per latency profile), the chosen size of each marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, frontier in enumerate(frontiers):
        colour = f"C{i % 10}"
        label = _short(frontier.label, 60)
        # candidates per depth (drafts that depend on the shape): one line per depth, the first labelled
        depths = sorted({p.depth for p in frontier.points}) if frontier.per_depth else [None]
        for j, depth in enumerate(depths):
            points = [p for p in frontier.points if depth is None or p.depth == depth]
            sizes = [p.size for p in points]
            shown = label if j == 0 else None
            left.plot(sizes, [p.tau for p in points], color=colour, marker=".", label=shown, alpha=1 if depth is None else 0.7)
            if points[0].verify_tau is not None:
                left.plot(sizes, [p.verify_tau for p in points], color=colour, linestyle="--", label="verification log" if j == 0 else None)
            right.plot(sizes, [p.speedup for p in points], color=colour, marker=".", label=shown, alpha=1 if depth is None else 0.7)
        chosen = frontier.chosen
        right.scatter([chosen.size], [chosen.speedup], color=colour, s=90, marker="*", zorder=3)
        right.annotate(f"n={chosen.size}: {chosen.speedup:.2f}×", (chosen.size, chosen.speedup), fontsize=8,
                       xytext=(5, 5), textcoords="offset points", color=colour)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for ax, ylabel in ((left, "τ predicted (tokens per step)"), (right, "speedup predicted vs plain (×)")):
        ax.set_xlabel("draft size (tree nodes, or chain k)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title or "specbench tune: the frontier per latency profile")
    return _save(fig, path)


def tuned_frontier(result, path: Path) -> Path:
    """`specbench tune --plot`: the frontier of one tuning result."""
    with write_lock(path):  # one writer of the plot: a second tune drawing it is refused
        return tune_frontiers([result.frontier], path, f"{result.drafter}: tuned on {result.log}")
