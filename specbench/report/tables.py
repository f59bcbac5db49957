"""Rich tables of metrics.Summary, shared by `run` and `report`."""

from __future__ import annotations

from rich.table import Table

from specbench.metrics import BatchSummary, Summary
from specbench.records import EngineFacts
from specbench.report import columns
from specbench.report.collect import setup_names


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def exact_match(summary: Summary) -> str:
    """e.g. "96.0% (2 near-ties, 0 divergences)": how the turns that differ were classified
    (runs that classified none — sampling, or written before the classification — show the rate alone)."""
    text = _fmt(summary.exact_match_rate, ".1%")
    if not summary.near_ties and not summary.divergences:
        return text
    parts = [_count(summary.near_ties, "near-tie"), _count(summary.divergences, "divergence")]
    unclassified = len(summary.diverged) - summary.near_ties - summary.divergences
    if unclassified:
        parts.append(f"{unclassified} not classified")
    return f"{text} ({', '.join(parts)})"


def summary_table(summary: Summary, title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("τ (mean accepted length, bonus incl.)", _fmt(summary.tau)),
        ("acceptance rate (accepted / drafted)", _fmt(summary.acceptance_rate, ".1%")),
        ("verification steps", str(summary.steps)),
        ("draft ms/step", _fmt(summary.draft_ms_per_step, ".2f")),
        ("verify ms/step", _fmt(summary.verify_ms_per_step, ".2f")),
        ("other ms/step (accept, KV, bookkeeping)", _fmt(summary.overhead_ms_per_step, ".2f")),
        ("c = draft / verify", _fmt(summary.cost_coefficient, ".3f")),
        ("TTFT ms (mean)", _fmt(summary.ttft_ms, ".1f")),
        ("tokens/s, speculative (overall)", _fmt(summary.tokens_per_s, ".1f")),
        ("tokens/s, plain decoding (overall)", _fmt(summary.baseline_tokens_per_s, ".1f")),
        ("speedup", _fmt(summary.speedup, ".2f", "×")),
        ("MBSU = τ / (c·γ + 1), c from weight bytes (model)", _fmt(summary.mbsu, ".2f", "×")),
        ("exact match vs plain decoding", exact_match(summary)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def batch_table(batch: BatchSummary) -> Table:
    """A run at --batch-size B > 1: aggregate throughput and the speedup at this B, then the per-request view."""
    refill = "refilled (continuous batching)" if batch.refill else "not refilled (static batches)"
    table = Table(title=f"batch {batch.size}, rows {refill}", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    spread = sorted(batch.row_tau)
    rows = [
        ("aggregate tokens/s, speculative", _fmt(batch.tokens_per_s, ".1f")),
        ("aggregate tokens/s, plain decoding at the same batch", _fmt(batch.baseline_tokens_per_s, ".1f")),
        ("speedup at this batch size", _fmt(batch.speedup, ".2f", "×")),
        ("per request ms/output token, speculative", _fmt(batch.ms_per_token, ".2f")),
        ("per request ms/output token, plain", _fmt(batch.baseline_ms_per_token, ".2f")),
        ("per request TTFT ms, speculative / plain", f"{_fmt(batch.ttft_ms, '.1f')} / {_fmt(batch.baseline_ttft_ms, '.1f')}"),
        ("τ overall (every row's steps)", _fmt(batch.tau)),
        ("acceptance rate overall", _fmt(batch.acceptance_rate, ".1%")),
        ("τ per row: min / median / max", " / ".join(_fmt(v) for v in (spread[0], spread[len(spread) // 2], spread[-1])) if spread else "n/a"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def batch_curve_table(frame, title: str) -> Table:
    """Speedup and aggregate throughput against batch size, one row per (drafter, B) of a
    `frames.batch_curve` frame (`run --batch-size 1,2,4` and `report` alike)."""
    several = frame["curve"].nunique() > 1
    table = Table(title=title if several or frame.empty else f"{title}: {frame['curve'].iloc[0]}", header_style="bold")
    keys = ["batch_size", "tokens_per_s", "baseline_tokens_per_s", "speedup", "tau", "exact_match_rate", "ms_per_token"]
    for key in (["curve"] if several else []) + keys:
        table.add_column("drafter" if key == "curve" else columns.header(key), justify="left" if key == "curve" else "right")
    for _, row in frame.iterrows():
        counts = [f"{int(row[k])} {word}{'' if row[k] == 1 else 's'}" for k, word in (("near_ties", "near-tie"), ("divergences", "divergence"))
                  if row[k] == row[k] and row[k]]  # NaN != NaN: a run that classified nothing
        cells = [columns.cell(k, row[k]) + (f" ({', '.join(counts)})" if k == "exact_match_rate" and counts else "") for k in keys]
        table.add_row(*([str(row["curve"])] if several else []), *cells)
    return table


def position_table(summary: Summary) -> Table:
    table = Table(title="per-position acceptance", header_style="bold")
    for column in ("position", "steps reaching it", "unconditional", "conditional"):
        table.add_column(column, justify="right")
    for rate in summary.per_position:
        table.add_row(str(rate.position), str(rate.steps), _fmt(rate.unconditional, ".1%"), _fmt(rate.conditional, ".1%"))
    return table


def divergence_table(summary: Summary) -> Table:
    """One row per turn that differs from plain decoding: where, and the target's top-2 on each path there."""
    table = Table(title="outputs that differ from plain decoding", header_style="bold")
    columns = ("prompt", "turn", "first differing token", "kind", "plain top-2 ids", "plain margin",
               "spec top-2 ids", "spec margin", "tie tolerance")
    for column in columns:
        table.add_column(column, justify="right")
    ids = lambda pair: "n/a" if pair is None else " > ".join(map(str, pair))  # noqa: E731
    for d in summary.diverged:
        table.add_row(d.prompt_id, str(d.turn), _fmt(d.position, "d"), d.kind or "not classified",
                      ids(d.plain_top2), _fmt(d.plain_margin, ".3g"), ids(d.spec_top2), _fmt(d.spec_margin, ".3g"),
                      _fmt(d.tolerance, ".3g"))
    return table


def simulation_table(reports, title: str) -> Table:
    """One row per simulated shape (k or tree), the best predicted speedup marked; with several batch
    sizes one row per (B, shape), tokens/s the aggregate of every row and the best marked per B."""
    table = Table(title=title, header_style="bold")
    batched = any(r.batch_size > 1 for r in reports)
    columns = (("B",) if batched else ()) + ("shape", "τ", "acceptance", "draft ms/step", "verify ms/step",
                                               "tokens/s (pred.)", "speedup (pred.)", "Leviathan expected", "MBSU")
    for column in columns:
        table.add_column(column, justify="right")
    best = {}
    for r in reports:
        if r.batch_size not in best or (r.summary.speedup or 0.0) > (best[r.batch_size].summary.speedup or 0.0):
            best[r.batch_size] = r
    for r in reports:
        s = r.summary
        tokens_per_s = r.aggregate_tokens_per_s if r.aggregate_tokens_per_s is not None else s.tokens_per_s
        table.add_row(
            *((str(r.batch_size),) if batched else ()),
            ("* " if best[r.batch_size] is r else "") + r.shape, _fmt(s.tau), _fmt(s.acceptance_rate, ".1%"),
            _fmt(s.draft_ms_per_step), _fmt(s.verify_ms_per_step), _fmt(tokens_per_s, ".1f"),
            _fmt(s.speedup, ".2f", "×"), _fmt(r.leviathan_speedup, ".2f", "×"), _fmt(s.mbsu, ".2f", "×"),
        )
    return table


def shown_points(frontier) -> list[int]:
    """The frontier's rows a table shows: every candidate; with candidates per depth (simulate/tune.py,
    drafts that depend on the shape) per depth its chain, its fastest and the chosen one."""
    points = frontier.points
    if not frontier.per_depth:
        return list(range(len(points)))
    keep = {frontier.best}
    for depth in {p.depth for p in points}:
        mine = [i for i, p in enumerate(points) if p.depth == depth]
        keep |= {mine[0], max(mine, key=lambda i: (points[i].speedup, -i))}
    return sorted(keep)


def frontier_table(frontier, title: str) -> Table:
    """`specbench tune`: one row per candidate (simulate/tune.py), the chosen one marked."""
    table = Table(title=title, header_style="bold")
    verified = frontier.points and frontier.points[0].verify_tau is not None
    columns = ["size", "depth", "width", "τ (pred.)", "draft ms", "verify ms", "tokens/s (pred.)", "speedup (pred.)"]
    columns += ["τ verify log", "speedup verify log"] if verified else []
    for column in columns:
        table.add_column(column, justify="right")
    for i in shown_points(frontier):
        p = frontier.points[i]
        row = [("* " if i == frontier.best else "") + str(p.size), str(p.depth), str(p.max_width), _fmt(p.tau, ".3f"),
               _fmt(p.draft_ms) + ("" if p.draft_timed else "~"), _fmt(p.verify_ms), _fmt(p.tokens_per_s, ".1f"),
               _fmt(p.speedup, ".2f", "×")]
        if verified:
            row += [_fmt(p.verify_tau, ".3f"), _fmt(p.verify_speedup, ".2f", "×")]
        table.add_row(*row)
    return table


def tune_report(result) -> list:
    """`specbench tune`: the frontier table, where the costs came from and the choice (the commands
    that check it are the command line's, flags.tune_commands; the frontier's plot is
    `plots.tuned_frontier`, drawn by the caller)."""
    f, chosen = result.frontier, result.chosen
    shape = f"k = {chosen.size}" if result.kind == "chain" else f"a {chosen.size}-node tree, depth {chosen.depth}, width {chosen.max_width}"
    per = ("per depth its chain and its fastest (every candidate in --json; each depth scored by the drafter built for it)"
           if f.per_depth else "per size")
    shown = [frontier_table(f, f"{result.drafter} on {result.log}: predicted {per} (* = chosen; ~ = draft ms interpolated)"),
             (f"latency: verify from {f.label}; draft {f.draft_source}; overhead {f.overhead_source}; "
              f"plain decoding {f.plain_tokens_per_s:.1f} tokens/s"),
             f"chosen: {shape}, τ {chosen.tau:.3f}, {chosen.speedup:.2f}× predicted" + (f"; written to {result.out}" if result.out else "")]
    return shown


# the columns of a breakdown and a comparison table, in order (headers and formats: report/columns.py)
BREAKDOWN = ["prompts", "tau", "acceptance_rate", "draft_ms_per_step", "verify_ms_per_step", "tokens_per_s",
             "baseline_tokens_per_s", "speedup", "exact_match_rate"]


def _frame_table(frame, first: str, header: str, title: str, names: dict[str, str] | None = None) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column(header)
    for key in BREAKDOWN:
        table.add_column(columns.header(key), justify="right")
    for _, row in frame.iterrows():
        name = str(row[first])
        table.add_row((names or {}).get(name, name), *(columns.cell(key, row[key]) for key in BREAKDOWN))
    return table


def breakdown_table(frame, key: str, title: str) -> Table:
    """Rows of one setup from a `frames.by_category` frame: one line per category (or task)."""
    return _frame_table(frame, key, key, title)


def comparison_table(frame, groups) -> Table:
    """One line per setup from a `frames.overview` frame, named by what tells it apart; what
    every setup shares is said once, in the title."""
    shared, names = setup_names(groups)
    said_once = " · ".join(words for key, words in shared.items() if not key.startswith("decode."))
    return _frame_table(frame, "setup", "setup", "setups compared" + (f": {said_once}" if said_once else ""), names)


def engine_line(e: EngineFacts | None) -> str | None:
    """The line `specbench run` shows about the fast engine's warm-up, apart from tokens/s."""
    e = e or EngineFacts()
    dtype = f" ({e.dtype}: {e.dtype_choice})" if e.dtype_choice != "given" else ""
    if e.engine != "fast":
        return f"eager engine{dtype}" if dtype else None
    capacity = f"KV cache {e.capacity} positions" if e.capacity else "KV cache"
    if e.cuda_graphs:
        line = f"fast engine{dtype}: {e.graphs} CUDA graphs captured in {e.capture_ms / 1000:.2f} s before timing; {capacity}"
    elif e.compiled_step:
        line = (f"fast engine{dtype}: compiled step, {e.compiles} graphs compiled in {e.compile_ms / 1000:.1f} s "
                f"before timing (fewer when inductor's cache had them); static {capacity}")
    elif e.packed_linears:
        lean = f", {e.lean_layers} layers in fewer operations" if e.lean_layers else ""
        kernels = "for oneDNN" if e.kernels in (None, "oneDNN") else f"(kernels: {e.kernels})"
        line = f"fast engine{dtype}: linear weights prepacked {kernels}{lean}, static {capacity}"
    else:
        line = f"fast engine{dtype}: static {capacity}, no CUDA graphs"
    if e.profile_ms and not e.cuda_graphs:
        line += f", verifies padded to the cheapest measured bucket (ms: {_profile_text(e.profile_ms)})"
    if e.timed_captures or e.timed_regrowths or e.timed_compiles:
        prompts = e.timed_capture_prompts
        line += (
            f"; inside timed prompts: {e.timed_captures} captures ({e.timed_capture_ms / 1000:.2f} s), "
            f"{e.timed_compiles} compilations ({e.timed_compile_ms / 1000:.2f} s) and "
            f"{e.timed_regrowths} cache regrowths, in {len(prompts)} prompt(s) ({', '.join(prompts[:3])}"
            f"{', ...' if len(prompts) > 3 else ''}): their timings include them"
        )
    return line


def _profile_text(profile: dict) -> str:
    return ", ".join(f"{bucket}: {ms:.1f}" for bucket, ms in sorted(profile.items(), key=lambda item: int(item[0])))


def group_note(group) -> str:
    """Which runs a setup's table pools, and which of them are unfinished (they cover part of the workload)."""
    note = f"{len(group.runs)} runs merged" if len(group.runs) > 1 else str(group.runs[0].directory)
    unfinished = [f"{r.directory.name}: {r.unfinished}" for r in group.runs if r.unfinished]
    return note + ("; UNFINISHED " + ", ".join(unfinished) if unfinished else "")
