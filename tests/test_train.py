"""`specbench train-data` and `specbench train` on tiny local models: the data, the
losses going down, the checkpoints loading through the drafters, and bad input."""

import json
import sys
from pathlib import Path

import pytest
import torch
from test_cli import run_cli
from tiny import char_tokenizer, save_tiny_model, tiny_llama

from specbench.cli import main
from specbench.drafters.draft_model import DraftModelDrafter
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.errors import SpecbenchWarning, UserError
from specbench.targets.hf import HFTarget
from specbench.targets.loading import load_causal_lm
from specbench.train.data import load_data
from specbench.workloads import load_workload


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target = save_tiny_model(root / "target", seed=0, layers=3)
    other = tiny_llama(1, vocab=120)  # same tokenizer file, another vocabulary size
    other.save_pretrained(root / "other")
    char_tokenizer().save_pretrained(root / "other")
    return {"root": root, "target": target, "other": root / "other"}


@pytest.fixture(scope="module")
def data(setup):
    """Self-distillation data from the tiny target on 12 pool prompts (hidden states cached)."""

    from specbench.train.data import make_data

    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name=str(setup["target"]), model_id=source.model_id)
    out = setup["root"] / "data"
    make_data(target, "pool-train", out, max_new_tokens=24, batch_size=4, limit=12, hidden_taps="eagle3")
    return out


@pytest.fixture(scope="module")
def heldout(setup, data):
    """The same target's answers to 6 pool-heldout prompts: data no recipe trains on."""
    from specbench.train.data import make_data

    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name=str(setup["target"]), model_id=source.model_id)
    out = setup["root"] / "heldout"
    make_data(target, "pool-heldout", out, max_new_tokens=24, batch_size=4, limit=6, hidden_taps="eagle3")
    return out


def test_prompt_pool_is_varied_and_heldout_is_disjoint():
    train, heldout = load_workload("pool-train"), load_workload("pool-heldout")
    assert len(train) >= 300 and len(heldout) >= 30
    categories = {p.category for p in train}
    assert categories == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert not {p.turns for p in train} & {p.turns for p in heldout}
    assert not {p.turns[0] for p in train + heldout} & {t for p in load_workload("builtin") for t in p.turns}
    assert len({p.category for p in train[:40]}) == 8  # --limit N takes a mix


def test_extra_pool_takes_no_heldout_prompt_nor_a_heldout_subject():
    heldout = {p.turns[0] for p in load_workload("pool-heldout")}
    extra = load_workload("pool-train-extra")
    taken = heldout | {p.turns[0] for p in load_workload("pool-train") + load_workload("builtin")}
    assert len(extra) >= 800 and not {p.turns[0] for p in extra} & taken
    # a held-out prompt's topic (the slot its template fills) appears in no extra prompt of its kind
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_prompt_pool", Path(__file__).parent.parent / "scripts" / "make_prompt_pool.py")
    pool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool)
    for topics, category in ((pool.STEM_TOPICS, "stem"), (pool.HUMANITIES_TOPICS, "humanities"), (pool.CODING_TASKS, "coding"),
                             (pool.WRITING_SUBJECTS, "writing")):
        held = {t for t in topics if any(t in text for text in heldout)}
        assert not [p for p in extra if p.category == category and any(t in p.turns[0] for t in held)]


def test_several_data_directories_train_as_one(setup, data, heldout):
    from specbench.train.data import load_data_dirs

    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name=str(setup["target"]), model_id=source.model_id)
    parts = [load_data(data, with_taps=True), load_data(heldout, with_taps=True)]
    joined = load_data_dirs(f"{data},{heldout}", target, with_taps=True)
    assert len(joined) == len(parts[0]) + len(parts[1])
    assert joined.meta["answer_tokens"] == parts[0].meta["answer_tokens"] + parts[1].meta["answer_tokens"]
    assert [p["directory"] for p in joined.meta["parts"]] == [str(data), str(heldout)]
    i = 0
    for part in parts:  # every sequence, its answer start, hidden states and taps read back as in its own directory
        for k in range(len(part)):
            ids, start = joined.sequence(i)
            want_ids, want_start = part.sequence(k)
            assert ids.tolist() == want_ids.tolist() and start == want_start
            assert torch.equal(joined.hidden_of(i), part.hidden_of(k))
            assert torch.equal(joined.taps_of(i, (0, 2)), part.taps_of(k, (0, 2)))
            i += 1
    other_model, other_tok, other_source = load_causal_lm(str(setup["other"]), torch.device("cpu"), torch.float64)
    other = HFTarget(other_model, other_tok, name=str(setup["other"]), model_id=other_source.model_id)
    with pytest.raises(UserError, match="regenerate it with `specbench train-data --target"):
        load_data_dirs(f"{data},{heldout}", other)


