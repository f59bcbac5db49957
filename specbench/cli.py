"""The `specbench` command line: parse, call the library, print. No logic of its own.

The drafter option flags of `run` and `simulate` (`--k`, `--heads`, ...) are not
written here: they are generated from the options every installed drafter
declares (engine/options.py), so a plugin's options get flags too.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from specbench.errors import UserError

app = typer.Typer(help="Benchmark draft models for speculative decoding.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)
PYTHON_SHOWWARNING = warnings.showwarning
DEVICE = "auto, cpu, cuda, cuda:N"
DTYPE = "auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16"


class RichProgress:
    """specbench.progress.Progress drawn on stderr (stdout is for results, e.g. --json)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[text]}"), console=err_console)

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def status(self, text: str):
        return err_console.status(escape(text))

    def task(self, description: str, total: int):
        task = self.bar.add_task(escape(description), total=total, text="")
        return lambda n=1, **fields: self.bar.update(task, advance=n, text=escape(" ".join(str(v) for v in fields.values())))

    def note(self, text: str) -> None:
        self.bar.console.print(escape(text), highlight=False)


def parse_option(text: str) -> tuple[str, str]:
    """`-o key=value`: the value stays text; the drafter's declared type parses it."""
    if "=" not in text:
        raise UserError(f"-o expects key=value (got '{text}')")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value


def with_drafter_flags(command):
    """Give a command one typed `--flag` per drafter option any installed drafter declares; the
    values given reach the command as `drafter_flags` (name -> value), with every `-o key=value`."""
    from specbench.drafters.registry import option_flags

    signature = inspect.signature(command, eval_str=True)
    flags = {name: spec for name, spec in option_flags().items() if name not in signature.parameters}
    generated = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[spec.type],  # noqa: UP045 - typer reads Optional
            typer.Option(spec.flag, help=spec.help + (f" ({spec.bounds()})" if spec.bounds() else ""), rich_help_panel="Drafter options"),
        ])
        for name, spec in flags.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name, None) for name in flags}
        given = {name: value for name, value in values.items() if value is not None}
        given |= dict(parse_option(o) for o in kwargs.pop("option") or [])
        return command(**kwargs, option=None, drafter_flags=given)

    parameters = [p for p in signature.parameters.values() if p.name != "drafter_flags"]
    wrapper.__signature__ = signature.replace(parameters=parameters + generated)
    return wrapper


def split_list(values: list[str] | None) -> list[str]:
    """--x a,b --x c -> [a, b, c]"""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


Option = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="any drafter option as key=value")]


