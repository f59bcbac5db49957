"""Medusa vs Hydra on the same tree, one machine, one process: draft ms/step,
verify ms/step and τ for each head drafter.

    python scripts/bench_heads.py                              # embedded SmolLM2-135M, the bundled trained heads
    python scripts/bench_heads.py --heads fresh --tree chain:3 --limit 4
    python scripts/bench_heads.py --shape vicuna-7b --device cuda  # random-weight Vicuna-7B-shaped target, fp16

On the embedded default the catalogue's heads run: the bundled, trained
Medusa (4 heads) and Hydra++ (3 heads) on the same depth-3 tree
(`mc_sim_7b_63_depth3`); `--heads fresh` runs heads initialised as the
references initialise them (timings of untrained heads). `--shape vicuna-7b`
builds a target with Vicuna-7B's shapes and random weights (timing does not
depend on weight values) and drafts with fresh heads of the published layouts'
sizes on `mc_sim_7b_63`: Medusa (5 heads, 1 layer) and Hydra++ (4 heads, 4
layers, prefix layer).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specbench.drafters.registry import build_drafter
from specbench.engine.loop import decode
from specbench.metrics import tau
from specbench.report.build import run_summary
from specbench.runner import RunConfig, load, start_run
from specbench.targets.synthetic import SHAPES, random_model

DRAFTERS = ("medusa", "hydra", "hydra-decoder")


def random_target(shape: str, device: torch.device, dtype: torch.dtype):
    from specbench.targets.hf import HFTarget

    target = HFTarget(random_model(shape, device, dtype), name=f"random-{shape}")
    target.eos_token_ids = set()  # random weights: decode the full length
    return target


def measure_random(target, drafter_name: str, options: dict, prompts: int, prompt_len: int, new_tokens: int) -> dict:
    drafter = build_drafter(drafter_name, target, options)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, target.vocab_size, (prompt_len,), generator=g) for _ in range(prompts + 1)]
    decode(target, drafter, ids[0], 16)  # warm-up, untimed
    steps = [s for prompt in ids[1:] for s in decode(target, drafter, prompt, new_tokens).steps]
    return {"tau": tau(steps), "draft_ms": statistics.mean(s.draft_ms for s in steps),
            "verify_ms": statistics.mean(s.verify_ms for s in steps), "speedup": None, "steps": len(steps)}


def measure_run(config: RunConfig, out: Path, target=None):
    target = target or load(config)
    directory = start_run(config, out, command="scripts/bench_heads.py", target=target)
    _, s, _ = run_summary(directory)
    row = {"tau": s.tau, "draft_ms": s.draft_ms_per_step, "verify_ms": s.verify_ms_per_step, "speedup": s.speedup,
           "steps": s.steps, "exact": s.exact_match_rate}
    return target, row, directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-weight target of this shape instead of --target")
    parser.add_argument("--drafters", default="medusa,hydra")
    parser.add_argument("--tree", help="default: mc_sim_7b_63 with --shape, else mc_sim_7b_63_depth3 (the bundled Hydra has 3 heads)")
    parser.add_argument("--heads", default="catalogue", help="catalogue (the bundled trained heads) or fresh; --shape: always fresh")
    parser.add_argument("--workload", default="builtin")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/bench_heads"))
    args = parser.parse_args()

    from specbench.targets.loading import resolve_device, resolve_dtype

    console = Console()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target, title = None, ""
    if args.shape:
        target = random_target(args.shape, device, dtype)
        title = f"random-weight {args.shape}-shaped target, {dtype}"
    rows = {}
    tree = args.tree or ("mc_sim_7b_63" if args.shape else "mc_sim_7b_63_depth3")
    for name in args.drafters.split(","):
        options = {"tree": tree}
        if args.shape or args.heads == "fresh":
            options["heads"] = "fresh"
        if args.shape:
            options["num_heads"] = 5 if name == "medusa" else 4
            rows[name] = measure_random(target, name, options, args.limit, 128, args.max_new_tokens)
        else:
            config = RunConfig(target=args.target, drafter=name, drafter_options=options, workload=args.workload,
                               limit=args.limit, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype)
            target, rows[name], directory = measure_run(config, args.out, target)
            environment = run_summary(directory)[0].environment
            title = f"{args.target} ({environment['device_name']}, {environment['cpu_threads']} threads)"
        console.print(f"{name}: {rows[name]}")
    table = Table(title=f"Head drafters on {tree}: {title}")
    for column in ("drafter", "τ", "draft ms/step", "verify ms/step", "draft share", "speedup", "steps"):
        table.add_column(column, justify="right")
    for name, r in rows.items():
        share = r["draft_ms"] / (r["draft_ms"] + r["verify_ms"])
        speedup = f"{r['speedup']:.2f}×" if r["speedup"] else "-"
        table.add_row(name, f"{r['tau']:.2f}", f"{r['draft_ms']:.2f}", f"{r['verify_ms']:.2f}", f"{share:.1%}", speedup, str(r["steps"]))
    console.print(table)


if __name__ == "__main__":
    main()
