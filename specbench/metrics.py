"""Every metric specbench prints, computed from step and turn records in one place.

Definitions (docs/metrics.md says the same for a reader):
- τ (mean accepted length): tokens emitted per verification step, the target's
  bonus/correction token included; plain decoding = 1.00.
- acceptance rate: accepted draft tokens / drafted tokens (all tree nodes).
- per-position acceptance at depth i, over steps whose draft reached depth i:
  unconditional P(accepted >= i); conditional P(accepted >= i | accepted >= i-1).
- c: draft ms per step / verify ms per step.
- tokens/s: total new tokens / total decode wall time (prefill included), over
  all prompts ("overall"); speedup = spec tokens/s / baseline tokens/s.
- exact match: share of speculative turns whose output equals plain decoding's;
  each greedy turn that differs is a near-tie (the target's two best tokens
  within rounding of each other, specbench/engine/divergence.py) or a divergence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from specbench.records import BASELINE, DIVERGENCE, NEAR_TIE, SPEC, MemoryFacts, StepMeasure, StepRecord, TurnRecord


@dataclass
class PositionRate:
    position: int
    steps: int  # steps whose draft reached this depth
    unconditional: float
    conditional: float | None  # None when no step reached the previous depth accepted


@dataclass
class Diverged:
    """A speculative turn whose output differs from plain decoding's (TurnRecord fields;
    kind and the margins are None where the run did not classify it: sampling, older runs)."""

    prompt_id: str
    turn: int
    position: int | None  # first differing new token
    kind: str | None = None  # "near-tie" or "divergence"
    plain_top2: list[int] | None = None
    spec_top2: list[int] | None = None
    plain_margin: float | None = None
    spec_margin: float | None = None
    tolerance: float | None = None


@dataclass
class Summary:
    steps: int
    tau: float
    acceptance_rate: float | None  # None when nothing was drafted
    per_position: list[PositionRate]
    draft_ms_per_step: float
    verify_ms_per_step: float
    overhead_ms_per_step: float  # step wall - draft - verify
    cost_coefficient: float | None  # c = draft / verify
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_ms: float
    baseline_tokens_per_s: float | None = None
    speedup: float | None = None
    mbsu: float | None = None  # memory-bound speedup model, beside the measured speedup
    exact_match_rate: float | None = None
    diverged: list[Diverged] = field(default_factory=list)
    near_ties: int = 0  # diverged turns classified as near-ties
    divergences: int = 0  # diverged turns classified as real divergences

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def tau(steps: Sequence[StepMeasure]) -> float:
    return _mean([s.accepted + 1 for s in steps])


def acceptance_rate(steps: Sequence[StepMeasure]) -> float | None:
    drafted = sum(s.tree_size for s in steps)
    return sum(s.accepted for s in steps) / drafted if drafted else None


def per_position(steps: Sequence[StepMeasure]) -> list[PositionRate]:
    rates = []
    for i in range(1, max((s.tree_depth for s in steps), default=0) + 1):
        reached = [s for s in steps if s.tree_depth >= i]
        hits = sum(s.accepted >= i for s in reached)
        prior = sum(s.accepted >= i - 1 for s in reached)
        rates.append(PositionRate(i, len(reached), hits / len(reached), hits / prior if prior else None))
    return rates


def throughput(turns: Sequence[TurnRecord]) -> tuple[int, float, float]:
    """(new tokens, wall seconds, tokens/s) over all turns."""
    tokens = sum(t.new_tokens for t in turns)
    wall_s = sum(t.wall_ms for t in turns) / 1000
    return tokens, wall_s, (tokens / wall_s if wall_s else 0.0)


def summarise(
    steps: Iterable[StepRecord], turns: Iterable[TurnRecord], memory: tuple[float, int] | None = None
) -> Summary:
    """Summary of the spec mode, with the baseline of the same records for speedup.
    `memory` = (c, γ): draft/target bytes read per forward and sequential draft
    passes per step, for MBSU (see `memory_model`)."""
    steps, turns = list(steps), list(turns)
    spec_steps = [s for s in steps if s.mode == SPEC]
    spec_turns = [t for t in turns if t.mode == SPEC]
    base_turns = [t for t in turns if t.mode == BASELINE]

    draft_ms = _mean([s.draft_ms for s in spec_steps])
    verify_ms = _mean([s.verify_ms for s in spec_steps])
    overhead_ms = _mean([s.step_ms - s.draft_ms - s.verify_ms for s in spec_steps])
    tokens, wall_s, tps = throughput(spec_turns)
    summary = Summary(
        steps=len(spec_steps),
        tau=tau(spec_steps),
        acceptance_rate=acceptance_rate(spec_steps),
        per_position=per_position(spec_steps),
        draft_ms_per_step=draft_ms,
        verify_ms_per_step=verify_ms,
        overhead_ms_per_step=overhead_ms,
        cost_coefficient=draft_ms / verify_ms if verify_ms else None,
        new_tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tps,
        ttft_ms=_mean([t.ttft_ms for t in spec_turns]),
    )
    if memory is not None:
        summary.mbsu = memory_bound_speedup(summary.tau, *memory)
    if base_turns:
        _, _, base_tps = throughput(base_turns)
        summary.baseline_tokens_per_s = base_tps
        summary.speedup = tps / base_tps if base_tps else None
    compared = [t for t in spec_turns if t.exact_match is not None]
    if compared:
        summary.exact_match_rate = sum(t.exact_match for t in compared) / len(compared)
        summary.diverged = [
            Diverged(t.prompt_id, t.turn, t.first_divergence, t.divergence_kind, t.plain_top2, t.spec_top2,
                     t.plain_margin, t.spec_margin, t.tie_tolerance)
            for t in compared if not t.exact_match
        ]
        summary.near_ties = sum(d.kind == NEAR_TIE for d in summary.diverged)
        summary.divergences = sum(d.kind == DIVERGENCE for d in summary.diverged)
    return summary


def memory_model(facts: MemoryFacts) -> tuple[float, int] | None:
    """(c, γ) from a run's recorded forward bytes (RunInfo.memory), or None for runs that lack them."""
    if not facts.target_forward_bytes or facts.draft_forward_bytes is None or facts.draft_passes_per_step is None:
        return None
    return facts.draft_forward_bytes / facts.target_forward_bytes, facts.draft_passes_per_step


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per step for i.i.d. acceptance alpha and k drafts."""
    return k + 1.0 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.: (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1))."""
    return expected_tokens(alpha, k) / (k * c + 1)