def test_train_data_writes_chat_answers_tokens_and_hidden(setup, data):
    meta = json.loads((data / "meta.json").read_text())
    assert meta["prompts"] == 12 and meta["sequences"] == 12 and meta["hidden"] == "float16"
    rows = [json.loads(line) for line in (data / "conversations.jsonl").read_text().splitlines()]
    assert [m["from"] for m in rows[0]["conversations"]] == ["human", "gpt"]
    # the conversations file is itself a workload (ShareGPT layout)
    assert [p.turns[0] for p in load_workload(str(data / "conversations.jsonl"))] == [r["conversations"][0]["value"] for r in rows]
    loaded = load_data(data)
    model, _, _ = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    for i in range(3):
        ids, start = loaded.sequence(i)
        assert 0 < start < len(ids) <= start + 24
        # the answer is the target's own greedy continuation of the prompt
        with torch.no_grad():
            greedy = model(input_ids=ids[None]).logits[0, start - 1 : -1].argmax(-1)
        assert greedy.tolist() == ids[start:].tolist()
        # the cached hidden states are the target's final normed states (last row unused)
        with torch.no_grad():
            reference = model.model(input_ids=ids[None]).last_hidden_state[0]
        torch.testing.assert_close(loaded.hidden_of(i)[:-1].double(), reference[:-1], atol=2e-2, rtol=1e-2)
    # --hidden-taps eagle3 on 3 layers: the states ENTERING layers 2, 1, 0 (HF's hidden_states[j]), same zero last row
    assert meta["taps"] == [2, 1, 0] and (data / "taps.safetensors").is_file()
    loaded = load_data(data, with_taps=True)
    for i in range(3):
        ids, _ = loaded.sequence(i)
        with torch.no_grad():
            states = model.model(input_ids=ids[None], output_hidden_states=True).hidden_states
        taps = loaded.taps_of(i, (0, 2))
        reference = torch.cat([states[0][0], states[2][0]], dim=-1)
        torch.testing.assert_close(taps[:-1].double(), reference[:-1], atol=2e-2, rtol=1e-2)
        assert not taps[-1].any()


def test_train_draft_model_loss_falls_and_checkpoint_drafts_losslessly(setup, data, capsys, monkeypatch):
    out = setup["root"] / "draft"
    args = ["train", "--drafter", "draft-model", "--target", setup["target"], "--data", data, "--out", out,
            "--steps", 40, "--batch-tokens", 48, "--lr", 3e-3, "--warmup-steps", 4, "--eval-every", 20, "--layers", 1, "--dtype", "float64",
            "--train-vocab", "seen"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "specbench_train.json").read_text())
    evals = log["evals"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[-1]["kl"] < evals[0]["kl"]  # held-out KL to the target falls
    first, last = log["history"][:5], log["history"][-5:]
    assert sum(r["kl"] for r in last) < sum(r["kl"] for r in first)
    assert len(evals[-1]["accept_per_position"]) == 4
    # the checkpoint is a plain model directory that draft-model loads by path
    model, tokenizer, _ = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name="tiny")
    drafter = DraftModelDrafter.build(target, draft_model=str(out), k=3)
    assert drafter.model.config.num_hidden_layers == 1
    torch.testing.assert_close(drafter.model.get_input_embeddings().weight, model.get_input_embeddings().weight)
    for prompt in load_workload("pool-heldout")[:3]:
        ids = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], add_generation_prompt=True, tokenize=True)["input_ids"])
        plain = decode(target, PlainDecoding(target), ids, 24).output_ids
        assert decode(target, drafter, ids, 24).output_ids == plain


