"""The `specbench` command line: parse, call, print. No logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specbench.errors import UserError

app = typer.Typer(
    help="Benchmark draft models for speculative decoding.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def parse_option(text: str) -> tuple[str, object]:
    """`key=value` with value read as JSON where it parses (ints, floats, bools, lists), else a string."""
    if "=" not in text:
        raise UserError(f"-o expects key=value (got '{text}')")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value


@app.command()
def run(
    target: Annotated[str, typer.Option(help="alias (see catalogue/targets.toml), hub id or local directory")] = "smollm2-135m",
    drafter: Annotated[str, typer.Option(help="a name from `specbench drafters`")] = "prompt-lookup",
    draft_model: Annotated[Optional[str], typer.Option(help="draft-model: alias, hub id or local directory")] = None,
    k: Annotated[Optional[int], typer.Option(help="tokens drafted per step (chain drafters)")] = None,
    max_ngram: Annotated[Optional[int], typer.Option(help="prompt-lookup: longest n-gram matched")] = None,
    min_ngram: Annotated[Optional[int], typer.Option(help="prompt-lookup: shortest n-gram matched")] = None,
    vocab_trim: Annotated[Optional[int], typer.Option(help="VocabTrim: keep only the N most frequent target tokens in the drafter's LM head")] = None,
    vocab_trim_from: Annotated[Optional[str], typer.Option(help="VocabTrim counts tokens in: a run dir, a target log, a workload, or an id list from `vocab-trim build`")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="any drafter option as key=value")] = None,
    workload: Annotated[str, typer.Option(help="a name from `specbench workloads`, or a .jsonl file (format detected)")] = "builtin",
    workload_file: Annotated[Optional[str], typer.Option(help="the published file a named workload reads (e.g. FastChat's question.jsonl for mt-bench)")] = None,
    categories: Annotated[Optional[list[str]], typer.Option("--categories", help="keep only these categories or tasks (comma-separated or repeated)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N prompts")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: measure every n-th prompt from the i-th; `report` merges the shards")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per turn at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy (lossless); > 0 = speculative sampling")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    baseline: Annotated[bool, typer.Option(help="also run plain decoding on the same prompts")] = True,
    warmup: Annotated[bool, typer.Option(help="one short untimed decode before measuring")] = True,
    out: Annotated[Path, typer.Option(help="directory under which the run directory is created")] = Path("results"),
    resume: Annotated[Optional[Path], typer.Option(help="continue an interrupted run directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a workload through target + drafter (and plain decoding) and print τ, acceptance, latency and speedup."""
    from specbench.runner import Benchmark, RunConfig, command_line, config_from_info
    from specbench.store import RunStore

    if resume:
        store = RunStore.open(resume)
        config = config_from_info(store.info)
        status = f"resuming {resume}"
    else:
        options = dict(parse_option(o) for o in option or [])
        given = {
            "draft_model": draft_model,
            "k": k,
            "max_ngram": max_ngram,
            "min_ngram": min_ngram,
            "vocab_trim": vocab_trim,
            "vocab_trim_from": vocab_trim_from,
        }
        options.update({name: value for name, value in given.items() if value is not None})
        config = RunConfig(
            target=target,
            drafter=drafter,
            drafter_options=options,
            workload=workload,
            workload_file=workload_file,
            categories=[c.strip() for text in categories for c in text.split(",") if c.strip()] if categories else None,
            limit=limit,
            shard=shard,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            dtype=dtype,
            device=device,
            baseline=baseline,
            warmup=warmup,
        )
        status = f"loading {config.target} and {config.drafter}"
    with err_console.status(status):
        bench = Benchmark(config)
    err_console.print(f"workload {bench.workload.describe()}; measuring {len(bench.prompts)}", highlight=False)
    if not resume:
        info = bench.run_info(command_line())
        store = RunStore.create(out / info.run_id, info)
    elif store.info.workload_hash != bench.run_info("").workload_hash:
        raise UserError(f"workload '{config.workload}' changed since {resume} started; start a new run instead")

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console
    )
    try:
        with progress:
            task = progress.add_task(f"{config.drafter} on {config.target}", total=len(bench.prompts))
            bench.run(store, on_prompt=lambda p: progress.advance(task))
    except KeyboardInterrupt:
        raise UserError(f"interrupted; finished prompts are saved: resume with `specbench run --resume {store.directory}`") from None
    show_run(store.directory, as_json)


def show_run(directory: Path, as_json: bool) -> None:
    from specbench.metrics import memory_model, summarise
    from specbench.report.tables import divergence_table, position_table, summary_table
    from specbench.store import RunStore

    store = RunStore.open(directory)
    warnings: list[str] = []
    steps, turns = store.load(warnings)
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    summary = summarise(steps, turns, memory_model(store.info.extra))
    if as_json:
        print(json.dumps({"run": str(directory), **summary.to_json()}, indent=2))
        return
    info = store.info
    title = f"{info.drafter} → {info.target} on {info.workload} ({info.environment.get('device_name')})"
    console.print(summary_table(summary, title))
    if summary.per_position:
        console.print(position_table(summary))
    if summary.diverged:
        console.print(divergence_table(summary))
    console.print(f"records: {directory}")


@app.command()
def drafters() -> None:
    """List the installed drafters (entry-point group specbench.drafters)."""
    from specbench.drafters.base import drafter_class, drafter_options, installed_drafters

    for name, entry in sorted(installed_drafters().items()):
        try:
            cls = drafter_class(name)
        except UserError as exc:
            console.print(f"[bold]{name}[/]  [red]{exc}[/]")
            continue
        options = ", ".join(
            f"{o.name}={o.default!r}" if o.default is not o.empty else o.name for o in drafter_options(cls).values()
        )
        console.print(f"[bold]{name}[/]  {cls.summary}  [dim](options: {options or 'none'}; {entry.value})[/]", soft_wrap=True)


