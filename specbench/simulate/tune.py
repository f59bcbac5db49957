"""`specbench tune`: the draft shape (tree, or chain length k) predicted fastest on this
hardware, from one teacher-forced pass over a target log and a verify-latency profile.

1. The teacher-forced pass (`Simulator.proposals`) gives, at every logged position, the
   rank of each true next token under each draft position: a row of ranks (r1..rD).
2. The acceptance table: for every rank path p, the share of positions whose row starts
   with p. Under greedy verification a tree accepts exactly the tree's paths that are
   prefixes of the row, so E[accepted] = Σ over the tree's paths of their share.
3. Greedy construction (Medusa's tree search, Sequoia's positional greedy): start from the
   root, keep a frontier (the next unused child rank under the root and under every node in
   the tree: the first child of a node, its next sibling), and add the frontier node with the
   largest share, one node at a time. The trees of sizes 1..N are therefore nested.
4. Every candidate is walked along the log exactly as `simulate` walks it (walk.py): its
   predicted τ *is* what `simulate` scores for it. Predicted tokens/s per candidate =
   Σ(accepted + 1) / Σ(draft ms + verify ms(tree size + 1) + overhead ms) over the walked steps,
   and the speedup is against plain decoding's verify ms(1) + overhead per token.
5. The candidate with the highest predicted speedup is chosen on the tuning log alone;
   `--verify-log` walks the same candidates over a second log (e.g. held-out prompts).

Chain drafters (draft-model, prompt-lookup) get chains k = 1..N: the same steps pick k.

Drafters whose drafts depend on the shape (`drafts_depend_on_shape`: DFlash, where the block's
positions attend to each other, so a block of d + 1 drafts other tokens than the first d
positions of a longer one) get one teacher-forced pass per depth d = 1..D, each by the drafter
built for the chain of d (the block length), and from each pass its own acceptance table:
the candidates of depth d are the chain of d and the greedy trees (steps 2-3) of exactly that
depth, each as wide as the greedy makes it. Every candidate is walked over the pass of its
depth, so its predicted τ is still what `simulate` scores for it; its draft ms is timed for
the chain and the largest tree of each depth and linear in the size in between.
"""

from __future__ import annotations

import heapq
import json
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from specbench.checks import check_distinct_outputs, check_output_file
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import RANK_NONE, TeacherForced
from specbench.engine.tree import TreeShape
from specbench.errors import UserError
from specbench.files import atomic_write_text, write_lock
from specbench.metrics import tau
from specbench.progress import SILENT, Progress
from specbench.records import BASELINE, SPEC, StepMeasure
from specbench.simulate.log import TargetLog, read_profile
from specbench.simulate.predict import LatencyModel, timed
from specbench.simulate.runner import TEACHER_FORCED, SimulateConfig, Simulator, check_shape_not_given
from specbench.simulate.walk import Shape
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP

# tree sizes whose draft latency is timed (others are interpolated between the nearest timed ones)
TIMED_SIZES = (*range(1, 17), 20, 24, 32, 40, 48, 64, 80, 96, 128)
MAX_NODES = {"tree": 64, "chain": 8}  # default budgets: tree nodes, or the longest chain


# --- 2. the acceptance table ---------------------------------------------------------------------

@dataclass
class AcceptanceTable:
    """How often each rank path prefixes the true tokens' rank row, over every logged step position."""

    positions: int  # logged positions a step can start at (m >= 1 in each turn)
    counts: Counter  # rank path (tuple) -> positions whose rank row starts with it
    depth: int  # draft positions scored

    def share(self, path) -> float:
        return self.counts.get(tuple(path), 0) / self.positions if self.positions else 0.0

    def expected_accepted(self, paths) -> float:
        """E[accepted] of a prefix-closed tree at a position drawn uniformly from the log."""
        return sum(self.share(p) for p in paths)


def acceptance_table(proposals: list[TeacherForced], depth: int) -> AcceptanceTable:
    counts: Counter = Counter()
    positions = 0
    for found in proposals:
        rows = found.ranks[1:, :depth].tolist()  # row 0 is the prefill's token: never a step
        positions += len(rows)
        for row in rows:
            for d in range(1, depth + 1):
                if row[d - 1] == RANK_NONE:  # not proposed, or past the log's end: nothing deeper matches
                    break
                counts[tuple(row[:d])] += 1
    return AcceptanceTable(positions, counts, depth)


