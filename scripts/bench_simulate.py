"""Simulation cost: the teacher-forced pass vs DSD-style step replay, on the same target log.

    python scripts/bench_simulate.py --prompts 50 --max-new-tokens 200

1. Record (once; reused from --work if present) a target log of SmolLM2-135M
   (the embedded default, CPU fp32) on --prompts completion prompts: paragraphs
   of Python standard-library module docstrings (real English text available
   offline).
2. The draft: SmolLM2-135M cut to its first --draft-layers decoder layers (a
   layer-skip self-draft; it shares the target's vocabulary), saved as a local
   model directory; or --draft-model (e.g. the bundled smollm2-135m-draft).
3. Score draft-model k=--k on the log by (a) `simulate`'s teacher-forced pass
   and (b) DSD's way, regenerating k tokens from scratch every step; print both
   wall times, their ratio, and that τ and every step's accepted length agree.
4. Score 6 values of k plus 3 trees in one pass vs one k alone.
Scoring times exclude model loading and draft-latency timing (reported apart).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from specbench.engine.tree import TreeShape
from specbench.metrics import tau
from specbench.simulate.dsd import dsd_replay
from specbench.simulate.log import read_log
from specbench.simulate.record import record
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.walk import Shape
from specbench.targets.hf import HFTarget
from specbench.targets.loading import load_causal_lm
from specbench.workloads import load_workload

TREES = {
    "binary-3": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]],
    "wide-2": [[0], [1], [2], [3], [0, 0], [0, 1], [1, 0], [2, 0]],
    "deep-5": [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]],
}


def docstring_prompts(n: int, path: Path) -> Path:
    """n completion prompts: paragraphs (>= 80 chars, cut at 400) of stdlib module docstrings, up to two per module."""
    rows = []
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "distutils", "lib2to3"}
    for name in sorted(sys.stdlib_module_names):
        if len(rows) >= n:
            break
        if name.startswith("_") or name in skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = (importlib.import_module(name).__doc__ or "").strip()
        except Exception:  # noqa: BLE001 - a module that will not import here is simply skipped
            continue
        paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
        for i, paragraph in enumerate([p for p in paragraphs if len(p) >= 80][:2]):  # up to two per module
            rows.append({"id": f"{name}-{i + 1}", "category": "stdlib-doc", "prompt": paragraph[:400]})
    rows = rows[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def layer_skip_draft(target_model, layers: int, directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    import copy

    draft = copy.deepcopy(target_model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if hasattr(draft.config, "layer_types") and draft.config.layer_types:
        draft.config.layer_types = draft.config.layer_types[:layers]
    draft.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draft-layers", type=int, default=10, help="the layer-skip self-draft's depth")
    parser.add_argument("--draft-model", default=None,
                        help="a draft alias/id/path instead of the layer-skip draft (e.g. smollm2-135m-draft, the bundled 1-layer one)")
    parser.add_argument("--work", type=Path, default=Path("results/bench_simulate"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")

    log_path = args.work / f"smollm2-docs-{args.prompts}x{args.max_new_tokens}.jsonl"
    target = HFTarget.load("smollm2-135m", cpu, torch.float32)
    if not log_path.exists():
        workload = docstring_prompts(args.prompts, args.work / "stdlib-docs.jsonl")
        t0 = time.perf_counter()
        record(target, load_workload(str(workload)), str(workload), args.max_new_tokens, log_path)
        print(f"recorded {log_path} in {time.perf_counter() - t0:.0f} s")
    log = read_log(log_path)
    lengths = [len(t.output_ids) for t in log.turns]
    print(f"log: {len(log.turns)} prompts, {sum(lengths)} target tokens (min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)})")

    if args.draft_model:
        draft_dir, draft_name = args.draft_model, f"draft {args.draft_model}"
    else:
        draft_dir = layer_skip_draft(target.model, args.draft_layers, args.work / f"smollm2-first{args.draft_layers}")
        draft_name = f"{args.draft_layers}-layer SmolLM2 self-draft"
    options = {"draft_model": str(draft_dir)}

    def simulator(shapes):
        return Simulator(log, SimulateConfig("draft-model", options, shapes, latency_steps=0), target=target, device="cpu")

    one = simulator([Shape.chain(args.k)])
    one.score()  # warm-up
    t0 = time.perf_counter()
    fast = one.score()
    fast_s = time.perf_counter() - t0
    fast_steps = fast.results[0].steps

    draft_model, _, _ = load_causal_lm(str(draft_dir), cpu, torch.float32, table="draft_models")
    dsd_replay(draft_model, log.turns[0].prompt_ids, log.turns[0].output_ids[:8], args.k, log.header.max_new_tokens)  # warm-up
    t0 = time.perf_counter()
    slow_steps = [dsd_replay(draft_model, t.prompt_ids, t.output_ids, args.k, log.header.max_new_tokens) for t in log.turns]
    slow_s = time.perf_counter() - t0

    flat_fast = [s for t in fast_steps for s in t]
    flat_slow = [s for t in slow_steps for s in t]
    same = [[s.accepted for s in t] for t in fast_steps] == [[s.accepted for s in t] for t in slow_steps]
    print(f"draft-model ({draft_name}), k={args.k}:")
    print(f"  teacher-forced pass: {fast_s:8.2f} s  τ = {tau(flat_fast):.4f} over {len(flat_fast)} steps")
    print(f"  DSD-style replay:    {slow_s:8.2f} s  τ = {tau(flat_slow):.4f} over {len(flat_slow)} steps")
    print(f"  ratio: {slow_s / fast_s:.1f}×; τ identical: {tau(flat_fast) == tau(flat_slow)}; every step identical: {same}")

    shapes = [Shape.chain(k) for k in range(1, 7)] + [Shape.of_tree(TreeShape(paths, name=name)) for name, paths in TREES.items()]
    many = simulator(shapes)
    t0 = time.perf_counter()
    result = many.score()
    many_s = time.perf_counter() - t0
    print(f"9 shapes (k=1..6 + 3 trees) in one pass: {many_s:.2f} s = {many_s / fast_s:.2f}× one shape ({fast_s:.2f} s)")
    for r in result.results:
        print(f"  {r.shape.name:>14}: τ = {tau([s for t in r.steps for s in t]):.3f}")
    timed = Simulator(log, SimulateConfig("draft-model", options, shapes, latency_steps=32), target=target, device="cpu")
    t0 = time.perf_counter()
    timed_result = timed.score()
    print(f"with draft-latency timing (32 replayed steps per chain length): {time.perf_counter() - t0:.2f} s "
          f"(scoring {timed_result.scoring_s:.2f} s + timing {timed_result.latency_s:.2f} s)")


if __name__ == "__main__":
    main()
