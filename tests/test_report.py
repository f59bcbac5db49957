"""`specbench report` on stores built from known records: every printed figure checked against a hand computation."""

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from test_cli import run_cli

import specbench.cli as cli
from specbench.records import EngineFacts, MeasuredExtra, RunInfo, StepRecord, TurnRecord, WorkloadFacts
from specbench.report.tables import engine_line
from specbench.store import RunStore


def info(run_id, drafter="draft-model", device="Test CPU", shard=None, options=None, target="tiny/target", simulated=False):
    return RunInfo(
        run_id=run_id, command="specbench run", target=target, target_id=target, drafter=drafter,
        drafter_options=options or {"k": 3}, workload="builtin", workload_hash=f"h-{run_id}",
        decode={"max_new_tokens": 16, "temperature": 0.0, "shard": shard, **({"simulated": True} if simulated else {})},
        environment={"device_name": device}, started="2026-01-01T00:00:00+00:00",
        extra=MeasuredExtra(workload=WorkloadFacts(selection_hash="sel")),
    )


def steps_for(pid, accepted, mode="spec", draft_ms=2.0, verify_ms=10.0, step_ms=13.0, depth=3):
    return [StepRecord(draft_ms=draft_ms if mode == "spec" else 0.0, verify_ms=verify_ms, step_ms=step_ms,
                       tree_size=depth if mode == "spec" else 0, tree_depth=depth if mode == "spec" else 0,
                       accepted=a, prompt_id=pid, turn=0, mode=mode, step=i) for i, a in enumerate(accepted)]


def turn(pid, category, mode, new_tokens, wall_ms, exact=None):
    return TurnRecord(prompt_id=pid, turn=0, mode=mode, category=category, prompt_tokens=5, new_tokens=new_tokens,
                      steps=0, wall_ms=wall_ms, ttft_ms=1.0, output_ids=[1] * new_tokens,
                      exact_match=exact, first_divergence=None if exact else (0 if exact is False else None),
                      task=category, text="answer")


def make_run(root, run_id, prompts, **kw):
    """prompts: (pid, category, spec accepted list, spec wall ms, baseline wall ms, exact)"""
    store = RunStore.create(root / run_id, info(run_id, **kw))
    for pid, category, accepted, spec_ms, base_ms, exact in prompts:
        tokens = 1 + sum(a + 1 for a in accepted)
        steps = steps_for(pid, accepted) + steps_for(pid, [0] * (tokens - 1), "baseline")
        store.append_prompt(steps, [turn(pid, category, "baseline", tokens, base_ms), turn(pid, category, "spec", tokens, spec_ms, exact)])
    return store.directory


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=250))


# Prompt p1 (math): accepted 3, 1, 0, 2 of k=3 → 11 tokens; spec 400 ms, plain 1000 ms
# Prompt p2 (writing): accepted 0, 0 → 3 tokens; spec 100 ms, plain 100 ms, diverged
P1 = ("p1", "math", [3, 1, 0, 2], 400.0, 1000.0, True)
P2 = ("p2", "writing", [0, 0], 100.0, 100.0, False)


