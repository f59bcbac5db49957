"""A run: a workload through target + drafter, and the plain baseline, measured into a
result directory. `start_run` and `resume_run` are the library calls (validation inside
them); the CLI and the scripts only call them and print.

For each prompt and turn the baseline (plain decoding) and the drafter run
back to back in the same process, through the same decode loop, so the
speedup compares like with like and drifts in machine speed hit both alike.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from specbench.checks import check_fits, check_output_dir, check_temperature, context_window
from specbench.drafters.registry import build_drafter, drafter_class, parse_options
from specbench.engine.divergence import compare_decodes, rounding_eps
from specbench.engine.engines import ENGINE_HELP, ENGINES
from specbench.engine.loop import Decoded, Request, decode, decode_rows, warm_up, warm_up_rows
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import Drafter, PlainDecoding, Target
from specbench.engine.events import counted
from specbench.environment import environment
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.records import (
    BASELINE,
    SPEC,
    EngineFacts,
    MeasuredExtra,
    RunInfo,
    StepRecord,
    TurnRecord,
    WorkloadFacts,
    first_divergence,
)
from specbench.store import RunStore
from specbench.targets import BACKENDS, load_target
from specbench.targets.loading import (
    DEVICE_HELP,
    DTYPE_HELP,
    TARGET_HELP,
    dtype_choice,
    load_config,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from specbench.targets.parallel import tensor_parallel
from specbench.workloads import Prompt, Workload, check_prompts_fit, encode_turn, open_workload, select, workload_hash

BATCHES_PER_GROUP = 4  # at --batch-size B, turns are measured (and saved) 4 B prompts at a time
ANSWER_SLACK = 16  # tokens an answer may gain when its text is re-encoded in a later turn


@dataclass
class RunConfig(CommandConfig):
    """A run's configuration; each field's help is what `specbench run --help` shows."""

    target: str = option("smollm2-135m", TARGET_HELP)
    drafter: str = option("prompt-lookup", "a name from `specbench drafters`")
    drafter_options: dict[str, Any] = field(default_factory=dict)  # from the drafter's own flags and -o
    workload: str = option("builtin", "a name from `specbench workloads`, or a .jsonl file (format detected)")
    workload_file: str | None = option(None, "the published file a named workload reads (e.g. FastChat's question.jsonl for mt-bench)")
    categories: list[str] | None = option(None, "keep only these categories or tasks (comma-separated or repeated)")
    limit: int | None = option(None, "use only the first N prompts", min=1)
    shard: str | None = option(None, "i/n: measure every n-th prompt from the i-th (after --categories and --limit); `report` merges the shards")
    max_new_tokens: int = option(128, "new tokens per turn at most", min=1)
    temperature: float = option(0.0, "0 = greedy (lossless); > 0 = speculative sampling (chains), typical acceptance (medusa/hydra trees, lossy) "
                                     "or tree sampling (eagle trees, lossless)", min=0)
    seed: int = option(0, "seed for sampling", min=0, max=2**63 - 1)
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)
    engine: str = option("auto", ENGINE_HELP)
    backend: str = option("hf", "target backend: hf, or deepspeed (tensor parallel over --tp ranks; docs/deepspeed.md)")
    tp: int = option(1, "deepspeed: tensor-parallel ranks (GPUs, or processes on CPU)", min=1)
    baseline: bool = option(True, "also run plain decoding on the same prompts")
    warmup: bool = option(True, "one short untimed decode (and the fast engine's graph captures or step compilations) before measuring")
    # --batch-size (cli.run reads a list: one run per size, one after another); docs/batch.md
    batch_size: int = 1
    refill: bool = option(True, "at --batch-size > 1: a finished row takes the next turn at once (continuous batching); "
                                "--no-refill: a batch waits for its longest row")

    def __post_init__(self) -> None:
        if self.categories is not None:  # `--categories a,b --categories c`: split by workloads.select, which knows the names
            self.categories = [text.strip() for text in self.categories]
        super().__post_init__()


def check(config: RunConfig) -> None:
    """Everything about a configuration that can be refused before any weights load."""
    parse_options(config.drafter, config.drafter_options)  # the settings were checked when the config was made
    check_temperature(config.temperature)
    if config.engine not in ENGINES:
        raise UserError(f"unknown engine '{config.engine}': use {', '.join(ENGINES)}")
    if config.backend not in BACKENDS:
        raise UserError(f"unknown backend '{config.backend}': use {' or '.join(BACKENDS)}")
    if config.backend == "hf" and config.tp != 1:
        raise UserError("--tp needs --backend deepspeed (the hf backend runs on one device)")
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise UserError(f"--batch-size takes whole numbers >= 1 (got {config.batch_size!r})")
    if config.batch_size > 1:
        check_batches(config.drafter, drafter_class(config.drafter))
    if config.batch_size > 1 and config.backend != "hf":
        raise UserError(f"--batch-size {config.batch_size} runs on the hf backend's batch engine (a static KV cache per row); "
                        "deepspeed decodes one sequence at a time: use --backend hf")
    if config.backend == "deepspeed":
        from specbench.targets import deepspeed

        deepspeed.require_deepspeed()
        device = resolve_device(config.device)
        deepspeed.check(load_config(config.target), config.tp, device, resolve_dtype(config.dtype, device))


def load(config: RunConfig) -> Target:
    """The run's target (this rank's shard, under tensor parallelism)."""
    engine = "eager" if config.batch_size > 1 else config.engine  # batches run on the batch engine over the eager target's model
    return load_target(config.target, config.device, config.dtype, engine, config.backend, config.tp)


def check_batches(name: str, drafter) -> None:
    """A drafter (class or instance) that does not declare `batches` runs at batch 1 only."""
    if not drafter.batches:
        raise UserError(f"drafter '{name}' does not decode in batches (it does not declare `batches`): run it at --batch-size 1")


def turn_seed(seed: int, prompt_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class Benchmark:
    """What a run measures with, built once on the leading rank: the selected prompts, the
    drafter and the plain baseline on one target. `run` measures prompts into a RunStore."""

    def __init__(self, config: RunConfig, target: Target, workload: Workload | None = None) -> None:
        self.config = config
        self.workload = workload or open_workload(config.workload, config.workload_file)
        self.prompts = selected_prompts(config, self.workload)
        self.target = target
        if target.tokenizer is None:
            raise UserError(f"target '{config.target}' has no tokenizer; text workloads need one")
        self.window = target.context_window()
        self.drafter = build_drafter(config.drafter, target, dict(config.drafter_options))
        self.draft_reach = draft_reach(self.drafter, self.window, config.target)
        # the prompts were checked against the window before the weights loaded; a tree's reach is known only now
        if self.draft_reach:
            check_prompts_fit(self.prompts, target.tokenizer, self.window, config.max_new_tokens, config.target, self.draft_reach)
        self.plain = PlainDecoding(target)
        self.rows_target = None
        if config.batch_size > 1:
            from specbench.targets.batched import RowsHFTarget

            from specbench.engine.engines import resolve_engine

            check_batches(config.drafter, self.drafter)
            # the fast engine at B > 1 is the batch engine's CUDA graphs (on a CPU it runs its kernels either way)
            graphs = target.device.type == "cuda" and resolve_engine(config.engine, target.device) == "fast"
            self.rows_target = RowsHFTarget(target, config.batch_size, graphs=graphs)

    def run_info(self, command: str) -> RunInfo:
        c = self.config
        decode_settings = {k: v for k, v in asdict(c).items() if k not in ("target", "drafter", "drafter_options", "workload")}
        decode_settings["dtype"] = str(self.target.dtype).removeprefix("torch.")
        decode_settings["engine"] = self.target.engine if self.rows_target is None else self.rows_target.engine
        if c.batch_size == 1:  # batch 1 records today's settings, so its runs pool with earlier ones
            decode_settings.pop("batch_size"), decode_settings.pop("refill")
        return RunInfo.starting(
            [c.target, c.drafter],
            command=command,
            target=c.target,
            target_id=self.target.model_id,
            drafter=c.drafter,
            drafter_options=c.drafter_options,
            workload=c.workload,
            workload_hash=workload_hash(self.prompts),
            decode=decode_settings,
            environment=environment(self.target.device),
            extra=MeasuredExtra(
                self.target.forward_bytes(), *self.drafter.memory_model(),
                drafter=self.drafter.describe(),
                workload=WorkloadFacts(
                    format=self.workload.format,
                    source=self.workload.source,
                    prompts=len(self.prompts),
                    selection_hash=workload_hash(select(self.workload.prompts, c.categories, c.limit)),
                ),
            ),
        )

    def _turn_ids(self, drafter, prompt: Prompt, turn: int, answers: list[str], max_new_tokens: int) -> list[int]:
        """The turn's token ids, checked to fit the window with `max_new_tokens` and the drafter's reach.
        Later turns hold the model's own answers: known only now, checked before their prefill."""
        ids = encode_turn(self.target.tokenizer, prompt, turn, answers)
        check_fits(len(ids), max_new_tokens, self.window, f"prompt {prompt.id} turn {turn + 1}", self.config.target,
                   self.draft_reach if drafter is self.drafter else 0)
        return ids

    def _generator(self, prompt: Prompt, turn: int) -> torch.Generator | None:
        """The turn's sampling generator (None when greedy), seeded by (seed, prompt, turn): both modes, every
        batch size and a resumed run draw the same numbers for it."""
        if self.config.temperature <= 0:
            return None
        return torch.Generator().manual_seed(turn_seed(self.config.seed, prompt.id, turn))

    def _modes(self) -> list[tuple[str, Drafter]]:
        """(mode, drafter) in the order a turn runs them: the baseline first when it runs."""
        return ([(BASELINE, self.plain)] if self.config.baseline else []) + [(SPEC, self.drafter)]

    def _decode(self, drafter, prompt: Prompt, turn: int, answers: list[str]):
        """One turn decoded."""
        ids = self._turn_ids(drafter, prompt, turn, answers, self.config.max_new_tokens)
        result = decode(self.target, drafter, torch.tensor(ids), self.config.max_new_tokens, self.config.temperature,
                        self._generator(prompt, turn))
        return ids, result

    def longest_prompt(self) -> int:
        """An upper bound on the tokens any turn's prompt holds (a later turn holds the earlier
        answers, each re-encoded from at most max_new_tokens tokens)."""
        longest = 0
        for prompt in self.prompts:
            for turn in range(len(prompt.turns)):
                ids = encode_turn(self.target.tokenizer, prompt, turn, [""] * turn)
                longest = max(longest, len(ids) + turn * (self.config.max_new_tokens + ANSWER_SLACK))
        return longest

    def longest_sequence(self) -> int:
        """An upper bound on the positions any sequence of this run reaches: its prompt + the new
        tokens + the largest verify (the root and the drafter's largest proposal)."""
        return self.drafter.furthest_position(self.longest_prompt(), self.config.max_new_tokens)

    def warm_up(self, engine: EngineFacts) -> None:
        """Before anything is timed: size the static caches for the longest sequence, capture
        every bucket plain decoding and the drafter can produce (CUDA graphs), then one short
        untimed decode in each mode (first-call costs: allocations, kernel selection).
        What the warm-up captured and compiled goes into `engine`, for run.json."""
        c, positions, first = self.config, self.longest_sequence(), self.prompts[0]
        if self.rows_target is not None:  # every row once: first-call costs at this batch size
            ids = torch.tensor(encode_turn(self.target.tokenizer, first, 0, []))
            # the rows' KV and the largest forward's activations checked against free memory, and with
            # CUDA graphs every bucket captured (docs/batch.md)
            seen = warm_up_rows(self.rows_target, [self.plain, self.drafter], positions, [ids] * c.batch_size, c.max_new_tokens,
                                c.temperature, prompt_tokens=self.longest_prompt())
        else:
            ids = self._turn_ids(self.drafter, first, 0, [], c.max_new_tokens)
            seen = warm_up(self.target, self.drafter, positions, torch.tensor(ids), c.max_new_tokens, baseline=self.plain,
                           temperature=c.temperature, seed=turn_seed(c.seed, first.id, 0))
        engine.set_warm_up(seen)
        engine.planned_positions = positions

    def engine_record(self) -> EngineFacts:
        """run.json's `engine` entry before the warm-up: the target's engine and cache (counters at 0)."""
        stats = self.target.engine_stats()
        dtype, why = dtype_choice(self.config.dtype, self.target.device)
        return EngineFacts(
            engine=self.target.engine,
            dtype=str(self.target.dtype).removeprefix("torch."),
            dtype_choice=why if dtype == self.target.dtype else "given",
            cuda_graphs=bool(stats.get("cuda_graphs")),
            capacity=stats.get("capacity"),
            compiled_step=bool(stats.get("compiled_step")),
            packed_linears=bool(stats.get("packed_linears")),
            lean_layers=stats.get("lean_layers", 0),
            kernels=stats.get("kernels"),
        )

    def measure_prompt(self, prompt: Prompt) -> tuple[list[StepRecord], list[TurnRecord]]:
        """Both modes, turn by turn. A later turn's history is plain decoding's answers in both
        modes (when the baseline runs): a near-tie in turn 1 would otherwise hand the two modes
        different contexts for turn 2, and their outputs could not be compared token for token."""
        modes = self._modes()
        answers: dict[str, list[str]] = {mode: [] for mode, _ in modes}
        history = answers[modes[0][0]]  # the baseline's answers, or the drafter's own without a baseline
        outputs: dict[tuple[str, int], Decoded] = {}
        steps: list[StepRecord] = []
        turns: list[TurnRecord] = []
        for turn in range(len(prompt.turns)):
            for mode, drafter in modes:
                ids, result = self._decode(drafter, prompt, turn, history[:turn])
                self._record(prompt, turn, mode, ids, result, outputs, answers[mode], steps, turns)
        return steps, turns

    def _record(self, prompt: Prompt, turn: int, mode: str, ids: list[int], result: Decoded, outputs: dict, answers: list[str],
                steps: list[StepRecord], turns: list[TurnRecord]) -> None:
        """The records of one decoded turn, compared with the baseline's output of it when there is one."""
        outputs[mode, turn] = result
        answers.append(self.target.tokenizer.decode(result.output_ids, skip_special_tokens=True))
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
            text=answers[-1],
        )
        if mode == SPEC and (BASELINE, turn) in outputs:
            record.first_divergence = first_divergence(result.output_ids, outputs[BASELINE, turn].output_ids)
            record.exact_match = record.first_divergence is None
            if not record.exact_match and self.config.temperature <= 0:  # sampled outputs differ by design
                eps = rounding_eps(self.target.dtype, self.target.hidden_size, self.target.device)
                found = compare_decodes(outputs[BASELINE, turn], result, eps)
                record.divergence_kind, record.tie_tolerance = found.kind, found.tolerance
                record.plain_top2, record.spec_top2 = found.plain_top2, found.spec_top2
                record.plain_margin, record.spec_margin = found.plain_margin, found.spec_margin
        turns.append(record)

    def measure_batch(self, prompts: list[Prompt], batches: list[dict]) -> list[tuple[list[StepRecord], list[TurnRecord]]]:
        """Both modes at --batch-size B, turn index by turn index: every prompt's turn t decoded B at a
        time through the batch engine (a later turn's history is the baseline's answers, as in
        measure_prompt). Each decode_rows call is appended to `batches` (mode, turn, sequences,
        tokens, wall_ms): the aggregate throughput of each mode at this batch size."""
        c = self.config
        modes = self._modes()
        answers = {(mode, p.id): [] for mode, _ in modes for p in prompts}
        outputs: dict[str, dict] = {p.id: {} for p in prompts}
        records: dict[str, tuple[list[StepRecord], list[TurnRecord]]] = {p.id: ([], []) for p in prompts}
        for turn in range(max(len(p.turns) for p in prompts)):
            active = [p for p in prompts if turn < len(p.turns)]
            for mode, drafter in modes:
                requests, encoded = [], []
                for prompt in active:
                    ids = self._turn_ids(drafter, prompt, turn, answers[modes[0][0], prompt.id][:turn], c.max_new_tokens)
                    requests.append(Request(torch.tensor(ids), c.max_new_tokens, self._generator(prompt, turn)))
                    encoded.append(ids)
                batch = decode_rows(self.rows_target, drafter, requests, c.temperature, c.refill)
                batches.append({"mode": mode, "turn": turn, "sequences": len(requests), "tokens": sum(len(d.output_ids) for d in batch.decoded),
                                "wall_ms": round(batch.wall_ms, 3)})
                for prompt, ids, result in zip(active, encoded, batch.decoded):
                    self._record(prompt, turn, mode, ids, result, outputs[prompt.id], answers[mode, prompt.id], *records[prompt.id])
        return [records[p.id] for p in prompts]

    def records_per_prompt(self) -> dict[str, int]:
        modes = len(self._modes())
        return {p.id: modes * len(p.turns) for p in self.prompts}

    def run(self, store: RunStore, progress: Progress = SILENT) -> None:
        """Measure every prompt not yet complete in `store`. A run this process created that fails
        or is interrupted before its first prompt is finished leaves no directory behind."""
        try:
            self._run(store, progress)
        except BaseException:
            store.discard()
            raise

    def _run(self, store: RunStore, progress: Progress) -> None:
        done = store.keep_complete(self.records_per_prompt())
        todo = [p for p in self.prompts if p.id not in done]
        if store.info.extra.engine is None:  # a resumed run keeps counting
            store.info.extra.engine = self.engine_record()
        engine = store.info.extra.engine
        if todo and self.config.warmup:
            with progress.status("warming up (untimed: cache sizing, graph captures or step compilation, a short decode per mode)"):
                self.warm_up(engine)
        stats = self.target.engine_stats()
        engine.capacity = stats.get("capacity")
        if stats.get("profile_ms"):  # the measured bucket latencies verifies pick their bucket from
            engine.profile_ms = stats["profile_ms"]
        store.write_info()
        advance = progress.task(f"{self.config.drafter} on {self.config.target}", len(self.prompts))
        advance(len(self.prompts) - len(todo))
        if self.rows_target is not None:
            self._run_batches(store, todo, advance)
            todo = []
        for prompt in todo:
            with counted() as seen:
                steps, turns = self.measure_prompt(prompt)
            engine.add_timed(seen, prompt.id)  # a capture, compilation or regrowth inside a timed prompt
            store.append_prompt(steps, turns)
            advance()
        engine.capacity = self.target.engine_stats().get("capacity")
        store.info.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        store.write_info()


    def _run_batches(self, store: RunStore, todo: list[Prompt], advance) -> None:
        """--batch-size B: prompts measured and saved a group at a time (BATCHES_PER_GROUP x B prompts,
        so that refilled rows have turns to take and an interrupted run keeps the groups done)."""
        extra = store.info.extra
        if extra.batch is None:  # a resumed run keeps its batches
            extra.batch = {"size": self.config.batch_size, "refill": self.config.refill, "engine": self.rows_target.engine, "batches": []}
        batch = extra.batch
        group = BATCHES_PER_GROUP * self.config.batch_size
        for start in range(0, len(todo), group):
            prompts = todo[start : start + group]
            for steps, turns in self.measure_batch(prompts, batch["batches"]):
                store.append_prompt(steps, turns)
            store.write_info()
            advance(len(prompts))