# --- 3. greedy construction ----------------------------------------------------------------------

def greedy_order(table: AcceptanceTable, max_nodes: int, max_depth: int) -> list[tuple[int, ...]]:
    """Tree nodes in the order the greedy construction adds them; the tree of size n is the
    first n. The frontier holds the root's and every added node's next unused child rank
    (children run 0, 1, ... without gaps, as `--tree` requires); the node with the largest
    count is added (ties: the shallower, then the smaller ranks). It stops at `max_nodes` or
    when no frontier node was ever accepted (a count of 0 adds nothing to E[accepted])."""
    frontier = [(-table.counts.get((0,), 0), 1, (0,))]
    order: list[tuple[int, ...]] = []
    while frontier and len(order) < max_nodes:
        negative_count, _, path = heapq.heappop(frontier)
        if negative_count == 0:
            break
        order.append(path)
        for nxt in (path[:-1] + (path[-1] + 1,), path + (0,) if len(path) < max_depth else None):
            if nxt is not None:
                heapq.heappush(frontier, (-table.counts.get(nxt, 0), len(nxt), nxt))
    return order


def chain_order(max_k: int) -> list[tuple[int, ...]]:
    return [(0,) * d for d in range(1, max_k + 1)]


# --- 4. the frontier -----------------------------------------------------------------------------

@dataclass
class FrontierPoint:
    size: int  # tree nodes (chain: k)
    depth: int
    tau: float  # walked over the tuning log: what `simulate` scores for this shape there
    expected_tau: float  # 1 + E[accepted] from the acceptance table (what the greedy maximised)
    draft_ms: float
    draft_timed: bool  # False: interpolated between the nearest timed sizes
    verify_ms: float  # mean per step: the profile's ms for the step's tree size + 1
    overhead_ms: float
    tokens_per_s: float  # predicted, decode steps only
    speedup: float  # against plain decoding under the same latency model
    verify_tau: float | None = None  # the same walk over --verify-log
    max_width: int = 1  # the most nodes at one depth (a chain: 1)
    verify_tokens_per_s: float | None = None
    verify_speedup: float | None = None


@dataclass
class Costs:
    """Everything but the verify forward: the drafter's ms per candidate, the per-step overhead."""

    draft_ms: dict[int, float]  # candidate index (Tuner.candidates) -> ms
    timed_sizes: set[int]  # the candidate indices whose draft ms was timed (the others interpolated)
    draft_source: str
    overhead_spec_ms: float = 0.0
    overhead_plain_ms: float = 0.0
    overhead_source: str = "not modelled (0 ms)"


@dataclass
class Frontier:
    label: str
    latency: dict[str, Any]  # LatencyModel.describe()
    plain_tokens_per_s: float
    points: list[FrontierPoint]
    best: int  # index into points
    draft_source: str
    overhead_source: str
    per_depth: bool = False  # the candidates run over several depths, each scored by its own pass (drafts_depend_on_shape)

    @property
    def chosen(self) -> FrontierPoint:
        return self.points[self.best]


def predict(steps: list[StepMeasure], draft_ms: float, overhead_ms: float, model: LatencyModel) -> tuple[float, float]:
    """(mean verify ms per step, predicted tokens/s: of every row at the model's batch size) of walked steps."""
    costed = timed(steps, draft_ms, model)
    total_ms = sum(s.step_ms for s in costed) + overhead_ms * len(costed)
    tokens = sum(s.accepted + 1 for s in steps)
    verify = sum(s.verify_ms for s in costed) / len(costed) if costed else 0.0
    return verify, model.aggregate(1000 * tokens / total_ms if total_ms else 0.0)


def plain_tokens_per_s(model: LatencyModel, overhead_ms: float) -> float:
    return model.aggregate(1000 / (model.verify_ms(1) + overhead_ms))


def overhead_from_run(run_dir: Path) -> tuple[float, float, str]:
    """(spec, plain) ms per step a run spent outside draft and verify (acceptance, KV, bookkeeping)."""
    from specbench.store import RunStore

    steps, _ = RunStore.open(Path(run_dir)).load()
    spec = [s.step_ms - s.draft_ms - s.verify_ms for s in steps if s.mode == SPEC]
    plain = [s.step_ms - s.draft_ms - s.verify_ms for s in steps if s.mode == BASELINE]
    if not spec or not plain:
        raise UserError(f"--overhead-from {run_dir}: the run needs both speculative and plain (baseline) steps")
    return sum(spec) / len(spec), sum(plain) / len(plain), f"measured in {run_dir} ({len(spec)} spec, {len(plain)} plain steps)"