def test_figures_match_a_hand_computation(tmp_path, capsys, monkeypatch, wide):
    make_run(tmp_path, "r1", [P1, P2])
    code, out, err = run_cli(["report", tmp_path, "--csv", tmp_path / "o.csv"], capsys, monkeypatch)
    assert code == 0, err
    # 6 spec steps: accepted 3,1,0,2,0,0 → τ = (4+2+1+3+1+1)/6 = 2.00; acceptance = 6 / 18 = 33.3%
    row = lambda name: next(line for line in out.splitlines() if name in line)  # noqa: E731
    assert row("τ (mean accepted length").split("│")[2].strip() == "2.00"
    assert row("acceptance rate").split("│")[2].strip() == "33.3%"
    # tokens/s: spec (11+3) / 0.5 s = 28.0; plain 14 / 1.1 s = 12.7; speedup 28 / 12.727 = 2.20×
    assert row("tokens/s, speculative").split("│")[2].strip() == "28.0"
    assert row("tokens/s, plain").split("│")[2].strip() == "12.7"
    assert row("speedup").split("│")[2].strip() == "2.20×"
    assert row("exact match").split("│")[2].strip() == "50.0%"
    assert row("draft ms/step").split("│")[2].strip() == "2.00"
    assert row("verify ms/step").split("│")[2].strip() == "10.00"
    # per position (all 6 steps reach depth 3): P(acc>=1)=3/6, P(acc>=2)=2/6, P(acc>=3)=1/6
    # conditional: 3/6 = 50.0%, 2/3 = 66.7%, 1/2 = 50.0%
    positions = [line.split("│")[1:5] for line in out.splitlines() if line.count("│") == 5 and line.split("│")[1].strip().isdigit()]
    assert [[c.strip() for c in p] for p in positions] == [
        ["1", "6", "50.0%", "50.0%"], ["2", "6", "33.3%", "66.7%"], ["3", "6", "16.7%", "50.0%"]]
    frame = pd.read_csv(tmp_path / "o.csv")
    assert frame.tau[0] == pytest.approx(2.0) and frame.speedup[0] == pytest.approx(28 / (14 / 1.1))
    assert frame.conditional_acceptance_2[0] == pytest.approx(2 / 3)


def test_by_category(tmp_path, capsys, monkeypatch, wide):
    make_run(tmp_path, "r1", [P1, P2])
    code, out, err = run_cli(["report", tmp_path / "r1", "--by", "category", "--csv", tmp_path / "c.csv"], capsys, monkeypatch)
    assert code == 0, err
    math = next(line for line in out.splitlines() if line.startswith("│ math"))
    cells = [c.strip() for c in math.split("│")[1:-1]]
    # math: τ = 10/4 = 2.50, acceptance 6/12 = 50.0%, tok/s 11/0.4 = 27.5, plain 11/1.0 = 11.0, speedup 2.50×, exact 100%
    assert cells == ["math", "1", "2.50", "50.0%", "2.00", "10.00", "27.5", "11.0", "2.50×", "100.0%"]
    writing = [c.strip() for c in next(line for line in out.splitlines() if line.startswith("│ writing")).split("│")[1:-1]]
    assert writing == ["writing", "1", "1.00", "0.0%", "2.00", "10.00", "30.0", "30.0", "1.00×", "0.0%"]
    frame = pd.read_csv(tmp_path / "c.csv")
    assert list(frame.category) == ["math", "writing"]


def test_shards_merge_and_hardware_never_averages(tmp_path, capsys, monkeypatch, wide):
    make_run(tmp_path, "s1", [P1], shard="1/2")
    make_run(tmp_path, "s2", [P2], shard="2/2")
    make_run(tmp_path, "gpu", [P1, P2], device="Other GPU")
    code, out, err = run_cli(["report", tmp_path, "--csv", tmp_path / "o.csv"], capsys, monkeypatch)
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "o.csv")
    assert sorted(frame.device) == ["Other GPU", "Test CPU"]
    merged = frame[frame.device == "Test CPU"].iloc[0]
    assert merged.runs == 2 and merged.prompts == 2 and merged.tau == pytest.approx(2.0)
    assert "2 runs merged" in out and "setups compared: target tiny/target · workload builtin" in out
    compared = [line.split("│")[1].strip() for line in out.split("setups compared")[1].splitlines() if line.startswith("│ draft")]
    assert compared == ["draft-model (k=3) · on Other GPU", "draft-model (k=3) · on Test CPU"]