def draft_reach(drafter, window: int | None, model: str) -> int:
    """The positions a drafter's last draft may add past the output: a tree drafter drafts its whole
    tree whatever room is left (chain drafters stop at the token budget), so its depth counts toward
    the context window; a tree of more nodes than the window cannot be verified in one forward."""
    if drafter.drafts != "tree":
        return 0
    nodes = drafter.max_draft_tokens
    if window and nodes + 1 > window:
        raise UserError(f"drafter '{drafter.name}' drafts trees of {nodes} nodes: verifying one is a forward of {nodes + 1} tokens, "
                        f"past the {window}-token context window of {model}; use a smaller --tree")
    return drafter.max_draft_depth


def selected_prompts(config: RunConfig, workload: Workload) -> list[Prompt]:
    prompts = select(workload.prompts, config.categories, config.limit, config.shard)
    if not prompts:
        raise UserError(f"no prompts left in workload '{config.workload}' after --categories/--limit/--shard")
    return prompts


def check_fits_before_loading(config: RunConfig) -> Workload:
    """The workload, its selected prompts checked against the target's context window from its
    config and tokenizer alone: a prompt past the window is refused before any weights load."""
    workload = open_workload(config.workload, config.workload_file)
    prompts = selected_prompts(config, workload)
    window = context_window(load_config(config.target))
    tokenizer = load_tokenizer(config.target) if window else None
    if tokenizer is not None:
        check_prompts_fit(prompts, tokenizer, window, config.max_new_tokens, config.target)
    return workload


