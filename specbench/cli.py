"""The `specbench` command line: parse, call, print. No logic of its own."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from specbench.checks import check_count, check_output_dir, check_output_file
from specbench.errors import UserError

app = typer.Typer(
    help="Benchmark draft models for speculative decoding.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# The printing boundary: text is printed as given, never read as rich markup or emoji codes, since
# so much of it is the user's (paths, ids, tree specs, error messages quoting input: `--tree chain:x:`,
# DSD's "[header] ..." prompts). Styling is applied with Text objects instead.
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False)
PYTHON_SHOWWARNING = warnings.showwarning


def styled(*parts: str | tuple[str, str]) -> Text:
    """A line of plain text with styled parts: styled(("name", "bold"), "  summary")."""
    return Text.assemble(*parts)


def status(text: str):
    """A spinner with a plain-text label (rich parses a status label as markup otherwise)."""
    return err_console.status(Text(text))


def progress_bar(*extra) -> Progress:
    """A progress bar on a terminal that leaves nothing behind (transient), none into a file or pipe
    (rich would leave a blank line there): an error after it started is still one line."""
    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), *extra, console=err_console, transient=True, disable=not err_console.is_terminal)


def explicit_flags(ctx: typer.Context, *flags: str) -> dict[str, object]:
    """The flags the user typed (not defaults), as '--flag' -> value, for `flags` (parameter names)."""
    given = {}
    for name in flags:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given["--" + name.replace("_", "-")] = ctx.params[name]
    return given


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
    ctx: typer.Context,
    target: Annotated[str, typer.Option(help="alias (see catalogue/targets.toml), hub id or local directory")] = "smollm2-135m",
    drafter: Annotated[str, typer.Option(help="a name from `specbench drafters`")] = "prompt-lookup",
    draft_model: Annotated[Optional[str], typer.Option(help="draft-model: alias, hub id or local directory")] = None,
    k: Annotated[Optional[int], typer.Option(help="tokens drafted per step (chain drafters)")] = None,
    max_ngram: Annotated[Optional[int], typer.Option(help="prompt-lookup: longest n-gram matched")] = None,
    min_ngram: Annotated[Optional[int], typer.Option(help="prompt-lookup: shortest n-gram matched")] = None,
    vocab_trim: Annotated[Optional[int], typer.Option(help="VocabTrim: keep only the N most frequent target tokens in the drafter's LM head")] = None,
    vocab_trim_from: Annotated[Optional[str], typer.Option(help="VocabTrim counts tokens in: a run dir, a target log, a workload, or an id list from `vocab-trim build`")] = None,
    heads: Annotated[Optional[str], typer.Option(help="medusa/hydra/hydra-decoder: head checkpoint (directory, file or hub id), or 'fresh'; default from catalogue/heads.toml")] = None,
    tree: Annotated[Optional[str], typer.Option(help="head drafters: a tree from catalogue/trees.json (e.g. mc_sim_7b_63), chain:K, or a .json list of paths")] = None,
    decoder_layers: Annotated[Optional[int], typer.Option(help="hydra-decoder with fresh heads: trunk layers copied from the target's last N")] = None,
    posterior_threshold: Annotated[Optional[float], typer.Option(help="head drafters at --temperature > 0: typical acceptance threshold (default 0.09)")] = None,
    posterior_alpha: Annotated[Optional[float], typer.Option(help="head drafters at --temperature > 0: typical acceptance entropy factor (default 0.3)")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="any drafter option as key=value")] = None,
    workload: Annotated[str, typer.Option(help="a name from `specbench workloads`, or a .jsonl file (format detected)")] = "builtin",
    workload_file: Annotated[Optional[str], typer.Option(help="the published file a named workload reads (e.g. FastChat's question.jsonl for mt-bench)")] = None,
    categories: Annotated[Optional[list[str]], typer.Option("--categories", help="keep only these categories or tasks (comma-separated or repeated)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N prompts")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: measure every n-th prompt from the i-th; `report` merges the shards")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per turn at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy (lossless); > 0 = speculative sampling (chains) or typical acceptance (head drafters, lossy)")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    engine: Annotated[str, typer.Option(help="auto (fast on CUDA, eager on CPU), eager (DynamicCache), fast (static KV cache; CUDA graphs on CUDA)")] = "auto",
    backend: Annotated[str, typer.Option(help="target backend: hf, or deepspeed (tensor parallel; see docs/deepspeed.md)")] = "hf",
    tp: Annotated[int, typer.Option(help="deepspeed: tensor-parallel ranks (GPUs, or processes on CPU)")] = 1,
    baseline: Annotated[bool, typer.Option(help="also run plain decoding on the same prompts")] = True,
    warmup: Annotated[bool, typer.Option(help="one short untimed decode before measuring")] = True,
    out: Annotated[Path, typer.Option(help="directory under which the run directory is created")] = Path("results"),
    resume: Annotated[Optional[Path], typer.Option(help="continue an interrupted run directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a workload through target + drafter (and plain decoding) and print τ, acceptance, latency and speedup."""
    from specbench.runner import Benchmark, RunConfig, resume_run
    from specbench.targets import deepspeed

    if resume:
        given = explicit_flags(ctx, *(name for name in ctx.params if name not in ("resume", "as_json", "option")))
        given |= {f"-o {key}": value for key, value in (parse_option(o) for o in option or [])}
        if "--categories" in given:
            given["--categories"] = split_categories(categories)
        store, config = resume_run(resume, given)
        loading = f"resuming {resume}"
    else:
        check_output_dir(out, "--out")
        options = dict(parse_option(o) for o in option or [])
        given = {
            "draft_model": draft_model,
            "k": k,
            "max_ngram": max_ngram,
            "min_ngram": min_ngram,
            "vocab_trim": vocab_trim,
            "vocab_trim_from": vocab_trim_from,
            "heads": heads,
            "tree": tree,
            "decoder_layers": decoder_layers,
            "posterior_threshold": posterior_threshold,
            "posterior_alpha": posterior_alpha,
        }
        options.update({name: value for name, value in given.items() if value is not None})
        config = RunConfig(
            target=target,
            drafter=drafter,
            drafter_options=options,
            workload=workload,
            workload_file=workload_file,
            categories=split_categories(categories),
            limit=limit,
            shard=shard,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            dtype=dtype,
            device=device,
            engine=engine,
            baseline=baseline,
            warmup=warmup,
            backend=backend,
            tp=tp,
        )
        loading = f"loading {config.target} and {config.drafter}"
    if config.backend == "deepspeed" and deepspeed.needs_launcher(config.tp):
        Benchmark.check(config)  # bad input fails here, as one line, not once per rank
        if resume:
            store.close()  # rank 0 of the relaunch takes the lock
        sys.exit(deepspeed.relaunch(config.tp, config.device, sys.argv[1:]))
    try:
        with status(loading):
            bench = Benchmark(config)
    except BaseException:
        if resume:
            store.close()
        raise
    if not bench.target.leads:
        return bench.target.follow()  # a tensor-parallel follower rank: rank 0 measures and prints
    try:
        measure_and_show(bench, config, store if resume else None, out, as_json)
    finally:
        bench.target.stop()


