"""The result schema every command writes (run, and later simulate).

A run directory holds:
- `run.json`     — one `RunInfo`: the configuration and the environment.
- `prompts.jsonl` — one `TurnRecord` per (prompt, turn, mode).
- `steps.jsonl`  — one `StepRecord` per verification step.
Every record names its run (`run_id`, as run.json does); readers refuse a record of another run.
`mode` is "baseline" (plain decoding) or "spec" (the drafter). Bump
SCHEMA_VERSION when a field changes meaning.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = 1

BASELINE = "baseline"
SPEC = "spec"
# TurnRecord.divergence_kind: what a greedy turn that differs from plain decoding is
NEAR_TIE = "near-tie"
DIVERGENCE = "divergence"


@dataclass
class StepMeasure:
    """What the decode loop measures in one verification step."""

    draft_ms: float  # drafter.propose, synchronised
    verify_ms: float  # the target's forward over root + tree
    step_ms: float  # the whole step: draft + verify + acceptance + KV compaction + bookkeeping
    tree_size: int  # drafted tokens (tree nodes)
    tree_depth: int  # longest root-to-leaf path in the draft
    accepted: int  # draft tokens accepted (depth of the accepted path); the step emits accepted + 1


@dataclass
class StepRecord(StepMeasure):
    """A StepMeasure with the turn it belongs to, as stored in steps.jsonl."""

    prompt_id: str
    turn: int
    mode: str
    step: int
    run_id: str | None = None  # the run it was measured in (RunStore stamps it): a record copied into another run is refused

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TurnRecord:
    prompt_id: str
    turn: int
    mode: str
    category: str
    prompt_tokens: int
    new_tokens: int
    steps: int  # verification steps (the prefill's first token is not a step)
    wall_ms: float  # prefill + all steps
    ttft_ms: float  # prefill, which yields the first new token
    output_ids: list[int]
    # filled for mode "spec": comparison with the baseline's output of the same turn
    exact_match: bool | None = None
    first_divergence: int | None = None  # index of the first differing new token, None if equal
    # filled for mode "spec" at temperature 0 when the outputs differ: the target's logits rows that chose
    # the token at first_divergence on each path (specbench/engine/divergence.py defines the rule)
    divergence_kind: str | None = None  # NEAR_TIE (rounding can flip it) or DIVERGENCE
    plain_top2: list[int] | None = None  # [chosen token, runner-up] on the plain path
    spec_top2: list[int] | None = None  # [chosen token, runner-up] on the speculative path
    plain_margin: float | None = None  # chosen logit - runner-up logit, plain path
    spec_margin: float | None = None  # the same on the speculative path
    tie_tolerance: float | None = None  # the largest plain_margin + spec_margin a near-tie may have
    task: str | None = None  # the task the category belongs to (Spec-Bench groups 13 categories into 6)
    text: str | None = None  # the decoded answer (for FastChat model_answer export)
    run_id: str | None = None  # the run it was measured in (RunStore stamps it): a record copied into another run is refused

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryFacts:
    """What the memory-bound speedup model (metrics.memory_model) reads from a run, kept in run.json's
    `extra` under these names: the bytes one target forward reads, the bytes one draft pass reads,
    and the sequential draft passes per step (None where a run did not record them)."""

    target_forward_bytes: int | None = None
    draft_forward_bytes: int | None = None
    draft_passes_per_step: int | None = None


@dataclass
class RunInfo:
    run_id: str
    command: str
    target: str
    target_id: str
    drafter: str
    drafter_options: dict[str, Any]
    workload: str
    workload_hash: str
    decode: dict[str, Any]  # max_new_tokens, temperature, seed, dtype, device, ...
    environment: dict[str, Any]  # package versions, torch/CUDA, device name, git revision, host
    started: str
    finished: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def memory(self) -> MemoryFacts:
        return MemoryFacts(**{name: (self.extra or {}).get(name) for name in MemoryFacts.__dataclass_fields__})

    @property
    def simulated(self) -> bool:
        """Written by `simulate` (predicted from a log), not measured."""
        return bool((self.extra or {}).get("simulated"))

    @classmethod
    def starting(cls, label: list[str], **fields: Any) -> RunInfo:
        """The record of a run starting now (measured or simulated): its id, made here alone, is the
        local start time and `label` (target, drafter, ...), safe as a directory name."""
        run_id = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), *label]))
        return cls(run_id=run_id, started=datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields)


def first_divergence(spec: list[int], baseline: list[int]) -> int | None:
    """Index of the first position where the outputs differ; a shorter output
    diverges where it ends (unlike a zip() comparison, which hides that)."""
    for i, (a, b) in enumerate(zip(spec, baseline)):
        if a != b:
            return i
    return None if len(spec) == len(baseline) else min(len(spec), len(baseline))
