"""Raw engine speed, shared by the benchmark scripts (scripts/bench_engine.py,
scripts/gpu_check.py): the device's copy bandwidth and a CPU's read bandwidth (what bounds memory-bound decoding:
weight bytes per forward / bandwidth = the most tokens/s plain decoding can reach) and
the verify latency profile t(n) of several targets measured side by side."""

from __future__ import annotations

import statistics
import time

import torch

from specbench.engine import kv
from specbench.engine.loop import Clock
from specbench.engine.tree import DraftTree


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted, as a forward reads weights once)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * nbytes * reps / (time.perf_counter() - start)


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: the median time to sum a tensor of `nbytes` (fp32), which reads it
    once and writes almost nothing, as a decode forward reads its weights (what bounds it on a CPU)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps + 1):
        sync()
        start = time.perf_counter()
        src.sum()
        sync()
        times.append(time.perf_counter() - start)
    return nbytes / median(times[1:])


def forget_verify(target) -> None:
    """Drop what a verify wrote, so the next one sees the same context (no commit)."""
    kv.truncate(target.cache, target.seq_len)


@torch.inference_mode()
def verify_profile(targets: dict, prompt: torch.Tensor, sizes: list[int], reps: int) -> dict[str, dict[int, float]]:
    """Median ms of one verify forward of n tokens (root + a chain of n-1) after `prompt`, per
    target and n, the targets' repetitions interleaved; a first round (warm-up, and on CUDA the
    fast engine's captures of buckets not yet captured) is not kept."""
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in targets}
    for target in targets.values():
        target.prefill(prompt, max_positions=prompt.numel() + max(sizes))
    for _ in range(reps + 1):
        for n in sizes:
            tree = DraftTree.chain(torch.randint(3, 200, (n - 1,), device=prompt.device))
            for name, target in targets.items():
                clock = Clock(target.device)
                t0 = clock.now()
                target.verify(int(prompt[-1]), tree)
                times[name][n].append(clock.now() - t0)
                forget_verify(target)
    return {name: {n: median(ts[1:]) for n, ts in per.items()} for name, per in times.items()}
