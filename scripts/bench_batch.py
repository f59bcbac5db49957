"""Speedup against batch size on the embedded default: plain decoding and one drafter of each
family at --batch-size 1, 2, 4, 8, one `specbench run` per (drafter, B) on the target loaded once,
plain decoding at the same B inside every run (docs/batch.md).

    python scripts/bench_batch.py                                   # builtin, --limit 8, 32 new tokens
    python scripts/bench_batch.py --batch-sizes 1,4 --drafters hydra --limit 4 --max-new-tokens 16
    python scripts/bench_batch.py --no-refill                       # static batches (the DSD way)

Columns: aggregate output tokens/s of the drafter and of plain decoding at that B (every output
token over the batch decodes' wall time; at B = 1 the run's overall tokens/s, today's loop), the
speedup at that B, per-request ms per output token, τ, and exact match against plain decoding.
B = 1 runs the one-sequence loop on --engine (default auto: on a CPU the fast engine's
prepacked weights and lean layers); B > 1 the batch engine, which on a CPU runs those same
kernels whatever --engine says, so tokens/s compares across B. Families without a checkpoint
for the target are left out and named. Timings on a
shared machine are noisy: compare what was measured together, never across machines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specbench.environment import environment
from specbench.report.build import batch_run_summary, run_summary
from specbench.report.tables import exact_match
from specbench.runner import RunConfig, load, start_run

# one drafter of each family with a checkpoint for the embedded default: training-free, draft
# model (the bundled one), heads (the bundled Hydra++); EAGLE and DFlash have none for SmolLM2 (--eagle-weights, --dflash-weights)
DRAFTERS = ("prompt-lookup", "draft-model", "hydra")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafters", default=",".join(DRAFTERS))
    parser.add_argument("--eagle-weights", help="an EAGLE-1 checkpoint for the target: adds the eagle family")
    parser.add_argument("--dflash-weights", help="a DFlash checkpoint for the target: adds the dflash family")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--workload", default="builtin")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="float32: exactness per row is not clouded by bf16 near-ties")
    parser.add_argument("--no-refill", action="store_true")
    parser.add_argument("--engine", default="auto", help="the engine at B = 1 (and on CUDA at B > 1: fast = graphs)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_batch"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's cores are not fought over)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    drafters = [d for d in args.drafters.split(",") if d]
    options: dict[str, dict] = {d: {} for d in drafters}
    if args.eagle_weights:
        drafters.append("eagle")
        options["eagle"] = {"weights": args.eagle_weights}
    if args.dflash_weights:
        drafters.append("dflash")
        options["dflash"] = {"weights": args.dflash_weights}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    base = dict(target=args.target, workload=args.workload, limit=args.limit, max_new_tokens=args.max_new_tokens,
                dtype=args.dtype, device="cpu", engine=args.engine, refill=not args.no_refill)
    # one target per kind of loop: B = 1 on --engine's target, B > 1 on the batch engine over an eager one
    targets = {1: load(RunConfig(drafter="prompt-lookup", **base)),
               2: load(RunConfig(drafter="prompt-lookup", batch_size=2, **base))}
    console = Console(width=140)  # the drafter names whole, whatever the terminal
    device = environment(targets[1].device).get("device_name")
    table = Table(title=f"{args.target} on {args.workload} (--limit {args.limit}, {args.max_new_tokens} new tokens, {args.dtype}, "
                        f"{'refill' if not args.no_refill else 'no refill'}) on {device}", header_style="bold")
    for column in ("drafter", "B", "tok/s", "plain tok/s", "speedup", "ms/token", "plain ms/token", "τ", "exact"):
        table.add_column(column, justify="right")
    for name in drafters:
        for size in sizes:
            config = RunConfig(drafter=name, drafter_options=options[name], batch_size=size, **base)
            directory = start_run(config, args.out / f"{name}-b{size}", target=targets[min(size, 2)])
            _, summary, _ = run_summary(directory)
            if size > 1:
                batch = batch_run_summary(directory)
                tps, plain, speedup, ms, plain_ms = (batch.tokens_per_s, batch.baseline_tokens_per_s, batch.speedup,
                                                     batch.ms_per_token, batch.baseline_ms_per_token)
            else:
                tps, plain, speedup = summary.tokens_per_s, summary.baseline_tokens_per_s, summary.speedup
                ms = 1000 / tps if tps else None
                plain_ms = 1000 / plain if plain else None
            cell = lambda v, spec: "n/a" if v is None else f"{v:{spec}}"  # noqa: E731
            table.add_row(name, str(size), cell(tps, ".1f"), cell(plain, ".1f"), cell(speedup, ".2f") + "×", cell(ms, ".1f"),
                          cell(plain_ms, ".1f"), cell(summary.tau, ".2f"), exact_match(summary))
            console.print(f"{name} B={size}: {cell(tps, '.1f')} tok/s, plain {cell(plain, '.1f')}, "
                          f"speedup {cell(speedup, '.2f')}×, exact {exact_match(summary)}", highlight=False)
    console.print(table)
    if not args.eagle_weights:
        console.print("eagle: no EAGLE checkpoint for this target in the catalogue; pass --eagle-weights to add the family")


if __name__ == "__main__":
    main()