vocab_trim_app = typer.Typer(help="VocabTrim id lists: the N target tokens a trimmed drafter head keeps.", no_args_is_help=True)
app.add_typer(vocab_trim_app, name="vocab-trim")


@vocab_trim_app.command("build")
def vocab_trim_build(
    source: Annotated[str, typer.Option("--from", help="a run dir, a target log (.jsonl) or a workload to count tokens in")],
    out: Annotated[Path, typer.Option(help="where to write the id list (.json)")],
    target: Annotated[str, typer.Option(help="the target whose tokenizer and vocabulary the list is for")] = "smollm2-135m",
    top: Annotated[Optional[int], typer.Option(help="keep this many ids (default: all, ranked, so runs can take any top N)")] = None,
) -> None:
    """Count token frequencies once and save the ranked id list for `--vocab-trim-from`."""
    from transformers import AutoConfig, AutoTokenizer

    from specbench.drafters.vocab_trim import ranked_ids, save_ids, token_counts
    from specbench.targets.loading import model_location

    location = model_location(target)
    tokenizer = AutoTokenizer.from_pretrained(location)
    vocab_size = AutoConfig.from_pretrained(location).vocab_size
    counts, counted = token_counts(source, tokenizer)
    ids = ranked_ids(counts, vocab_size)[:top]
    save_ids(out, ids, target, vocab_size, counted)
    console.print(f"{out}: {len(ids)} ids ranked by frequency in {counted} ({len(counts)} distinct tokens seen)")


@app.command()
def workloads() -> None:
    """List the workloads (catalogue/workloads.toml) and where each one's data comes from."""
    from specbench.workloads import data_dir, registry

    for name, entry in registry().items():
        if "file" in entry:
            where = "built in"
        else:
            local = data_dir() / entry["local"]
            found = "found" if local.is_file() else "not there yet"
            hub = f", else the hub dataset {entry['hub']}" if "hub" in entry else ""
            where = f"{entry['source']}: --workload-file PATH, or {local} ({found}){hub}"
        console.print(f"[bold]{name}[/]  {entry['summary']}  [dim]({where})[/]", soft_wrap=True, highlight=False)
    console.print(
        "any .jsonl file also works with --workload FILE: FastChat/Spec-Bench question.jsonl, HellaSwag, "
        "DSD {\"prompt\": ...}, or rows with a 'turns' list or a 'prompt' string; the format is detected and named",
        highlight=False,
    )


@app.command()
def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="run directories, or folders holding them (default: results/)")] = None,
    by: Annotated[str, typer.Option(help="setup, category, task or position: the breakdown shown and exported")] = "setup",
    csv: Annotated[Optional[Path], typer.Option(help="write the --by view as CSV")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="write the --by view as parquet")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="write PNG plots into this directory")] = None,
    html: Annotated[Optional[Path], typer.Option(help="write one self-contained HTML page with the tables and plots")] = None,
) -> None:
    """Tables per setup (target × drafter × options × hardware) over stored runs; shards of a run are merged."""
    from specbench.report.build import VIEWS, build, export
    from specbench.report.tables import breakdown_table, comparison_table, position_table, summary_table

    if by not in VIEWS:
        raise UserError(f"--by {by}: use one of {', '.join(VIEWS)}")
    result = build(runs or [Path("results")])
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    from specbench.report.frames import group_summary

    key = {"category": "categories", "task": "tasks"}.get(by)
    for group in result.groups:
        summary = group_summary(group)
        runs_note = f"{len(group.runs)} runs merged" if len(group.runs) > 1 else str(group.runs[0].directory)
        console.print(summary_table(summary, f"{group.label}\non {group.setup['workload']} ({runs_note})"))
        if by in ("setup", "position") and summary.per_position:
            console.print(position_table(summary))
        if key:
            frame = result.frames[key]
            console.print(breakdown_table(frame[frame.setup == group.label], by, f"by {by}"))
    if len(result.groups) > 1:
        console.print(comparison_table(result.frames["overview"]))
    for path in export(result.view(by), csv, parquet):
        console.print(f"wrote {path}")
    plots = []
    if plot or html:
        import tempfile

        from specbench.report.plots import write_plots

        plots = write_plots(result.frames, plot or Path(tempfile.mkdtemp(prefix="specbench-plots-")))
        if plot:
            console.print(f"wrote {len(plots)} plots to {plot}")
    if html:
        from specbench.report.html import write_html

        console.print(f"wrote {write_html(result, plots, html)}")


@app.command("export-answers")
def export_answers(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out: Annotated[Path, typer.Option(help="the model_answer JSONL to write (FastChat: data/mt_bench/model_answer/MODEL.jsonl)")],
    model_id: Annotated[Optional[str], typer.Option(help="model_id in the file (default: target+drafter)")] = None,
    mode: Annotated[str, typer.Option(help="spec (the drafter's answers) or baseline (plain decoding)")] = "spec",
) -> None:
    """Write a run's answers in FastChat's model_answer format, for FastChat's judge."""
    from specbench.answers import write_model_answers
    from specbench.records import BASELINE, SPEC
    from specbench.store import RunStore

    if mode not in (SPEC, BASELINE):
        raise UserError(f"--mode {mode}: use spec or baseline")
    n = write_model_answers(RunStore.open(run_dir), out, mode, model_id)
    console.print(f"wrote {n} answers to {out}")


def main() -> None:
    try:
        app()
    except UserError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
