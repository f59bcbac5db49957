"""EAGLE-1/2 and EAGLE-3 drafters: every published layout loads strictly (tests/eagle_layouts.py
writes them), greedy decoding equals plain decoding for static and dynamic trees, a speculators
copy drafts what the original drafts, the network equals a hand-written reference forward, the
dynamic tree and the temperature > 0 rule are checked by hand, and simulate == online."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from eagle_layouts import (
    eagle3_state,
    write_eagle1_llama3,
    write_eagle1_vicuna,
    write_eagle3,
    write_speculators,
)
from test_cli import run_cli
from test_sampling import exact_joint_of_second_and_third
from tiny import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from specbench.drafters.eagle import layouts
from specbench.drafters.eagle.drafter import Eagle3Drafter, EagleDrafter, EagleOptions
from specbench.drafters.eagle.model import EagleConfig, EagleNet
from specbench.drafters.eagle.tree import accepted_lengths, draft_tree, grow, select
from specbench.engine.acceptance import TreeSampling, accept_tree_sampling
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.kv import StaticKV
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.metrics import per_position, tau
from specbench.runner import Benchmark, RunConfig
from specbench.simulate.log import read_log
from specbench.simulate.record import parse_hidden_taps, record
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.walk import Shape
from specbench.targets.hf import HFTarget
from specbench.workloads import encode_turn, load_workload

MAX_NEW = 24
WORKLOAD = "builtin"
LIMIT = 3  # writing-1 (two turns), writing-2, roleplay-1
ROPE = 500000.0  # the EAGLE-1 target's rotary base (as LLaMA3's)
NOISE = 0.005
DRAFT_VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_target(directory: Path, layers: int, rope_theta: float, embed_scale: float, inert_after_first: bool, seed: int = 0) -> Path:
    """A tiny Llama with the char tokenizer whose embedding rows have RMS `embed_scale`; with
    `inert_after_first` every layer after the first adds nothing (o_proj, down_proj zero)."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         rope_theta=rope_theta)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        table = model.model.embed_tokens.weight
        table.copy_(table / table.pow(2).mean(-1, keepdim=True).sqrt() * embed_scale)
        if inert_after_first:
            for layer in model.model.layers[1:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    cpu = torch.device("cpu")
    save_target(root / "target1", layers=1, rope_theta=ROPE, embed_scale=1.0, inert_after_first=False)
    save_target(root / "target3", layers=6, rope_theta=10000.0, embed_scale=0.01, inert_after_first=True)
    t1 = HFTarget.load(str(root / "target1"), cpu, torch.float64)
    t3 = HFTarget.load(str(root / "target3"), cpu, torch.float64)
    draft_ids = torch.randperm(t3.vocab_size, generator=torch.Generator().manual_seed(0))[:DRAFT_VOCAB].sort().values
    stored = {
        "vicuna": write_eagle1_vicuna(root / "vicuna", t1, NOISE),
        "llama3": write_eagle1_llama3(root / "llama3", t1, ROPE, NOISE),
        "eagle3": write_eagle3(root / "eagle3", t3, draft_ids, NOISE),
    }
    stored["speculators"] = write_speculators(root / "speculators", root / "eagle3", str(root / "target3"))
    prompts = load_workload(WORKLOAD)[:LIMIT]
    record(t1, prompts, WORKLOAD, MAX_NEW, root / "log1.jsonl", hidden=True)
    record(t3, prompts, WORKLOAD, MAX_NEW, root / "log3.jsonl", hidden_layers=parse_hidden_taps("eagle3", t3.num_layers))
    return {"root": root, "t1": t1, "t3": t3, "stored": stored, "draft_ids": draft_ids,
            "log1": read_log(root / "log1.jsonl"), "log3": read_log(root / "log3.jsonl")}


LAYOUTS = {"vicuna": ("t1", EagleDrafter), "llama3": ("t1", EagleDrafter), "eagle3": ("t3", Eagle3Drafter),
           "speculators": ("t3", Eagle3Drafter)}


def build(setup, layout, **options):
    target_key, cls = LAYOUTS[layout]
    return cls.build(setup[target_key], weights=str(setup["root"] / layout), **options)


def chat_prompts(n: int = 3) -> list[torch.Tensor]:
    return [torch.tensor(encode_turn(char_tokenizer(), p, 0, [])) for p in load_workload(WORKLOAD)[:n]]


# --- loading: every published layout, key by key, with the reference's defaults -------------------

def test_layouts_load_key_by_key_with_the_reference_defaults(setup):
    t1, t3 = setup["t1"], setup["t3"]
    vicuna = build(setup, "vicuna")
    c = vicuna.net.config
    # no num_key_value_heads: MHA even though the target is GQA; no bias key: fc has a bias; no rope_theta: 10000
    assert (c.num_kv_heads, c.fc_bias, c.rope_theta, c.head_dim) == (4, True, 10000.0, 12)
    assert vicuna.describe()["stored_dtype"] == "float32" and vicuna.net.fc.weight.dtype == torch.float64
    assert vicuna.net.layers[0].input_layernorm is None  # EAGLE-1's first layer has no input norm
    for key, value in setup["stored"]["vicuna"].items():
        if "rotary_emb" not in key:
            assert torch.equal(vicuna.net.state_dict()[key], value.double()), key
    llama3 = build(setup, "llama3")
    c = llama3.net.config
    assert (c.num_kv_heads, c.fc_bias, c.rope_theta, c.rms_norm_eps) == (2, False, ROPE, 1e-5)
    assert llama3.describe()["stored_dtype"] == "float16" and "fc.bias" not in llama3.net.state_dict()
    assert llama3.taps == (None,) and llama3.net.head is t1.lm_head
    for key, value in setup["stored"]["llama3"].items():
        assert torch.equal(llama3.net.state_dict()[key], value.double()), key
    for layout in ("eagle3", "speculators"):
        drafter = build(setup, layout)
        c = drafter.net.config
        assert (c.version, c.draft_vocab_size, c.vocab_size, c.rope_theta, c.norm_before_residual) == (3, DRAFT_VOCAB, t3.vocab_size, 10000.0, False)
        assert drafter.taps == (2, 3, 3)  # the inputs of layers 2, L//2, L-3 for L = 6
        assert not drafter.net.own_embedding  # no embed_tokens in the file: the target's table
        assert torch.equal(drafter.net.head_ids, setup["draft_ids"])  # d + d2t[d]
        for key, value in setup["stored"][layout].items():
            key = "layers.0." + key.removeprefix("midlayer.") if key.startswith("midlayer.") else key
            mine = drafter.net.state_dict()[key]
            assert torch.equal(mine, value.double() if value.is_floating_point() else value), key
        info = drafter.describe()
        assert info["draft_vocab"] == DRAFT_VOCAB and info["target_vocab"] == t3.vocab_size
        assert info["format"] == ("eagle3" if layout == "eagle3" else "speculators-eagle3")


def test_format_is_told_by_keys_not_architectures(setup, tmp_path):
    """An SGLang copy only rewrites `architectures`; the keys still say EAGLE-1."""
    copy = tmp_path / "sglang"
    shutil.copytree(setup["root"] / "llama3", copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLMEagle3"]}))
    drafter = EagleDrafter.build(setup["t1"], weights=str(copy), tree="chain:2")
    assert drafter.describe()["format"] == "eagle"
    with pytest.raises(UserError, match="EAGLE-1 checkpoint .*use --drafter eagle$"):
        Eagle3Drafter.build(setup["t1"], weights=str(copy))
    with pytest.raises(UserError, match="EAGLE-3 checkpoint .*use --drafter eagle3$"):
        EagleDrafter.build(setup["t3"], weights=str(setup["root"] / "eagle3"))


def plant(source: Path, directory: Path, change) -> Path:
    shutil.copytree(source, directory)
    file = directory / "pytorch_model.bin"
    state = torch.load(file, weights_only=True)
    change(state)
    torch.save(state, file)
    return directory


@pytest.mark.parametrize("layout, change, message", [
    ("llama3", lambda s: s.__setitem__("layers.0.input_layernorm.weight", torch.ones(48)),
     r"unexpected key 'layers.0.input_layernorm.weight' for an eagle checkpoint \(EAGLE-1's first layer has no input norm\)"),
    ("llama3", lambda s: s.__setitem__("fc.bias", torch.zeros(48)), "unexpected key 'fc.bias' .*\"bias\": false"),
    ("vicuna", lambda s: s.pop("fc.bias"), "missing key 'fc.bias' .*no \"bias\" key, which means fc has a bias"),
    ("vicuna", lambda s: s.pop("layers.0.mlp.up_proj.weight"), "missing key 'layers.0.mlp.up_proj.weight'"),
    ("eagle3", lambda s: s.__setitem__("midlayer.extra.weight", torch.ones(2)), "unexpected key 'midlayer.extra.weight'"),
    ("eagle3", lambda s: s.pop("midlayer.hidden_norm.weight"), "missing key 'midlayer.hidden_norm.weight'"),
    ("eagle3", lambda s: s.pop("d2t"), "missing map: .* no 'd2t'"),
    ("eagle3", lambda s: s.__setitem__("d2t", s["d2t"] + torch.arange(s["d2t"].numel())), "d2t .* holds offsets"),
    ("vicuna", lambda s: s.__setitem__("layers.0.self_attn.k_proj.weight", s["layers.0.self_attn.k_proj.weight"][:24]),
     r"k_proj.weight' has shape \(24, 48\), its config.json implies \(48, 48\) \(no num_key_value_heads: an MHA draft\)"),
])
def test_loading_is_strict_one_line(setup, tmp_path, layout, change, message):
    directory = plant(setup["root"] / layout, tmp_path / "planted", change)
    target_key, cls = LAYOUTS[layout]
    with pytest.raises(UserError, match=message) as info:
        cls.build(setup[target_key], weights=str(directory))
    assert "\n" not in str(info.value)


def test_optional_keys_are_optional(setup, tmp_path):
    """embed_tokens (EAGLE-1 files carry one, the target's serves otherwise), rotary buffers (the
    Vicuna file has one) and d2t/t2d when the draft vocabulary is the target's."""
    no_embedding = plant(setup["root"] / "llama3", tmp_path / "no-embed", lambda s: s.pop("embed_tokens.weight"))
    drafter = EagleDrafter.build(setup["t1"], weights=str(no_embedding), tree="chain:2")
    assert not drafter.net.own_embedding and "embed_tokens.weight" not in drafter.net.state_dict()
    full = tmp_path / "full-vocab"
    full.mkdir()
    t3 = setup["t3"]
    state = eagle3_state(t3, torch.arange(t3.vocab_size))
    config = json.loads((setup["root"] / "eagle3" / "config.json").read_text()) | {"draft_vocab_size": t3.vocab_size}
    (full / "config.json").write_text(json.dumps(config))
    torch.save({k: v for k, v in state.items() if k not in ("d2t", "t2d")}, full / "pytorch_model.bin")
    assert Eagle3Drafter.build(t3, weights=str(full), tree="chain:2").net.head_ids is None  # the identity map
    torch.save(state, full / "pytorch_model.bin")  # present but unused when Vd == V, as the reference deletes them
    assert Eagle3Drafter.build(t3, weights=str(full), tree="chain:2").net.head_ids is None


def test_a_checkpoint_for_another_target_is_one_line(setup, tmp_path):
    with pytest.raises(UserError, match="^hidden-size mismatch: .* width 48, target .* hidden size 32"):
        other = HFTarget(LlamaForCausalLM(LlamaConfig(vocab_size=setup["t1"].vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, num_key_value_heads=2)).double(), name="other")
        EagleDrafter.build(other, weights=str(setup["root"] / "llama3"))
    with pytest.raises(UserError, match="^vocabulary mismatch: .* 100 tokens, target .* has 96"):
        other = HFTarget(LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                                                      num_attention_heads=4, num_key_value_heads=2)).double(), name="other")
        Eagle3Drafter.build(other, weights=str(setup["root"] / "eagle3"))
    with pytest.raises(UserError, match="--tap-layers is for eagle3"):
        EagleDrafter.build(setup["t1"], weights=str(setup["root"] / "llama3"), tap_layers="0,0,0")
    with pytest.raises(UserError, match="fall outside the target's 6 layers"):
        Eagle3Drafter.build(setup["t3"], weights=str(setup["root"] / "eagle3"), tap_layers="2,3,6")
    with pytest.raises(UserError, match="no published eagle draft for target 'tiny' in the catalogue: pass --weights"):
        EagleDrafter.build(HFTarget(setup["t1"].model, name="tiny"))


