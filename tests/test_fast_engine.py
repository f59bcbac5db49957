"""The fast engine (static KV cache) against the eager one: same tokens for every
built-in drafter, the same KV after tree verification, and the cache surgery itself."""

import json

import pytest
import torch
from test_cli import models, run_cli  # noqa: F401 (models is a fixture)
from tiny import perturbed, prompts, tiny_llama

from specbench.drafters.draft_model import DraftModelDrafter
from specbench.drafters.prompt_lookup import PromptLookupDrafter
from specbench.engine.engines import resolve_engine
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.static_cache import StaticKV, bucket_size, shape_masks
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget

MAX_NEW = 32

DRAFTERS = {
    "plain": lambda target, draft: PlainDecoding(target),
    "prompt-lookup": lambda target, draft: PromptLookupDrafter.build(target, k=4, min_ngram=1),
    "draft-model": lambda target, draft: DraftModelDrafter(target, draft, k=4),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def fp32():
    model = tiny_llama(0).float()
    return model, perturbed(model, noise=0.01)


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_fast_equals_eager_fp32(fp32, drafter):
    """Greedy tokens are identical on both engines (fp32, as a CPU run uses)."""
    model, draft = fp32
    eager, fast = HFTarget(model), FastHFTarget(model)
    drafted = 0
    for prompt in prompts(8):
        expected = decode(eager, DRAFTERS[drafter](eager, draft), prompt, MAX_NEW)
        got = decode(fast, DRAFTERS[drafter](fast, draft), prompt, MAX_NEW)
        assert got.output_ids == expected.output_ids
        assert [s.accepted for s in got.steps] == [s.accepted for s in expected.steps]
        drafted += sum(s.tree_size for s in got.steps)
    assert drafter == "plain" or drafted > 0


@pytest.mark.parametrize("drafter", ["plain", "draft-model"])
def test_bucketed_padding_and_regrowth_equal_plain(drafter):
    """Queries padded to bucket sizes (as CUDA graphs run them) and a cache too small for the
    sequence still give plain decoding's tokens (fp64: exact); the capacity is planned at
    prefill, so the storage is never reallocated mid-sequence."""
    model = tiny_llama(0)
    draft = perturbed(model, noise=0.01)
    eager = HFTarget(model)
    fast = FastHFTarget(model, bucketed=True)
    fast.cache.capacity = 8  # smaller than any prompt + output: the prefill must size it
    for prompt in prompts(4):
        expected = decode(eager, PlainDecoding(eager), prompt, MAX_NEW).output_ids
        assert decode(fast, DRAFTERS[drafter](fast, draft), prompt, MAX_NEW).output_ids == expected
    assert fast.cache.capacity >= 256 and fast.cache.generation == 0


def test_tree_verify_and_commit_match_eager_kv():
    """A branching tree verified and committed on the static cache leaves the same
    logits and the same KV prefix as the eager engine."""
    model = tiny_llama(0)
    eager, fast = HFTarget(model), FastHFTarget(model, bucketed=True)
    prompt = prompts(1, seed=7)[0]
    tree = DraftTree(torch.tensor([20, 21, 22, 23, 24]), torch.tensor([-1, -1, 0, 1, 3]))
    path = [1, 3, 4]
    results = []
    for target in (eager, fast):
        target.prefill(prompt)
        logits, _ = target.verify(11, tree)
        target.commit(path)
        results.append(logits)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-10)
    length = prompt.numel() + 1 + len(path)
    assert eager.seq_len == fast.seq_len == fast.cache.length == length
    for index, layer in enumerate(eager.cache.layers):
        torch.testing.assert_close(fast.cache.kv[index, 0, :, :length][None], layer.keys, rtol=0, atol=1e-10)
        torch.testing.assert_close(fast.cache.kv[index, 1, :, :length][None], layer.values, rtol=0, atol=1e-10)


def test_draft_model_on_static_cache_rolls_back():
    model = tiny_llama(0)
    fast = FastHFTarget(model)
    drafter = DraftModelDrafter(fast, perturbed(model, noise=0.01), k=4)
    assert drafter.fast is not None
    for prompt in prompts(3):
        result = decode(fast, drafter, prompt, 30)
        sequence = prompt.tolist() + result.output_ids
        assert drafter.cache.length == len(drafter.cached)
        assert drafter.cached[: len(sequence) - 1] == sequence[: len(drafter.cached)][: len(sequence) - 1]


# --- the cache and the shapes themselves --------------------------------------

def filled_cache(length: int) -> StaticKV:
    cache = StaticKV(num_layers=2, capacity=16)
    cache.slots = torch.arange(length)
    for layer in range(2):
        keys = torch.arange(length, dtype=torch.float64).reshape(1, 1, length, 1) + 100 * layer
        cache.write(layer, keys, -keys)
    cache.length = length
    return cache


def test_compact_gathers_every_layer_in_place():
    cache = filled_cache(10)
    cache.compact(base=4, keep=[0, 2, 5])
    assert cache.length == 7
    for layer in range(2):
        assert cache.kv[layer, 0, 0, :7, 0].tolist() == [v + 100 * layer for v in [0, 1, 2, 3, 4, 6, 9]]
        assert cache.kv[layer, 1, 0, :7, 0].tolist() == [-(v + 100 * layer) for v in [0, 1, 2, 3, 4, 6, 9]]