@app.command()
@with_drafter_flags
def run(
    target: Annotated[str, typer.Option(help="alias (see catalogue/targets.toml), hub id or local directory")] = "smollm2-135m",
    drafter: Annotated[str, typer.Option(help="a name from `specbench drafters`")] = "prompt-lookup",
    option: Option = None,
    workload: Annotated[str, typer.Option(help="a name from `specbench workloads`, or a .jsonl file (format detected)")] = "builtin",
    workload_file: Annotated[Optional[str], typer.Option(help="the published file a named workload reads (e.g. FastChat's question.jsonl for mt-bench)")] = None,
    categories: Annotated[Optional[list[str]], typer.Option("--categories", help="keep only these categories or tasks (comma-separated or repeated)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N prompts")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: measure every n-th prompt from the i-th; `report` merges the shards")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per turn at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy (lossless); > 0 = speculative sampling (chains) or typical acceptance (head drafters, lossy)")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    engine: Annotated[str, typer.Option(help="auto (fast on CUDA, eager on CPU), eager (DynamicCache), fast (static KV cache; CUDA graphs on CUDA)")] = "auto",
    backend: Annotated[str, typer.Option(help="target backend: hf, or deepspeed (tensor parallel; see docs/deepspeed.md)")] = "hf",
    tp: Annotated[int, typer.Option(help="deepspeed: tensor-parallel ranks (GPUs, or processes on CPU)")] = 1,
    baseline: Annotated[bool, typer.Option(help="also run plain decoding on the same prompts")] = True,
    warmup: Annotated[bool, typer.Option(help="one short untimed decode (and on CUDA the graph captures) before measuring")] = True,
    out: Annotated[Path, typer.Option(help="directory under which the run directory is created")] = Path("results"),
    resume: Annotated[Optional[Path], typer.Option(help="continue an interrupted run directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    drafter_flags: dict[str, Any] | None = None,
) -> None:
    """Run a workload through target + drafter (and plain decoding) and print τ, acceptance, latency and speedup."""
    from specbench import runner
    from specbench.drafters.registry import typed_options
    from specbench.targets import deepspeed

    if resume:
        config = runner.config_from_info(runner.RunStore.open(resume).info)
    else:
        config = runner.RunConfig(
            target=target, drafter=drafter, drafter_options=typed_options(drafter, drafter_flags or {}), workload=workload,
            workload_file=workload_file, categories=split_list(categories) or None, limit=limit, shard=shard,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, dtype=dtype, device=device, engine=engine,
            baseline=baseline, warmup=warmup, backend=backend, tp=tp,
        )
    if config.backend == "deepspeed" and deepspeed.needs_launcher(config.tp):
        runner.check(config)  # bad input fails here, as one line, not once per rank
        sys.exit(deepspeed.relaunch(config.tp, config.device, sys.argv[1:]))
    with RichProgress() as progress:
        directory = runner.resume_run(resume, progress) if resume else runner.start_run(config, out, progress)
    if directory is not None:  # None: a tensor-parallel follower rank; rank 0 prints
        show_run(directory, as_json)


def show_run(directory: Path, as_json: bool) -> None:
    from specbench.report.build import run_summary
    from specbench.report.tables import divergence_table, position_table, summary_table

    info, summary, notes = run_summary(directory)
    for warning in notes:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps({"run": str(directory), **summary.to_json()}, indent=2))
        return
    console.print(summary_table(summary, escape(f"{info.drafter} → {info.target} on {info.workload} ({info.environment.get('device_name')})")))
    if summary.per_position:
        console.print(position_table(summary))
    if summary.diverged:
        console.print(divergence_table(summary))
    console.print(f"records: {escape(str(directory))}")


@app.command()
def drafters() -> None:
    """List the installed drafters (entry-point group specbench.drafters) and the options each declares."""
    from specbench.drafters.registry import drafter_class, installed_drafters

    for name, entry in sorted(installed_drafters().items()):
        try:
            cls = drafter_class(name)
        except UserError as exc:
            console.print(f"[bold]{escape(name)}[/]  [red]{escape(str(exc))}[/]")
            continue
        console.print(f"[bold]{escape(name)}[/]  {escape(cls.summary)}  [dim]({escape(entry.value)}; drafts a {cls.drafts})[/]", soft_wrap=True)
        for spec in cls.Options.specs().values():
            console.print(f"    {spec.flag} / -o {escape(spec.describe())}", soft_wrap=True, highlight=False)


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
    from specbench.drafters.vocab_trim import build_id_list

    ids, counted, distinct = build_id_list(source, out, target, top)
    console.print(escape(f"{out}: {len(ids)} ids ranked by frequency in {counted} ({distinct} distinct tokens seen)"))


@app.command("train-data")
def train_data(
    out: Annotated[Path, typer.Option(help="the data directory to write")],
    target: Annotated[str, typer.Option(help="the target whose own answers become the training data")] = "smollm2-135m",
    workload: Annotated[str, typer.Option(help="prompts: pool-train (built-in, offline), a .jsonl workload or a ShareGPT-layout .json/.jsonl")] = "pool-train",
    max_new_tokens: Annotated[int, typer.Option(help="answer length cap per turn")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy answers; > 0 = sampled")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="prompts generated together")] = 16,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N prompts")] = None,
    cache_hidden: Annotated[bool, typer.Option(help="also store the target's final hidden states (fp16), so head training skips the target body")] = True,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing data directory")] = False,
) -> None:
    """Self-distillation data: the target's own answers to a prompt pool, tokenised for `specbench train`."""
    from specbench.runner import command_line
    from specbench.train.data import make_data_for

    with RichProgress() as progress:
        meta = make_data_for(target, workload, out, device, dtype, progress, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=batch_size, seed=seed, limit=limit, cache_hidden=cache_hidden, overwrite=overwrite,
                             command=command_line())
    console.print(escape(f"{out}: {meta['sequences']} sequences, {meta['tokens']} tokens ({meta['answer_tokens']} answer tokens) "
                         f"from {meta['prompts']} prompts of {workload} in {meta['seconds']} s"))