def test_rotary_base_comes_from_the_draft_config(setup, tmp_path):
    """rope_theta from the DRAFT config (500000 here, as LLaMA3's); a config saved by transformers 5
    holds it in rope_parameters; without either it is 10000, which drafts worse for this target."""
    configs = {"rope_parameters": lambda c: {k: v for k, v in c.items() if k != "rope_theta"} | {"rope_parameters": {"rope_theta": ROPE, "rope_type": "default"}},
               "absent": lambda c: {k: v for k, v in c.items() if k != "rope_theta"}}
    trees = {}
    for name, change in [("original", lambda c: c)] + list(configs.items()):
        directory = tmp_path / name
        shutil.copytree(setup["root"] / "llama3", directory)
        (directory / "config.json").write_text(json.dumps(change(json.loads((directory / "config.json").read_text()))))
        drafter = EagleDrafter.build(setup["t1"], weights=str(directory), tree="mc_sim_7b_63")
        assert drafter.net.config.rope_theta == (10000.0 if name == "absent" else ROPE)
        steps = [s for p in chat_prompts() for s in decode(setup["t1"], drafter, p, MAX_NEW).steps]
        trees[name] = tau(steps)
    assert trees["rope_parameters"] == trees["original"] > trees["absent"] + 0.5


def test_rope_settings():
    assert layouts.rope_settings({}, "x") == (10000.0, None)
    assert layouts.rope_settings({"rope_theta": 5e5, "rope_scaling": None}, "x") == (5e5, None)
    theta, scaling = layouts.rope_settings({"rope_scaling": {"type": "linear", "factor": 2.0}}, "x")
    assert theta == 10000.0 and scaling["rope_type"] == "linear"
    with pytest.raises(UserError, match="rope scaling 'yarn' is not supported"):
        layouts.rope_settings({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "x")


def test_hub_id_fetches_one_weights_file(setup, tmp_path, monkeypatch):
    """A repository with both pytorch_model.bin and model.safetensors (as EAGLE-LLaMA3-Instruct-70B):
    it is listed first and only one weights file is downloaded."""
    from safetensors.torch import save_file

    from specbench.drafters import checkpoints as files

    hub = tmp_path / "hub"
    shutil.copytree(setup["root"] / "llama3", hub)
    save_file({k: v.contiguous() for k, v in torch.load(hub / "pytorch_model.bin", weights_only=True).items()}, str(hub / "model.safetensors"))
    snapshot, fetched = tmp_path / "snapshot", []

    def fake_download(repo_id, file_names, what="heads"):
        snapshot.mkdir(exist_ok=True)
        for file in hub.iterdir():
            if file.suffix == ".json" or file.name in file_names:
                fetched.append(file.name)
                shutil.copy(file, snapshot / file.name)
        return snapshot

    monkeypatch.setattr(files, "download", fake_download)
    monkeypatch.setattr("huggingface_hub.list_repo_files", lambda repo_id: [f.name for f in hub.iterdir()])
    drafter = EagleDrafter.build(setup["t1"], weights="yuhuili/EAGLE-tiny", tree="chain:2")
    assert sorted(fetched) == ["config.json", "model.safetensors"] and drafter.describe()["head_files"] == ["model.safetensors"]


@pytest.mark.parametrize("layout", ["eagle", "eagle3", "speculators-eagle3"])
def test_writer_round_trip(setup, tmp_path, layout):
    """write_checkpoint (what `train` will use) writes a layout the loader reads back to the same net."""
    source = "llama3" if layout == "eagle" else "eagle3"
    drafter = build(setup, source)
    target = setup["t1"] if layout == "eagle" else setup["t3"]
    weights = "pytorch_model.bin" if layout != "speculators-eagle3" else "model.safetensors"
    layouts.write_checkpoint(tmp_path / "out", drafter.net, layout, taps=drafter.taps if layout != "eagle" else None, weights_file=weights)
    again = (EagleDrafter if layout == "eagle" else Eagle3Drafter).build(target, weights=str(tmp_path / "out"))
    assert again.describe()["format"] == layout
    assert {k: v for k, v in again.net.state_dict().items()}.keys() == drafter.net.state_dict().keys()
    assert all(torch.equal(again.net.state_dict()[k], v) for k, v in drafter.net.state_dict().items())
    assert again.net.config == drafter.net.config and again.taps == drafter.taps


# --- the network against a hand-written reference forward (concat orders, norms, residuals) --------

def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, cos, sin):
    """Rotary embedding as Llama applies it: x*cos + rotate_half(x)*sin, halves swapped and negated."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_attention(x, state, prefix, heads, kv_heads, theta):
    """Causal self-attention over rows 0..n-1 at positions 0..n-1, written as the reference writes it."""
    n = x.shape[0]
    q = (x @ state[f"{prefix}q_proj.weight"].T).view(n, heads, -1).transpose(0, 1)
    k = (x @ state[f"{prefix}k_proj.weight"].T).view(n, kv_heads, -1).transpose(0, 1)
    v = (x @ state[f"{prefix}v_proj.weight"].T).view(n, kv_heads, -1).transpose(0, 1)
    d = q.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    q, k = rotate(q, emb.cos(), emb.sin()), rotate(k, emb.cos(), emb.sin())
    k = k.repeat_interleave(heads // kv_heads, 0)
    v = v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / d ** 0.5 + torch.full((n, n), float("-inf")).triu(1)
    out = torch.softmax(scores, -1) @ v
    return out.transpose(0, 1).reshape(n, -1) @ state[f"{prefix}o_proj.weight"].T


def reference_mlp(x, state, prefix):
    return (torch.nn.functional.silu(x @ state[f"{prefix}gate_proj.weight"].T) * (x @ state[f"{prefix}up_proj.weight"].T)) @ state[f"{prefix}down_proj.weight"].T


@pytest.mark.parametrize("version", [1, 3])
def test_network_equals_the_reference_forward(version):
    """Random weights, distinct tapped states: EAGLE-1 fc over [embedding, feature], no input norm, the
    target's LM head; EAGLE-3 fc over [low, mid, high], attention over [input_layernorm(embedding),
    hidden_norm(hidden)], the raw hidden as residual, the draft's own norm and head. The last row is a
    depth-2 tree node: the draft's own output fed back (EAGLE-3: without fc)."""
    torch.manual_seed(0)
    H, V, n = 16, 20, 7
    config = EagleConfig(version=version, hidden_size=H, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4, vocab_size=V,
                         draft_vocab_size=V if version == 1 else 12, target_hidden_size=H, fc_bias=version == 1, rms_norm_eps=1e-5,
                         rope_theta=1000.0)
    net = EagleNet(config).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    head = torch.nn.Linear(H, V, bias=False).double()
    if version == 1:
        net.set_head(head, None)
    state = net.state_dict()
    tokens = torch.randint(0, V, (n,))
    features = torch.randn(n - 1, H if version == 1 else 3 * H, dtype=torch.float64)  # the final state / three taps
    kv = StaticKV(config.num_layers)
    out = net.context(tokens[:-1], features, kv)
    node, _ = net.nodes(tokens[-1:], out[-1:], torch.tensor([n - 1]), kv, torch.tensor([n - 1]), None)

    emb = state["embed_tokens.weight"][tokens]
    if version == 1:
        x = torch.cat([emb, torch.cat([features, out[-1:]])], -1) @ state["fc.weight"].T + state["fc.bias"]
        h = x + reference_attention(x, state, "layers.0.self_attn.", 4, 2, 1000.0)
        ref = h + reference_mlp(rms(h, state["layers.0.post_attention_layernorm.weight"], 1e-5), state, "layers.0.mlp.")
        ref_logits = ref @ head.weight.T
    else:
        fused = features @ state["fc.weight"].T
        hidden = torch.cat([fused, out[-1:]])  # the node row feeds the draft's own output back, no fc
        attn_in = torch.cat([rms(emb, state["layers.0.input_layernorm.weight"], 1e-5), rms(hidden, state["layers.0.hidden_norm.weight"], 1e-5)], -1)
        h = hidden + reference_attention(attn_in, state, "layers.0.self_attn.", 4, 2, 1000.0)
        ref = h + reference_mlp(rms(h, state["layers.0.post_attention_layernorm.weight"], 1e-5), state, "layers.0.mlp.")
        ref_logits = rms(ref, state["norm.weight"], 1e-5) @ state["lm_head.weight"].T
    close = dict(rtol=1e-5, atol=1e-5)  # transformers' RMSNorm computes in float32 whatever the dtype
    torch.testing.assert_close(out, ref[:-1], **close)
    torch.testing.assert_close(node, ref[-1:], **close)
    torch.testing.assert_close(net.logits(torch.cat([out, node])), ref_logits, **close)


