"""The one decode loop, for every drafter and for plain decoding.

prefill -> [drafter proposes a tree -> target verifies root + tree in one
forward -> acceptance rule picks the path -> KV keeps only that path] until
EOS or max_new_tokens. Plain decoding is this loop with an empty draft.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from specbench.engine.acceptance import accept
from specbench.engine.protocol import DraftContext, Drafter, Target, VerifyOutcome
from specbench.engine.tree import DraftTree, kept_rows
from specbench.records import StepMeasure


class Clock:
    """Milliseconds since an origin; on CUDA, waits for queued kernels before reading."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.origin = self.now()

    def now(self) -> float:
        self.sync()
        return time.perf_counter() * 1000


TOP_K = 8  # logits kept per emitted token: enough to see a tie among several tokens


class Top2(NamedTuple):
    """The target's two best logits in the row that chose one emitted token, the
    emitted token first where it is one of them (always, for greedy: an exact tie
    lists the token argmax took first); `scale` is the row's max |logit|; `top` the
    row's TOP_K best (token, logit), best first. What specbench/engine/divergence.py
    needs to tell a near-tie (of two tokens or more) from a bug."""

    chosen: int
    runner_up: int
    chosen_logit: float
    runner_up_logit: float
    scale: float
    top: tuple[tuple[int, float], ...] = ()

    def logit_of(self, token: int) -> float | None:
        """This row's logit of `token` if it is among the row's best, else None."""
        if token == self.chosen:
            return self.chosen_logit
        if token == self.runner_up:
            return self.runner_up_logit
        return next((logit for t, logit in self.top if t == token), None)


def top2(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [n, TOP_K], ids [n, TOP_K], max |logit| [n]) of logits rows, left on the device:
    nothing waits for them until the decode is over."""
    values, ids = rows.topk(min(TOP_K, rows.shape[-1]), dim=-1)
    return values, ids, rows.abs().amax(-1)


def _aligned(output: list[int], pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[Top2]:
    """One Top2 per output token from the per-step top2() results (one sync, after timing)."""
    values, ids, scales = (torch.cat(parts).tolist() for parts in zip(*pending))
    out = []
    for token, row_values, row_ids, scale in zip(output, values, ids, scales):
        (v1, v2), (i1, i2) = row_values[:2], row_ids[:2]
        if token == i2 and token != i1:  # an exact tie topk listed the other way round
            v1, v2, i1, i2 = v2, v1, i2, i1
        out.append(Top2(i1, i2, v1, v2, scale, tuple(zip(row_ids, row_values))))
    return out


@dataclass
class Decoded:
    output_ids: list[int]
    ttft_ms: float
    wall_ms: float
    steps: list[StepMeasure] = field(default_factory=list)
    top2: list[Top2] = field(default_factory=list)  # aligned with output_ids


def warm_up_engines(target: Target, drafter: Drafter, max_positions: int) -> None:
    """Before anything is timed: size the static caches for sequences of up to `max_positions`
    and capture every bucket that plain decoding (the root alone) and `drafter` (the root and
    its largest proposal, with its taps) verify, and the drafter's own (a draft model's feeds)."""
    target.warm_up(1, (), max_positions)
    target.warm_up(1 + drafter.max_draft_tokens, drafter.taps, max_positions)
    drafter.warm_up(max_positions)


@torch.inference_mode()  # caches are inference tensors; compaction writes into them
def decode(
    target: Target,
    drafter: Drafter,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Decoded:
    clock = Clock(target.device)
    start = clock.now()
    prompt_ids = prompt_ids.reshape(-1).to(target.device)
    taps, rule = drafter.taps, drafter.acceptance
    # the furthest this sequence can reach: a static cache is sized for it before any step
    max_positions = prompt_ids.numel() + max_new_tokens + drafter.max_draft_tokens + 1
    logits, hidden = target.prefill(prompt_ids, taps, max_positions)
    first = accept(DraftTree.empty(target.device), logits[-1:], temperature, generator, rule).bonus
    output = [first]
    ttft_ms = clock.now() - start
    pending = [top2(logits[-1:])]  # per step: top2() of the rows that chose its emitted tokens
    drafter.begin(prompt_ids, hidden)
    sequence = torch.cat([prompt_ids, torch.tensor(output, device=target.device)])

    steps: list[StepMeasure] = []
    while len(output) < max_new_tokens and output[-1] not in target.eos_token_ids:
        t0 = clock.now()
        context = DraftContext(sequence, prompt_ids.numel(), max_new_tokens - len(output), temperature, generator)
        tree = drafter.propose(context)
        t1 = clock.now()
        logits, hidden = target.verify(output[-1], tree, taps)
        t2 = clock.now()
        result = accept(tree, logits, temperature, generator, rule)
        target.commit(result.accepted_nodes)
        emitted = tree.tokens[result.accepted_nodes].tolist() + [result.bonus]
        drafter.on_verified(VerifyOutcome(tree, result.accepted_nodes, emitted, hidden))
        kept = 0
        for token in emitted:
            output.append(token)
            kept += 1
            if len(output) >= max_new_tokens or token in target.eos_token_ids:
                break
        sequence = torch.cat([sequence, torch.tensor(emitted, device=target.device)])
        # emitted token j was chosen by the row of its parent: the root (row 0), then accepted node j-1
        rows = kept_rows(result.accepted_nodes[: kept - 1])
        pending.append(top2(logits[: kept] if rows == list(range(kept)) else logits[rows]))
        t3 = clock.now()
        # draft tokens after an accepted EOS are cut from the output, so they do not count
        # as accepted either (the target's continuation past EOS is not part of the sequence)
        accepted = min(len(result.accepted_nodes), kept)
        steps.append(StepMeasure(t1 - t0, t2 - t1, t3 - t0, len(tree), tree.depth, accepted))
    wall_ms = clock.now() - start
    return Decoded(output, ttft_ms, wall_ms, steps, _aligned(output, pending))
