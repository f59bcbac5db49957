"""Every drafter family on the embedded default, one machine, one process: `specbench run`
for each drafter on each workload, then one `specbench report` table per workload —
τ, per-position acceptance, draft ms, verify ms, speedup, exact match.

    python scripts/bench_drafters.py                        # builtin and pool-heldout, --limit 4, 64 new tokens
    python scripts/bench_drafters.py --eagle-heads DIR --eagle3-heads DIR   # trained drafters not in the catalogue
    python scripts/bench_drafters.py --drafters hydra,dflash --dflash-weights DIR --dflash-tree dynamic
    python scripts/bench_drafters.py --drafters hydra,eagle3 --workloads pool-heldout --limit 10
    python scripts/bench_drafters.py --drafters hydra --cpu-fast frozen   # on the frozen whole step (minutes compiling)

Each drafter runs with its catalogue defaults for the target (the bundled draft model,
Medusa and Hydra heads, and EAGLE drafters where the catalogue has them; the EAGLE
drafters draft EAGLE-2's dynamic tree unless `--eagle-tree` says otherwise). The runs
land under `--out` (one directory per drafter and workload) and can be read again with
`specbench report DIR`; each workload's table covers every run under `--out/WORKLOAD`, so a
second invocation with other `--drafters` adds its rows (use a fresh `--out` to start over).
Timings on a shared machine are noisy: compare drafters measured together, never across machines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from specbench.errors import UserError
from specbench.report.build import build, run_summary
from specbench.report.frames import group_summary
from specbench.report.tables import exact_match
from specbench.runner import RunConfig, load, start_run
from specbench.targets.fast import FastHFTarget

DRAFTERS = ("prompt-lookup", "draft-model", "medusa", "hydra", "eagle", "eagle3", "dflash")
POSITIONS = 4  # per-position (conditional) acceptance columns shown


def drafter_options(name: str, args) -> dict:
    options: dict = {}
    if name in ("eagle", "eagle3"):
        heads = args.eagle_heads if name == "eagle" else args.eagle3_heads
        if heads:
            options["weights"] = heads
        if args.eagle_tree:
            options["tree"] = args.eagle_tree
    if name == "dflash":
        if args.dflash_weights:
            options["weights"] = args.dflash_weights
        if args.dflash_tree:
            options["tree"] = args.dflash_tree
    return options


def workload_table(runs: list[Path], title: str) -> Table:
    """What `specbench report RUN...` computes for these runs, one line per setup: this
    invocation's runs only, not older ones left in the same folder."""
    result = build(runs)
    table = Table(title=title, header_style="bold")
    columns = ["drafter", "τ", *(f"acc@{p}" for p in range(1, POSITIONS + 1)), "draft ms", "verify ms", "tok/s", "plain tok/s",
               "speedup", "exact"]
    for column in columns:
        table.add_column(column, justify="right")
    cell = lambda v, spec: "n/a" if v is None else f"{v:{spec}}"  # noqa: E731
    order = {name: i for i, name in enumerate(DRAFTERS)}
    for group in sorted(result.groups, key=lambda g: order.get(g.setup["drafter"], len(order))):
        summary = group_summary(group)
        positions = {rate.position: rate.conditional for rate in summary.per_position}
        table.add_row(group.setup["drafter"], cell(summary.tau, ".2f"), *(cell(positions.get(p), ".0%") for p in range(1, POSITIONS + 1)),
                      cell(summary.draft_ms_per_step, ".2f"), cell(summary.verify_ms_per_step, ".2f"),
                      cell(summary.tokens_per_s, ".1f"), cell(summary.baseline_tokens_per_s, ".1f"), cell(summary.speedup, ".2f") + "×",
                      exact_match(summary))
    return table