def split_categories(categories: list[str] | None) -> list[str] | None:
    """--categories a,b --categories c -> [a, b, c] (None when not given)."""
    return [c.strip() for text in categories for c in text.split(",") if c.strip()] if categories is not None else None


def measure_and_show(bench, config, store, out: Path, as_json: bool) -> None:
    from specbench.runner import command_line
    from specbench.store import RunStore

    resume = store is not None
    err_console.print(f"workload {bench.workload.describe()}; measuring {len(bench.prompts)}", highlight=False, soft_wrap=True)
    if not resume:
        info = bench.run_info(command_line())
        store = RunStore.create_unique(out, info)
    else:
        now = bench.run_info("")
        if store.info.workload_hash != now.workload_hash:
            store.close()
            raise UserError(f"workload '{config.workload}' changed since {store.directory} started; start a new run instead")
        started_on, here = (store.info.environment or {}).get("device_name"), now.environment.get("device_name")
        if started_on and started_on != here:  # its timings would be pooled with another machine's
            store.close()
            raise UserError(f"{store.directory} was measured on {started_on}, this is {here}: resume it there, or start a new run")

    with store:
        progress = progress_bar()
        try:
            with progress:
                task = progress.add_task(f"{config.drafter} on {config.target}", total=len(bench.prompts))
                bench.run(store, on_prompt=lambda p: progress.advance(task))
        except KeyboardInterrupt:
            if not store.directory.exists():
                raise UserError("interrupted before the first prompt finished; nothing was saved") from None
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
        say_warning(warning)
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
            console.print(styled((name, "bold"), "  ", (str(exc), "red")), soft_wrap=True)
            continue
        options = ", ".join(
            f"{o.name}={o.default!r}" if o.default is not o.empty else o.name for o in drafter_options(cls).values()
        )
        console.print(styled((name, "bold"), f"  {cls.summary}  ", (f"(options: {options or 'none'}; {entry.value})", "dim")), soft_wrap=True)


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
    from specbench.drafters.vocab_trim import ranked_ids, save_ids, token_counts
    from specbench.targets.loading import load_config, load_tokenizer

    check_output_file(out, "--out", inputs=(source,))
    vocab_size = load_config(target).vocab_size
    check_count(top, "--top", maximum=vocab_size)
    tokenizer = load_tokenizer(target)
    if tokenizer is None:
        raise UserError(f"no tokenizer found for '{target}'; pass a target whose tokenizer is available locally")
    counts, counted = token_counts(source, tokenizer)
    ids = ranked_ids(counts, vocab_size)[:top]
    save_ids(out, ids, target, vocab_size, counted)
    console.print(f"{out}: {len(ids)} ids ranked by frequency in {counted} ({len(counts)} distinct tokens seen)")


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
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing data directory")] = False,
) -> None:
    """Self-distillation data: the target's own answers to a prompt pool, tokenised for `specbench train`."""
    from specbench.runner import command_line
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.train.data import check_out, make_data

    check_out(out, overwrite)
    for value, flag in ((max_new_tokens, "--max-new-tokens"), (batch_size, "--batch-size"), (limit, "--limit")):
        check_count(value, flag)
    dev = resolve_device(device)
    with status(f"loading {target}"):
        tgt = HFTarget.load(target, dev, resolve_dtype(dtype, dev))
    progress = progress_bar()
    with progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        meta = make_data(
            tgt, workload, out, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed,
            limit=limit, cache_hidden=cache_hidden, overwrite=overwrite, command=command_line(), on_progress=on_progress,
        )
    console.print(
        f"{out}: {meta['sequences']} sequences, {meta['tokens']} tokens ({meta['answer_tokens']} answer tokens) "
        f"from {meta['prompts']} prompts of {workload} in {meta['seconds']} s"
    )