def interpolate(timed_ms: dict[int, float], sizes: list[int]) -> dict[int, float]:
    """Draft ms for every size, linear in the size between the nearest timed sizes."""
    known = sorted(timed_ms)
    out = {}
    for n in sizes:
        lower = max((k for k in known if k <= n), default=known[0])
        upper = min((k for k in known if k >= n), default=known[-1])
        if lower == upper:
            out[n] = timed_ms[lower]
        else:
            w = (n - lower) / (upper - lower)
            out[n] = timed_ms[lower] * (1 - w) + timed_ms[upper] * w
    return out


# --- 1-5 together --------------------------------------------------------------------------------

@dataclass
class TuneConfig(CommandConfig):
    """What `tune` searches and how it costs it; each field with help is a flag of `specbench tune`."""

    drafter: str = field(metadata={"help": "a name from `specbench drafters` (one with the teacher-forced hook)"})
    drafter_options: dict[str, Any] = field(default_factory=dict)
    max_nodes: int | None = option(None, "the largest tree (nodes) or chain (k) considered (default 64 / 8)", min=1)
    max_depth: int | None = option(None, "trees no deeper than this (default: as deep as the heads)", min=1)
    max_new_tokens: int | None = option(None, "cut the logged outputs to N tokens (default: the log's)", min=1)
    limit: int | None = option(None, "use only the first N logged turns", min=1)
    latency_steps: int = option(32, "proposals timed per timed size", min=1)
    draft_ms: float | None = option(None, "a constant draft ms per step instead of timing the proposals (e.g. measured elsewhere)", min=0)
    overhead_ms: float | None = option(None, "a constant per-step overhead in ms (default: not modelled, 0; see --overhead-from)", min=0)
    verify_log: Path | None = option(None, "a log of other prompts (same target) the candidates are also walked over")
    profile: Path | None = option(None, "a verify-latency profile from `specbench profile` (default: the log's)")
    batch_size: int = option(1, "tune for this many sequences decoded at once: verify costs t(B, n) from a profile of "
                                "`specbench profile --batch B` (docs/batch.md)", min=1)
    overhead_from: Path | None = option(None, "a run directory whose records give the per-step overhead")
    target: str | None = option(None, "the real target, for hidden states (or an LM head) the log lacks")
    device: str = option("auto", "where the drafter runs: " + DEVICE_HELP)
    dtype: str = option("auto", "--target's dtype: " + DTYPE_HELP)
    out: Path | None = option(None, "where to write the chosen tree (a JSON file `--tree` accepts)")
    plot: Path | None = option(None, "also draw the frontier (.png)")
    timed_sizes: tuple[int, ...] = TIMED_SIZES


@dataclass
class Candidate:
    """One shape tune costs: the shape, its rank paths, which pass scores it (the depth whose
    drafter's pass it is walked over; 0: the one pass) and whether the drafter that proposes it
    drafts it whole near the end of a sequence (a tree of ranks) or caps it (its own chain)."""

    shape: Shape
    paths: list[list[int]]
    expected_tau: float
    depth_pass: int = 0
    whole: bool = False

    @property
    def max_width(self) -> int:
        return max(Counter(len(p) for p in self.paths).values())


@dataclass
class LogPass:
    """One log's teacher-forced passes (per depth, for drafters whose drafts depend on the shape;
    else the one pass, key 0) and the candidates walked over them."""

    simulator: Simulator
    proposals: dict[int, list[TeacherForced]]
    steps: dict[int, list[StepMeasure]] = field(default_factory=dict)  # candidate index -> walked steps, all turns

    def walk(self, candidates: list[Candidate]) -> None:
        for i, candidate in enumerate(candidates):
            found = self.proposals[candidate.depth_pass]
            if candidate.whole:
                found = [replace(p, capped=False) for p in found]
            self.steps[i] = [s for turn in self.simulator.walk_turns(found, candidate.shape) for s in turn]


