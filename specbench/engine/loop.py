"""The one decode loop, for every drafter and for plain decoding.

prefill -> [drafter proposes a tree -> target verifies root + tree in one
forward -> acceptance rule picks the path -> KV keeps only that path] until
EOS or max_new_tokens. Plain decoding is this loop with an empty draft.
`decode_rows` runs it over B rows at once (docs/batch.md): each row its own sequence, tree,
acceptance and KV length, one verify forward for all; `decode` is its batch of one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from specbench.engine.acceptance import accept
from specbench.engine.events import EngineEvents, counted
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




class OneRow:
    """A `Target` driven as a RowsTarget of one row: batch 1 runs the same loop on today's targets."""

    rows = 1

    def __init__(self, target: Target) -> None:
        self.target, self.device, self.eos_token_ids = target, target.device, target.eos_token_ids

    def prefill_row(self, row: int, prompt: torch.Tensor, taps=(), max_positions: int | None = None):
        return self.target.prefill(prompt, taps, max_positions)

    def verify_rows(self, rows: list[int], roots: list[int], trees: list[DraftTree], taps=()):
        logits, hidden = self.target.verify(roots[0], trees[0], taps)
        return [logits], [hidden]

    def commit_row(self, row: int, accepted_nodes: list[int]) -> None:
        self.target.commit(accepted_nodes)


@dataclass
class Request:
    """One sequence to decode: its prompt, its token budget and, when sampling, its own RNG."""

    prompt_ids: torch.Tensor
    max_new_tokens: int
    generator: torch.Generator | None = None


@dataclass
class _Row:
    """A sequence in a batch row: what the loop keeps of it while it runs."""

    request: int
    drafter: Drafter
    prompt_ids: torch.Tensor
    max_new_tokens: int
    generator: torch.Generator | None
    start: float
    ttft_ms: float
    output: list[int]
    sequence: torch.Tensor
    pending: list
    steps: list[StepMeasure] = field(default_factory=list)


@dataclass
class Batch:
    """What decode_rows yields: one Decoded per request (in request order; its wall and TTFT from
    the moment its row took it), and the whole batch's wall time (aggregate throughput)."""

    decoded: list[Decoded]
    wall_ms: float
    rows: int
    refill: bool