def test_network_trains_through_the_teacher_forced_forward():
    """Without a cache the context forward writes nothing in place: a loss over it backpropagates
    (what `train` needs), and equals the cached forward."""
    torch.manual_seed(0)
    config = EagleConfig(version=3, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4, vocab_size=20,
                         draft_vocab_size=12, target_hidden_size=16)
    net = EagleNet(config).double()
    tokens, features = torch.randint(0, 20, (6,)), torch.randn(6, 48, dtype=torch.float64)
    out = net.context(tokens, features)
    net.logits(out).logsumexp(-1).sum().backward()
    assert net.fc.weight.grad is not None and net.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), net.context(tokens, features, StaticKV(config.num_layers)))


# --- greedy decoding is lossless, on every layout, static and dynamic trees -----------------------

@pytest.mark.parametrize("tree", ["dynamic", "mc_sim_7b_63", "chain:3"])
@pytest.mark.parametrize("layout", ["vicuna", "llama3", "eagle3", "speculators"])
def test_greedy_equals_plain(setup, layout, tree):
    target = setup[LAYOUTS[layout][0]]
    drafter = build(setup, layout, tree=tree)
    accepted = 0
    for prompt in chat_prompts(2):
        plain = decode(target, PlainDecoding(target), prompt, MAX_NEW).output_ids
        result = decode(target, drafter, prompt, MAX_NEW)
        assert result.output_ids == plain
        accepted += sum(s.accepted for s in result.steps)
        if tree == "dynamic":
            assert all(s.tree_size == 59 for s in result.steps)  # total_tokens 60, the root included
    assert accepted > 0