class Tuner:
    """The teacher-forced pass over the tuning log, its acceptance table and the candidates
    (nested greedy trees, or chains), ready to be costed under any latency model."""

    def __init__(self, log: TargetLog, config: TuneConfig, target=None, device: str = "cpu", progress: Progress = SILENT) -> None:
        from specbench.drafters.registry import drafter_class, typed_options

        check_shape_not_given(config.drafter, config.drafter_options, "tune picks the tree (or k) itself (bound it with --max-nodes / --max-depth)")

        config.drafter_options = typed_options(config.drafter, config.drafter_options)
        cls = drafter_class(config.drafter)
        if cls.shape_spec() is None:
            raise UserError(f"drafter '{config.drafter}' has no option that sets its draft's shape ({cls.Options.__name__}.shape_option): "
                            "tune has nothing to choose")
        self.kind = "tree" if cls.drafts == "tree" else "chain"
        self.per_depth = cls.drafts_depend_on_shape and self.kind == "tree"
        self.max_nodes = config.max_nodes or MAX_NODES[self.kind]
        self.config, self.target, self.device = config, target, device
        with progress.status(f"loading {config.drafter}"):
            simulator = self.simulator_for(log)
        if simulator.drafter.pruned_per_step:  # its candidates are trees of ranks, scored whole
            raise UserError(f"tune scores whole trees of ranks, and drafter '{config.drafter}' as configured cannot be: "
                            f"{simulator.drafter.pruned_per_step}")
        if simulator.method != TEACHER_FORCED:
            raise UserError(f"drafter '{config.drafter}' has no teacher-forced hook (`Drafter.teacher_forced`): tune needs it")
        self.simulator = simulator
        if self.per_depth:  # as deep as the drafter drafts with its shape option unset (DFlash: its trained block - 1)
            reach = min(cls.create(simulator.target, cls.Options.parse(config.drafter, config.drafter_options)).max_draft_depth,
                        self.max_nodes)
            self.depth = min(config.max_depth or reach, reach)
        elif self.kind == "tree":  # as deep as the heads reach, or --max-depth
            reach = simulator.drafter.num_heads if hasattr(simulator.drafter, "num_heads") else self.max_nodes
            self.depth = min(config.max_depth or reach, reach)
        else:
            self.depth = self.max_nodes
        with progress.status(f"teacher-forced pass{'es' if self.per_depth else ''} over {len(simulator.turns)} logged turns"):
            self.tuning = LogPass(simulator, self.passes(simulator))
        if self.kind == "tree" and not all(p.ranked for found in self.tuning.proposals.values() for p in found):
            raise UserError(f"drafter '{config.drafter}' does not rank its whole vocabulary: tune can pick its k, not a tree")
        self._files = tempfile.TemporaryDirectory(prefix="specbench-tune-")
        self.candidates = self.per_depth_candidates() if self.per_depth else self.nested_candidates()
        self.tuning.walk(self.candidates)

    def passes(self, simulator: Simulator) -> dict[int, list[TeacherForced]]:
        """The one teacher-forced pass (key 0), or per depth d the pass of the drafter built for the chain of d."""
        if not self.per_depth:
            return {0: simulator.proposals(self.depth)}
        providers, found = simulator.providers(), {}
        for d in range(1, self.depth + 1):
            chain = Shape.from_spec(f"chain:{d}")
            found[d] = simulator.proposals(d, chain, providers)
            simulator.release(chain)
        return found

    def nested_candidates(self) -> list[Candidate]:
        """The greedy trees of sizes 1..N over the one pass (nested), or the chains k = 1..N."""
        self.table = acceptance_table(self.tuning.proposals[0], self.depth)
        order = greedy_order(self.table, self.max_nodes, self.depth) if self.kind == "tree" else chain_order(self.max_nodes)
        if not order:
            raise UserError(f"drafter '{self.config.drafter}' never ranked a true token first on this log: there is no tree to build")
        found = []
        for n in range(1, len(order) + 1):
            paths = TreeShape([list(p) for p in order[:n]]).paths
            shape = Shape.chain(n) if self.kind == "chain" else self.tree_shape(paths, f"tune-{n}")
            found.append(Candidate(shape, paths, 1 + self.table.expected_accepted(order[:n])))
        return found

    def per_depth_candidates(self) -> list[Candidate]:
        """Per depth d: the chain of d, then the greedy trees from d's own pass that reach depth d
        exactly (a shallower tree is drafted by a shorter block: another depth's pass scores it)."""
        found = []
        for d in range(1, self.depth + 1):
            table = acceptance_table(self.tuning.proposals[d], d)
            chain = [(0,) * i for i in range(1, d + 1)]
            found.append(Candidate(Shape.from_spec(f"chain:{d}"), [list(p) for p in chain], 1 + table.expected_accepted(chain), d))
            order = greedy_order(table, self.max_nodes, d)
            for n in range(d + 1, len(order) + 1):
                nodes = order[:n]
                if max(map(len, nodes)) < d or set(nodes) == set(chain):
                    continue
                paths = TreeShape([list(p) for p in nodes]).paths
                found.append(Candidate(self.tree_shape(paths, f"tune-d{d}-{n}"), paths, 1 + table.expected_accepted(nodes), d, whole=True))
        self.table = table  # the deepest pass's (its positions are every pass's)
        return found

    def simulator_for(self, log: TargetLog) -> Simulator:
        """A simulator of this drafter on `log`, built on a placeholder shape: a chain drafter as
        long as the longest k (each k is capped per step, as simulate does), a tree drafter on one node."""
        c = self.config
        placeholder = Shape.chain(self.max_nodes) if self.kind == "chain" else Shape.from_spec("chain:1")
        return Simulator(log, SimulateConfig(c.drafter, c.drafter_options, [placeholder], c.max_new_tokens, c.limit, "auto",
                                             c.latency_steps), self.target, self.device)

    def over(self, log: TargetLog) -> LogPass:
        """The candidates walked over another log (the verification log)."""
        simulator = self.simulator_for(log)
        found = LogPass(simulator, self.passes(simulator))
        found.walk(self.candidates)
        return found

    def paths(self, index: int) -> list[list[int]]:
        """Candidate `index` (Tuner.candidates; in nested candidates the tree of index + 1 nodes)
        as child-rank paths, in node order."""
        return self.candidates[index].paths

    def tree_shape(self, paths: list[list[int]], name: str) -> Shape:
        file = Path(self._files.name) / f"{name}.json"  # a spec the drafter's `tree` option resolves, for timing
        file.write_text(json.dumps(paths))
        return Shape.of_tree(TreeShape(paths, name=name), spec=str(file))

    # --- costs -------------------------------------------------------------------------------
    def time_drafts(self, progress: Progress = SILENT) -> tuple[dict[int, float], set[int], str]:
        """Draft ms per candidate: the drafter's proposals timed along the log at the configured
        sizes (and the largest), linear in the size in between; per depth for drafters whose
        drafts depend on the shape (the chain and the largest tree of each depth)."""
        if self.per_depth:
            return self._time_per_depth(progress)
        sizes = [c.shape.size for c in self.candidates]
        wanted = sorted({n for n in self.config.timed_sizes if n <= sizes[-1]} | {sizes[-1]})
        timed_ms: dict[int, float] = {}
        chain_ms: dict[int, float] = {}
        advance = progress.task("timing proposals", len(wanted))
        for n in wanted:
            timed_ms[n], _ = self.simulator.draft_ms(self.candidates[n - 1].shape, chain_ms)
            advance(size=n)
        per_size = interpolate(timed_ms, sizes)
        source = (f"timed over {self.config.latency_steps} replayed steps at sizes {', '.join(map(str, wanted))}; "
                  "linear in between")
        return {i: per_size[n] for i, n in enumerate(sizes)}, {n - 1 for n in wanted}, source

    def _time_per_depth(self, progress: Progress) -> tuple[dict[int, float], set[int], str]:
        ms: dict[int, float] = {}
        advance = progress.task("timing proposals", self.depth)
        for d in range(1, self.depth + 1):
            mine = [i for i, c in enumerate(self.candidates) if c.depth_pass == d]
            ends = sorted({mine[0], mine[-1]})  # the chain, the largest tree
            timed_ms = {}
            for i in ends:
                shape = self.candidates[i].shape
                ms[i], _ = self.simulator.draft_ms(shape)
                timed_ms[shape.size] = ms[i]
                self.simulator.release(shape)
            sizes = {i: self.candidates[i].shape.size for i in mine}
            per_size = interpolate(timed_ms, sorted(set(sizes.values())))
            ms.update({i: per_size[n] for i, n in sizes.items() if i not in ms})
            advance(depth=d)
        timed = {i for d in range(1, self.depth + 1) for i in (min(j for j, c in enumerate(self.candidates) if c.depth_pass == d),
                                                                max(j for j, c in enumerate(self.candidates) if c.depth_pass == d))}
        return ms, timed, (f"timed over {self.config.latency_steps} replayed steps for the chain and the largest tree of each "
                           "depth (each by the drafter built for it); linear in the size in between")

    def frontier(self, model: LatencyModel, costs: Costs, label: str, verify: LogPass | None = None) -> Frontier:
        plain = plain_tokens_per_s(model, costs.overhead_plain_ms)
        points = []
        for i, candidate in enumerate(self.candidates):
            shape, steps = candidate.shape, self.tuning.steps[i]
            verify_ms, tps = predict(steps, costs.draft_ms[i], costs.overhead_spec_ms, model)
            point = FrontierPoint(
                size=shape.size, depth=shape.depth, tau=tau(steps), expected_tau=candidate.expected_tau,
                draft_ms=costs.draft_ms[i], draft_timed=i in costs.timed_sizes, verify_ms=verify_ms,
                overhead_ms=costs.overhead_spec_ms, tokens_per_s=tps, speedup=tps / plain, max_width=candidate.max_width,
            )
            if verify is not None:
                held = verify.steps[i]
                _, held_tps = predict(held, costs.draft_ms[i], costs.overhead_spec_ms, model)
                point.verify_tau, point.verify_tokens_per_s, point.verify_speedup = tau(held), held_tps, held_tps / plain
            points.append(point)
        best = max(range(len(points)), key=lambda i: (points[i].speedup, -i))  # ties: the smaller shape
        return Frontier(label, model.describe(), plain, points, best, costs.draft_source, costs.overhead_source, self.per_depth)