@torch.inference_mode()  # caches are inference tensors; compaction writes into them
def decode(
    target: Target,
    drafter: Drafter,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Decoded:
    """One sequence on a `Target`: the loop at batch 1."""
    return decode_rows(OneRow(target), drafter, [Request(prompt_ids, max_new_tokens, generator)], temperature).decoded[0]


@torch.inference_mode()
def decode_rows(
    target,
    drafter: Drafter,
    requests: list[Request],
    temperature: float = 0.0,
    refill: bool = True,
) -> Batch:
    """Decode `requests` target.rows at a time (a RowsTarget; OneRow for a plain Target). Each row
    has its own tree, acceptance, bonus and KV length. A row whose sequence ends takes the next
    request at once (`refill`: continuous batching) or, without refill, waits until every row of
    its batch is done (static batches)."""
    clock = Clock(target.device)
    batch_start = clock.now()
    taps, rule = drafter.taps, drafter.acceptance
    queue = list(range(len(requests)))[::-1]  # popped from the end: request order
    live: dict[int, _Row] = {}
    forks: dict[int, Drafter] = {}  # one drafter per row, for every sequence the row takes
    decoded: list[Decoded | None] = [None] * len(requests)

    def finish(slot: int) -> None:
        row = live.pop(slot)
        decoded[row.request] = Decoded(row.output, row.ttft_ms, clock.now() - row.start, row.steps, _aligned(row.output, row.pending))

    def done(row: _Row) -> bool:
        return len(row.output) >= row.max_new_tokens or row.output[-1] in target.eos_token_ids

    def admit(slot: int) -> None:
        """Give `slot` the next request: prefill it alone at its own length, in its row only."""
        index = queue.pop()
        request = requests[index]
        start = clock.now()
        prompt_ids = request.prompt_ids.reshape(-1).to(target.device)
        max_positions = drafter.furthest_position(prompt_ids.numel(), request.max_new_tokens)  # a static cache is sized for it now
        logits, hidden = target.prefill_row(slot, prompt_ids, taps, max_positions)
        first = accept(DraftTree.empty(target.device), logits[-1:], temperature, request.generator, rule).bonus
        output = [first]
        ttft_ms = clock.now() - start
        pending = [top2(logits[-1:])]  # per step: top2() of the rows that chose its emitted tokens
        if slot not in forks:
            forks[slot] = drafter if target.rows == 1 else drafter.fork(slot)
        row_drafter = forks[slot]
        row_drafter.begin(prompt_ids, hidden)
        sequence = torch.cat([prompt_ids, torch.tensor(output, device=target.device)])
        live[slot] = _Row(index, row_drafter, prompt_ids, request.max_new_tokens, request.generator, start, ttft_ms, output,
                          sequence, pending)

    def fill() -> None:
        if not refill and live:
            return
        for slot in range(target.rows):
            while slot not in live and queue:
                admit(slot)
                if done(live[slot]):
                    finish(slot)

    fill()
    while live:
        slots = sorted(live)
        rows = [live[s] for s in slots]
        t0 = clock.now()
        contexts = [DraftContext(r.sequence, r.prompt_ids.numel(), r.max_new_tokens - len(r.output), temperature, r.generator) for r in rows]
        trees = drafter.propose_rows([r.drafter for r in rows], contexts)
        t1 = clock.now()
        all_logits, all_hidden = target.verify_rows(slots, [r.output[-1] for r in rows], trees, taps)
        t2 = clock.now()
        kept_counts = []
        for slot, row, tree, logits, hidden in zip(slots, rows, trees, all_logits, all_hidden):
            result = accept(tree, logits, temperature, row.generator, rule)
            target.commit_row(slot, result.accepted_nodes)
            emitted = tree.tokens[result.accepted_nodes].tolist() + [result.bonus]
            row.drafter.on_verified(VerifyOutcome(tree, result.accepted_nodes, emitted, hidden))
            kept = 0
            for token in emitted:
                row.output.append(token)
                kept += 1
                if len(row.output) >= row.max_new_tokens or token in target.eos_token_ids:
                    break
            row.sequence = torch.cat([row.sequence, torch.tensor(emitted, device=target.device)])
            # emitted token j was chosen by the row of its parent: the root (row 0), then accepted node j-1
            kept_rows_ = kept_rows(result.accepted_nodes[: kept - 1])
            row.pending.append(top2(logits[:kept] if kept_rows_ == list(range(kept)) else logits[kept_rows_]))
            kept_counts.append((kept, len(result.accepted_nodes)))
        t3 = clock.now()
        for slot, row, tree, (kept, accepted) in zip(slots, rows, trees, kept_counts):
            # draft tokens after an accepted EOS are cut from the output, so they do not count
            # as accepted either (the target's continuation past EOS is not part of the sequence)
            row.steps.append(StepMeasure(t1 - t0, t2 - t1, t3 - t0, len(tree), tree.depth, min(accepted, kept)))
            if done(row):
                finish(slot)
        fill()
    return Batch(decoded, clock.now() - batch_start, target.rows, refill)


# --- before anything is timed -------------------------------------------------------------

WARMUP_TOKENS = 16  # the short untimed decode of a warm-up


def warm_up_engines(target: Target, drafter: Drafter, max_positions: int) -> None:
    """Size the static caches for sequences of up to `max_positions` and capture every bucket
    that plain decoding (the root alone) and `drafter` (the root and its largest proposal, with
    its taps) verify, and the drafter's own (a draft model's feeds)."""
    target.warm_up(1, (), max_positions)
    target.warm_up(1 + drafter.max_draft_tokens, drafter.taps, max_positions)
    drafter.warm_up(max_positions)


def warm_up(target: Target, drafter: Drafter, max_positions: int, prompt_ids: torch.Tensor, max_new_tokens: int,
            baseline: Drafter | None = None, temperature: float = 0.0, seed: int = 0) -> EngineEvents:
    """What `specbench run` does before it times anything (runner.py), and scripts/gpu_check.py per
    drafter: the engines warmed up for `drafter` (warm_up_engines), then one short untimed decode of
    `prompt_ids` by `baseline` (if given) and by `drafter`, for the first-call costs (allocations,
    kernel selection). At temperature > 0 each decode samples from a generator seeded `seed`.
    Returns the engine events (captures, compilations) the warm-up caused."""
    with counted() as seen:
        warm_up_engines(target, drafter, max_positions)
        for each in ([baseline] if baseline is not None else []) + [drafter]:
            generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
            decode(target, each, prompt_ids, min(max_new_tokens, WARMUP_TOKENS), temperature, generator)
    return seen


def warm_up_rows(target, drafters: list[Drafter], max_positions: int, prompts: list[torch.Tensor], max_new_tokens: int,
                 temperature: float = 0.0, prompt_tokens: int = 0) -> EngineEvents:
    """`warm_up` for a RowsTarget (batch > 1): every row sized for `max_positions` and checked to fit
    with the largest forward (each drafter's largest verify, or a prefill of `prompt_tokens`), each
    drafter's verify buckets captured where the target captures (target.warm_up), then one short
    untimed batch of `prompts` (a prompt per row) by each drafter in turn."""
    with counted() as seen:
        for drafter in drafters:
            target.warm_up(max_positions, 1 + drafter.max_draft_tokens, prompt_tokens, drafter.taps)
        for drafter in drafters:
            decode_rows(target, drafter, [Request(p, min(max_new_tokens, WARMUP_TOKENS)) for p in prompts], temperature)
    return seen
