"""`specbench simulate`: score a drafter on a target log, every k and tree in one pass.

1. Build the drafter against a stand-in for the logged target (its vocabulary,
   tokenizer, device and dtype), or against the real target with --target.
2. Per logged sequence: one teacher-forced pass (`Drafter.teacher_forced`), or
   step replay for drafters without the hook (labelled so).
3. Walk every shape (k or tree) over the same proposals (walk.py).
4. Time the drafter's proposals on a sample of steps per shape and predict
   throughput from the latency model (predict.py).
5. Write one run directory per shape in the schema `run` writes, marked
   simulated, with the plain-decoding baseline predicted by the same model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from specbench.checks import check_count
from specbench.drafters.registry import drafter_class
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import FINAL, TeacherForced
from specbench.errors import SpecbenchWarning, UserError
from specbench.metrics import Summary, alpha_iid, expected_speedup, memory_model, summarise
from specbench.progress import SILENT, Progress
from specbench.records import (
    BASELINE,
    SPEC,
    RunInfo,
    SimulatedExtra,
    StepMeasure,
    StepRecord,
    TurnRecord,
)
from specbench.simulate.log import LogTurn, TargetLog
from specbench.simulate.logged_target import LoggedTarget
from specbench.simulate.predict import LatencyModel, timed
from specbench.simulate.replay import replay
from specbench.simulate.walk import Shape, walk
from specbench.store import RunStore

TEACHER_FORCED, STEP_REPLAY = "teacher-forced", "step replay"
# the drafter_options key run.json records a shape under when no option of the drafter draws it
# (a tree imposed on a chain drafter, or a k on one without a shape option), so reports keep it apart
IMPOSED_SHAPE = "tree"


@dataclass
class SimulateConfig(CommandConfig):
    """What `simulate` scores; each field with help is a flag of `specbench simulate`."""

    drafter: str = option("prompt-lookup", "a name from `specbench drafters`")
    drafter_options: dict[str, Any] = field(default_factory=dict)
    shapes: list[Shape] = field(default_factory=list)  # from --k and --tree
    max_new_tokens: int | None = option(None, "cut the logged outputs to N tokens (default: the log's)", min=1)
    limit: int | None = option(None, "use only the first N logged turns", min=1)
    method: str = option("auto", "auto (teacher-forced where the drafter has the hook), teacher-forced, replay",
                         choices=("auto", TEACHER_FORCED, "replay"))
    # 0 leaves the proposals untimed (scoring only): library callers may; `simulate_log`, which predicts from them, may not
    latency_steps: int = option(32, "proposals timed per shape for the draft latency", min=0)


@dataclass
class ShapeResult:
    shape: Shape
    steps: list[list[StepMeasure]]  # per logged turn, untimed
    draft_ms: float
    draft_ms_source: str


@dataclass
class Simulation:
    method: str
    hidden_source: str | None
    scoring_s: float  # wall time of proposals + walks (what the teacher-forced pass makes fast)
    latency_s: float  # wall time spent timing proposals
    results: list[ShapeResult]


class Simulator:
    def __init__(self, log: TargetLog, config: SimulateConfig, target=None, device: str = "cpu") -> None:
        from specbench.targets.loading import DTYPES, resolve_device

        self.log, self.config = log, config
        if not config.shapes:
            raise UserError("give at least one --k or --tree to score")
        self.max_new = config.max_new_tokens or log.header.max_new_tokens
        if self.max_new > log.header.max_new_tokens:
            raise UserError(f"--max-new-tokens {self.max_new} exceeds the log's {log.header.max_new_tokens}: the log holds no tokens past that")
        self.turns = log.turns[: config.limit] if config.limit else log.turns
        options = dict(config.drafter_options)
        cls = drafter_class(config.drafter)
        self.shape_spec = cls.shape_spec()  # the option that sets the drafter's shape, if one does
        if self.shape_spec is not None and self.shape_spec.name not in options:
            deepest = max(config.shapes, key=lambda s: s.depth)
            # a chain as long as the deepest shape (capped per shape through ctx.max_tokens); a tree: any shape as deep
            options[self.shape_spec.name] = deepest.depth if cls.drafts == "chain" else deepest.spec
        self.options = options
        self.cls = cls
        parsed = cls.Options.parse(config.drafter, options)  # checked before any weights load
        if target is None:
            dtype = DTYPES.get(log.header.dtype, torch.float32)
            target = LoggedTarget(log, resolve_device(device), dtype)
        else:
            check_log_target(log, target)
        self.target = target
        self.drafter = cls.create(target, parsed)
        self.method = TEACHER_FORCED if cls.has_teacher_forced() and config.method != "replay" else STEP_REPLAY
        if config.method == TEACHER_FORCED and self.method != TEACHER_FORCED:
            raise UserError(f"drafter '{config.drafter}' has no teacher-forced hook; use --method replay (or auto)")
        self.hidden_source: str | None = None
        self._by_shape: dict[str, Any] = {}

    # --- inputs per logged turn --------------------------------------------------
    def _ids(self, turn: LogTurn) -> tuple[torch.Tensor, list[int]]:
        return torch.tensor(turn.prompt_ids, device=self.drafter_device()), turn.output_ids[: self.max_new]

    def drafter_device(self) -> torch.device:
        return getattr(self.drafter, "device", None) or getattr(self.target, "device", torch.device("cpu"))

    def hidden_for(self, turn: LogTurn) -> torch.Tensor:
        """The target's hidden states (the drafter's taps) over prompt + output[:-1]: from the
        log's side file when it holds them all, else one target forward."""
        n = len(turn.prompt_ids) + len(turn.output_ids[: self.max_new]) - 1
        taps = self.drafter.taps
        recorded = self.log.recorded_taps
        if set(taps) <= set(recorded):
            self.hidden_source = f"log side file {self.log.header.hidden_file}" + (f" (taps {list(taps)})" if taps != FINAL else "")
            return self.log.hidden(turn, taps)[:n].to(self.drafter_device())
        if isinstance(self.target, LoggedTarget):
            layers = [t for t in taps if t is not None]
            if not recorded:
                where = "record the log with " + " ".join(
                    (["--hidden"] if None in taps else []) + ([f"--hidden-taps {','.join(map(str, layers))}"] if layers else [])) + ", or "
            else:
                held = ", ".join("final" if t is None else str(t) for t in recorded)
                where = (f"the log's side file holds the taps {held}, not {', '.join('final' if t is None else str(t) for t in taps)}: "
                         f"record with --hidden-taps {','.join(map(str, layers))}, or ")
            raise UserError(
                f"drafter '{self.config.drafter}' needs the target's hidden states: {where}pass --target so simulate "
                "runs one teacher-forced target forward per sequence"
            )
        self.hidden_source = "teacher-forced target forward" + (f" (taps {list(taps)})" if taps != FINAL else "")
        sequence = torch.tensor(turn.prompt_ids + turn.output_ids[: self.max_new])
        _, hidden = self.target.prefill(sequence[:-1], taps)
        return hidden

    def _provider(self, turn: LogTurn) -> Callable[[], tuple[torch.Tensor, str]]:
        """The turn's hidden states, computed once however many drafters ask."""
        found: list[tuple[torch.Tensor, str]] = []

        def provide():
            if not found:
                found.append((self.hidden_for(turn), self.hidden_source))
            return found[0]

        return provide

    def proposer_for(self, shape: Shape):
        """The drafter whose teacher-forced pass scores `shape`: the main one fills any tree of
        ranks; a drafter's own dynamic tree needs the drafter built for it."""
        return self.drafter_for(shape) if shape.dynamic or self.drafter.shape_dependent else self.drafter

    # --- scoring ----------------------------------------------------------------
    def proposals(self, depth: int, shape: Shape | None = None, providers: list | None = None) -> list[TeacherForced]:
        """One teacher-forced pass per logged turn: the rank of every true token under each of
        `depth` draft positions at every step (what `walk` scores any shape from). A drafter whose
        drafts depend on the shape is passed the `shape` its pass is for (it then scores the trees
        of ranks of that depth); `providers` (from `providers()`) share the hidden states between passes."""
        if self.drafter.shape_dependent and shape is None:
            raise ValueError(f"drafter '{self.config.drafter}' drafts differently for every shape: name the shape its pass is for")
        drafter = self.drafter if shape is None else self.proposer_for(shape)
        found = []
        for i, turn in enumerate(self.turns):
            prompt, output = self._ids(turn)
            provider = providers[i] if providers is not None else self._provider(turn)
            proposals = drafter.teacher_forced(prompt, torch.tensor(output), depth, provider)
            self.hidden_source = proposals.hidden_source or self.hidden_source
            found.append(proposals)
        return found

    def providers(self) -> list[Callable[[], tuple[torch.Tensor, str]]]:
        """Per logged turn, its hidden states computed (or read) once however many passes ask."""
        return [self._provider(turn) for turn in self.turns]

    def release(self, shape: Shape) -> None:
        """Forget the drafter built for `shape` (its weights), once its passes and timings are done."""
        self._by_shape.pop(shape.spec, None)

    def walk_turns(self, proposals: list[TeacherForced], shape: Shape) -> list[list[StepMeasure]]:
        """The steps the decode loop takes with `shape` over every logged turn (untimed)."""
        for p in proposals:
            self._check_ranked(p, shape)
        return [walk(p, len(turn.output_ids[: self.max_new]), self.max_new, shape) for p, turn in zip(proposals, self.turns)]

    def _check_ranked(self, proposals: TeacherForced, shape: Shape) -> None:
        if not proposals.ranked and shape.tree is not None:
            raise UserError(f"drafter '{self.config.drafter}' proposes one token per position: it can be scored for --k, not --tree")

    def draft_ms(self, shape: Shape, chain_ms: dict[int, float] | None = None) -> tuple[float, str]:
        """Mean ms of the drafter's proposals for `shape`, and how it was obtained. A chain drafter
        scored on a tree is timed as a chain of the tree's depth; `chain_ms` caches chain timings."""
        timed_over = f"timed over {self.config.latency_steps} replayed steps"
        if self.cls.drafts == "tree":  # the drafter drafts this very shape
            return self.time_drafts(shape.k, self.drafter_for(shape)), timed_over
        chain_ms = {} if chain_ms is None else chain_ms
        k = shape.depth
        if k not in chain_ms:
            chain_ms[k] = self.time_drafts(k, self.drafter)
        return chain_ms[k], timed_over if shape.k else f"estimated: a chain of the tree's depth {k}"

    def score(self) -> Simulation:
        shapes, depth = self.config.shapes, max(1, *(s.depth for s in self.config.shapes))
        if self.method == TEACHER_FORCED:
            t0 = time.perf_counter()
            per_shape: dict[Shape, list] = {s: [] for s in shapes}
            for turn in self.turns:
                prompt, output = self._ids(turn)
                provider, by_drafter = self._provider(turn), {}
                for shape in shapes:
                    drafter = self.proposer_for(shape)
                    if id(drafter) not in by_drafter:
                        by_drafter[id(drafter)] = drafter.teacher_forced(prompt, torch.tensor(output), depth, provider)
                    proposals = by_drafter[id(drafter)]
                    self._check_ranked(proposals, shape)
                    self.hidden_source = proposals.hidden_source or self.hidden_source
                    per_shape[shape].append(walk(proposals, len(output), self.max_new, shape))
            scoring_s = time.perf_counter() - t0
        else:
            if any(s.tree is not None or s.dynamic for s in shapes) and self.cls.drafts != "tree":
                raise UserError(f"step replay cannot impose a tree on drafter '{self.config.drafter}'; score trees with a drafter that has the teacher-forced hook")
            t0 = time.perf_counter()
            per_shape = {s: [self._replay(turn, s.k, drafter=self.drafter_for(s)) for turn in self.turns] for s in shapes}
            scoring_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = []
        chain_ms: dict[int, float] = {}
        for shape in shapes:
            if self.method == STEP_REPLAY:
                ms = _mean_draft(per_shape[shape])
                results.append(ShapeResult(shape, per_shape[shape], ms, "timed over the whole step replay"))
                continue
            ms, source = self.draft_ms(shape, chain_ms)
            results.append(ShapeResult(shape, per_shape[shape], ms, source))
        latency_s = time.perf_counter() - t0
        return Simulation(self.method, self.hidden_source, scoring_s, latency_s, results)

    def drafter_for(self, shape: Shape):
        """The drafter proposing `shape` online: a tree drafter is built with the shape as its shape
        option; chain drafters are capped per step through ctx.max_tokens."""
        if self.cls.drafts != "tree" or self.shape_spec is None or shape.spec == self.options.get(self.shape_spec.name):
            return self.drafter
        if shape.spec not in self._by_shape:
            options = self.cls.Options.parse(self.config.drafter, self.options_for(shape))
            self._by_shape[shape.spec] = self.cls.create(self.target, options)
        return self._by_shape[shape.spec]

    def options_for(self, shape: Shape) -> dict[str, Any]:
        """The drafter options that draft `shape` online (what its run.json records). A chain
        drafter scored on a tree has no option that draws it: the tree is recorded under
        IMPOSED_SHAPE, so its setups stay apart in reports."""
        name = self.shape_spec.name if self.shape_spec is not None else None
        if name and self.cls.drafts == "tree":
            return {**self.options, name: shape.spec}
        if name and shape.k is not None:
            return {**self.options, name: shape.k}
        return {**self.options, IMPOSED_SHAPE: shape.spec}

    def _replay(self, turn: LogTurn, cap: int | None, max_steps: int | None = None, drafter=None) -> list[StepMeasure]:
        drafter = drafter or self.drafter
        prompt, output = self._ids(turn)
        hidden = self.hidden_for(turn) if drafter.taps else None
        return replay(drafter, prompt, output, self.max_new, cap, hidden, max_steps)

    def time_drafts(self, k: int | None, drafter) -> float:
        """Mean ms of the drafter's propose for a chain of up to k tokens, over the first
        `latency_steps` steps of the log (one untimed warm-up step first)."""
        budget, times = self.config.latency_steps, []
        if budget < 1:
            return 0.0
        self._replay(self.turns[0], k, max_steps=1, drafter=drafter)
        for turn in self.turns:
            steps = self._replay(turn, k, max_steps=budget - len(times), drafter=drafter)
            times += [s.draft_ms for s in steps]
            if len(times) >= budget:
                break
        return sum(times) / len(times) if times else 0.0


