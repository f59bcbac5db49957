"""scripts/gpu_check.py: its CPU smoke mode (a tiny fp32 model, the fast engine bucketed as
CUDA graphs run it, no graphs) fills every engine × drafter cell and every section, with
exact outputs; a crash is recorded in its own cell, the others still run, and the exit
status is 1."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_modules import load_script

from specbench.engine.protocol import Drafter, PlainDecoding
from specbench.engine.tree import DraftTree

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
SMALL = ["--device", "cpu", "--prompts", "2", "--prompt-tokens", "16", "--new-tokens", "12", "--sizes", "1,2,4,8", "--reps", "1",
         "--threads", "1"]


@pytest.mark.slow
def test_cpu_smoke_fills_every_cell_exactly(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(out.read_text())
    labels = [check.label for check in load_script("gpu_check").DRAFTERS]
    assert [(c["engine"], c["drafter"]) for c in report["cells"]] == [(e, d) for e in ("eager", "fast") for d in labels]
    for cell in report["cells"]:
        where = f"{cell['engine']}/{cell['drafter']}"
        assert cell["error"] is None and not cell["warnings"], where
        assert cell["prompts"] == 2 and cell["new_tokens"] == 2 * 12 and cell["tokens_per_s"] > 0, where
        assert cell["verify_ms"] > 0 and cell["tau"] >= 1, where
        assert cell["timed_captures"] == 0 and cell["timed_regrowths"] == 0, where
        # tiny fp32 model: no near-tie is close enough to flip, so every output is exact
        if cell["drafter"] != "plain":
            assert cell["spec_vs_plain"]["equal"] == cell["spec_vs_plain"]["total"] == 2, where
        if cell["engine"] == "fast":
            assert cell["fast_vs_eager"]["equal"] == cell["fast_vs_eager"]["total"] == 2, where
        else:
            assert cell["fast_vs_eager"] is None
        # the table shows every cell: engine, drafter and its spec = plain count
        assert any(cell["engine"] in line and f" {cell['drafter']} " in line for line in done.stdout.splitlines()), where
    assert max(c["tau"] for c in report["cells"]) > 1  # some drafter got a token accepted
    sections = report["sections"]
    assert sections["bandwidth"]["limit_tokens_per_s"] > 0 and set(sections["bandwidth"]["fraction"]) == {"eager", "fast"}
    assert {engine: sorted(map(int, ms)) for engine, ms in sections["verify_ms"]["ms"].items()} == {"eager": [1, 2, 4, 8], "fast": [1, 2, 4, 8]}
    assert sections["capture"]["cuda_graphs"] is False and sections["capture"]["timed_captures"] == 0
    batch = sections["batch"]["sizes"]  # docs/batch.md: every row of every batch equals the eager plain decode
    assert sorted(map(int, batch)) == [1, 8, 32] and "batch 32 (32 sequences" in done.stdout
    for point in batch.values():
        for label in ("plain", "draft-model"):
            assert point[label]["equal_to_eager_plain"]["equal"] == point[label]["equal_to_eager_plain"]["total"] == point["sequences"]
            assert point[label]["planned_gib"]["kv"] > 0 and point[label]["planned_gib"]["activations"] > 0  # the memory plan's figures
    if importlib.util.find_spec("deepspeed") is None:
        assert "not importable" in sections["deepspeed"]["skipped"]
    else:
        ds = sections["deepspeed"]
        assert ds["equal_to_hf"]["equal"] == ds["equal_to_hf"]["total"] == 2 and ds["ratio"] > 0
        assert "DeepSpeed" in done.stdout and "TP 1 vs hf" in done.stdout
    assert report["failures"] == [] and "result: every check ran" in done.stdout


class FailsOnThirdStep(Drafter):
    """Plain decoding that raises on its third proposal: a crash inside a timed decode."""

    name = "fails-on-third-step"

    def __init__(self, target) -> None:
        super().__init__(target)
        self.calls = 0

    def propose(self, ctx) -> DraftTree:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("planted fault in propose\nsecond line not shown")
        return DraftTree.empty(ctx.tokens.device)


def broken_factory(target, setup):
    raise ValueError("planted fault in the factory")


def test_a_crash_stays_in_its_cell_and_exits_1(tmp_path, capsys, monkeypatch):
    script = load_script("gpu_check")
    by_label = {check.label: check for check in script.DRAFTERS}
    monkeypatch.setattr(script, "DRAFTERS", [
        by_label["plain"],
        script.DrafterCheck("broken-build", broken_factory),
        script.DrafterCheck("broken-decode", lambda target, setup: FailsOnThirdStep(target)),
        by_label["prompt-lookup"],
    ])
    out = tmp_path / "check.json"
    threads = torch.get_num_threads()
    try:
        code = script.main([*SMALL, "--no-deepspeed", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert code == 1
    report = json.loads(out.read_text())
    cells = {(c["engine"], c["drafter"]): c for c in report["cells"]}
    assert len(cells) == 8
    for engine in ("eager", "fast"):
        assert cells[engine, "broken-build"]["error"] == "ValueError: planted fault in the factory"
        # the short warm-up decode makes 3 proposals already: the crash comes before any timed decode
        assert cells[engine, "broken-decode"]["error"] == "RuntimeError: planted fault in propose"
        for label in ("broken-build", "broken-decode"):
            assert cells[engine, label]["prompts"] == 0 and cells[engine, label]["tokens_per_s"] is None
            assert cells[engine, label]["spec_vs_plain"] is None
        for label in ("plain", "prompt-lookup"):  # the others ran in full
            assert cells[engine, label]["error"] is None and cells[engine, label]["prompts"] == 2
        assert cells[engine, "prompt-lookup"]["spec_vs_plain"]["equal"] == 2
    assert report["sections"]["verify_ms"]["ms"] and report["sections"]["deepspeed"] == {"skipped": "--no-deepspeed"}
    assert len(report["failures"]) == 4 and "CRASHED ValueError: planted fault in the factory" in printed
    assert "result: 4 FAILED" in printed
    assert "second line not shown" not in printed


def test_a_crash_inside_a_timed_decode_keeps_no_partial_numbers(tmp_path, capsys, monkeypatch):
    """A drafter that fails on a later prompt: its cell shows the crash and no half-measured numbers."""
    script = load_script("gpu_check")

    class FailsOnSecondPrompt(PlainDecoding):
        name = "fails-on-second-prompt"
        begun = 0

        def begin(self, prompt_tokens, prompt_hidden) -> None:
            type(self).begun += 1
            if type(self).begun == 3:  # warm-up, first prompt, then this
                raise RuntimeError("planted fault on the second prompt")

    monkeypatch.setattr(script, "DRAFTERS", [
        script.DRAFTERS[0], script.DrafterCheck("late", lambda target, setup: FailsOnSecondPrompt(target)),
    ])
    code = script.main([*SMALL, "--no-deepspeed", "--out", str(tmp_path / "c.json")])
    capsys.readouterr()
    assert code == 1
    cells = {(c["engine"], c["drafter"]): c for c in json.loads((tmp_path / "c.json").read_text())["cells"]}
    assert cells["eager", "late"]["error"] == "RuntimeError: planted fault on the second prompt"
    assert cells["eager", "late"]["prompts"] == 0 and cells["eager", "late"]["spec_vs_plain"] is None
    assert cells["fast", "late"]["error"] is None and cells["fast", "late"]["prompts"] == 2  # a new drafter per engine


def with_fake_graphs(script, monkeypatch, **backend):
    """The script's fast engine with tests/fake_graphs.py standing in for CUDA graphs (capture, replay,
    pool bookkeeping), so the check's graph path (warm-up captures, nothing captured while timed) runs here."""
    from fake_graphs import FakeGraphs

    from specbench.targets.fast import FastHFTarget

    monkeypatch.setattr(script, "FastHFTarget", lambda model, **kw: FastHFTarget(model, graphs=FakeGraphs(**backend), **kw))


