"""Out-of-tree drafters: the real plugin package in drafters/specbench-ngram-table, installed as a
user installs it (pip, its own pyproject and entry point, an isolated build), reaches `--drafter`,
`specbench drafters`, `run` and `simulate`; and an option added to a plugin's options dataclass,
in that one place, becomes an -o key, a listed option and a flag of `run` and `simulate`."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_model

from specbench.metrics import tau
from specbench.records import SPEC
from specbench.simulate.record import RecordConfig, record_workload
from specbench.store import RunStore

PLUGIN = Path(__file__).resolve().parent.parent / "drafters" / "specbench-ngram-table"
WORKLOAD, LIMIT, MAX_NEW = "builtin-completion", 2, 24


def install(package: Path, site: Path) -> Path:
    """pip install the package into its own directory (the environment stays as it was), building
    it in an isolated environment as a user's pip would; from a copy, so no build files land in the checkout."""
    source = site.parent / f"{package.name}-source"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, source],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return site


def specbench(args, site: Path):
    """The CLI in a fresh process that sees the installed plugin (flags are generated at import)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "specbench.cli", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target and its recorded greedy outputs (the log simulate scores, and calibration text)."""
    root = tmp_path_factory.mktemp("plugin")
    target = save_tiny_model(root / "target", seed=0)
    log = root / "log.jsonl"
    config = RecordConfig(target=str(target), workload=WORKLOAD, limit=LIMIT, max_new_tokens=MAX_NEW, profile_max_tokens=4,
                          profile_repeats=1, device="cpu", dtype="float64")
    record_workload(config, log)
    return {"root": root, "target": target, "log": log}


def run_args(tiny, out, *drafter_args):
    return ["run", "--target", tiny["target"], "--drafter", "ngram-table", *drafter_args, "--workload", WORKLOAD,
            "--limit", LIMIT, "--max-new-tokens", MAX_NEW, "--dtype", "float64", "--device", "cpu", "--out", out, "--json"]


def simulate_args(tiny, out, *drafter_args):
    return ["simulate", "--log", tiny["log"], "--drafter", "ngram-table", *drafter_args, "--latency-steps", 1,
            "--out", out, "--device", "cpu", "--json"]


def per_turn(run_dir: Path) -> tuple[list[list[tuple[int, int]]], list]:
    """(tree size, accepted) of every drafting step per (prompt, turn) in order, and the steps."""
    steps, _ = RunStore.open(run_dir).load()
    turns: dict[tuple[str, int], list] = {}
    for s in steps:
        if s.mode == SPEC:
            turns.setdefault((s.prompt_id, s.turn), []).append(s)
    return [[(s.tree_size, s.accepted) for s in turn] for turn in turns.values()], [s for t in turns.values() for s in t]


def test_ngram_table_package_runs_and_simulates_exactly(tiny, tmp_path):
    site = install(PLUGIN, tmp_path / "site")

    listed = specbench(["drafters"], site)
    assert listed.returncode == 0, listed.stderr
    assert "ngram-table" in listed.stdout and "specbench_ngram_table:NgramTableDrafter" in listed.stdout
    for flag in ("--calibration", "--order", "--context-weight", "--k"):
        assert flag in listed.stdout.split("ngram-table", 1)[1]

    # the flag and -o forms mixed; calibrated on the target's own outputs, as the README advises
    ran = specbench(run_args(tiny, tmp_path / "runs", "--calibration", tiny["log"], "-o", "k=3"), site)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["exact_match_rate"] == 1.0
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["extra"]["drafter"]["calibration_tokens"] > 0  # it read the log

    simulated = specbench(simulate_args(tiny, tmp_path / "sims", "-o", f"calibration={tiny['log']}", "--k", 3), site)
    assert simulated.returncode == 0, simulated.stderr
    result = json.loads(simulated.stdout)
    assert result["method"] == "teacher-forced"
    online_turns, online = per_turn(run_dir)
    simulated_turns, simulated_steps = per_turn(Path(result["results"][0]["run"]))
    assert simulated_turns == online_turns  # step by step: drafted length and accepted length
    assert tau(simulated_steps) == tau(online) and result["results"][0]["tau"] == pytest.approx(tau(online))
    assert any(accepted for turn in online_turns for _, accepted in turn), "never accepted: the comparison proves little"
    assert any(size == 3 for turn in online_turns for size, _ in turn)


