"""The `specbench` command line: parse, call the library, print. No logic of its own.

The drafter option flags of `run` and `simulate` (`--k`, `--heads`, ...) are not
written here: they are generated from the options every installed drafter
declares (engine/options.py), so a plugin's options get flags too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from specbench.console import RichProgress, console, run_app, styled, warn
from specbench.errors import UserError
from specbench.flags import (
    Option,
    deprecated,
    parse_batch_sizes,
    parse_ks,
    resume_refusal,
    split_list,
    tune_commands,
    typed_params,
    with_config,
    with_drafter_flags,
    with_recipe_flags,
)
from specbench.runner import RunConfig
from specbench.simulate.profile import ProfileConfig
from specbench.simulate.record import RecordConfig
from specbench.simulate.runner import SimulateConfig
from specbench.simulate.tune import TuneConfig
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP
from specbench.train.common import TrainConfig
from specbench.train.data import DataConfig

app = typer.Typer(help="Benchmark draft models for speculative decoding.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


@app.command()
@with_drafter_flags
@with_config(RunConfig)
def run(
    ctx: typer.Context,
    config: RunConfig,
    option: Option = None,
    out: Annotated[Path, typer.Option(help="directory under which the run directory is created")] = Path("results"),
    resume: Annotated[Optional[Path], typer.Option(help="continue an interrupted run directory (its own configuration)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    batch_size: Annotated[Optional[list[str]], typer.Option(
        help="decode this many turns at once, each row its own tree, acceptance and KV length, plain decoding at the same size "
             "(docs/batch.md); several (1,2,4,8): one run per size, then the curve  [default: 1]")] = None,
    drafter_flags: dict[str, Any] | None = None,
) -> None:
    """Run a workload through target + drafter (and plain decoding) and print τ, acceptance, latency and speedup."""
    from specbench import runner
    from specbench.drafters.registry import typed_options
    from specbench.targets import deepspeed

    sizes = parse_batch_sizes(batch_size)
    if resume:  # the run's own configuration; what the user typed must agree with it (runner.resume_run)
        given = typed_params(ctx)
        if "out" in given:
            raise UserError(f"--resume {resume} continues the run in its own directory: drop --out {out}, or start a new run")
        settings = {name: value for name, value in given.items() if name in RunConfig.__dataclass_fields__}
        if "batch_size" in settings:
            if len(sizes) > 1:
                raise UserError("--resume continues one run: give one --batch-size (or none)")
            settings["batch_size"] = sizes[0]
        config = runner.config_from_info(runner.RunStore.open(resume).info)
    else:
        config.drafter_options = typed_options(config.drafter, drafter_flags or {})
        config.batch_size = sizes[0]
    if config.backend == "deepspeed" and deepspeed.needs_launcher(config.tp):
        runner.check(config)  # bad input fails here, as one line, not once per rank
        sys.exit(deepspeed.relaunch(config.tp, config.device, sys.argv[1:]))
    if len(sizes) > 1 and not resume:
        return run_curve(config, sizes, out, as_json)
    with RichProgress() as progress:
        try:
            directory = runner.resume_run(resume, settings, drafter_flags, progress) if resume else runner.start_run(config, out, progress)
        except runner.ResumeConflicts as refused:
            raise UserError(resume_refusal(refused)) from None
    if directory is not None:  # None: a tensor-parallel follower rank; rank 0 prints
        show_run(directory, as_json)


def run_curve(config: RunConfig, sizes: list[int], out: Path, as_json: bool) -> None:
    """`run --batch-size 1,2,4`: one run per size on one loaded target, then speedup and throughput against B."""
    from specbench import runner
    from specbench.report.build import batch_run_summary, build, run_summary
    from specbench.report.tables import batch_curve_table

    for size in sizes:  # every size's configuration refused before any weights load
        runner.check(replace(config, batch_size=size))
    with RichProgress() as progress:
        with progress.status(f"loading {config.target}"):
            target = runner.load(replace(config, batch_size=max(sizes)))
        directories = [runner.start_run(replace(config, batch_size=size), out, progress, target=target) for size in sizes]
    if as_json:
        points = [(size, directory, run_summary(directory)[1]) for size, directory in zip(sizes, directories)]
        return print(json.dumps([{"batch_size": size, "run": str(directory), **summary.to_json(),
                                  **({"batch": batch_run_summary(directory).to_json()} if size > 1 else {})}
                                 for size, directory, summary in points], indent=2))
    for directory in directories:
        show_run(directory, False)
    curve = build(directories).frames["batch_curve"]  # the curve `report` shows of these runs
    console.print(batch_curve_table(curve, f"on {config.target}, against batch size"))


def show_run(directory: Path, as_json: bool) -> None:
    from specbench.records import MeasuredExtra
    from specbench.report.build import batch_run_summary, run_summary
    from specbench.report.tables import batch_table, divergence_table, engine_line, position_table, summary_table

    info, summary, notes = run_summary(directory)
    measured = isinstance(info.extra, MeasuredExtra)
    engine = info.extra.engine if measured else None
    batch = batch_run_summary(directory) if measured and info.extra.batch else None
    for warning in notes:
        warn(warning)
    if as_json:
        extra = {"batch": batch.to_json()} if batch else {}
        return print(json.dumps({"run": str(directory), **summary.to_json(), "engine": engine and engine.to_json(), **extra}, indent=2))
    console.print(summary_table(summary, f"{info.drafter} → {info.target} on {info.workload} ({info.environment.get('device_name')})"))
    if batch:
        console.print(batch_table(batch))
    if line := engine_line(engine):
        console.print(line, highlight=False)
    if summary.per_position:
        console.print(position_table(summary))
    if summary.diverged:
        console.print(divergence_table(summary))
    console.print(f"records: {str(directory)}")


@app.command()
def drafters() -> None:
    """List the installed drafters (entry-point group specbench.drafters) and the options each declares."""
    from specbench.drafters.registry import drafter_class, installed_drafters

    for name, entry in sorted(installed_drafters().items()):
        try:
            cls = drafter_class(name)
        except UserError as exc:
            console.print(styled((name, "bold"), "  ", (str(exc), "red")), soft_wrap=True)
            continue
        console.print(styled((name, "bold"), f"  {cls.summary}  ", (f"({entry.value}; drafts a {cls.drafts})", "dim")), soft_wrap=True)
        for spec in cls.Options.specs().values():
            console.print(f"    {spec.flag} / -o {spec.describe()}", soft_wrap=True, highlight=False)


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
    console.print(f"{out}: {len(ids)} ids ranked by frequency in {counted} ({distinct} distinct tokens seen)")


@app.command("train-data")
@with_config(DataConfig)
def train_data(
    config: DataConfig,
    out: Annotated[Path, typer.Option(help="the data directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing data directory")] = False,
) -> None:
    """Self-distillation data: the target's own answers to a prompt pool, tokenised for `specbench train`."""
    from specbench.runner import command_line
    from specbench.train.data import make_data_for

    with RichProgress() as progress:
        meta = make_data_for(config, out, overwrite, progress, command_line())
    console.print(f"{out}: {meta['sequences']} sequences, {meta['tokens']} tokens ({meta['answer_tokens']} answer tokens) "
                         f"from {meta['prompts']} prompts of {config.workload} in {meta['seconds']} s")