def test_truncate_and_reserve_keep_the_prefix():
    cache = filled_cache(10)
    cache.truncate(6)
    assert cache.length == 6
    before = cache.kv[..., :6, :].clone()
    cache.reserve(100)
    assert cache.capacity == 256 and cache.generation == 1
    assert torch.equal(cache.kv[..., :6, :], before)
    cache.reserve(50)  # fits: nothing moves
    assert cache.generation == 1


def test_bucket_sizes():
    assert [bucket_size(q) for q in (1, 2, 3, 5, 64, 65, 128, 129, 300)] == [1, 2, 4, 8, 64, 128, 128, 256, 384]


def test_shape_masks_masks_padding_and_depths():
    shape = shape_masks((-1, -1, 0), rows=4, bucket=8, dtype=torch.float32, device="cpu")
    allowed = shape.block == 0
    expected = DraftTree(torch.tensor([1, 2, 3]), torch.tensor([-1, -1, 0])).ancestor_mask()
    assert torch.equal(allowed[:4, :4], expected)
    assert torch.equal(allowed[4:], torch.eye(8, dtype=torch.bool)[4:])  # padding rows see only themselves
    assert not allowed[:4, 4:].any()
    assert shape.depths.tolist() == [0, 1, 1, 2, 0, 0, 0, 0]
    causal = shape_masks(None, rows=3, bucket=4, dtype=torch.float32, device="cpu")
    assert torch.equal(causal.block[:3, :3] == 0, torch.ones(3, 3, dtype=torch.bool).tril())
    assert causal.depths.tolist() == [0, 1, 2, 0]


# --- choosing the engine ------------------------------------------------------

def test_resolve_engine():
    assert resolve_engine("auto", torch.device("cpu")) == "eager"
    assert resolve_engine("auto", torch.device("cuda")) == "fast"
    assert resolve_engine("fast", torch.device("cpu")) == "fast"
    with pytest.raises(UserError, match="unknown engine 'turbo'"):
        resolve_engine("turbo", torch.device("cpu"))


def test_fast_engine_refuses_sliding_window_models():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
    )
    with pytest.raises(UserError, match="sliding-window"):
        FastHFTarget(MistralForCausalLM(config))


def test_cli_run_on_fast_engine(models, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(
        ["run", "--target", models["target"], "--drafter", "draft-model", "--draft-model", models["draft"],
         "--engine", "fast", "--workload", "builtin-completion", "--limit", 2, "--max-new-tokens", 16,
         "--out", tmp_path, "--json"],
        capsys, monkeypatch,
    )
    assert code == 0, err
    assert json.loads(out)["exact_match_rate"] == 1.0
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["decode"]["engine"] == "fast"


def test_cli_unknown_engine_is_one_line(models, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--target", models["target"], "--engine", "turbo", "--out", tmp_path], capsys, monkeypatch)
    assert code == 2
    assert "unknown engine 'turbo'" in err and "Traceback" not in err


@pytest.mark.parametrize("drafter", ["medusa", "hydra", "hydra-decoder", "hydra-offset"])
def test_head_drafters_on_fast_engine(drafter, tmp_path):
    """Hidden-state drafters on a 63-node tree (padded to a 64-row bucket): the same
    steps as on the eager engine, and plain decoding's tokens."""
    from head_layouts import write_hydra

    from specbench.drafters.heads.decoder import HydraDecoderDrafter
    from specbench.drafters.heads.hydra import HydraDrafter
    from specbench.drafters.heads.medusa import MedusaDrafter

    model = tiny_llama(0)
    eager, fast = HFTarget(model), FastHFTarget(model, bucketed=True)
    if drafter == "hydra-offset":  # reads the input of the last layer, not the final output
        write_hydra(tmp_path, eager, "mlp", num_layers=1, offset=1)

    def make(target):
        torch.manual_seed(5)
        if drafter == "medusa":
            return MedusaDrafter.build(target, heads="fresh", tree="mc_sim_7b_63")
        if drafter == "hydra":
            return HydraDrafter.build(target, heads="fresh", tree="mc_sim_7b_63")
        if drafter == "hydra-decoder":
            return HydraDecoderDrafter.build(target, heads="fresh", decoder_layers=1, tree="mc_sim_7b_63")
        return HydraDrafter.build(target, heads=str(tmp_path), tree="mc_sim_7b_63")

    for prompt in prompts(3):
        expected = decode(eager, PlainDecoding(eager), prompt, MAX_NEW).output_ids
        on_eager = decode(eager, make(eager), prompt, MAX_NEW)
        on_fast = decode(fast, make(fast), prompt, MAX_NEW)
        assert on_fast.output_ids == on_eager.output_ids == expected
        assert [s.accepted for s in on_fast.steps] == [s.accepted for s in on_eager.steps]
        assert max(s.tree_size for s in on_fast.steps) == 63
