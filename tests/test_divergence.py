"""Near-tie or divergence: where speculative output differs from plain decoding, the target's
top-2 at the first differing token tells rounding from a bug (specbench/engine/divergence.py)."""

import math

import pytest
import torch
from test_cli import run_cli
from test_report import info, steps_for
from tiny import save_tiny_model

from specbench.engine import kv
from specbench.engine.divergence import TIE_FACTOR, classify, compare_decodes, diagnose, rounding_eps
from specbench.engine.loop import Decoded, Top2, decode
from specbench.engine.protocol import Drafter, PlainDecoding
from specbench.engine.tree import DraftTree
from specbench.records import DIVERGENCE, NEAR_TIE, TurnRecord
from specbench.runner import Benchmark, RunConfig
from specbench.store import RunStore
from specbench.targets.hf import HFTarget

MAX_NEW = 20


class OracleTree(Drafter):
    """Proposes a 4-node tree whose right path is its second branch: root → [wrong, t1 → [wrong, t2]],
    t1 and t2 being a model's own greedy continuation. The accepted path is nodes [1, 3], so the
    rows that choose the emitted tokens (0, 2, 4) are not a prefix and commit must gather KV slots."""

    max_draft_tokens = 4

    def __init__(self, model) -> None:
        self.model = model

    def _next(self, tokens: torch.Tensor) -> int:
        return int(self.model(tokens[None]).logits[0, -1].argmax())

    def propose(self, ctx) -> DraftTree:
        t1 = self._next(ctx.tokens)
        t2 = self._next(torch.cat([ctx.tokens, torch.tensor([t1])]))
        vocab = self.model.config.vocab_size
        tokens = [(t1 + 1) % vocab, t1, (t2 + 1) % vocab, t2]
        return DraftTree(torch.tensor(tokens), torch.tensor([-1, -1, 1, 1]))


class NudgedTarget(HFTarget):
    """A target whose tree verification rounds differently from its one-token step: it raises
    token `nudge`'s logit by one fp32 ulp in every row of a forward that carries a draft."""

    nudge: int | None = None

    def verify(self, root, tree, taps=()):
        logits, hidden = super().verify(root, tree, taps)
        if self.nudge is not None and len(tree):
            logits[:, self.nudge] = torch.nextafter(logits[:, self.nudge], torch.tensor(math.inf))
        return logits, hidden


class ForgetfulTarget(HFTarget):
    """A planted bug: commit keeps the root and the first nodes in node order instead of the accepted path."""

    def commit(self, accepted_nodes):
        keep = list(range(len(accepted_nodes) + 1))
        kv.compact(self.cache, self.seq_len, keep)
        self.seq_len += len(keep)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("div") / "target", seed=0)


def bench_for(target) -> Benchmark:
    config = RunConfig(target="tiny", drafter="prompt-lookup", workload="builtin", limit=1,
                       max_new_tokens=MAX_NEW, dtype="float64", device="cpu", warmup=False)
    bench = Benchmark(config, target=target)
    bench.drafter = OracleTree(target.model)
    return bench


def turn0(bench, mode):
    _, turns = bench.measure_prompt(bench.prompts[0])
    return next(t for t in turns if t.turn == 0 and t.mode == mode)


def test_top2_rows_are_the_ones_that_chose_each_token(model_dir):
    """Per emitted token the loop keeps the top-2 of the row that chose it: a tree decode whose
    accepted rows are not a prefix gives plain decoding's top-2, token for token."""
    target = HFTarget.load(str(model_dir), torch.device("cpu"), torch.float64)
    prompt = torch.tensor(target.tokenizer.encode("user: tell me a story\nassistant: "))
    plain = decode(target, PlainDecoding(target), prompt, MAX_NEW)
    spec = decode(target, OracleTree(target.model), prompt, MAX_NEW)
    assert spec.output_ids == plain.output_ids and len(spec.steps) < len(plain.steps)
    assert len(spec.top2) == len(plain.top2) == len(plain.output_ids)
    for token, a, b in zip(plain.output_ids, plain.top2, spec.top2):
        assert a.chosen == b.chosen == token and a.runner_up == b.runner_up
        assert a.chosen_logit >= a.runner_up_logit
        for x, y in zip(a[2:5], b[2:5]):  # fp64 model, fp32 logits: equal to within an fp32 rounding
            assert x == pytest.approx(y, rel=1e-6)


