"""The target's verify-latency profile: ms per forward of n tokens, n = 1..max_tokens.

Measured over a typical context (a real prompt, extended to `context_tokens`),
as the decode loop verifies: a chain of n-1 draft tokens after the root, then
the cache rolled back, so every n sees the same context. Each n is measured
`repeats` times after a warm-up; the median is kept.
"""

from __future__ import annotations

import statistics

import torch

from specbench.engine import kv
from specbench.engine.loop import Clock
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.simulate.log import VerifyProfile


@torch.inference_mode()
def measure_profile(
    target, context: list[int], context_tokens: int, max_tokens: int = 128, repeats: int = 3, device_name: str = ""
) -> VerifyProfile:
    if max_tokens < 1 or repeats < 1 or context_tokens < 1:
        raise UserError("profile: --max-tokens, --repeats and --context-tokens must be at least 1")
    if not context:
        raise UserError("profile: need a non-empty context prompt")
    ids = (context * (context_tokens // len(context) + 1))[:context_tokens]
    target.prefill(torch.tensor(ids), max_positions=context_tokens + max_tokens)
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
