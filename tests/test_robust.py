"""Issue 19: every input ends in one line, every fault loses nothing.

One test (or a parametrised family) per class of the adversarial sweep's failures: tracebacks,
hangs and unbounded inputs, bad values accepted silently, misleading or noisy messages, data loss
and corruption, and real files as their projects publish them. Each bad input must end in ONE
line on stderr and exit code 2, with nothing written and nothing lost (the files a case touches
are compared before and after). The wider sweep is tests/test_sweep.py (`python -m pytest -m sweep`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from faults import HoldAt, KillAt, spawn
from test_cli import run_cli
from tiny import char_tokenizer, save_tiny_model

from specbench.errors import UserError

torch.set_num_threads(1)


def fingerprint(path: Path) -> str | None:
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if item.name == ".lock":
            continue
        digest.update(str(item).encode())
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def refused(args, capsys, monkeypatch, says, untouched=(), code=2) -> str:
    """Run the CLI on a bad input: exit `code`, one line on stderr naming `says`, `untouched` unchanged."""
    before = {p: fingerprint(p) for p in untouched}
    got, out, err = run_cli(args, capsys, monkeypatch)
    assert got == code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for text in [says] if isinstance(says, str) else says:
        assert text in err, err
    for p in untouched:
        assert fingerprint(p) == before[p], f"{p} changed"
    return err


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    target = save_tiny_model(root / "target", seed=0)  # 512 positions, a char tokenizer with a chat template
    save_tiny_model(root / "other", seed=5)  # another model, the same vocabulary
    weights = (target / "model.safetensors").read_bytes()
    small = [p for p in target.iterdir() if p.suffix != ".safetensors"]

    def broken(name, files):
        d = root / name
        d.mkdir()
        for p in small:
            (d / p.name).write_bytes(p.read_bytes())
        for file, data in files.items():
            (d / file).write_bytes(data)
        return d

    class Payload:  # a hostile checkpoint: unpickling it would create this file
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    good = jsonl(root / "good.jsonl", [{"id": f"g{i}", "category": "c", "turns": [f"Repeat {i} {i} {i} again"]} for i in range(3)])
    return {
        "root": root, "target": target, "other": root / "other", "good": good,
        "corrupt": broken("corrupt", {"model.safetensors": b"\x00" * 7 + os.urandom(120)}),
        "truncated": broken("truncated", {"model.safetensors": weights[: len(weights) // 2]}),
        "pickle": broken("pickle", {"pytorch_model.bin": pickle.dumps({"w": Payload()})}),
    }


@pytest.fixture(scope="module")
def made(env, tmp_path_factory):
    """A finished run and a recorded log (with a profile), made through the CLI."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from specbench.cli import main

    root = tmp_path_factory.mktemp("made")

    def cli(*args):
        sys.argv = ["specbench", *map(str, args)]
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                assert not exc.code, err.getvalue()
        return out.getvalue()

    run = Path(json.loads(cli("run", "--target", env["target"], "--workload", env["good"], "--max-new-tokens", 8,
                              "--out", root / "runs", "--json"))["run"])
    log = root / "log.jsonl"
    cli("record", "--target", env["target"], "--workload", env["good"], "--max-new-tokens", 8, "--out", log,
        "--profile-max-tokens", 4, "--profile-repeats", 1)
    return {"root": root, "run": run, "log": log}


# --- tracebacks: every unreadable input and unwritable output is one line -------------------------

@pytest.mark.parametrize("flag", ["--target", "--draft-model"])
@pytest.mark.parametrize("model, says", [("corrupt", "not a valid safetensors file"), ("truncated", "not a valid safetensors file"),
                                         ("pickle", "never runs code from a checkpoint")])
def test_unreadable_weights_are_one_line(env, tmp_path, capsys, monkeypatch, flag, model, says):
    args = ["run", "--target", env[model], "--out", tmp_path / "out"] if flag == "--target" else \
        ["run", "--target", env["target"], "--drafter", "draft-model", "--draft-model", env[model], "--out", tmp_path / "out"]
    err = refused(args, capsys, monkeypatch, says, untouched=[env[model]])
    assert "weights_only" not in err  # torch's advice to unpickle code never reaches the user
    assert not (env["root"] / "PWNED").exists(), "the pickle's payload ran"
    assert not (tmp_path / "out").exists()


