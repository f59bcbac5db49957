"""`specbench tune`: the greedy tree and the chosen k on hand-made rank tables, its predicted τ equal
to what `simulate` scores (and `run` measures), and the tree file it writes usable by `run --tree`."""

import itertools
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_cli import run_cli
from tiny import save_tiny_model

from specbench.drafters import registry
from specbench.engine.options import ChainOptions, DrafterOptions, option
from specbench.engine.protocol import RANK_NONE, Drafter, TeacherForced
from specbench.engine.tree import validate_paths
from specbench.errors import UserError
from specbench.flags import tune_commands
from specbench.metrics import tau
from specbench.simulate.log import (
    LogHeader,
    LogTurn,
    TargetLog,
    VerifyProfile,
    read_log,
    write_log,
)
from specbench.simulate.predict import LatencyModel
from specbench.simulate.record import record
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.tune import (
    TuneConfig,
    Tuner,
    acceptance_table,
    costs_for,
    greedy_order,
    tune_log,
)
from specbench.simulate.walk import Shape
from specbench.targets.hf import HFTarget
from specbench.workloads import load_workload

N = RANK_NONE


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- hand-made tables --------------------------------------------------------------------------

# rank rows (depth 2) at steps m = 1..10; row 0 is the prefill's token and never counts
TREE_ROWS = [[N, N], [0, 0], [0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [2, 5], [0, 2], [N, N], [3, 0]]


def test_greedy_tree_by_hand():
    table = acceptance_table([TeacherForced(torch.tensor(TREE_ROWS))], depth=2)
    assert table.positions == 10
    # shares: (0)=5 (1)=2 (2)=1 (3)=1 | (0,0)=3 (0,1)=1 (0,2)=1 (1,0)=2 (2,5)=1 (3,0)=1, out of 10.
    # Greedy from the root's frontier {(0)}: (0) 5 -> frontier (1) 2, (0,0) 3: (0,0) -> frontier (1) 2, (0,1) 1: (1) ->
    # (1,0) 2 beats (2) 1 and (0,1) 1 -> then the count-1 nodes, shallower first: (2), (3), then (0,1), (0,2), (3,0)
    # by rank order; (2,5) is never reachable (its siblings 0..4 never occurred) and count-0 nodes are never added.
    order = greedy_order(table, max_nodes=64, max_depth=2)
    assert order == [(0,), (0, 0), (1,), (1, 0), (2,), (3,), (0, 1), (0, 2), (3, 0)]
    assert greedy_order(table, max_nodes=4, max_depth=2) == [(0,), (0, 0), (1,), (1, 0)]
    assert table.expected_accepted(order[:4]) == pytest.approx((5 + 3 + 2 + 2) / 10)
    # depth 1 only: the root's children by count
    assert greedy_order(table, max_nodes=64, max_depth=1) == [(0,), (1,), (2,), (3,)]
    # every prefix is a valid tree, and no valid tree of the same size accepts more on average
    nodes = [(r,) for r in range(5)] + [(a, b) for a in range(4) for b in range(6)]
    for n in range(1, len(order) + 1):
        validate_paths([list(p) for p in order[:n]], "greedy")
        best = 0.0
        for subset in itertools.combinations([p for p in nodes if table.counts.get(p)], n):
            try:
                validate_paths([list(p) for p in subset], "any")
            except UserError:
                continue
            best = max(best, table.expected_accepted(subset))
        assert table.expected_accepted(order[:n]) == pytest.approx(best), n


class TableDrafter(Drafter):
    """Proposes nothing online; its teacher-forced pass returns the hand-made rank rows (`rows`)."""

    name = "test-table"
    Options = ChainOptions
    rows: ClassVar[list[list[int]]] = []

    def propose(self, ctx):
        raise AssertionError("not timed in these tests (--draft-ms)")

    def teacher_forced(self, prompt, output, depth, hidden=None):
        ranks = torch.tensor(self.rows, dtype=torch.long)[:, :depth]
        assert ranks.shape[0] == output.numel()
        return TeacherForced(ranks)


@dataclass
class TableTreeOptions(DrafterOptions):
    shape_option = "tree"
    tree: str | None = option(None, "the tree drafted")


class TableTreeDrafter(TableDrafter):
    name = "test-table-tree"
    drafts = "tree"
    Options = TableTreeOptions
    num_heads = 2


@dataclass
class FakeEntryPoint:
    cls: type
    value: str = "tests:TableDrafter"

    def load(self):
        return self.cls


@pytest.fixture
def table_drafters(monkeypatch):
    installed = dict(registry.installed_drafters())
    installed.update({"test-table": FakeEntryPoint(TableDrafter), "test-table-tree": FakeEntryPoint(TableTreeDrafter)})
    monkeypatch.setattr(registry, "installed_drafters", lambda: installed)


def hand_log(tmp_path, n_out: int, ms: list[float]) -> TargetLog:
    header = LogHeader(target="hand-made", target_id="hand-made", tokenizer=None, vocab_size=16, dtype="float32", device="cpu",
                       max_new_tokens=n_out, eos_token_ids=[2], workload="hand", workload_hash="-")
    turn = LogTurn("p1", 0, "test", prompt_ids=[5, 6, 7], output_ids=[8 + i % 4 for i in range(n_out)])
    write_log(tmp_path / "hand.jsonl", header, [turn], VerifyProfile(context_tokens=3, ms=ms))
    return read_log(tmp_path / "hand.jsonl")


def test_chain_k_by_hand(tmp_path, table_drafters):
    # 9 logged outputs; rows m = 1..8 (depth 3); out[9] would lie past the log
    TableDrafter.rows = [[N, N, N], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, N], [0, N, N]]
    log = hand_log(tmp_path, 9, [10.0, 11.0, 12.0, 13.0])
    result = tune_log(log, TuneConfig("test-table", max_nodes=3, draft_ms=1.0, out=tmp_path / "k.json"))
    points = result.frontier.points
    # k=1: m=1,3,5,7 accept 1 each: 4 steps, τ 2. k=2: m=1 (run 3) 2, m=4 (run 3) 2, m=7 (2 left, run 2) 2: τ 3.
    # k=3: m=1 3, m=5 (run 2) 2, m=8 (1 left: a 1-token draft) 1: τ 3, at a dearer verify
    assert [p.tau for p in points] == [2.0, 3.0, 3.0]
    # tokens / (draft 1 ms + verify ms(drafted + 1)) per step, against plain decoding's 10 ms per token
    assert [p.tokens_per_s for p in points] == pytest.approx([8000 / 48, 9000 / 39, 9000 / 40])
    assert [p.speedup for p in points] == pytest.approx([8 / 4.8, 9 / 3.9, 9 / 4.0])
    assert result.kind == "chain" and result.chosen.size == 2 and result.paths == [[0], [0, 0]]
    run, simulate = tune_commands(result.check)
    assert "--k 2 --workload hand --limit 1 --max-new-tokens 9" in run and simulate.endswith("--drafter test-table --k 2")
    # with a flat verify cost k=2 and k=3 cost and yield the same: ties go to the smaller
    flat = hand_log(tmp_path, 9, [10.0, 10.0, 10.0, 10.0])
    assert tune_log(flat, TuneConfig("test-table", max_nodes=3, draft_ms=1.0)).chosen.size == 2
    # the overhead of a run's records counts per step, spec and plain alike
    with_overhead = tune_log(log, TuneConfig("test-table", max_nodes=3, draft_ms=1.0, overhead_ms=2.0)).frontier
    assert with_overhead.points[1].tokens_per_s == pytest.approx(9000 / 45) and with_overhead.plain_tokens_per_s == pytest.approx(1000 / 12)


