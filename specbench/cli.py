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
    workload: Annotated[str, typer.Option(help="builtin, builtin-completion, or a .jsonl file")] = "builtin",
    limit: Annotated[Optional[int], typer.Option(help="use only the first N prompts")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per turn at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy (lossless); > 0 = speculative sampling")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    backend: Annotated[str, typer.Option(help="target backend: hf, or deepspeed (tensor parallel; see docs/deepspeed.md)")] = "hf",
    tp: Annotated[int, typer.Option(help="deepspeed: tensor-parallel ranks (GPUs, or processes on CPU)")] = 1,
    baseline: Annotated[bool, typer.Option(help="also run plain decoding on the same prompts")] = True,
    warmup: Annotated[bool, typer.Option(help="one short untimed decode before measuring")] = True,
    out: Annotated[Path, typer.Option(help="directory under which the run directory is created")] = Path("results"),
    resume: Annotated[Optional[Path], typer.Option(help="continue an interrupted run directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a workload through target + drafter (and plain decoding) and print τ, acceptance, latency and speedup."""
    from specbench.runner import Benchmark, RunConfig, config_from_info
    from specbench.store import RunStore
    from specbench.targets import deepspeed

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
            limit=limit,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            dtype=dtype,
            device=device,
            baseline=baseline,
            warmup=warmup,
            backend=backend,
            tp=tp,
        )
        status = f"loading {config.target} and {config.drafter}"
    if config.backend == "deepspeed" and deepspeed.needs_launcher(config.tp):
        Benchmark.check(config)  # bad input fails here, as one line, not once per rank
        sys.exit(deepspeed.relaunch(config.tp, config.device, sys.argv[1:]))
    with err_console.status(status):
        bench = Benchmark(config)
    if not bench.target.leads:
        return bench.target.follow()  # a tensor-parallel follower rank: rank 0 measures and prints
    try:
        measure_and_show(bench, config, store if resume else None, out, as_json)
    finally:
        bench.target.stop()


def measure_and_show(bench, config, store, out: Path, as_json: bool) -> None:
    from specbench.runner import command_line
    from specbench.store import RunStore

    resume = store is not None
    if not resume:
        info = bench.run_info(command_line())
        store = RunStore.create(out / info.run_id, info)
    elif store.info.workload_hash != bench.run_info("").workload_hash:
        raise UserError(f"workload '{config.workload}' changed since {store.directory} started; start a new run instead")

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
    """List the built-in workloads."""
    from specbench.workloads import BUILTIN

    for name, (_, description) in BUILTIN.items():
        console.print(f"[bold]{name}[/]  {description}")
    console.print("any .jsonl file with a 'turns' list or a 'prompt' string per line also works")


def main() -> None:
    try:
        app()
    except UserError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
