"""`specbench tune` end to end on the embedded default (SmolLM2-135M-Instruct, CPU): tune on the
training prompts, then measure on held-out prompts, tuned against the catalogue's old defaults.

    python scripts/bench_tune.py                                  # medusa, hydra, draft-model
    python scripts/bench_tune.py --work /tmp/tune --reuse         # keep logs/runs already in --work
    python scripts/bench_tune.py --drafters hydra --heldout-limit 16

1. record: `pool-train` (--train-limit prompts, --hidden, with its verify profile) and `pool-heldout`
   (--heldout-limit prompts, --hidden): the same --max-new-tokens.
2. the CPU verify profile, measured in this process just before tuning (--profile log: the log's);
   overhead: a short prompt-lookup run on `pool-train` (2 prompts): per-step time outside draft and
   verify, spec and plain, from its records (`--overhead-from`).
3. per drafter: tune on the pool-train log alone (the profile of step 2, draft ms timed along the log);
   the candidates are also walked over the pool-heldout log (predicted τ there == `simulate`'s).
   The same acceptance table under the GPU profile (--gpu-profile) gives the GPU frontier; the draft
   cost there is this CPU's, scaled by t_gpu(1) / t_cpu(1) (the heads were not timed on a GPU).
4. `specbench run` on pool-heldout with the tuned shape and with the old default
   (mc_sim_7b_63_depth3 for the heads, k = 4 for the draft model), each with its plain baseline.
Prints one markdown table: predicted beside measured speedup, τ, exact match; writes the frontier plots.
All timings are of this machine at the time of the run: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specbench.environment import environment
from specbench.errors import UserError
from specbench.flags import tune_commands
from specbench.report.build import run_summary
from specbench.report.plots import tune_frontiers
from specbench.runner import RunConfig, load, start_run
from specbench.simulate.log import VerifyProfile, read_log, read_profile
from specbench.simulate.predict import LatencyModel
from specbench.simulate.profile import measure_profile
from specbench.simulate.record import RecordConfig, record_workload
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.tune import (
    Costs,
    TuneConfig,
    Tuner,
    choose,
    costs_for,
    overhead_from_run,
    plain_tokens_per_s,
    predict,
)
from specbench.simulate.walk import Shape

DEFAULTS = {"medusa": {"tree": "mc_sim_7b_63_depth3"}, "hydra": {"tree": "mc_sim_7b_63_depth3"}, "draft-model": {"k": 4},
            "prompt-lookup": {"k": 5}}
# tune scores whole trees: the catalogue's per-step pruning (hydra's prune_below_cpu) is off while tuning and in the
# runs that check the prediction, so that predicted and measured are of the same trees
WHOLE_TREES = {"hydra": {"prune_below": 0.0}}


def record_logs(args, work: Path) -> tuple[Path, Path]:
    train, heldout = work / "pool-train.jsonl", work / "pool-heldout.jsonl"
    if not (args.reuse and train.exists()):
        record_workload(RecordConfig(workload="pool-train", limit=args.train_limit, max_new_tokens=args.max_new_tokens, hidden=True,
                                     profile=True, profile_max_tokens=128, device="cpu"), train)
    if not (args.reuse and heldout.exists()):
        record_workload(RecordConfig(workload="pool-heldout", limit=args.heldout_limit, max_new_tokens=args.max_new_tokens, hidden=True,
                                     profile=False, device="cpu"), heldout)
    return train, heldout


def cpu_profile(args, work: Path, train, target) -> VerifyProfile:
    """The log's profile, or (default) one measured now in this process, just before the drafts are
    timed: on a shared machine both then see about the same load."""
    if args.profile == "log":
        return train.profile
    path = work / "profile-cpu.json"
    if args.reuse and path.exists():
        return read_profile(path)
    lengths = [len(t.prompt_ids) + len(t.output_ids) // 2 for t in train.turns]
    profile = measure_profile(target, train.turns[0].prompt_ids, sum(lengths) // len(lengths), args.max_nodes + 1, 3,
                              environment(target.device)["device_name"])
    path.write_text(json.dumps(profile.to_json()) + "\n")
    return profile


def run_once(work: Path, name: str, drafter: str, options: dict, args, target, workload: str = "pool-heldout",
             limit: int | None = None) -> Path:
    """A `specbench run` on the held-out prompts (reused with --reuse when its directory exists)."""
    marker = work / "runs" / f"{name}.dir"
    if args.reuse and marker.exists() and Path(marker.read_text()).exists():
        return Path(marker.read_text())
    config = RunConfig(drafter=drafter, drafter_options=options, workload=workload, limit=limit or args.heldout_limit,
                       max_new_tokens=args.max_new_tokens, device="cpu", engine=args.engine, dtype=args.dtype)
    directory = start_run(config, work / "runs", command=f"bench_tune.py: {name}", target=target)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(directory))
    return directory


def predicted_default(heldout, drafter: str, options: dict, target, model: LatencyModel, spec_overhead: float,
                      plain_overhead: float, latency_steps: int) -> tuple[float, float]:
    """(τ, speedup) that simulate's walk and the same cost model predict for the old default on the held-out log."""
    shape = Shape.chain(options["k"]) if "k" in options else Shape.from_spec(options["tree"])
    whole = WHOLE_TREES.get(drafter, {})
    result = Simulator(heldout, SimulateConfig(drafter, whole, [shape], latency_steps=latency_steps), target).score().results[0]
    steps = [s for turn in result.steps for s in turn]
    _, tps = predict(steps, result.draft_ms, spec_overhead, model)
    return sum(s.accepted + 1 for s in steps) / len(steps), tps / plain_tokens_per_s(model, plain_overhead)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench-tune"))
    parser.add_argument("--drafters", default="medusa,hydra,draft-model")
    parser.add_argument("--train-limit", type=int, default=160, help="pool-train prompts recorded for tuning")
    parser.add_argument("--heldout-limit", type=int, default=8, help="pool-heldout prompts measured")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-nodes", type=int, default=128, help="largest tree considered (chains: 8)")
    parser.add_argument("--gpu-profile", type=Path, default=Path(__file__).resolve().parent.parent / "docs/profiles/h100-vicuna-7b-fast.json")
    parser.add_argument("--latency-steps", type=int, default=32)
    parser.add_argument("--profile", choices=("fresh", "log"), default="fresh",
                        help="CPU verify profile: measured now, before tuning (default), or the pool-train log's")
    parser.add_argument("--reuse", action="store_true", help="keep logs and runs already in --work")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a machine shared with other jobs")
    parser.add_argument("--engine", default="auto", help="the target engine, as `specbench run --engine` (default: auto)")
    parser.add_argument("--dtype", default="auto", help="the target dtype, as `specbench run --dtype` (default: auto)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work
    (work / "trees").mkdir(parents=True, exist_ok=True)

    # the target `specbench run` loads on this CPU (--engine and --dtype as run takes them: by default the fast
    # engine in bf16 where the CPU computes it): the profile, the drafts' timing and the runs are all of it.
    # Loaded first, so that a bad --engine or --dtype is one line before minutes of recording.
    try:
        target = load(RunConfig(target="smollm2-135m", device="cpu", engine=args.engine, dtype=args.dtype))
    except UserError as exc:
        parser.error(str(exc))
    print(f"target: {target.engine} engine, {str(target.dtype).removeprefix('torch.')}")
    train_path, heldout_path = record_logs(args, work)
    train, heldout = read_log(train_path), read_log(heldout_path)
    heldout.turns = heldout.turns[: args.heldout_limit]  # the prompts the runs measure (a reused log may hold more)
    cpu = LatencyModel.build(cpu_profile(args, work, train, target), None, None)
    gpu = LatencyModel.build(read_profile(args.gpu_profile), None, None)
    calibration = run_once(work, "calibrate-overhead", "prompt-lookup", {}, args, target, workload="pool-train", limit=2)
    spec_overhead, plain_overhead, overhead_source = overhead_from_run(calibration)
    print(f"overhead per step: spec {spec_overhead:.2f} ms, plain {plain_overhead:.2f} ms ({overhead_source})")

    rows = []
    for drafter in args.drafters.split(","):
        chain = drafter in ("draft-model", "prompt-lookup")
        tuner = Tuner(train, TuneConfig(drafter, dict(WHOLE_TREES.get(drafter, {})), max_nodes=8 if chain else args.max_nodes,
                                        latency_steps=args.latency_steps), target)
        verify = tuner.over(heldout)
        costs = costs_for(tuner, calibration)
        frontier = tuner.frontier(cpu, costs, "this CPU: " + ("the pool-train log's profile" if args.profile == "log" else
                                                                "profile measured before tuning"), verify)
        out = work / "trees" / f"{drafter}.json"
        result = choose(tuner, frontier, train, heldout, out, "scripts/bench_tune.py")
        frontiers = [frontier]
        if not chain:  # the same candidates under the GPU-shaped profile
            scale = gpu.verify_ms(1) / cpu.verify_ms(1)
            gpu_costs = Costs({n: ms * scale for n, ms in costs.draft_ms.items()}, costs.timed_sizes,
                              f"this CPU's draft ms × t_gpu(1) / t_cpu(1) = × {scale:.3f}")
            frontiers.append(tuner.frontier(gpu, gpu_costs, f"H100 profile ({args.gpu_profile.name})", verify))
            print(f"{drafter}: GPU profile picks {frontiers[1].chosen.size} nodes (depth {frontiers[1].chosen.depth}), "
                  f"CPU profile {frontier.chosen.size}")
        tune_frontiers(frontiers, work / f"{drafter}-frontiers.png", f"{drafter} (bundled) on SmolLM2-135M: tuned on pool-train")
        (work / f"{drafter}-frontiers.json").write_text(json.dumps([f.__dict__ | {"points": [p.__dict__ for p in f.points]}
                                                                     for f in frontiers], indent=1, default=str))
        print(f"{drafter}: chose {'k = ' if chain else ''}{result.chosen.size}{'' if chain else ' nodes'}; {tune_commands(result.check)[0]}")
        tuned_options = {"k": result.chosen.size} if chain else {"tree": str(out)}
        for label, options in (("tuned", tuned_options), ("default", DEFAULTS[drafter])):
            directory = run_once(work, f"{drafter}-{label}", drafter, {**WHOLE_TREES.get(drafter, {}), **options}, args, target)
            _, measured, _ = run_summary(directory)
            if label == "tuned":
                tau_pred, speedup_pred = result.chosen.verify_tau, result.chosen.verify_speedup
            else:
                tau_pred, speedup_pred = predicted_default(heldout, drafter, options, target, cpu, spec_overhead, plain_overhead,
                                                           args.latency_steps)
            shape = f"k = {options['k']}" if "k" in options else (f"tuned, {result.chosen.size} nodes" if label == "tuned" else options["tree"])
            rows.append((drafter, shape, tau_pred, measured.tau, speedup_pred, measured.speedup, measured.exact_match_rate,
                         measured.draft_ms_per_step, measured.verify_ms_per_step, measured.overhead_ms_per_step, str(directory)))

    print("\n| drafter | shape | τ predicted | τ measured | speedup predicted | speedup measured | exact | draft ms | verify ms | other ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d, shape, tp, tm, sp, sm, exact, dm, vm, om, _ in rows:
        print(f"| {d} | {shape} | {tp:.3f} | {tm:.3f} | {sp:.2f}× | {sm:.2f}× | {exact:.0%} | {dm:.1f} | {vm:.1f} | {om:.1f} |")
    (work / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
