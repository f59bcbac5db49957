"""A run killed mid-way (SIGKILL, in a subprocess) and resumed ends with exactly the prompt set of an
uninterrupted run: nothing lost, nothing measured twice, the same greedy outputs."""

import json
import signal
from collections import Counter

import pytest
import torch
from faults import KillAt, spawn
from test_cli import run_cli
from tiny import save_tiny_model

PROMPTS = 12
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny_model(root / "target", seed=0)
    rows = [{"id": f"q{i}", "category": ["a", "b"][i % 2], "turns": [f"Say {i} {i} {i} again and again"]} for i in range(PROMPTS)]
    (root / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def args(setup, out):
    return ["run", "--target", setup / "target", "--workload", setup / "w.jsonl", "--max-new-tokens", 16,
            "--drafter", "prompt-lookup", "--out", out, "--json"]


def records(run_dir):
    turns = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return turns, steps


def test_kill_then_resume_equals_uninterrupted(setup, tmp_path, capsys, monkeypatch):
    killed_out = tmp_path / "killed"
    # killed at a fixed point (right after its 3rd prompt's records), not after a wait: however loaded the machine
    proc = spawn(args(setup, killed_out), tmp_path, KillAt("specbench.store:RunStore.append_prompt", 3, "SIGKILL", "after"))
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    (run_dir,) = killed_out.iterdir()
    done_before = {t["prompt_id"] for t in records(run_dir)[0]}
    assert 3 <= len(done_before) < PROMPTS
    # and a half-written line, as a kill during a write would leave
    with open(run_dir / "steps.jsonl", "a") as f:
        f.write('{"draft_ms": 0.1, "verify_ms": 2.')

    code, out, err = run_cli(["run", "--resume", run_dir, "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((run_dir / "run.json").read_text())["finished"]

    code, out, err = run_cli(args(setup, tmp_path / "straight"), capsys, monkeypatch)
    assert code == 0, err
    (straight,) = (tmp_path / "straight").iterdir()

    turns, steps = records(run_dir)
    ref_turns, ref_steps = records(straight)
    keys = Counter((t["prompt_id"], t["turn"], t["mode"]) for t in turns)
    assert max(keys.values()) == 1, "a prompt was measured twice"
    assert set(keys) == {(t["prompt_id"], t["turn"], t["mode"]) for t in ref_turns}
    assert len(turns) == 2 * PROMPTS
    outputs = {(t["prompt_id"], t["mode"]): t["output_ids"] for t in turns}
    assert outputs == {(t["prompt_id"], t["mode"]): t["output_ids"] for t in ref_turns}
    step_keys = Counter((s["prompt_id"], s["turn"], s["mode"], s["step"]) for s in steps)
    assert max(step_keys.values()) == 1
    assert set(step_keys) == {(s["prompt_id"], s["turn"], s["mode"], s["step"]) for s in ref_steps}
    # the prompts finished before the kill were kept, not measured again
    kept = [t for t in turns if t["prompt_id"] in done_before]
    assert [t["prompt_id"] for t in turns[: len(kept)]] == [t["prompt_id"] for t in kept]


def test_resume_on_another_machine_is_refused(setup, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(args(setup, tmp_path / "r") + ["--limit", "1"], capsys, monkeypatch)
    assert code == 0, err
    (run_dir,) = (tmp_path / "r").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    info["environment"]["device_name"] = "Some Other CPU"
    (run_dir / "run.json").write_text(json.dumps(info))
    code, out, err = run_cli(["run", "--resume", run_dir], capsys, monkeypatch)
    assert code != 0 and "was measured on Some Other CPU" in err and "Traceback" not in err