def _measure(bench: Benchmark, store: RunStore, progress: Progress) -> Path:
    progress.note(f"workload {bench.workload.describe()}; measuring {len(bench.prompts)}")
    with store:
        try:
            bench.run(store, progress)
        except KeyboardInterrupt:
            if not store.directory.exists():
                raise UserError("interrupted before the first prompt finished; nothing was saved") from None
            raise UserError(f"interrupted; finished prompts are saved: resume with `specbench run --resume {store.directory}`") from None
    return store.directory


def start_run(config: RunConfig, out: Path, progress: Progress = SILENT, command: str = "", target: Target | None = None) -> Path | None:
    """Measure a new run under `out`; its directory, or None on a tensor-parallel follower rank.
    `target`: one already loaded for `config` (scripts measuring several drafters on one target)."""
    check(config)
    check_output_dir(out, "--out")
    workload = check_fits_before_loading(config)
    if target is None:
        with progress.status(f"loading {config.target} and {config.drafter}"):
            target = load(config)
    with tensor_parallel(target) as leading:
        if leading is None:
            return None
        with progress.status(f"loading {config.drafter}"):
            bench = Benchmark(config, leading, workload)
        store = RunStore.create_unique(out, bench.run_info(command or command_line()))
        return _measure(bench, store, progress)


