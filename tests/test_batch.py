"""Batch > 1 (docs/batch.md): the one decode loop over rows on the batch engine. Every row equals
its own plain decode token for token, for every drafter that declares `batches`, at B = 1, 3, 4,
with rows of different prompt lengths, token budgets and acceptance in one batch, refilled
(continuous batching) or not; one row's acceptance never moves another row's cache; B = 1 is
today's loop and records."""

import json

import pandas as pd
import pytest
import torch
from eagle_layouts import write_eagle1_vicuna
import test_cli
import test_eagle
import test_simulate
from test_cli import run_cli
from test_fast_engine import make_drafter
from tiny import perturbed, prompts, tiny_llama

from specbench.engine.loop import OneRow, Request, decode, decode_rows
from specbench.engine.protocol import Drafter, PlainDecoding
from specbench.engine.static_cache import RowsDecoder
from specbench.engine.tree import DraftTree
from specbench.targets.batched import RowsHFTarget
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
models = test_cli.models  # the tiny models on disk the CLI tests use (a fixture)
sim_setup = test_simulate.setup  # a tiny target on disk and its recorded log (a fixture)

NEW = 16
DRAFTERS = ["plain", "prompt-lookup", "draft-model", "medusa", "hydra", "hydra-pruned", "hydra-decoder", "eagle", "eagle-tree"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama(0)
    target = HFTarget(model)
    target.eos_token_ids = set()  # every row runs to its own budget
    root = tmp_path_factory.mktemp("batch")
    write_eagle1_vicuna(root / "eagle1", target, 0.02)
    batch_prompts = prompts(7)  # 4..23 tokens: rows of different lengths
    budgets = [NEW - (i % 3) * 5 for i in range(len(batch_prompts))]  # and different token budgets
    plain = [decode(target, PlainDecoding(target), p, n).output_ids for p, n in zip(batch_prompts, budgets)]
    return {"target": target, "draft": perturbed(model, noise=0.01), "root": root, "prompts": batch_prompts, "budgets": budgets,
            "plain": plain}


def build(name: str, setup) -> Drafter:
    from specbench.drafters.eagle.drafter import EagleDrafter

    target = setup["target"]
    if name == "eagle":
        return EagleDrafter.build(target, weights=str(setup["root"] / "eagle1"), tree="chain:3")
    if name == "eagle-tree":
        return EagleDrafter.build(target, weights=str(setup["root"] / "eagle1"))  # EAGLE-2's dynamic tree, per row
    return make_drafter(name, target, setup["draft"])


def requests(setup) -> list[Request]:
    return [Request(p, n) for p, n in zip(setup["prompts"], setup["budgets"])]


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_every_row_equals_its_plain_decode(setup, drafter):
    """B = 1, 3, 4, refilled and not: each row's output is that prompt's plain decode at batch 1,
    and its steps (tree sizes, accepted lengths) are the ones it takes alone: nothing another row
    accepts changes a row."""
    alone = [decode(setup["target"], build(drafter, setup), r.prompt_ids, r.max_new_tokens) for r in requests(setup)]
    assert [a.output_ids for a in alone] == setup["plain"]
    for rows in (1, 3, 4):
        for refill in (True, False):
            batch = decode_rows(RowsHFTarget(setup["target"], rows), build(drafter, setup), requests(setup), refill=refill)
            assert [d.output_ids for d in batch.decoded] == setup["plain"], (rows, refill)
            for got, want in zip(batch.decoded, alone):
                assert [(s.tree_size, s.accepted) for s in got.steps] == [(s.tree_size, s.accepted) for s in want.steps], (rows, refill)
            assert batch.rows == rows and batch.refill == refill


def test_rows_of_different_acceptance_share_a_batch(setup):
    """The draft model accepts different amounts per row; the rows still end exact."""
    batch = decode_rows(RowsHFTarget(setup["target"], 4), build("draft-model", setup), requests(setup))
    accepted = [sum(s.accepted for s in d.steps) for d in batch.decoded]
    assert len(set(accepted)) > 2, accepted
    assert [d.output_ids for d in batch.decoded] == setup["plain"]


def test_draft_model_drafts_every_row_in_one_forward_per_position(setup):
    """The draft model's forwards at B = 3 run several rows at once (one per draft position), on
    its own per-row cache, and still draft what it drafts alone (the steps above are equal)."""
    drafter = build("draft-model", setup)
    widths = []
    feed = drafter._feed_rows
    drafter._feed_rows = lambda decoder, rows, feeds: widths.append(len(rows)) or feed(decoder, rows, feeds)
    batch = decode_rows(RowsHFTarget(setup["target"], 3), drafter, requests(setup))
    assert [d.output_ids for d in batch.decoded] == setup["plain"]
    assert max(widths) == 3 and drafter.rows_decoder is not None and drafter.rows_decoder.cache.rows == 3


@pytest.mark.parametrize("drafter", ["medusa", "hydra-decoder", "hydra"])
def test_heads_run_over_every_row_at_once(setup, drafter):
    """Each level's heads run once over every live row's nodes at that level (Hydra's grounded
    heads over [rows, nodes, width] features)."""
    made = build(drafter, setup)
    widths = []
    if drafter == "hydra":
        head = made.heads.head
        made.heads.head = lambda h, features: widths.append(features.shape[0] // len(made.shape.expanded[h])) or head(h, features)
    else:
        head_logits = made.head_logits
        made.head_logits = lambda d, hidden: widths.append(hidden.shape[0] if hidden.dim() == 2 else 1) or head_logits(d, hidden)
    batch = decode_rows(RowsHFTarget(setup["target"], 4), made, requests(setup))
    assert [d.output_ids for d in batch.decoded] == setup["plain"]
    assert max(widths) == 4


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model", "eagle-tree"])
def test_rows_that_end_at_eos_at_different_steps(setup, drafter):
    """With an EOS the rows meet at different steps (or never), each row stops where it stops alone,
    and a refilled row's next sequence starts clean."""
    model = setup["target"].model
    target = HFTarget(model)
    target.eos_token_ids = {setup["plain"][0][4]}  # a token some rows emit early, others late or not at all
    alone = [decode(target, build(drafter, {**setup, "target": target}), r.prompt_ids, r.max_new_tokens).output_ids for r in requests(setup)]
    assert len({len(a) for a in alone}) > 2
    for refill in (True, False):
        batch = decode_rows(RowsHFTarget(target, 3), build(drafter, {**setup, "target": target}), requests(setup), refill=refill)
        assert [d.output_ids for d in batch.decoded] == alone


def test_refill_takes_fewer_steps_than_static_batches(setup):
    """Continuous batching keeps rows busy: the batch forwards (steps of the longest-lived row
    aside) are fewer with refill than with static batches that wait for their longest row."""
    def forwards(refill: bool) -> int:
        target = RowsHFTarget(setup["target"], 3)
        calls = []
        verify = target.verify_rows
        target.verify_rows = lambda *a, **k: calls.append(1) or verify(*a, **k)
        decode_rows(target, PlainDecoding(setup["target"]), requests(setup), refill=refill)
        return len(calls)

    assert forwards(True) < forwards(False)


def test_one_forward_gives_each_row_its_own_logits_and_leaves_other_rows_alone(setup):
    """Rows at different lengths with different trees in one forward: each row's logits are the
    ones the eager target computes for it alone, and committing one row's path moves no other row."""
    target = setup["target"]
    decoder = RowsDecoder(target.backbone, target.lm_head, 3, target.device, target.dtype)
    rows = [0, 2]
    ps = setup["prompts"][:2]
    trees = [DraftTree(torch.tensor([5, 6, 7]), torch.tensor([-1, -1, 0])), DraftTree.chain(torch.tensor([9]))]
    decoder.plan(64)
    for row, p in zip(rows, ps):
        decoder.forward([row], [p], [None])
        decoder.cache.lengths[row] = p.numel()
    ids = [torch.cat([torch.tensor([3]), t.tokens]) for t in trees]
    logits, _ = decoder.forward(rows, ids, [t.shape_key for t in trees])
    for p, tree, got in zip(ps, trees, logits):
        target.prefill(p)
        want, _ = target.verify(3, tree)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    before = decoder.cache.kv[:, :, 2].clone()
    with torch.inference_mode():
        decoder.cache.compact(0, ps[0].numel(), [0, 1, 3])  # row 0 keeps the root, node 0 and its child node 2
    assert torch.equal(decoder.cache.kv[:, :, 2], before)
    assert decoder.cache.lengths == [ps[0].numel() + 3, 0, ps[1].numel()]


def test_sampling_per_row_equals_sampling_alone(setup):
    """At temperature > 0 each row draws from its own generator in the order it would alone, so a
    batch samples exactly what each sequence samples at batch 1."""
    def run(rows: int | None):
        reqs = [Request(p, NEW, torch.Generator().manual_seed(i)) for i, p in enumerate(setup["prompts"])]
        drafter = build("draft-model", setup)
        target = OneRow(setup["target"]) if rows is None else RowsHFTarget(setup["target"], rows)
        if rows is None:
            return [decode_rows(target, drafter, [r], 0.8).decoded[0].output_ids for r in reqs]
        return [d.output_ids for d in decode_rows(target, drafter, reqs, 0.8).decoded]

    assert run(3) == run(None)


def test_a_drafter_that_cannot_batch_is_refused_in_one_line(models, tmp_path, capsys, monkeypatch):
    from specbench.drafters.prompt_lookup import PromptLookupDrafter

    monkeypatch.setattr(PromptLookupDrafter, "batches", False)  # as a plugin that does not declare it
    monkeypatch.setattr("specbench.runner.load", lambda config: pytest.fail("refused only after loading the weights"))
    code, out, err = run_cli(["run", "--target", models["target"], "--batch-size", 2, "--limit", 1,
                              "--dtype", "float32", "--out", tmp_path], capsys, monkeypatch)
    assert code != 0 and "does not decode in batches" in err and "Traceback" not in err
    monkeypatch.undo()
    code, out, err = run_cli(["run", "--target", models["target"], "--batch-size", 2, "--backend", "deepspeed", "--limit", 1,
                              "--out", tmp_path], capsys, monkeypatch)
    assert code != 0 and "--batch-size 2 runs on the hf backend's batch engine" in err and "Traceback" not in err


@pytest.mark.parametrize("refill", [True, False])
def test_cli_run_at_batch_3_is_exact_and_keeps_b_and_refill(models, tmp_path, capsys, monkeypatch, refill):
    args = ["run", "--target", models["target"], "--drafter", "draft-model", "--draft-model", models["draft"], "--k", 3,
            "--limit", 5, "--max-new-tokens", 16, "--dtype", "float32", "--batch-size", 3, "--out", tmp_path, "--json"]
    code, out, err = run_cli(args + ([] if refill else ["--no-refill"]), capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exact_match_rate"] == 1.0
    batch = summary["batch"]
    assert batch["size"] == 3 and batch["refill"] == refill and batch["speedup"] > 0 and len(batch["row_tau"]) >= 5
    info = json.loads(next(tmp_path.glob("*/run.json")).read_text())
    assert info["decode"]["batch_size"] == 3 and info["decode"]["refill"] == refill and info["decode"]["engine"] == "rows"
    assert {b["mode"] for b in info["extra"]["batch"]["batches"]} == {"baseline", "spec"}
    code, out, err = run_cli(["report", tmp_path], capsys, monkeypatch)  # report names the batch and shows its aggregate
    assert code == 0, err
    assert f"batch 3{'' if refill else ' no refill'}" in out and "aggregate tokens/s" in out


def test_batch_1_records_today_s_settings(models, tmp_path, capsys, monkeypatch):
    """At B = 1 the run is today's: run.json names no batch settings, so its runs pool with earlier ones."""
    code, out, err = run_cli(["run", "--target", models["target"], "--limit", 1, "--max-new-tokens", 8, "--dtype", "float32",
                              "--out", tmp_path], capsys, monkeypatch)
    assert code == 0, err
    info = json.loads(next(tmp_path.glob("*/run.json")).read_text())
    assert "batch_size" not in info["decode"] and "refill" not in info["decode"] and "batch" not in info["extra"]
    assert info["decode"]["engine"] == "fast"  # what --engine auto is on a CPU, as before batches existed


def test_cli_curve_runs_each_batch_size_on_one_target(models, tmp_path, capsys, monkeypatch):
    """`--batch-size 1,3`: one run per size, plain decoding at each size, every row exact."""
    args = ["run", "--target", models["target"], "--limit", 4, "--max-new-tokens", 12, "--dtype", "float32",
            "--batch-size", "1,3", "--out", tmp_path, "--json"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    points = json.loads(out)
    assert [p["batch_size"] for p in points] == [1, 3]
    assert all(p["exact_match_rate"] == 1.0 for p in points) and "batch" in points[1] and "batch" not in points[0]
    assert len(list(tmp_path.glob("*/run.json"))) == 2
    code, out, err = run_cli(["report", tmp_path, "--by", "batch", "--csv", tmp_path / "curve.csv"], capsys, monkeypatch)
    assert code == 0, err
    curve = pd.read_csv(tmp_path / "curve.csv")  # the two runs are one curve: B = 1 (eager engine) and B = 3 (rows)
    assert list(curve.batch_size) == [1, 3] and curve.curve.nunique() == 1 and list(curve.exact_match_rate) == [1.0, 1.0]
    assert list(curve.speedup) == pytest.approx([points[0]["speedup"], points[1]["batch"]["speedup"]])


@pytest.mark.parametrize("given", ["0", "two", "2,-1"])
def test_a_bad_batch_size_is_one_line(models, tmp_path, capsys, monkeypatch, given):
    code, out, err = run_cli(["run", "--target", models["target"], "--batch-size", given, "--out", tmp_path], capsys, monkeypatch)
    assert code != 0 and "--batch-size takes whole numbers >= 1" in err and "Traceback" not in err


def test_a_batch_that_does_not_fit_is_one_line_naming_the_largest_that_does(setup, monkeypatch, tmp_path):
    """The memory plan counts the rows' KV cache and the largest forward's activations (every row
    verifying root + a 64-node tree, or one row prefilling its prompt alone). A MemAvailable that
    holds 8 rows' KV cache but only 3 rows' KV and activations refuses B = 8 in one line naming 3."""
    from specbench.errors import UserError
    from specbench.targets import batched

    target = RowsHFTarget(setup["target"], 8)
    positions, verify, prompt = 300, 65, 40
    kv, activations = target.memory_needed(3, positions, verify, prompt)
    assert activations > 0 and 8 * target.kv_bytes_per_row(positions) < kv + activations  # KV alone: all 8 rows would fit
    assert sum(target.memory_needed(4, positions, verify, prompt)) > kv + activations + 1024
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {(kv + activations) // 1024 + 1} kB\n")
    monkeypatch.setattr(batched, "MEMINFO", str(meminfo))
    assert batched.free_memory(torch.device("cpu")) == ((kv + activations) // 1024 + 1) * 1024
    with pytest.raises(UserError, match=r"--batch-size 8 needs .* GiB of activations in its largest forward\) .*"
                                        r"the largest batch that fits is 3 "):
        target.warm_up(positions, verify, prompt)
    three = RowsHFTarget(setup["target"], 3)
    three.warm_up(positions, verify, prompt)  # three rows fit
    # priced as the cache really grows
    assert three.cache.capacity > positions and target.kv_bytes_per_row(positions) == target.kv_bytes_per_row(three.cache.capacity)
    # the largest forward is a long prompt's prefill where it outweighs every row's verify
    assert target.memory_needed(1, 2000, 2, 1900)[1] == target.activation_bytes(1, 1900, 1900) > target.activation_bytes(1, 2, 2000)


def test_a_run_whose_batch_does_not_fit_is_one_line(models, tmp_path, capsys, monkeypatch):
    from specbench.targets import batched

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:       1 kB\n")
    monkeypatch.setattr(batched, "MEMINFO", str(meminfo))
    code, out, err = run_cli(["run", "--target", models["target"], "--batch-size", 4, "--limit", 2, "--max-new-tokens", 8,
                              "--dtype", "float32", "--out", tmp_path / "runs"], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in err
    refusal = err.strip().splitlines()[-1]  # after the workload's one line: the refusal, before anything was measured
    assert "--batch-size 4 needs" in refusal and "not even one row fits" in refusal
    assert not list((tmp_path / "runs").glob("*/run.json"))


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_simulate_predicts_every_row_s_steps_at_batch_3(sim_setup, drafter):
    """τ per row does not depend on B for greedy drafters: simulate's steps from the log (one
    teacher-forced pass) are each row's steps measured at B = 3 through the runner."""
    from specbench.metrics import tau
    from specbench.runner import Benchmark, RunConfig
    from specbench.simulate.runner import SimulateConfig, Simulator
    from specbench.simulate.walk import Shape

    options = {"min_ngram": 1, "max_ngram": 2} if drafter == "prompt-lookup" else {"draft_model": str(sim_setup["root"] / "draft")}
    result = Simulator(sim_setup["log"], SimulateConfig(drafter, options, [Shape.chain(3)], latency_steps=2), None).score().results[0]
    config = RunConfig(target=str(sim_setup["root"] / "target"), drafter=drafter, drafter_options={**options, "k": 3},
                       workload=test_simulate.WORKLOAD, limit=test_simulate.LIMIT, max_new_tokens=test_simulate.MAX_NEW,
                       dtype="float64", device="cpu", baseline=False, warmup=False, batch_size=3)
    bench = Benchmark(config, target=sim_setup["target"])
    measured = bench.measure_batch(bench.prompts, [])
    online = [[s for s in steps if s.turn == t] for (steps, _), prompt in zip(measured, bench.prompts) for t in range(len(prompt.turns))]
    shape = lambda steps: [(s.tree_size, s.tree_depth, s.accepted) for s in steps]  # noqa: E731
    assert [shape(t) for t in result.steps] == [shape(t) for t in online]
    assert [tau(t) for t in result.steps] == [tau(t) for t in online] and any(s.accepted for t in online for s in t)


@pytest.mark.parametrize("drafter", ["plain", "prompt-lookup", "draft-model", "hydra"])
def test_rows_on_a_cpus_packed_lean_layers_equal_plain_decode_fp32(drafter):
    """In fp32 on a CPU the batch engine runs the one-row fast engine's prepacked weights and lean
    layers (many rows per product, per-row masks and positions), and so does the draft model's own
    rows decoder: every row still equals its plain decode."""
    from specbench.engine.lean_layer import LeanLayer
    from specbench.engine.packed import PackedLinear

    model = tiny_llama(0).float()
    target = HFTarget(model)
    target.eos_token_ids = set()
    rows = RowsHFTarget(target, 3)
    assert all(isinstance(layer, LeanLayer) for layer in rows.decoder.backbone.layers) and isinstance(rows.decoder.head, PackedLinear)
    assert rows.engine_stats()["lean_layers"] == 2 == FastHFTarget(model).lean_layers  # one maker of CPU steps (lean_layer.py)
    batch_prompts, budgets = prompts(5), [NEW, NEW - 5, NEW - 10, NEW, NEW - 5]
    setup = {"target": target, "draft": perturbed(model, noise=0.01)}
    plain = [decode(target, PlainDecoding(target), p, n).output_ids for p, n in zip(batch_prompts, budgets)]
    draft = build(drafter, setup)
    batch = decode_rows(rows, draft, [Request(p, n) for p, n in zip(batch_prompts, budgets)])
    assert [d.output_ids for d in batch.decoded] == plain
    if drafter == "draft-model":
        assert all(isinstance(layer, LeanLayer) for layer in draft.rows_decoder.backbone.layers)
        assert isinstance(draft.rows_decoder.head, PackedLinear) and not isinstance(draft.head, PackedLinear)


@pytest.mark.parametrize("drafter", ["plain", "prompt-lookup", "draft-model", "hydra", "eagle-tree"])
def test_captured_rows_equal_their_plain_decode_and_capture_only_in_the_warm_up(setup, drafter):
    """CUDA graphs per (bucket, span) at batch B, on the stand-in backend (tests/fake_graphs.py:
    a replay re-runs the captured step over its static buffers, so a stale mask, slot or id shows
    as a wrong token): every row equals its plain decode, refilled and not, at B = 3 and 4, and
    after the warm-up nothing is captured again; every row is in every step, idle rows as padding."""
    from fake_graphs import FakeGraphs

    made = build(drafter, setup)
    max_rows = 1 + made.max_draft_tokens
    longest = max(r.prompt_ids.numel() + r.max_new_tokens for r in requests(setup)) + max_rows
    for rows in (3, 4):
        for refill in (True, False):
            graphs = FakeGraphs()
            target = RowsHFTarget(setup["target"], rows, graphs=graphs)
            target.warm_up(longest, max_rows, taps=made.taps)  # plain decoding's bucket and the drafter's
            captured = graphs.captures
            assert captured > 0 and target.engine_stats()["cuda_graphs"]
            batch = decode_rows(target, build(drafter, setup), requests(setup), refill=refill)
            assert [d.output_ids for d in batch.decoded] == setup["plain"], (rows, refill)
            assert graphs.captures == captured and graphs.replays > 0, (rows, refill)


def test_a_failed_rows_capture_runs_uncaptured_with_one_warning(setup):
    from fake_graphs import FakeGraphs

    from specbench.errors import SpecbenchWarning

    target = RowsHFTarget(setup["target"], 3, graphs=FakeGraphs(fail_on_capture=2))
    with pytest.warns(SpecbenchWarning, match="CUDA graph capture failed"):
        target.warm_up(200, 4)
    assert not target.engine_stats()["cuda_graphs"]
    batch = decode_rows(target, build("prompt-lookup", setup), requests(setup))
    assert [d.output_ids for d in batch.decoded] == setup["plain"]


# --- EAGLE: each draft pass over every live row (RowsDraftKV) ------------------------------------

def assert_rows_equal_alone(target, make, reqs, sizes=(3, 4), temperature=0.0):
    """Every row's output and steps at each B are the ones its sequence gets alone (a fresh drafter, B = 1)."""
    def generators():
        return [torch.Generator().manual_seed(i) for i in range(len(reqs))] if temperature else [None] * len(reqs)

    alone = [decode_rows(OneRow(target), make(), [Request(r.prompt_ids, r.max_new_tokens, g)], temperature).decoded[0]
             for r, g in zip(reqs, generators())]
    for rows in sizes:
        for refill in (True, False):
            batch = decode_rows(RowsHFTarget(target, rows), make(), [Request(r.prompt_ids, r.max_new_tokens, g)
                                                                      for r, g in zip(reqs, generators())], temperature, refill)
            assert [d.output_ids for d in batch.decoded] == [a.output_ids for a in alone], (rows, refill)
            for got, want in zip(batch.decoded, alone):
                assert [(s.tree_size, s.accepted) for s in got.steps] == [(s.tree_size, s.accepted) for s in want.steps], (rows, refill)
    return alone


def counting_rows(drafter, seen: list[int]):
    """Record how many rows each of the drafter's draft forwards serves (context_rows and nodes)."""
    net = drafter.net
    context_rows, nodes = net.context_rows, net.nodes
    net.context_rows = lambda tokens, features, kv, rows: seen.append(len(rows)) or context_rows(tokens, features, kv, rows)
    net.nodes = lambda *a, **k: seen.append(len(set((a[6] if len(a) > 6 else k.get("seq")).tolist()))
                                            if (a[6] if len(a) > 6 else k.get("seq")) is not None else 1) or nodes(*a, **k)
    return drafter


def test_eagle_static_tree_drafts_every_row_in_one_forward_per_level(setup, tmp_path):
    """EAGLE-1 on a 6-node tree of ranks at B = 3, 4: the catch-up of every live row in one forward and
    each level's nodes of every live row in one forward, and each row drafts and emits what it does alone."""
    from specbench.drafters.eagle.drafter import EagleDrafter

    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))
    seen: list[int] = []
    make = lambda: counting_rows(EagleDrafter.build(setup["target"], weights=str(setup["root"] / "eagle1"), tree=str(tree)), seen)  # noqa: E731
    alone = assert_rows_equal_alone(setup["target"], make, requests(setup))
    assert [a.output_ids for a in alone] == setup["plain"] and any(s.accepted for a in alone for s in a.steps)
    assert max(seen) == 4 and seen.count(4) > 10  # forwards over all four rows, many of them


def test_eagle_sampled_chain_per_row_equals_alone(setup):
    """At temperature > 0 an EAGLE chain samples each row's draft with the row's own generator, in the order it would alone."""
    from specbench.drafters.eagle.drafter import EagleDrafter

    make = lambda: EagleDrafter.build(setup["target"], weights=str(setup["root"] / "eagle1"), tree="chain:3")  # noqa: E731
    assert_rows_equal_alone(setup["target"], make, requests(setup), temperature=0.8)


eagle_setup = test_eagle.setup  # a 6-layer target, an EAGLE-3 checkpoint for it (a fixture)


def test_eagle3_dynamic_tree_drafts_every_row_in_one_forward_per_round(eagle_setup):
    """EAGLE-3 with EAGLE-2's dynamic tree at B = 3, 4: each round's frontier of every live row in one forward."""
    from specbench.drafters.eagle.drafter import Eagle3Drafter

    target = eagle_setup["t3"]
    target.eos_token_ids = set()
    reqs = [Request(p, n) for p, n in zip(prompts(6), [NEW, NEW - 5, NEW - 10, NEW, NEW - 5, NEW - 10])]
    seen: list[int] = []
    make = lambda: counting_rows(Eagle3Drafter.build(target, weights=str(eagle_setup["root"] / "eagle3")), seen)  # noqa: E731
    alone = assert_rows_equal_alone(target, make, reqs)
    plain = [decode(target, PlainDecoding(target), r.prompt_ids, r.max_new_tokens).output_ids for r in reqs]
    assert [a.output_ids for a in alone] == plain and any(s.accepted for a in alone for s in a.steps)
    assert max(seen) == 4