@app.command()
def train(
    drafter: Annotated[str, typer.Option(help="what to train: draft-model, medusa, hydra, hydra-decoder")],
    data: Annotated[Path, typer.Option(help="a data directory from `specbench train-data` (same target)")],
    out: Annotated[Path, typer.Option(help="the checkpoint directory to write")],
    target: Annotated[str, typer.Option(help="the frozen target the drafter is trained for")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 200,
    batch_tokens: Annotated[int, typer.Option(help="answer tokens per optimiser step (whole sequences, packed)")] = 2048,
    max_length: Annotated[int, typer.Option(help="cut sequences to this many tokens")] = 1024,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate (AdamW); default 5e-4 for hydra (Hydra++), 1e-3 otherwise")] = None,
    warmup: Annotated[int, typer.Option(help="linear warmup steps, then cosine decay")] = 20,
    min_lr_ratio: Annotated[float, typer.Option(help="the cosine ends at this fraction of --lr")] = 0.33,
    eval_every: Annotated[int, typer.Option(help="teacher-forced acceptance on held-out data every N steps")] = 50,
    eval_data: Annotated[Optional[Path], typer.Option(help="held-out data directory (e.g. train-data on pool-heldout); default: hold out --eval-fraction of --data")] = None,
    eval_fraction: Annotated[float, typer.Option(help="fraction of --data sequences held out when no --eval-data")] = 0.1,
    layers: Annotated[int, typer.Option(help="draft-model: how many of the target's first layers the draft keeps")] = 1,
    k: Annotated[int, typer.Option(help="draft-model: chain length the acceptance estimate assumes")] = 4,
    heads: Annotated[int, typer.Option(help="medusa/hydra/hydra-decoder: number of heads")] = 4,
    tie_lm_head: Annotated[bool, typer.Option(help="heads read the target's LM head (no LM head of their own; hydra: no embedding copy either): small checkpoints")] = False,
    decoder_layers: Annotated[int, typer.Option(help="hydra-decoder: trunk layers, copied from the target's last N")] = 1,
    hydra_layers: Annotated[int, typer.Option(help="hydra: ResBlocks per head (the first grounded, the rest one shared block)")] = 4,
    train_vocab: Annotated[str, typer.Option(help="all: losses over the whole vocabulary; seen: only over ids the training data contains (an order of magnitude cheaper on large vocabularies; evaluation stays full)")] = "all",
    seed: Annotated[int, typer.Option(help="seed for shuffling and initialisation")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 (default for training), bfloat16, float16")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing checkpoint directory")] = False,
) -> None:
    """Train a drafter for a frozen target on its own answers (self-distillation)."""
    import torch

    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.train.common import TrainConfig
    from specbench.train.data import check_out

    head_options = {"heads": heads, "tie_lm_head": tie_lm_head, "decoder_layers": decoder_layers, "hydra_layers": hydra_layers}
    recipes = {
        "draft-model": ("specbench.train.draft", "train_draft_model", {"layers": layers, "k": k}),
        **{name: ("specbench.train.heads", "train_heads", head_options) for name in ("medusa", "hydra", "hydra-decoder")},
    }
    if drafter not in recipes:
        raise UserError(f"cannot train drafter '{drafter}': trainable drafters are {', '.join(recipes)}")
    module, function, options = recipes[drafter]
    config = TrainConfig(
        drafter=drafter, target=target, data=str(data), out=str(out), steps=steps, batch_tokens=batch_tokens,
        max_length=max_length, lr=lr or (5e-4 if drafter == "hydra" else 1e-3), warmup=warmup, min_lr_ratio=min_lr_ratio, eval_every=eval_every,
        eval_data=str(eval_data) if eval_data else None, eval_fraction=eval_fraction, seed=seed, train_vocab=train_vocab, options=options,
    )
    config.check()
    check_out(out, overwrite, "checkpoint directory")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    with status(f"loading {target}"):
        tgt = HFTarget.load(target, dev, resolve_dtype(dtype, dev))
    tgt.model.requires_grad_(False)
    import importlib

    recipe = getattr(importlib.import_module(module), function)
    progress = progress_bar(TextColumn("{task.fields[losses]}", markup=False))
    with progress:
        task = progress.add_task(f"train {drafter}", total=steps, losses="")

        def on_step(step: int, row: dict) -> None:
            losses = " ".join(f"{key} {value:.3f}" for key, value in row.items() if key not in ("step", "lr", "eval") and isinstance(value, float))
            progress.update(task, completed=step, losses=losses)
            if "eval" in row:
                progress.console.print(f"step {step}: held-out " + json.dumps(row["eval"]))

        with torch.enable_grad():
            recipe(config, tgt, overwrite=overwrite, on_step=on_step)
    console.print(f"{out}: trained {drafter} for {target} (log: {out / 'specbench_train.json'})")


