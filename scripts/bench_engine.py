"""Eager vs fast decode engine, per dtype, on whatever device this runs on.

    python scripts/bench_engine.py --device cpu         # SmolLM2-135M, fp32 and bf16, eager and fast (lean, packed, compiled, static;
                                                        # --cpu-fast lean,lean-onednn: the bf16 kernels against oneDNN)
    python scripts/bench_engine.py --device cuda        # random-weight Vicuna-7B shape (fp16), eager and fast (CUDA graphs)

Every engine x dtype variant is measured in one process, their repetitions interleaved
(so drifts in machine speed hit all alike), reported as medians:
- the memory-bandwidth limit: weight bytes one forward reads / the measured bandwidth
  (on a CPU the read bandwidth of summing a 1 GiB tensor, on CUDA device-to-device copy),
  and plain decoding's tokens/s as a fraction of it;
- plain decoding tokens/s at a forced fixed length (EOS ignored);
- the verify latency profile t(n), n = tokens in one verify forward (root + a chain of
  n-1), n = 1..64 by default, and t(n)/t(1);
- per-step overhead (step wall - draft - verify) for plain decoding and prompt lookup;
- the fast engine's warm-up, done before anything is timed: on CUDA every bucket captured
  as a graph; on a CPU (`--cpu-fast`) the linear weights prepacked — in bf16 for
  specbench's kernels where the CPU has AVX512_BF16 (engine/bf16_kernel.py), else for
  oneDNN — with Llama layers in fewer operations ("lean", what `--engine fast` runs;
  "lean-onednn" the same with oneDNN's products and torch's operations) or with
  transformers' layers ("packed"), or every bucket's step compiled ("compiled"; the time is
  inductor's, less when its on-disk cache already holds the code), or the whole step compiled
  with its weights frozen in ("frozen", engine/frozen_step.py), or neither ("static":
  the static cache and buckets alone), and each bucket's latency measured, from which a
  verify picks the cheapest bucket that holds it.
Timing does not depend on weight values, so the 7B shape needs no checkpoint.
"""

from __future__ import annotations

import argparse
import json

import torch

from specbench.drafters.prompt_lookup import PromptLookupDrafter
from specbench.engine import bf16_kernel
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.speed import copy_bandwidth, median, read_bandwidth, verify_profile
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget
from specbench.targets.loading import DTYPES, load_causal_lm, resolve_device
from specbench.targets.synthetic import SHAPES, random_model

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def decode_runs(targets: dict, make_drafter, prompt: torch.Tensor, new_tokens: int, reps: int):
    """Per variant: tokens/s of each repetition and every step's overhead, draft and verify ms."""
    out = {name: {"tokens_per_s": [], "overhead_ms": [], "draft_ms": [], "verify_ms": [], "step_ms": []} for name in targets}
    for rep in range(reps + 1):
        for name, target in targets.items():
            result = decode(target, make_drafter(target), prompt, new_tokens)
            if rep == 0:
                continue  # warm-up
            assert len(result.output_ids) == new_tokens
            rec = out[name]
            rec["tokens_per_s"].append(len(result.output_ids) / result.wall_ms * 1000)
            for s in result.steps:
                rec["overhead_ms"].append(s.step_ms - s.draft_ms - s.verify_ms)
                rec["draft_ms"].append(s.draft_ms)
                rec["verify_ms"].append(s.verify_ms)
                rec["step_ms"].append(s.step_ms)
    return out