# torch's weights-only loader's message (2.6 and later) around the reason it gives
TORCH_REFUSED = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in `torch.load` "
                 "from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it can "
                 "result in arbitrary code execution. Do it only if you got the file from a trusted source.\n{}\n\nCheck the "
                 "documentation of torch.load to learn more about types accepted by default with weights_only "
                 "https://pytorch.org/docs/stable/generated/torch.load.html.")


def test_weights_helper_names_every_loader_failure():
    from safetensors import SafetensorError

    from specbench.files import reading_weights

    for exc, says in ((SafetensorError("header too large"), "not a valid safetensors file"),
                      (pickle.UnpicklingError(TORCH_REFUSED.format("Trying to load unsupported GLOBAL posix.system whose module posix "
                                                                   "is blocked.")), "never runs code"),
                      (pickle.UnpicklingError(TORCH_REFUSED.format("Please file an issue with the following so that we can make "
                                                                   "`weights_only=True` compatible with your use case: WeightsUnpickler "
                                                                   "error: \n\nUnsupported operand 149")),
                       r"\(Unsupported operand 149\); it is corrupt, or a raw pickle, which specbench never unpickles"),
                      (pickle.UnpicklingError("invalid load key, 'n'."), "not a readable torch checkpoint"),
                      (RuntimeError("PytorchStreamReader failed reading zip archive"), "not a readable torch checkpoint")):
        with pytest.raises(UserError, match=says) as info, reading_weights("w.bin", "head checkpoint"):
            raise exc
        assert "weights_only" not in str(info.value) and "cannot read head checkpoint w.bin" in str(info.value)


def test_non_utf8_and_empty_prompts_are_one_line_and_leave_no_run_directory(env, tmp_path, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"id": "x", "turns": ["caf\xe9"]}\n')
    blank = jsonl(tmp_path / "blank.jsonl", [{"id": "a", "prompt": ""}])
    out = tmp_path / "out"
    refused(["run", "--target", env["target"], "--workload", latin1, "--out", out], capsys, monkeypatch,
            ("latin1.jsonl:1: not UTF-8", "0xe9"))
    refused(["run", "--target", env["target"], "--workload", blank, "--out", out], capsys, monkeypatch, "blank.jsonl:1: prompt a has an empty turn")
    assert not out.exists()


