"""The result schema every command writes (`run` measures, `simulate` predicts).

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
import secrets
from dataclasses import asdict, dataclass, field, fields
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


def _from_row(cls, row: Any):
    """An instance of the flat dataclass `cls` from a run.json object: fields this version does not
    know (a newer writer's) are ignored, fields an older writer lacked take their defaults."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in known}) if isinstance(row, dict) else cls()


def _without_unset(row: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    """`row` less the `optional` keys that hold None: run.json leaves them out rather than null."""
    return {k: v for k, v in row.items() if not (k in optional and v is None)}


@dataclass
class MemoryFacts:
    """What the memory-bound speedup model (metrics.memory_model) reads from a run, kept in run.json's
    `extra` under these names: the bytes one target forward reads, the bytes one draft pass reads,
    and the sequential draft passes per step (None where a run did not record them)."""

    target_forward_bytes: int | None = None
    draft_forward_bytes: int | None = None
    draft_passes_per_step: int | None = None


@dataclass
class WorkloadFacts:
    """run.json `extra.workload` of a measured run: where its prompts came from."""

    format: str | None = None  # the file format detected
    source: str | None = None  # where it was read from
    prompts: int | None = None  # prompts the run selected (after sharding)
    selection_hash: str | None = None  # the selection before sharding: shards of one workload share it, so `report` merges them


@dataclass
class EngineFacts:
    """run.json `extra.engine` of a measured run: the target's engine and cache, what its warm-up
    captured or compiled, and what happened while prompts were timed (their timings include it)."""

    engine: str | None = None
    dtype: str | None = None
    dtype_choice: str = "given"  # why --dtype auto chose `dtype`, or "given"
    cuda_graphs: bool = False
    capture_ms: float = 0.0  # the warm-up's graph captures
    graphs: int = 0
    capacity: int | None = None  # KV cache positions (the fast engine)
    compiled_step: bool = False
    packed_linears: bool = False  # linear weights prepacked for oneDNN (a CPU fast engine)
    lean_layers: int = 0  # decoder layers run in fewer operations (engine/lean_layer.py)
    kernels: str | None = None  # whose kernels the packed step ran, in words (engine/packed.py kernels_in_use)
    compile_ms: float = 0.0  # the warm-up's step compilations
    compiles: int = 0
    timed_captures: int = 0
    timed_capture_ms: float = 0.0
    timed_compiles: int = 0
    timed_compile_ms: float = 0.0
    timed_regrowths: int = 0  # mid-sequence cache regrowths
    timed_capture_prompts: list[str] = field(default_factory=list)  # prompts whose timings include any of the above
    planned_positions: int | None = None  # the longest sequence the warm-up sized the caches for (None: no warm-up)
    profile_ms: Any = None  # the measured bucket latencies verifies pick their bucket from (fast engine on a CPU)

    def to_json(self) -> dict[str, Any]:
        return _without_unset(asdict(self), ("planned_positions", "profile_ms", "kernels"))

    # `seen`: engine/events.py EngineEvents (counts of captures, compilations, regrowths)
    def set_warm_up(self, seen) -> None:
        """What the warm-up captured or compiled (a resumed run's own warm-up replaces the first's)."""
        self.capture_ms, self.graphs = round(seen.capture_ms, 3), seen.captures
        self.compile_ms, self.compiles = round(seen.compile_ms, 3), seen.compiles

    def add_timed(self, seen, prompt: str) -> None:
        """What happened while `prompt` was timed: its timings include it."""
        if not seen:
            return
        self.timed_captures += seen.captures
        self.timed_capture_ms = round(self.timed_capture_ms + seen.capture_ms, 3)
        self.timed_compiles += seen.compiles
        self.timed_compile_ms = round(self.timed_compile_ms + seen.compile_ms, 3)
        self.timed_regrowths += seen.regrowths
        self.timed_capture_prompts.append(prompt)


@dataclass
class MeasuredExtra(MemoryFacts):
    """run.json `extra` of a run `specbench run` measured."""

    drafter: dict[str, Any] = field(default_factory=dict)  # Drafter.describe(): each drafter's own facts
    workload: WorkloadFacts = field(default_factory=WorkloadFacts)
    engine: EngineFacts | None = None  # set when measuring starts (Benchmark.run)
    # --batch-size B > 1: {"size", "refill", "engine", "batches": [each batch decode's totals]} (runner.py);
    # absent at B = 1, so a batch-1 run.json is what it was before batches existed
    batch: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        row = {**asdict(self), "workload": asdict(self.workload)}
        if self.engine is not None:
            row["engine"] = self.engine.to_json()
        return _without_unset(row, ("engine", "batch"))

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> MeasuredExtra:
        extra = _from_row(cls, row)
        extra.workload = _from_row(WorkloadFacts, row.get("workload"))
        extra.engine = _from_row(EngineFacts, row["engine"]) if isinstance(row.get("engine"), dict) else None
        return extra


@dataclass
class SimulatedExtra(MemoryFacts):
    """run.json `extra` of a run `specbench simulate` predicted from a target log, one per shape."""

    simulated: bool = True
    method: str | None = None  # teacher-forced or step replay
    log: str | None = None
    shape: str | None = None
    hidden_source: str | None = None  # where the target's hidden states came from
    latency_model: dict[str, Any] = field(default_factory=dict)  # LatencyModel.describe()
    draft_ms_per_step: float | None = None
    draft_ms_source: str | None = None
    alpha_iid: float | None = None
    leviathan_expected_speedup: float | None = None
    drafter: dict[str, Any] = field(default_factory=dict)  # Drafter.describe()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> SimulatedExtra:
        return _from_row(cls, row)


RunExtra = MeasuredExtra | SimulatedExtra


def extra_from_json(row: Any) -> RunExtra:
    """run.json's `extra`, typed: a simulated run's (it says `"simulated": true`) or a measured one's."""
    row = row if isinstance(row, dict) else {}
    return SimulatedExtra.from_json(row) if row.get("simulated") else MeasuredExtra.from_json(row)


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
    extra: RunExtra = field(default_factory=MeasuredExtra)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "extra": self.extra.to_json()}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RunInfo:
        """A run.json object (its field types checked by the reader, store.RunStore.open)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known and k != "extra"}, extra=extra_from_json(row.get("extra")))

    @property
    def memory(self) -> MemoryFacts:
        e = self.extra
        return MemoryFacts(e.target_forward_bytes, e.draft_forward_bytes, e.draft_passes_per_step)

    @property
    def simulated(self) -> bool:
        """Written by `simulate` (predicted from a log), not measured."""
        return isinstance(self.extra, SimulatedExtra)

    @classmethod
    def starting(cls, label: list[str], *, command: str, target: str, target_id: str, drafter: str, drafter_options: dict[str, Any],
                 workload: str, workload_hash: str, decode: dict[str, Any], environment: dict[str, Any], extra: RunExtra) -> RunInfo:
        """The record of a run starting now, measured (`run`) or simulated (`simulate`): the one
        place a RunInfo is made. Its id is the local start time, `label` (target, drafter, ...) and
        6 random hex digits, safe as a directory name: two runs started in the same second (short
        runs on a fast engine) still get ids of their own, which the records they stamp rely on."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_id = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join([stamp, *label, secrets.token_hex(3)]))
        return cls(run_id=run_id, command=command, target=target, target_id=target_id, drafter=drafter,
                   drafter_options=drafter_options, workload=workload, workload_hash=workload_hash, decode=decode,
                   environment=environment, started=datetime.now(timezone.utc).isoformat(timespec="seconds"), extra=extra)


def first_divergence(spec: list[int], baseline: list[int]) -> int | None:
    """Index of the first position where the outputs differ; a shorter output
    diverges where it ends (unlike a zip() comparison, which hides that)."""
    for i, (a, b) in enumerate(zip(spec, baseline)):
        if a != b:
            return i
    return None if len(spec) == len(baseline) else min(len(spec), len(baseline))