def test_tree_tuner_on_a_hand_made_table(tmp_path, table_drafters):
    TableTreeDrafter.rows = TREE_ROWS
    log = hand_log(tmp_path, 11, [10.0] * 12)  # a flat verify cost: every node that was ever accepted pays
    tuner = Tuner(log, TuneConfig("test-table-tree"))
    assert tuner.kind == "tree" and tuner.depth == 2
    assert tuner.paths(8) == [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [3, 0]]  # the 9-node tree, node order
    result = tune_log(log, TuneConfig("test-table-tree", draft_ms=0.0, out=tmp_path / "t.json"))
    # walked by hand (11 outputs, so the step at m=10 may draft depth 1 only): steps per size 7, 6, 5, 5, 5, then (3) lets
    # m=10 accept: 5 steps emitting 11 tokens. Flat verify and no draft cost: speedup = τ, ties go to the smaller tree
    assert [p.tau for p in result.frontier.points] == pytest.approx([10 / 7, 10 / 6, 2.0, 2.0, 2.0, 2.2, 2.2, 2.2, 2.2])
    assert result.chosen.size == 6 and result.paths == [[0], [1], [2], [3], [0, 0], [1, 0]]
    assert json.loads((tmp_path / "t.json").read_text())["paths"] == result.paths
    with pytest.raises(UserError, match="tune picks the tree"):
        Tuner(log, TuneConfig("test-table-tree", {"tree": "chain:2"}))