def test_with_graphs_every_bucket_is_captured_before_timing(tmp_path, capsys, monkeypatch):
    script = load_script("gpu_check")
    with_fake_graphs(script, monkeypatch)
    code = script.main([*SMALL, "--no-deepspeed", "--out", str(tmp_path / "c.json")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "c.json").read_text())
    assert code == 0, report["failures"]
    assert report["setup"]["fast_engine"] == "bucketed, CUDA graphs"
    for cell in report["cells"]:
        where = f"{cell['engine']}/{cell['drafter']}"
        assert cell["error"] is None and not cell["warnings"], where
        # the warm-up captured every bucket plain decoding, the drafter (and a draft model's own decoder) use
        assert cell["timed_captures"] == 0 and cell["timed_regrowths"] == 0, where
        if cell["engine"] == "fast":
            assert cell["fast_vs_eager"]["equal"] == 2, where
        if cell["drafter"] != "plain":
            assert cell["spec_vs_plain"]["equal"] == 2, where
    fast = {c["drafter"]: c for c in report["cells"] if c["engine"] == "fast"}
    assert fast["plain"]["warm_up_graphs"] > 0  # the first warm-up captures the one-row bucket
    assert fast["medusa"]["warm_up_graphs"] > 0 and fast["draft-model"]["warm_up_graphs"] > 0  # new taps; the draft's decoder
    # DFlash's five taps are new (its block of 16 verified with them); its best-first tree verifies 32 tokens, a new bucket
    assert fast["dflash"]["warm_up_graphs"] > 0 and fast["dflash-tree"]["warm_up_graphs"] > 0
    capture = report["sections"]["capture"]
    assert capture["cuda_graphs"] and capture["warm_up_graphs"] == sum(c["warm_up_graphs"] for c in fast.values())
    assert capture["timed_captures"] == 0 and capture["target"]["graphs"] > 0
    assert "capture (fast engine, CUDA graphs on)" in printed and "inside timed decodes: 0 captures, 0 cache regrowths" in printed


