"""`record` and `simulate`: simulate == online exactly, hand-built rank cases, bad logs in one line, DSD counting."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_cli import run_cli
from tiny import char_tokenizer, perturbed, save_tiny_model, tiny_llama

from specbench.drafters import registry
from specbench.engine.options import ChainOptions, DrafterOptions, option
from specbench.engine.protocol import (
    FINAL,
    RANK_NONE,
    Drafter,
    TeacherForced,
    true_ranks,
)
from specbench.engine.tree import DraftTree, TreeShape
from specbench.errors import UserError
from specbench.flags import tune_commands
from specbench.metrics import alpha_iid, per_position, tau
from specbench.records import StepMeasure
from specbench.runner import Benchmark, RunConfig
from specbench.simulate.dsd import dsd_reported, running_totals
from specbench.simulate.log import read_log
from specbench.simulate.record import record
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.walk import Shape, walk
from specbench.targets.hf import HFTarget
from specbench.workloads import load_workload

MAX_NEW = 24
WORKLOAD = "builtin"
LIMIT = 3  # writing-1 (two turns), writing-2, roleplay-1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    save_tiny_model(root / "target", seed=0)
    draft = perturbed(tiny_llama(0, vocab=len(char_tokenizer())), noise=0.01)
    draft.save_pretrained(root / "draft")
    char_tokenizer().save_pretrained(root / "draft")
    target = HFTarget.load(str(root / "target"), torch.device("cpu"), torch.float64)
    log_path = root / "log.jsonl"
    record(target, load_workload(WORKLOAD)[:LIMIT], WORKLOAD, MAX_NEW, log_path, topk=3, hidden=True)
    return {"root": root, "target": target, "log": read_log(log_path), "log_path": log_path}


def online_steps(setup, drafter, options, k=None, limit=LIMIT):
    config = RunConfig(target=str(setup["root"] / "target"), drafter=drafter, drafter_options=options, workload=WORKLOAD,
                       limit=limit, max_new_tokens=MAX_NEW, dtype="float64", device="cpu", baseline=False, warmup=False)
    bench = Benchmark(config, target=setup["target"])
    per_turn = []
    for prompt in bench.prompts:
        steps, _ = bench.measure_prompt(prompt)
        per_turn += [[s for s in steps if s.turn == t] for t in range(len(prompt.turns))]
    return per_turn


def shape_of(steps):
    return [(s.tree_size, s.tree_depth, s.accepted) for s in steps]


def assert_simulate_equals_online(setup, drafter, options, ks, target=None, trees=(), tree_options=()):
    shapes = [Shape.chain(k) for k in ks] + [Shape.from_spec(t) for t in trees]
    simulator = Simulator(setup["log"], SimulateConfig(drafter, options, shapes, latency_steps=2), target)
    simulation = simulator.score()
    accepted_somewhere = False
    name = registry.drafter_class(drafter).shape_spec().name  # the option the drafter's shape contract names
    for result in simulation.results:
        shape_option = {name: result.shape.k} if "tree" not in tree_options else {name: result.shape.spec}
        online = online_steps(setup, drafter, {**options, **shape_option})
        assert [shape_of(t) for t in result.steps] == [shape_of(t) for t in online], result.shape
        flat_sim = [s for t in result.steps for s in t]
        flat_online = [s for t in online for s in t]
        assert tau(flat_sim) == tau(flat_online)
        assert per_position(flat_sim) == per_position(flat_online)
        accepted_somewhere |= any(s.accepted for s in flat_online)
    assert accepted_somewhere, "the drafter never hit: the comparison proves little"
    return simulation


def test_log_holds_what_plain_decoding_produced(setup):
    log, target = setup["log"], setup["target"]
    assert log.header.max_new_tokens == MAX_NEW and log.header.topk == 3
    assert [(t.prompt_id, t.turn) for t in log.turns] == [("writing-1", 0), ("writing-1", 1), ("writing-2", 0), ("roleplay-1", 0)]
    for turn in log.turns:
        assert turn.topk_ids is not None and all(row[0] == tok for row, tok in zip(turn.topk_ids, turn.output_ids))
        states = log.hidden(turn)
        assert states.shape == (len(turn.prompt_ids) + len(turn.output_ids) - 1, target.hidden_size)
        # the side file's rows reproduce the logged tokens through the target's own head
        assert target.lm_head(states[len(turn.prompt_ids) - 1 :]).argmax(-1).tolist() == turn.output_ids


def test_draft_model_simulate_equals_online(setup):
    simulation = assert_simulate_equals_online(setup, "draft-model", {"draft_model": str(setup["root"] / "draft")}, [1, 3, 6])
    assert simulation.method == "teacher-forced"


def test_prompt_lookup_simulate_equals_online(setup):
    assert_simulate_equals_online(setup, "prompt-lookup", {"min_ngram": 1, "max_ngram": 2}, [1, 3, 5])


# --- a head drafter reading the target's hidden states (Medusa-like), with and without the hook ----

class HeadDrafter(Drafter):
    """k fixed linear heads on the target's last verified hidden state; head i guesses the token i+1 after the root."""

    name = "test-heads"
    Options = ChainOptions
    taps = FINAL

    def __init__(self, target, options=None) -> None:
        super().__init__(target, options)
        self.k = getattr(self.options, self.Options.shape_option)
        g = torch.Generator().manual_seed(5)
        # head 0 is close to the target's own head shifted by one step: often right, not always
        self.heads = torch.randn(8, target.vocab_size, target.hidden_size, generator=g, dtype=torch.float64)

    def begin(self, prompt_tokens, prompt_hidden):
        self.last = prompt_hidden[-1]

    def on_verified(self, outcome):
        row = outcome.accepted_nodes[-1] + 1 if outcome.accepted_nodes else 0
        self.last = outcome.hidden[row]

    def _logits(self, hidden, i):
        return self.heads[i] @ hidden

    def propose(self, ctx):
        k = min(self.k, ctx.max_tokens)
        return DraftTree.chain(torch.stack([self._logits(self.last, i).argmax() for i in range(k)]))