def test_bad_input_is_one_clear_line(setup, data, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copytree(data, setup["root"] / "data-no-taps", ignore=shutil.ignore_patterns("taps.safetensors"), dirs_exist_ok=True)
    base = ["train", "--drafter", "draft-model", "--data", data, "--steps", 1]
    cases = [
        (base + ["--target", setup["other"], "--out", tmp_path / "a"], "regenerate it with `specbench train-data --target"),
        (base + ["--target", setup["target"], "--out", setup["root"] / "data"], "overlap"),  # --out is --data
        (base + ["--target", setup["target"], "--out", setup["root"] / "data-no-taps"], "exists and is not empty"),
        (["train", "--drafter", "draft-model", "--target", setup["target"], "--data", tmp_path, "--out", tmp_path / "b"], "is not a training data directory"),
        (["train", "--drafter", "prompt-lookup", "--target", setup["target"], "--data", data, "--out", tmp_path / "c"],
         "cannot train drafter 'prompt-lookup'"),
        (["train", "--drafter", "eagle3", "--target", setup["target"], "--data", setup["root"] / "data-no-taps", "--out", tmp_path / "h"],
         "regenerate it with `specbench train-data --hidden-taps eagle3`"),
        (["train", "--drafter", "eagle3", "--target", setup["target"], "--data", data, "--out", tmp_path / "i", "--draft-vocab", 10**6],
         "--draft-vocab must be between 1 and the target's"),
        (base + ["--target", setup["target"], "--out", tmp_path / "d", "--layers", 3], "--layers must be between 1 and 2"),
        (["train", "--drafter", "hydra", "--target", setup["target"], "--data", data, "--out", tmp_path / "g", "--hydra-layers", 0],
         "--hydra-layers must be at least 1"),
        (["train-data", "--target", setup["target"], "--limit", 0, "--out", tmp_path / "e"], "--limit must be at least 1"),
        (["train-data", "--target", setup["target"], "--out", data], "exists and is not empty"),
        (["train-data", "--target", setup["target"], "--workload", tmp_path / "none.jsonl", "--out", tmp_path / "f"], "does not exist"),
    ]
    for args, message in cases:
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "kind, extra",
    [("medusa", []), ("medusa", ["--tie-lm-head", "--train-vocab", "seen"]), ("hydra", ["--hydra-layers", 2, "--train-vocab", "seen"]),
     ("hydra", ["--tie-lm-head", "--hydra-layers", 1]), ("hydra-decoder", ["--tie-lm-head", "--decoder-layers", 1])],
)
def test_train_heads_loss_falls_and_checkpoint_loads_through_the_drafter(setup, data, kind, extra, tmp_path, capsys, monkeypatch):
    from specbench.drafters.registry import build_drafter

    out = tmp_path / kind
    args = ["train", "--drafter", kind, "--target", setup["target"], "--data", data, "--out", out, "--steps", 20,
            "--batch-tokens", 48, "--lr", 1e-2, "--warmup-steps", 3, "--eval-every", 10, "--num-heads", 3, "--dtype", "float64", *extra]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "specbench_train.json").read_text())
    first, last = log["history"][:5], log["history"][-5:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)  # training loss falls
    assert set(log["history"][0]) >= {"head0", "head1", "head2"}
    evals = log["evals"]
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert sum(evals[-1]["loss_per_head"]) < sum(evals[0]["loss_per_head"])  # held-out loss falls too
    assert len(evals[-1]["top1_per_head"]) == 3
    # published file names; the drafter loads the checkpoint the way it loads a published one
    files = {"medusa": "medusa_lm_head.pt", "hydra": "hydra_lm_head.pt", "hydra-decoder": "medusa_lm_head.pt"}[kind]
    assert {p.name for p in out.iterdir()} >= {"config.json", files}
    state = torch.load(out / files, weights_only=True)
    if kind == "medusa":
        assert ("2.1.weight" in state) == ("--tie-lm-head" not in extra) and "2.0.linear.weight" in state
    if kind == "hydra" and "--tie-lm-head" not in extra:
        assert {"hydra_mlp.2.1.linear.weight", "hydra_lm_head.2.1.bias", "prefix_embeding_layer.layers.0.self_attn.q_proj.weight", "input_embed_fn.weight"} <= set(state)
    if kind == "hydra" and "--tie-lm-head" in extra:  # the target's LM head and embeddings: neither is stored
        assert "hydra_mlp.2.1.res_connection.weight" in state and "prefix_embeding_layer.norm.weight" in state
        assert not any(k.startswith(("hydra_lm_head.", "input_embed_fn.", "hydra_mlp.0.3")) for k in state)
    if kind == "hydra-decoder":
        assert set(state) == {"medusa_head", "medusa_rms_norm", "medusa_decoder_layers"}
    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name="tiny", model_id=source.model_id)
    drafter = build_drafter(kind, target, {"heads": str(out), "tree": "chain:3"})
    for prompt in load_workload("pool-heldout")[:2]:
        ids = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], add_generation_prompt=True, tokenize=True)["input_ids"])
        assert decode(target, drafter, ids, 20).output_ids == decode(target, PlainDecoding(target), ids, 20).output_ids