def parse_sizes(text: str) -> list[int]:
    if "-" in text and "," not in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="a target alias/id/path (default on CPU: smollm2-135m)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a random-weight shape instead (default on CUDA: vicuna-7b)")
    parser.add_argument("--dtypes", default=None, help="comma separated (default: float32,bfloat16 on CPU, float16 on CUDA)")
    parser.add_argument("--engines", default="eager,fast", help="comma separated: eager, fast")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced decode length (EOS ignored)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="1-64", help="verify profile sizes n: a range (1-64) or a comma-separated list")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--cpu-fast", default="lean,packed,compiled,static",
                        help="on a CPU, the fast engine's variants: lean (linear weights prepacked for oneDNN and Llama layers in "
                             "fewer operations: what `--engine fast` runs; in bf16 its products by engine/bf16_kernel.py where "
                             "the CPU has AVX512_BF16, the whole stack in one call), lean-layers (the same, a layer per call under "
                             "transformers' forward), lean-onednn (the same with oneDNN's products), packed (prepacked weights, transformers' layers), "
                             "compiled (torch.compile'd step), frozen (the whole step compiled with its weights frozen, "
                             "engine/frozen_step.py: 80-230 s of compiling per bucket, not in the default list), static (the static cache and buckets from a measured profile, "
                             "torch's default kernels); comma separated")
    parser.add_argument("--json", dest="as_json", action="store_true")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype_names = (args.dtypes or ("float16" if device.type == "cuda" else "float32,bfloat16")).split(",")
    engines = args.engines.split(",")
    if args.model is None and args.shape is None:
        args.shape, args.model = ("vicuna-7b", None) if device.type == "cuda" else (None, "smollm2-135m")
    sizes = parse_sizes(args.sizes)

    targets, label, tokenizer = {}, None, None
    for name in dtype_names:
        dtype = DTYPES[name]
        if args.shape:
            model, label = random_model(args.shape, device, dtype, seed=0), f"random-weight {args.shape} shape"
        else:
            model, tokenizer, source = load_causal_lm(args.model, device, dtype)
            label = source.model_id
        for engine in engines:
            kinds = [""] if engine == "eager" or device.type != "cpu" else args.cpu_fast.split(",")
            for kind in kinds:
                if engine == "eager":
                    target = HFTarget(model, tokenizer)
                elif kind == "static":
                    target = FastHFTarget(model, tokenizer, bucketed=True, packed=False)
                elif kind == "compiled":
                    target = FastHFTarget(model, tokenizer, compiled=True)
                elif kind == "frozen":
                    try:
                        target = FastHFTarget(model, tokenizer, compiled="frozen")
                    except ValueError as exc:  # a model the frozen step does not compute: one line, not a traceback
                        parser.error(f"--cpu-fast frozen: {exc}; leave it out for this model")
                elif kind == "packed":
                    target = FastHFTarget(model, tokenizer, lean=False)
                elif kind == "lean-onednn":
                    target = FastHFTarget(model, tokenizer, kernels="onednn")
                elif kind == "lean-layers":  # the kernels a layer per call, under transformers' forward
                    target = FastHFTarget(model, tokenizer)
                    target.decoder.lean_stack = None
                else:
                    target = FastHFTarget(model, tokenizer)
                target.eos_token_ids = set()  # a forced fixed length
                targets[f"{engine}{'-' + kind if kind else ''} {SHORT.get(name, name)}"] = target
    vocab = next(iter(targets.values())).vocab_size
    generator = torch.Generator().manual_seed(0)
    # a prompt with repeats, so prompt lookup finds n-grams to draft
    motif = torch.randint(3, min(vocab, 1000), (16,), generator=generator)
    prompt = motif.repeat(-(-args.prompt_tokens // 16))[: args.prompt_tokens].to(device)

    # before anything is timed, as `specbench run` does: the cache sized for the longest sequence and
    # every bucket captured or compiled (plain: 1 row, prompt lookup: up to 1 + k, profile: n)
    longest_verify = max(max(sizes), 1 + PromptLookupDrafter(next(iter(targets.values()))).max_draft_tokens)
    positions = args.prompt_tokens + max(args.new_tokens, max(sizes)) + longest_verify
    warm = {}
    for name, target in targets.items():
        if target.engine == "fast":
            ms = target.warm_up(longest_verify, (), positions)
            warm[name] = {"ms": ms, **target.engine_stats()}
    # the bandwidth drifts on a shared host (the development VM's moved between ~35 and ~58 GB/s within a
    # minute): read right before and right after plain decoding's runs, their mean is the limit those runs met
    measure_bandwidth = (lambda: read_bandwidth(device)) if device.type == "cpu" else (lambda: copy_bandwidth(device))
    # the CPU's bf16 arithmetic peak (the products' instruction, VDPBF16PS or AMX's TDPBF16PS, on torch's threads), for
    # the floor of a bf16 verify of n rows
    bf16_cpu = device.type == "cpu" and any(t.dtype == torch.bfloat16 for t in targets.values())
    peak = max(bf16_kernel.dot_peak_flops() for _ in range(3)) if bf16_cpu and bf16_kernel.unavailable() is None else None
    bandwidth_before = measure_bandwidth()
    with torch.inference_mode():
        plain = decode_runs(targets, PlainDecoding, prompt, args.new_tokens, args.reps)
    bandwidth_after = measure_bandwidth()
    with torch.inference_mode():
        lookup = decode_runs(targets, lambda t: PromptLookupDrafter(t), prompt, args.new_tokens, args.reps)
        profile = verify_profile(targets, prompt, sizes, args.reps)
    bandwidth = (bandwidth_before + bandwidth_after) / 2
    for name, target in targets.items():
        if target.engine == "fast":
            warm[name]["compiles_after_warm_up"] = target.engine_stats().get("compiles", 0) - warm[name].get("compiles", 0)
            warm[name]["captures_after_warm_up"] = target.engine_stats()["captures"] - warm[name]["captures"]

    variants = {}
    for name, target in targets.items():
        weight_bytes = target.forward_bytes()
        limit = bandwidth / weight_bytes
        tps = median(plain[name]["tokens_per_s"])
        step_ms = median(plain[name]["step_ms"])
        variants[name] = {
            "engine": target.engine,
            "dtype": str(target.dtype).removeprefix("torch."),
            "weight_bytes": weight_bytes,
            "limit_tokens_per_s": limit,
            "plain_tokens_per_s": tps,
            "fraction_of_limit": tps / limit,  # tokens/s with the prefill counted
            "plain_step_ms": step_ms,
            "step_fraction_of_limit": 1000 / limit / step_ms,  # one decode step against the time its weights take to read
            "verify_ms": profile[name],
            # no engine does better: the weights read once at the bandwidth, or their products' arithmetic at the peak
            # (2 FLOP per weight per row; attention's left out), whichever takes longer
            "floor_ms": {n: 1000 * max(weight_bytes / bandwidth, 2 * n * (weight_bytes / 2) / peak) for n in profile[name]}
            if peak and target.dtype == torch.bfloat16 else None,
            "step_ms": {mode: {k: median(runs[name][k]) for k in ("step_ms", "draft_ms", "verify_ms", "overhead_ms")}
                        for mode, runs in (("plain", plain), ("prompt-lookup", lookup))},
            "warm_up": warm.get(name),
        }
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "model": label,
        "bandwidth_GB_s": bandwidth / 1e9,
        "bandwidth_GB_s_before_after": [bandwidth_before / 1e9, bandwidth_after / 1e9],
        "bandwidth_kind": "read (sum of a 1 GiB tensor)" if device.type == "cpu" else "device-to-device copy",
        "bf16_peak_GFLOP_s": peak / 1e9 if peak else None,
        "bf16_products": bf16_kernel.products() if peak else None,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "variants": variants,
    }
    if args.as_json:
        print(json.dumps(report, indent=1))
        return
    show(report)


def show(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{r['model']} on {r['device_name'] or r['device']}, {r['cpu_threads']} CPU threads; prompt {r['prompt_tokens']} tokens, "
        f"{r['new_tokens']} new tokens forced, medians of {r['reps']} interleaved reps; "
        f"bandwidth {r['bandwidth_GB_s']:.1f} GB/s ({r['bandwidth_kind']}; {r['bandwidth_GB_s_before_after'][0]:.1f} before and "
        f"{r['bandwidth_GB_s_before_after'][1]:.1f} after plain decoding's runs)"
    )
    for name, v in r["variants"].items():
        w = v["warm_up"]
        if w:
            what = (f"{w['graphs']} CUDA graphs captured" if w.get("cuda_graphs") else
                    f"{w.get('compiles', 0)} graphs compiled{' (frozen weights)' if w.get('frozen') else ''}" if w.get("compiled_step") else f"linear weights prepacked, {w.get('lean_layers', 0)} lean layers" if w.get("packed_linears") else "nothing to prepare")
            console.print(f"{name} warm-up (untimed): {what} in {w['ms'] / 1000:.1f} s; KV capacity {w['capacity']}; "
                          f"after warm-up: {w['compiles_after_warm_up']} compilations, {w['captures_after_warm_up']} captures; "
                          f"bucket profile ms {w.get('profile_ms')}")

    plain = Table(title="plain decoding against the memory-bandwidth limit (weight bytes per forward / bandwidth): tokens/s count "
                        "the prompt's prefill, the step is one decode step")
    for col in ("variant", "weight MB", "limit ms/token", "limit tokens/s", "tokens/s", "fraction of limit", "step ms", "step fraction"):
        plain.add_column(col, justify="right" if col != "variant" else "left")
    for name, v in r["variants"].items():
        plain.add_row(name, f"{v['weight_bytes'] / 1e6:.0f}", f"{1000 / v['limit_tokens_per_s']:.1f}", f"{v['limit_tokens_per_s']:.1f}",
                      f"{v['plain_tokens_per_s']:.2f}", f"{v['fraction_of_limit']:.0%}", f"{v['plain_step_ms']:.2f}",
                      f"{v['step_fraction_of_limit']:.0%}")
    console.print(plain)

    steps = Table(title="per-step ms (medians): overhead = step - draft - verify")
    for col in ("mode", "variant", "step", "draft", "verify", "overhead"):
        steps.add_column(col, justify="right" if col not in ("mode", "variant") else "left")
    for name, v in r["variants"].items():
        for mode, m in v["step_ms"].items():
            steps.add_row(mode, name, *(f"{m[k]:.2f}" for k in ("step_ms", "draft_ms", "verify_ms", "overhead_ms")))
    console.print(steps)

    names = list(r["variants"])
    floor = next((v["floor_ms"] for v in r["variants"].values() if v.get("floor_ms")), None)
    title = "verify latency t(n) ms, n = tokens in one forward (medians), and t(n)/t(1)"
    if floor:
        title += (f"; bf16 floor = max(weight bytes / bandwidth, 2 n weights / {r['bf16_peak_GFLOP_s']:.0f} GFLOP/s, "
                  f"the measured {r['bf16_products']} peak): no engine's t(n) is lower")
    prof = Table(title=title)
    prof.add_column("n", justify="right")
    for name in names:
        prof.add_column(name, justify="right")
    for name in names:
        prof.add_column(f"{name} /t(1)", justify="right")
    if floor:
        prof.add_column("bf16 floor", justify="right")
        prof.add_column("floor /floor(1)", justify="right")
    first = {name: r["variants"][name]["verify_ms"] for name in names}
    for n in next(iter(first.values())):
        bound = (f"{floor[n]:.2f}", f"{floor[n] / floor[min(floor)]:.2f}") if floor else ()
        prof.add_row(str(n), *(f"{first[name][n]:.2f}" for name in names),
                     *(f"{first[name][n] / first[name][min(first[name])]:.2f}" for name in names), *bound)
    console.print(prof)


if __name__ == "__main__":
    main()