def parse_ks(values: list[str] | None) -> list[int]:
    """--k 1,2,3 --k 6 -> [1, 2, 3, 6]"""
    ks = []
    for value in values or []:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
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
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Record the target's greedy outputs on a workload (and its verify latency) for `simulate`."""
    from specbench.runner import environment
    from specbench.simulate.record import record as record_log
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.workloads import open_workload, select

    check_output_file(out, "--out", inputs=(workload,))
    for value, flag in ((limit, "--limit"), (max_new_tokens, "--max-new-tokens"), (topk, "--topk"),
                        (profile_max_tokens, "--profile-max-tokens"), (profile_repeats, "--profile-repeats")):
        check_count(value, flag)
    try:
        prompts = select(open_workload(workload).prompts, limit=limit)
        dev = resolve_device(device)
        with status(f"loading {target}"):
            model = HFTarget.load(target, dev, resolve_dtype(dtype, dev))
        with progress_bar() as progress:
            task = progress.add_task(f"recording {target}", total=sum(len(p.turns) for p in prompts))
            log = record_log(model, prompts, workload, max_new_tokens, out, topk, hidden, None, environment(dev),
                             lambda: progress.advance(task), profile_tokens=profile_max_tokens if profile else None,
                             profile_repeats=profile_repeats, on_stage=lambda stage: progress.update(task, description=stage))
    except KeyboardInterrupt:
        kept = f"{out} is as it was" if out.exists() else "nothing was written"
        raise UserError(f"interrupted; {kept} (a log is written only once complete)") from None
    tokens = sum(len(t.output_ids) for t in log.turns)
    console.print(f"{out}: {len(log.turns)} turns, {tokens} target tokens" + (f", hidden states in {log.header.hidden_file}" if hidden else "")
                  + (f", verify profile 1..{profile_max_tokens} tokens" if profile else ""))