def test_equal_outputs_record_nothing(model_dir):
    bench = bench_for(HFTarget.load(str(model_dir), torch.device("cpu"), torch.float64))
    record = turn0(bench, "spec")
    assert record.exact_match is True and record.first_divergence is None
    assert (record.divergence_kind, record.plain_top2, record.spec_top2, record.plain_margin, record.spec_margin,
            record.tie_tolerance) == (None,) * 6


def test_a_flipped_exact_tie_is_a_near_tie(model_dir):
    """Token b gets token a's LM-head row (an exact tie wherever a leads; argmax keeps the lower id a),
    and tree verification lifts b by one fp32 ulp, far below the tolerance: the speculative path
    takes b where plain decoding first takes a."""
    target = NudgedTarget.load(str(model_dir), torch.device("cpu"), torch.float64)
    bench = bench_for(target)
    plain = turn0(bench, "baseline").output_ids
    position = next(i for i in range(3, len(plain)) if plain[i] not in plain[1:i])  # a's first row after the prefill
    a = plain[position]
    b = next(t for t in range(target.vocab_size - 1, a, -1) if t not in plain and t not in target.eos_token_ids)
    with torch.no_grad():
        target.lm_head.weight[b] = target.lm_head.weight[a]
    target.nudge = b

    _, turns = bench.measure_prompt(bench.prompts[0])
    baseline, record = (next(t for t in turns if t.turn == 0 and t.mode == m) for m in ("baseline", "spec"))
    assert baseline.output_ids == plain  # the tie went to the lower id, as before the copy
    assert record.exact_match is False and record.first_divergence == position
    assert record.output_ids[position] == b
    assert record.divergence_kind == NEAR_TIE
    assert record.plain_top2 == [a, b] and record.spec_top2 == [b, a]
    assert record.plain_margin == 0.0
    assert 0 < record.spec_margin <= record.tie_tolerance / TIE_FACTOR  # one ulp ≤ eps·max|logit|


def test_a_wrong_kv_compaction_is_a_divergence(model_dir):
    bench = bench_for(ForgetfulTarget.load(str(model_dir), torch.device("cpu"), torch.float64))
    _, turns = bench.measure_prompt(bench.prompts[0])
    baseline, record = (next(t for t in turns if t.turn == 0 and t.mode == m) for m in ("baseline", "spec"))
    assert record.exact_match is False and record.first_divergence is not None
    assert record.divergence_kind == DIVERGENCE
    position = record.first_divergence
    assert record.plain_top2[0] == baseline.output_ids[position] and record.spec_top2[0] == record.output_ids[position]
    swapped = record.plain_top2 == record.spec_top2[::-1]
    assert not swapped or record.plain_margin + record.spec_margin > record.tie_tolerance


def top(chosen, runner_up, margin, scale=10.0, others=()):
    """A row whose two best are chosen and runner_up; `others`: further (token, logit) of its best."""
    return Top2(chosen, runner_up, 5.0 + margin, 5.0, scale, ((chosen, 5.0 + margin), (runner_up, 5.0), *others))


def test_a_tie_of_three_tokens_is_a_near_tie_and_a_far_third_token_is_not():
    """Plain's two best tie exactly (7, 9) and the speculative path takes a third token 8, a little
    below both on the plain row: a three-way near-tie, which the swapped-pair test alone would call
    a divergence. The same third token far below, or missing from plain's best, is a divergence."""
    eps = rounding_eps(torch.bfloat16, 576)
    tol = TIE_FACTOR * eps * 10.0
    spec = top(8, 7, 0.03, others=((9, 4.99),))
    near = top(7, 9, 0.0, others=((8, 5.0 - tol / 4),))
    assert classify(near, spec, eps) == NEAR_TIE
    found = diagnose(0, [near], [spec], eps)
    assert found.kind == NEAR_TIE and (found.plain_top2, found.spec_top2) == ([7, 9], [8, 7])
    assert (found.plain_margin, found.spec_margin) == pytest.approx((tol / 4, 0.03))  # pair margins: own token - other's
    far = top(7, 9, 0.0, others=((8, 5.0 - 2 * tol),))
    assert classify(far, spec, eps) == DIVERGENCE
    assert classify(top(7, 9, 0.0, others=((3, 4.9),)), spec, eps) == DIVERGENCE  # 8 not among plain's best