def check_shape_not_given(drafter: str, options: dict[str, Any], why: str) -> None:
    """`simulate` and `tune` set the drafter's shape option themselves: one line if the user gave it."""
    spec = drafter_class(drafter).shape_spec()
    if spec is not None and spec.name in options:
        raise UserError(f"{why}; do not pass {spec.flag} (-o {spec.name}=...): it is the shape option of drafter '{drafter}'")


def check_log_target(log: TargetLog, target) -> None:
    """The real target given with --target must be the one the log recorded: another vocabulary
    or hidden size is refused; another model of the same shapes is named in a warning (its hidden
    states would stand in for the logged target's)."""
    h = log.header
    if target.vocab_size != h.vocab_size:
        raise UserError(f"--target '{target.name}' has {target.vocab_size} token ids, the log was recorded by '{h.target}' "
                        f"with {h.vocab_size}; pass the target the log was recorded with")
    if h.hidden_size and target.hidden_size != h.hidden_size:
        raise UserError(f"--target '{target.name}' has hidden size {target.hidden_size}, the log's target '{h.target}' "
                        f"{h.hidden_size}; pass the target the log was recorded with")
    recorded = {h.target, h.target_id, _resolved(h.target_id)}
    if not recorded & {target.name, target.model_id, _resolved(target.model_id)}:
        warnings.warn(f"the log was recorded by '{h.target_id}', --target is '{target.model_id}' (same vocabulary size): "
                      "its hidden states stand in for the recorded target's; pass the recording target if that is not meant",
                      SpecbenchWarning, stacklevel=2)