def deprecated(old: str, new: str):
    """A hidden option under an old name that still works for one release, with a one-line note."""
    return typer.Option(old, hidden=True, help=f"deprecated spelling of {new}")


@app.command()
def train(
    drafter: Annotated[str, typer.Option(help="what to train: draft-model, medusa, hydra, hydra-decoder")],
    data: Annotated[Path, typer.Option(help="a data directory from `specbench train-data` (same target)")],
    out: Annotated[Path, typer.Option(help="the checkpoint directory to write")],
    target: Annotated[str, typer.Option(help="the frozen target the drafter is trained for")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 200,
    batch_tokens: Annotated[int, typer.Option(help="answer tokens per optimiser step (whole sequences, packed)")] = 2048,
    max_length: Annotated[int, typer.Option(help="cut sequences to this many tokens")] = 1024,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate (AdamW); default per drafter (5e-4 for hydra, 1e-3 otherwise)")] = None,
    warmup_steps: Annotated[int, typer.Option(help="linear learning-rate warmup steps, then cosine decay")] = 20,
    min_lr_ratio: Annotated[float, typer.Option(help="the cosine ends at this fraction of --lr")] = 0.33,
    eval_every: Annotated[int, typer.Option(help="teacher-forced acceptance on held-out data every N steps")] = 50,
    eval_data: Annotated[Optional[Path], typer.Option(help="held-out data directory (e.g. train-data on pool-heldout); default: hold out --eval-fraction of --data")] = None,
    eval_fraction: Annotated[float, typer.Option(help="fraction of --data sequences held out when no --eval-data")] = 0.1,
    layers: Annotated[int, typer.Option(help="draft-model: how many of the target's first layers the draft keeps")] = 1,
    k: Annotated[int, typer.Option(help="draft-model: chain length the acceptance estimate assumes")] = 4,
    num_heads: Annotated[int, typer.Option(help="medusa/hydra/hydra-decoder: number of heads")] = 4,
    tie_lm_head: Annotated[bool, typer.Option(help="heads read the target's LM head (no LM head of their own; hydra: no embedding copy either): small checkpoints")] = False,
    decoder_layers: Annotated[int, typer.Option(help="hydra-decoder: trunk layers, copied from the target's last N")] = 1,
    hydra_layers: Annotated[int, typer.Option(help="hydra: ResBlocks per head (the first grounded, the rest one shared block)")] = 4,
    train_vocab: Annotated[str, typer.Option(help="all: losses over the whole vocabulary; seen: only over ids the training data contains (an order of magnitude cheaper on large vocabularies; evaluation stays full)")] = "all",
    seed: Annotated[int, typer.Option(help="seed for shuffling and initialisation")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 (default for training), bfloat16, float16")] = "float32",
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint directory")] = False,
    old_heads: Annotated[Optional[int], deprecated("--heads", "--num-heads")] = None,
    old_warmup: Annotated[Optional[int], deprecated("--warmup", "--warmup-steps")] = None,
) -> None:
    """Train a drafter for a frozen target on its own answers (self-distillation)."""
    from specbench.train.common import TrainConfig
    from specbench.train.recipes import recipe_for
    from specbench.train.recipes import train as train_drafter

    for old, new, value in (("--heads", "--num-heads", old_heads), ("--warmup", "--warmup-steps", old_warmup)):
        if value is not None:
            err_console.print(f"[yellow]warning:[/] train {old} is deprecated and goes in the next release: use {new}", soft_wrap=True)
    num_heads = num_heads if old_heads is None else old_heads
    warmup_steps = warmup_steps if old_warmup is None else old_warmup
    options = {"layers": layers, "k": k, "num_heads": num_heads, "tie_lm_head": tie_lm_head, "decoder_layers": decoder_layers,
               "hydra_layers": hydra_layers}
    config = TrainConfig(
        drafter=drafter, target=target, data=str(data), out=str(out), steps=steps, batch_tokens=batch_tokens, max_length=max_length,
        lr=lr or recipe_for(drafter).default_lr, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, eval_every=eval_every,
        eval_data=str(eval_data) if eval_data else None, eval_fraction=eval_fraction, seed=seed, train_vocab=train_vocab, options=options,
    )
    with RichProgress() as progress:
        written = train_drafter(config, device, dtype, overwrite, progress)
    console.print(escape(f"{written}: trained {drafter} for {target} (log: {written / 'specbench_train.json'})"))


def parse_ks(values: list[str] | None) -> list[int]:
    """--k 1,2,3 --k 6 -> [1, 2, 3, 6]"""
    ks = []
    for part in split_list(values):
        try:
            ks.append(int(part))
        except ValueError:
            raise UserError(f"--k takes integers, comma-separated (got '{part}')") from None
    return ks


@app.command()
def record(
    out: Annotated[Path, typer.Option(help="the target log to write (.jsonl)")],
    target: Annotated[str, typer.Option(help="alias, hub id or local directory")] = "smollm2-135m",
    workload: Annotated[str, typer.Option(help="builtin, builtin-completion, or a .jsonl file")] = "builtin",
    limit: Annotated[Optional[int], typer.Option(help="use only the first N prompts")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per turn at most")] = 128,
    topk: Annotated[Optional[int], typer.Option(help="also keep the target's top-N log-probs per position")] = None,
    hidden: Annotated[bool, typer.Option(help="also keep the target's final hidden states (safetensors side file) for head drafters")] = False,
    profile: Annotated[bool, typer.Option(help="also measure the verify-latency profile into the log")] = True,
    profile_max_tokens: Annotated[int, typer.Option(help="profile forwards of 1..N tokens")] = 128,
    profile_repeats: Annotated[int, typer.Option(help="timed repeats per token count (median kept)")] = 3,
    dtype: Annotated[str, typer.Option(help=DTYPE)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
) -> None:
    """Record the target's greedy outputs on a workload (and its verify latency) for `simulate`."""
    from specbench.simulate.record import record_workload

    with RichProgress() as progress:
        log = record_workload(target, workload, out, limit, max_new_tokens, topk, hidden, profile, profile_max_tokens, profile_repeats,
                              device, dtype, progress)
    tokens = sum(len(t.output_ids) for t in log.turns)
    console.print(escape(f"{out}: {len(log.turns)} turns, {tokens} target tokens"
                         + (f", hidden states in {log.header.hidden_file}" if hidden else "")
                         + (f", verify profile 1..{profile_max_tokens} tokens" if profile else "")))


@app.command()
def profile(
    out: Annotated[Path, typer.Option(help="where to write the profile (.json)")],
    target: Annotated[str, typer.Option(help="alias, hub id or local directory")] = "smollm2-135m",
    workload: Annotated[str, typer.Option(help="the context is its first prompt, repeated to --context-tokens")] = "builtin",
    context_tokens: Annotated[int, typer.Option(help="context length the forwards see")] = 256,
    max_tokens: Annotated[int, typer.Option(help="profile forwards of 1..N tokens")] = 128,
    repeats: Annotated[int, typer.Option(help="timed repeats per token count (median kept)")] = 3,
    dtype: Annotated[str, typer.Option(help=DTYPE)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
) -> None:
    """Measure the target's verify latency: ms per forward of n tokens, n = 1..max-tokens."""
    from specbench.simulate.profile import profile_target

    with RichProgress() as progress:
        result = profile_target(target, out, workload, context_tokens, max_tokens, repeats, device, dtype, progress)
    console.print(escape(f"{out}: verify ms at 1 / {max_tokens // 2} / {max_tokens} tokens: "
                         f"{result.ms[0]:.2f} / {result.ms[max_tokens // 2 - 1]:.2f} / {result.ms[-1]:.2f}"))


@app.command()
@with_drafter_flags
def simulate(
    log: Annotated[Path, typer.Option(help="a target log from `specbench record` (or a DSD tensor-dump log with --prompts)")],
    drafter: Annotated[str, typer.Option(help="a name from `specbench drafters`")] = "prompt-lookup",
    k: Annotated[Optional[list[str]], typer.Option(help="chain lengths to score, e.g. --k 1,2,3,4,5,6 (one pass scores all)")] = None,
    tree: Annotated[Optional[list[str]], typer.Option(help="trees to score: catalogue names (mc_sim_7b_63), chain:K, or JSON files of child-rank paths; comma-separated")] = None,
    option: Option = None,
    target: Annotated[Optional[str], typer.Option(help="the real target, when at hand: hidden states by one forward per sequence; the tokenizer for DSD logs")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="DSD format: the prompts JSONL matched by order to the tensor dumps in --log")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="a verify-latency profile from `specbench profile` (default: the log's)")] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help="predict with a memory-bandwidth roofline at this many GB/s instead of a profile")] = None,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N logged turns")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="cut the logged outputs to N tokens (default: the log's)")] = None,
    method: Annotated[str, typer.Option(help="auto (teacher-forced where the drafter has the hook), teacher-forced, replay")] = "auto",
    latency_steps: Annotated[int, typer.Option(help="proposals timed per shape for the draft latency")] = 32,
    device: Annotated[str, typer.Option(help="where the drafter runs: " + DEVICE)] = "auto",
    dtype: Annotated[str, typer.Option(help="--target's dtype: auto, float32, float16, bfloat16")] = "auto",
    out: Annotated[Path, typer.Option(help="directory under which the run directories are created")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    drafter_flags: dict[str, Any] | None = None,
) -> None:
    """Score a drafter on a recorded target log without running the target: τ, acceptance and predicted speedup per k/tree."""
    from specbench.drafters.registry import typed_options
    from specbench.report.tables import simulation_table
    from specbench.runner import command_line
    from specbench.simulate.runner import (
        SimulateConfig,
        open_log,
        shapes_from,
        simulate_log,
    )

    target_log = open_log(log, prompts, target)
    shapes = shapes_from(parse_ks(k), split_list(tree))
    config = SimulateConfig(drafter, typed_options(drafter, drafter_flags or {}), shapes, max_new_tokens, limit, method, latency_steps)
    with RichProgress() as progress:
        result = simulate_log(target_log, config, out, profile, bandwidth, target if prompts is None else None, device, dtype, progress,
                              command_line())
    simulation = result.simulation
    if as_json:
        print(json.dumps({
            "log": str(log), "method": simulation.method, "hidden_source": simulation.hidden_source,
            "scoring_s": simulation.scoring_s, "latency_s": simulation.latency_s,
            "results": [{"shape": r.shape, "run": r.directory, "alpha_iid": r.alpha_iid,
                         "leviathan_expected_speedup": r.leviathan_speedup, "draft_ms_source": r.draft_ms_source,
                         **r.summary.to_json()} for r in result.reports],
        }, indent=2))
        return
    title = f"simulated: {drafter} on a log of {target_log.header.target} ({simulation.method}; latency model: {result.latency.kind})"
    console.print(simulation_table(result.reports, escape(title)))
    if simulation.hidden_source:
        console.print(escape(f"target hidden states: {simulation.hidden_source}"))
    console.print(escape(f"scoring {simulation.scoring_s:.2f} s, draft-latency timing {simulation.latency_s:.2f} s; records: {out}/"))


@app.command("convert-log")
def convert_log(
    log: Annotated[Path, typer.Option(help="the DSD target log: tensor([[...]]) dumps, one per prompt")],
    prompts: Annotated[Path, typer.Option(help="the DSD prompts JSONL, matched by order")],
    target: Annotated[str, typer.Option(help="the target whose tokenizer tokenises the prompts (and names the log)")],
    out: Annotated[Path, typer.Option(help="the specbench target log to write (.jsonl)")],
) -> None:
    """Convert a Decoding-Speculative-Decoding log (prompts JSONL + tensor dumps) into a specbench target log."""
    from specbench.simulate.log import write_log
    from specbench.simulate.runner import open_log

    converted = open_log(log, prompts, target)
    write_log(out, converted.header, converted.turns)
    console.print(escape(f"{out}: {len(converted.turns)} prompts, {sum(len(t.output_ids) for t in converted.turns)} target tokens "
                         "(no profile: give simulate --profile or --bandwidth)"))


@app.command()
def workloads() -> None:
    """List the workloads (a folder each under workloads/) and where each one's data comes from."""
    from specbench.workloads import describe_sources

    for name, summary, where in describe_sources():
        console.print(f"[bold]{escape(name)}[/]  {escape(summary)}  [dim]({escape(where)})[/]", soft_wrap=True, highlight=False)
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
    from specbench.report.build import VIEWS, build, export, write_outputs
    from specbench.report.frames import group_summary
    from specbench.report.tables import (
        breakdown_table,
        comparison_table,
        position_table,
        summary_table,
    )

    if by not in VIEWS:
        raise UserError(f"--by {by}: use one of {', '.join(VIEWS)}")
    result = build(runs or [Path("results")])
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    key = {"category": "categories", "task": "tasks"}.get(by)
    for group in result.groups:
        summary = group_summary(group)
        runs_note = f"{len(group.runs)} runs merged" if len(group.runs) > 1 else str(group.runs[0].directory)
        console.print(summary_table(summary, escape(f"{group.label}\non {group.setup['workload']} ({runs_note})")))
        if by in ("setup", "position") and summary.per_position:
            console.print(position_table(summary))
        if key:
            frame = result.frames[key]
            console.print(breakdown_table(frame[frame.setup == group.label], by, f"by {by}"))
    if len(result.groups) > 1:
        console.print(comparison_table(result.frames["overview"]))
    for path in export(result.view(by), csv, parquet):
        console.print(escape(f"wrote {path}"))
    for line in write_outputs(result, plot, html):
        console.print(escape(line))


@app.command("export-answers")
def export_answers(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out: Annotated[Path, typer.Option(help="the model_answer JSONL to write (FastChat: data/mt_bench/model_answer/MODEL.jsonl)")],
    model_id: Annotated[Optional[str], typer.Option(help="model_id in the file (default: target+drafter)")] = None,
    mode: Annotated[str, typer.Option(help="spec (the drafter's answers) or baseline (plain decoding)")] = "spec",
) -> None:
    """Write a run's answers in FastChat's model_answer format, for FastChat's judge."""
    from specbench.answers import write_model_answers
    from specbench.store import RunStore

    n = write_model_answers(RunStore.open(run_dir), out, mode, model_id)
    console.print(escape(f"wrote {n} answers to {out}"))


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """specbench's own warnings as one line, like its errors; others as Python prints them."""
    from specbench.errors import SpecbenchWarning

    if issubclass(category, SpecbenchWarning):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = show_warning
    try:
        app()
    except UserError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