def test_later_turns_are_decoded_after_plain_decodings_answers_in_both_modes(model_dir):
    """After a flipped near-tie in turn 1 the two modes' answers differ; turn 2 of both modes still
    starts from the same history (plain decoding's answer), so their outputs stay comparable."""
    target = NudgedTarget.load(str(model_dir), torch.device("cpu"), torch.float64)
    bench = bench_for(target)
    assert len(bench.prompts[0].turns) == 2
    plain = turn0(bench, "baseline").output_ids
    position = next(i for i in range(3, len(plain)) if plain[i] not in plain[1:i])
    b = next(t for t in range(target.vocab_size - 1, plain[position], -1) if t not in plain and t not in target.eos_token_ids)
    with torch.no_grad():
        target.lm_head.weight[b] = target.lm_head.weight[plain[position]]
    target.nudge = b
    seen = []
    decode_turn = bench._decode
    bench._decode = lambda drafter, prompt, turn, answers: seen.append((turn, list(answers))) or decode_turn(drafter, prompt, turn, answers)
    _, turns = bench.measure_prompt(bench.prompts[0])
    first = {t.mode: t for t in turns if t.turn == 0}
    assert first["spec"].divergence_kind == NEAR_TIE and first["spec"].text != first["baseline"].text
    assert [a for turn, a in seen if turn == 1] == [[first["baseline"].text]] * 2
    second = {t.mode: t for t in turns if t.turn == 1}
    assert second["spec"].prompt_tokens == second["baseline"].prompt_tokens


@pytest.mark.parametrize("dtype, tie, not_tie", [
    # hidden 4096, max|logit| 10: tolerance = 16 · (eps + 64 · eps(fp32)) · 10
    (torch.float16, 0.15, 0.17),  # 16 · 9.84e-4 · 10 = 0.157
    (torch.bfloat16, 1.2, 1.3),  # 16 · 7.82e-3 · 10 = 1.251
    (torch.float32, 1.2e-3, 1.3e-3),  # 16 · 7.75e-6 · 10 = 1.24e-3: ~130x below fp16's
    (torch.float64, 1.8e-5, 2.0e-5),  # fp32 logits from fp64 sums: 16 · 1.19e-7 · 10 = 1.91e-5
])
def test_classification_rule(dtype, tie, not_tie):
    eps = rounding_eps(dtype, 4096)
    for total, kind in ((tie, NEAR_TIE), (not_tie, DIVERGENCE)):
        for share in (0.0, 0.5, 1.0):  # only the sum of the two margins counts
            assert classify(top(7, 9, total * share), top(9, 7, total * (1 - share)), eps) == kind
    # the same two tokens in the same order, or a third token: a divergence however small the margins
    assert classify(top(7, 9, 0.0), top(9, 8, 0.0), eps) == DIVERGENCE
    assert classify(top(7, 9, 0.0), top(8, 7, 0.0), eps) == DIVERGENCE


def test_fp32_tolerance_is_far_below_half_precision_and_tf32_counts_as_half():
    fp32, fp16 = rounding_eps(torch.float32, 4096), rounding_eps(torch.float16, 4096)
    assert 100 < fp16 / fp32 < 200
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert rounding_eps(torch.float32, 4096, torch.device("cuda")) == pytest.approx(fp16, rel=0.01)
        assert rounding_eps(torch.float32, 4096, torch.device("cpu")) == fp32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_an_output_that_ends_early_is_a_divergence():
    rows = [top(1, 2, 1.0)] * 3
    found = diagnose(3, rows + [top(4, 5, 0.0)], rows, rounding_eps(torch.float16, 64))
    assert (found.kind, found.plain_top2, found.spec_top2, found.tolerance) == (DIVERGENCE, [4, 5], None, None)