def test_draft_cache_holds_accepted_context_only(setup):
    """At every propose the draft's KV covers exactly the accepted sequence minus the root's successor,
    and equals a fresh pass over it: tree nodes never stay."""
    t1 = setup["t1"]
    drafter = build(setup, "llama3", tree="dynamic")
    seen = []
    original = drafter.propose

    def checked(ctx):
        tree = original(ctx)
        seen.append((ctx.tokens.clone(), drafter.kv.length))
        return tree

    drafter.propose = checked
    prompt = chat_prompts(1)[0]
    result = decode(t1, drafter, prompt, MAX_NEW)
    assert all(length == tokens.numel() - 1 for tokens, length in seen) and len(seen) == len(result.steps)
    tokens, length = seen[-1]
    _, states = t1.prefill(tokens, (None,))
    fresh = StaticKV(drafter.net.config.num_layers)
    drafter.net.context(tokens[1:], states[:-1], fresh)
    torch.testing.assert_close(drafter.kv.kv[..., :length, :], fresh.kv[..., :length, :])


def test_speculators_copy_drafts_what_the_original_drafts(setup, tmp_path):
    """Same trees, step by step. Without norm_before_residual in its config a speculators file means
    true (vLLM's default), which drafts differently."""
    t3 = setup["t3"]

    def trees_of(layout_dir):
        drafter = Eagle3Drafter.build(t3, weights=str(layout_dir), tree="dynamic")
        trees = []
        original = drafter.propose
        drafter.propose = lambda ctx: trees.append(original(ctx)) or trees[-1]
        for prompt in chat_prompts(2):
            decode(t3, drafter, prompt, MAX_NEW)
        return [(t.tokens.tolist(), t.parents.tolist()) for t in trees]

    original = trees_of(setup["root"] / "eagle3")
    assert trees_of(setup["root"] / "speculators") == original
    write_speculators(tmp_path / "no-key", setup["root"] / "eagle3", str(setup["root"] / "target3"), norm_before_residual=None)
    assert Eagle3Drafter.build(t3, weights=str(tmp_path / "no-key")).net.config.norm_before_residual
    assert trees_of(tmp_path / "no-key") != original