def memory_bound_speedup(tau_value: float, c: float, gamma: int) -> float:
    """MBSU = τ / (c γ + 1), c = draft/target parameter-bytes ratio, γ = sequential draft passes."""
    return tau_value / (c * gamma + 1)


def alpha_iid(steps: Sequence[StepMeasure]) -> float | None:
    """The i.i.d. per-token acceptance α that best explains the steps (maximum likelihood):
    each step is a run of Bernoulli(α) trials stopped by the first rejection or by the
    end of its draft, so α = accepted / (accepted + steps that stopped on a rejection).
    The α of Leviathan et al.'s expected-speedup formula."""
    accepted = sum(s.accepted for s in steps)
    rejections = sum(s.accepted < s.tree_depth for s in steps)
    trials = accepted + rejections
    return accepted / trials if trials else None


@dataclass
class BatchSummary:
    """A run at --batch-size B > 1 (run.json `batch`): aggregate throughput of each mode over its
    batch decodes (every output token / the batches' wall time), the speedup at this same B, and
    the per-request view (each turn's own wall from the moment its row took it)."""

    size: int
    refill: bool
    tokens_per_s: float  # aggregate, the drafter
    baseline_tokens_per_s: float | None
    speedup: float | None  # aggregate tokens/s against plain decoding at the same B
    ms_per_token: float  # per request: mean of wall_ms / new tokens, the drafter
    baseline_ms_per_token: float | None
    ttft_ms: float  # per request, from the moment its row took it (prefill)
    baseline_ttft_ms: float | None
    tau: float  # over every row's steps
    acceptance_rate: float | None
    row_tau: list[float] = field(default_factory=list)  # τ of each request (a row's sequence), in record order

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def batch_summary(batch: dict, steps: Iterable[StepRecord], turns: Iterable[TurnRecord]) -> BatchSummary:
    """The BatchSummary of a run's records and its run.json `batch` entry."""
    steps, turns = list(steps), list(turns)

    def aggregate(mode: str) -> float | None:
        runs = [b for b in batch.get("batches", []) if b["mode"] == mode]
        wall_s = sum(b["wall_ms"] for b in runs) / 1000
        return sum(b["tokens"] for b in runs) / wall_s if wall_s else None

    def per_request(mode: str) -> tuple[float | None, float | None]:
        mine = [t for t in turns if t.mode == mode and t.new_tokens]
        if not mine:
            return None, None
        return _mean([t.wall_ms / t.new_tokens for t in mine]), _mean([t.ttft_ms for t in mine])

    spec_steps = [s for s in steps if s.mode == SPEC]
    by_request: dict[tuple[str, int], list[StepRecord]] = {}
    for s in spec_steps:
        by_request.setdefault((s.prompt_id, s.turn), []).append(s)
    tps, base_tps = aggregate(SPEC) or 0.0, aggregate(BASELINE)
    ms, ttft = per_request(SPEC)
    base_ms, base_ttft = per_request(BASELINE)
    return BatchSummary(
        size=batch["size"], refill=batch["refill"], tokens_per_s=tps, baseline_tokens_per_s=base_tps,
        speedup=tps / base_tps if base_tps else None, ms_per_token=ms or 0.0, baseline_ms_per_token=base_ms,
        ttft_ms=ttft or 0.0, baseline_ttft_ms=base_ttft, tau=tau(spec_steps), acceptance_rate=acceptance_rate(spec_steps),
        row_tau=[tau(request) for request in by_request.values()],
    )
