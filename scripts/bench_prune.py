"""Hydra's tree and per-step pruning (`--prune-below`) on the embedded default, several settings
interleaved prompt by prompt in one process, so that the VM's drifts in speed hit them alike.

    python scripts/bench_prune.py                                              # the catalogue's CPU default and the chain of 3
    python scripts/bench_prune.py --setups "chain:3@0;smollm2_hydra_cpu_pruned@0;smollm2_hydra_cpu_pruned@0.1" --reps 5
    python scripts/bench_prune.py --workload pool-train                        # the prompts a choice is made on

A setup is TREE@FLOOR: a tree as `--tree` takes it (empty: the catalogue's for this device) and a
`--prune-below` floor. Every setup and plain decoding decode each prompt in turn (after one untimed
warm-up of each, as `specbench run` warms up), greedy, outputs checked against plain decoding's. One
line per repetition: plain decoding's tokens/s, then per setup its speedup over plain decoding in
that repetition, τ (tokens per step), drafted nodes and draft ms per step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from specbench.drafters.heads.hydra import HydraDrafter
from specbench.engine.loop import warm_up
from specbench.errors import UserError
from specbench.runner import Benchmark, RunConfig, check_fits_before_loading, load

DEFAULT_SETUPS = "chain:3@0;@0;@"  # the chain of 3 whole; the CPU tree whole; the catalogue's CPU default


@dataclass
class Totals:
    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0
    nodes: int = 0
    draft_ms: float = 0.0
    inexact: list[str] = field(default_factory=list)


def parse_setups(text: str) -> list[tuple[str, str | None, float | None]]:
    """(label, tree or None for the catalogue's, floor or None for the catalogue's) per TREE@FLOOR."""
    setups = []
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        tree, at, floor = spec.partition("@")
        if not at:
            raise ValueError(f"setup '{spec}' is not TREE@FLOOR (e.g. chain:3@0.1, or @ for the catalogue's tree and floor)")
        try:
            value = float(floor) if floor else None
        except ValueError:
            raise ValueError(f"setup '{spec}': the floor '{floor}' is not a number") from None
        setups.append((spec, tree or None, value))
    if not setups:
        raise ValueError("give at least one setup")
    return setups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=DEFAULT_SETUPS, help=f"TREE@FLOOR;... (default {DEFAULT_SETUPS!r})")
    parser.add_argument("--workload", default="pool-heldout")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    try:
        setups = parse_setups(args.setups)
        if args.reps < 1 or args.limit < 1 or args.max_new_tokens < 1:
            raise ValueError("--reps, --limit and --max-new-tokens must be at least 1")
        config = RunConfig(drafter="hydra", workload=args.workload, limit=args.limit, max_new_tokens=args.max_new_tokens)
        bench = Benchmark(config, load(config), check_fits_before_loading(config))
        drafters = {}
        for label, tree, floor in setups:  # the options checked as `specbench run` checks them
            given = {name: value for name, value in (("tree", tree), ("prune_below", floor)) if value is not None}
            drafters[label] = HydraDrafter.create(bench.target, HydraDrafter.Options.parse("hydra", given))
    except (UserError, ValueError) as exc:
        parser.error(str(exc))
    target, plain = bench.target, bench.plain
    first = torch.tensor(bench._turn_ids(plain, bench.prompts[0], 0, [], args.max_new_tokens))
    for drafter in drafters.values():
        warm_up(target, drafter, bench.longest_sequence(), first, args.max_new_tokens, baseline=plain)
    for label, drafter in drafters.items():
        info = drafter.describe()
        print(f"{label}: tree {info['tree']} ({info['tree_nodes']} nodes), prune_below {info['prune_below']:g}")
    print(f"target: {target.engine} engine, {str(target.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads; "
          f"{args.workload} --limit {args.limit}, {args.max_new_tokens} new tokens")
    for rep in range(1, args.reps + 1):
        totals = {name: Totals() for name in ["plain", *drafters]}
        for prompt in bench.prompts:
            expected = None
            for name, drafter in [("plain", plain), *drafters.items()]:
                start = time.perf_counter()
                _, result = bench._decode(drafter, prompt, 0, [])
                total = totals[name]
                total.seconds += time.perf_counter() - start
                total.tokens += len(result.output_ids)
                total.steps += len(result.steps)
                total.nodes += sum(s.tree_size for s in result.steps)
                total.draft_ms += sum(s.draft_ms for s in result.steps)
                expected = result.output_ids if expected is None else expected
                if result.output_ids != expected:
                    total.inexact.append(prompt.id)
        plain_rate = totals["plain"].tokens / totals["plain"].seconds
        cells = [f"plain {plain_rate:.1f} tokens/s"]
        for name in drafters:
            t = totals[name]
            exact = "" if not t.inexact else f", NOT EXACT on {', '.join(t.inexact)}"
            cells.append(f"{name}: {t.tokens / t.seconds / plain_rate:.3f}x, tau {t.tokens / t.steps:.2f}, "
                         f"nodes {t.nodes / t.steps:.2f}, draft {t.draft_ms / t.steps:.2f} ms{exact}")
        print(f"{time.strftime('%H:%M:%S')} rep {rep}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