@dataclass
class ChosenRun:
    """How the choice is checked: measured by `run` on the log's prompts with the drafter's shape
    option set to it, and scored by `simulate` on the log (the command line spells both as
    commands: flags.tune_commands)."""

    target: str
    drafter: str
    drafter_options: dict[str, Any]  # the user's, without the shape option
    kind: str  # "tree" | "chain"
    shape: int | str | None  # the chosen k, or the tree file written (None: not written)
    workload: str
    limit: int  # the log's prompts
    max_new_tokens: int
    log: str  # the log simulate scores it on
    batch_size: int = 1  # the batch size it was chosen for
    profile: str | None = None  # the profile of its t(B, n), where given apart from the log


@dataclass
class TuneResult:
    drafter: str
    kind: str  # "tree" | "chain"
    frontier: Frontier
    paths: list[list[int]]  # the chosen tree's paths (a chain's: [[0], [0, 0], ...])
    table_positions: int
    log: str
    verify_log: str | None
    out: str | None  # the tree file written
    check: ChosenRun

    @property
    def chosen(self) -> FrontierPoint:
        return self.frontier.chosen

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "chosen": asdict(self.chosen)}


def check_same_target(log: TargetLog, other: TargetLog) -> None:
    if log.header.target_id != other.header.target_id or log.header.vocab_size != other.header.vocab_size:
        raise UserError(f"--verify-log {other.path} is a log of {other.header.target}, not of {log.header.target}: record both with the same target")


