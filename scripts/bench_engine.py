"""Eager vs fast decode engine on whatever device this runs on.

    python scripts/bench_engine.py                      # CPU: SmolLM2-135M (fp32)
    python scripts/bench_engine.py --device cuda        # CUDA: random-weight Vicuna-7B shape (fp16)

Prints, for both engines, measured in one process with their repetitions
interleaved (so drifts in machine speed hit both alike) and reported as medians:
plain decoding tokens/s at a forced fixed length (EOS ignored); the verify
latency profile t(n), n = tokens in one verify forward (root + a chain of n-1);
per-step overhead (step wall - draft - verify) for plain decoding and for
prompt lookup; the fast engine's warm-up (its cache sized and every bucket
captured before anything is timed: graphs, ms, KV capacity); and, on CUDA,
plain tokens/s as a fraction of the bandwidth limit (bytes one forward reads /
measured device-to-device copy bandwidth).
`--compiled-step` turns on the fast engine's torch.compile'd step (off by default,
see COMPILED_STEP in specbench/engine/static_cache.py) to measure it.
Timing does not depend on weight values, so the 7B shape needs no checkpoint.
"""

from __future__ import annotations

import argparse
import json

import torch

from specbench.drafters.prompt_lookup import PromptLookupDrafter
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.speed import copy_bandwidth, median, verify_profile
from specbench.engine.static_cache import bucket_size
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget
from specbench.targets.loading import DTYPES, load_causal_lm, resolve_device
from specbench.targets.synthetic import SHAPES, random_model

PROFILE_SIZES = "1,2,4,8,16,24,32,48,64,96,128"


