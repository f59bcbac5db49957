"""Medusa, Hydra and decoder-layer Hydra: the published checkpoint layouts load
key by key, greedy decoding stays exactly plain decoding, Hydra drafts level by
level in node order, the prefix layer's cache holds exactly the accepted
tokens, and typical acceptance matches a hand computation."""

import json
import sys
import warnings

import pytest
import torch
from head_layouts import (
    write_hydra,
    write_hydra_decoder,
    write_medusa2_full,
    write_medusa_v1,
    write_medusa_version2,
)
from tiny import prompts, tiny_target

from specbench.drafters.heads.decoder import HydraDecoderDrafter
from specbench.drafters.heads.hydra import HydraDrafter
from specbench.drafters.heads.medusa import MedusaDrafter
from specbench.engine.acceptance import TypicalAcceptance, accept_typical
from specbench.engine.loop import decode
from specbench.engine.protocol import FINAL, PlainDecoding
from specbench.engine.tree import DraftTree
from specbench.errors import SpecbenchWarning, UserError

torch.set_num_threads(1)
MAX_NEW = 30
PROMPTS = 20


@pytest.fixture(scope="module")
def target():
    return tiny_target(0)


@pytest.fixture(scope="module")
def plain_outputs(target):
    return [decode(target, PlainDecoding(target), p, MAX_NEW).output_ids for p in prompts(PROMPTS)]


