"""Issue 28, the mechanisms: one write lock per output, one bounded reader of regular files,
records that say when they were cut short, outputs that never meet, data directories whose
parts belong together, sizes checked before building, SIGTERM handled as ctrl-C. The sweep
(tests/sweep.py, `python -m pytest -m sweep`) drives the same through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_report import P1, P2, make_run

from specbench.errors import UserError
from specbench.files import read_bytes, write_lock


# --- one write lock per output ---------------------------------------------------------------

def test_a_second_writer_is_refused_in_one_line_and_the_lock_leaves_nothing(tmp_path):
    out = tmp_path / "log.jsonl"
    with write_lock(out):
        assert (tmp_path / ".log.jsonl.lock").read_text() == str(os.getpid())
        # another process: a lock is per open file, so a child holding nothing is refused
        code = ("import sys; from specbench.files import write_lock; from specbench.errors import UserError\n"
                f"try:\n    write_lock({str(out)!r})\nexcept UserError as e:\n    print(e); sys.exit(3)\n")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert child.returncode == 3, child.stderr
        assert "being written by another specbench process" in child.stdout and str(os.getpid()) in child.stdout
        assert len(child.stdout.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # released: the lock file is gone
    with write_lock(out):  # and can be taken again
        pass


def test_one_output_named_through_a_symlink_has_one_lock(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with write_lock(tmp_path / "real" / "log.jsonl"):
        with pytest.raises(UserError, match="being written by another specbench process"):
            write_lock(tmp_path / "link" / "log.jsonl")
    (tmp_path / "log-link.jsonl").symlink_to(tmp_path / "real" / "log.jsonl")
    with write_lock(tmp_path / "real" / "log.jsonl"):
        with pytest.raises(UserError, match="log-link.jsonl is being written"):
            write_lock(tmp_path / "log-link.jsonl")
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == []  # released: no lock file left


def test_a_lock_file_removed_by_its_previous_holder_is_not_shared(tmp_path):
    """Two writers that opened the same lock file in turn must not both hold it once the first
    removes it: the second locks the file that is there, not the unlinked one."""
    first = write_lock(tmp_path / "x")
    stale = os.open(tmp_path / ".x.lock", os.O_RDWR)  # a waiter that opened the file before it went
    first.release()
    second = write_lock(tmp_path / "x")
    import fcntl

    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the unlinked inode: locking it grants nothing
    assert (tmp_path / ".x.lock").exists() and os.fstat(stale).st_ino != os.stat(tmp_path / ".x.lock").st_ino
    os.close(stale)
    second.release()


# --- one bounded reader of regular files ---------------------------------------------------------

def test_a_pipe_a_device_and_an_oversized_file_are_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "big").write_bytes(b"x" * 100)
    started = time.perf_counter()
    for name in ("fifo", "zero"):
        with pytest.raises(UserError, match="not a regular file"):
            read_bytes(tmp_path / name, "records")
    assert time.perf_counter() - started < 5  # opening the pipe did not wait for a writer
    with pytest.raises(UserError, match="more than the 10 specbench reads"):
        read_bytes(tmp_path / "big", "records", limit=10)
    with pytest.raises(UserError, match="is a directory"):
        read_bytes(tmp_path, "records")
    assert read_bytes(tmp_path / "big", limit=100) == b"x" * 100


def test_report_skips_a_run_whose_records_are_a_pipe(tmp_path):
    from specbench.report.collect import load_runs

    good = make_run(tmp_path, "good", [P1])
    bad = make_run(tmp_path, "bad", [P1])
    (bad / "steps.jsonl").unlink()
    os.mkfifo(bad / "steps.jsonl")
    warnings = []
    runs = load_runs([good, bad], warnings)
    assert [r.directory for r in runs] == [good]
    assert any("not a regular file" in w for w in warnings)


# --- records cut short, runs named twice ----------------------------------------------------------

def test_a_truncated_steps_file_leaves_its_prompts_out_and_says_so(tmp_path):
    from specbench.report.collect import load_runs

    run = make_run(tmp_path, "r", [P1, P2])
    rows = [json.loads(x) for x in (run / "prompts.jsonl").read_text().splitlines()]
    steps = {(r["prompt_id"], r["mode"]): 0 for r in rows}
    for line in (run / "steps.jsonl").read_text().splitlines():
        s = json.loads(line)
        steps[s["prompt_id"], s["mode"]] += 1
    for r in rows:  # the turn records count their steps, as `run` writes them
        r["steps"] = steps[r["prompt_id"], r["mode"]]
    (run / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = (run / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 18  # p1: 4 spec + 10 plain steps, then p2: 2 + 2
    (run / "steps.jsonl").write_text("\n".join(lines[:16]) + "\n")  # cut inside p2's plain steps
    warnings = []
    [loaded] = load_runs([run], warnings)
    assert {t.prompt_id for t in loaded.turns} == {"p1"} and {s.prompt_id for s in loaded.steps} == {"p1"}
    [said] = [w for w in warnings if "truncated" in w]
    assert "2 step record(s) of 1 prompt(s) are lost" in said and f"--resume {run}" in said


def test_a_run_named_twice_or_through_its_parent_is_counted_once(tmp_path):
    from specbench.report.collect import find_runs

    run = make_run(tmp_path / "runs", "r", [P1])
    assert find_runs([run, run, run.parent, Path(str(run) + "/")]) == [run]


# --- outputs that meet, cells a spreadsheet would run ------------------------------------------

def test_report_outputs_may_not_name_one_file(tmp_path):
    from specbench.report.build import check_outputs

    run = make_run(tmp_path, "r", [P1])
    with pytest.raises(UserError, match="--csv and --html both name"):
        check_outputs([run], tmp_path / "x", None, tmp_path / "x", None)
    with pytest.raises(UserError, match="--csv and --parquet both name"):
        check_outputs([run], tmp_path / "a" / ".." / "y", tmp_path / "y", None, None)
    check_outputs([run], tmp_path / "x.csv", None, tmp_path / "x.html", tmp_path / "plots")


def test_csv_cells_a_spreadsheet_would_execute_are_neutralised():
    import pandas as pd

    from specbench.report.build import neutralised

    frame = pd.DataFrame({"category": ['=HYPERLINK("http://x","y")', "+1", "@SUM(A1)", "-2+3", "\tx", "plain"],
                          "tau": [1.5, -1.0, 2.0, 3.0, 1.0, 1.0]})
    out = neutralised(frame)
    assert out["category"].tolist() == ["'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'@SUM(A1)", "'-2+3", "'\tx", "plain"]
    assert out["tau"].tolist() == frame["tau"].tolist()  # numbers, negative ones included, stay numbers


def test_html_plots_are_drawn_beside_the_page_and_removed(tmp_path, monkeypatch):
    from specbench.report.build import build, write_outputs

    run = make_run(tmp_path / "runs", "r", [P1, P2])
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    write_outputs(build([run]), None, tmp_path / "out" / "r.html")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.html"]
    assert list((tmp_path / "tmp").iterdir()) == []


# --- data directories: one generation, checked by the reader ------------------------------------

def _data_dir(path: Path, generation: str | None, hidden_rows: int = 6, hidden_generation: str | None = None) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    tag = {"generation": generation} if generation else None
    save_file({"ids": torch.arange(6, dtype=torch.int32), "offsets": torch.tensor([0, 6]), "starts": torch.tensor([2])},
              str(path / "tokens.safetensors"), metadata=tag)
    hidden_tag = {"generation": hidden_generation or generation} if generation else None
    save_file({"hidden": torch.zeros(hidden_rows, 4, dtype=torch.float16)}, str(path / "hidden.safetensors"), metadata=hidden_tag)
    meta = {"target": "t", "vocab_size": 100, "hidden": "float16", **({"generation": generation} if generation else {})}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_data_whose_parts_belong_to_different_generations_is_refused(tmp_path):
    from specbench.train.data import load_data

    assert load_data(_data_dir(tmp_path / "whole", "g1")).hidden.shape == (6, 4)
    with pytest.raises(UserError, match="hidden.safetensors belongs to another generation"):
        load_data(_data_dir(tmp_path / "mixed", "g1", hidden_generation="g0"))
    with pytest.raises(UserError, match="4 rows for 6 tokens"):  # an older directory without generations: the rows still count
        load_data(_data_dir(tmp_path / "short", None, hidden_rows=4))
    stale = _data_dir(tmp_path / "stale", "g1")  # meta.json of a generation without hidden states: the file there is not read
    meta = json.loads((stale / "meta.json").read_text())
    (stale / "meta.json").write_text(json.dumps({**meta, "hidden": None}))
    assert load_data(stale).hidden is None


def test_an_output_directory_may_not_overlap_an_input(tmp_path):
    from specbench.train.data import check_out

    data = tmp_path / "data"
    data.mkdir()
    (data / "conversations.jsonl").write_text("{}\n")
    for out, source in ((data, data / "conversations.jsonl"), (tmp_path, data), (data, data)):
        with pytest.raises(UserError, match="overlap"):
            check_out(out, True, inputs=((source, "--data"),))
    check_out(tmp_path / "elsewhere", False, inputs=((data, "--data"),))
    check_out(data / "ckpt", False, inputs=((data, "--data"),))  # a folder inside an input overwrites none of it


# --- sizes before building ------------------------------------------------------------------------

def test_sizes_are_checked_before_anything_is_built():
    from specbench.checks import check_temperature
    from specbench.drafters.trees import resolve_tree

    started = time.perf_counter()
    with pytest.raises(UserError, match="at most 16384 nodes"):
        resolve_tree("chain:1000000")
    with pytest.raises(UserError, match="at most 16384 nodes"):
        from specbench.engine.tree import TreeShape

        TreeShape([[i] for i in range(49_153)])
    assert time.perf_counter() - started < 2
    with pytest.raises(UserError, match="use 0 for greedy"):
        check_temperature(1e-40)
    assert check_temperature(0.0) == 0.0 and check_temperature(0.7) == 0.7


# --- workloads ------------------------------------------------------------------------------------

def test_a_null_turn_is_refused_and_a_category_with_a_comma_is_selectable(tmp_path):
    from specbench.workloads import load_workload, select

    (tmp_path / "null.jsonl").write_text(json.dumps({"id": "a", "turns": ["hi", None]}) + "\n")
    with pytest.raises(UserError, match="turn 2 is null, not text"):
        load_workload(str(tmp_path / "null.jsonl"))
    (tmp_path / "comma.jsonl").write_text(json.dumps({"id": "a", "category": "q&a, short", "turns": ["hi"]}) + "\n"
                                          + json.dumps({"id": "b", "category": "other", "turns": ["yo"]}) + "\n"
                                          + json.dumps({"id": "c", "category": "third", "turns": ["yo"]}) + "\n")
    prompts = load_workload(str(tmp_path / "comma.jsonl"))
    assert [p.id for p in select(prompts, ["q&a, short"])] == ["a"]
    assert [p.id for p in select(prompts, ["other,third"])] == ["b", "c"]
    with pytest.raises(UserError, match="names no category"):
        select(prompts, [","])


# --- signals and streams --------------------------------------------------------------------------

def test_sigterm_ends_a_command_like_ctrl_c(capsys):
    import typer

    from specbench.console import INTERRUPTED, run_app

    app = typer.Typer()
    cleaned = []

    @app.command()
    def work() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        sys.argv = ["specbench"]
        run_app(app)
    assert exit_.value.code == INTERRUPTED and cleaned == [True]
    assert capsys.readouterr().err.strip() == "error: interrupted"
    assert signal.getsignal(signal.SIGTERM) is before  # put back for whoever called


def test_library_progress_bars_are_off_when_stderr_is_redirected(tmp_path):
    """A library's tqdm bar (transformers' GGUF conversion draws one) writes nothing into a redirected stderr."""
    code = "import specbench.cli\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass\n"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    with open(tmp_path / "err", "w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, env={**env, "PYTHONPATH": os.pathsep.join(sys.path)}, check=True)
    assert (tmp_path / "err").read_bytes() == b""


def test_an_ascii_terminal_gets_replacements_not_a_traceback(tmp_path):
    run = make_run(tmp_path, "r", [P1, P2])
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "specbench", "report", str(run)], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr and b"?" in done.stdout  # tau, arrows: replaced


# --- a target log and its side file: one recording ---------------------------------------------

def test_a_side_file_of_another_recording_is_refused(tmp_path, capsys, monkeypatch):
    import shutil

    from test_cli import run_cli
    from tiny import save_tiny_model

    from specbench.simulate.log import read_log

    target = save_tiny_model(tmp_path / "target", seed=0)
    workload = tmp_path / "w.jsonl"
    workload.write_text(json.dumps({"id": "a", "turns": ["Repeat one one one"]}) + "\n")
    for name, tokens in (("a", 6), ("b", 9)):
        code, _, err = run_cli(["record", "--target", target, "--workload", workload, "--max-new-tokens", tokens, "--hidden",
                                "--no-profile", "--out", tmp_path / name / "log.jsonl"], capsys, monkeypatch)
        assert code == 0, err
    a, b = read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")
    assert a.hidden(a.turns[0]).shape[0] == len(a.turns[0].prompt_ids) + len(a.turns[0].output_ids) - 1
    shutil.copy(b.hidden_path, a.hidden_path)  # b's states under a's name
    with pytest.raises(UserError, match="belongs to another recording"):
        a.hidden(a.turns[0])


# --- every record names its run -----------------------------------------------------------------

def test_a_record_copied_in_from_another_run_is_refused_never_counted(tmp_path, capsys, monkeypatch):
    from test_cli import run_cli

    from specbench.report.collect import load_runs
    from specbench.store import RunStore

    a, b = make_run(tmp_path / "runs", "ra", [P1]), make_run(tmp_path / "runs", "rb", [P2])
    assert all(json.loads(x)["run_id"] == "ra" for x in (a / "steps.jsonl").read_text().splitlines())
    with open(a / "prompts.jsonl", "a") as f:  # one of b's turns, copied into a
        f.write((b / "prompts.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=r"prompts.jsonl:3: a record of run 'rb', not of this directory's run 'ra'"):
        RunStore.open(a).load()
    warnings = []
    assert [run.directory for run in load_runs([tmp_path / "runs"], warnings)] == [b]  # a is left out, b reported
    assert any("skipped" in w and "'rb'" in w for w in warnings)
    code, _, err = run_cli(["report", a], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "remove them" in err, err
    # records written before run_id existed name none: read as before
    rows = [{k: v for k, v in json.loads(x).items() if k != "run_id"} for x in (b / "steps.jsonl").read_text().splitlines()]
    (b / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(RunStore.open(b).load()[0]) == len(rows)
