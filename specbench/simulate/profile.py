"""The target's verify-latency profile: ms per forward of n tokens, n = 1..max_tokens.

Measured over a typical context (a real prompt, extended to `context_tokens`),
as the decode loop verifies: a chain of n-1 draft tokens after the root, then
the cache rolled back, so every n sees the same context. Each n is measured
`repeats` times after a warm-up; the median is kept.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from specbench.checks import check_count, check_output_file, context_window
from specbench.engine.engines import ENGINE_HELP
from specbench.engine.loop import Clock
from specbench.engine.options import CommandConfig, option
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.files import atomic_write_text, write_lock
from specbench.progress import SILENT, Progress
from specbench.simulate.log import VerifyProfile
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP, TARGET_HELP


def check_profile_window(window: int | None, context_tokens: int, max_tokens: int, model: str,
                         flags: tuple[str, ...] = ("--context-tokens", "--max-tokens")) -> None:
    """The longest profiled forward sees the context plus max_tokens positions: refused past the window."""
    if window and context_tokens + max_tokens > window:
        room = f"at most {window - max_tokens} context tokens" if window > max_tokens else f"{flags[1]} below {window}"
        raise UserError(f"{flags[0]} {context_tokens} + {flags[1]} {max_tokens} needs {context_tokens + max_tokens} positions, "
                        f"past the {window}-token context window of {model}: use {room}")


@torch.inference_mode()
def measure_profile(
    target, context: list[int], context_tokens: int, max_tokens: int = 128, repeats: int = 3, device_name: str = "",
    flags: tuple[str, str, str] = ("--context-tokens", "--max-tokens", "--repeats"),
) -> VerifyProfile:
    for value, flag in zip((context_tokens, max_tokens, repeats), flags):
        check_count(value, flag)
    if not context:
        raise UserError("profile: need a non-empty context prompt")
    check_profile_window(target.context_window(), context_tokens, max_tokens, target.name, flags)
    ids, filler = _context(context, context_tokens, max_tokens)
    target.prefill(torch.tensor(ids), max_positions=context_tokens + max_tokens)

    def forward(tree: DraftTree) -> None:
        target.verify(ids[-1], tree)

    ms = _timed(forward, target.rollback, filler.to(target.device), max_tokens, repeats, Clock(target.device))
    return VerifyProfile(context_tokens=context_tokens, ms=ms, device_name=device_name, repeats=repeats)


@torch.inference_mode()
def measure_batch_profile(rows_target, context: list[int], context_tokens: int, max_tokens: int, repeats: int) -> list[float]:
    """t(B, n), B = the rows of a RowsTarget (targets/batched.py): ms of one forward of every row
    verifying its root + a chain of n - 1, n = 1..max_tokens, each row prefilled with the same
    context, as `measure_profile` measures one row. A verify commits nothing, so every row keeps its length."""
    ids, filler = _context(context, context_tokens, max_tokens)
    rows = list(range(rows_target.rows))
    for row in rows:
        rows_target.prefill_row(row, torch.tensor(ids), max_positions=context_tokens + max_tokens)

    def forward(tree: DraftTree) -> None:
        rows_target.verify_rows(rows, [ids[-1]] * len(rows), [tree] * len(rows))

    return _timed(forward, lambda: None, filler.to(rows_target.device), max_tokens, repeats, Clock(rows_target.device))


def _context(context: list[int], context_tokens: int, max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The context (the prompt repeated to `context_tokens`) and the draft tokens a chain of up to max_tokens - 1 takes."""
    ids = (context * (context_tokens // len(context) + 1))[:context_tokens]
    return ids, torch.tensor(ids * (max_tokens // len(ids) + 1))[: max_tokens - 1]


def _timed(forward, rollback, filler: torch.Tensor, max_tokens: int, repeats: int, clock: Clock) -> list[float]:
    """Median ms of `forward(chain of n - 1)` for n = 1..max_tokens, each shape warmed up once, rolled back after each."""
    ms = []
    for n in range(1, max_tokens + 1):
        tree = DraftTree.chain(filler[: n - 1])
        forward(tree)  # warm-up for this shape
        rollback()
        times = []
        for _ in range(repeats):
            t0 = clock.now()
            forward(tree)
            times.append(clock.now() - t0)
            rollback()
        ms.append(statistics.median(times))
    return ms


@dataclass
class ProfileConfig(CommandConfig):
    """What `specbench profile` measures; each field's help is what `--help` shows."""

    target: str = option("smollm2-135m", TARGET_HELP)
    workload: str = option("builtin", "the context is its first prompt, repeated to --context-tokens")
    context_tokens: int = option(256, "context length the forwards see", min=1)
    max_tokens: int = option(128, "profile forwards of 1..N tokens", min=1)
    repeats: int = option(3, "timed repeats per token count (median kept)", min=1)
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)
    engine: str = option("auto", ENGINE_HELP)
    # the batch sizes whose t(B, n) is measured besides B = 1 (the CLI's --batch; docs/batch.md)
    batch: tuple[int, ...] = ()


def profile_target(config: ProfileConfig, out: Path, progress: Progress = SILENT) -> VerifyProfile:
    """`specbench profile`: load the target and measure its profile over the workload's first prompt
    repeated to `context_tokens`; written to `out` as JSON."""
    from specbench.targets.loading import load_config

    c = config  # its counts were checked when it was made (CommandConfig)
    check_output_file(out, "--out")
    check_profile_window(context_window(load_config(c.target)), c.context_tokens, c.max_tokens, c.target)  # before the weights load
    with write_lock(out):  # before the minutes of measuring: a second profile into `out` is refused at once
        return _profile(c, out, progress)


def _profile(c: ProfileConfig, out: Path, progress: Progress) -> VerifyProfile:
    from specbench.environment import environment
    from specbench.targets import load_target
    from specbench.workloads import encode_turn, load_workload

    target = load_target(c.target, c.device, c.dtype, c.engine, progress=progress)
    if target.tokenizer is None:
        raise UserError(f"target '{c.target}' has no tokenizer to encode the context prompt")
    context = encode_turn(target.tokenizer, load_workload(c.workload)[0], 0, [])
    with progress.status("measuring"):
        # as a run prepares its engine before timing: the cache planned, buckets captured or profiled
        target.warm_up(c.max_tokens, (), c.context_tokens + c.max_tokens)
        result = measure_profile(target, context, c.context_tokens, c.max_tokens, c.repeats, environment(target.device)["device_name"])
    for rows in sorted(set(c.batch) - {1}):  # on the batch engine a run at --batch-size B uses, over the same model
        from specbench.targets.batched import RowsHFTarget

        with progress.status(f"measuring {rows} rows per forward"):
            rows_target = RowsHFTarget(target, rows)
            # refused in one line where the rows' KV and activations do not fit
            rows_target.warm_up(c.context_tokens + c.max_tokens, c.max_tokens, c.context_tokens)
            result.batch_ms[str(rows)] = measure_batch_profile(rows_target, context, c.context_tokens, c.max_tokens, c.repeats)
            del rows_target
    atomic_write_text(out, json.dumps(result.to_json()) + "\n")
    return result
