"""t(B, n) and what is predicted from it (docs/batch.md): `profile --batch` measures forwards of B
rows on the batch engine; `simulate --batch-size` predicts each B from the one teacher-forced pass
(τ per row is B = 1's: tested equal to the per-row τ a `run --batch-size B` measures); `tune
--batch-size B` costs its candidates with t(B, ·) and so picks a smaller tree where wide trees are
dear at B."""

import json

import pytest
import test_simulate
from test_cli import run_cli
from test_tune import TREE_ROWS, TableTreeDrafter, hand_log, table_drafters  # noqa: F401  (a fixture)

from specbench.errors import UserError
from specbench.flags import tune_commands
from specbench.simulate.log import VerifyProfile, read_profile
from specbench.simulate.tune import TuneConfig, tune_log

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
sim_setup = test_simulate.setup  # a tiny target on disk and its recorded log (a fixture)


def test_profile_batch_measures_forwards_of_b_rows_on_the_batch_engine(sim_setup, tmp_path, capsys, monkeypatch):
    from specbench.targets.batched import RowsHFTarget

    widths = []
    verify = RowsHFTarget.verify_rows
    monkeypatch.setattr(RowsHFTarget, "verify_rows",
                        lambda self, rows, roots, trees, taps=(): widths.append((len(rows), trees[0].tokens.numel())) or verify(self, rows, roots, trees, taps))
    profile = tmp_path / "profile.json"
    code, out, err = run_cli(["profile", "--target", sim_setup["root"] / "target", "--out", profile, "--context-tokens", 16,
                              "--max-tokens", 4, "--repeats", 1, "--device", "cpu", "--batch", "1,3", "--batch", 2], capsys, monkeypatch)
    assert code == 0, err
    measured = read_profile(profile)
    assert len(measured.ms) == 4 and sorted(measured.batch_ms) == ["2", "3"] and all(len(v) == 4 for v in measured.batch_ms.values())
    assert all(v > 0 for ms in measured.batch_ms.values() for v in ms) and measured.batch_sizes == [1, 2, 3]
    # every B's forwards held B rows, each verifying root + a chain of n - 1 (a warm-up and one repeat per n)
    assert sorted(set(widths)) == [(rows, n - 1) for rows in (2, 3) for n in range(1, 5)] and len(widths) == 2 * 4 * 2
    assert "verify ms of 3 rows" in out
    code, out, err = run_cli(["profile", "--target", sim_setup["root"] / "target", "--out", profile, "--batch", "0"], capsys, monkeypatch)
    assert code == 2 and "--batch takes whole numbers >= 1" in err and "Traceback" not in err


def test_a_batch_1_profile_is_written_as_before():
    assert "batch_ms" not in VerifyProfile(8, [1.0, 2.0]).to_json()