def _resolved(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _mean_draft(per_turn: list[list[StepMeasure]]) -> float:
    times = [s.draft_ms for steps in per_turn for s in steps]
    return sum(times) / len(times) if times else 0.0


@dataclass
class ShapeReport:
    shape: str
    directory: str
    summary: Summary
    alpha_iid: float | None
    leviathan_speedup: float | None
    draft_ms_source: str
    batch_size: int = 1
    aggregate_tokens_per_s: float | None = None  # every row's predicted tokens/s together (LatencyModel.aggregate)


def write_runs(
    sim: Simulation, simulator: Simulator, model: LatencyModel, out: Path, command: str
) -> list[ShapeReport]:
    from specbench.environment import environment

    log, config = simulator.log, simulator.config
    draft_bytes, passes = simulator.drafter.memory_model()
    target_bytes = log.header.target_forward_bytes
    base_ms = model.verify_ms(1)
    rows = {"batch_size": model.rows} if model.rows > 1 else {}  # run.json at batch 1 as before batches existed
    reports = []
    for result in sim.results:
        shape = result.shape
        # sequential draft passes per step for this shape (a dynamic tree: the drafter's own count)
        own = shape.dynamic or simulator.drafter.shape_dependent  # the drafter built for the shape counts its passes
        gamma = (simulator.drafter_for(shape).memory_model()[1] if own else shape.depth) if passes else 0
        result_draft_ms = model.draft_ms(result.draft_ms, draft_bytes, gamma)  # one row's
        draft_ms = model.step_draft_ms(result_draft_ms)  # what a (batch) step pays
        steps, turns = [], []
        for turn, walked in zip(simulator.turns, result.steps):
            output = turn.output_ids[: simulator.max_new]
            ttft = model.prefill_ms(len(turn.prompt_ids), turn.ttft_ms)
            plain = [StepMeasure(0.0, base_ms, base_ms, 0, 0, 0)] * (len(output) - 1)
            for mode, mode_steps in ((BASELINE, plain), (SPEC, timed(walked, result_draft_ms, model))):
                steps += [StepRecord(**asdict(s), prompt_id=turn.prompt_id, turn=turn.turn, mode=mode, step=i) for i, s in enumerate(mode_steps)]
                record = TurnRecord(
                    prompt_id=turn.prompt_id, turn=turn.turn, mode=mode, category=turn.category,
                    prompt_tokens=len(turn.prompt_ids), new_tokens=len(output), steps=len(mode_steps),
                    wall_ms=ttft + sum(s.step_ms for s in mode_steps), ttft_ms=ttft, output_ids=output,
                )
                if mode == SPEC:  # greedy simulation emits the logged tokens by construction
                    record.exact_match, record.first_divergence = True, None
                turns.append(record)
        spec_steps = [s for s in steps if s.mode == SPEC]
        alpha = alpha_iid(spec_steps)
        leviathan = None
        if shape.k is not None and alpha is not None and base_ms:
            c = draft_ms / (shape.k * base_ms) if gamma else 0.0  # one draft pass / one target forward
            leviathan = expected_speedup(alpha, shape.k, c)
        target_name = Path(log.header.target).name or log.header.target
        options = simulator.options_for(shape)
        info = RunInfo.starting(
            ["sim", target_name, config.drafter, shape.name.replace("=", ""), *([f"b{model.rows}"] if rows else [])], command=command,
            target=log.header.target,
            target_id=log.header.target_id,
            drafter=config.drafter, drafter_options=options, workload=log.header.workload,
            workload_hash=log.header.workload_hash,
            decode={"max_new_tokens": simulator.max_new, "temperature": 0.0, "dtype": log.header.dtype,
                    "device": log.header.device, "simulated": True, **rows},
            environment=environment(torch.device("cpu")),
            extra=SimulatedExtra(
                target_bytes, draft_bytes, gamma,
                method=sim.method,
                log=str(log.path),
                shape=shape.name,
                hidden_source=sim.hidden_source,
                latency_model=model.describe(),
                draft_ms_per_step=draft_ms,
                draft_ms_source=result.draft_ms_source if model.kind == "profile" else "roofline: draft bytes × passes / bandwidth",
                alpha_iid=alpha,
                leviathan_expected_speedup=leviathan,
                drafter=simulator.drafter.describe(),
            ),
        )
        with RunStore.create_unique(out, info) as store:
            store.append_prompt(steps, turns)
            info.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            store.write_info()
        directory = store.directory
        summary = summarise(steps, turns, memory_model(info.memory))
        reports.append(ShapeReport(shape.name, str(directory), summary, alpha, leviathan, info.extra.draft_ms_source, model.rows,
                                   model.aggregate(summary.tokens_per_s) if summary.tokens_per_s is not None else None))
    return reports


def shapes_from(ks: list[int], trees: list[str]) -> list[Shape]:
    """The shapes `--k` and `--tree` name, each once, chains first."""
    shapes = [Shape.chain(k) for k in dict.fromkeys(ks)]
    shapes += [Shape.from_spec(spec) for spec in dict.fromkeys(trees)]
    if not shapes:
        raise UserError("give at least one --k or --tree to score (e.g. --k 1,2,3,4)")
    return shapes


@dataclass
class SimulateResult:
    log: TargetLog
    simulation: Simulation
    reports: list[ShapeReport]  # per batch size, per shape
    latency: LatencyModel  # the first batch size's

    def to_json(self) -> dict:
        sim = self.simulation
        return {
            "log": str(self.log.path), "method": sim.method, "hidden_source": sim.hidden_source,
            "scoring_s": sim.scoring_s, "latency_s": sim.latency_s,
            "results": [{"shape": r.shape, "run": r.directory, "alpha_iid": r.alpha_iid, "leviathan_expected_speedup": r.leviathan_speedup,
                         "draft_ms_source": r.draft_ms_source, "batch_size": r.batch_size,
                         "aggregate_tokens_per_s": r.aggregate_tokens_per_s, **r.summary.to_json()} for r in self.reports],
        }


def simulate_log(
    log: TargetLog,
    config: SimulateConfig,
    out: Path,
    profile: Path | None = None,
    bandwidth: float | None = None,
    target: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress = SILENT,
    command: str = "",
    batch_sizes: list[int] | tuple[int, ...] = (1,),
) -> SimulateResult:
    """`specbench simulate`: score the drafter on the log for every shape in one pass, predict
    throughput from the latency model at each batch size (predict.py: τ per row is B = 1's, the
    step costs t(B, n)), and write one run directory per shape and batch size under `out`."""
    from specbench.checks import check_output_dir
    from specbench.simulate.log import read_profile

    check_output_dir(out, "--out")
    check_count(config.latency_steps, "--latency-steps")  # 0 would predict with a draft of 0 ms (declared min 0 is for scoring only)
    check_shape_not_given(config.drafter, config.drafter_options, "simulate scores the shapes given with --k and --tree")
    verify_profile = read_profile(profile) if profile else log.profile
    where = str(profile) if profile else f"the profile of {log.path}"
    cls = drafter_class(config.drafter)
    models = [LatencyModel.build(verify_profile, bandwidth, log.header.target_forward_bytes, rows, cls, where) for rows in batch_sizes]
    real_target = None
    if target:
        from specbench.targets import load_target

        real_target = load_target(target, device, dtype, "eager", progress=progress)
    with progress.status(f"loading {config.drafter}"):
        simulator = Simulator(log, config, real_target, device)
    with progress.status(f"scoring {len(config.shapes)} shape(s) over {len(simulator.turns)} logged turns"):
        simulation = simulator.score()
    reports = [report for model in models for report in write_runs(simulation, simulator, model, out, command)]
    return SimulateResult(log, simulation, reports, models[0])