def check_options(args) -> list[str]:
    """The drafters to run, or one UserError line: an unknown name, or a drafter's option
    given while that drafter does not run (it would be silently ignored)."""
    names = [name.strip() for name in args.drafters.split(",") if name.strip()]
    unknown = [name for name in names if name not in DRAFTERS]
    if not names or unknown:
        raise UserError(f"--drafters: unknown {', '.join(unknown) or 'empty list'} (choose from {', '.join(DRAFTERS)})")
    owners = {"dflash_weights": "dflash", "dflash_tree": "dflash", "eagle_heads": "eagle", "eagle3_heads": "eagle3"}
    for option, owner in owners.items():
        if getattr(args, option) and owner not in names:
            raise UserError(f"--{option.replace('_', '-')} is for {owner}, which --drafters ({args.drafters}) does not run")
    if args.eagle_tree and not {"eagle", "eagle3"} & set(names):
        raise UserError(f"--eagle-tree is for eagle and eagle3, which --drafters ({args.drafters}) does not run")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafters", help="comma-separated (default: all; dflash only with --dflash-weights or a catalogue draft)")
    parser.add_argument("--workloads", default="builtin,pool-heldout")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eagle-heads", help="EAGLE-1 checkpoint directory (default: the catalogue's for the target)")
    parser.add_argument("--eagle3-heads", help="EAGLE-3 checkpoint directory (default: the catalogue's for the target)")
    parser.add_argument("--eagle-tree", help="tree for eagle/eagle3 (default: their own, EAGLE-2's dynamic tree)")
    parser.add_argument("--dflash-weights", help="DFlash checkpoint directory (default: the catalogue's for the target)")
    parser.add_argument("--dflash-tree", help="tree for dflash: chain:K, dynamic, or a tree of ranks (default: a chain of the block)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/bench_drafters"))
    parser.add_argument("--cpu-fast", choices=("lean", "frozen"), default="lean",
                        help="on a CPU, the fast engine's variant the target and its baseline run on: lean (what `--engine "
                             "auto` runs) or frozen (the whole step compiled with its weights frozen, engine/frozen_step.py: "
                             "minutes of compiling per bucket and taps, in the warm-up)")
    args = parser.parse_args(argv)
    try:
        if args.drafters is None:
            from specbench.catalogue import drafter_entry

            has_dflash = args.dflash_weights or drafter_entry("dflash", args.target).get("heads")
            args.drafters = ",".join(d for d in DRAFTERS if d != "dflash" or has_dflash)
        bench(args, check_options(args))
    except UserError as exc:  # bad input: one line, as the CLI prints it
        print(f"bench_drafters: {exc}", file=sys.stderr)
        return 2
    return 0


def load_for_bench(config: RunConfig, cpu_fast: str):
    """The run's target; with cpu_fast "frozen", the fast engine's frozen-step variant of it."""
    target = load(config)
    if cpu_fast == "lean":
        return target
    if target.engine != "fast" or target.device.type != "cpu":
        raise UserError("--cpu-fast frozen is a variant of the fast engine on a CPU: leave it out on this device")
    try:
        return FastHFTarget(target.model, target.tokenizer, name=target.name, model_id=target.model_id, compiled="frozen")
    except ValueError as exc:  # a model the frozen step does not compute
        raise UserError(f"--cpu-fast frozen: {exc}; leave it out for this target") from None


def bench(args, drafters: list[str]) -> None:
    console = Console(width=200)  # the table whole, also when piped into a file
    target = None
    for workload in args.workloads.split(","):
        directories = []
        for name in drafters:
            config = RunConfig(target=args.target, drafter=name, drafter_options=drafter_options(name, args), workload=workload,
                               limit=args.limit, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype)
            target = target or load_for_bench(config, args.cpu_fast)
            directory = start_run(config, args.out / workload, command="scripts/bench_drafters.py", target=target)
            directories.append(directory)
            console.print(f"{workload} {name}: {directory}")
        info = run_summary(directories[0])[0]
        env = info.environment
        title = (f"{args.target} on {workload} (--limit {args.limit}, {args.max_new_tokens} new tokens; {env.get('device_name')}, "
                 f"{env.get('cpu_threads')} threads, {info.decode.get('dtype')}): acc@p = conditional acceptance at draft position p")
        console.print(workload_table(directories, title))


if __name__ == "__main__":
    sys.exit(main())