class HookedHeadDrafter(HeadDrafter):
    def teacher_forced(self, prompt, output, depth, hidden):
        states, source = hidden()
        p, n = prompt.numel(), output.numel()
        ranks = torch.full((n, depth), RANK_NONE, dtype=torch.long)
        for i in range(depth):
            # at step m the heads read the hidden state at P+m-2 and guess out[m+i]
            m = torch.arange(1, max(n - i, 1))
            ranks[m, i] = true_ranks(states[p + m - 2] @ self.heads[i].T, output[m + i])
        return TeacherForced(ranks, hidden_source=source)


@dataclass
class WindowOptions(DrafterOptions):
    shape_option = "window"
    window: int = option(3, "tokens drafted per step", min=1)


class WindowHeadDrafter(HookedHeadDrafter):
    """The hooked heads with their chain length named `window`: simulate and tune must find it
    through the drafter's shape contract, not by the name k."""

    name = "test-window"
    Options = WindowOptions


@dataclass
class FakeEntryPoint:
    cls: type
    value: str = "tests:HeadDrafter"

    def load(self):
        return self.cls


@pytest.fixture
def head_drafters(monkeypatch):
    installed = registry.installed_drafters()
    installed.update({"test-heads": FakeEntryPoint(HeadDrafter), "test-heads-hooked": FakeEntryPoint(HookedHeadDrafter),
                      "test-window": FakeEntryPoint(WindowHeadDrafter)})
    monkeypatch.setattr(registry, "installed_drafters", lambda: installed)


def test_hidden_state_drafter_simulate_equals_online(setup, head_drafters):
    # hook, hidden states from the log's side file
    simulation = assert_simulate_equals_online(setup, "test-heads-hooked", {}, [2, 3])
    assert simulation.method == "teacher-forced" and simulation.hidden_source.startswith("log side file")
    # no hook: step replay, labelled so
    simulation = assert_simulate_equals_online(setup, "test-heads", {}, [2, 3])
    assert simulation.method == "step replay"


