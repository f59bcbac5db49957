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

from specbench.engine.loop import Clock
from specbench.engine.options import option
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.simulate.log import VerifyProfile
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP, TARGET_HELP


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
        target.rollback()
        times = []
        for _ in range(repeats):
            t0 = clock.now()
            target.verify(root, tree)
            times.append(clock.now() - t0)
            target.rollback()
        ms.append(statistics.median(times))
    return VerifyProfile(context_tokens=context_tokens, ms=ms, device_name=device_name, repeats=repeats)


@dataclass
class ProfileConfig:
    """What `specbench profile` measures; each field's help is what `--help` shows."""

    target: str = option("smollm2-135m", TARGET_HELP)
    workload: str = option("builtin", "the context is its first prompt, repeated to --context-tokens")
    context_tokens: int = option(256, "context length the forwards see", min=1)
    max_tokens: int = option(128, "profile forwards of 1..N tokens", min=1)
    repeats: int = option(3, "timed repeats per token count (median kept)", min=1)
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)


def profile_target(config: ProfileConfig, out: Path, progress: Progress = SILENT) -> VerifyProfile:
    """`specbench profile`: load the target and measure its profile over the workload's first prompt
    repeated to `context_tokens`; written to `out` as JSON."""
    from specbench.environment import environment
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.workloads import encode_turn, load_workload

    c = config
    dev = resolve_device(c.device)
    with progress.status(f"loading {c.target}"):
        target = HFTarget.load(c.target, dev, resolve_dtype(c.dtype, dev))
    if target.tokenizer is None:
        raise UserError(f"target '{c.target}' has no tokenizer to encode the context prompt")
    context = encode_turn(target.tokenizer, load_workload(c.workload)[0], 0, [])
    with progress.status("measuring"):
        result = measure_profile(target, context, c.context_tokens, c.max_tokens, c.repeats, environment(dev)["device_name"])
    Path(out).write_text(json.dumps(result.to_json()) + "\n")
    return result