# --- tiny models: tune == simulate == run -------------------------------------------------------

MAX_NEW = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from head_layouts import write_medusa_v1

    root = tmp_path_factory.mktemp("tune")
    save_tiny_model(root / "target", seed=0)
    target = HFTarget.load(str(root / "target"), torch.device("cpu"), torch.float64)
    write_medusa_v1(root / "medusa", target, num_heads=3)
    profile = VerifyProfile(context_tokens=8, ms=[10.0 + 0.5 * n for n in range(64)])
    record(target, load_workload("builtin-completion"), "builtin-completion", MAX_NEW, root / "tune.jsonl", hidden=True, profile=profile)
    record(target, load_workload("builtin")[:3], "builtin", MAX_NEW, root / "verify.jsonl", hidden=True)
    (root / "profile.json").write_text(json.dumps(profile.to_json()))
    return {"root": root, "target": target, "tune": read_log(root / "tune.jsonl"), "verify": read_log(root / "verify.jsonl")}


def test_predicted_tau_is_what_simulate_scores(setup, tmp_path):
    options = {"heads": str(setup["root"] / "medusa")}
    tuner = Tuner(setup["tune"], TuneConfig("medusa", options, max_nodes=12, latency_steps=1, draft_ms=0.0))
    verify = tuner.over(setup["verify"])
    model = LatencyModel.build(setup["tune"].profile, None, None)
    frontier = tuner.frontier(model, costs_for(tuner), "tiny", verify)
    assert any(p.tau > 1 for p in frontier.points), "the heads never hit: the comparison proves little"
    # every candidate's predicted τ, on the tuning log and on the verification log, is what simulate scores, exactly
    for i, point in enumerate(frontier.points):
        file = tmp_path / f"n{point.size}.json"
        file.write_text(json.dumps(tuner.paths(i)))
        for log, predicted in ((setup["tune"], point.tau), (setup["verify"], point.verify_tau)):
            simulation = Simulator(log, SimulateConfig("medusa", options, [Shape.from_spec(str(file))], latency_steps=0)).score()
            assert tau([s for turn in simulation.results[0].steps for s in turn]) == predicted, point.size
    # tune_log chooses on the tuning log alone: the same choice with or without a verification log
    alone = tune_log(setup["tune"], TuneConfig("medusa", options, max_nodes=12, draft_ms=0.0))
    both = tune_log(setup["tune"], TuneConfig("medusa", options, max_nodes=12, draft_ms=0.0, verify_log=setup["verify"].path))
    assert alone.paths == both.paths and both.chosen.verify_tau is not None