@pytest.mark.parametrize("layout", ["llama3", "eagle3"])
def test_fast_engine_runs_dynamic_trees_in_buckets(setup, layout):
    """The dynamic tree changes shape every step; the fast engine pads it to a bucket (its size
    bound, total_tokens - 1) and builds masks per shape, output unchanged. With (fake) CUDA graphs
    the buckets are captured once in the warm-up and only replayed after: no capture per step,
    whatever the shape. EAGLE-3 reads three taps at once, inside the graph."""
    from fake_graphs import FakeGraphs

    from specbench.targets.fast import FastHFTarget

    name, cls = LAYOUTS[layout]
    target = setup[name]
    for fast in (FastHFTarget(target.model, name="fast", bucketed=True, compiled=False), FastHFTarget(target.model, name="fast", graphs=FakeGraphs())):
        drafter = cls.build(fast, weights=str(setup["root"] / layout), tree="dynamic", total_tokens=20, depth=4, top_k=4)
        assert drafter.max_draft_tokens == 19 and len(drafter.taps) == (3 if layout == "eagle3" else 1)
        fast.warm_up(1 + drafter.max_draft_tokens, drafter.taps, 512)
        captured = fast.decoder.graph_set.captured
        for prompt in chat_prompts(2):
            plain = decode(target, PlainDecoding(target), prompt, MAX_NEW).output_ids
            assert decode(fast, drafter, prompt, MAX_NEW).output_ids == plain
        assert fast.decoder.graph_set.captured == captured  # every tree shape replayed a warm-up capture
        assert len(fast.decoder._shapes) > 2  # one per tree shape met, bounded by the LRU


# --- EAGLE-2's dynamic tree by hand -----------------------------------------------------------