@pytest.mark.parametrize("drafter", ["draft-model", "prompt-lookup"])
def test_simulate_at_b_predicts_the_per_row_tau_run_measures_at_b(sim_setup, tmp_path, capsys, monkeypatch, drafter):
    root = sim_setup["root"]
    options = ["--draft-model", root / "draft"] if drafter == "draft-model" else ["--min-ngram", 1, "--max-ngram", 2]
    profile = tmp_path / "profile.json"  # t(3, n) dearer than t(1, n) at every n
    profile.write_text(json.dumps(VerifyProfile(16, [10.0 + n for n in range(8)], batch_ms={"3": [25.0 + 4 * n for n in range(8)]}).to_json()))
    code, out, err = run_cli(["simulate", "--log", sim_setup["log_path"], "--drafter", drafter, *options, "--k", 3, "--profile", profile,
                              "--batch-size", "1,3", "--latency-steps", 2, "--out", tmp_path / "sim", "--device", "cpu", "--json"],
                             capsys, monkeypatch)
    assert code == 0, err
    one, three = json.loads(out)["results"]
    assert (one["batch_size"], three["batch_size"]) == (1, 3)
    code, out, err = run_cli(["run", "--target", root / "target", "--drafter", drafter, *options, "--k", 3, "--batch-size", 3,
                              "--workload", test_simulate.WORKLOAD, "--limit", test_simulate.LIMIT,
                              "--max-new-tokens", test_simulate.MAX_NEW, "--dtype", "float64", "--device", "cpu",
                              "--out", tmp_path / "run", "--json"], capsys, monkeypatch)
    assert code == 0, err
    measured = json.loads(out)
    assert measured["exact_match_rate"] == 1.0 and measured["batch"]["size"] == 3
    # τ per row does not depend on B: what simulate predicts at B = 3 is what each row took, exactly
    assert three["tau"] == one["tau"] == measured["batch"]["tau"] == measured["tau"] and measured["tau"] > 1
    # the step costs come from t(3, n) (25 ms and up, where t(1, n) is at most 17), the draft paid once per row where
    # the drafter proposes row by row (prompt lookup), once per step where it batches its draft forward (the draft model)
    assert three["verify_ms_per_step"] >= 29.0 and one["verify_ms_per_step"] <= 17.0
    factor = 1 if drafter == "draft-model" else 3
    assert three["draft_ms_per_step"] == pytest.approx(factor * one["draft_ms_per_step"])
    assert three["aggregate_tokens_per_s"] == pytest.approx(3 * three["tokens_per_s"])
    # report draws the simulated curve from these runs: the aggregate is B times one row's
    code, out, err = run_cli(["report", tmp_path / "sim", "--by", "batch", "--csv", tmp_path / "curve.csv"], capsys, monkeypatch)
    assert code == 0, err
    import pandas as pd

    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve.batch_size) == [1, 3] and curve.tokens_per_s[1] == pytest.approx(3 * three["tokens_per_s"])
    # a batch size the profile did not measure: one line naming the command that measures it
    code, out, err = run_cli(["simulate", "--log", sim_setup["log_path"], "--drafter", drafter, *options, "--k", 3, "--profile", profile,
                              "--batch-size", 4, "--out", tmp_path / "sim"], capsys, monkeypatch)
    assert code == 2 and "no forwards of 4 rows" in err and "specbench profile --batch 1,4" in err and "Traceback" not in err


def test_tune_at_b_costs_trees_with_t_b_and_picks_a_smaller_tree(tmp_path, table_drafters):  # noqa: F811
    TableTreeDrafter.rows = TREE_ROWS
    # flat at B = 1 (every accepted node pays: the 6-node tree, test_tune); at B = 8 each verified token costs 20 ms more
    log = hand_log(tmp_path, 11, [10.0] * 12)
    profile = VerifyProfile(3, [10.0] * 12, batch_ms={"8": [10.0 + 20.0 * n for n in range(1, 13)]})
    (tmp_path / "p.json").write_text(json.dumps(profile.to_json()))
    at_1 = tune_log(log, TuneConfig("test-table-tree", draft_ms=0.0, profile=tmp_path / "p.json"))
    at_8 = tune_log(log, TuneConfig("test-table-tree", draft_ms=0.0, profile=tmp_path / "p.json", batch_size=8))
    assert at_1.chosen.size == 6 and at_8.chosen.size == 1 and at_8.paths == [[0]]
    # at B = 8: 10 tokens in 7 steps of root + 1 node (t(8, 2) = 50 ms): 8 rows × 10 / 0.35 s; plain 8 rows × 1 / 30 ms
    assert at_8.chosen.tau == at_1.frontier.points[0].tau
    assert at_8.chosen.tokens_per_s == pytest.approx(8 * 10 / 0.350) and at_8.frontier.plain_tokens_per_s == pytest.approx(8 * 1000 / 30)
    run, simulate = tune_commands(at_8.check)
    assert run.endswith("--batch-size 8") and simulate.endswith(f"--batch-size 8 --profile {tmp_path / 'p.json'}")
    with pytest.raises(UserError, match=r"no forwards of 4 rows .*specbench profile --batch 1,4"):
        tune_log(log, TuneConfig("test-table-tree", draft_ms=0.0, profile=tmp_path / "p.json", batch_size=4))