def spec_turn(pid, exact, **divergence):
    return TurnRecord(prompt_id=pid, turn=0, mode="spec", category="math", prompt_tokens=5, new_tokens=2, steps=1,
                      wall_ms=10.0, ttft_ms=1.0, output_ids=[1, 2], exact_match=exact,
                      first_divergence=None if exact else 1, **divergence)


DIVERGENCE_ROWS = [["p2", "0", "1", "near-tie", "7 > 9", "0", "9 > 7", "0.00195", "0.0316"],
                   ["p3", "0", "1", "divergence", "7 > 9", "1.5", "4 > 7", "2.25", "0.0316"]]


def divergence_rows(out):
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 10]


def test_run_and_report_show_the_counts_and_each_divergence(tmp_path, capsys, monkeypatch):
    from rich.console import Console

    import specbench.cli as cli

    monkeypatch.setattr(cli, "console", Console(width=250))
    store = RunStore.create(tmp_path / "r", info("r"))
    tie = dict(divergence_kind=NEAR_TIE, plain_top2=[7, 9], spec_top2=[9, 7], plain_margin=0.0, spec_margin=0.00195,
               tie_tolerance=0.0316)
    bug = dict(divergence_kind=DIVERGENCE, plain_top2=[7, 9], spec_top2=[4, 7], plain_margin=1.5, spec_margin=2.25,
               tie_tolerance=0.0316)
    turns = [spec_turn("p1", True), spec_turn("p2", False, **tie), spec_turn("p3", False, **bug)]
    base = [TurnRecord(**{**t.__dict__, "mode": "baseline", "exact_match": None, "first_divergence": None,
                          **dict.fromkeys(tie)}) for t in turns]
    for b, s in zip(base, turns):
        store.append_prompt(steps_for(s.prompt_id, [1]) + steps_for(s.prompt_id, [0, 0], "baseline"), [b, s])

    code, out, err = run_cli(["report", tmp_path], capsys, monkeypatch)
    assert code == 0, err
    row = next(line for line in out.splitlines() if "exact match" in line)
    assert row.split("│")[2].strip() == "33.3% (1 near-tie, 1 divergence)"
    assert divergence_rows(out) == DIVERGENCE_ROWS

    cli.show_run(store.directory, as_json=False)  # what `run` prints at its end
    out = capsys.readouterr().out
    assert "33.3% (1 near-tie, 1 divergence)" in out and divergence_rows(out) == DIVERGENCE_ROWS
    cli.show_run(store.directory, as_json=True)
    import json

    summary = json.loads(capsys.readouterr().out)
    assert (summary["near_ties"], summary["divergences"]) == (1, 1)
    assert summary["diverged"][0]["kind"] == NEAR_TIE and summary["diverged"][1]["spec_margin"] == 2.25


def test_compare_decodes_diagnoses_the_first_differing_token():
    """The one comparison of two decodes (runner.py, scripts/gpu_check.py): None when equal, else diagnose()
    at the first differing token, a shorter output differing where it ends."""
    def decoded(ids, rows):
        return Decoded(output_ids=ids, steps=[], wall_ms=1.0, ttft_ms=1.0, top2=rows)

    rows = [top(1, 2, 5.0), top(3, 4, 5.0), top(5, 6, 1e-6)]
    tied = [rows[0], rows[1], top(6, 5, 1e-6)]  # the other path took the runner-up at a near-tie
    eps = rounding_eps(torch.float32, 64)
    assert compare_decodes(decoded([1, 3, 5], rows), decoded([1, 3, 5], rows), eps) is None
    found = compare_decodes(decoded([1, 3, 5], rows), decoded([1, 3, 6], tied), eps)
    assert found == diagnose(2, rows, tied, eps) and found.position == 2 and found.kind == NEAR_TIE
    ended = compare_decodes(decoded([1, 3, 5], rows), decoded([1, 3], rows[:2]), eps)
    assert ended.position == 2 and ended.kind == DIVERGENCE