def test_a_shape_option_not_named_k_runs_simulates_exactly_and_tunes(setup, head_drafters, tmp_path):
    from specbench.simulate.log import VerifyProfile
    from specbench.simulate.predict import LatencyModel
    from specbench.simulate.tune import TuneConfig, Tuner, choose, costs_for

    # online runs take window=k; simulate sets window per scored k and scores exactly what they measure
    assert_simulate_equals_online(setup, "test-window", {}, [1, 3])
    simulated = Simulator(setup["log"], SimulateConfig("test-window", {}, [Shape.chain(2)], latency_steps=0))
    assert simulated.options_for(Shape.chain(2)) == {"window": 2}
    # step replay drafts with the drafter itself: exact only if simulate set its window past the default 3
    replayed = Simulator(setup["log"], SimulateConfig("test-window", {}, [Shape.chain(5)], method="replay", latency_steps=0)).score()
    assert [shape_of(t) for t in replayed.results[0].steps] == [shape_of(t) for t in online_steps(setup, "test-window", {"window": 5})]
    # tune walks window = 1..4 as simulate scores them and prints the run that sets the chosen window
    tuner = Tuner(setup["log"], TuneConfig("test-window", max_nodes=4, latency_steps=1, draft_ms=0.0))
    model = LatencyModel.build(VerifyProfile(context_tokens=8, ms=[10.0 + 0.5 * n for n in range(16)]), None, None)
    result = choose(tuner, tuner.frontier(model, costs_for(tuner), "tiny"), setup["log"], None, None)
    scored = Simulator(setup["log"], SimulateConfig("test-window", {}, [Shape.chain(k) for k in range(1, 5)], latency_steps=0)).score()
    assert [p.tau for p in result.frontier.points] == [tau([s for turn in r.steps for s in turn]) for r in scored.results]
    assert f"--window {result.chosen.size} " in tune_commands(result.check)[0]
    # the shape is theirs to set, not the user's
    with pytest.raises(UserError, match="do not pass --window"):
        Tuner(setup["log"], TuneConfig("test-window", {"window": 2}, max_nodes=4, draft_ms=0.0))


def test_hidden_states_from_a_target_forward_when_the_log_has_none(setup, head_drafters):
    log = read_log(setup["log_path"])
    log.header.hidden_file = None
    with pytest.raises(UserError, match="needs the target's hidden states"):
        Simulator(log, SimulateConfig("test-heads-hooked", {}, [Shape.chain(2)], latency_steps=0)).score()
    with_side_file = Simulator(setup["log"], SimulateConfig("test-heads-hooked", {}, [Shape.chain(2)], latency_steps=0)).score()
    forward = Simulator(log, SimulateConfig("test-heads-hooked", {}, [Shape.chain(2)], latency_steps=0), setup["target"]).score()
    assert forward.hidden_source == "teacher-forced target forward"
    assert [shape_of(t) for t in forward.results[0].steps] == [shape_of(t) for t in with_side_file.results[0].steps]


# --- hand-built rank cases ----------------------------------------------------------------------

def test_walk_chain_by_hand():
    # N = 8 outputs; rows = steps by tokens emitted m; columns = draft positions 1..3
    N = RANK_NONE
    ranks = torch.tensor([[N, N, N], [0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, N], [0, N, N]])
    proposals = TeacherForced(ranks)
    # m=1: run 2 -> accepts 2, m=4: rank 1 first -> 0, m=5: run 3 but k=2 -> 2, m=8 stop
    steps = walk(proposals, 8, 8, Shape.chain(2))
    assert [(s.tree_size, s.accepted) for s in steps] == [(2, 2), (2, 0), (2, 2)]
    # k=3, max_new 8: m=1 -> 2 (m=4), m=4 -> 0 (m=5), m=5: remaining 3, run 3 -> 3 (m=9)
    assert [(s.tree_size, s.accepted) for s in walk(proposals, 8, 8, Shape.chain(3))] == [(3, 2), (3, 0), (3, 3)]
    # the draft never exceeds the tokens still allowed: m=7 leaves 1
    assert [(s.tree_size, s.accepted) for s in walk(proposals, 8, 8, Shape.chain(1))][-1] == (1, 1)


def test_walk_tree_by_hand():
    N = RANK_NONE
    tree = Shape.of_tree(TreeShape([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], name="t"))
    ranks = torch.tensor([[N, N, N], [1, 0, 5], [0, 1, 0], [0, 0, 0], [2, 0, 0], [0, 0, N], [N, N, N]])
    steps = walk(TeacherForced(ranks), 7, 7, tree)
    # m=1: (1,0) is a path, (1,0,5) is not -> 2; m=4: rank 2 at depth 1 -> 0; m=5: remaining 2 prunes (0,0,0) -> 2
    # (out[7] is past the log: rank none)
    assert [(s.tree_size, s.tree_depth, s.accepted) for s in steps] == [(6, 3, 2), (6, 3, 0), (5, 2, 2)]
    # a head drafter drafts its whole tree even near max-new-tokens (capped=False): no pruning
    steps = walk(TeacherForced(ranks, capped=False), 7, 7, tree)
    assert [(s.tree_size, s.tree_depth, s.accepted) for s in steps][-1] == (6, 3, 2)


