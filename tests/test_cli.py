"""The command line: a real run on tiny local models, and one clear line for every bad input."""

import json
import sys

import pytest
import torch
from tiny import char_tokenizer, save_tiny_model, tiny_llama

from specbench.cli import main


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["specbench", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = save_tiny_model(root / "target", seed=0)
    # a close copy of the target: drafts are often, not always, right
    draft_model = tiny_llama(0, vocab=len(char_tokenizer()))
    with torch.no_grad():
        for p in draft_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    draft_model.save_pretrained(root / "draft")
    char_tokenizer().save_pretrained(root / "draft")
    other = tiny_llama(1, vocab=120)  # same tokenizer file, different vocabulary size
    other.save_pretrained(root / "other")
    char_tokenizer().save_pretrained(root / "other")
    return {"target": target, "draft": root / "draft", "other": root / "other"}


def test_run_on_local_models_writes_records_and_matches_plain(models, tmp_path, capsys, monkeypatch):
    args = ["run", "--target", models["target"], "--drafter", "draft-model", "--draft-model", models["draft"],
            "--k", 3, "--limit", 3, "--max-new-tokens", 24, "--dtype", "float32", "--out", tmp_path, "--json"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exact_match_rate"] == 1.0
    assert summary["steps"] > 0 and summary["speedup"] > 0
    (run_dir,) = tmp_path.iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["drafter_options"] == {"draft_model": str(models["draft"]), "k": 3}
    assert info["finished"] is not None
    turns = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    # 3 prompts of the builtin set: writing-1 has two turns, the others one; each in two modes
    assert sorted({(t["prompt_id"], t["turn"], t["mode"]) for t in turns}) == sorted(
        (pid, turn, mode) for pid, n in [("writing-1", 2), ("writing-2", 1), ("roleplay-1", 1)]
        for turn in range(n) for mode in ("baseline", "spec")
    )
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    spec_steps = [s for s in steps if s["mode"] == "spec"]
    assert sum(s["accepted"] + 1 for s in spec_steps) / len(spec_steps) == pytest.approx(summary["tau"])
    assert all(s["tree_size"] == 0 for s in steps if s["mode"] == "baseline")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drafter", "nope"], "unknown drafter 'nope'"),
        (["--target", "not-a-model"], "is not a local directory, a hub id"),
        (["--target", "./missing/model"], "local model directory './missing/model' does not exist"),
        (["--target", "someone/not-in-cache"], "cannot load 'someone/not-in-cache'"),
        (["--device", "cuda"], "asked for CUDA"),
        (["--workload", "nope"], "unknown workload 'nope'"),
        (["--workload", "missing.jsonl"], "workload file 'missing.jsonl' does not exist"),
        (["--drafter", "prompt-lookup", "-o", "bogus=1"], "does not take option(s) bogus"),
        (["--drafter", "prompt-lookup", "-o", "k=abc"], "option k takes int, not 'abc'"),
        (["--drafter", "prompt-lookup", "-o", "k=2.5"], "option k takes int, not 2.5"),
        (["--target", "NOT_A_MODEL_DIR"], "is not a model transformers can load"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_input_is_one_line(args, message, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "--target" not in args:
        args = ["--target", models["target"], *args]
    if "NOT_A_MODEL_DIR" in args:  # a directory with a config that names no causal LM
        (tmp_path / "notamodel").mkdir()
        (tmp_path / "notamodel" / "config.json").write_text('{"model_type": "no-such-architecture"}')
        args = [str(tmp_path / "notamodel") if a == "NOT_A_MODEL_DIR" else a for a in args]
    code, out, err = run_cli(["run", *args, "--out", tmp_path], capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft-model", "other", "--k", "2"], "vocabulary mismatch"),
        (["--draft-model", "draft", "--k", "0"], "--k must be at least 1"),
        ([], "needs --draft-model"),
    ],
)
def test_bad_drafter_input_is_one_line(extra, message, models, tmp_path, capsys, monkeypatch):
    extra = [str(models[x]) if x in models else x for x in extra]
    args = ["run", "--target", models["target"], "--drafter", "draft-model", *extra, "--out", tmp_path]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_drafters_lists_builtins(capsys, monkeypatch):
    code, out, _ = run_cli(["drafters"], capsys, monkeypatch)
    assert code == 0
    assert "draft-model" in out and "prompt-lookup" in out