NEW_OPTION = '    max_table_contexts: int = option(1000000, "added by the test: declared here and nowhere else", min=1)\n'


def test_a_new_option_declared_once_reaches_every_command(tiny, tmp_path):
    """The plugin's options dataclass gains a field; nothing else is edited."""
    package = tmp_path / "edited" / PLUGIN.name
    shutil.copytree(PLUGIN, package, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    module = package / "specbench_ngram_table" / "__init__.py"
    declaration = "class NgramTableOptions(ChainOptions):\n"
    assert declaration in module.read_text()
    module.write_text(module.read_text().replace(declaration, declaration + NEW_OPTION))
    site = install(package, tmp_path / "site")
    calibration = ["-o", f"calibration={tiny['log']}"]

    listed = specbench(["drafters"], site)
    assert listed.returncode == 0, listed.stderr
    assert "--max-table-contexts / -o max_table_contexts: int = 1000000 (>= 1)" in listed.stdout

    def reached(out: Path, command: list) -> dict:
        done = specbench(command, site)
        assert done.returncode == 0, done.stderr
        (run_dir,) = out.iterdir()
        info = json.loads((run_dir / "run.json").read_text())
        return info["extra"]["drafter"]["options"]  # what the drafter instance holds (its describe())

    assert reached(tmp_path / "o", run_args(tiny, tmp_path / "o", *calibration, "-o", "max_table_contexts=7"))["max_table_contexts"] == 7
    assert reached(tmp_path / "flag", run_args(tiny, tmp_path / "flag", *calibration, "--max-table-contexts", 9))["max_table_contexts"] == 9
    simulated = reached(tmp_path / "sim", simulate_args(tiny, tmp_path / "sim", *calibration, "--k", 2, "--max-table-contexts", 5))
    assert simulated["max_table_contexts"] == 5 and simulated["k"] == 2
    # its declared bound is checked too, in one line, before any model loads
    refused = specbench(run_args(tiny, tmp_path / "bad", "--max-table-contexts", 0), site)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--max-table-contexts must be at least 1" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


# --- the n-gram table by hand (the module loaded from its source, no install) ---------------------

def ngram_module():
    spec = importlib.util.spec_from_file_location("ngram_table_source", PLUGIN / "specbench_ngram_table" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_ngram_table_counts_and_drafts_by_hand():
    NgramTable = ngram_module().NgramTable
    table = NgramTable(order=3)
    table.add([1, 2, 3, 1, 2, 4, 1, 2, 3])
    assert table.successors[(1, 2)] == {3: 2, 4: 1} and table.successors[(2,)] == {3: 2, 4: 1}
    assert table.most_likely((1, 2)) == (2, 3)
    # after 1 2: 3 (2 of 3); after 2 3: 1; after 3 1: 2; and on until k
    assert table.draft([7, 1, 2], 3) == [3, 1, 2]
    assert table.draft([42], 4) == []  # nothing known: no draft
    # the longest known context wins; shorter ones are the fall-back
    table = NgramTable(order=3)
    table.add([3, 5, 9, 4, 5, 7, 4, 5, 7])
    assert table.draft([3, 5], 1) == [9]  # (3, 5) -> 9, though (5,) alone says 7
    assert table.draft([8, 5], 1) == [7]  # (8, 5) unseen: (5,) -> 7 (2 of 3)


def test_ties_go_to_the_lower_id_and_a_sequence_table_leaves_the_calibration_alone():
    NgramTable = ngram_module().NgramTable
    calibration = NgramTable(order=2)
    calibration.add([5, 9, 5, 7])
    assert calibration.most_likely((5,)) == (1, 7)  # 9 and 7 once each: the lower id
    sequence = NgramTable(order=2, under=calibration)
    sequence.add([5, 9], weight=2)
    assert sequence.most_likely((5,)) == (3, 9) and sequence.count((5,), 7) == 1  # 2 of its own + 1 below
    assert calibration.most_likely((5,)) == (1, 7) and calibration.successors[(5,)] == {9: 1, 7: 1}
    sequence.add([5, 7, 5, 7])
    assert sequence.most_likely((5,)) == (3, 7)  # 7: 1 below + 2 of its own ties 9's 3, and 7 < 9
    sequence.add([5, 7], weight=2)
    assert sequence.most_likely((5,)) == (5, 7) and sequence.most_likely((7,)) == (1, 5)