@dataclass
class Conflict:
    """A value given to resume a run that disagrees with what the run was started with."""

    name: str  # a RunConfig field, or a drafter option (`drafter_option`)
    given: Any
    stored: Any
    drafter_option: bool = False


class ResumeConflicts(UserError):
    """Resuming would change the run; `conflicts` names each value (the CLI words them as its flags)."""

    def __init__(self, directory: Path, conflicts: list[Conflict]) -> None:
        self.directory, self.conflicts = directory, conflicts
        named = "; ".join(f"{c.name} {c.given!r} (the run has {c.stored!r})" for c in conflicts)
        super().__init__(f"{directory} is resumed as it was started; these would change it: {named}")


def resume_run(directory: Path, settings: dict[str, Any] | None = None, drafter_options: dict[str, Any] | None = None,
               progress: Progress = SILENT) -> Path | None:
    """Measure the prompts an interrupted run did not finish, on the machine that started it, with
    the run's own configuration: its write lock taken (a second writer is refused), and what the
    user gave beside it (`settings`: RunConfig field -> value; `drafter_options`: option -> value)
    checked against it; conflicts are refused (ResumeConflicts)."""
    from specbench.targets.deepspeed import under_launcher

    store = RunStore.open(Path(directory))
    if not under_launcher() or os.environ.get("RANK", "0") == "0":  # tensor-parallel followers never write
        store.lock()
    with store:
        if store.info.simulated:
            raise UserError(f"{directory} is a simulated run (from `specbench simulate`); it has nothing to resume")
        store.load()  # its records read before the target loads: a record of another run is refused at once
        conflicts = resume_conflicts(store.info, settings or {}, drafter_options or {})
        if conflicts:
            raise ResumeConflicts(Path(directory), conflicts)
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


# flags whose "auto" is resolved when the run starts (run.json keeps what it resolved to)
RESOLVED_AT_START = ("dtype", "engine")


def resume_conflicts(info: RunInfo, settings: dict[str, Any], drafter_options: dict[str, Any]) -> list[Conflict]:
    """What the user gave to resume the stored run that disagrees with it: `settings` (RunConfig
    field -> value) against its configuration, `drafter_options` (name -> value, text or typed)
    against its drafter options."""
    config = config_from_info(info)
    conflicts = []
    for name, value in settings.items():
        if name in RESOLVED_AT_START and value == "auto":
            continue
        stored = getattr(config, name)
        if _comparable(value) != _comparable(stored):
            conflicts.append(Conflict(name, value, stored))
    specs = drafter_class(config.drafter).Options.specs()
    for name, value in drafter_options.items():
        stored = config.drafter_options.get(name)
        if name in specs:  # text (from the command line) compared as the option's type
            value = specs[name].convert(config.drafter, value)
        if _comparable(value) != _comparable(stored):
            conflicts.append(Conflict(name, value, stored, drafter_option=True))
    return conflicts


def _comparable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def command_line() -> str:
    return " ".join(["specbench", *sys.argv[1:]])