def test_plots_html_parquet(tmp_path, capsys, monkeypatch, wide):
    make_run(tmp_path, "a", [P1, P2])
    make_run(tmp_path, "b", [P1, P2], drafter="prompt-lookup", options={"k": 5})
    plots = tmp_path / "plots"
    code, out, err = run_cli(["report", tmp_path, "--plot", plots, "--html", tmp_path / "r.html",
                              "--parquet", tmp_path / "o.parquet", "--by", "position"], capsys, monkeypatch)
    assert code == 0, err
    names = {"speedup_by_category.png", "tau_vs_draft_ms.png", "acceptance_by_position.png", "time_per_step.png", "tokens_per_s.png"}
    assert {p.name for p in plots.iterdir()} == names
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "prompt-lookup" in page and "<table" in page
    positions = pd.read_parquet(tmp_path / "o.parquet")
    assert len(positions) == 6 and set(positions.position) == {1, 2, 3}


def test_corrupt_lines_are_named_and_the_rest_used(tmp_path, capsys, monkeypatch, wide):
    run = make_run(tmp_path, "r1", [P1, P2])
    with open(run / "steps.jsonl", "a") as f:
        f.write('{"draft_ms": 1.0, "verify_ms"')  # a truncated last line
    lines = (run / "prompts.jsonl").read_text().splitlines()
    (run / "prompts.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    code, out, err = run_cli(["report", run], capsys, monkeypatch)
    assert code == 0
    assert f"{run / 'steps.jsonl'}:" in err and f"{run / 'prompts.jsonl'}:2:" in err
    assert "2.00" in out


def test_nothing_to_report_is_one_line(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["report", tmp_path], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no run directories" in err
    code, out, err = run_cli(["report", tmp_path, "--by", "colour"], capsys, monkeypatch)
    assert code == 2 and "--by colour" in err


def test_export_answers_in_fastchat_format(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, "r1", [P1, P2])
    code, out, err = run_cli(["export-answers", run, "--out", tmp_path / "m.jsonl", "--model-id", "mine"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["p1", "p2"]
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert rows[0]["model_id"] == "mine" and rows[0]["choices"] == [{"index": 0, "turns": ["answer"]}]


def test_simulated_runs_report_the_same_way_but_apart(tmp_path, capsys, monkeypatch, wide):
    make_run(tmp_path, "measured", [P1, P2])
    make_run(tmp_path, "sim", [P1], simulated=True)
    code, out, err = run_cli(["report", tmp_path, "--by", "task", "--csv", tmp_path / "t.csv"], capsys, monkeypatch)
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "t.csv")
    assert sorted(frame.setup.unique()) == ["draft-model (k=3) → tiny/target · Test CPU",
                                            "draft-model (k=3) → tiny/target · Test CPU · simulated"]
    sim = frame[frame.setup.str.endswith("simulated")]
    assert list(sim.task) == ["math"] and sim.tau.iloc[0] == pytest.approx(2.5)


def test_runs_without_a_baseline_report_and_plot_what_was_measured(tmp_path, capsys, monkeypatch, wide):
    store = RunStore.create(tmp_path / "nb", info("nb"))
    store.append_prompt(steps_for("p1", [3, 1, 0, 2]), [turn("p1", "math", "spec", 11, 400.0)])
    plots = tmp_path / "plots"
    code, out, err = run_cli(["report", tmp_path, "--plot", plots, "--html", tmp_path / "r.html"], capsys, monkeypatch)
    assert code == 0, err
    row = next(line for line in out.splitlines() if "τ (mean accepted length" in line)
    assert row.split("│")[2].strip() == "2.50"  # (4 + 2 + 1 + 3) / 4
    names = {p.name for p in plots.iterdir()}
    assert "speedup_by_category.png" not in names and {"tau_vs_draft_ms.png", "acceptance_by_position.png"} <= names


def test_steps_of_a_prompt_killed_before_its_turns_landed_are_left_out(tmp_path, capsys, monkeypatch, wide):
    run = make_run(tmp_path, "r1", [P1, P2])
    store = RunStore.open(run)
    store._append("steps.jsonl", steps_for("p3", [3, 3, 3, 3]))  # killed after the steps, before the turns
    code, out, err = run_cli(["report", run], capsys, monkeypatch)
    assert code == 0
    assert "4 step record(s) of unfinished prompts left out" in err
    row = next(line for line in out.splitlines() if "τ (mean accepted length" in line)
    assert row.split("│")[2].strip() == "2.00"  # P1 and P2 only, as in the hand computation above


def test_cpu_runs_with_other_thread_counts_are_other_setups(tmp_path, capsys, monkeypatch, wide):
    for run_id, threads in (("t2", 2), ("t8", 8)):
        run = make_run(tmp_path, run_id, [P1, P2])
        row = json.loads((run / "run.json").read_text())
        row["environment"].update(device="cpu", cpu_threads=threads)
        (run / "run.json").write_text(json.dumps(row))
    code, out, err = run_cli(["report", tmp_path], capsys, monkeypatch)
    assert code == 0, err
    assert "Test CPU, 2 threads" in out and "Test CPU, 8 threads" in out


def test_run_json_that_is_not_a_run_is_one_line(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, "r1", [P1])
    (run / "run.json").write_text("[1, 2]")  # valid JSON, not a run
    code, out, err = run_cli(["report", tmp_path], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in err
    assert "run.json is corrupt" in err


class Tables(HTMLParser):
    """The cells of every <table> of a page, as text: [table][row][cell]."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_tables(page: str) -> list[list[list[str]]]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


def test_html_leads_with_speedup_tau_and_exact_per_drafter(tmp_path, capsys, monkeypatch):
    make_run(tmp_path, "a", [P1, P2])  # speedup 2.20×
    make_run(tmp_path, "b", [P1], drafter="prompt-lookup", options={"k": 5})  # 11 / 0.4 s ÷ 11 / 1.0 s = 2.50×
    make_run(tmp_path, "c", [P1, P2], device="Other GPU")
    code, out, err = run_cli(["report", tmp_path, "--html", tmp_path / "r.html"], capsys, monkeypatch)
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    headline = html_tables(page)[0]
    assert headline[0] == ["drafter", "speedup", "τ", "exact", "acceptance", "tokens/s", "plain tokens/s", "prompts"]
    # the fastest first; what all three share (target, workload, decode settings) is said once above, not in a row;
    # what tells two setups apart (the device) stays in their names
    assert [row[0] for row in headline[1:]] == ["prompt-lookup (k=5) · on Test CPU", "draft-model (k=3) · on Test CPU",
                                                "draft-model (k=3) · on Other GPU"]
    assert headline[1][1:] == ["2.50×", "2.50", "100.0%", "50.0%", "27.5", "11.0", "1"]
    assert headline[2][1:] == ["2.20×", "2.00", "50.0%", "33.3%", "28.0", "12.7", "2"]
    assert "target tiny/target" in page.split("<table")[0]
    # an answer that differs, classified by the run, says how in the exact column
    lines = (tmp_path / "c" / "prompts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        if row["exact_match"] is False:
            row["divergence_kind"] = "near-tie"
    (tmp_path / "c" / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = run_cli(["report", tmp_path, "--html", tmp_path / "r2.html"], capsys, monkeypatch)
    assert html_tables((tmp_path / "r2.html").read_text())[0][3][3] == "50.0% (1 near-tie)"
    headers = [cell for table in html_tables(page) for cell in table[0]]
    assert not [h for h in headers if "_" in h], "a raw field name is shown as a header"
    assert "draft ms/step" in headers


def test_html_escapes_every_text_from_a_run(tmp_path, capsys, monkeypatch):
    make_run(tmp_path, "a", [P1, P2], options={"k": 3, "heads": "<script>alert(1)</script>"}, device="<img src=x onerror=alert(2)>")
    make_run(tmp_path, "b", [P1], drafter="x</td><script>alert(3)</script>")
    code, out, err = run_cli(["report", tmp_path, "--html", tmp_path / "r.html"], capsys, monkeypatch)
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "</td><script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "x&lt;/td&gt;&lt;script&gt;alert(3)" in page


def test_setup_names_say_once_what_is_shared_and_keep_what_differs(tmp_path):
    from specbench.report.collect import group_runs, load_runs, setup_names

    make_run(tmp_path, "measured", [P1, P2])
    make_run(tmp_path, "sim", [P1], simulated=True)
    make_run(tmp_path, "pl", [P1], drafter="prompt-lookup", options={"k": 5, "max_ngram": 3})
    warnings = []
    groups = group_runs(load_runs([tmp_path], warnings), warnings)
    shared, names = setup_names(groups)
    assert shared["target"] == "target tiny/target" and shared["decode.max_new_tokens"] == "max new tokens 16"
    assert shared["decode.temperature"] == "temperature 0.0" and "decode.simulated" not in shared
    assert sorted(names.values()) == ["draft-model (k=3)", "draft-model (k=3) · simulated", "prompt-lookup (k=5, max_ngram=3)"]


# --- run.json written before `extra` was typed ----------------------------------------------------

# A measured and a simulated run directory as specbench wrote them while run.json's `extra` was a
# plain dict read back by string key (written by the code at 06fc8d6; paths shortened to tiny/)
OLD_RUNS = Path(__file__).parent / "data" / "old_runs"


@pytest.mark.parametrize("kind", ["measured", "simulated"])
def test_a_run_json_from_before_typed_extra_reads_typed_and_writes_back_the_same_json(kind, tmp_path):
    directory = shutil.copytree(OLD_RUNS / kind, tmp_path / kind)
    written = json.loads((directory / "run.json").read_text())

    def less_later_fields(row: dict) -> dict:
        """`row` less the fields added since these files were written, which read as their defaults."""
        if kind == "measured":
            engine = row["extra"]["engine"]  # the CPU engine's prepacked weights and lean layers
            assert (engine.pop("packed_linears"), engine.pop("lean_layers")) == (False, 0)
        return row

    with RunStore.open(directory) as store:
        info = store.info
        assert info.simulated == (kind == "simulated") and less_later_fields(info.to_json()) == written
        store.write_info()
    assert less_later_fields(json.loads((directory / "run.json").read_text())) == written
    assert info.memory.target_forward_bytes == written["extra"]["target_forward_bytes"] == 186048
    if kind == "measured":
        assert info.extra.workload.prompts == 2 and info.extra.workload.selection_hash == "4d35af2baf7e91c3"
        assert info.extra.engine.engine == "eager" and info.extra.engine.planned_positions == 223
    else:
        assert info.extra.shape == "k=2" and info.extra.alpha_iid == 0.25 and info.extra.latency_model["kind"] == "roofline"


def test_old_runs_report_and_an_engine_entry_from_before_compiled_steps_reads_with_zero_counts(tmp_path, capsys, monkeypatch, wide):
    for kind in ("measured", "simulated"):
        shutil.copytree(OLD_RUNS / kind, tmp_path / kind)
    code, out, err = run_cli(["report", tmp_path], capsys, monkeypatch)
    assert code == 0, err
    assert "prompt-lookup → tiny/target · AMD EPYC, 1 threads" in out
    assert "prompt-lookup (k=2) → tiny/target" in out and "simulated" in out
    # runs started before the compiled step lack its counters (and the warm-up's planned positions)
    row = json.loads((tmp_path / "measured" / "run.json").read_text())
    for key in ("compiled_step", "compile_ms", "compiles", "timed_compiles", "timed_compile_ms", "planned_positions"):
        del row["extra"]["engine"][key]
    row["extra"]["engine"] |= {"engine": "fast", "capacity": 256, "timed_captures": 1, "timed_capture_prompts": ["p1"]}
    (tmp_path / "measured" / "run.json").write_text(json.dumps(row))
    engine = RunStore.open(tmp_path / "measured").info.extra.engine
    lacked = {"compiled_step": False, "compiles": 0, "timed_compiles": 0, "packed_linears": False, "lean_layers": 0}  # defaults
    assert engine == EngineFacts(**{**row["extra"]["engine"], **lacked})
    assert "1 captures (0.00 s), 0 compilations (0.00 s)" in engine_line(engine)
    assert "planned_positions" not in RunStore.open(tmp_path / "measured").info.to_json()["extra"]["engine"]