def test_dynamic_tree_by_hand():
    """V = 4, top_k 2, 2 rounds. Children's probabilities depend on the parent's token only:
    root [.5 .3 .15 .05] -> t0 .5, t1 .3
    round 0: t0 -> [.1 .2 .7 0]: t2 .35, t1 .10;  t1 -> [.9 .06 .04 0]: t0 .27, t1 .018
             frontier = the best two of those: t2 (.35, under t0), t0 (.27, under t1)
    round 1: t2 -> [.5 .12 .08 .3]: t0 .175, t3 .105;  t0 -> t2 .189, t1 .054
    pool (index: score) 0:.5 1:.3 2:.35 3:.10 4:.27 5:.018 6:.175 7:.105 8:.189 9:.054
    keep 6 -> indices 0 1 2 4 6 8."""
    child = {0: [0.1, 0.2, 0.7, 0.0], 1: [0.9, 0.06, 0.04, 0.0], 2: [0.5, 0.12, 0.08, 0.3], 3: [0.4, 0.3, 0.2, 0.1]}
    log = lambda p: torch.tensor(p, dtype=torch.float64).log()  # noqa: E731
    calls = []

    def expand(round_, tokens, parents):
        calls.append((round_, tokens.tolist(), None if parents is None else parents.tolist()))
        return torch.stack([torch.stack([log(child[int(t)]) for t in row]) for row in tokens])

    first = torch.stack([log([0.5, 0.3, 0.15, 0.05]), log([0.05, 0.15, 0.3, 0.5])])  # problem 1: the mirror image
    pool = grow(first, top_k=2, rounds=2, expand=expand)
    assert calls[0] == (0, [[0, 1], [3, 2]], None)
    assert calls[1][1][0] == [2, 0] and calls[1][2][0] == [0, 1]  # t2 under frontier node 0, t0 under node 1
    torch.testing.assert_close(pool.scores[0].exp(), torch.tensor([.5, .3, .35, .10, .27, .018, .175, .105, .189, .054], dtype=torch.float64))
    kept = select(pool, 6)
    assert kept[0].tolist() == [0, 1, 2, 4, 6, 8]
    tree = draft_tree(pool, kept[:1], lambda rows: rows)
    assert tree.tokens.tolist() == [0, 1, 2, 0, 0, 2] and tree.parents.tolist() == [-1, -1, 0, 1, 2, 3]
    assert select(pool, 4)[0].tolist() == [0, 1, 2, 4]
    true = torch.tensor([[1, 0, 2], [0, 1, 3]])  # along node 1 -> 3 -> 5; along node 0 then a child it does not keep
    depths, accepted = accepted_lengths(pool, kept, torch.cat([true[:1], true[:1]]))
    assert depths[0] == 3 and accepted[0] == 3
    depths, accepted = accepted_lengths(pool, kept, torch.cat([true[1:], true[1:]]))
    assert accepted[0] == 1


def test_dynamic_tree_ties_keep_the_tree_closed():
    """A child whose log-prob is 0 ties its parent; ties go to the lower pool index, i.e. the parent."""
    first = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    pool = grow(first, top_k=1, rounds=3, expand=lambda r, tokens, parents: torch.tensor([[[0.0, float("-inf"), float("-inf")]]]))
    for keep in (1, 2, 3):
        tree = draft_tree(pool, select(pool, keep), lambda rows: rows)
        assert tree.parents.tolist() == list(range(-1, keep - 1))


# --- temperature > 0: EAGLE's tree sampling is lossless in distribution -------------------------

def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    from test_sampling import chi_square, critical

    stat, df = chi_square(counts, probs)
    return stat < critical(df)


def test_tree_sampling_emits_the_target_distribution():
    """Root children [1, 3] (node 0 has child [2]); each emitted token is distributed as the target's
    p at its position: the first as p_root, the second given first = 1 as p at node 0."""
    tree = DraftTree(torch.tensor([1, 3, 2]), torch.tensor([-1, -1, 0]))
    logits = torch.tensor([[1.0, 0.5, -0.3, 0.8, 0.0], [0.2, -1.0, 1.5, 0.0, 0.3], [0.0] * 5, [0.0] * 5])
    p = torch.softmax(logits.double(), -1)
    generator = torch.Generator().manual_seed(0)
    first, second = torch.zeros(5), torch.zeros(5)
    rule = TreeSampling()
    for _ in range(20000):
        result = rule(tree, logits, 1.0, generator)
        emitted = tree.tokens[result.accepted_nodes].tolist() + [result.bonus]
        first[emitted[0]] += 1
        if emitted[0] == 1:
            second[emitted[1]] += 1
    assert chi_square_ok(first, p[0]) and chi_square_ok(second, p[1])
    # the draft's tokens are accepted with probability p(x) in turn: P(node 0) = p(1), P(node 1) = (1 - p(1)) p'(3) = p(3)
    assert abs(first[1] / 20000 - float(p[0, 1])) < 0.01


def test_tree_sampling_by_hand():
    """A single child x with p(x) = 1 is always accepted; with p(x) = 0 never, and the bonus comes
    from p with x removed."""
    tree = DraftTree(torch.tensor([2]), torch.tensor([-1]))
    generator = torch.Generator().manual_seed(0)
    sure = torch.tensor([[-1e9, -1e9, 0.0], [0.0, -1e9, -1e9]])
    assert accept_tree_sampling(tree, sure, 1.0, generator).accepted_nodes == [0]
    never = torch.tensor([[0.0, 0.0, -1e9], [0.0, 0.0, 0.0]])
    for _ in range(20):
        result = accept_tree_sampling(tree, never, 1.0, generator)
        assert result.accepted_nodes == [] and result.bonus in (0, 1)