@pytest.fixture(scope="module")
def checkpoints(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {
        "medusa": (root / "medusa", write_medusa_v1(root / "medusa", target, num_heads=5)),
        "medusa-2layer": (root / "medusa2l", write_medusa_v1(root / "medusa2l", target, num_heads=4, num_layers=2)),
        "medusa-safetensors": (root / "medusa-st", write_medusa_v1(root / "medusa-st", target, num_heads=4, num_layers=2, fmt="safetensors")),
        "medusa-2": (root / "medusa-full", write_medusa2_full(root / "medusa-full", target)),
        "medusa-v2": (root / "medusa-v2", write_medusa_version2(root / "medusa-v2", target)),
        "hydra-prefix": (root / "hydra-prefix", write_hydra(root / "hydra-prefix", target, "prefix-mlp")),
        "hydra-mlp": (root / "hydra-mlp", write_hydra(root / "hydra-mlp", target, "mlp", num_layers=2)),
        "hydra-decoder": (root / "hydra-decoder", write_hydra_decoder(root / "hydra-decoder", target, num_decoder_layers=1, num_heads=4)),
    }


def assert_same(loaded: dict, published: dict, dtype=torch.float64):
    assert sorted(loaded) == sorted(published)
    for key in published:
        assert torch.equal(loaded[key], published[key].to(dtype)), key


def build(name, target, checkpoints, tree="mc_sim_7b_63"):
    directory = checkpoints[name][0]
    if name.startswith("medusa"):
        return MedusaDrafter.build(target, heads=str(directory), tree=tree)
    if name.startswith("hydra-decoder"):
        return HydraDecoderDrafter.build(target, heads=str(directory), tree=tree)
    return HydraDrafter.build(target, heads=str(directory), tree=tree)


# --- the published layouts load key by key -------------------------------------

@pytest.mark.parametrize("name", ["medusa", "medusa-2layer", "medusa-safetensors", "medusa-2", "medusa-v2"])
def test_medusa_layouts_load_key_by_key(name, target, checkpoints):
    published = checkpoints[name][1].state_dict()
    drafter = build(name, target, checkpoints, tree="chain:3")
    assert_same(drafter.heads.heads.state_dict(), published)
    assert drafter.num_heads == len(checkpoints[name][1])  # from the keys: 5, where the v1 config says 2
    if name in ("medusa-2layer", "medusa-safetensors"):  # the ResBlock is one shared module, as in the reference
        head = drafter.heads.heads[0]
        assert head[0] is head[1]
    if name == "medusa-v2":
        assert drafter.heads.base_lm_head[0] is target.lm_head


def test_medusa2_by_hub_id_fetches_only_the_heads_shard(target, checkpoints, tmp_path, monkeypatch):
    """A sharded Medusa-2 model on the hub: the index says which shard holds `medusa_head.*`; only
    that shard is downloaded (the base weights are the target's, already loaded)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from specbench.drafters import checkpoints as files

    hub = tmp_path / "hub-repo"  # the repository as published: two shards and an index
    hub.mkdir()
    tensors = load_file(str(checkpoints["medusa-2"][0] / "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.startswith("medusa_head.")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.startswith("medusa_head.")}}
    for name, part in shards.items():
        save_file(part, str(hub / name))
    weight_map = {key: name for name, part in shards.items() for key in part}
    (hub / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(checkpoints["medusa-2"][0] / "config.json", hub / "config.json")

    snapshot, fetched = tmp_path / "snapshot", []

    def fake_download(repo_id, file_names, what="heads"):  # snapshot_download with allow_patterns, over the copy above
        snapshot.mkdir(exist_ok=True)
        for file in hub.iterdir():
            if file.suffix == ".json" or file.name in file_names:
                fetched.append(file.name)
                shutil.copy(file, snapshot / file.name)
        return snapshot

    monkeypatch.setattr(files, "download", fake_download)
    drafter = MedusaDrafter.build(target, heads="FasterDecoding/medusa-2-tiny", tree="chain:3")
    assert_same(drafter.heads.heads.state_dict(), checkpoints["medusa-2"][1].state_dict())
    assert "model-00002-of-00002.safetensors" in fetched and "model-00001-of-00002.safetensors" not in fetched


def test_medusa2_with_a_shard_missing_is_one_error(target, checkpoints, tmp_path):
    """A local Medusa-2 directory whose index names a shard that is not there: say so, no safetensors traceback."""
    import shutil

    from specbench.errors import UserError

    broken = tmp_path / "medusa2-broken"
    broken.mkdir()
    shutil.copy(checkpoints["medusa-2"][0] / "config.json", broken / "config.json")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"medusa_head.0.0.linear.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors is listed in model.safetensors.index.json but missing"):
        MedusaDrafter.build(target, heads=str(broken), tree="chain:3")


@pytest.mark.parametrize("name", ["hydra-prefix", "hydra-mlp"])
def test_hydra_layouts_load_key_by_key(name, target, checkpoints):
    published = checkpoints[name][1].state_dict()
    drafter = build(name, target, checkpoints, tree="chain:3")
    heads = {k: v for k, v in published.items() if k.startswith("hydra_")}
    assert_same(drafter.heads.state_dict(), heads)
    assert torch.equal(drafter.embed.weight, published["input_embed_fn.weight"].double())
    if name == "hydra-prefix":
        prefix = {k.removeprefix("prefix_embeding_layer."): v for k, v in published.items()
                  if k.startswith("prefix_embeding_layer.") and ".embed_tokens." not in k and not k.endswith("embed_tokens.weight")}
        assert_same(drafter.prefix.layer_state_dict(), prefix)
        # later blocks are one shared module, stored under every index
        mlp = drafter.heads.hydra_mlp[1]
        assert mlp[3] is mlp[5] is mlp[7]
    else:
        assert drafter.prefix is None


def test_hydra_decoder_pickled_modules_load_without_the_reference_package(target, checkpoints):
    assert "medusa" not in sys.modules  # the classes the pickle names are not importable here
    modules = checkpoints["hydra-decoder"][1]
    drafter = build("hydra-decoder", target, checkpoints, tree="chain:3")
    assert_same(drafter.heads.heads.state_dict(), modules["medusa_head"].state_dict())
    trunk = drafter.trunk.layer_state_dict()
    # the rotary tables inside the pickled 4.31 layers are recomputed from the target, never loaded
    expected = {f"layers.{k}": v for k, v in modules["medusa_decoder_layers"].state_dict().items() if "rotary_emb." not in k}
    expected["norm.weight"] = modules["medusa_rms_norm"].weight
    assert_same(trunk, {k: v.to(torch.bfloat16) for k, v in expected.items()})
    assert drafter.taps == (target.num_layers - 1,)


# --- greedy output == plain decoding -------------------------------------------

@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain:4"])
@pytest.mark.parametrize("name", ["medusa", "hydra-prefix", "hydra-mlp", "hydra-decoder"])
def test_greedy_equals_plain(name, tree, target, checkpoints, plain_outputs):
    drafter = build(name, target, checkpoints, tree=tree)
    accepted, deep = 0, 0
    for prompt, expected in zip(prompts(PROMPTS), plain_outputs):
        result = decode(target, drafter, prompt, MAX_NEW)
        assert result.output_ids == expected
        accepted += sum(s.accepted for s in result.steps)
        deep += sum(s.accepted >= 2 for s in result.steps)
    assert accepted > 0 and deep > 0  # drafts were sometimes right, beyond the first level too


def test_hydra_hidden_state_offset_reads_an_earlier_layer(target, tmp_path, plain_outputs):
    write_hydra(tmp_path, target, "mlp", num_layers=1, offset=1)
    drafter = HydraDrafter.build(target, heads=str(tmp_path), tree="mc_sim_7b_63")
    assert drafter.taps == (target.num_layers - 1,)
    for prompt, expected in zip(prompts(5), plain_outputs):
        assert decode(target, drafter, prompt, MAX_NEW).output_ids == expected


# --- Hydra drafts level by level, in node order ----------------------------------

def test_hydra_proposal_is_in_node_order(target, checkpoints):
    drafter = build("hydra-prefix", target, checkpoints)
    prompt = prompts(1, seed=5)[0]
    _, hidden = target.prefill(prompt, FINAL)
    drafter.begin(prompt, hidden)
    tokens = torch.cat([prompt, torch.tensor([7])])
    from specbench.engine.protocol import DraftContext

    tree = drafter.propose(DraftContext(tokens, prompt.numel(), 50, 0.0, None))
    shape = drafter.shape
    assert drafter.prefix.cached == prompt.numel()
    assert tree.parents.tolist() == shape.parents
    # every node on its own: head d-1 over [base, emb(root), emb(tokens on the branch)], rank r of its top-k
    for i, path in enumerate(shape.paths):
        branch = [int(tree.tokens[j]) for j in tree.path_to(i)[:-1]]
        features = torch.cat([drafter.last_hidden, *[drafter.embed.weight[t] for t in [7, *branch]]])
        logits = drafter.heads.head(len(path) - 1, features[None])[0]
        assert int(tree.tokens[i]) == int(logits.topk(path[-1] + 1).indices[path[-1]]), path


def test_prefix_layer_cache_holds_exactly_the_accepted_tokens(target, checkpoints):
    drafter = build("hydra-prefix", target, checkpoints)
    consume = drafter.consume
    lengths = []

    def check(rows):
        state = consume(rows)  # rows accepted since the last draft go in at the start of the next
        lengths.append((drafter.prefix.cached, target.seq_len))
        return state

    drafter.consume = check
    prompt = prompts(1, seed=9)[0]
    result = decode(target, drafter, prompt, MAX_NEW)
    assert lengths and all(mine == theirs for mine, theirs in lengths)
    assert any(s.accepted > 0 for s in result.steps)
    # its keys are what the layer computes over the target's states of exactly the accepted sequence
    drafter.catch_up()  # the last step's accepted rows (fed at the next draft, which never came)
    assert drafter.prefix.cached == target.seq_len
    kept = torch.cat([prompt, torch.tensor(result.output_ids)])[: target.seq_len]
    _, hidden = target.prefill(kept, FINAL)
    fresh = type(drafter.prefix)(target.config, 1).double()
    fresh.model.load_state_dict(drafter.prefix.model.state_dict())
    fresh.feed(hidden)
    for mine, reference in zip(drafter.prefix.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(mine.keys, reference.keys, rtol=0, atol=1e-9)


# --- typical acceptance ---------------------------------------------------------

def test_typical_acceptance_hand_computed():
    # root -> n0:1, n1:2 ; n0 -> n2:2 ; n1 -> n3:0
    tree = DraftTree(torch.tensor([1, 2, 2, 0]), torch.tensor([-1, -1, 0, 1]))
    probs = torch.tensor(
        [
            [0.05, 0.50, 0.45, 0.00],  # root: H = 0.8879 -> alpha*exp(-H) = 0.1233 -> threshold 0.09; 1 and 2 pass
            [0.96, 0.01, 0.02, 0.01],  # n0: H = 0.2 -> 0.3*exp(-0.2) = 0.2456, threshold 0.09: token 2 (0.02) fails
            [0.60, 0.30, 0.05, 0.05],  # n1: token 0 (0.60) passes
            [0.25, 0.25, 0.25, 0.25],  # n2
            [0.10, 0.10, 0.70, 0.10],  # n3: bonus row
        ],
        dtype=torch.float64,
    )
    rule = TypicalAcceptance(posterior_threshold=0.09, posterior_alpha=0.3)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    expected = torch.minimum(torch.full_like(entropy, 0.09), 0.3 * torch.exp(-entropy))
    torch.testing.assert_close(rule.thresholds(probs), expected)
    assert float(expected[4]) == pytest.approx(min(0.09, 0.3 * float(torch.exp(-entropy[4]))))
    result = accept_typical(tree, torch.log(probs), 1.0, rule, torch.Generator().manual_seed(0))
    assert result.accepted_nodes == [1, 3]  # root -> 2 -> 0: the only depth-2 path that passes
    # the bonus comes from n3's row with tokens below the threshold (0.1 > 0.09 pass: all four)
    draws = {accept_typical(tree, torch.log(probs), 1.0, rule, torch.Generator().manual_seed(s)).bonus for s in range(200)}
    assert draws == {0, 1, 2, 3}
    # stricter: threshold = min(0.5, 1.0 * exp(-H)); n3's row (H = 0.940) keeps only p >= 0.391: token 2
    strict = TypicalAcceptance(posterior_threshold=0.5, posterior_alpha=1.0)
    for seed in range(20):
        result = accept_typical(tree, torch.log(probs), 1.0, strict, torch.Generator().manual_seed(seed))
        assert result.accepted_nodes == [1, 3] and result.bonus == 2
    # n0's token 2 has p = 0.02 < 0.09: the branch root -> 1 stops at depth 1, never reaching n2
    assert not any(n == 2 for n in accept_typical(tree, torch.log(probs), 1.0, rule, None).accepted_nodes)


def test_typical_ties_go_to_the_likelier_path():
    tree = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]))
    probs = torch.tensor([[0.0, 0.3, 0.7], [1 / 3] * 3, [1 / 3] * 3], dtype=torch.float64)
    result = accept_typical(tree, torch.log(probs + 1e-12), 1.0, TypicalAcceptance(), None)
    assert result.accepted_nodes == [1]  # both pass at depth 1; token 2 is likelier


# --- bad input: one clear line ------------------------------------------------------

def test_errors_are_clear(target, checkpoints, tmp_path):
    with pytest.raises(UserError, match="no Medusa heads in"):
        MedusaDrafter.build(target, heads=str(tmp_path))
    with pytest.raises(UserError, match="heads 'nothing-here' not found"):
        MedusaDrafter.build(target, heads="nothing-here")
    with pytest.raises(UserError, match="no published medusa heads for target"):
        MedusaDrafter.build(target)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"foo.weight": torch.zeros(2)}, bad / "medusa_lm_head.pt")
    with pytest.raises(UserError, match="unexpected key 'foo.weight'"):
        MedusaDrafter.build(target, heads=str(bad))
    (bad / "medusa_lm_head.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        MedusaDrafter.build(target, heads=str(bad))
    other = tiny_target(1, hidden=32)
    with pytest.raises(UserError, match="hidden-size mismatch"):
        MedusaDrafter.build(other, heads=str(checkpoints["medusa"][0]))
    other = tiny_target(1, vocab=80)
    with pytest.raises(UserError, match="vocabulary mismatch"):
        HydraDrafter.build(other, heads=str(checkpoints["hydra-mlp"][0]))
    with pytest.raises(UserError, match="only 5 heads"):
        MedusaDrafter.build(target, heads=str(checkpoints["medusa"][0]), tree="chain:6")
    with pytest.raises(UserError, match="posterior"):
        MedusaDrafter.build(target, heads=str(checkpoints["medusa"][0]), posterior_threshold=0)


def test_base_model_mismatch_warns_naming_both(target, checkpoints, tmp_path):
    write_medusa_v1(tmp_path, target, num_heads=2)
    config = (tmp_path / "config.json").read_text().replace(target.model_id, "lmsys/vicuna-7b-v1.3")
    (tmp_path / "config.json").write_text(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MedusaDrafter.build(target, heads=str(tmp_path), tree="chain:2")
    messages = [str(w.message) for w in caught if issubclass(w.category, SpecbenchWarning)]
    assert len(messages) == 1 and "lmsys/vicuna-7b-v1.3" in messages[0] and target.model_id in messages[0]


def test_hydra_decoder_refuses_what_it_cannot_map(target, tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"medusa_head": Evil()}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(UserError, match="refusing to load global"):
        HydraDecoderDrafter.build(target, heads=str(tmp_path))
    # a file with the heads but no trunk: the reference loads nothing and carries on; we stop
    write_medusa_v1(tmp_path, target, num_heads=3)
    with pytest.raises(UserError, match="cannot map '0.0.linear.weight'"):
        HydraDecoderDrafter.build(target, heads=str(tmp_path))


def pickled_globals(path) -> set[tuple[str, str]]:
    """Every global a torch zip checkpoint's pickle names (protocol 2: GLOBAL "module name")."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_hydra_decoder_fixture_names_only_the_published_classes(checkpoints):
    """The fixture's bytes follow the reference package, not the installed transformers (which,
    from 5.25 with `kernels`, pickles kernel-decorated classes): the only non-torch globals are
    the reference's own module classes and 4.31's LlamaConfig."""
    names = pickled_globals(checkpoints["hydra-decoder"][0] / "medusa_lm_head.pt")
    own = {(m, n) for m, n in names if not m.startswith(("torch", "collections", "copyreg", "__builtin__", "builtins"))}
    kv = "medusa.model.modeling_llama_kv"
    assert own == {("medusa.model.medusa_model", "ResBlock"), (kv, "LlamaDecoderLayer"), (kv, "LlamaAttention"), (kv, "LlamaMLP"),
                   (kv, "LlamaRMSNorm"), (kv, "LlamaRotaryEmbedding"), ("transformers.models.llama.configuration_llama", "LlamaConfig")}


def test_a_kernels_global_in_a_pickle_is_one_line_naming_the_fix(target, tmp_path):
    """A checkpoint saved from kernel-decorated transformers classes names a `kernels` function;
    it is refused (never called) with the fix, not unpickled."""
    from head_layouts import save_naming_modules

    called = []

    def _rebuild_kernel_func(*args):
        called.append(args)

    _rebuild_kernel_func.__module__ = "kernels._internals.layer.layer"
    _rebuild_kernel_func.__qualname__ = "_rebuild_kernel_func"

    class KernelDecorated:
        def __reduce__(self):
            return (_rebuild_kernel_func, ("rms_norm",))

    save_naming_modules({"medusa_head": KernelDecorated()}, tmp_path / "medusa_lm_head.pt",
                        {"kernels": {}, "kernels._internals": {}, "kernels._internals.layer": {},
                         "kernels._internals.layer.layer": {"_rebuild_kernel_func": _rebuild_kernel_func}})
    with pytest.raises(UserError) as refused:
        HydraDecoderDrafter.build(target, heads=str(tmp_path))
    message = str(refused.value)
    assert "refusing to load global kernels._internals.layer.layer._rebuild_kernel_func" in message
    assert "safetensors" in message and "\n" not in message and not called


def test_hydra_decoder_trunk_key_it_cannot_map_is_refused(target, checkpoints, tmp_path):
    """The same layout saved as plain tensors, one trunk key added: one line naming it (the rotary
    tables are the only keys a trunk may carry beyond the target's layer weights)."""
    modules = checkpoints["hydra-decoder"][1]
    state = {f"{group}.{k}": v for group in ("medusa_head", "medusa_decoder_layers") for k, v in modules[group].state_dict().items()}
    state["medusa_rms_norm.weight"] = modules["medusa_rms_norm"].weight.detach()
    (tmp_path / "config.json").write_text((checkpoints["hydra-decoder"][0] / "config.json").read_text())
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    HydraDecoderDrafter.build(target, heads=str(tmp_path), tree="chain:2")  # as published: loads
    state["medusa_decoder_layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(UserError, match="cannot map 'layers.0.self_attn.q_norm.weight'"):
        HydraDecoderDrafter.build(target, heads=str(tmp_path), tree="chain:2")


def test_fresh_heads_build_for_any_target(target, plain_outputs):
    for drafter in (
        MedusaDrafter.build(target, heads="fresh", tree="chain:3"),
        HydraDrafter.build(target, heads="fresh", tree="chain:3"),
        HydraDecoderDrafter.build(target, decoder_layers=2, tree="chain:3"),  # any target: an untrained trunk
    ):
        assert decode(target, drafter, prompts(1)[0], MAX_NEW).output_ids == plain_outputs[0]
    with pytest.raises(UserError, match="--decoder-layers must be between 1 and"):
        HydraDecoderDrafter.build(target, heads="fresh", decoder_layers=3)


def test_head_drafters_keep_their_options_and_leave_the_callers_alone(target):
    for cls, given in ((MedusaDrafter, {"heads": "fresh", "tree": "chain:2", "posterior_alpha": 0.2}),
                       (HydraDecoderDrafter, {"decoder_layers": 1, "tree": "chain:2", "posterior_alpha": 0.2})):
        options = cls.Options.parse(cls.name, given)
        before = options.to_json()
        drafter = cls.create(target, options)
        assert drafter.options.posterior_alpha == 0.2 and drafter.acceptance.posterior_alpha == 0.2
        assert options.to_json() == before  # hydra-decoder's fresh trunk on an uncatalogued target: its own copy says heads=fresh


# --- the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    from tiny import save_tiny_model

    from specbench.targets.hf import HFTarget

    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model(root / "target", seed=0)
    local = HFTarget.load(str(model_dir), torch.device("cpu"), torch.float32)
    write_medusa_v1(root / "medusa", local, num_heads=4)
    write_hydra(root / "hydra", local, "prefix-mlp")
    return {"target": model_dir, "medusa": root / "medusa", "hydra": root / "hydra", "root": root}


def test_cli_runs_head_drafters(cli_models, tmp_path, capsys, monkeypatch):
    import json

    from test_cli import run_cli

    base = ["run", "--target", cli_models["target"], "--limit", 2, "--max-new-tokens", 16, "--dtype", "float32", "--out", tmp_path, "--json"]
    code, out, err = run_cli([*base, "--drafter", "medusa", "--heads", cli_models["medusa"], "--tree", "mc_sim_7b_63"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exact_match_rate"] == 1.0 and summary["steps"] > 0
    code, out, err = run_cli([*base, "--drafter", "hydra", "--heads", cli_models["hydra"], "--tree", "chain:3",
                              "--temperature", 0.7, "--posterior-threshold", 0.09, "--posterior-alpha", 0.3], capsys, monkeypatch)
    assert code == 0, err
    # run ids start with the second they began: pick the hydra run by name, not by sort order
    (run_dir,) = [d for d in tmp_path.iterdir() if "-hydra-" in d.name]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["drafter_options"]["posterior_alpha"] == 0.3 and info["extra"]["drafter"]["tree"] == "chain:3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drafter", "medusa", "--heads", "fresh", "--tree", "nope"], "unknown tree 'nope'"),
        (["--drafter", "hydra", "--heads", "./missing/heads"], "heads './missing/heads' not found"),
        (["--drafter", "medusa"], "no published medusa heads for target"),
        (["--drafter", "hydra-decoder", "--decoder-layers", 9], "--decoder-layers must be between 1 and"),
        (["--drafter", "hydra", "--heads", "fresh", "-o", "num_heads=0"], "--num-heads must be at least 1"),
    ],
)
def test_cli_bad_head_input_is_one_line(args, message, cli_models, tmp_path, capsys, monkeypatch):
    from test_cli import run_cli

    code, out, err = run_cli(["run", "--target", cli_models["target"], *args, "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_cli_warns_on_heads_for_another_base_model(cli_models, tmp_path, capsys, monkeypatch):
    from test_cli import run_cli

    other = cli_models["root"] / "medusa-other"
    other.mkdir(exist_ok=True)
    for f in cli_models["medusa"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text('{"base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "medusa_num_heads": 2, "medusa_num_layers": 1}')
    code, out, err = run_cli(["run", "--target", cli_models["target"], "--drafter", "medusa", "--heads", other, "--tree", "chain:2",
                              "--limit", 1, "--max-new-tokens", 8, "--out", tmp_path], capsys, monkeypatch)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "warning:" in line]
    assert len(lines) == 1 and "lmsys/vicuna-7b-v1.3" in lines[0] and str(cli_models["target"]) in lines[0]


# --- VocabTrim on head drafters ---------------------------------------------------------

@pytest.mark.parametrize("name", ["medusa", "hydra-prefix", "hydra-mlp", "hydra-decoder"])
def test_vocab_trim_keeps_greedy_exact_and_drafts_only_kept_ids(name, target, checkpoints, plain_outputs, tmp_path):
    from specbench.drafters.vocab_trim import ranked_ids, save_ids

    counts = torch.bincount(torch.tensor([t for out in plain_outputs for t in out]), minlength=target.vocab_size)
    ranked = ranked_ids({i: int(c) for i, c in enumerate(counts) if c}, target.vocab_size)
    ids_file = tmp_path / "ids.json"
    save_ids(ids_file, ranked[1:] + ranked[:1], "tiny", target.vocab_size, "test")  # the most frequent id ranked last
    cls = {"medusa": MedusaDrafter, "hydra-decoder": HydraDecoderDrafter}.get(name, HydraDrafter)
    drafter = cls.build(target, heads=str(checkpoints[name][0]), tree="mc_sim_7b_63", vocab_trim=30, vocab_trim_from=str(ids_file))
    kept = set(drafter.head_ids.tolist())
    assert len(kept) == 30 and ranked[0] not in kept
    assert drafter.describe()["vocab_trim"] == 30
    drafted, accepted = set(), 0
    propose = drafter.propose

    def spy(ctx):
        tree = propose(ctx)
        drafted.update(tree.tokens.tolist())
        return tree

    drafter.propose = spy
    for prompt, expected in list(zip(prompts(PROMPTS), plain_outputs))[:8]:
        result = decode(target, drafter, prompt, MAX_NEW)
        assert result.output_ids == expected
        accepted += sum(s.accepted for s in result.steps)
    assert drafted <= kept and accepted > 0
    with pytest.raises(UserError, match="keeps fewer tokens than tree"):
        cls.build(target, heads=str(checkpoints[name][0]), tree="mc_sim_7b_63", vocab_trim=5, vocab_trim_from=str(ids_file))


# --- pruning (prune_below): a node is drafted only where its path probability reaches the floor -

def path_probabilities(drafter, tree, root):
    """Each node's path probability, node by node: head d-1 over its own branch, the softmax
    probability of its token, times its parent's."""
    found = []
    for i in range(len(tree)):
        branch = [int(tree.tokens[j]) for j in tree.path_to(i)[:-1]]
        features = torch.cat([drafter.last_hidden, *[drafter.embed.weight[t] for t in [root, *branch]]])
        probs = torch.softmax(drafter.heads.head(len(branch), features[None])[0].float(), -1)
        parent = int(tree.parents[i])
        found.append(float(probs[int(tree.tokens[i])]) * (found[parent] if parent >= 0 else 1.0))
    return found


def test_pruned_hydra_keeps_exactly_the_nodes_whose_path_probability_reaches_the_floor(target, checkpoints):
    from specbench.engine.protocol import DraftContext

    prompt = prompts(1, seed=5)[0]
    _, hidden = target.prefill(prompt, FINAL)
    tokens = torch.cat([prompt, torch.tensor([7])])
    context = DraftContext(tokens, prompt.numel(), 50, 0.0, None)
    whole = build("hydra-prefix", target, checkpoints)
    whole.begin(prompt, hidden)
    full = whole.propose(context)
    probabilities = path_probabilities(whole, full, 7)
    ordered = sorted(probabilities)
    floor = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2  # half the nodes above, half below
    pruned = HydraDrafter.build(target, heads=str(checkpoints["hydra-prefix"][0]), tree="mc_sim_7b_63", prune_below=floor)
    pruned.begin(prompt, hidden)
    tree = pruned.propose(context)
    kept = [i for i, p in enumerate(probabilities) if p >= floor]
    assert 0 < len(kept) < len(full)
    assert tree.tokens.tolist() == full.tokens[kept].tolist()
    assert [kept[p] if p >= 0 else -1 for p in tree.parents.tolist()] == full.parents[kept].tolist()
    assert pruned.describe()["prune_below"] == floor


@pytest.mark.parametrize("name", ["hydra-prefix", "hydra-mlp"])
def test_pruned_hydra_greedy_equals_plain_and_drafts_fewer_nodes(name, target, checkpoints, plain_outputs):
    drafter = HydraDrafter.build(target, heads=str(checkpoints[name][0]), tree="mc_sim_7b_63", prune_below=0.1)
    sizes, accepted = [], 0
    for prompt, expected in zip(prompts(PROMPTS), plain_outputs):
        result = decode(target, drafter, prompt, MAX_NEW)
        assert result.output_ids == expected
        sizes += [s.tree_size for s in result.steps]
        accepted += sum(s.accepted for s in result.steps)
    assert accepted > 0 and max(sizes) < 63 and len(set(sizes)) > 2  # trees of many sizes, none whole


def test_pruning_everything_is_plain_decoding(target, checkpoints, plain_outputs):
    drafter = HydraDrafter.build(target, heads=str(checkpoints["hydra-prefix"][0]), tree="chain:4", prune_below=1.0)
    for prompt, expected in zip(prompts(3), plain_outputs):
        result = decode(target, drafter, prompt, MAX_NEW)
        assert result.output_ids == expected and all(s.tree_size == 0 for s in result.steps)