def costs_for(tuner: Tuner, overhead_from: Path | None = None, progress: Progress = SILENT) -> Costs:
    """Draft ms per candidate (timed along the log, or the config's constant) and the per-step
    overhead (a run's records, the config's constant, or 0)."""
    c = tuner.config
    if c.draft_ms is not None:
        every = range(len(tuner.candidates))
        costs = Costs({i: c.draft_ms for i in every}, set(every), f"given: {c.draft_ms:g} ms per step (--draft-ms)")
    else:
        costs = Costs(*tuner.time_drafts(progress))
    if overhead_from is not None:
        costs.overhead_spec_ms, costs.overhead_plain_ms, costs.overhead_source = overhead_from_run(overhead_from)
    elif c.overhead_ms:
        costs.overhead_spec_ms = costs.overhead_plain_ms = c.overhead_ms
        costs.overhead_source = f"given: {c.overhead_ms:g} ms per step (--overhead-ms)"
    return costs


def chosen_run(log: TargetLog, drafter: str, options: dict[str, Any], kind: str, size: int, out: Path | None, max_new: int) -> ChosenRun:
    """The run that measures the choice on the log's prompts, and the log simulate scores it on."""
    return ChosenRun(log.header.target, drafter, options, kind, size if kind == "chain" else (str(out) if out else None),
                     log.header.workload, len({t.prompt_id for t in log.turns}), max_new, str(log.path))


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")


