"""The bf16 product kernel alone (engine/bf16_kernel.c `linear`): every product of one decode
step of a target — each layer's q/k/v, o, gate/up and down (fused as the lean stack packs them),
and the LM head: SmolLM2-135M's are 121 — over random weights of its shapes, at n rows each, on
torch's threads.

    python scripts/bench_products.py                        # this checkout's kernel, n = 1,2,4,8,12,16,32,64
    python scripts/bench_products.py --against d6fc321      # and that revision's bf16_kernel.c, interleaved
    python scripts/bench_products.py --instructions AMX,VDPBF16PS   # a CPU with AMX: this kernel on each, interleaved

Prints per n the median ms of one step's products, the FLOP/s against the peak of the instruction
the products ran on (VDPBF16PS, or AMX's TDPBF16PS; bf16_kernel.products()) measured in the same
process, and the weight bytes read per second. With --against, the other revision's
source is built beside this one's (each packs its own copy of the weights) and the two builds'
repetitions are interleaved, so their ratio is measured in one run: the development VM's memory
bandwidth drifts between 30 and 60 GB/s, and only a ratio taken within one run means anything.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from specbench.engine import bf16_kernel
from specbench.engine.speed import median
from specbench.errors import UserError
from specbench.targets.loading import load_config

ROOT = Path(__file__).resolve().parent.parent


def step_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every product one decode step computes, in order: as the lean stack packs them."""
    width, dim = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * dim
    layer = [(qkv, width), (width, config.num_attention_heads * dim), (2 * config.intermediate_size, width),
             (width, config.intermediate_size)]
    return layer * config.num_hidden_layers + [(config.vocab_size, width)]


def packed(library: ctypes.CDLL, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Random bf16 weights packed by `library` (its own layout), in the kernel's huge-page arena."""
    out = []
    generator = torch.Generator().manual_seed(0)
    for n, k in shapes:
        weight = (torch.randn(n, k, generator=generator) * 0.02).to(torch.bfloat16)
        data = bf16_kernel._ARENA.take(weight.numel())
        library.pack_weight(weight.data_ptr(), data.data_ptr(), n, k)
        out.append(data)
    return out


def one_step(library: ctypes.CDLL, weights, shapes, x: torch.Tensor, y: torch.Tensor, rows: int) -> float:
    start = time.perf_counter()
    for data, (n, k) in zip(weights, shapes):
        library.linear(x.data_ptr(), rows, k, data.data_ptr(), n, y.data_ptr(), None, None)
    return (time.perf_counter() - start) * 1e3


def row_counts(text: str) -> list[int]:
    """--rows: comma-separated whole numbers >= 1."""
    try:
        rows = [int(r) for r in text.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of row counts >= 1 (e.g. 1,2,4,8)")
    return rows


def uses_amx(library: ctypes.CDLL, on: int | None = None) -> int:
    """Whether `library`'s products run on AMX, after switching them (on: 1 or 0) where given; 0 for a
    revision built before the kernel had AMX."""
    if not hasattr(library, "amx_enable"):
        return 0
    return library.amx_enable(-1 if on is None else on)


def other_build(revision: str) -> ctypes.CDLL:
    """The kernels of `revision`'s engine/bf16_kernel.c, built beside this checkout's."""
    shown = subprocess.run(["git", "show", f"{revision}:specbench/engine/bf16_kernel.c"], check=False, cwd=ROOT,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        why = (shown.stderr.strip() or f"git exited with {shown.returncode}").splitlines()[-1]
        raise UserError(f"--against {revision}: git has no specbench/engine/bf16_kernel.c there ({why})")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bf16_kernel.c"
        path.write_text(shown.stdout)
        try:
            return bf16_kernel.build(path)
        except OSError as exc:
            why = (str(exc).strip() or type(exc).__name__).splitlines()[-1]
            raise UserError(f"--against {revision}: its kernel did not build: {why}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="whose shapes (a target alias/id/path: its config only)")
    parser.add_argument("--rows", type=row_counts, default=row_counts("1,2,4,8,12,16,32,64"))
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--against", help="a git revision whose engine/bf16_kernel.c is built and timed beside this checkout's")
    parser.add_argument("--instructions", help="AMX,VDPBF16PS: this checkout's kernel on each instruction in turn (a CPU with AMX)")
    args = parser.parse_args()
    if bf16_kernel.unavailable():
        parser.error(f"the bf16 kernel does not run here: {bf16_kernel.unavailable()}")
    try:  # bad input: one line
        shapes = step_shapes(load_config(args.model))
        builds = {"this checkout": bf16_kernel._library()}
        if args.against:
            builds[args.against] = other_build(args.against)
    except UserError as exc:
        parser.error(str(exc))
    # the instruction each build's products run on: the process's choice, or each of --instructions in turn
    on = {name: uses_amx(library) for name, library in builds.items()}
    if args.instructions:
        if args.against or set(args.instructions.split(",")) - {"AMX", "VDPBF16PS"}:
            parser.error("--instructions takes AMX and/or VDPBF16PS, comma separated, without --against")
        if "AMX" in args.instructions and bf16_kernel.products() != "AMX":
            parser.error("--instructions AMX: the products do not run on AMX here (no AMX, or Linux refused the tiles)")
        library = builds["this checkout"]
        builds = {name: library for name in args.instructions.split(",")}
        on = {name: int(name == "AMX") for name in builds}
    weights = {name: packed(library, shapes) for name, library in builds.items()}
    rows = args.rows
    widest = max(max(n, k) for n, k in shapes)
    x = (torch.randn(max(rows), widest) * 0.1).to(torch.bfloat16)
    y = torch.empty(max(rows), widest, dtype=torch.bfloat16)
    params = sum(n * k for n, k in shapes)
    peaks = {}
    for name, library in builds.items():
        uses_amx(library, on[name])
        peaks[name] = bf16_kernel.dot_peak_flops() if library is bf16_kernel._library() else library.dot_peak(50_000_000)
    times = {(name, m): [] for name in builds for m in rows}
    for rep in range(args.reps + 1):
        for m in rows:
            for name, library in builds.items():
                uses_amx(library, on[name])
                ms = one_step(library, weights[name], shapes, x, y, m)
                if rep:  # the first round warms up
                    times[name, m].append(ms)
    print(f"{args.model}: {len(shapes)} products, {params / 1e6:.1f} M weights ({2 * params / 1e6:.0f} MB in bf16), "
          f"{torch.get_num_threads()} threads, medians of {args.reps}; peaks: "
          + ", ".join(f"{name} {'AMX' if on[name] else 'VDPBF16PS'} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items()))
    names = list(builds)
    header = "rows | " + " | ".join(f"{name}: ms, GFLOP/s (of peak), GB/s" for name in names)
    print(header + (f" | {names[0]} / {names[1]}" if len(names) == 2 else ""))
    for m in rows:
        cells = []
        for name in names:
            ms = median(times[name, m])
            flops = 2 * params * m / (ms / 1e3)
            cells.append(f"{ms:.2f}, {flops / 1e9:.0f} ({flops / peaks[name]:.0%}), {2 * params / (ms / 1e3) / 1e9:.1f}")
        ratio = f" | {median(times[names[0], m]) / median(times[names[1], m]):.3f}" if len(names) == 2 else ""
        print(f"{m} | " + " | ".join(cells) + ratio)


if __name__ == "__main__":
    main()