def test_unrolled_draft_steps_are_the_drafters_true_path_nodes():
    """EagleNet.unrolled (EAGLE-3's training-time test, and the eagle recipes' held-out scoring)
    computes, for every context position at once, what the drafter computes online: the
    context through the draft's KV cache, then the nodes on the true path, each seeing the
    context and its ancestors. Both versions, a GQA draft, float64."""
    from specbench.drafters.eagle.model import EagleConfig, EagleNet
    from specbench.engine.kv import StaticKV

    torch.manual_seed(0)
    for version in (1, 3):
        config = EagleConfig(version=version, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                             vocab_size=50, draft_vocab_size=50, target_hidden_size=32, fc_bias=version == 1, rope_theta=500.0)
        net = EagleNet(config).double()
        for p in net.parameters():
            p.data.normal_(0, 0.3)
        net.set_head(net.lm_head if version == 3 else torch.nn.Linear(32, 50, bias=False).double(), None)
        n, steps = 11, 3
        tokens = torch.randint(0, 50, (n,))
        stream = torch.randn(n - 1, config.fc_in if version == 3 else 32, dtype=torch.float64) * 2
        unrolled = net.unrolled(tokens, stream, steps)
        assert [tuple(o.shape) for o in unrolled] == [(n - 1, 32)] * steps
        for i in range(n - 1 - steps):
            kv = StaticKV(config.num_layers)
            out = net.context(tokens[1 : i + 2], stream[: i + 1], kv)[-1:]  # context positions 0..i, as the catch-up runs them
            torch.testing.assert_close(unrolled[0][i : i + 1], out)
            own = None
            for s in range(1, steps):  # the depth-(s+1) node: token x_{i+1+s}, its parent's output, position i+s
                out, own = net.nodes(tokens[i + 1 + s : i + 2 + s], out, torch.tensor([i + s]), kv, torch.tensor([i + 1]), own)
                torch.testing.assert_close(unrolled[s][i : i + 1], out)


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_train_eagle_loss_falls_and_checkpoint_loads_strictly_and_drafts_losslessly(setup, data, heldout, kind, tmp_path, capsys, monkeypatch):
    """A few steps on the tiny target: the training loss and the loss on held-out data (other prompts,
    never trained on) fall; the checkpoint is in the published layout (no embedding: the target's; EAGLE-1: no LM head, fc with a bias; EAGLE-3: midlayer.*,
    d2t = the most frequent answer ids sorted ascending, as offsets, t2d marking them); the drafter
    loads it strictly and greedy output equals plain decoding on a static tree, a chain and the
    dynamic tree; simulate (from a log with the states the draft reads) scores every step exactly as
    the online run does."""
    from collections import Counter

    from safetensors.torch import load_file

    from specbench.drafters.eagle.layouts import EAGLE1, EAGLE3, build_net, read_checkpoint
    from specbench.drafters.registry import build_drafter

    out = tmp_path / kind
    vocab_size = 24
    args = ["train", "--drafter", kind, "--target", setup["target"], "--data", data, "--eval-data", heldout, "--out", out, "--steps", 16,
            "--batch-tokens", 64, "--lr", 1e-2, "--warmup-steps", 2, "--eval-every", 8, "--dtype", "float64",
            "--draft-vocab", vocab_size, "--ttt-steps", 3]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "specbench_train.json").read_text())
    first, last = log["history"][:4], log["history"][-4:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)  # training loss falls
    assert [e["step"] for e in log["evals"]] == [0, 8, 16] and log["evals"][-1]["loss"] < log["evals"][0]["loss"]  # held out
    assert log["evals"][-1]["positions"] > 0
    parts = {"eagle": {"regression", "token"}, "eagle3": {"step0", "step1", "step2"}}[kind]
    assert set(log["history"][0]) >= parts and len(log["evals"][-1]["chain_accept_per_depth"]) == 4
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "specbench_train.json", "specbench_manifest.json"}
    state = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert "embed_tokens.weight" not in state  # the target's embedding, not stored
    if kind == "eagle":
        assert config["bias"] is True and "fc.bias" in state and "lm_head.weight" not in state
        assert set(state) == {"fc.weight", "fc.bias", "layers.0.post_attention_layernorm.weight",
                              *(f"layers.0.self_attn.{w}_proj.weight" for w in "qkvo"),
                              *(f"layers.0.mlp.{w}_proj.weight" for w in ("gate", "up", "down"))}
    else:
        assert config["draft_vocab_size"] == vocab_size and "midlayer.hidden_norm.weight" in state and "fc.bias" not in state
        counts = Counter()  # --eval-data given: every sequence of --data trains, and its answer tokens are counted
        tokens = load_file(data / "tokens.safetensors")
        for a, b, start in zip(tokens["offsets"][:-1].tolist(), tokens["offsets"][1:].tolist(), tokens["starts"].tolist()):
            counts.update(tokens["ids"][start:b].tolist())
        assert len(counts) > vocab_size  # the choice is a real one
        chosen = sorted(sorted(counts, key=lambda t: (-counts[t], t))[:vocab_size])
        assert (torch.arange(vocab_size) + state["d2t"]).tolist() == chosen
        assert state["t2d"].nonzero().flatten().tolist() == chosen and state["d2t"].dtype == torch.int64
        assert log["draft_vocab"] == vocab_size and 0 < log["draft_vocab_coverage"] < 1
    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name="tiny", model_id=source.model_id)
    checkpoint = read_checkpoint(str(out))
    assert checkpoint.layout == (EAGLE1 if kind == "eagle" else EAGLE3)
    build_net(checkpoint, target)  # strict: every key the layout holds, nothing else
    for tree in ("mc_sim_7b_63_depth3", "chain:3", "dynamic"):
        drafter = build_drafter(kind, target, {"heads": str(out), "tree": tree, "total_tokens": 12, "depth": 3, "top_k": 3})
        for prompt in load_workload("pool-heldout")[:2]:
            ids = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], add_generation_prompt=True, tokenize=True)["input_ids"])
            assert decode(target, drafter, ids, 20).output_ids == decode(target, PlainDecoding(target), ids, 20).output_ids
    # simulate == online for the trained draft: a log of the target with the states the draft reads
    # (final states / the EAGLE-3 taps), every step's accepted length and tree, chain, static and dynamic tree
    from specbench.metrics import per_position, tau
    from specbench.runner import Benchmark, RunConfig
    from specbench.simulate.log import read_log
    from specbench.simulate.record import parse_hidden_taps, record
    from specbench.simulate.runner import SimulateConfig, Simulator
    from specbench.simulate.walk import Shape

    prompts = load_workload("pool-heldout")[:3]
    record(target, prompts, "pool-heldout", 20, tmp_path / "log.jsonl", hidden=kind == "eagle",
           hidden_layers=parse_hidden_taps("eagle3", target.num_layers) if kind == "eagle3" else ())
    options = {"heads": str(out)}
    shapes = [Shape.chain(3), Shape.from_spec("mc_sim_7b_63"), Shape.from_spec("dynamic")]
    simulation = Simulator(read_log(tmp_path / "log.jsonl"), SimulateConfig(kind, options, shapes, latency_steps=1), target).score()
    assert simulation.method == "teacher-forced" and simulation.hidden_source.startswith("log side file")
    deep = 0
    for result in simulation.results:
        config = RunConfig(target=str(setup["target"]), drafter=kind, drafter_options={**options, "tree": result.shape.spec},
                           workload="pool-heldout", limit=3, max_new_tokens=20, dtype="float64", device="cpu", baseline=False, warmup=False)
        bench = Benchmark(config, target=target)
        online = []
        for prompt in bench.prompts:
            steps, _ = bench.measure_prompt(prompt)
            online += [[s for s in steps if s.turn == t] for t in range(len(prompt.turns))]
        shape = lambda steps: [(s.tree_size, s.tree_depth, s.accepted) for s in steps]  # noqa: E731
        assert [shape(t) for t in result.steps] == [shape(t) for t in online], result.shape.name
        flat_sim, flat_online = [s for t in result.steps for s in t], [s for t in online for s in t]
        assert tau(flat_sim) == tau(flat_online) and per_position(flat_sim) == per_position(flat_online)
        deep = max(deep, *(s.accepted for s in flat_online))
    assert deep >= 2, "no step accepted two drafted tokens: deeper levels were not compared"
    if kind == "eagle3":  # bundled with --int8: matrices int8 + row scales, d2t/t2d kept exactly, loads and stays lossless
        from safetensors import safe_open

        from specbench.train.bundle import bundle_eagle

        bundled = bundle_eagle(out, "tiny-eagle3", dest=tmp_path / "bundled", int8=True)
        with safe_open(str(bundled / "model.safetensors"), "pt") as stored:
            assert stored.get_tensor("midlayer.self_attn.q_proj.weight").dtype == torch.int8
            assert torch.equal(stored.get_tensor("d2t"), state["d2t"]) and torch.equal(stored.get_tensor("t2d"), state["t2d"])
        drafter = build_drafter(kind, target, {"heads": str(bundled), "tree": "chain:3"})
        assert drafter.describe()["format"] == EAGLE3
        for prompt in load_workload("pool-heldout")[:2]:
            ids = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], add_generation_prompt=True, tokenize=True)["input_ids"])
            assert decode(target, drafter, ids, 20).output_ids == decode(target, PlainDecoding(target), ids, 20).output_ids


