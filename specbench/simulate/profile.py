"""The target's verify-latency profile: ms per forward of n tokens, n = 1..max_tokens.

Measured over a typical context (a real prompt, extended to `context_tokens`),
as the decode loop verifies: a chain of n-1 draft tokens after the root, then
the cache rolled back, so every n sees the same context. Each n is measured
`repeats` times after a warm-up; the median is kept.
"""

from __future__ import annotations

import statistics

import torch

from specbench.checks import check_count, context_window
from specbench.engine import kv
from specbench.engine.loop import Clock
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.simulate.log import VerifyProfile


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
    check_profile_window(context_window(getattr(target, "config", None)), context_tokens, max_tokens,
                         getattr(target, "name", "the target"), flags)
    ids = (context * (context_tokens // len(context) + 1))[:context_tokens]
    target.prefill(torch.tensor(ids))
    clock = Clock(target.device)
    filler = torch.tensor(ids * (max_tokens // len(ids) + 1))[: max_tokens - 1]
    root = ids[-1]
    ms = []
    for n in range(1, max_tokens + 1):
        tree = DraftTree.chain(filler[: n - 1].to(target.device))
        target.verify(root, tree)  # warm-up for this shape
        kv.truncate(target.cache, target.seq_len)
        times = []
        for _ in range(repeats):
            t0 = clock.now()
            target.verify(root, tree)
            times.append(clock.now() - t0)
            kv.truncate(target.cache, target.seq_len)
        ms.append(statistics.median(times))
    return VerifyProfile(context_tokens=context_tokens, ms=ms, device_name=device_name, repeats=repeats)