def test_cli_writes_a_tree_run_accepts_and_run_measures_the_prediction(setup, tmp_path, capsys, monkeypatch):
    root = setup["root"]
    tree, plot = tmp_path / "tuned.json", tmp_path / "frontier.png"
    code, out, err = run_cli(["tune", "--log", root / "tune.jsonl", "--drafter", "medusa", "--heads", root / "medusa",
                              "--verify-log", root / "verify.jsonl", "--max-nodes", 10, "--latency-steps", 1, "--device", "cpu",
                              "--out", tree, "--plot", plot, "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert plot.stat().st_size > 0 and json.loads(tree.read_text())["paths"] == result["paths"]
    chosen = result["frontier"]["points"][result["frontier"]["best"]]
    assert result["run_command"].startswith(f"specbench run --target {root / 'target'} --drafter medusa --heads {root / 'medusa'} --tree {tree}")
    # the printed command, run: greedy and lossless, and its τ is the predicted τ on the verification log, exactly
    args = result["run_command"].split()[1:] + ["--dtype", "float64", "--device", "cpu", "--out", tmp_path / "runs", "--json"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    measured = json.loads(out)
    assert measured["exact_match_rate"] == 1.0
    assert measured["tau"] == chosen["verify_tau"]
    # the table form, and one clear line for a drafter option tune sets itself
    code, out, err = run_cli(["tune", "--log", root / "tune.jsonl", "--drafter", "medusa", "--heads", root / "medusa", "--max-nodes", 4,
                              "--draft-ms", 1, "--out", tmp_path / "t2.json"], capsys, monkeypatch)
    assert code == 0, err
    assert "chosen:" in out and "verify it: specbench run" in out
    code, out, err = run_cli(["tune", "--log", root / "tune.jsonl", "--drafter", "medusa", "--heads", root / "medusa", "--tree", "chain:2"],
                             capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tune picks the tree" in err


def test_chain_drafter_picks_k_as_simulate_scores_it(setup):
    # prompt-lookup on the tiny target's log: tune's k = 1..6 walked as simulate walks --k 1..6
    ks = range(1, 7)
    result = tune_log(setup["tune"], TuneConfig("prompt-lookup", max_nodes=6, draft_ms=0.5, verify_log=setup["verify"].path))
    points = result.frontier.points
    assert result.kind == "chain" and [p.size for p in points] == list(ks)
    simulation = Simulator(setup["tune"], SimulateConfig("prompt-lookup", {}, [Shape.chain(k) for k in ks], latency_steps=0)).score()
    assert [tau([s for turn in r.steps for s in turn]) for r in simulation.results] == [p.tau for p in points]
    assert any(p.tau > 1 for p in points), "prompt lookup never hit: the comparison proves little"
    best = max(points, key=lambda p: p.speedup)
    assert result.chosen.size == best.size and result.paths == [[0] * d for d in range(1, best.size + 1)]
    assert f"--drafter prompt-lookup --k {best.size} --workload builtin --limit 3" in tune_commands(result.check)[0]


def test_bad_input_is_one_line(setup, tmp_path, capsys, monkeypatch):
    log = setup["root"] / "tune.jsonl"
    base = ["tune", "--log", log, "--drafter", "prompt-lookup", "--draft-ms", 1]
    cases = [
        (["--max-nodes", 0], "--max-nodes must be at least 1"),
        (["--overhead-ms", -1], "--overhead-ms must be at least 0"),
        (["--out", tmp_path], "is a directory"),
        (["--out", log], "is also an input"),
        (["--verify-log", tmp_path / "missing.jsonl"], "does not exist"),
        (["--overhead-ms", 1, "--overhead-from", tmp_path], "not both"),
        (["--k", 3], "tune picks the tree (or k) itself"),
        (["--plot", tmp_path / "frontier.txt"], "end the name in one of"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(base + extra, capsys, monkeypatch)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)
    code, _, err = run_cli(["tune", "--log", tmp_path / "none.jsonl", "--drafter", "medusa"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "tuned_tree.json").exists()


@pytest.mark.parametrize("drafter", ["medusa", "hydra"])
def test_embedded_default_runs_the_cpu_tuned_tree_on_cpu(drafter):
    # the catalogue's CPU default for the bundled heads is the tree tune chose on pool-train (docs/tune.md);
    # on a GPU the published tree stays the default, and the published trees stay reachable by name
    from types import SimpleNamespace

    from specbench.drafters.catalogued import catalogued_setting
    from specbench.drafters.registry import drafter_class
    from specbench.drafters.trees import resolve_tree

    cls = drafter_class(drafter)
    published = {"medusa": "mc_sim_7b_63", "hydra": "mc_sim_7b_63_depth3"}[drafter]
    on_cpu_tree = {"medusa": "smollm2_medusa_cpu_tuned", "hydra": "smollm2_hydra_cpu_pruned"}[drafter]
    for device, tree, floor in (("cpu", on_cpu_tree, 0.1 if drafter == "hydra" else 0.0), ("cuda", published, 0.0)):
        target = SimpleNamespace(name="smollm2-135m", model_id="smollm2-135m", device=torch.device(device))
        settings = cls.settings(target, cls.Options())
        assert settings.tree.name == tree
        # hydra's catalogue prunes each step's tree on a CPU only (heads.toml prune_below_cpu)
        assert catalogued_setting(settings.entry, target, "prune_below", None, 0.0) == floor
        assert catalogued_setting(settings.entry, target, "prune_below", 0.0, 0.0) == 0.0  # the user's 0 stands
    on_cpu = SimpleNamespace(name="smollm2-135m", model_id="smollm2-135m", device=torch.device("cpu"))
    assert cls.settings(on_cpu, cls.Options(tree=published)).tree.name == published
    tuned = resolve_tree(on_cpu_tree)
    assert len(tuned) < len(resolve_tree(published))  # 2 CPU cores pay for every verified token