def test_old_train_spellings_work_for_one_release_with_a_line_each(setup, data, tmp_path, capsys, monkeypatch):
    """`train --heads N` (now --num-heads; `run --heads` is a checkpoint) and `--warmup N` (now --warmup-steps;
    `run --warmup` is a switch) still work, each with one deprecation line."""
    out = tmp_path / "medusa"
    args = ["train", "--drafter", "medusa", "--target", setup["target"], "--data", data, "--out", out, "--steps", 2,
            "--batch-tokens", 32, "--eval-every", 2, "--heads", 2, "--warmup", 1, "--dtype", "float64"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert [line for line in err.splitlines() if "deprecated" in line] == [
        "warning: train --heads is deprecated and goes in the next release: use --num-heads",
        "warning: train --warmup is deprecated and goes in the next release: use --warmup-steps",
    ]
    log = json.loads((out / "specbench_train.json").read_text())
    assert log["config"]["warmup_steps"] == 1 and log["config"]["options"]["num_heads"] == 2
    assert "1.0.linear.weight" in torch.load(out / "medusa_lm_head.pt", weights_only=True)


def test_bundled_draft_stores_only_trained_weights_and_rebuilds_from_the_target(setup, data, tmp_path, monkeypatch):
    """A bundle keeps the draft's layers (fp16) and takes the vocabulary tables from the base
    target at load: the rebuilt draft equals the trained one up to fp16 rounding."""
    from safetensors.torch import load_file

    from specbench.targets import loading
    from specbench.train.bundle import bundle_draft

    draft_dir = tmp_path / "draft"
    code = main_quiet(["train", "--drafter", "draft-model", "--target", setup["target"], "--data", data, "--out", draft_dir,
                       "--steps", 2, "--batch-tokens", 32, "--eval-every", 2], monkeypatch)
    assert code == 0
    out = bundle_draft(draft_dir, "tiny-draft", str(setup["target"]), dest=tmp_path / "bundled")
    stored = load_file(out / "weights.safetensors")
    assert not any("embed_tokens" in k or k.startswith("lm_head") for k in stored)
    assert all(v.dtype == torch.float16 for v in stored.values())
    monkeypatch.setattr(loading, "bundled_dir", lambda name: tmp_path / "bundled" / name)
    monkeypatch.setenv("SPECBENCH_CACHE", str(tmp_path / "cache"))
    source = loading.ModelSource("tiny-draft", "specbench/bundled/tiny-draft", bundled={"bundled": "tiny-draft"})
    rebuilt = load_causal_lm(loading._location(source), torch.device("cpu"), torch.float32)[0]
    trained = load_causal_lm(str(draft_dir), torch.device("cpu"), torch.float32)[0]
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, atol=2e-3, rtol=2e-3)


