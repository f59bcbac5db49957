"""Hydra's tree and per-step pruning (`--prune-below`) on the embedded default, several settings
interleaved prompt by prompt in one process, so that the VM's drifts in speed hit them alike; or
any drafter's options (`--drafter medusa --setups "tree=T1;tree=T2"`, `--drafter draft-model
--setups "k=2;k=4"`).

    python scripts/bench_prune.py                                              # the catalogue's CPU default and the chain of 3
    python scripts/bench_prune.py --setups "chain:3@0;smollm2_hydra_cpu_pruned@0;smollm2_hydra_cpu_pruned@0.1" --reps 5
    python scripts/bench_prune.py --workload pool-train                        # the prompts a choice is made on

A setup is TREE@FLOOR: a tree as `--tree` takes it (empty: the catalogue's for this device) and a
`--prune-below` floor (Hydra); or NAME=VALUE,... : the drafter's options as `specbench run` takes
them (`tree`, `k`, `prune_below`, ...; empty: the catalogue's defaults). Every setup and plain decoding decode each prompt in turn (after one untimed
warm-up of each, as `specbench run` warms up), greedy, outputs checked against plain decoding's. One
line per repetition: plain decoding's tokens/s, then per setup its speedup over plain decoding in
that repetition, τ (tokens per step), drafted nodes and draft ms per step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from specbench.drafters.registry import build_drafter
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


def parse_setups(text: str) -> list[tuple[str, dict[str, str]]]:
    """(label, the drafter's options given) per TREE@FLOOR (Hydra's tree and prune_below; empty: the
    catalogue's) or NAME=VALUE,... (any drafter's options)."""
    setups = []
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        if "=" in spec:
            pairs = [part.partition("=") for part in spec.split(",")]
            if not all(name.strip() and eq for name, eq, _ in pairs):
                raise ValueError(f"setup '{spec}' is not NAME=VALUE,... (e.g. k=2 or tree=chain:3)")
            setups.append((spec, {name.strip(): value.strip() for name, _, value in pairs}))
            continue
        tree, at, floor = spec.partition("@")
        if not at:
            raise ValueError(f"setup '{spec}' is not TREE@FLOOR (e.g. chain:3@0.1, or @ for the catalogue's tree and floor) "
                             "nor NAME=VALUE,...")
        try:
            value = float(floor) if floor else None
        except ValueError:
            raise ValueError(f"setup '{spec}': the floor '{floor}' is not a number") from None
        setups.append((spec, {name: v for name, v in (("tree", tree or None), ("prune_below", value)) if v is not None}))
    if not setups:
        raise ValueError("give at least one setup")
    return setups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="hydra", help="the drafter whose setups are compared (default hydra)")
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
        config = RunConfig(drafter=args.drafter, workload=args.workload, limit=args.limit, max_new_tokens=args.max_new_tokens)
        bench = Benchmark(config, load(config), check_fits_before_loading(config))
        drafters = {}
        for label, given in setups:  # the options checked as `specbench run` checks them
            drafters[label] = build_drafter(args.drafter, bench.target, given)
    except (UserError, ValueError) as exc:
        parser.error(str(exc))
    target, plain = bench.target, bench.plain
    first = torch.tensor(bench._turn_ids(plain, bench.prompts[0], 0, [], args.max_new_tokens))
    for drafter in drafters.values():
        warm_up(target, drafter, bench.longest_sequence(), first, args.max_new_tokens, baseline=plain)
    for label, drafter in drafters.items():
        info = drafter.describe()
        shown = [f"{key} {info[key]}" for key in ("tree", "tree_nodes", "prune_below", "k") if key in info]
        print(f"{label}: {', '.join(shown)}")
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