def test_true_ranks_break_ties_to_the_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert true_ranks(logits, torch.tensor([2, 0])).tolist() == [1, 0]
    assert true_ranks(logits, torch.tensor([1, -1])).tolist() == [0, RANK_NONE]


def test_alpha_iid():
    steps = [StepMeasure(0, 0, 0, 3, 3, 3), StepMeasure(0, 0, 0, 3, 3, 1), StepMeasure(0, 0, 0, 3, 3, 0)]
    assert alpha_iid(steps) == 4 / 6  # 4 acceptances, 2 rejections (the full run stopped at its end)


# --- the command line ---------------------------------------------------------------------------

def test_record_and_simulate_from_the_command_line(setup, tmp_path, capsys, monkeypatch):
    root = setup["root"]
    log = tmp_path / "log.jsonl"
    code, out, err = run_cli(["record", "--target", root / "target", "--workload", "builtin-completion", "--limit", 2,
                              "--max-new-tokens", 16, "--out", log, "--profile-max-tokens", 8, "--profile-repeats", 1,
                              "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    assert read_log(log).profile is not None and len(read_log(log).profile.ms) == 8
    tree = tmp_path / "small.json"
    tree.write_text(json.dumps([[0], [1], [0, 0]]))
    code, out, err = run_cli(["simulate", "--log", log, "--drafter", "draft-model", "--draft-model", root / "draft",
                              "--k", "1,2", "--k", 3, "--tree", tree, "--latency-steps", 2, "--out", tmp_path / "results",
                              "--device", "cpu", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert [r["shape"] for r in result["results"]] == ["k=1", "k=2", "k=3", "tree=small"]
    assert all(r["speedup"] > 0 and r["tau"] >= 1 for r in result["results"])
    run_dir = Path(result["results"][1]["run"])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["extra"]["simulated"] and info["drafter_options"]["k"] == 2
    # the same schema `run` writes: `show_run` (what `report` uses) reads it
    code, out, err = run_cli(["simulate", "--log", log, "--drafter", "prompt-lookup", "--k", 2, "--latency-steps", 1,
                              "--out", tmp_path / "results", "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err and "k=2" in out


def bad_logs(tmp_path, good: Path):
    lines = good.read_text().splitlines()
    header, turn = json.loads(lines[0]), json.loads(lines[-1])
    def write(name, rows):
        path = tmp_path / name
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
        return path
    return [
        (write("truncated.jsonl", [lines[0], lines[-1][: len(lines[-1]) // 2]]), ":2: not valid JSON"),
        (write("vocab.jsonl", [lines[0], {**turn, "output_ids": [1, 10**6]}]), ":2: token id 1000000 in 'output_ids' is outside the vocabulary"),
        (write("noheader.jsonl", [lines[-1]]), ":1: not a specbench target log"),
        (write("version.jsonl", [{**header, "version": 99}]), ":1: target log version 99 was written by a newer specbench"),
        (write("missing.jsonl", [lines[0], {k: v for k, v in turn.items() if k != "output_ids"}]), ":2: the turn record lacks output_ids"),
        (write("kind.jsonl", [lines[0], {"type": "nope"}]), ":2: unknown record type 'nope'"),
        (tmp_path / "absent.jsonl", "does not exist"),
    ]


def test_malformed_log_is_one_line(setup, tmp_path, capsys, monkeypatch):
    for path, message in bad_logs(tmp_path, setup["log_path"]):
        code, out, err = run_cli(["simulate", "--log", path, "--k", 2], capsys, monkeypatch)
        assert code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert message in err, (message, err)


# --- DSD logs ------------------------------------------------------------------------------------

def write_dsd(tmp_path, prompts, outputs, extra_line=None):
    tok = char_tokenizer()
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    dumps = []
    for text in outputs:
        ids = tok.convert_tokens_to_ids(list(text))
        dumps.append(f"tensor([[{', '.join(map(str, ids[:3]))},\n          {', '.join(map(str, ids[3:]))}]])")
    if extra_line:
        dumps.insert(1, extra_line)
    (tmp_path / "dsd.txt").write_text("\n".join(dumps) + "\n")
    return tmp_path / "dsd.txt", tmp_path / "prompts.jsonl"


def test_dsd_log_by_hand(setup, tmp_path, capsys, monkeypatch):
    """Prompt lookup (unigram, k=3) on a hand-made DSD log; the correct counts worked out by hand:
    prompt "abcd" -> "abcxyab": step 1 drafts "bcd" after "a", accepts "bc" (+x: 3 tokens); "x" and "y"
    have no earlier match (1 each); "a" drafts "b" (1 token left), accepted (2): increments 3, 1, 1, 2.
    prompt "xyz" -> "xyzxyz": "x" drafts "yzx", all accepted (+y: 4); "y" drafts "z" (2 left: "zx"), z
    accepted, x is past the log (2): increments 4, 2.  τ = 13 / 6; per prompt 7/4 and 3."""
    log, prompts = write_dsd(tmp_path, ["abcd", "xyz"], ["abcxyab", "xyzxyz"])
    code, out, err = run_cli(["simulate", "--log", log, "--prompts", prompts, "--target", setup["root"] / "target",
                              "--drafter", "prompt-lookup", "--max-ngram", 1, "--min-ngram", 1, "--k", 3,
                              "--bandwidth", 100, "--latency-steps", 1, "--out", tmp_path / "r", "--json"], capsys, monkeypatch)
    # a DSD log records no weight bytes: --bandwidth cannot be used, and says so
    assert code == 2 and "--bandwidth needs the target's weight bytes" in err
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"context_tokens": 8, "ms": [10.0, 11.0, 12.0, 13.0]}))
    code, out, err = run_cli(["simulate", "--log", log, "--prompts", prompts, "--target", setup["root"] / "target",
                              "--drafter", "prompt-lookup", "--max-ngram", 1, "--min-ngram", 1, "--k", 3,
                              "--profile", profile, "--latency-steps", 1, "--out", tmp_path / "r", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["tau"] == pytest.approx(13 / 6)
    steps = [json.loads(line) for line in (Path(result["run"]) / "steps.jsonl").read_text().splitlines()]
    spec = [StepMeasure(**{k: s[k] for k in ("draft_ms", "verify_ms", "step_ms", "tree_size", "tree_depth", "accepted")})
            for s in steps if s["mode"] == "spec"]
    increments = [s.accepted + 1 for s in spec]
    assert increments == [3, 1, 1, 2, 4, 2]
    # DSD's analyze_output on the running totals of the same steps: the first iteration dropped,
    # the last counted twice (12 / 6 = 2.0 instead of 13 / 6), and per prompt worse still
    per_prompt_steps = [spec[:4], spec[4:]]
    assert running_totals(per_prompt_steps) == [3, 4, 5, 7, 4, 6]
    dsd_per_prompt, dsd_overall = dsd_reported(running_totals(per_prompt_steps))
    assert dsd_overall == 2.0 and dsd_per_prompt == [4 / 3, 1.0]
    # convert-log writes the same log in our format
    code, out, err = run_cli(["convert-log", "--log", log, "--prompts", prompts, "--target", setup["root"] / "target",
                              "--out", tmp_path / "converted.jsonl"], capsys, monkeypatch)
    assert code == 0, err
    converted = read_log(tmp_path / "converted.jsonl")
    assert [len(t.output_ids) for t in converted.turns] == [7, 6]


@pytest.mark.parametrize(
    "prompts, outputs, extra, message",
    [
        (["ab", "cd", "ef"], ["abab", "cdcd"], None, "prompt 3 has no tensor (2 tensor dumps, 3 prompts"),
        (["ab"], ["abab", "cdcd"], None, "tensor 2 has no prompt"),
        (["ab", "cd"], ["abab", "cdcd"], "print('hello')", "dsd.txt:3: not a tensor dump"),
        (["ab", "cd"], ["abab", "cdcd"], "tensor([[5, 99999]])", "token id 99999 is outside the vocabulary"),
        (["ab", "cd"], ["abab", "cdcd"], "tensor([[5, x]])", "dsd.txt:3: 'x' is not a token id"),
    ],
)
def test_bad_dsd_log_is_one_line(setup, tmp_path, capsys, monkeypatch, prompts, outputs, extra, message):
    if extra and "99999" in extra or extra and "x]" in extra:
        prompts = [*prompts[:1], "zz", *prompts[1:]]
    log, prompt_file = write_dsd(tmp_path, prompts, outputs, extra)
    code, out, err = run_cli(["convert-log", "--log", log, "--prompts", prompt_file, "--target", setup["root"] / "target",
                              "--out", tmp_path / "c.jsonl"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_profile_command_and_its_use(setup, tmp_path, capsys, monkeypatch):
    profile = tmp_path / "profile.json"
    for engine in ("eager", "fast"):  # the engine a run would use (auto: fast on a CPU), prepared before timing
        code, out, err = run_cli(["profile", "--target", setup["root"] / "target", "--out", profile, "--context-tokens", 16,
                                  "--max-tokens", 4, "--repeats", 1, "--device", "cpu", "--engine", engine], capsys, monkeypatch)
        assert code == 0, err
        ms = json.loads(profile.read_text())["ms"]
        assert len(ms) == 4 and all(v > 0 for v in ms)
    code, out, err = run_cli(["profile", "--target", setup["root"] / "target", "--out", profile, "--engine", "turbo"], capsys, monkeypatch)
    assert code == 2 and "unknown engine 'turbo'" in err and "Traceback" not in err
    code, out, err = run_cli(["simulate", "--log", setup["log_path"], "--drafter", "prompt-lookup", "--k", 2, "--profile", profile,
                              "--latency-steps", 1, "--out", tmp_path / "r", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["verify_ms_per_step"] >= min(ms)
    # the log records no profile here: without --profile or --bandwidth, one clear line
    code, out, err = run_cli(["simulate", "--log", setup["log_path"], "--k", 2], capsys, monkeypatch)
    assert code == 2 and "no verify-latency profile" in err and len(err.strip().splitlines()) == 1


def test_loop_counts_accepted_tokens_only_up_to_the_cut():
    """A self-draft accepts everything, also past an EOS the target would continue after:
    those tokens are not emitted, so they must not count (simulate cannot see them either)."""
    from tiny import prompts, tiny_target

    from specbench.drafters.draft_model import DraftModelDrafter
    from specbench.engine.loop import decode

    target = tiny_target(0)
    ended_on_eos = 0
    for prompt in prompts(10):
        result = decode(target, DraftModelDrafter(target, target.model, k=6), prompt, 40)
        # every step emits accepted + 1 tokens, except a last one cut by EOS or max-new-tokens
        assert sum(s.accepted + 1 for s in result.steps) <= len(result.output_ids)
        assert sum(s.accepted + 1 for s in result.steps[:-1]) + 1 < len(result.output_ids) or not result.steps
        ended_on_eos += result.output_ids[-1] == 2
    assert ended_on_eos


# --- Medusa and Hydra (issue 4's drafters), on published-layout checkpoints written for the tiny target -----

@pytest.fixture(scope="module")
def head_checkpoints(setup):
    from head_layouts import write_hydra, write_hydra_decoder, write_medusa_v1

    root, target = setup["root"], setup["target"]
    write_medusa_v1(root / "medusa", target, num_heads=4)
    write_hydra(root / "hydra-prefix", target, "prefix-mlp")
    write_hydra(root / "hydra-mlp", target, "mlp", num_layers=2)
    write_hydra(root / "hydra-tied", target, "prefix-mlp", num_heads=3, num_layers=1, tied=True)
    write_hydra_decoder(root / "hydra-decoder", target, num_decoder_layers=1, num_heads=4)
    return root


@pytest.mark.parametrize("drafter, heads", [("medusa", "medusa"), ("hydra", "hydra-prefix"), ("hydra", "hydra-mlp"),
                                            ("hydra", "hydra-tied"), ("hydra-decoder", "hydra-decoder")])
def test_head_drafters_simulate_equals_online(setup, head_checkpoints, drafter, heads):
    options = {"heads": str(head_checkpoints / heads)}
    tree = "mc_sim_7b_63_depth3" if heads == "hydra-tied" else "mc_sim_7b_63"  # 3 heads
    simulation = assert_simulate_equals_online(setup, drafter, options, [3], target=setup["target"],
                                               trees=[tree], tree_options=("tree",))
    assert simulation.method == "teacher-forced"
    # final hidden states come from the log's side file; the decoder-layer variant reads an
    # earlier layer, which only a target forward can give
    expected = "teacher-forced target forward" if drafter == "hydra-decoder" else "log side file"
    assert simulation.hidden_source.startswith(expected)


def test_a_log_in_another_dtype_feeds_hydras_prefix_layer_in_the_targets(setup, head_checkpoints):
    """The log's states are fp32 (as recorded); a bf16 target runs the heads and Hydra++'s prefix
    layer in bf16 (tune's case on a CPU): the teacher-forced pass casts them instead of failing
    in the prefix layer's products."""
    import copy

    from specbench.targets.hf import HFTarget

    bf16 = HFTarget(copy.deepcopy(setup["target"].model).to(torch.bfloat16))
    assert setup["log"].turns and bf16.dtype == torch.bfloat16
    simulator = Simulator(setup["log"], SimulateConfig("hydra", {"heads": str(head_checkpoints / "hydra-prefix")},
                                                       [Shape.from_spec("mc_sim_7b_63")], latency_steps=1), bf16)
    found = simulator.proposals(3)
    assert found and all(p.ranks.shape[1] == 3 for p in found)
    assert simulator.hidden_source.startswith("log side file")


def test_medusa_from_the_command_line_needs_only_the_log(setup, head_checkpoints, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["simulate", "--log", setup["log_path"], "--drafter", "medusa", "--heads", head_checkpoints / "medusa",
                              "--k", 2, "--tree", "mc_sim_7b_63", "--bandwidth", 100, "--latency-steps", 1, "--device", "cpu",
                              "--out", tmp_path, "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "teacher-forced" and result["hidden_source"].startswith("log side file")
    assert [r["shape"] for r in result["results"]] == ["k=2", "tree=mc_sim_7b_63"]
    info = json.loads((Path(result["results"][1]["run"]) / "run.json").read_text())
    assert info["drafter_options"]["tree"] == "mc_sim_7b_63" and info["extra"]["simulated"]
    code, out, err = run_cli(["simulate", "--log", setup["log_path"], "--drafter", "medusa", "--heads", head_checkpoints / "medusa",
                              "--k", 6, "--bandwidth", 100], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "heads" in err, err


@pytest.mark.parametrize("drafter, heads", [("draft-model", None), ("medusa", "medusa"), ("hydra", "hydra-prefix"), ("hydra", "hydra-tied")])
def test_vocab_trimmed_drafters_simulate_equals_online(setup, head_checkpoints, drafter, heads):
    """Trimmed heads rank the true token among the kept ids (absent: never drafted); the walk
    must still give exactly what `run` measures with the same trimmed drafter."""
    trim = {"vocab_trim": 12, "vocab_trim_from": str(setup["log_path"])}  # the 12 ids the target logged most
    if heads is None:
        assert_simulate_equals_online(setup, drafter, {"draft_model": str(setup["root"] / "draft"), **trim}, [2, 4])
    else:
        tree = "mc_sim_7b_63_depth3" if heads == "hydra-tied" else "mc_sim_7b_63"
        assert_simulate_equals_online(setup, drafter, {"heads": str(head_checkpoints / heads), **trim}, [3],
                                      target=setup["target"], trees=[tree], tree_options=("tree",))


@pytest.mark.parametrize("heads", ["hydra-prefix", "hydra-mlp"])
def test_pruned_hydra_simulate_equals_online(setup, head_checkpoints, heads):
    """With prune_below each step drafts its own pruned tree: simulate drafts every step's tree from
    the log (own trees) and cuts it at the tokens still allowed as the loop's drafter does."""
    options = {"heads": str(head_checkpoints / heads), "prune_below": 0.1}
    simulation = assert_simulate_equals_online(setup, "hydra", options, [3], target=setup["target"],
                                               trees=["mc_sim_7b_63"], tree_options=("tree",))
    for result in simulation.results:
        paths = Shape.from_spec(result.shape.spec).tree.paths
        pruned = 0
        for turn in result.steps:
            m = 1
            for step in turn:  # the whole tree, cut at the tokens still allowed, against what was drafted
                pruned += step.tree_size < sum(len(p) <= MAX_NEW - m for p in paths)
                m += step.accepted + 1
        assert pruned > len(result.steps)  # more steps pruned than there are turns


def test_tune_refuses_a_pruned_drafter_in_one_line(setup, head_checkpoints):
    from specbench.simulate.tune import TuneConfig, Tuner

    config = TuneConfig(drafter="hydra", drafter_options={"heads": str(head_checkpoints / "hydra-prefix"), "prune_below": 0.1})
    with pytest.raises(UserError, match="tune the tree with --prune-below 0"):
        Tuner(setup["log"], config, setup["target"])