def tune_log(log: TargetLog | Path, config: TuneConfig, progress: Progress = SILENT, command: str = "") -> TuneResult:
    """`specbench tune`: choose the shape on `log`, walk the candidates over the config's
    verification log too, and write the chosen tree to the config's `out` (a file `--tree`
    accepts). Its `plot` is only checked here (the CLI draws it: report.plots.tuned_frontier), so a bad
    path fails before any work."""
    from specbench.simulate.log import read_log

    c, log = config, log if isinstance(log, TargetLog) else read_log(log)
    check_output_file(c.out, "--out", inputs=(log.path, c.verify_log, c.profile))
    check_output_file(c.plot, "--plot")
    check_distinct_outputs((c.out, "--out"), (c.plot, "--plot"))
    if c.plot is not None and c.plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {c.plot}: end the name in one of {', '.join(PLOT_SUFFIXES)} (matplotlib draws the format the suffix names)")
    if c.overhead_from is not None and c.overhead_ms is not None:
        raise UserError("give --overhead-from RUN or --overhead-ms MS, not both")
    with write_lock(c.out) if c.out is not None else nullcontext():  # one writer of --out: a second tune into it is refused
        return _tune(c, log, progress, command)


def _tune(config: TuneConfig, log: TargetLog, progress: Progress, command: str) -> TuneResult:
    from specbench.simulate.log import read_log

    c = config
    from specbench.drafters.registry import drafter_class

    where = str(c.profile) if c.profile else f"the profile of {log.path}"
    model = LatencyModel.build(read_profile(c.profile) if c.profile else log.profile, None, None, c.batch_size, drafter_class(c.drafter), where)
    verify_log = read_log(c.verify_log) if c.verify_log else None
    if verify_log is not None:
        check_same_target(log, verify_log)
    real_target = None
    if c.target:
        from specbench.targets import load_target

        real_target = load_target(c.target, c.device, c.dtype, "eager", progress=progress)
    tuner = Tuner(log, config, real_target, c.device if real_target is None else str(real_target.device), progress)
    verify = None
    if verify_log is not None:
        with progress.status(f"teacher-forced pass over {verify_log.path}"):
            verify = tuner.over(verify_log)
    costs = costs_for(tuner, c.overhead_from, progress)
    label = str(c.profile or f"{log.path} (its profile)") + (f", {c.batch_size} rows per forward" if c.batch_size > 1 else "")
    frontier = tuner.frontier(model, costs, label=label, verify=verify)
    return choose(tuner, frontier, log, verify_log, c.out, command)


def choose(tuner: Tuner, frontier: Frontier, log: TargetLog, verify_log: TargetLog | None, out: Path | None,
           command: str = "") -> TuneResult:
    """The frontier's best shape: written to `out` as a tree file, with the commands that check it."""
    chosen, config = frontier.chosen, tuner.config
    paths = tuner.paths(frontier.best)
    if out is not None:
        write_tree(out, paths, {
            "source": command or "specbench tune", "drafter": config.drafter, "drafter_options": config.drafter_options,
            "log": str(log.path), "verify_log": str(verify_log.path) if verify_log else None, "latency_model": frontier.latency,
            "draft_ms_source": frontier.draft_source, "overhead_source": frontier.overhead_source,
            "predicted": {k: v for k, v in asdict(chosen).items() if v is not None},
        })
    check = replace(chosen_run(verify_log or log, config.drafter, config.drafter_options, tuner.kind, chosen.size, out,
                               tuner.simulator.max_new), batch_size=config.batch_size,
                    profile=str(config.profile) if config.profile else None)
    return TuneResult(config.drafter, tuner.kind, frontier, paths, tuner.table.positions, str(log.path),
                      str(verify_log.path) if verify_log else None, str(out) if out else None, check)


def write_tree(out: Path, paths: list[list[int]], about: dict[str, Any]) -> None:
    """A tree file `--tree FILE` reads: {"paths": [...]} plus how it was chosen."""
    atomic_write_text(out, json.dumps({"paths": paths, **about}, indent=1) + "\n")
