"""`--drafter dflash`: the three published layouts read strictly, the network against an
independent reference forward, lossless greedy decoding (chain, shortened block, best-first
tree, tree of ranks), the draft's context holding committed positions only, speculative
sampling emitting the target's distribution, and simulate == online step by step."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from dflash_layouts import MASK, write_assistant, write_dflash2, write_v1
from safetensors.torch import load_file, save_file
from test_cli import run_cli
from test_sampling import exact_joint_of_second_and_third
from test_simulate import online_steps as simulate_online_steps
from test_simulate import shape_of
from tiny import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from specbench.drafters.dflash import layouts
from specbench.drafters.dflash.drafter import DFlashDrafter, DFlashOptions
from specbench.drafters.dflash.model import DFlashConfig, DFlashNet
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.errors import SpecbenchWarning, UserError
from specbench.metrics import per_position, tau
from specbench.runner import Benchmark, RunConfig
from specbench.simulate.log import read_log
from specbench.simulate.record import parse_hidden_taps, record
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.walk import Shape
from specbench.targets.hf import HFTarget
from specbench.workloads import encode_turn, load_workload

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MAX_NEW = 24
WORKLOAD = "builtin"
LIMIT = 2
LAYER_IDS = [1, 2, 3]  # z-lab's tap rule for 3 taps over 6 layers
LAYER_NOISE = 0.04  # std of the target layers' output projections: how often it leaves sigma
WRITERS = {"dflash": write_v1, "dflash2": write_dflash2, "muse-glimmer-assistant": write_assistant}


def sigma(vocab: int) -> list[int]:
    """The target's next-token map: 3-cycles over ids 3.. (3 -> 4 -> 5 -> 3, ...); the rest go to 3."""
    out = [3] * vocab
    for y in range(3, 3 + 3 * ((vocab - 3) // 3)):
        out[y] = 3 + 3 * ((y - 3) // 3) + (y - 3 + 1) % 3
    return out


def save_target(directory: Path, seed: int = 0, layer_noise: float = LAYER_NOISE) -> Path:
    """A tiny 6-layer Llama with the char tokenizer whose next token is sigma(current token) up to
    the noise its layers add: unit-RMS embeddings with a constant dimension 0 (no layer writes it),
    an LM head whose row sigma(x) is x's embedding."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        table = model.model.embed_tokens.weight
        table.copy_(table / table.pow(2).mean(-1, keepdim=True).sqrt())
        table[:, 0] = 3.0
        for layer in model.model.layers:
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                w.mul_(layer_noise / 0.3)
                w[0] = 0
        head = model.lm_head.weight
        head.normal_(0, 0.1)
        for x, y in enumerate(sigma(len(tokenizer))):
            if x >= 3:
                head[y] = 3 * table[x]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash")
    save_target(root / "target")
    target = HFTarget.load(str(root / "target"), torch.device("cpu"), torch.float64)
    stored = {layout: writer(root / layout, target, LAYER_IDS) for layout, writer in WRITERS.items()}
    prompts = load_workload(WORKLOAD)[:LIMIT]
    record(target, prompts, WORKLOAD, MAX_NEW, root / "log.jsonl", hidden_layers=parse_hidden_taps("dflash", target.num_layers))
    return {"root": root, "target": target, "stored": stored, "log": read_log(root / "log.jsonl")}


def build(setup, layout, **options) -> DFlashDrafter:
    return DFlashDrafter.build(setup["target"], weights=str(setup["root"] / layout), **options)


def chat_prompts(n: int = LIMIT) -> list[torch.Tensor]:
    return [torch.tensor(encode_turn(char_tokenizer(), p, 0, [])) for p in load_workload(WORKLOAD)[:n]]


# --- loading: the three published layouts, strictly ----------------------------------------------

def test_tap_rule_reproduces_the_published_lists():
    assert layouts.tap_rule(36) == [1, 9, 17, 25, 33]  # Qwen3-4B/8B drafts
    assert layouts.tap_rule(52) == [1, 13, 25, 37, 49]  # Muse Glimmer
    assert layouts.tap_rule(64) == [1, 16, 31, 46, 61]
    assert layouts.tap_rule(48, 8) == [1, 7, 14, 20, 26, 32, 39, 45]
    assert layouts.tap_rule(30) == [1, 8, 14, 20, 27]  # SmolLM2-135M (7.5 -> 8, 20.5 -> 20)
    assert layouts.tap_rule(6, 3) == LAYER_IDS
    # record --hidden-taps dflash: the inputs of the next layers (HF hidden_states[k + 1])
    assert parse_hidden_taps("dflash", 30) == (2, 9, 15, 21, 28)


@pytest.mark.parametrize("layout", list(WRITERS))
def test_layouts_load_key_by_key(setup, layout):
    drafter = build(setup, layout)
    net, target = drafter.net, setup["target"]
    info = drafter.describe()
    assert info["format"] == layout and info["stored_dtype"] == "bfloat16" and info["block_size"] == 8
    assert drafter.taps == (2, 3, 4) and info["mask_token_id"] == MASK and drafter.k == 7
    # causal only where a config says so: DFlash2 says is_causal false; the assistant's sliding layers stay bidirectional
    assert net.config.causal == (False, False)
    assert net.config.sliding_window == ((None, None) if layout == "dflash" else (2048, 2048))
    assert net.config.dflash2 == (layout == "dflash2")
    if layout == "dflash2":
        assert (net.config.output_multiplier, net.config.final_logit_softcapping, net.config.selector_top_k) == (0.75, 20.0, 6)
    # every stored tensor, by its canonical name, as stored (bf16) in the target's dtype
    state = net.state_dict()
    assert set(state) == set(setup["stored"][layout])
    for key, value in setup["stored"][layout].items():
        torch.testing.assert_close(state[key], value.to(torch.bfloat16).double(), rtol=0, atol=0)
    # the target's embedding and LM head, shared (the very modules), not copied into the draft
    assert not any("embed" in k or "lm_head" in k for k in state)
    assert net._target[0] is target.input_embeddings and net._target[1] is target.lm_head


def test_dflash_config_wins_over_top_level(setup, tmp_path):
    directory = tmp_path / "both"
    shutil.copytree(setup["root"] / "dflash", directory)
    config = json.loads((directory / "config.json").read_text())
    config["dflash_config"]["block_size"] = 5  # top level still says 8
    config["is_causal"] = True
    (directory / "config.json").write_text(json.dumps(config))
    drafter = DFlashDrafter.build(setup["target"], weights=str(directory))
    assert drafter.k == 4 and drafter.net.config.causal == (True, True)
    assert drafter.describe()["causal_from"] == "config is_causal"


def plant(source: Path, directory: Path, change) -> Path:
    shutil.copytree(source, directory)
    file = directory / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(file))
    change(state)
    save_file(state, str(file), metadata=metadata)
    return directory


def _drop(key):
    return lambda s: s.pop(key)


def _add(key):
    return lambda s: s.__setitem__(key, torch.zeros(3, dtype=torch.bfloat16))


def _reshape(key):
    return lambda s: s.__setitem__(key, s[key][:-1].clone())


@pytest.mark.parametrize("layout, change, message", [
    ("dflash", _drop("layers.1.self_attn.q_norm.weight"), "missing key 'layers.1.self_attn.q_norm.weight' for a dflash checkpoint"),
    ("dflash", _add("lm_head.weight"), "unexpected key 'lm_head.weight' for a dflash checkpoint"),
    ("dflash", _reshape("fc.weight"), "'fc.weight' has shape (47, 144), its config.json and the target imply (48, 144)"),
    ("dflash2", _drop("candidate_selector.successor_codebook"), "missing key 'candidate_selector.successor_codebook' for a dflash2"),
    ("dflash2", _add("candidate_selector.successor_codebook.weight"), "unexpected key 'candidate_selector.successor_codebook.weight'"),
    ("dflash2", _reshape("layers.0.mlp_conv.kernel_projection.weight"),
     "'layers.0.mlp_conv.kernel_projection.weight' has shape (47, 48), its config.json and the target imply (48, 48)"),
    ("muse-glimmer-assistant", _drop("encoder.output_norm_enc.weight"),
     "missing key 'encoder.output_norm_enc.weight' for a muse-glimmer-assistant checkpoint"),
    ("muse-glimmer-assistant", _add("hidden_norm.weight"), "unexpected key 'hidden_norm.weight'"),
    ("muse-glimmer-assistant", _reshape("encoder.fc.weight"), "'encoder.fc.weight' has shape (47, 144)"),
])
def test_loading_is_strict_one_line(setup, tmp_path, layout, change, message):
    directory = plant(setup["root"] / layout, tmp_path / "bad", change)
    with pytest.raises(UserError) as info:
        DFlashDrafter.build(setup["target"], weights=str(directory))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_misfits_are_one_line(setup, tmp_path):
    target = setup["target"]
    directory = tmp_path / "k"
    shutil.copytree(setup["root"] / "dflash", directory)
    with pytest.raises(UserError, match="trained on blocks of 8 .* asks for 9: use at most 7"):
        DFlashDrafter.build(target, weights=str(directory), k=9)
    with pytest.raises(UserError, match="both set the block"):
        DFlashDrafter.build(target, weights=str(directory), k=3, tree="chain:4")
    config = json.loads((directory / "config.json").read_text())
    config["num_target_layers"] = 36
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trained on a target of 36 layers"):
        DFlashDrafter.build(target, weights=str(directory))
    del config["dflash_config"]["target_layer_ids"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="lacks target_layer_ids"):
        DFlashDrafter.build(target, weights=str(directory))


# --- the network against an independent, dense reference forward ------------------------------------

def rms(x, w, eps):
    return x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt() * w


def rope(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = d // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def conv(x, base, dyn, group):
    """y_t = sum_o (base[o] + dyn_t[o, channel // group]) x_{t-o}, zeros before the block."""
    T, H = x.shape
    out = torch.zeros_like(x)
    for t in range(T):
        for o in range(base.shape[0]):
            if t - o >= 0:
                out[t] += (base[o] + dyn[t, o].repeat_interleave(group)) * x[t - o]
    return out


def reference_block(state, c: DFlashConfig, features, block_emb, start):
    """z-lab's forward written plainly: keys/values over [context ; block], positions 0..start+b-1."""
    ctx = rms(features @ state["fc.weight"].T, state["hidden_norm.weight"], c.rms_norm_eps)
    x = block_emb
    b = x.shape[0]
    positions = torch.arange(start + b)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        w = lambda name: state[p + name]  # noqa: E731
        h = rms(x, w("input_layernorm.weight"), c.rms_norm_eps)
        if c.dflash2:
            dyn = (h @ w("attention_conv.kernel_projection.weight").T).view(b, 2, 2, -1)
            h = conv(h, w("attention_conv.base_kernel")[0], dyn[:, 0], c.conv_group_size)
        q = rms((h @ w("self_attn.q_proj.weight").T).view(b, c.num_heads, -1), w("self_attn.q_norm.weight"), c.rms_norm_eps)
        both = torch.cat([ctx, h])
        k = rms((both @ w("self_attn.k_proj.weight").T).view(start + b, c.num_kv_heads, -1), w("self_attn.k_norm.weight"), c.rms_norm_eps)
        v = (both @ w("self_attn.v_proj.weight").T).view(start + b, c.num_kv_heads, -1)
        q, k = rope(q, positions[start:], c.rope_theta), rope(k, positions, c.rope_theta)
        g = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / c.head_dim ** 0.5
        qpos, kpos = positions[start:, None], positions[None]
        allowed = torch.ones(b, start + b, dtype=torch.bool)
        if c.causal[i]:
            allowed &= kpos <= qpos
        if c.sliding_window[i] is not None:
            allowed &= (qpos - kpos).abs() < c.sliding_window[i] if not c.causal[i] else qpos - kpos < c.sliding_window[i]
        out = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v).reshape(b, -1)
        out = out @ w("self_attn.o_proj.weight").T
        if c.dflash2:
            out = conv(out, w("attention_conv.base_kernel")[1], dyn[:, 1], c.conv_group_size)
        x = x + out
        h = rms(x, w("post_attention_layernorm.weight"), c.rms_norm_eps)
        if c.dflash2:
            dyn = (h @ w("mlp_conv.kernel_projection.weight").T).view(b, 2, 2, -1)
            h = conv(h, w("mlp_conv.base_kernel")[0], dyn[:, 0], c.conv_group_size)
        h = (torch.nn.functional.silu(h @ w("mlp.gate_proj.weight").T) * (h @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
        if c.dflash2:
            h = conv(h, w("mlp_conv.base_kernel")[1], dyn[:, 1], c.conv_group_size)
        x = x + h
    return rms(x, state["norm.weight"], c.rms_norm_eps)


@pytest.mark.parametrize("layout, causal, window", [("dflash", False, None), ("dflash2", False, None), ("dflash2", True, 3),
                                                     ("muse-glimmer-assistant", False, 4)])
def test_network_equals_the_reference_forward(setup, layout, causal, window):
    """The block's outputs equal z-lab's forward written plainly, for the bidirectional block, a
    causal one and sliding windows (context and block), DFlash2's convolutions included."""
    import dataclasses

    net = build(setup, layout).net
    c = net.config = dataclasses.replace(net.config, causal=(causal,) * 2, sliding_window=(window,) * 2)
    g = torch.Generator().manual_seed(3)
    start = 9
    features = torch.randn(start, 3 * 48, generator=g, dtype=torch.float64)
    ids = torch.tensor([[11, MASK, MASK, MASK, MASK]])
    context = net.context_kv(features, torch.arange(start))
    # the cache holds more positions than the block may see: visible cuts them
    extra = net.context_kv(torch.randn(start + 3, 3 * 48, generator=g, dtype=torch.float64), torch.arange(start + 3))
    padded = [(torch.cat([k, ek[start:]]), torch.cat([v, ev[start:]])) for (k, v), (ek, ev) in zip(context, extra)]
    ours = net.block(ids, torch.tensor([start]), padded, torch.tensor([start]))[0]
    state = {k: v.double() for k, v in net.state_dict().items()}
    emb = setup["target"].input_embeddings.weight[ids[0]].double()
    torch.testing.assert_close(ours, reference_block(state, c, features, emb, start))


# --- greedy decoding is lossless: each layout, chain, shortened block, best-first tree, tree of ranks --

@pytest.mark.parametrize("options", [{}, {"k": 3}, {"tree": "dynamic", "total_tokens": 12, "top_k": 3}, {"tree": "RANKS"}])
@pytest.mark.parametrize("layout", list(WRITERS))
def test_greedy_equals_plain(setup, layout, options, tmp_path):
    target = setup["target"]
    if options.get("tree") == "RANKS":
        (tmp_path / "tree.json").write_text(json.dumps([[0], [1], [0, 0], [1, 0], [0, 1], [0, 0, 0]]))
        options = {"tree": str(tmp_path / "tree.json")}
    drafter = build(setup, layout, **options)
    accepted, sizes = 0, set()
    for prompt in chat_prompts():
        plain = decode(target, PlainDecoding(target), prompt, MAX_NEW).output_ids
        result = decode(target, drafter, prompt, MAX_NEW)
        assert result.output_ids == plain
        accepted += sum(s.accepted for s in result.steps)
        sizes |= {s.tree_size for s in result.steps}
    assert accepted > 0
    if options.get("k"):
        assert max(sizes) == 3  # --k 3: a block of 4, three drafts
    elif not options:
        assert max(sizes) == 7


def test_fast_engine_verifies_blocks_and_trees_in_buckets(setup):
    """On the fast engine (static KV, buckets, fake CUDA graphs captured in the warm-up): the block's
    chain and the best-first tree (a new shape most steps) verify losslessly with the taps read
    inside the graph, and nothing is captured after the warm-up."""
    from fake_graphs import FakeGraphs

    from specbench.engine.loop import warm_up_engines
    from specbench.targets.fast import FastHFTarget

    target = setup["target"]
    fast = FastHFTarget(target.model, name="fast", graphs=FakeGraphs())
    for options in ({}, {"tree": "dynamic", "total_tokens": 12, "top_k": 3}):
        drafter = DFlashDrafter.build(fast, weights=str(setup["root"] / "dflash2"), **options)
        warm_up_engines(fast, drafter, 512)
        captured = fast.decoder.graph_set.captured
        for prompt in chat_prompts():
            plain = decode(target, PlainDecoding(target), prompt, MAX_NEW).output_ids
            assert decode(fast, drafter, prompt, MAX_NEW).output_ids == plain
        assert fast.decoder.graph_set.captured == captured


def test_shortened_block_drafts_from_a_shorter_block(setup):
    """--k shortens the block itself (the positions attend to each other), not just the proposal."""
    full, short = build(setup, "dflash"), build(setup, "dflash", k=3)
    tokens = chat_prompts(1)[0]
    _, hidden = setup["target"].prefill(tokens, full.taps)
    outs = []
    for drafter in (full, short):
        drafter.begin(tokens, hidden[:-1])
        outs.append(drafter.run_block(tokens).logits)
    assert outs[0].shape[0] == 7 and outs[1].shape[0] == 3
    assert not torch.allclose(outs[0][:3], outs[1])


def test_draft_context_holds_committed_positions_only(setup):
    """At every propose the draft's context covers exactly the positions before the anchor, and
    after the decode it equals a fresh pass over the committed sequence's features: rejected
    drafts and bonus tokens never entered it, the blocks' own keys never stayed."""
    target = setup["target"]
    drafter = build(setup, "dflash2", tree="dynamic", total_tokens=10, top_k=3)
    seen = []
    original = drafter.run_block

    def checked(tokens):
        block = original(tokens)
        seen.append((tokens.numel() - 1, drafter.context.length))
        return block

    drafter.run_block = checked
    prompt = chat_prompts(1)[0]
    result = decode(target, drafter, prompt, MAX_NEW)
    assert seen and all(anchor == length for anchor, length in seen)
    assert any(s.accepted > 0 for s in result.steps) and any(s.accepted < s.tree_depth for s in result.steps)
    sequence = torch.cat([prompt, torch.tensor(result.output_ids)])
    length = seen[-1][1]
    _, states = target.prefill(sequence, drafter.taps)
    fresh = drafter.net.context_kv(states[:length], torch.arange(length))
    assert drafter.context.length == length
    for (kept_keys, kept_values), (keys, values) in zip(drafter.context_layers(), fresh, strict=True):
        torch.testing.assert_close(kept_keys, keys)
        torch.testing.assert_close(kept_values, values)


@pytest.mark.parametrize("options", [{}, {"tree": "dynamic", "total_tokens": 12, "top_k": 3}])
def test_rows_equal_their_plain_decode_at_batch_3(setup, options):
    """At B = 3 (refilled and not; 4 prompts of different lengths), each row's draft keeps a context
    cache of its own and every live row's block runs in one forward (each block seeing only its own
    row's context): every row equals its plain decode, in the very steps it takes alone."""
    from specbench.engine.loop import Request, decode_rows
    from specbench.targets.batched import RowsHFTarget

    target = setup["target"]
    prompts = [torch.tensor(encode_turn(char_tokenizer(), p, 0, [])) for p in load_workload(WORKLOAD)[:4]]
    plain = [decode(target, PlainDecoding(target), p, MAX_NEW).output_ids for p in prompts]
    alone = [decode(target, build(setup, "dflash2", **options), p, MAX_NEW) for p in prompts]
    assert [a.output_ids for a in alone] == plain and any(s.accepted for a in alone for s in a.steps)
    for refill in (True, False):
        drafter = build(setup, "dflash2", **options)
        widths, block = [], drafter.net.block
        drafter.net.block = lambda ids, *rest: widths.append(ids.shape[0]) or block(ids, *rest)
        batch = decode_rows(RowsHFTarget(target, 3), drafter, [Request(p, MAX_NEW) for p in prompts], refill=refill)
        assert max(widths) == 3, widths
        assert [d.output_ids for d in batch.decoded] == plain, refill
        for got, want in zip(batch.decoded, alone):
            assert [(s.tree_size, s.accepted) for s in got.steps] == [(s.tree_size, s.accepted) for s in want.steps], refill


# --- temperature > 0: the target's distribution ------------------------------------------------------

def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    from test_sampling import chi_square, critical

    stat, df = chi_square(counts, probs)
    return stat < critical(df)


@pytest.mark.parametrize("variant, tree", [("v1", None), ("v1", "dynamic"), ("dflash2", None)])
def test_sampled_decoding_matches_plain_distribution(variant, tree):
    """End to end at temperature 1: the joint distribution of the 2nd and 3rd tokens equals plain
    sampling's (computed exactly): a sampled chain (speculative sampling; DFlash2 sampling its
    selector's path) and a best-first tree (tree sampling)."""
    from tiny import tiny_target

    target = tiny_target(5, vocab=8, std=0.15, layers=2, hidden=16)
    target.eos_token_ids = set()
    dflash2 = variant == "dflash2"
    config = DFlashConfig(layout=variant, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4, num_layers=1,
                          block_size=3, mask_token_id=7, target_layer_ids=(0, 1), causal=(False,), sliding_window=(None,), vocab_size=8,
                          conv_kernel_size=2 if dflash2 else None, conv_group_size=4 if dflash2 else None,
                          selector_rank=4 if dflash2 else None, selector_top_k=5 if dflash2 else None)
    torch.manual_seed(1)
    net = DFlashNet(config).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3) if p.dim() >= 2 else p.fill_(1.0)
    net.set_target(target.input_embeddings, target.lm_head)
    net.requires_grad_(False)
    drafter = DFlashDrafter(target, net, None, DFlashOptions(tree=tree, total_tokens=5, top_k=2))
    assert (drafter.acceptance is None) == (tree is None)
    prompt = torch.tensor([3, 4, 5, 3, 4])
    exact = exact_joint_of_second_and_third(target, prompt, 1.0)
    generator = torch.Generator().manual_seed(2)
    counts = torch.zeros(64, dtype=torch.float64)
    accepted, samples = 0, 1000
    for _ in range(samples):
        result = decode(target, drafter, prompt, 3, 1.0, generator)
        counts[result.output_ids[1] * 8 + result.output_ids[2]] += 1
        accepted += sum(s.accepted for s in result.steps)
    assert 0 < accepted < 2 * samples
    assert chi_square_ok(counts, exact)


# --- simulate == online ---------------------------------------------------------------------------

def online_steps(setup, options):
    """dflash's steps online, turn by turn (test_simulate's runner, over this module's prompts)."""
    return simulate_online_steps(setup, "dflash", options, limit=LIMIT)


@pytest.mark.parametrize("layout", ["dflash", "dflash2"])
def test_simulate_equals_online(setup, layout):
    """Every step's tree size, depth and accepted length, τ and per-position acceptance, for chains
    of 2 and 7 (blocks of 3 and 8: each scored by its own batched pass), a tree of ranks and the
    best-first tree, from the log's side file (record --hidden-taps dflash)."""
    options = {"weights": str(setup["root"] / layout), "total_tokens": 10, "top_k": 3}
    shapes = [Shape.chain(2), Shape.chain(7), Shape.from_spec("mc_sim_7b_63_depth3") if layout == "dflash" else Shape.chain(4),
              Shape.from_spec("dynamic")]
    simulator = Simulator(setup["log"], SimulateConfig("dflash", options, shapes, latency_steps=1), setup["target"])
    simulation = simulator.score()
    assert simulation.method == "teacher-forced" and simulation.hidden_source.startswith("log side file")
    deep = 0
    for result in simulation.results:
        online = online_steps(setup, {**options, "tree": result.shape.spec})
        assert [shape_of(t) for t in result.steps] == [shape_of(t) for t in online], result.shape.name
        flat_sim, flat_online = [s for t in result.steps for s in t], [s for t in online for s in t]
        assert tau(flat_sim) == tau(flat_online) and per_position(flat_sim) == per_position(flat_online)
        deep = max(deep, max(s.accepted for s in flat_online))
    assert deep >= 2, "no step accepted two drafted tokens: deeper positions were not compared"


def test_weights_option_takes_its_old_name_with_a_note():
    # `heads`, DFlash's first name for its weights (as EAGLE's was): still read, with one deprecation line
    with pytest.warns(SpecbenchWarning, match="option heads is deprecated.*use --weights"):
        options = DFlashOptions.parse("dflash", {"heads": "some/draft"})
    assert options.weights == "some/draft"
    with pytest.raises(UserError, match="give --weights only"):
        DFlashOptions.parse("dflash", {"heads": "a", "weights": "b"})


def test_cli_runs_dflash(setup, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--target", setup["root"] / "target", "--drafter", "dflash", "--weights", setup["root"] / "dflash",
                              "--k", 4, "--limit", 1, "--max-new-tokens", 12, "--dtype", "float64", "--device", "cpu",
                              "--out", tmp_path, "--json"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exact_match_rate"] == 1.0
    info = json.loads((Path(summary["run"]) / "run.json").read_text())
    assert info["extra"]["drafter"]["block"] == 5 and info["extra"]["drafter"]["taps"] == [2, 3, 4]
    bad = plant(setup["root"] / "dflash", tmp_path / "bad", _drop("norm.weight"))
    code, out, err = run_cli(["run", "--target", setup["root"] / "target", "--drafter", "dflash", "--weights", bad, "--limit", 1,
                              "--device", "cpu", "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing key 'norm.weight'" in err, err


# --- tune: the block length and the tree width ----------------------------------------------------

def test_tune_searches_block_length_and_tree_width(setup, tmp_path, capsys, monkeypatch):
    """tune scores each depth d (a block of d + 1) by the pass of the drafter built for the chain of d;
    its candidates are that chain and the greedy trees of exactly depth d, as wide as the greedy makes
    them. Every candidate's predicted τ is what simulate scores for that shape (each by the drafter
    built for it), and the tree tune writes, run as it prints, is lossless with the predicted τ."""
    from specbench.simulate.log import VerifyProfile
    from specbench.simulate.predict import LatencyModel
    from specbench.simulate.tune import TuneConfig, Tuner, costs_for

    # the v1 draft with its second layer mixing the block's positions (random queries and keys, an identity
    # value path): a block of d + 1 then ranks the true tokens otherwise than the first d positions of a longer one
    state = {key: value.clone() for key, value in setup["stored"]["dflash"].items()}
    g = torch.Generator().manual_seed(5)
    for name in ("q_proj", "k_proj"):
        w = state[f"layers.1.self_attn.{name}.weight"]
        w += torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3
    for name in ("v_proj", "o_proj"):
        w = state[f"layers.1.self_attn.{name}.weight"]
        w += torch.eye(w.shape[0], dtype=w.dtype)
    heads = tmp_path / "mixing"
    write_v1(heads, setup["target"], LAYER_IDS, state=OrderedDict(state))
    options = {"weights": str(heads)}
    profile = VerifyProfile(context_tokens=8, ms=[10.0 + 0.5 * n for n in range(64)])  # the log holds none
    (tmp_path / "profile.json").write_text(json.dumps(profile.to_json()))
    tuner = Tuner(setup["log"], TuneConfig("dflash", options, max_nodes=8, max_depth=4, draft_ms=0.0), setup["target"])
    depths = [c.shape.depth for c in tuner.candidates]
    assert depths == sorted(depths) and sorted(set(depths)) == [1, 2, 3, 4]
    for d in range(1, 5):
        mine = [c for c in tuner.candidates if c.depth_pass == d]
        assert mine[0].shape.spec == f"chain:{d}" and mine[0].max_width == 1 and not mine[0].whole
        assert all(c.shape.depth == d and len(c.paths) <= 8 for c in mine)
    assert max(c.max_width for c in tuner.candidates) > 1, "no tree wider than a chain was built: widths were not searched"
    shared = [(torch.cat([p.ranks[:, :d] for p in tuner.tuning.proposals[d]]), torch.cat([p.ranks[:, :d] for p in tuner.tuning.proposals[4]]))
              for d in (1, 2, 3)]
    assert any((mine != deepest).any() for mine, deepest in shared), "every block ranked alike: one pass would have done"
    frontier = tuner.frontier(LatencyModel.build(profile, None, None), costs_for(tuner), "tiny")
    assert frontier.per_depth and len({p.tau for p in frontier.points}) > 2, "every shape scored alike: the comparison proves little"
    simulation = Simulator(setup["log"], SimulateConfig("dflash", options, [c.shape for c in tuner.candidates], latency_steps=0),
                           setup["target"]).score()
    assert [tau([s for turn in r.steps for s in turn]) for r in simulation.results] == [p.tau for p in frontier.points]
    for d in range(1, 5):  # within a depth the greedy trees are nested: a larger one never expects fewer accepted
        trees = [c.expected_tau for c in tuner.candidates if c.depth_pass == d and c.whole]
        assert trees == sorted(trees)

    # the command line: the chosen tree written, the printed run lossless and measuring the predicted τ
    tree = tmp_path / "tuned.json"
    code, out, err = run_cli(["tune", "--log", setup["log"].path, "--drafter", "dflash", "--weights", heads,
                              "--target", setup["root"] / "target", "--dtype", "float64", "--device", "cpu", "--max-nodes", 6,
                              "--latency-steps", 1, "--profile", tmp_path / "profile.json", "--out", tree, "--plot", tmp_path / "frontier.png",
                              "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert (tmp_path / "frontier.png").stat().st_size > 0  # one line per depth
    chosen = result["frontier"]["points"][result["frontier"]["best"]]
    assert json.loads(tree.read_text())["paths"] == result["paths"] and len(result["paths"]) == chosen["size"]
    assert f"--drafter dflash --weights {heads} --tree {tree}" in result["run_command"]
    args = result["run_command"].split()[1:] + ["--dtype", "float64", "--device", "cpu", "--out", tmp_path / "runs", "--json"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    measured = json.loads(out)
    assert measured["exact_match_rate"] == 1.0 and measured["tau"] == chosen["tau"]
    # the table form says what it shows; a block longer than the draft was trained on is never a candidate
    code, out, err = run_cli(["tune", "--log", setup["log"].path, "--drafter", "dflash", "--weights", heads,
                              "--target", setup["root"] / "target", "--dtype", "float64", "--device", "cpu", "--max-nodes", 64,
                              "--draft-ms", 1, "--profile", tmp_path / "profile.json", "--out", tmp_path / "t2.json"], capsys, monkeypatch)
    assert code == 0, err
    assert "per depth its chain and its fastest" in out and "chosen:" in out and ", width " in out
    trained = json.loads((heads / "config.json").read_text())["block_size"]
    assert Tuner(setup["log"], TuneConfig("dflash", options, max_nodes=64, draft_ms=0.0), setup["target"]).depth == trained - 1


# --- the embedded default: SmolLM2-135M-Instruct (heavy) ----------------------------------------------

@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_lossless_and_simulate_equals_online(tmp_path):
    """A v1 draft sized for SmolLM2 as the reference sizes it (5 layers, taps by z-lab's rule over 30
    layers: 1, 8, 14, 20, 27; mask id 16 <empty_output>, SmolLM2 having no spare row), untrained:
    greedy output equals plain decoding, and simulate (from record --hidden-taps dflash) equals
    online step by step."""
    target = HFTarget.load("smollm2-135m", torch.device("cpu"), torch.float32)
    ids = layouts.tap_rule(target.num_layers)
    assert ids == [1, 8, 14, 20, 27]
    write_v1(tmp_path / "draft", target, ids, block_size=16, layers=5)
    drafter = DFlashDrafter.build(target, weights=str(tmp_path / "draft"), k=7)
    assert drafter.taps == (2, 9, 15, 21, 28) and drafter.net.config.mask_token_id == 16
    prompts = load_workload(WORKLOAD)[:LIMIT]
    for prompt in prompts[:1]:
        tokens = torch.tensor(encode_turn(target.tokenizer, prompt, 0, []))
        assert decode(target, drafter, tokens, 32).output_ids == decode(target, PlainDecoding(target), tokens, 32).output_ids
    record(target, prompts, WORKLOAD, 32, tmp_path / "log.jsonl", hidden_layers=parse_hidden_taps("dflash", target.num_layers))
    log = read_log(tmp_path / "log.jsonl")
    options = {"weights": str(tmp_path / "draft")}
    simulator = Simulator(log, SimulateConfig("dflash", options, [Shape.chain(3), Shape.chain(7)], latency_steps=1), target)
    for result in simulator.score().results:
        config = RunConfig(drafter="dflash", drafter_options={**options, "tree": result.shape.spec}, workload=WORKLOAD, limit=LIMIT,
                           max_new_tokens=32, device="cpu", baseline=False, warmup=False)
        bench = Benchmark(config, target=target)
        online = []
        for prompt in bench.prompts:
            steps, _ = bench.measure_prompt(prompt)
            online += [[s for s in steps if s.turn == t] for t in range(len(prompt.turns))]
        assert [shape_of(t) for t in result.steps] == [shape_of(t) for t in online], result.shape.name


def test_cli_simulates_dflash(setup, tmp_path, capsys, monkeypatch):
    """`simulate` from the log's side file with the real target for the embedding and LM head; without
    --target it is one line naming it (the draft owns neither)."""
    args = ["simulate", "--log", setup["root"] / "log.jsonl", "--drafter", "dflash", "--weights", setup["root"] / "dflash", "--k", "2,7",
            "--tree", "dynamic", "--bandwidth", 100, "--latency-steps", 1, "--out", tmp_path / "runs"]
    code, out, err = run_cli([*args, "--target", setup["root"] / "target", "--dtype", "float64", "--device", "cpu", "--json"], capsys,
                             monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "teacher-forced" and result["hidden_source"].startswith("log side file")
    assert [r["shape"] for r in result["results"]] == ["k=2", "k=7", "tree=dynamic"]
    info = json.loads((Path(result["results"][1]["run"]) / "run.json").read_text())
    assert info["extra"]["drafter"]["block"] == 8 and info["extra"]["draft_passes_per_step"] == 1  # one block pass drafts all 7
    code, out, err = run_cli([*args, "--device", "cpu"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pass --target" in err, err


# --- train --drafter dflash ---------------------------------------------------------------------------

def test_train_dflash_learns_and_writes_the_v1_layout(setup, tmp_path, capsys, monkeypatch):
    """A few steps on the tiny target's own answers (train-data --hidden-taps dflash): the training
    loss falls and the held-out chain acceptance rises; the checkpoint is z-lab's v1 layout (its
    config template, no embedding or LM head) and the drafter loads it strictly and is lossless."""
    from specbench.train.data import make_data

    target = setup["target"]
    for name, workload, limit in (("data", "pool-train", 16), ("heldout", "pool-heldout", 4)):
        make_data(target, workload, tmp_path / name, max_new_tokens=24, batch_size=4, limit=limit, hidden_taps="dflash")
    out = tmp_path / "draft"
    args = ["train", "--drafter", "dflash", "--target", setup["root"] / "target", "--data", tmp_path / "data", "--eval-data",
            tmp_path / "heldout", "--out", out, "--steps", 40, "--batch-tokens", 96, "--lr", 3e-3, "--warmup-steps", 4, "--eval-every",
            20, "--dtype", "float64", "--block-size", 5, "--draft-layers", 1, "--anchors", 8]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "specbench_train.json").read_text())
    first, last = log["history"][:5], log["history"][-5:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
    assert [e["step"] for e in log["evals"]] == [0, 20, 40]
    assert log["evals"][-1]["tau_chain_estimate"] > log["evals"][0]["tau_chain_estimate"]
    assert log["taps"] == [2, 3, 3, 3, 4] and log["block_size"] == 5  # z-lab's rule for 5 taps over 6 layers: 1, 2, 2, 2, 3
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 5 and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"mask_token_id": 99, "target_layer_ids": [1, 2, 2, 2, 3]}  # no named mask token: the last id
    assert not any("embed" in k or "lm_head" in k for k in load_file(out / "model.safetensors"))
    drafter = DFlashDrafter.build(target, weights=str(out))
    assert drafter.describe()["format"] == "dflash" and drafter.k == 4
    for prompt in chat_prompts(1):
        assert decode(target, drafter, prompt, MAX_NEW).output_ids == decode(target, PlainDecoding(target), prompt, MAX_NEW).output_ids


# --- scripts/bench_drafters.py ---------------------------------------------------------------------

def test_bench_drafters_runs_dflash_with_its_weights(setup, tmp_path, capsys):
    """`--dflash-weights` and `--dflash-tree` reach the dflash run (the checkpoint it loads, the
    block its tree asks for) and its row is in the workload's table; a DFlash option without dflash
    among --drafters, and a checkpoint that does not load, are each one line and exit 2."""
    from script_modules import load_script

    bench = load_script("bench_drafters")
    common = ["--target", str(setup["root"] / "target"), "--workloads", WORKLOAD, "--limit", "1", "--max-new-tokens", "12",
              "--dtype", "float64", "--device", "cpu", "--out", str(tmp_path / "bench")]
    weights = setup["root"] / "dflash"
    assert bench.main([*common, "--drafters", "dflash", "--dflash-weights", str(weights), "--dflash-tree", "chain:2"]) == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "bench" / WORKLOAD).iterdir()
    info = json.loads((run / "run.json").read_text())
    assert info["drafter"] == "dflash" and info["drafter_options"] == {"weights": str(weights), "tree": "chain:2"}
    assert info["extra"]["drafter"]["heads"] == str(weights) and info["extra"]["drafter"]["block_size"] == 8
    assert info["extra"]["drafter"]["block"] == 3  # a chain of 2: the block of 3 it asked for, not the draft's own
    row = next(line for line in out.splitlines() if "dflash" in line and "│" in line)
    assert "n/a" not in row.split("│")[2]  # a τ was measured
    for argv, message in (([*common, "--drafters", "prompt-lookup", "--dflash-weights", str(weights)], "--dflash-weights is for dflash"),
                          ([*common, "--drafters", "dflash,nope"], "--drafters: unknown nope"),
                          ([*common, "--drafters", "dflash", "--dflash-weights",
                            str(plant(weights, tmp_path / "bad", _drop("norm.weight")))], "missing key 'norm.weight'")):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
