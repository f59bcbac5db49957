"""A run: a workload through target + drafter, and the plain baseline, measured into a
result directory. `start_run` and `resume_run` are the library calls (validation inside
them); the CLI and the scripts only call them and print.

For each prompt and turn the baseline (plain decoding) and the drafter run
back to back in the same process, through the same decode loop, so the
speedup compares like with like and drifts in machine speed hit both alike.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from specbench.drafters.registry import build_drafter, parse_options
from specbench.engine.divergence import diagnose, rounding_eps
from specbench.engine.engines import ENGINES
from specbench.engine.loop import Decoded, decode
from specbench.engine.options import option
from specbench.engine.protocol import PlainDecoding, Target
from specbench.engine.static_cache import EVENTS
from specbench.environment import environment
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.records import (
    BASELINE,
    SPEC,
    RunInfo,
    StepRecord,
    TurnRecord,
    first_divergence,
)
from specbench.store import RunStore
from specbench.targets import BACKENDS, load_target
from specbench.targets.loading import (
    DEVICE_HELP,
    DTYPE_HELP,
    TARGET_HELP,
    load_config,
    resolve_device,
    resolve_dtype,
)
from specbench.targets.parallel import tensor_parallel
from specbench.workloads import (
    Prompt,
    encode_turn,
    open_workload,
    select,
    workload_hash,
)

WARMUP_TOKENS = 16
ANSWER_SLACK = 16  # tokens an answer may gain when its text is re-encoded in a later turn


@dataclass
class RunConfig:
    """A run's configuration; each field's help is what `specbench run --help` shows."""

    target: str = option("smollm2-135m", TARGET_HELP)
    drafter: str = option("prompt-lookup", "a name from `specbench drafters`")
    drafter_options: dict[str, Any] = field(default_factory=dict)  # from the drafter's own flags and -o
    workload: str = option("builtin", "a name from `specbench workloads`, or a .jsonl file (format detected)")
    workload_file: str | None = option(None, "the published file a named workload reads (e.g. FastChat's question.jsonl for mt-bench)")
    categories: list[str] | None = option(None, "keep only these categories or tasks (comma-separated or repeated)")
    limit: int | None = option(None, "use only the first N prompts")
    shard: str | None = option(None, "i/n: measure every n-th prompt from the i-th (after --categories and --limit); `report` merges the shards")
    max_new_tokens: int = option(128, "new tokens per turn at most")
    temperature: float = option(0.0, "0 = greedy (lossless); > 0 = speculative sampling (chains) or the drafter's own rule (typical acceptance: lossy)")
    seed: int = option(0, "seed for sampling")
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)
    engine: str = option("auto", "auto (fast on CUDA, eager on CPU), eager (DynamicCache), fast (static KV cache; CUDA graphs on CUDA); the baseline runs on the same engine")
    backend: str = option("hf", "target backend: hf, or deepspeed (tensor parallel over --tp ranks; docs/deepspeed.md)")
    tp: int = option(1, "deepspeed: tensor-parallel ranks (GPUs, or processes on CPU)")
    baseline: bool = option(True, "also run plain decoding on the same prompts")
    warmup: bool = option(True, "one short untimed decode (and on CUDA the graph captures) before measuring")

    def __post_init__(self) -> None:
        if self.categories:  # `--categories a,b --categories c`
            self.categories = [c.strip() for text in self.categories for c in text.split(",") if c.strip()] or None


def check(config: RunConfig) -> None:
    """Everything about a configuration that can be refused before any weights load."""
    parse_options(config.drafter, config.drafter_options)
    if config.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if config.temperature < 0:
        raise UserError("--temperature must be >= 0")
    if config.engine not in ENGINES:
        raise UserError(f"unknown engine '{config.engine}': use {', '.join(ENGINES)}")
    if config.backend not in BACKENDS:
        raise UserError(f"unknown backend '{config.backend}': use {' or '.join(BACKENDS)}")
    if config.backend == "hf" and config.tp != 1:
        raise UserError("--tp needs --backend deepspeed (the hf backend runs on one device)")
    if config.backend == "deepspeed":
        from specbench.targets import deepspeed

        deepspeed.require_deepspeed()
        device = resolve_device(config.device)
        deepspeed.check(load_config(config.target), config.tp, device, resolve_dtype(config.dtype, device))


def load(config: RunConfig) -> Target:
    """The run's target (this rank's shard, under tensor parallelism)."""
    device = resolve_device(config.device)
    return load_target(config.target, device, resolve_dtype(config.dtype, device), config.engine, config.backend, config.tp)


def run_id_for(config: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.target}-{config.drafter}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def turn_seed(seed: int, prompt_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class Benchmark:
    """What a run measures with, built once on the leading rank: the selected prompts, the
    drafter and the plain baseline on one target. `run` measures prompts into a RunStore."""

    def __init__(self, config: RunConfig, target: Target) -> None:
        self.config = config
        self.workload = open_workload(config.workload, config.workload_file)
        self.prompts = select(self.workload.prompts, config.categories, config.limit, config.shard)
        self.target = target
        if target.tokenizer is None:
            raise UserError(f"target '{config.target}' has no tokenizer; text workloads need one")
        self.drafter = build_drafter(config.drafter, target, dict(config.drafter_options))
        self.plain = PlainDecoding(target)

    def run_info(self, command: str) -> RunInfo:
        c = self.config
        decode_settings = {k: v for k, v in asdict(c).items() if k not in ("target", "drafter", "drafter_options", "workload")}
        decode_settings["dtype"] = str(self.target.dtype).removeprefix("torch.")
        decode_settings["engine"] = self.target.engine
        return RunInfo(
            run_id=run_id_for(c),
            command=command,
            target=c.target,
            target_id=self.target.model_id,
            drafter=c.drafter,
            drafter_options=c.drafter_options,
            workload=c.workload,
            workload_hash=workload_hash(self.prompts),
            decode=decode_settings,
            environment=environment(self.target.device),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={
                "target_forward_bytes": self.target.forward_bytes(),
                "draft_forward_bytes": self.drafter.memory_model()[0],
                "draft_passes_per_step": self.drafter.memory_model()[1],
                "drafter": self.drafter.describe(),
                "workload": {
                    "format": self.workload.format,
                    "source": self.workload.source,
                    "prompts": len(self.prompts),
                    # the selection before sharding: shards of one workload share it, so `report` can merge them
                    "selection_hash": workload_hash(select(self.workload.prompts, c.categories, c.limit)),
                },
            },
        )

    def _decode(self, drafter, prompt: Prompt, turn: int, answers: list[str]):
        ids = encode_turn(self.target.tokenizer, prompt, turn, answers)
        generator = None
        if self.config.temperature > 0:
            generator = torch.Generator().manual_seed(turn_seed(self.config.seed, prompt.id, turn))
        result = decode(self.target, drafter, torch.tensor(ids), self.config.max_new_tokens, self.config.temperature, generator)
        return ids, result

    def longest_sequence(self) -> int:
        """An upper bound on the positions any sequence of this run reaches: its prompt (a later
        turn holds the earlier answers, each re-encoded from at most max_new_tokens tokens) +
        the new tokens + the largest verify (the root and the drafter's largest proposal)."""
        longest = 0
        for prompt in self.prompts:
            for turn in range(len(prompt.turns)):
                ids = encode_turn(self.target.tokenizer, prompt, turn, [""] * turn)
                longest = max(longest, len(ids) + turn * (self.config.max_new_tokens + ANSWER_SLACK))
        return longest + self.config.max_new_tokens + 1 + self.drafter.max_draft_tokens

    def warm_up(self) -> dict[str, Any]:
        """Before anything is timed: size the static caches for the longest sequence, capture
        every bucket plain decoding and the drafter can produce (CUDA graphs), then one short
        untimed decode in each mode (first-call costs: allocations, kernel selection).
        Returns what the warm-up captured, for run.json."""
        before = replace(EVENTS)
        positions = self.longest_sequence()
        self.target.warm_up(1, (), positions)  # plain decoding verifies the root alone
        self.target.warm_up(1 + self.drafter.max_draft_tokens, self.drafter.taps, positions)
        self.drafter.warm_up(positions)
        saved = self.config.max_new_tokens
        self.config.max_new_tokens = min(saved, WARMUP_TOKENS)
        try:
            for drafter in (self.plain, self.drafter):
                self._decode(drafter, self.prompts[0], 0, [])
        finally:
            self.config.max_new_tokens = saved
        return {"capture_ms": round(EVENTS.capture_ms - before.capture_ms, 3), "graphs": EVENTS.captures - before.captures,
                "planned_positions": positions}

    def engine_record(self) -> dict[str, Any]:
        """run.json's `engine` entry before the warm-up: the target's engine and cache, and
        counters of what happened while prompts were timed (captures, mid-sequence regrowths)."""
        stats = self.target.engine_stats()
        return {
            "engine": self.target.engine,
            "cuda_graphs": bool(stats.get("cuda_graphs")),
            "capture_ms": 0.0,
            "graphs": 0,
            "capacity": stats.get("capacity"),
            "timed_captures": 0,
            "timed_capture_ms": 0.0,
            "timed_regrowths": 0,
            "timed_capture_prompts": [],
        }

    def measure_prompt(self, prompt: Prompt) -> tuple[list[StepRecord], list[TurnRecord]]:
        modes = [(BASELINE, self.plain)] if self.config.baseline else []
        modes.append((SPEC, self.drafter))
        answers: dict[str, list[str]] = {mode: [] for mode, _ in modes}
        outputs: dict[tuple[str, int], Decoded] = {}
        steps: list[StepRecord] = []
        turns: list[TurnRecord] = []
        for turn in range(len(prompt.turns)):
            for mode, drafter in modes:
                ids, result = self._decode(drafter, prompt, turn, answers[mode])
                outputs[mode, turn] = result
                answers[mode].append(self.target.tokenizer.decode(result.output_ids, skip_special_tokens=True))
                steps += [StepRecord(**asdict(s), prompt_id=prompt.id, turn=turn, mode=mode, step=i) for i, s in enumerate(result.steps)]
                record = TurnRecord(
                    prompt_id=prompt.id,
                    turn=turn,
                    mode=mode,
                    category=prompt.category,
                    task=prompt.task or prompt.category,
                    prompt_tokens=len(ids),
                    new_tokens=len(result.output_ids),
                    steps=len(result.steps),
                    wall_ms=result.wall_ms,
                    ttft_ms=result.ttft_ms,
                    output_ids=result.output_ids,
                    text=answers[mode][-1],
                )
                if mode == SPEC and (BASELINE, turn) in outputs:
                    record.first_divergence = first_divergence(result.output_ids, outputs[BASELINE, turn].output_ids)
                    record.exact_match = record.first_divergence is None
                    if not record.exact_match and self.config.temperature <= 0:  # sampled outputs differ by design
                        self._diagnose(record, outputs[BASELINE, turn], result)
                turns.append(record)
        return steps, turns

    def _diagnose(self, record: TurnRecord, plain: Decoded, spec: Decoded) -> None:
        """Near-tie or divergence at the first differing token (specbench/engine/divergence.py)."""
        eps = rounding_eps(self.target.dtype, self.target.hidden_size, self.target.device)
        found = diagnose(record.first_divergence, plain.top2, spec.top2, eps)
        record.divergence_kind, record.tie_tolerance = found.kind, found.tolerance
        record.plain_top2, record.spec_top2 = found.plain_top2, found.spec_top2
        record.plain_margin, record.spec_margin = found.plain_margin, found.spec_margin

    def records_per_prompt(self) -> dict[str, int]:
        modes = 2 if self.config.baseline else 1
        return {p.id: modes * len(p.turns) for p in self.prompts}

    def run(self, store: RunStore, progress: Progress = SILENT) -> None:
        done = store.keep_complete(self.records_per_prompt())
        todo = [p for p in self.prompts if p.id not in done]
        engine = store.info.extra.setdefault("engine", self.engine_record())  # a resumed run keeps counting
        if todo and self.config.warmup:
            with progress.status("warming up (untimed: cache sizing, graph captures, a short decode per mode)"):
                engine.update(self.warm_up())
        engine["capacity"] = self.target.engine_stats().get("capacity")
        store.write_info()
        advance = progress.task(f"{self.config.drafter} on {self.config.target}", len(self.prompts))
        advance(len(self.prompts) - len(todo))
        for prompt in todo:
            before = replace(EVENTS)
            steps, turns = self.measure_prompt(prompt)
            if EVENTS.captures > before.captures or EVENTS.regrowths > before.regrowths:
                # a capture (or a cache regrowth) inside a timed prompt: its timings include it
                engine["timed_captures"] += EVENTS.captures - before.captures
                engine["timed_capture_ms"] = round(engine["timed_capture_ms"] + EVENTS.capture_ms - before.capture_ms, 3)
                engine["timed_regrowths"] += EVENTS.regrowths - before.regrowths
                engine["timed_capture_prompts"].append(prompt.id)
            store.append_prompt(steps, turns)
            advance()
        engine["capacity"] = self.target.engine_stats().get("capacity")
        store.info.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        store.write_info()


def _measure(bench: Benchmark, store: RunStore, progress: Progress) -> Path:
    progress.note(f"workload {bench.workload.describe()}; measuring {len(bench.prompts)}")
    try:
        bench.run(store, progress)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; finished prompts are saved: resume with `specbench run --resume {store.directory}`") from None
    return store.directory


def start_run(config: RunConfig, out: Path, progress: Progress = SILENT, command: str = "", target: Target | None = None) -> Path | None:
    """Measure a new run under `out`; its directory, or None on a tensor-parallel follower rank.
    `target`: one already loaded for `config` (scripts measuring several drafters on one target)."""
    check(config)
    if target is None:
        with progress.status(f"loading {config.target} and {config.drafter}"):
            target = load(config)
    with tensor_parallel(target) as leading:
        if leading is None:
            return None
        with progress.status(f"loading {config.drafter}"):
            bench = Benchmark(config, leading)
        info = bench.run_info(command or command_line())
        store = RunStore.create(out / info.run_id, info)
        return _measure(bench, store, progress)


def resume_run(directory: Path, progress: Progress = SILENT) -> Path | None:
    """Measure the prompts an interrupted run did not finish (on the machine that started it)."""
    store = RunStore.open(directory)
    config = config_from_info(store.info)
    check(config)
    with progress.status(f"resuming {directory}"):
        target = load(config)
    with tensor_parallel(target) as leading:
        if leading is None:
            return None
        bench = Benchmark(config, leading)
        now = bench.run_info("")
        if store.info.workload_hash != now.workload_hash:
            raise UserError(f"workload '{config.workload}' changed since {store.directory} started; start a new run instead")
        started_on, here = (store.info.environment or {}).get("device_name"), now.environment.get("device_name")
        if started_on and started_on != here:  # its timings would be pooled with another machine's
            raise UserError(f"{store.directory} was measured on {started_on}, this is {here}: resume it there, or start a new run")
        return _measure(bench, store, progress)


def config_from_info(info: RunInfo) -> RunConfig:
    """The configuration a stored run was started with (for --resume)."""
    settings = {k: v for k, v in info.decode.items() if k in RunConfig.__dataclass_fields__}
    return RunConfig(
        target=info.target,
        drafter=info.drafter,
        drafter_options=info.drafter_options,
        workload=info.workload,
        **settings,
    )


def command_line() -> str:
    return " ".join(["specbench", *sys.argv[1:]])
