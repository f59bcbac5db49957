"""`specbench report` against batch size (docs/batch.md): runs of one setup at several batch sizes
(run.json `decode.batch_size`, B = 1 recording none) make one curve per refill mode; its speedup and
aggregate tokens/s are checked against a hand computation, in the table, the CSV, the plot and the page."""

from dataclasses import replace

import pandas as pd
import pytest
from test_cli import run_cli
from test_report import P1, P2, info, make_run, wide  # noqa: F401  (wide: a fixture)

from specbench.store import RunStore

# P1 + P2: 14 output tokens in each mode (test_report.py). At B = 1 (make_run): spec 500 ms, plain 1100 ms.
# At B > 1 the aggregate is the batch decodes' tokens over their wall: (B, refill, spec wall ms, plain wall ms)
BATCHES = [(2, True, 200.0, 350.0), (4, True, 100.0, 100.0), (4, False, 125.0, 100.0)]


def make_batch_run(root, run_id, size, refill, spec_ms, base_ms, drafter="prompt-lookup"):
    directory = make_run(root, run_id, [P1, P2], drafter=drafter)
    store = RunStore.open(directory)
    run = store.info
    batches = [{"mode": mode, "turn": 0, "sequences": 2, "tokens": 14, "wall_ms": ms} for mode, ms in (("spec", spec_ms), ("baseline", base_ms))]
    store.info = replace(run, decode={**run.decode, "batch_size": size, "refill": refill, "engine": "rows"},
                         extra=replace(run.extra, batch={"size": size, "refill": refill, "engine": "rows", "batches": batches}))
    store.write_info()
    return directory


@pytest.fixture
def curve_runs(tmp_path):
    root = tmp_path / "runs"
    b1 = make_run(root, "b1", [P1, P2], drafter="prompt-lookup")
    store = RunStore.open(b1)
    store.info = replace(store.info, decode={**store.info.decode, "engine": "fast"})  # B = 1 runs on the one-row engine
    store.write_info()
    for size, refill, spec_ms, base_ms in BATCHES:
        make_batch_run(root, f"b{size}{'' if refill else 'n'}", size, refill, spec_ms, base_ms)
    make_run(root, "other", [P1, P2])  # draft-model at B = 1 only: no curve
    return root


def test_speedup_and_throughput_against_batch_size(curve_runs, tmp_path, capsys, monkeypatch, wide):  # noqa: F811
    plots, page = tmp_path / "plots", tmp_path / "r.html"
    code, out, err = run_cli(["report", curve_runs, "--by", "batch", "--csv", tmp_path / "c.csv", "--plot", plots, "--html", page],
                             capsys, monkeypatch)
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "c.csv")
    got = [(r.curve, r.batch_size, round(r.tokens_per_s, 3), round(r.baseline_tokens_per_s, 3), round(r.speedup, 4))
           for r in frame.itertuples()]
    # B = 1: 14 / 0.5 s = 28, plain 14 / 1.1 s = 12.727, 2.2x; B = 2: 14 / 0.2 = 70, 14 / 0.35 = 40, 1.75x;
    # B = 4 refill: 140 and 140, 1x; B = 4 no refill: 14 / 0.125 = 112, 140, 0.8x; B = 1 starts both curves
    assert got == [("prompt-lookup (k=3) · refill", 1, 28.0, 12.727, 2.2), ("prompt-lookup (k=3) · refill", 2, 70.0, 40.0, 1.75),
                   ("prompt-lookup (k=3) · refill", 4, 140.0, 140.0, 1.0), ("prompt-lookup (k=3) · no refill", 1, 28.0, 12.727, 2.2),
                   ("prompt-lookup (k=3) · no refill", 4, 112.0, 140.0, 0.8)]
    assert list(frame.tau.round(2)) == [2.0] * 5 and list(frame.exact_match_rate) == [0.5] * 5
    table = out.split("against batch size")[1]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│ prompt")]
    assert [r[:5] for r in rows] == [["prompt-lookup (k=3) · refill", "1", "28.0", "12.7", "2.20×"],
                                     ["prompt-lookup (k=3) · refill", "2", "70.0", "40.0", "1.75×"],
                                     ["prompt-lookup (k=3) · refill", "4", "140.0", "140.0", "1.00×"],
                                     ["prompt-lookup (k=3) · no refill", "1", "28.0", "12.7", "2.20×"],
                                     ["prompt-lookup (k=3) · no refill", "4", "112.0", "140.0", "0.80×"]]
    assert "draft-model" not in table  # one batch size: no curve
    plot = plots / "against_batch_size.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    html = page.read_text()
    assert "<h2>Against batch size</h2>" in html and html.count("data:image/png;base64,") == 6
    assert "prompt-lookup (k=3) · no refill" in html and "0.80×" in html


def test_no_curve_without_several_batch_sizes(tmp_path, capsys, monkeypatch, wide):  # noqa: F811
    make_run(tmp_path, "a", [P1, P2])
    make_batch_run(tmp_path, "b", 4, True, 100.0, 100.0, drafter="draft-model-b4-only")
    plots = tmp_path / "plots"
    code, out, err = run_cli(["report", tmp_path, "--plot", plots], capsys, monkeypatch)
    assert code == 0, err
    assert "against batch size" not in out and not (plots / "against_batch_size.png").exists()