def test_a_failed_capture_is_a_failure(tmp_path, capsys, monkeypatch):
    """With graphs, a capture that fails leaves the fast engine uncaptured: flagged in its cell, exit 1."""
    script = load_script("gpu_check")
    with_fake_graphs(script, monkeypatch, fail_on_capture=2)
    monkeypatch.setattr(script, "DRAFTERS", script.DRAFTERS[:2])
    code = script.main([*SMALL, "--no-deepspeed", "--out", str(tmp_path / "c.json")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "c.json").read_text())
    assert code == 1
    cells = {(c["engine"], c["drafter"]): c for c in report["cells"]}
    failed = [c for c in cells.values() if c["warnings"]]
    assert len(failed) == 1 and failed[0]["engine"] == "fast" and "CUDA graph capture failed" in failed[0]["warnings"][0]
    assert all(c["error"] is None and c["prompts"] == 2 for c in cells.values())  # it still ran, uncaptured
    assert report["sections"]["capture"]["cuda_graphs"] is False
    assert "CUDA graphs OFF: a capture failed" in printed and "result: 2 FAILED" in printed


def test_random_dflash_is_written_in_the_v1_layout_and_loads_strictly(tmp_path):
    """The check's DFlash draft: z-lab's v1 files for the target's shape (five layers, blocks of 16,
    taps by the tap rule), read back by the drafter's own strict loader; its full block is 15 drafts."""
    from specbench.drafters.dflash.layouts import read_checkpoint, tap_rule
    from specbench.targets.hf import HFTarget
    from specbench.targets.synthetic import random_model

    script = load_script("gpu_check")
    model = random_model("tiny", torch.device("cpu"), torch.float32, seed=0)
    folder = script.write_random_dflash(tmp_path / "dflash", model, torch.float32)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 16 and config["num_hidden_layers"] == 5
    assert config["dflash_config"]["target_layer_ids"] == tap_rule(model.config.num_hidden_layers)
    checkpoint = read_checkpoint(str(folder))
    assert checkpoint.config.layout == "dflash" and checkpoint.config.hidden_size == model.config.hidden_size
    drafter = script.random_dflash()(HFTarget(model, name="random-tiny"), script.Setup(torch.device("cpu"), torch.float32, "tiny", [], 8, model,
                                                                                      _dflash=folder))
    assert drafter.max_draft_tokens == 15 and drafter.describe()["block"] == 16
    tree = script.random_dflash(tree="dynamic")(HFTarget(model, name="random-tiny"),
                                                script.Setup(torch.device("cpu"), torch.float32, "tiny", [], 8, model, _dflash=folder))
    assert tree.max_draft_tokens == 31