@app.command()
def profile(
    out: Annotated[Path, typer.Option(help="where to write the profile (.json)")],
    target: Annotated[str, typer.Option(help="alias, hub id or local directory")] = "smollm2-135m",
    workload: Annotated[str, typer.Option(help="the context is its first prompt, repeated to --context-tokens")] = "builtin",
    context_tokens: Annotated[int, typer.Option(help="context length the forwards see")] = 256,
    max_tokens: Annotated[int, typer.Option(help="profile forwards of 1..N tokens")] = 128,
    repeats: Annotated[int, typer.Option(help="timed repeats per token count (median kept)")] = 3,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Measure the target's verify latency: ms per forward of n tokens, n = 1..max-tokens."""
    from specbench.checks import context_window
    from specbench.files import atomic_write_text
    from specbench.runner import environment
    from specbench.simulate.profile import check_profile_window, measure_profile
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import load_config, resolve_device, resolve_dtype
    from specbench.workloads import encode_turn, load_workload

    check_output_file(out, "--out")
    for value, flag in ((context_tokens, "--context-tokens"), (max_tokens, "--max-tokens"), (repeats, "--repeats")):
        check_count(value, flag)
    check_profile_window(context_window(load_config(target)), context_tokens, max_tokens, target)  # before the weights load
    prompts = load_workload(workload)
    dev = resolve_device(device)
    with status(f"loading {target}"):
        model = HFTarget.load(target, dev, resolve_dtype(dtype, dev))
    if model.tokenizer is None:
        raise UserError(f"target '{target}' has no tokenizer to encode the context prompt")
    context = encode_turn(model.tokenizer, prompts[0], 0, [])
    with status("measuring"):
        result = measure_profile(model, context, context_tokens, max_tokens, repeats, environment(dev)["device_name"])
    atomic_write_text(out, json.dumps(result.to_json()) + "\n")
    console.print(f"{out}: verify ms at 1 / {max_tokens // 2} / {max_tokens} tokens: "
                  f"{result.ms[0]:.2f} / {result.ms[max_tokens // 2 - 1]:.2f} / {result.ms[-1]:.2f}")


def _open_log(log: Path, prompts: Optional[Path], target: Optional[str]):
    from specbench.simulate.log import read_log

    if prompts is None:
        return read_log(log)
    from specbench.simulate.dsd import read_dsd
    from specbench.targets.loading import load_tokenizer

    if not target:
        raise UserError("a DSD log has text prompts: pass --target NAME (its tokenizer tokenises them)")
    tokenizer = load_tokenizer(target)
    if tokenizer is None:
        raise UserError(f"no tokenizer found for '{target}'; pass a target whose tokenizer is available locally")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return read_dsd(log, prompts, tokenizer, len(tokenizer), target, eos)


@app.command()
def simulate(
    log: Annotated[Path, typer.Option(help="a target log from `specbench record` (or a DSD tensor-dump log with --prompts)")],
    drafter: Annotated[str, typer.Option(help="a name from `specbench drafters`")] = "prompt-lookup",
    k: Annotated[Optional[list[str]], typer.Option(help="chain lengths to score, e.g. --k 1,2,3,4,5,6 (one pass scores all)")] = None,
    tree: Annotated[Optional[list[str]], typer.Option(help="trees to score: catalogue names (mc_sim_7b_63), chain:K, or JSON files of child-rank paths; comma-separated")] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="draft-model: alias, hub id or local directory")] = None,
    heads: Annotated[Optional[str], typer.Option(help="medusa/hydra/hydra-decoder: checkpoint directory, hub id or 'fresh'")] = None,
    max_ngram: Annotated[Optional[int], typer.Option(help="prompt-lookup: longest n-gram matched")] = None,
    min_ngram: Annotated[Optional[int], typer.Option(help="prompt-lookup: shortest n-gram matched")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="any drafter option as key=value")] = None,
    target: Annotated[Optional[str], typer.Option(help="the real target, when at hand: hidden states by one forward per sequence; the tokenizer for DSD logs")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="DSD format: the prompts JSONL matched by order to the tensor dumps in --log")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="a verify-latency profile from `specbench profile` (default: the log's)")] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help="predict with a memory-bandwidth roofline at this many GB/s instead of a profile")] = None,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N logged turns")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="cut the logged outputs to N tokens (default: the log's)")] = None,
    method: Annotated[str, typer.Option(help="auto (teacher-forced where the drafter has the hook), teacher-forced, replay")] = "auto",
    latency_steps: Annotated[int, typer.Option(help="proposals timed per shape for the draft latency")] = 32,
    device: Annotated[str, typer.Option(help="where the drafter runs: auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="--target's dtype: auto, float32, float16, bfloat16")] = "auto",
    out: Annotated[Path, typer.Option(help="directory under which the run directories are created")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Score a drafter on a recorded target log without running the target: τ, acceptance and predicted speedup per k/tree."""
    from specbench.report.tables import simulation_table
    from specbench.runner import command_line
    from specbench.simulate.log import read_profile
    from specbench.simulate.predict import LatencyModel
    from specbench.simulate.runner import SimulateConfig, Simulator, write_runs
    from specbench.simulate.walk import Shape

    check_output_dir(out, "--out")
    check_count(latency_steps, "--latency-steps")  # 0 would predict with a draft of 0 ms
    target_log = _open_log(log, prompts, target)
    shapes = [Shape.chain(value) for value in dict.fromkeys(parse_ks(k))]
    shapes += [Shape.from_spec(spec.strip()) for value in tree or [] for spec in value.split(",") if spec.strip()]
    options = dict(parse_option(o) for o in option or [])
    given = {"draft_model": draft_model, "heads": heads, "max_ngram": max_ngram, "min_ngram": min_ngram}
    options.update({name: value for name, value in given.items() if value is not None})
    if "k" in options or "tree" in options:
        raise UserError("simulate scores the shapes given with --k and --tree; do not pass k or tree as drafter options")
    if not shapes:
        raise UserError("give at least one --k or --tree to score (e.g. --k 1,2,3,4)")
    latency = LatencyModel.build(read_profile(profile) if profile else target_log.profile, bandwidth, target_log.header.target_forward_bytes)
    config = SimulateConfig(drafter, options, shapes, max_new_tokens, limit, method, latency_steps)
    real_target = None
    if target and prompts is None:
        from specbench.targets.hf import HFTarget
        from specbench.targets.loading import resolve_device, resolve_dtype

        dev = resolve_device(device)
        with status(f"loading {target}"):
            real_target = HFTarget.load(target, dev, resolve_dtype(dtype, dev))
    with status(f"loading {drafter}"):
        simulator = Simulator(target_log, config, real_target, device)
    with status(f"scoring {len(shapes)} shape(s) over {len(simulator.turns)} logged turns"):
        simulation = simulator.score()
    reports = write_runs(simulation, simulator, latency, out, command_line())
    if as_json:
        print(json.dumps({
            "log": str(log), "method": simulation.method, "hidden_source": simulation.hidden_source,
            "scoring_s": simulation.scoring_s, "latency_s": simulation.latency_s,
            "results": [{"shape": r.shape, "run": r.directory, "alpha_iid": r.alpha_iid,
                         "leviathan_expected_speedup": r.leviathan_speedup, "draft_ms_source": r.draft_ms_source,
                         **r.summary.to_json()} for r in reports],
        }, indent=2))
        return
    title = f"simulated: {drafter} on a log of {target_log.header.target} ({simulation.method}; latency model: {latency.kind})"
    console.print(simulation_table(reports, title))
    if simulation.hidden_source:
        console.print(f"target hidden states: {simulation.hidden_source}")
    console.print(f"scoring {simulation.scoring_s:.2f} s, draft-latency timing {simulation.latency_s:.2f} s; records: {out}/")


@app.command("convert-log")
def convert_log(
    log: Annotated[Path, typer.Option(help="the DSD target log: tensor([[...]]) dumps, one per prompt")],
    prompts: Annotated[Path, typer.Option(help="the DSD prompts JSONL, matched by order")],
    target: Annotated[str, typer.Option(help="the target whose tokenizer tokenises the prompts (and names the log)")],
    out: Annotated[Path, typer.Option(help="the specbench target log to write (.jsonl)")],
) -> None:
    """Convert a Decoding-Speculative-Decoding log (prompts JSONL + tensor dumps) into a specbench target log."""
    from specbench.simulate.log import write_log

    check_output_file(out, "--out", inputs=(log, prompts))
    converted = _open_log(log, prompts, target)
    write_log(out, converted.header, converted.turns)
    console.print(f"{out}: {len(converted.turns)} prompts, {sum(len(t.output_ids) for t in converted.turns)} target tokens (no profile: give simulate --profile or --bandwidth)")


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
        console.print(styled((name, "bold"), f"  {entry['summary']}  ", (f"({where})", "dim")), soft_wrap=True, highlight=False)
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
    records = run_files(runs or [Path("results")])
    for path, flag in ((csv, "--csv"), (parquet, "--parquet"), (html, "--html")):
        check_output_file(path, flag, inputs=records)
    check_output_dir(plot, "--plot")
    result = build(runs or [Path("results")])
    for warning in result.warnings:
        say_warning(warning)
    from specbench.report.frames import group_summary

    key = {"category": "categories", "task": "tasks"}.get(by)
    for group in result.groups:
        summary = group_summary(group)
        runs_note = f"{len(group.runs)} runs merged" if len(group.runs) > 1 else str(group.runs[0].directory)
        unfinished = [f"{r.directory.name}: {r.unfinished}" for r in group.runs if r.unfinished]
        if unfinished:
            runs_note += "; UNFINISHED " + ", ".join(unfinished)
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
    check_output_file(out, "--out", inputs=run_files([run_dir]))
    n = write_model_answers(RunStore.open(run_dir), out, mode, model_id)
    console.print(f"wrote {n} answers to {out}")


def run_files(paths: list[Path]) -> tuple[Path, ...]:
    """The record files of the run directories among `paths` (outputs must never overwrite them)."""
    from specbench.store import RUN_FILE, STEPS_FILE, TURNS_FILE

    return tuple(Path(p) / name for p in paths if (Path(p) / RUN_FILE).is_file() for name in (RUN_FILE, TURNS_FILE, STEPS_FILE))


def one_line(text: str) -> str:
    """Messages are one line: whatever they quote (an exception, a file's content) is folded into it."""
    return " ".join(str(text).split())


def say_warning(message: str) -> None:
    err_console.print(styled(("warning:", "yellow"), " ", one_line(message)), soft_wrap=True, highlight=False)


def say_error(message: str) -> None:
    err_console.print(styled(("error:", "bold red"), " ", one_line(message)), soft_wrap=True, highlight=False)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """specbench's own warnings as one line, like its errors; others as Python prints them."""
    from specbench.errors import SpecbenchWarning

    if issubclass(category, SpecbenchWarning):
        say_warning(str(message))
    else:  # a library's warning, also on one line
        say_warning(f"{message} ({category.__name__}, {Path(filename).name}:{lineno})")


INTERRUPTED = 130  # the shell's code for a run stopped by ctrl-C


def main() -> None:
    """Run the CLI: every error a user can cause ends as one line on stderr and exit code 2
    (usage errors included, which click would print as a box of help); ctrl-C as one line, 130."""
    warnings.showwarning = show_warning
    # deprecation notices of the libraries underneath are for their callers' developers, not for a user
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        say_error(str(exc))
        sys.exit(2)
    except typer.exceptions.TyperException as exc:  # click's usage errors: a bad flag, a value of the wrong type
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message:  # an empty one is "no arguments": the help is already printed
            context = getattr(exc, "ctx", None)
            where = f" (see `{context.command_path} --help`)" if context is not None else ""
            say_error(message + where)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        say_error("interrupted")
        sys.exit(INTERRUPTED)
    except OSError as exc:  # the last net: a name too long, a permission, a full disk met where no check foresaw it
        where = f"{exc.filename}: " if exc.filename else ""
        say_error(f"{where}{exc.strerror or exc}")
        sys.exit(2)
    if code == INTERRUPTED:  # typer turns ctrl-C into this code before a command could say more
        say_error("interrupted")
        sys.exit(INTERRUPTED)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