def decode_runs(targets: dict, make_drafter, prompt: torch.Tensor, new_tokens: int, reps: int):
    """Per engine: tokens/s of each repetition and every step's overhead, draft and verify ms."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="a target alias/id/path (default on CPU: smollm2-135m)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a random-weight shape instead (default on CUDA: vicuna-7b)")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced decode length (EOS ignored)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default=PROFILE_SIZES, help="verify profile sizes n, comma separated, or 1-128")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--compiled-step", action="store_true", help="torch.compile the fast engine's step (off by default)")
    parser.add_argument("--json", dest="as_json", action="store_true")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.model is None and args.shape is None:
        args.shape, args.model = ("vicuna-7b", None) if device.type == "cuda" else (None, "smollm2-135m")
    if args.shape:
        model, tokenizer, label = random_model(args.shape, device, dtype), None, f"random-weight {args.shape} shape"
    else:
        model, tokenizer, source = load_causal_lm(args.model, device, dtype)
        label = source.model_id
    sizes = list(range(1, 129)) if args.sizes == "1-128" else [int(s) for s in args.sizes.split(",")]

    targets = {"eager": HFTarget(model, tokenizer), "fast": FastHFTarget(model, tokenizer, compiled_step=args.compiled_step)}
    for target in targets.values():
        target.eos_token_ids = set()  # a forced fixed length
    vocab = targets["eager"].vocab_size
    generator = torch.Generator().manual_seed(0)
    # a prompt with repeats, so prompt lookup finds n-grams to draft
    motif = torch.randint(3, min(vocab, 1000), (16,), generator=generator)
    prompt = motif.repeat(-(-args.prompt_tokens // 16))[: args.prompt_tokens].to(device)

    # before anything is timed, as `specbench run` does: the cache sized for the longest
    # sequence and every bucket captured (plain: 1 row, prompt lookup: up to 1 + k, profile: n)
    longest_verify = max(max(sizes), 1 + PromptLookupDrafter(targets["fast"]).max_draft_tokens)
    positions = args.prompt_tokens + max(args.new_tokens, max(sizes)) + longest_verify
    capture_ms = targets["fast"].warm_up(longest_verify, (), positions)
    with torch.inference_mode():
        plain = decode_runs(targets, PlainDecoding, prompt, args.new_tokens, args.reps)
        lookup = decode_runs(targets, lambda t: PromptLookupDrafter(t), prompt, args.new_tokens, args.reps)
        profile = verify_profile(targets, prompt, sizes, args.reps)

    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "model": label,
        "dtype": str(dtype).removeprefix("torch."),
        "forward_bytes": targets["eager"].forward_bytes(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "fast_graphs": targets["fast"].decoder.graphs is not None,
        "fast_compiled_step": args.compiled_step,
        "fast_warm_up": {"capture_ms": capture_ms, "graphs": targets["fast"].decoder.captures,
                         "buckets_up_to": bucket_size(min(longest_verify, 128)), "kv_capacity": targets["fast"].cache.capacity},
        "fast_captures_after_warm_up": targets["fast"].decoder.captures,  # updated below
        "plain_tokens_per_s": {n: median(r["tokens_per_s"]) for n, r in plain.items()},
        "plain_speedup_fast_over_eager": median(
            [f / e for f, e in zip(plain["fast"]["tokens_per_s"], plain["eager"]["tokens_per_s"])]
        ),
        "step_ms": {
            mode: {n: {k: median(r[k]) for k in ("step_ms", "draft_ms", "verify_ms", "overhead_ms")} for n, r in runs.items()}
            for mode, runs in (("plain", plain), ("prompt-lookup", lookup))
        },
        "verify_ms": profile,
    }
    report["fast_captures_after_warm_up"] = targets["fast"].decoder.captures - report["fast_warm_up"]["graphs"]
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        limit = bandwidth / report["forward_bytes"]
        report["copy_bandwidth_GB_s"] = bandwidth / 1e9
        report["bandwidth_limit_tokens_per_s"] = limit
        report["fraction_of_bandwidth_limit"] = {n: tps / limit for n, tps in report["plain_tokens_per_s"].items()}
    if args.as_json:
        print(json.dumps(report, indent=1))
        return
    show(report)


def show(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{r['model']} ({r['dtype']}) on {r['device_name'] or r['device']}, {r['cpu_threads']} CPU threads; "
        f"prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens forced, medians of {r['reps']} interleaved reps; "
        f"fast engine CUDA graphs: {r['fast_graphs']}" + (", compiled step" if r["fast_compiled_step"] else "")
    )
    w = r["fast_warm_up"]
    console.print(
        f"fast engine warm-up (untimed): {w['graphs']} graphs captured in {w['capture_ms']:.0f} ms (buckets 1..{w['buckets_up_to']} "
        f"at every span); KV capacity {w['kv_capacity']} positions; captures after warm-up: {r['fast_captures_after_warm_up']}"
    )
    tps = r["plain_tokens_per_s"]
    line = f"plain tokens/s: eager {tps['eager']:.2f}, fast {tps['fast']:.2f}; fast/eager {r['plain_speedup_fast_over_eager']:.3f}x"
    if "bandwidth_limit_tokens_per_s" in r:
        frac = r["fraction_of_bandwidth_limit"]
        line += (
            f"\nbandwidth limit: {r['forward_bytes'] / 1e9:.2f} GB per forward / {r['copy_bandwidth_GB_s']:.0f} GB/s copy = "
            f"{r['bandwidth_limit_tokens_per_s']:.1f} tokens/s; eager {frac['eager']:.1%}, fast {frac['fast']:.1%} of it"
        )
    console.print(line)

    steps = Table(title="per-step ms (medians): overhead = step - draft - verify")
    for col in ("mode", "engine", "step", "draft", "verify", "overhead"):
        steps.add_column(col, justify="right" if col not in ("mode", "engine") else "left")
    for mode, per in r["step_ms"].items():
        for engine, m in per.items():
            steps.add_row(mode, engine, *(f"{m[k]:.2f}" for k in ("step_ms", "draft_ms", "verify_ms", "overhead_ms")))
    console.print(steps)

    prof = Table(title="verify latency t(n) ms, n = tokens in one forward (medians)")
    for col in ("n", "eager", "fast", "fast/eager", "eager t(n)/t(1)", "fast t(n)/t(1)"):
        prof.add_column(col, justify="right")
    eager, fast = r["verify_ms"]["eager"], r["verify_ms"]["fast"]
    first = min(eager)
    for n in eager:
        prof.add_row(
            str(n), f"{eager[n]:.2f}", f"{fast[n]:.2f}", f"{fast[n] / eager[n]:.3f}",
            f"{eager[n] / eager[first]:.2f}", f"{fast[n] / fast[first]:.2f}",
        )
    console.print(prof)


if __name__ == "__main__":
    main()