def test_output_places_are_checked_before_any_work(env, made, tmp_path, capsys, monkeypatch):
    good, run, log = env["good"], made["run"], made["log"]
    keep = [good, run, log]
    cases = [
        (["run", "--target", env["target"], "--out", good], "is a file"),
        (["run", "--target", env["target"], "--out", "/proc/specbench-out"], "cannot write"),
        (["record", "--target", env["target"], "--out", tmp_path], "is a directory"),
        (["record", "--target", env["target"], "--workload", good, "--out", good], "also an input"),
        (["record", "--target", env["target"], "--out", "/proc/log.jsonl"], "cannot write"),
        (["report", run, "--csv", tmp_path], "is a directory"),
        (["report", run, "--csv", "/proc/x.csv"], "cannot write"),
        (["report", run, "--html", tmp_path], "is a directory"),
        (["report", run, "--plot", good], "is a file"),
        (["report", run, "--csv", run / "prompts.jsonl"], "also an input"),
        (["export-answers", run, "--out", tmp_path], "is a directory"),
        (["export-answers", run, "--out", run / "steps.jsonl"], "also an input"),
        (["export-answers", run, "--out", good / "x.jsonl"], "is a file, not a directory"),
        (["profile", "--target", env["target"], "--out", tmp_path], "is a directory"),
        (["vocab-trim", "build", "--from", log, "--target", env["target"], "--out", log], "also an input"),
        (["simulate", "--log", log, "--k", 2, "--out", good], "is a file"),
    ]
    entries = sorted(p.name for p in tmp_path.iterdir())
    for args, says in cases:
        refused(args, capsys, monkeypatch, says, untouched=keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == entries


def test_record_refuses_its_output_before_recording(env, tmp_path, monkeypatch, capsys):
    """The output is checked before the model loads: a bad --out costs nothing."""
    import specbench.targets.hf as hf

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the output was checked")

    monkeypatch.setattr(hf.HFTarget, "load", no_load)
    refused(["record", "--target", env["target"], "--out", tmp_path], capsys, monkeypatch, "is a directory")
    refused(["profile", "--target", env["target"], "--out", "/proc/p.json"], capsys, monkeypatch, "cannot write")


# --- hangs and unbounded inputs: refused before prefill, from a prefix of a huge prompt -------------

def test_prompt_past_the_window_is_refused_before_prefill(env, tmp_path, capsys, monkeypatch):
    huge = jsonl(tmp_path / "huge.jsonl", [{"id": "big", "prompt": "lorem ipsum dolor " * 290_000}])  # 5 MB
    long = jsonl(tmp_path / "long.jsonl", [{"id": "long", "turns": ["x" * 700]}])
    import specbench.runner as runner

    def no_load(*a, **k):
        raise AssertionError("weights loaded for a prompt that cannot fit")

    monkeypatch.setattr(runner, "load_target", no_load)
    for workload, says in ((huge, "prompt big has at least"), (long, "prompt long has at least 700 tokens")):
        refused(["run", "--target", env["target"], "--workload", workload, "--out", tmp_path / "out"], capsys, monkeypatch,
                (says, "512-token context window", "refused before prefill"))
    refused(["run", "--target", env["target"], "--max-new-tokens", 600, "--out", tmp_path / "out"], capsys, monkeypatch,
            ("--max-new-tokens 600", "512-token context window", "lower --max-new-tokens to"))
    refused(["profile", "--target", env["target"], "--context-tokens", 100000, "--out", tmp_path / "p.json"], capsys, monkeypatch,
            ("--context-tokens 100000", "512-token context window"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.json").exists()


def test_a_huge_prompt_is_counted_from_a_prefix():
    """tokens_at_least never hands the tokenizer more than a few times the window's worth of text."""
    from specbench.checks import tokens_at_least

    tokenizer = char_tokenizer()
    seen = []

    def counting(text, **kw):
        seen.append(len(text))
        return tokenizer(text, **kw)

    assert tokens_at_least(counting, "abc " * 1_250_000, 512) > 512
    assert max(seen) <= 8 * 512 * 4
    assert tokens_at_least(counting, "short", 512) == 5


def test_a_tree_too_big_for_the_window_is_refused(env, tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.json"
    big.write_text(json.dumps([[i] for i in range(100)] + [[i, j] for i in range(99) for j in range(100)]))
    refused(["run", "--target", env["target"], "--drafter", "medusa", "--heads", "fresh", "--tree", big, "--out", tmp_path / "out"],
            capsys, monkeypatch, ("10000 nodes", "512-token context window"))


# --- bad values accepted silently: every flag refused past the bounds it declares -----------------

def command_configs():
    """Every command's config: the classes `with_config` turns into flags."""
    import importlib

    from specbench.engine.options import CommandConfig

    importlib.import_module("specbench.cli")  # imports every command's config

    found, todo = [], [CommandConfig]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def past_bounds(kind, meta):
    """(a value past one of the field's declared bounds, what the refusal says) for each bound."""
    from specbench.checks import MAX_COUNT

    if kind is int:
        low = 1 if meta.get("min") is None else meta["min"]
        high = MAX_COUNT if meta.get("max") is None else meta["max"]
        yield low - 1, f"must be at least {low} (got {low - 1})"
        yield high + 1, f"must be at most {high} (got {high + 1})"
        yield 2.5, "takes a whole number"
    elif kind is float:
        yield float("nan"), "must be a finite number"
        if meta.get("min") is not None:
            yield meta["min"] - 0.5, f"must be at least {meta['min']}"
        if meta.get("gt") is not None:
            yield meta["gt"], f"must be greater than {meta['gt']}"
        if meta.get("max") is not None:
            yield meta["max"] + 0.5, f"must be at most {meta['max']}"
    elif meta.get("choices"):
        yield "no-such-choice", f"must be one of {', '.join(meta['choices'])}"


@pytest.mark.parametrize("cls", command_configs(), ids=lambda cls: cls.__name__)
def test_every_command_flag_is_refused_past_its_declared_bounds(cls):
    """The mechanism, once for every field of every command's config: a value past what its `option(...)`
    declares is refused when the config is made (the CLI and library callers alike), naming the flag."""
    import dataclasses
    import typing

    from specbench.engine.options import _simple_type

    required = {f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    cls(**required)  # the declared defaults pass
    hints, checked = typing.get_type_hints(cls), 0
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        for value, says in past_bounds(_simple_type(hints[f.name])[0], f.metadata):
            with pytest.raises(UserError) as refusal:
                cls(**{**required, f.name: value})
            assert str(refusal.value).startswith("--" + f.name.replace("_", "-") + " ") and says in str(refusal.value), (f.name, value)
            checked += 1
    assert checked or cls.__name__ == "CommandConfig"


# the same refusals through the command line (one line, exit 2, nothing written), and the counts not held by a config
COUNT_FLAGS = [
    ("run", "--max-new-tokens"), ("train", "--num-heads"),  # a config's declaration (the second config of `train`)
    ("run", "--k"), ("run", "--vocab-trim"),  # drafter options (engine.options.DrafterOptions)
    ("simulate", "--k"), ("simulate", "--latency-steps"), ("vocab-trim", "--top"),  # checked where they are read
]


@pytest.mark.parametrize("command, flag", COUNT_FLAGS)
def test_count_flags_are_refused_as_one_line(env, made, tmp_path, capsys, monkeypatch, command, flag):
    t, o = ["--target", env["target"]], ["--out", tmp_path / "o"]
    base = {
        "run": ["run", *t, "--drafter", "draft-model", "--draft-model", env["target"], "--vocab-trim-from", env["good"], *o],
        "simulate": ["simulate", "--log", made["log"], "--k", 2, *o],
        "vocab-trim": ["vocab-trim", "build", "--from", env["good"], *t, *o],
        "train": ["train", "--drafter", "medusa", *t, "--data", tmp_path, *o],
    }[command]
    least = 0 if flag == "--vocab-trim" else 1  # --vocab-trim 0: the whole vocabulary, where the catalogue would trim
    refused([*base, flag, least - 1], capsys, monkeypatch, f"{flag} must be at least {least} (got {least - 1})", untouched=[made["log"]])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, says", [
    (["run", "--temperature", "nan"], "--temperature must be a finite number"),
    (["run", "--temperature", "-1"], "--temperature must be at least 0"),
    (["simulate", "--bandwidth", "nan"], "--bandwidth must be a finite number"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
    (["vocab-trim", "--top", str(10**12)], "--top must be at most"),
])
def test_numbers_are_finite_and_in_range(env, made, tmp_path, capsys, monkeypatch, args, says):
    command, rest = args[0], args[1:]
    full = {
        "run": ["run", "--target", env["target"], "--out", tmp_path / "o", *rest],
        "simulate": ["simulate", "--log", made["log"], "--k", 2, "--out", tmp_path / "o", *rest],
        "train": ["train", "--drafter", "medusa", "--target", env["target"], "--data", tmp_path, "--out", tmp_path / "o", *rest],
        "vocab-trim": ["vocab-trim", "build", "--from", env["good"], "--target", env["target"], "--out", tmp_path / "o", *rest],
    }[command]
    refused(full, capsys, monkeypatch, says)
    assert not (tmp_path / "o").exists()


def test_empty_tree_file_is_refused(env, made, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    refused(["run", "--target", env["target"], "--drafter", "medusa", "--heads", "fresh", "--tree", empty, "--out", tmp_path / "o"],
            capsys, monkeypatch, "has no paths")
    refused(["simulate", "--log", made["log"], "--tree", empty, "--out", tmp_path / "o"], capsys, monkeypatch, "has no paths")


def test_resume_with_conflicting_flags_is_refused_naming_them(env, made, capsys, monkeypatch):
    run = made["run"]
    err = refused(["run", "--resume", run, "--max-new-tokens", 4, "--drafter", "draft-model", "-o", "k=2", "--temperature", 0],
                  capsys, monkeypatch, ("--max-new-tokens 4 (the run has 8)", "--drafter draft-model (the run has prompt-lookup)",
                                        "-o k=2 (the run has none)"), untouched=[run])
    assert "--temperature" not in err  # given, but equal to the run's: no conflict
    refused(["run", "--resume", run, "--out", made["root"] / "elsewhere"], capsys, monkeypatch, "--out", untouched=[run])


def test_a_newer_schema_is_refused(made, tmp_path, capsys, monkeypatch):
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(made["run"], newer)
    info = json.loads((newer / "run.json").read_text())
    (newer / "run.json").write_text(json.dumps({**info, "schema_version": 99}))
    refused(["run", "--resume", newer], capsys, monkeypatch, "schema version 99, written by a newer specbench", untouched=[newer])
    refused(["report", newer], capsys, monkeypatch, "newer specbench", untouched=[newer])
    edited = tmp_path / "edited"
    shutil.copytree(made["run"], edited)
    (edited / "run.json").write_text(json.dumps({**info, "decode": "fast please"}))
    refused(["run", "--resume", edited], capsys, monkeypatch, "is corrupt (field 'decode' holds str)", untouched=[edited])
    log = made["log"].read_text().splitlines()
    (tmp_path / "v99.jsonl").write_text("\n".join([json.dumps({**json.loads(log[0]), "version": 99}), *log[1:]]))
    refused(["simulate", "--log", tmp_path / "v99.jsonl", "--k", 2, "--out", tmp_path / "o"], capsys, monkeypatch, "newer specbench")


def test_a_log_of_another_target_warns_naming_both(env, made, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["simulate", "--log", made["log"], "--k", 2, "--target", env["other"], "--out", tmp_path / "o"],
                             capsys, monkeypatch)
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert str(env["target"]) in warning and str(env["other"]) in warning


# --- misleading or noisy messages ------------------------------------------------------------------

def test_a_dsd_log_without_prompts_names_prompts(made, tmp_path, capsys, monkeypatch):
    dsd = tmp_path / "dsd.txt"
    dsd.write_text("tensor([[40, 41, 42,\n         43]])\ntensor([[44, 45]])\n")
    refused(["simulate", "--log", dsd, "--k", 2, "--out", tmp_path / "o"], capsys, monkeypatch, ("DSD target log", "--prompts"))


def test_user_text_is_never_rich_markup(env, tmp_path, capsys, monkeypatch):
    medusa = ["run", "--target", env["target"], "--drafter", "medusa", "--heads", "fresh", "--out", tmp_path / "o"]
    err = refused([*medusa, "--tree", "chain:x:"], capsys, monkeypatch, "--tree chain:x:")
    assert "❌" not in err
    refused([*medusa, "--tree", "[bold]x[/]"], capsys, monkeypatch, "unknown tree '[bold]x[/]'")


def test_usage_errors_are_one_line(capsys, monkeypatch):
    refused(["run", "--limit", "abc"], capsys, monkeypatch, ("--limit", "specbench run --help"))
    refused(["run", "--no-such-flag"], capsys, monkeypatch, "--no-such-flag")


def test_offline_hub_fails_at_once(env, tmp_path, capsys, monkeypatch):
    """No network: the hub clients are put in offline mode before any request (no retries), one line."""
    import socket

    from huggingface_hub import constants

    from specbench import hub

    def unreachable(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("SPECBENCH_DATA", str(tmp_path / "no-data"))
    hub.offline.cache_clear()
    try:
        refused(["run", "--target", env["target"], "--workload", "mt-bench", "--out", tmp_path / "o"], capsys, monkeypatch,
                ("mt-bench", "--workload-file"))
        assert constants.HF_HUB_OFFLINE is True
        refused(["run", "--target", "nobody/not-cached", "--out", tmp_path / "o"], capsys, monkeypatch, "nobody/not-cached")
    finally:
        hub.offline.cache_clear()


# --- data loss and corruption ---------------------------------------------------------------------

def test_report_flags_duplicates_and_unfinished_runs(made, tmp_path, capsys, monkeypatch):
    import shutil

    doubled = tmp_path / "doubled"
    shutil.copytree(made["run"], doubled)
    for name in ("prompts.jsonl", "steps.jsonl"):
        text = (doubled / name).read_text()
        (doubled / name).write_text(text + text)
    code, out, clean_err = run_cli(["report", made["run"], "--csv", tmp_path / "clean.csv"], capsys, monkeypatch)
    code, out, err = run_cli(["report", doubled, "--csv", tmp_path / "doubled.csv"], capsys, monkeypatch)
    assert code == 0
    (warning,) = [line for line in err.splitlines() if "duplicate" in line]
    turns = len(made["run"].joinpath("prompts.jsonl").read_text().splitlines())
    steps = len(made["run"].joinpath("steps.jsonl").read_text().splitlines())
    assert f"{turns} duplicate prompt record(s) and {steps} duplicate step record(s)" in warning
    import pandas as pd

    assert pd.read_csv(tmp_path / "doubled.csv").tau.iloc[0] == pytest.approx(pd.read_csv(tmp_path / "clean.csv").tau.iloc[0])

    unfinished = tmp_path / "unfinished"
    shutil.copytree(made["run"], unfinished)
    rows = [json.loads(line) for line in (unfinished / "prompts.jsonl").read_text().splitlines()]
    (unfinished / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt_id"] == "g0"))
    code, out, err = run_cli(["report", unfinished], capsys, monkeypatch)
    assert code == 0
    assert "unfinished, 1 of 3 prompts measured" in err and "UNFINISHED" in out


def test_resume_drops_prompts_written_twice_and_measures_them_once(env, made, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    turns = (run / "prompts.jsonl").read_text().splitlines()
    steps = (run / "steps.jsonl").read_text().splitlines()
    g1 = lambda lines: [x for x in lines if json.loads(x)["prompt_id"] == "g1"]  # noqa: E731
    with open(run / "prompts.jsonl", "a") as f:
        f.write("\n".join(g1(turns)) + "\n")
    with open(run / "steps.jsonl", "a") as f:
        f.write("\n".join(g1(steps)) + "\n")
    code, out, err = run_cli(["run", "--resume", run, "--json"], capsys, monkeypatch)
    assert code == 0, err
    keys = Counter((json.loads(x)["prompt_id"], json.loads(x)["mode"]) for x in (run / "prompts.jsonl").read_text().splitlines())
    assert set(keys.values()) == {1} and len(keys) == 6


def test_a_locked_run_directory_refuses_a_second_writer(made, capsys, monkeypatch):
    import fcntl

    fd = os.open(made["run"] / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        refused(["run", "--resume", made["run"]], capsys, monkeypatch, "being written by another specbench process",
                untouched=[made["run"]])
    finally:
        os.close(fd)


@pytest.mark.slow  # real processes: each imports torch and transformers
def test_two_resume_processes_one_directory(env, tmp_path, capsys, monkeypatch):
    """Two real processes resume one run directory: the second is refused in one line while the first
    measures; the records end complete, each prompt once, equal to an uninterrupted run's."""
    rows = [{"id": f"q{i}", "turns": [f"Say {i} {i} {i} again and again"]} for i in range(8)]
    workload = jsonl(tmp_path / "w.jsonl", rows)
    args = ["run", "--target", env["target"], "--workload", workload, "--max-new-tokens", 16, "--json"]
    from specbench.store import RunStore

    append = RunStore.append_prompt

    def interrupted_after_one(store, steps, turns):
        if any(t.prompt_id != "q0" for t in turns):
            raise KeyboardInterrupt
        append(store, steps, turns)

    monkeypatch.setattr(RunStore, "append_prompt", interrupted_after_one)
    code, out, err = run_cli([*args, "--out", tmp_path / "part"], capsys, monkeypatch)
    assert code == 2 and "resume with" in err, err
    monkeypatch.undo()
    (run,) = (tmp_path / "part").iterdir()  # one prompt measured of eight

    go, held, release = tmp_path / "go", tmp_path / "held", tmp_path / "release"
    # the first stops at its first prompt's records, the lock held, until released: the second meets
    # the lock however loaded the machine (no race between the two)
    first = spawn(["run", "--resume", run, "--json"], tmp_path, hold_at=HoldAt("specbench.store:RunStore.append_prompt", held, release))
    second = spawn(["run", "--resume", run, "--json"], tmp_path, go_file=go)  # imports meanwhile, then waits
    deadline = time.time() + 900  # a loaded machine can take minutes to import torch in two processes
    while time.time() < deadline and first.poll() is None and not held.exists():
        time.sleep(0.01)
    assert held.exists(), "the first process never reached its first records"
    go.touch()
    _, err2 = second.communicate(timeout=600)
    release.touch()
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "Traceback" not in err2
    assert len(err2.strip().splitlines()) == 1 and "is being written by another specbench process" in err2, err2

    code, out, err = run_cli([*args, "--out", tmp_path / "straight"], capsys, monkeypatch)
    straight = Path(json.loads(out)["run"])
    mine = [json.loads(x) for x in (run / "prompts.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (straight / "prompts.jsonl").read_text().splitlines()]
    assert Counter((t["prompt_id"], t["mode"]) for t in mine) == Counter((t["prompt_id"], t["mode"]) for t in ref)
    assert max(Counter((t["prompt_id"], t["mode"]) for t in mine).values()) == 1
    assert {(t["prompt_id"], t["mode"]): t["output_ids"] for t in mine} == {(t["prompt_id"], t["mode"]): t["output_ids"] for t in ref}


@pytest.mark.slow  # real processes
def test_sigkill_of_record_leaves_the_old_log(env, made, tmp_path, capsys, monkeypatch):
    """Two real `record` processes over copies of a log, SIGKILLed at fixed points: mid-recording, and
    after the new side file is written but before the log is renamed into place (the commit)."""
    import shutil

    kills = {"mid-recording": KillAt("specbench.simulate.record:decode", 3),  # warm-up, 2 of 3 turns
             "at-commit": KillAt("specbench.simulate.log:atomic_write_text", 1)}
    procs = {}
    for name, kill_at in kills.items():
        (tmp_path / name).mkdir()
        log = tmp_path / name / "log.jsonl"
        shutil.copy(made["log"], log)
        procs[name] = spawn(["record", "--target", env["target"], "--workload", env["good"], "--max-new-tokens", 8, "--hidden",
                             "--out", log, "--profile-max-tokens", 4, "--profile-repeats", 1], tmp_path, kill_at)
    for name, proc in procs.items():
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, name
        log = tmp_path / name / "log.jsonl"
        assert log.read_bytes() == made["log"].read_bytes(), name
        code, out, err = run_cli(["simulate", "--log", log, "--k", 2, "--out", tmp_path / name / "o"], capsys, monkeypatch)
        assert code == 0, err


def test_an_interrupted_record_leaves_the_old_log_whole(env, made, tmp_path, capsys, monkeypatch):
    """ctrl-C mid-recording and a failure between the side file and the log: the old log and its side
    file stay byte for byte, nothing is left beside them; a complete record replaces both together."""
    import shutil

    import specbench.simulate.record as record_module

    log = tmp_path / "log.jsonl"
    args = ["record", "--target", env["target"], "--workload", env["good"], "--max-new-tokens", 8, "--hidden", "--out", log,
            "--profile-max-tokens", 4, "--profile-repeats", 1]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    side = log.parent / json.loads(log.read_text().splitlines()[0])["hidden_file"]
    before = {p: p.read_bytes() for p in (log, side)}
    entries = sorted(p.name for p in tmp_path.iterdir())

    real_decode = record_module.decode
    calls = []

    def interrupted_decode(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the warm-up, one turn, then ctrl-C in the second
            raise KeyboardInterrupt
        return real_decode(*a, **k)

    monkeypatch.setattr(record_module, "decode", interrupted_decode)
    refused(args, capsys, monkeypatch, f"interrupted; {log} is as it was", untouched=[log, side])
    monkeypatch.setattr(record_module, "decode", real_decode)

    import specbench.files as files

    renames = []

    def full_disk_on_the_log(src, dst):
        renames.append(dst)
        if str(dst).endswith(".jsonl"):  # the side file is in place, the log's rename (the commit) fails
            raise OSError(28, "No space left on device")
        os.rename(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk_on_the_log)
    refused(args, capsys, monkeypatch, f"cannot write {log} (No space left on device)", untouched=[log, side])
    monkeypatch.undo()
    assert len(renames) == 2
    assert {p: p.read_bytes() for p in (log, side)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == entries

    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    new_side = log.parent / json.loads(log.read_text().splitlines()[0])["hidden_file"]
    assert new_side.is_file() and new_side != side and not side.exists()
    assert '"type": "profile"' in log.read_text()  # the profile is written with the turns, in one file
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    code, _, err = run_cli(["simulate", "--log", log, "--k", 2, "--out", tmp_path / "o"], capsys, monkeypatch)
    assert code == 0, err


def test_a_run_that_fails_before_its_first_prompt_leaves_nothing(env, tmp_path, capsys, monkeypatch):
    import specbench.runner as runner

    def broken(self, prompt):
        raise UserError("measurement failed")

    monkeypatch.setattr(runner.Benchmark, "measure_prompt", broken)
    code, out, err = run_cli(["run", "--target", env["target"], "--workload", env["good"], "--max-new-tokens", 4,
                              "--out", tmp_path / "o"], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1] == "error: measurement failed" and len(lines) == 2, err  # after the line naming the workload
    assert not any((tmp_path / "o").iterdir())


# --- real files as they are published ----------------------------------------------------------------

PUBLISHED = {
    # FastChat fastchat/llm_judge/data/mt_bench/question.jsonl: question_id, category, two turns, some a reference
    "question.jsonl": ("fastchat-question", [
        {"question_id": 81, "category": "writing", "turns": ["Compose a travel note about a harbour.", "Rewrite it as a limerick."]},
        {"question_id": 111, "category": "math", "turns": ["What is 17 * 3?", "And 17 * 4?"], "reference": ["51", "68"]},
    ]),
    # Spec-Bench data/spec_bench/question.jsonl: MT-Bench's rows, then one-turn rows of its own categories
    "spec_bench_question.jsonl": ("spec-bench", [
        {"question_id": 81, "category": "writing", "turns": ["Write one line about tea.", "Now about coffee."]},
        {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Guten Morgen."]},
        {"question_id": 241, "category": "summarization", "turns": ["Summarize: The council met and agreed a budget \u00a35m."],
         "reference": ["The council agreed a budget."]},
    ]),
    # DSD publishes its HellaSwag prompts as JSON Lines named hellaswag.json, wikiHow markers included
    "hellaswag.json": ("dsd-prompts", [
        {"prompt": "[header] How to fold a map [title] Lay the map flat. [step] Smooth it out, then"},
        {"prompt": "A man is standing on a ladder next to a wall. he"},
    ]),
    # rowanz/hellaswag data/hellaswag_val.jsonl
    "hellaswag_val.jsonl": ("hellaswag", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
         "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
         "source_id": "activitynet~v_-JhWjGDPHMY"},
    ]),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_files_are_read_by_their_content(env, tmp_path, capsys, monkeypatch, name):
    from specbench.workloads import open_workload

    fmt, rows = PUBLISHED[name]
    path = jsonl(tmp_path / name, rows)
    workload = open_workload(str(path))
    assert workload.format == fmt and len(workload.prompts) == len(rows)
    code, out, err = run_cli(["run", "--target", env["target"], "--workload", path, "--max-new-tokens", 6, "--limit", 1,
                              "--dtype", "float32", "--out", tmp_path / "o", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["exact_match_rate"] == 1.0


def test_layouts_are_told_by_content_not_name(tmp_path):
    from specbench.workloads import open_workload

    rows = [{"id": "a", "turns": ["one"]}, {"id": "b", "turns": ["two"]}]
    (tmp_path / "list.jsonl").write_text(json.dumps(rows, indent=2))  # a JSON list under a .jsonl name
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "one.json").write_text(json.dumps(rows[0], indent=2))  # one pretty-printed object
    assert [p.id for p in open_workload(str(tmp_path / "list.jsonl")).prompts] == ["a", "b"]
    assert [p.id for p in open_workload(str(tmp_path / "bom.json")).prompts] == ["a", "b"]
    assert [p.id for p in open_workload(str(tmp_path / "one.json")).prompts] == ["a"]


def test_output_through_a_symlink_and_odd_names(env, made, tmp_path, capsys, monkeypatch):
    target = tmp_path / "real.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    code, out, err = run_cli(["report", made["run"], "--csv", link], capsys, monkeypatch)
    assert code == 0, err
    assert link.is_symlink() and target.read_text().startswith("setup")
    odd = tmp_path / "runs with spaces ünïcødé"
    code, out, err = run_cli(["run", "--target", env["target"], "--workload", env["good"], "--max-new-tokens", 4, "--limit", 1,
                              "--out", odd, "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert Path(json.loads(out)["run"]).parent == odd