@app.command()
@with_recipe_flags
@with_config(TrainConfig)
def train(
    config: TrainConfig,
    dtype: Annotated[str, typer.Option(help="float32 (default for training), bfloat16, float16")] = "float32",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint directory")] = False,
    old_heads: Annotated[Optional[int], deprecated("--heads", "--num-heads")] = None,
    old_warmup: Annotated[Optional[int], deprecated("--warmup", "--warmup-steps")] = None,
    recipe_flags: dict[str, Any] | None = None,
) -> None:
    """Train a drafter for a frozen target on its own answers (self-distillation)."""
    from specbench.train.recipes import train as train_drafter

    for old, new, value in (("--heads", "--num-heads", old_heads), ("--warmup", "--warmup-steps", old_warmup)):
        if value is not None:
            warn(f"train {old} is deprecated and goes in the next release: use {new}")
    recipe = (recipe_flags or {}) | ({} if old_heads is None else {"num_heads": old_heads})
    config = config if old_warmup is None else replace(config, warmup_steps=old_warmup)  # replace(): checked as the new flag is
    with RichProgress() as progress:
        written = train_drafter(config, recipe, device, dtype, overwrite, progress)
    console.print(f"{written}: trained {config.drafter} for {config.target} (log: {written / 'specbench_train.json'})")


@app.command()
@with_config(RecordConfig)
def record(
    config: RecordConfig,
    out: Annotated[Path, typer.Option(help="the target log to write (.jsonl)")],
) -> None:
    """Record the target's greedy outputs on a workload (and its verify latency) for `simulate`."""
    from specbench.simulate.record import record_workload

    with RichProgress() as progress:
        log = record_workload(config, out, progress)
    tokens = sum(len(t.output_ids) for t in log.turns)
    taps = ", ".join("final" if t is None else f"input of layer {t}" for t in log.recorded_taps)
    console.print(f"{out}: {len(log.turns)} turns, {tokens} target tokens"
                  + (f", hidden states ({taps}) in {log.header.hidden_file}" if log.header.hidden_file else "")
                  + (f", verify profile 1..{config.profile_max_tokens} tokens" if config.profile else ""))