def test_int8_bundled_heads_load_in_the_published_layout_and_stay_lossless(setup, data, tmp_path, monkeypatch):
    """Heads bundled with --int8: every matrix comes back within half a quantisation step of
    the trained one (per row), the drafter loads them like any Hydra checkpoint, and
    speculative decoding with them still equals plain decoding."""
    from safetensors import safe_open

    from specbench.drafters.checkpoints import read_tensors
    from specbench.drafters.registry import build_drafter
    from specbench.errors import UserError
    from specbench.train.bundle import bundle_heads

    trained_dir = tmp_path / "hydra"
    code = main_quiet(["train", "--drafter", "hydra", "--target", setup["target"], "--data", data, "--out", trained_dir, "--num-heads", 3,
                       "--hydra-layers", 1, "--tie-lm-head", "--steps", 4, "--batch-tokens", 48, "--lr", 1e-2, "--eval-every", 4], monkeypatch)
    assert code == 0
    out = bundle_heads(trained_dir, "tiny-hydra", dest=tmp_path / "bundled", int8=True)
    nested = tmp_path / "decoder"  # hydra-decoder's file nests module states: refused in one line
    nested.mkdir()
    torch.save({"medusa_head": {"0.0.linear.weight": torch.zeros(2, 2)}}, nested / "medusa_lm_head.pt")
    (nested / "config.json").write_text("{}")
    with pytest.raises(UserError, match="nests modules"):
        bundle_heads(nested, "tiny-decoder", dest=tmp_path / "bundled", int8=True)
    assert {p.name for p in out.iterdir()} == {"config.json", "hydra_lm_head.safetensors", "bundle.json"}
    with safe_open(str(out / "hydra_lm_head.safetensors"), "pt") as stored:
        assert stored.get_tensor("hydra_mlp.1.1.linear.weight").dtype == torch.int8
        assert stored.get_tensor("hydra_mlp.1.1.linear.bias").dtype == torch.bfloat16
    trained = torch.load(trained_dir / "hydra_lm_head.pt", weights_only=True)
    rebuilt = read_tensors(out / "hydra_lm_head.safetensors")
    assert set(rebuilt) == set(trained)
    for key, value in trained.items():
        step = value.abs().amax(dim=-1, keepdim=True) / 127 if value.ndim == 2 else value.abs().max() / 128  # int8 step / bf16 rounding
        assert ((rebuilt[key].float() - value.float()).abs() <= step / 2 + value.abs() / 128 + 1e-8).all(), key
    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name="tiny", model_id=source.model_id)
    drafter = build_drafter("hydra", target, {"heads": str(out), "tree": "mc_sim_7b_63_depth3"})
    assert drafter.describe()["own_lm_head"] is False
    for prompt in load_workload("pool-heldout")[:2]:
        ids = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], add_generation_prompt=True, tokenize=True)["input_ids"])
        assert decode(target, drafter, ids, 20).output_ids == decode(target, PlainDecoding(target), ids, 20).output_ids


