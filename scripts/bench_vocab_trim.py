"""VocabTrim trade-off on one machine, in one process: τ, draft ms/step, measured
speedup and MBSU for a draft model with its LM head trimmed to N tokens.

    python scripts/bench_vocab_trim.py --draft-model smollm2-135m-draft --sizes full,16384,8192,4096,2048

The id list is counted from the target's own plain-decoding outputs on a
calibration workload (a separate run, written to --out), then every size is
measured on the benchmark workload with its plain-decoding baseline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from specbench.metrics import memory_model
from specbench.report.build import run_summary
from specbench.runner import RunConfig, load, start_run


def measure(config: RunConfig, out: Path, target=None):
    target = target or load(config)
    directory = start_run(config, out, command="scripts/bench_vocab_trim.py", target=target)
    info, summary, _ = run_summary(directory)
    return target, directory, info, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft-model", default="smollm2-135m-draft", help="the bundled 1-layer draft by default")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--sizes", default="full,16384,8192,4096,2048")
    parser.add_argument("--calibrate-on", default="builtin-completion", help="workload whose target outputs are counted")
    parser.add_argument("--workload", default="builtin")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/bench_vocab_trim"))
    args = parser.parse_args()

    console = Console()
    calibration = RunConfig(
        target=args.target, drafter="prompt-lookup", workload=args.calibrate_on, max_new_tokens=128, warmup=False
    )
    target, calibration_dir, _, _ = measure(calibration, args.out)
    console.print(f"calibration: target outputs of {args.calibrate_on} in {calibration_dir}")

    table = Table(title=f"VocabTrim: draft-model {args.draft_model} (k={args.k}) → {args.target}, {args.workload}")
    for column in ("N kept", "τ", "acceptance", "draft ms/step", "verify ms/step", "speedup", "c (bytes)", "MBSU"):
        table.add_column(column, justify="right")
    for size in args.sizes.split(","):
        options = {"draft_model": args.draft_model, "k": args.k}
        if size != "full":
            options |= {"vocab_trim": int(size), "vocab_trim_from": str(calibration_dir)}
        config = RunConfig(
            target=args.target,
            drafter="draft-model",
            drafter_options=options,
            workload=args.workload,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
        )
        _, directory, info, summary = measure(config, args.out, target=target)
        c, _ = memory_model(info.memory)
        table.add_row(
            size,
            f"{summary.tau:.2f}",
            f"{summary.acceptance_rate:.1%}",
            f"{summary.draft_ms_per_step:.1f}",
            f"{summary.verify_ms_per_step:.1f}",
            f"{summary.speedup:.2f}×",
            f"{c:.3f}",
            f"{summary.mbsu:.2f}×",
        )
        console.print(f"N={size}: τ {summary.tau:.2f}, speedup {summary.speedup:.2f}× ({directory})")
    console.print(table)
    console.print(f"device: {info.environment['device_name']}, {info.environment['cpu_threads']} threads")


if __name__ == "__main__":
    main()