@app.command()
@with_config(ProfileConfig)
def profile(
    config: ProfileConfig,
    out: Annotated[Path, typer.Option(help="where to write the profile (.json)")],
    batch: Annotated[Optional[list[str]], typer.Option(
        help="also t(B, n): forwards of B rows of n tokens each on the batch engine, for simulate and tune --batch-size "
             "(docs/batch.md), e.g. 1,4,8  [default: 1]")] = None,
) -> None:
    """Measure the target's verify latency: ms per forward of n tokens, n = 1..max-tokens (with --batch: of B rows each)."""
    from specbench.simulate.profile import profile_target

    config.batch = tuple(parse_batch_sizes(batch, "--batch"))
    with RichProgress() as progress:
        result = profile_target(config, out, progress)
    n = config.max_tokens
    for rows in result.batch_sizes:
        ms = result.at_batch(rows).ms
        console.print(f"{out}: verify ms of {rows} row{'s' if rows > 1 else ''} at 1 / {n // 2 or 1} / {n} tokens: "
                      f"{ms[0]:.2f} / {ms[max(n // 2, 1) - 1]:.2f} / {ms[-1]:.2f}")


@app.command()
@with_drafter_flags
@with_config(SimulateConfig)
def simulate(
    config: SimulateConfig,
    log: Annotated[Path, typer.Option(help="a target log from `specbench record` (or a DSD tensor-dump log with --prompts)")],
    k: Annotated[Optional[list[str]], typer.Option(help="chain lengths to score, e.g. --k 1,2,3,4,5,6 (one pass scores all)")] = None,
    tree: Annotated[Optional[list[str]], typer.Option(help="trees to score: catalogue names (mc_sim_7b_63), chain:K, JSON files of child-rank paths, or 'dynamic' (eagle/eagle3: EAGLE-2's tree); comma-separated")] = None,
    option: Option = None,
    target: Annotated[Optional[str], typer.Option(help="the real target, when at hand: hidden states by one forward per sequence; the tokenizer for DSD logs")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="DSD format: the prompts JSONL matched by order to the tensor dumps in --log")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="a verify-latency profile from `specbench profile` (default: the log's)")] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help="predict with a memory-bandwidth roofline at this many GB/s instead of a profile")] = None,
    batch_size: Annotated[Optional[list[str]], typer.Option(
        help="predict throughput at these batch sizes from the profile's t(B, n) (`profile --batch`; docs/batch.md), e.g. 1,4,8  "
             "[default: 1]")] = None,
    device: Annotated[str, typer.Option(help="where the drafter runs: " + DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option(help="--target's dtype: " + DTYPE_HELP)] = "auto",
    out: Annotated[Path, typer.Option(help="directory under which the run directories are created")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    drafter_flags: dict[str, Any] | None = None,
) -> None:
    """Score a drafter on a recorded target log without running the target: τ, acceptance and predicted speedup per k/tree."""
    from specbench.drafters.registry import typed_options
    from specbench.report.tables import simulation_table
    from specbench.runner import command_line
    from specbench.simulate.dsd import open_log
    from specbench.simulate.runner import shapes_from, simulate_log

    sizes = parse_batch_sizes(batch_size)
    target_log = open_log(log, prompts, target)
    config.shapes = shapes_from(parse_ks(k), split_list(tree))
    config.drafter_options = typed_options(config.drafter, drafter_flags or {})
    with RichProgress() as progress:
        result = simulate_log(target_log, config, out, profile, bandwidth, target if prompts is None else None, device, dtype, progress,
                              command_line(), sizes)
    if as_json:
        return print(json.dumps(result.to_json(), indent=2))
    sim = result.simulation
    console.print(simulation_table(result.reports, f"simulated: {config.drafter} on a log of {target_log.header.target} "
                                                           f"({sim.method}; latency model: {result.latency.kind})"))
    if sim.hidden_source:
        console.print(f"target hidden states: {sim.hidden_source}")
    console.print(f"scoring {sim.scoring_s:.2f} s, draft-latency timing {sim.latency_s:.2f} s; records: {out}/")


@app.command()
@with_drafter_flags
@with_config(TuneConfig, out=Path("tuned_tree.json"))
def tune(
    config: TuneConfig,
    log: Annotated[Path, typer.Option(help="the target log to tune on (`specbench record`; --hidden for head drafters)")],
    option: Option = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the frontier as JSON")] = False,
    drafter_flags: dict[str, Any] | None = None,
) -> None:
    """Pick the draft tree (or k) predicted fastest on this hardware from a log and a verify profile; write it, print how to verify it."""
    from specbench.report.plots import tuned_frontier
    from specbench.report.tables import tune_report
    from specbench.runner import command_line
    from specbench.simulate.tune import tune_log

    config.drafter_options = drafter_flags or {}  # typed by the library (flags and -o key=value text alike)
    with RichProgress() as progress:
        result = tune_log(log, config, progress, command_line())
    if config.plot:
        tuned_frontier(result, config.plot)
    run, simulate = tune_commands(result.check)
    if as_json:
        return print(json.dumps({**result.to_json(), "run_command": run, "simulate_command": simulate}, indent=2))
    lines = [f"verify it: {run}", f"simulate scores it: {simulate}"] + ([f"wrote {config.plot}"] if config.plot else [])
    for shown in tune_report(result) + lines:
        console.print(shown, soft_wrap=True)


@app.command("convert-log")
def convert_log(
    log: Annotated[Path, typer.Option(help="the DSD target log: tensor([[...]]) dumps, one per prompt")],
    prompts: Annotated[Path, typer.Option(help="the DSD prompts JSONL, matched by order")],
    target: Annotated[str, typer.Option(help="the target whose tokenizer tokenises the prompts (and names the log)")],
    out: Annotated[Path, typer.Option(help="the specbench target log to write (.jsonl)")],
) -> None:
    """Convert a Decoding-Speculative-Decoding log (prompts JSONL + tensor dumps) into a specbench target log."""
    from specbench.simulate.dsd import convert_dsd_log

    converted = convert_dsd_log(log, prompts, target, out)
    console.print(f"{out}: {len(converted.turns)} prompts, {sum(len(t.output_ids) for t in converted.turns)} target tokens "
                         "(no profile: give simulate --profile or --bandwidth)")


@app.command()
def workloads() -> None:
    """List the workloads (a folder each under workloads/) and where each one's data comes from."""
    from specbench.workloads import describe_sources

    for name, summary, where in describe_sources():
        console.print(styled((name, "bold"), f"  {summary}  ", (f"({where})", "dim")), soft_wrap=True, highlight=False)
    console.print(
        "any .jsonl file also works with --workload FILE: FastChat/Spec-Bench question.jsonl, HellaSwag, "
        "DSD {\"prompt\": ...}, or rows with a 'turns' list or a 'prompt' string; the format is detected and named",
        highlight=False,
    )


@app.command()
def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="run directories, or folders holding them (default: results/)")] = None,
    by: Annotated[str, typer.Option(help="setup, category, task, position or batch (against batch size): the breakdown shown and exported")] = "setup",
    csv: Annotated[Optional[Path], typer.Option(help="write the --by view as CSV")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="write the --by view as parquet")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="write PNG plots into this directory")] = None,
    html: Annotated[Optional[Path], typer.Option(help="write one self-contained HTML page with the tables and plots")] = None,
) -> None:
    """Tables per setup (target × drafter × options × hardware) over stored runs; shards of a run are merged."""
    from specbench.report.build import VIEWS, build, check_outputs, export, write_outputs
    from specbench.report.frames import group_summary
    from specbench.metrics import batch_summary
    from specbench.report.tables import (
        batch_curve_table,
        batch_table,
        breakdown_table,
        comparison_table,
        divergence_table,
        group_note,
        position_table,
        summary_table,
    )

    if by not in VIEWS:
        raise UserError(f"--by {by}: use one of {', '.join(VIEWS)}")
    check_outputs(runs or [Path("results")], csv, parquet, html, plot)
    result = build(runs or [Path("results")])
    for warning in result.warnings:
        warn(warning)
    key = {"category": "categories", "task": "tasks"}.get(by)
    for group in result.groups:
        summary = group_summary(group)
        console.print(summary_table(summary, f"{group.label}\non {group.setup['workload']} ({group_note(group)})"))
        if group.batch:
            console.print(batch_table(batch_summary(group.batch, group.steps, group.turns)))
        if by in ("setup", "position") and summary.per_position:
            console.print(position_table(summary))
        if by == "setup" and summary.diverged:
            console.print(divergence_table(summary))
        if key:
            frame = result.frames[key]
            console.print(breakdown_table(frame[frame.setup == group.label], by, f"by {by}"))
    if len(result.groups) > 1:
        console.print(comparison_table(result.frames["overview"], result.groups))
    if not result.frames["batch_curve"].empty:
        console.print(batch_curve_table(result.frames["batch_curve"], "against batch size (aggregate tokens/s of every row; "
                                                                      "speedup vs plain decoding at the same B)"))
    for path in export(result.view(by), csv, parquet):
        console.print(f"wrote {path}")
    for line in write_outputs(result, plot, html):
        console.print(line)


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
    console.print(f"wrote {n} answers to {out}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