def main_quiet(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["specbench", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_bundled_drafters_are_registered_and_small():
    from specbench.bundled import bundled_dir
    from specbench.catalogue import catalogue
    from specbench.drafters.draft_model import default_draft_model

    assert default_draft_model("smollm2-135m") == "smollm2-135m-draft"
    assert catalogue("heads")["medusa"]["smollm2-135m"]["heads"] == "bundled:smollm2-135m-medusa"
    assert catalogue("heads")["hydra"]["smollm2-135m"]["heads"] == "bundled:smollm2-135m-hydra"
    total = sum(f.stat().st_size for f in bundled_dir(".").rglob("*") if f.is_file() and f.suffix != ".pyc")
    assert total <= 20 * 10**6  # the budget for everything bundled
    state = torch.load(bundled_dir("smollm2-135m-medusa") / "medusa_lm_head.pt", weights_only=True)
    assert sorted(state) == sorted(f"{h}.0.linear.{w}" for h in range(4) for w in ("weight", "bias"))  # tied: no LM heads
    from specbench.drafters.checkpoints import read_tensors

    hydra = read_tensors(bundled_dir("smollm2-135m-hydra") / "hydra_lm_head.safetensors")  # int8 storage, rebuilt in bf16
    assert all(v.dtype == torch.bfloat16 for v in hydra.values())
    assert "prefix_embeding_layer.layers.0.mlp.down_proj.weight" in hydra and "hydra_mlp.2.1.res_connection.weight" in hydra
    assert not any(k.startswith(("hydra_lm_head.", "input_embed_fn.")) for k in hydra)  # tied to the target's tables


# --- a plugin drafter declares its own recipe, found through its entry point --------------------

CALLS: list = []


def fake_recipe(config, target, overwrite=False, on_step=None) -> dict:
    CALLS.append((config.drafter, config.lr, dict(config.options), target.name))
    return {}


def test_a_drafter_declares_its_recipe_and_train_finds_it(setup, tmp_path, monkeypatch):
    from dataclasses import dataclass as plain

    from specbench.drafters import registry
    from specbench.engine.options import ChainOptions, CommandConfig, option
    from specbench.engine.protocol import Drafter, TrainRecipe
    from specbench.train.common import TrainConfig
    from specbench.train.recipes import train

    @plain
    class FakeTraining(CommandConfig):
        rounds: int = option(2, "rounds", min=1)
        width: int = option(8, "width", min=1)

    class Trainable(Drafter):
        name = "test-trainable"
        Options = ChainOptions
        recipe = TrainRecipe("test_train:fake_recipe", 0.25, FakeTraining)

    @plain
    class Entry:
        cls: type
        value: str = "tests:Trainable"

        def load(self):
            return self.cls

    installed = {**registry.installed_drafters(), "test-trainable": Entry(Trainable)}
    monkeypatch.setattr(registry, "installed_drafters", lambda: installed)
    config = TrainConfig("test-trainable", str(tmp_path), str(tmp_path / "out"), target=str(setup["target"]))
    train(config, {"rounds": 3}, device="cpu")
    assert CALLS == [("test-trainable", 0.25, {"rounds": 3, "width": 8}, str(setup["target"]))]  # its rate, its options
    with pytest.raises(UserError, match="--rounds must be at least 1"):
        train(config, {"rounds": 0}, device="cpu")
    with pytest.warns(SpecbenchWarning, match="train --drafter test-trainable ignores --num-heads .* its own: --rounds, --width"):
        train(TrainConfig("test-trainable", str(tmp_path), str(tmp_path / "out3"), target=str(setup["target"])), {"num_heads": 2},
              device="cpu")
    assert CALLS[-1][2] == {"rounds": 2, "width": 8}
    with pytest.raises(UserError, match="cannot train drafter 'prompt-lookup': trainable drafters are .*test-trainable"):
        train(TrainConfig("prompt-lookup", str(tmp_path), str(tmp_path / "out2"), target=str(setup["target"])), device="cpu")


# --- a checkpoint directory is one unit -------------------------------------------------------------

def test_a_checkpoint_half_written_changed_or_mixed_with_an_earlier_one_is_refused(setup, data, tmp_path, capsys, monkeypatch):
    from specbench.drafters.registry import build_drafter
    from specbench.train import heads

    out = tmp_path / "ckpt"
    args = ["--target", setup["target"], "--data", data, "--out", out, "--steps", 2, "--batch-tokens", 48, "--num-heads", 2,
            "--dtype", "float64"]
    model, tokenizer, source = load_causal_lm(str(setup["target"]), torch.device("cpu"), torch.float64)
    target = HFTarget(model, tokenizer, name="tiny", model_id=source.model_id)

    def load(kind):
        return build_drafter(kind, target, {"heads": str(out), "tree": "chain:2"})

    code, _, err = run_cli(["train", "--drafter", "medusa", *args], capsys, monkeypatch)
    assert code == 0, err
    manifest = json.loads((out / "specbench_manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "medusa_lm_head.pt", "specbench_train.json"}
    assert not (out / ".specbench-writing").exists()
    load("medusa")

    # killed between its two saves (config.json written, the weights not): the directory is refused, never loaded
    save = heads.MedusaRecipe.save

    def killed(recipe, where):
        (where / "config.json").write_text(json.dumps({**recipe.config(), "medusa_num_heads": 3}))
        raise KeyboardInterrupt
    monkeypatch.setattr(heads.MedusaRecipe, "save", killed)
    code, _, err = run_cli(["train", "--drafter", "medusa", *args, "--overwrite"], capsys, monkeypatch)
    monkeypatch.setattr(heads.MedusaRecipe, "save", save)
    assert code != 0 and "Traceback" not in err
    with pytest.raises(UserError, match=r"ckpt is half written \(generation [0-9a-f]+ was interrupted or failed\); train it again"):
        load("medusa")

    # trained again as hydra over it: the earlier medusa file is gone, not left for a loader to pick
    code, _, err = run_cli(["train", "--drafter", "hydra", *args, "--hydra-layers", 1, "--overwrite"], capsys, monkeypatch)
    assert code == 0, err
    assert not (out / "medusa_lm_head.pt").exists() and not (out / ".specbench-writing").exists()
    load("hydra")
    weights = (out / "hydra_lm_head.pt").read_bytes()
    (out / "hydra_lm_head.pt").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # one bit changed
    with pytest.raises(UserError, match="hydra_lm_head.pt is not the file written with the rest"):
        load("hydra")
    (out / "hydra_lm_head.pt").write_bytes(weights)
    (out / "medusa_lm_head.pt").write_bytes(weights)  # another checkpoint's file dropped in
    with pytest.raises(UserError, match="medusa_lm_head.pt is not part of it .* remove it"):
        load("medusa")
    (out / "medusa_lm_head.pt").unlink()

    # an --overwrite that fails before writing anything leaves the checkpoint there whole
    code, _, err = run_cli(["train", "--drafter", "hydra-decoder", *args, "--decoder-layers", 99, "--overwrite"], capsys, monkeypatch)
    assert code == 2 and "--decoder-layers" in err, err
    load("hydra")


def test_max_minutes_ends_training_early_on_a_cosine_run_by_the_clock(monkeypatch):
    """--max-minutes: the loop stops after the first step that ends past the budget, evaluates
    once more and says so in the log; the cosine follows the share of the budget spent (it is
    ahead of the 100 steps' share here), so the last step runs at the floor. Without a budget
    every step runs on the steps' cosine."""
    import math
    from types import SimpleNamespace

    from specbench.train import common

    clock = {"t": 0.0}
    monkeypatch.setattr(common, "time", SimpleNamespace(monotonic=lambda: clock["t"], time=common.time.time))
    weight = torch.nn.Parameter(torch.ones(3))

    def step_loss(batch):
        clock["t"] += 15.0  # each step takes a quarter of a one-minute budget
        return (weight ** 2).sum(), {}

    def run(max_minutes):
        config = common.TrainConfig(drafter="draft-model", data="d", out="o", steps=100, lr=1.0, warmup_steps=0, min_lr_ratio=0.1,
                                    eval_every=1000, max_minutes=max_minutes)
        log = common.TrainLog(config)
        evals = iter(range(1000))
        common.train_loop(config, [weight], step_loss, lambda: {"n": next(evals)}, iter(lambda: [0], None), log)
        return log

    log = run(1.0)
    cosine = lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    assert [r["step"] for r in log.history] == [1, 2, 3, 4]
    assert [r["lr"] for r in log.history] == pytest.approx([cosine(0.25), cosine(0.5), cosine(0.75), 0.1])
    assert [e["step"] for e in log.evals] == [0, 4]
    assert log.stopped == {"reason": "--max-minutes", "max_minutes": 1.0, "steps": 4, "minutes": 1.0}
    clock["t"] = 0.0
    log = run(None)
    assert len(log.history) == 100 and log.stopped is None and [e["step"] for e in log.evals] == [0, 100]
    assert log.history[49]["lr"] == pytest.approx(cosine(0.5))


def test_max_minutes_writes_the_checkpoint_and_logs_where_it_stopped(setup, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "draft"
    args = ["train", "--drafter", "draft-model", "--target", setup["target"], "--data", data, "--out", out, "--steps", 50,
            "--max-minutes", 1e-6, "--batch-tokens", 48, "--layers", 1, "--dtype", "float64"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "specbench_train.json").read_text())
    assert len(log["history"]) == 1 and log["stopped"]["steps"] == 1 and log["config"]["max_minutes"] == 1e-6
    assert [e["step"] for e in log["evals"]] == [0, 1] and (out / "config.json").exists()
    bad = ["train", "--drafter", "draft-model", "--target", setup["target"], "--data", data, "--out", tmp_path / "z", "--max-minutes", 0]
    code, _, err = run_cli(bad, capsys, monkeypatch)
    assert code == 2 and "--max-minutes" in err and len(err.strip().splitlines()) == 1, err