@pytest.mark.parametrize("tree", ["dynamic", "chain:2"])
def test_sampled_decoding_matches_plain_distribution(tree):
    """End to end at temperature 1: the joint distribution of the 2nd and 3rd tokens equals plain
    sampling's (computed exactly), for a dynamic tree (tree sampling) and a chain (speculative sampling)."""
    from tiny import tiny_target

    target = tiny_target(5, vocab=8, std=0.15, layers=1, hidden=16)
    target.eos_token_ids = set()
    torch.manual_seed(1)
    H = target.hidden_size
    config = EagleConfig(version=1, hidden_size=H, intermediate_size=2 * H, num_heads=4, num_kv_heads=2, head_dim=H // 4, vocab_size=8,
                         draft_vocab_size=8, target_hidden_size=H)
    net = EagleNet(config, embedding=target.input_embeddings).double().eval()
    with torch.no_grad():
        net.fc.weight.normal_(0, 0.2)
    # a tree two deep (so a step can emit the 2nd and 3rd tokens together) with siblings at both levels
    drafter = EagleDrafter(target, net, None, EagleOptions(total_tokens=5, depth=1, top_k=2), tree)
    assert (drafter.acceptance is None) == (tree == "chain:2")
    prompt = torch.tensor([3, 4, 5, 3, 4])
    exact = exact_joint_of_second_and_third(target, prompt, 1.0)
    generator = torch.Generator().manual_seed(2)
    counts = torch.zeros(64, dtype=torch.float64)
    accepted = 0
    samples = 1000
    for _ in range(samples):
        result = decode(target, drafter, prompt, 3, 1.0, generator)
        counts[result.output_ids[1] * 8 + result.output_ids[2]] += 1
        accepted += sum(s.accepted for s in result.steps)
    assert 0 < accepted < 2 * samples
    assert chi_square_ok(counts, exact)


# --- simulate == online ----------------------------------------------------------------------------

def online_steps(setup, target_key, drafter, options):
    config = RunConfig(target=str(setup["root"] / ("target1" if target_key == "t1" else "target3")), drafter=drafter, drafter_options=options,
                       workload=WORKLOAD, limit=LIMIT, max_new_tokens=MAX_NEW, dtype="float64", device="cpu", baseline=False, warmup=False)
    bench = Benchmark(config, target=setup[target_key])
    per_turn = []
    for prompt in bench.prompts:
        steps, _ = bench.measure_prompt(prompt)
        per_turn += [[s for s in steps if s.turn == t] for t in range(len(prompt.turns))]
    return per_turn


def shape_of(steps):
    return [(s.tree_size, s.tree_depth, s.accepted) for s in steps]


@pytest.mark.parametrize("drafter, layout, log, options", [
    ("eagle", "llama3", "log1", {}),
    ("eagle3", "eagle3", "log3", {}),
    ("eagle", "llama3", "log1", {"vocab_trim": 30, "vocab_trim_from": "LOG"}),
    ("eagle3", "speculators", "log3", {"vocab_trim": 40, "vocab_trim_from": "LOG"}),
])
def test_simulate_equals_online(setup, drafter, layout, log, options):
    """Every step's accepted length, τ and per-position acceptance, for a static tree, a chain and the
    dynamic tree, from the log's side file (final states / the EAGLE-3 taps) and the real target's weights."""
    target_key = "t1" if log == "log1" else "t3"
    options = {"weights": str(setup["root"] / layout), **{k: str(setup["root"] / f"{log}.jsonl") if v == "LOG" else v for k, v in options.items()}}
    shapes = [Shape.chain(3), Shape.from_spec("mc_sim_7b_63"), Shape.from_spec("dynamic")]
    simulator = Simulator(setup[log], SimulateConfig(drafter, options, shapes, latency_steps=2), setup[target_key])
    simulation = simulator.score()
    assert simulation.method == "teacher-forced" and simulation.hidden_source.startswith("log side file")
    deep = 0
    for result in simulation.results:
        online = online_steps(setup, target_key, drafter, {**options, "tree": result.shape.spec})
        assert [shape_of(t) for t in result.steps] == [shape_of(t) for t in online], result.shape.name
        flat_sim, flat_online = [s for t in result.steps for s in t], [s for t in online for s in t]
        assert tau(flat_sim) == tau(flat_online) and per_position(flat_sim) == per_position(flat_online)
        deep = max(deep, max(s.accepted for s in flat_online))
    assert deep >= 2, "no step accepted two drafted tokens: deeper levels were not compared"


def test_simulate_eagle3_from_the_log_alone(setup, tmp_path, capsys, monkeypatch):
    """A draft that carries its own embedding needs nothing of the target but the log: the taps come
    from the side file (`record --hidden-taps eagle3`)."""
    t3 = setup["t3"]
    directory = tmp_path / "own-embedding"
    shutil.copytree(setup["root"] / "speculators", directory)
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    state["embed_tokens.weight"] = t3.input_embeddings.weight.detach().clone()
    save_file(state, str(directory / "model.safetensors"))
    code, out, err = run_cli(["simulate", "--log", setup["root"] / "log3.jsonl", "--drafter", "eagle3", "--weights", directory,
                              "--tree", "dynamic,mc_sim_7b_63", "--depth", 3, "--bandwidth", 100, "--latency-steps", 1,
                              "--device", "cpu", "--out", tmp_path / "runs", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "teacher-forced"
    assert re.fullmatch(r"log side file log3\.[0-9a-f]{8}\.hidden\.safetensors \(taps \[2, 3, 3\]\)", result["hidden_source"])
    assert [r["shape"] for r in result["results"]] == ["tree=dynamic", "tree=mc_sim_7b_63"]
    info = json.loads((Path(result["results"][0]["run"]) / "run.json").read_text())
    assert info["extra"]["draft_passes_per_step"] == 4 and info["extra"]["drafter"]["draft_vocab"] == DRAFT_VOCAB
    # a log holding only the final states: one line naming the fix
    record(t3, load_workload(WORKLOAD)[:1], WORKLOAD, 8, tmp_path / "final.jsonl", hidden=True)
    code, out, err = run_cli(["simulate", "--log", tmp_path / "final.jsonl", "--drafter", "eagle3", "--weights", directory,
                              "--tree", "dynamic", "--bandwidth", 100, "--device", "cpu", "--out", tmp_path / "runs"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds the taps final, not 2, 3, 3: record with --hidden-taps 2,3,3, or pass --target" in err, err


def test_record_hidden_taps(setup):
    """The side file holds the input of each requested layer (HF hidden_states[j]); old logs without
    hidden_taps read as final states only."""
    log, t3 = setup["log3"], setup["t3"]
    assert log.recorded_taps == (2, 3) and log.header.hidden_size == t3.hidden_size
    turn = log.turns[0]
    sequence = torch.tensor(turn.prompt_ids + turn.output_ids[:-1])
    with torch.no_grad():
        states = t3.model(sequence[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(log.hidden(turn, (3, 2)), torch.cat([states[3][0], states[2][0]], -1))
    assert setup["log1"].recorded_taps == (None,)
    # a log written before hidden_taps existed: its side file holds the final states
    old = setup["root"] / "old-log" / "log.jsonl"
    old.parent.mkdir()
    lines = (setup["root"] / "log1.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    del header["hidden_taps"]
    old.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    shutil.copy(setup["log1"].hidden_path, old.parent / header["hidden_file"])
    old_log = read_log(old)
    assert old_log.recorded_taps == (None,)
    torch.testing.assert_close(old_log.hidden(old_log.turns[0]), setup["log1"].hidden(setup["log1"].turns[0]))
    with pytest.raises(UserError, match="outside the target's 6 layers"):
        parse_hidden_taps("2,6", 6)
    assert parse_hidden_taps("eagle3,1", 32) == (2, 16, 29, 1)


def test_vocab_trim_drafts_only_kept_ids(setup):
    """EAGLE-3's draft vocabulary is already a trim; --vocab-trim cuts it further to the ids among the N
    most frequent target tokens (EAGLE-1: rows of the target's LM head). Greedy output unchanged."""
    t3 = setup["t3"]
    drafter = build(setup, "eagle3", tree="dynamic", vocab_trim=30, vocab_trim_from=str(setup["root"] / "log3.jsonl"))
    info = drafter.describe()
    kept = set(drafter.net.head_ids.tolist())
    assert info["draft_vocab"] == DRAFT_VOCAB and info["vocab_trim"] == 30 and info["drafted_vocab"] == len(kept) <= 30
    assert kept <= set(setup["draft_ids"].tolist())
    drafted = set()
    original = drafter.propose
    drafter.propose = lambda ctx: (tree := original(ctx), drafted.update(tree.tokens.tolist()))[0]
    for prompt in chat_prompts(2):
        assert decode(t3, drafter, prompt, MAX_NEW).output_ids == decode(t3, PlainDecoding(t3), prompt, MAX_NEW).output_ids
    assert drafted <= kept
    eagle1 = build(setup, "llama3", vocab_trim=20, vocab_trim_from=str(setup["root"] / "log1.jsonl"))
    assert eagle1.describe()["drafted_vocab"] == 20 and eagle1.memory_model()[0] < build(setup, "llama3").memory_model()[0]


def test_cli_runs_eagle3_and_reports_it(setup, tmp_path, capsys, monkeypatch):
    # `--heads`, EAGLE's old name for its weights, still works: one deprecation line, and the run records `weights`
    code, out, err = run_cli(["run", "--target", setup["root"] / "target3", "--drafter", "eagle3", "--heads", setup["root"] / "eagle3",
                              "--total-tokens", 12, "--depth", 3, "--top-k", 3, "--limit", 1, "--max-new-tokens", 12,
                              "--dtype", "float64", "--device", "cpu", "--out", tmp_path, "--json"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exact_match_rate"] == 1.0
    info = json.loads((Path(summary["run"]) / "run.json").read_text())
    assert info["extra"]["drafter"]["taps"] == [2, 3, 3] and info["extra"]["draft_passes_per_step"] == 4
    assert err.count("option heads is deprecated") == 1 and "use --weights" in err and "weights" in info["drafter_options"]
    # in the report like any drafter: τ, per position, the DSD view (τ against draft latency)
    code, out, err = run_cli(["report", summary["run"], "--by", "position", "--csv", tmp_path / "p.csv", "--plot", tmp_path / "plots"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "eagle3" in (tmp_path / "p.csv").read_text() and (tmp_path / "plots" / "tau_vs_draft_ms.png").is_file()
    code, out, err = run_cli(["run", "--target", setup["root"] / "target3", "--drafter", "eagle3", "--weights", setup["root"] / "llama3",
                              "--limit", 1, "--device", "cpu", "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "use --drafter eagle" in err, err
