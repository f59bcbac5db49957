"""The fast engine (static KV cache, buckets, spans, CUDA-graph bookkeeping) against the
eager one: the same tokens for every built-in drafter, the same KV and hidden states, a
capacity planned once per sequence, and a graph pool never reused after its graphs died.

The CUDA-graph path runs here with tests/fake_graphs.py: a replay recomputes the step
from its static buffers, so stale inputs would show up as wrong tokens."""

import json

import pytest
import torch
from fake_graphs import FakeGraphs
from test_cli import models, run_cli  # noqa: F401 (models is a fixture)
from tiny import perturbed, prompts, tiny_llama

from specbench.drafters.draft_model import DraftModelDrafter
from specbench.drafters.prompt_lookup import PromptLookupDrafter
from specbench.engine import buckets, static_cache
from specbench.engine.buckets import GRAPH_MAX_BUCKET, MAX_SPANS, all_spans, bucket_size, buckets_up_to, span_for
from specbench.engine.cuda_graphs import GraphSet
from specbench.engine.engines import resolve_engine
from specbench.engine.events import EVENTS
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.static_cache import StaticDecoder, shape_masks
from specbench.engine.kv import StaticKV
from specbench.engine.tree import DraftTree
from specbench.errors import SpecbenchWarning, UserError
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget

MAX_NEW = 32
DRAFTERS = ["plain", "prompt-lookup", "draft-model", "medusa", "hydra", "hydra-pruned", "hydra-decoder"]
CONFIGS = {  # the fast engine as CPU runs it, padded to buckets over spans, and with (fake) CUDA graphs
    "exact": lambda model: FastHFTarget(model, compiled=False),
    "bucketed": lambda model: FastHFTarget(model, bucketed=True, compiled=False),
    "graphs": lambda model: FastHFTarget(model, graphs=FakeGraphs()),
}


def make_drafter(name: str, target, draft=None):
    from specbench.drafters.heads.decoder import HydraDecoderDrafter
    from specbench.drafters.heads.hydra import HydraDrafter
    from specbench.drafters.heads.medusa import MedusaDrafter

    torch.manual_seed(5)  # fresh heads draw random biases: the same heads on both engines
    if name == "plain":
        return PlainDecoding(target)
    if name == "prompt-lookup":
        return PromptLookupDrafter.build(target, k=4, min_ngram=1)
    if name == "draft-model":
        return DraftModelDrafter(target, draft, k=4)
    if name == "medusa":
        return MedusaDrafter.build(target, heads="fresh", tree="mc_sim_7b_63")
    if name == "hydra":
        return HydraDrafter.build(target, heads="fresh", tree="mc_sim_7b_63")
    if name == "hydra-pruned":  # trees of 6-10 of the 63 nodes on tests' tiny models
        return HydraDrafter.build(target, heads="fresh", tree="mc_sim_7b_63", prune_below=0.02)
    return HydraDecoderDrafter.build(target, heads="fresh", decoder_layers=1, tree="mc_sim_7b_63")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(0)
    return model, perturbed(model, noise=0.01)


@pytest.fixture
def small_steps(monkeypatch):
    """Capacity and span steps of 16 positions (at most 4 spans): short sequences then cross
    many span boundaries, and the span step grows with the capacity."""
    monkeypatch.setattr(buckets, "CAPACITY_STEP", 16)
    monkeypatch.setattr(buckets, "SPAN_STEP", 16)
    monkeypatch.setattr(buckets, "MAX_SPANS", 4)


def eager_runs(model, draft, drafter: str, prompt_list, max_new: int):
    eager = HFTarget(model)
    eager.eos_token_ids = set()
    return [decode(eager, make_drafter(drafter, eager, draft), p, max_new) for p in prompt_list]


# --- fast == eager, token for token --------------------------------------------

@pytest.fixture(scope="module")
def fp32():
    model = tiny_llama(0).float()
    return model, perturbed(model, noise=0.01)


@pytest.mark.parametrize("drafter", ["plain", "prompt-lookup", "draft-model"])
def test_fast_equals_eager_fp32(fp32, drafter):
    """Greedy tokens are identical on both engines (fp32, as a CPU run uses)."""
    model, draft = fp32
    eager, fast = HFTarget(model), FastHFTarget(model, compiled=False)
    drafted = 0
    for prompt in prompts(8):
        expected = decode(eager, make_drafter(drafter, eager, draft), prompt, MAX_NEW)
        got = decode(fast, make_drafter(drafter, fast, draft), prompt, MAX_NEW)
        assert got.output_ids == expected.output_ids
        assert [s.accepted for s in got.steps] == [s.accepted for s in expected.steps]
        drafted += sum(s.tree_size for s in got.steps)
    assert drafter == "plain" or drafted > 0


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_fast_equals_eager_across_spans_and_growth(tiny, small_steps, drafter, config):
    """Every built-in drafter on every fast configuration: the eager engine's tokens and
    accepted lengths, over prompts of growing length whose sequences cross span boundaries
    (span step 16) and make the cache grow between sequences, never during one."""
    model, draft = tiny
    prompt_list = prompts(3, length=(6, 30))
    prompt_list.sort(key=len)  # each longer than the last: the cache grows at some prefills
    expected = eager_runs(model, draft, drafter, prompt_list, MAX_NEW)
    fast = CONFIGS[config](model)
    fast.eos_token_ids = set()
    fast.cache.capacity = 16  # nothing allocated yet: the first prefill plans it
    grown_at_prefill = []
    verify = fast.verify

    def checked_verify(root, tree, taps=()):
        assert fast.cache.generation == generation_at_prefill[-1], "the cache grew mid-sequence"
        return verify(root, tree, taps)

    fast.verify = checked_verify
    prefill = fast.prefill
    generation_at_prefill = []

    def watched_prefill(*args, **kwargs):
        before = fast.cache.generation
        out = prefill(*args, **kwargs)
        grown_at_prefill.append(fast.cache.generation != before)
        generation_at_prefill.append(fast.cache.generation)
        return out

    fast.prefill = watched_prefill
    drafter_obj = make_drafter(drafter, fast, draft)  # one drafter across prompts, as a run uses it
    spans_seen = set()
    for prompt, reference in zip(prompt_list, expected):
        got = decode(fast, drafter_obj, prompt, MAX_NEW)
        assert got.output_ids == reference.output_ids
        assert [s.accepted for s in got.steps] == [s.accepted for s in reference.steps]
        spans_seen |= {key[1] for key in fast.decoder.graph_set.steps}
    if drafter == "medusa":
        assert max(s.tree_size for s in got.steps) == 63  # padded to a 64-row bucket
    if config != "exact":
        assert len(spans_seen) > 1
        assert any(grown_at_prefill[1:])  # a longer prompt grew the cache, between sequences
    if config == "graphs":
        backend = fast.decoder.graphs
        assert backend.replays > 0 and fast.decoder.graph_set.captured > 0
        assert len(backend.handles) > 1  # storage grew: the graphs went, and a fresh pool came
        if drafter == "draft-model":
            assert drafter_obj.fast.graphs is backend and drafter_obj.fast.graph_set.captured > 0


@pytest.mark.parametrize("drafter", ["plain", "medusa"])
def test_long_tree_decode_keeps_the_cache_and_its_graphs(tiny, drafter):
    """The H100 failure: any sequence past 256 positions regrew the cache mid-sequence and then
    captured into a freed pool. Planned at prefill, a 300-token decode on (fake) CUDA graphs
    never reallocates; it equals the eager engine's tokens."""
    model, draft = tiny
    prompt = prompts(1, seed=3, length=(20, 21))[0]
    new = 300
    (expected,) = eager_runs(model, draft, drafter, [prompt], new)
    fast = FastHFTarget(model, graphs=FakeGraphs())
    fast.eos_token_ids = set()
    regrowths = EVENTS.regrowths
    got = decode(fast, make_drafter(drafter, fast, draft), prompt, new)
    assert got.output_ids == expected.output_ids and len(got.output_ids) == new
    assert fast.cache.generation == 0 and EVENTS.regrowths == regrowths
    assert fast.cache.capacity >= prompt.numel() + new + 1 + (63 if drafter == "medusa" else 0)
    assert len(fast.decoder.graphs.handles) == 1  # one pool for the whole run
    assert len({key[1] for key in fast.decoder.graph_set.steps}) >= 2  # the span grew past 256


def test_unplanned_growth_mid_sequence_drops_graphs_with_their_pool(tiny, small_steps):
    """A prefill told nothing about how far the sequence goes: the cache must grow mid-sequence.
    The prefix is kept, the graphs and their pool are dropped together, and the next capture gets
    a fresh pool (capturing into the dead one asserts in the fake, as on CUDA); logits = eager's."""
    model, _ = tiny
    prompt = prompts(1, seed=11, length=(20, 21))[0]
    eager, fast = HFTarget(model), FastHFTarget(model, graphs=FakeGraphs())
    fast.cache.capacity = 16
    logits_e, _ = eager.prefill(prompt)
    logits_f, _ = fast.prefill(prompt)  # plans prompt + padding only
    regrowths = EVENTS.regrowths
    token = int(logits_e[-1].argmax())
    for _ in range(120):
        (logits_e, _), (logits_f, _) = eager.verify(token, DraftTree.empty()), fast.verify(token, DraftTree.empty())
        torch.testing.assert_close(logits_f, logits_e, rtol=0, atol=1e-9)
        eager.commit([])
        fast.commit([])
        token = int(logits_e[-1].argmax())
    backend = fast.decoder.graphs
    assert fast.cache.generation >= 1 and EVENTS.regrowths - regrowths == fast.cache.generation
    assert len(backend.handles) == fast.cache.generation + 1
    assert all(backend.pools[h] == 0 for h in backend.handles[:-1])  # the old pools are released
    assert backend.pools[backend.handles[-1]] == fast.decoder.graph_set.captured


def test_tree_verify_and_commit_match_eager_kv():
    """A branching tree verified and committed on the static cache leaves the same
    logits and the same KV prefix as the eager engine."""
    model = tiny_llama(0)
    eager, fast = HFTarget(model), FastHFTarget(model, graphs=FakeGraphs())
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
    fast = FastHFTarget(model, compiled=False)
    drafter = DraftModelDrafter(fast, perturbed(model, noise=0.01), k=4)
    assert drafter.fast is not None
    for prompt in prompts(3):
        result = decode(fast, drafter, prompt, 30)
        sequence = prompt.tolist() + result.output_ids
        assert drafter.cache.length == len(drafter.cached)
        assert drafter.cached[: len(sequence) - 1] == sequence[: len(drafter.cached)][: len(sequence) - 1]


# --- hidden-state taps ------------------------------------------------------------

@pytest.mark.parametrize("config", ["eager", *CONFIGS])
def test_taps_are_hf_hidden_states(config):
    """taps (j = HF hidden_states[j], None = the final normed state), concatenated in order,
    from a prefill and from a verify (a chain: the same as a causal forward of the sequence)."""
    model = tiny_llama(0, layers=3)
    target = HFTarget(model) if config == "eager" else CONFIGS[config](model)
    sequence = prompts(1, seed=5, length=(30, 31))[0]
    with torch.inference_mode():
        reference = model(input_ids=sequence[None], output_hidden_states=True).hidden_states
    taps = (0, 2, None, 1, 3)
    expected = torch.cat([reference[3 if j is None else j][0] for j in taps], dim=-1)
    _, hidden = target.prefill(sequence[:20], taps)
    torch.testing.assert_close(hidden, expected[:20], rtol=0, atol=1e-10)
    _, none = target.prefill(sequence[:20])
    assert none is None
    for _ in range(2):  # the second verify replays the captured graph
        target.prefill(sequence[:20], (1,))
        _, hidden = target.verify(int(sequence[20]), DraftTree.chain(sequence[21:]), taps)
        torch.testing.assert_close(hidden, expected[20:], rtol=0, atol=1e-10)
    target.prefill(sequence[:20])
    _, single = target.verify(int(sequence[20]), DraftTree.chain(sequence[21:]), (2,))
    assert single.shape == (10, model.config.hidden_size)
    target.prefill(sequence[:20])
    with pytest.raises(ValueError, match="outside 0..3"):
        target.verify(int(sequence[20]), DraftTree.chain(sequence[21:]), (4,))


# --- warm-up: every bucket before anything is timed ----------------------------------

@pytest.mark.parametrize("drafter", ["plain", "prompt-lookup", "draft-model", "medusa"])
def test_warm_up_captures_every_bucket_so_decoding_captures_none(tiny, drafter):
    model, draft = tiny
    fast = FastHFTarget(model, graphs=FakeGraphs())
    fast.eos_token_ids = set()
    made = make_drafter(drafter, fast, draft)
    prompt_list = prompts(3, seed=21, length=(10, 40))
    positions = max(p.numel() for p in prompt_list) + 48 + 1 + made.max_draft_tokens
    target_ms = fast.warm_up(1, (), positions) + fast.warm_up(1 + made.max_draft_tokens, made.taps, positions)
    draft_ms = made.warm_up(positions)
    assert target_ms > 0 and (draft_ms > 0) == (drafter == "draft-model")
    rows = {"plain": 1, "prompt-lookup": 5, "draft-model": 5, "medusa": 64}[drafter]
    spans = all_spans(fast.cache.capacity)
    expected = len(buckets_up_to(rows)) * len(spans) + (len(spans) if made.taps else 0)  # + plain's taps-free bucket 1
    assert fast.decoder.graph_set.captured == fast.decoder.captures == expected
    if drafter == "draft-model":
        assert made.fast.graph_set.captured == len(buckets_up_to(5)) * len(all_spans(made.fast.cache.capacity))
    captures, generation = EVENTS.captures, fast.cache.generation
    for prompt in prompt_list:
        decode(fast, make_drafter("plain", fast), prompt, 48)
        decode(fast, made, prompt, 48)
    assert EVENTS.captures == captures and fast.cache.generation == generation
    assert HFTarget(model).warm_up(64) == 0.0 and FastHFTarget(model, compiled=False).warm_up(64, (), 500) == 0.0


def test_warm_up_decodes_each_mode_once_and_counts_its_events(tiny):
    """engine/loop.py `warm_up`, what `specbench run` and scripts/gpu_check.py do before timing: the
    buckets captured, one short decode by the baseline then the drafter, the captures it returns;
    a timed decode after it captures nothing."""
    from specbench.engine.events import counted
    from specbench.engine.loop import WARMUP_TOKENS, warm_up

    model, _ = tiny
    fast = FastHFTarget(model, graphs=FakeGraphs())
    fast.eos_token_ids = set()
    plain, drafter = make_drafter("plain", fast), make_drafter("prompt-lookup", fast)
    prompt = prompts(1, seed=3, length=(20, 30))[0]
    decoded = []
    for name, each in (("plain", plain), ("prompt-lookup", drafter)):
        each.on_verified = lambda outcome, name=name, original=each.on_verified: (decoded.append(name), original(outcome))
    seen = warm_up(fast, drafter, prompt.numel() + 64 + 1 + drafter.max_draft_tokens, prompt, 64, baseline=plain)
    assert seen.captures == fast.decoder.captures > 0 and seen.capture_ms > 0
    assert decoded[0] == "plain" and decoded[-1] == "prompt-lookup" and len(decoded) <= 2 * WARMUP_TOKENS  # short: not 64 tokens each
    with counted() as timed:
        decode(fast, drafter, prompt, 64)
    assert not timed


# --- the graph pool ---------------------------------------------------------------

def test_graph_pool_is_dropped_with_its_last_graph():
    backend = FakeGraphs()
    graphs = GraphSet(backend)
    outputs = lambda: (torch.ones(2), None)  # noqa: E731
    steps = [static_cache._Step(b, 16, (), torch.float32, "cpu") for b in (1, 2)]
    for i, step in enumerate(steps):
        graphs.steps[(step.bucket, 16, ())] = step
        graphs.capture(step, outputs)
    first = graphs.pool
    assert backend.pools[first] == 2 and graphs.captured == 2
    graphs.release_all(generation=1)
    assert backend.pools[first] == 0 and graphs.pool is None and graphs.generation == 1
    with pytest.raises(RuntimeError, match="use_count"):  # what the old code did: reuse the dead handle
        backend.capture(outputs, first)
    step = static_cache._Step(1, 16, (), torch.float32, "cpu")
    graphs.steps[(1, 16, ())] = step
    graphs.capture(step, outputs)
    assert graphs.pool not in (None, first) and backend.pools[graphs.pool] == 1


def test_failed_capture_of_the_only_graph_drops_the_pool():
    backend = FakeGraphs(fail_on_capture=1)
    graphs = GraphSet(backend)
    outputs = lambda: (torch.ones(2), None)  # noqa: E731
    step = static_cache._Step(1, 16, (), torch.float32, "cpu")
    graphs.steps[(1, 16, ())] = step
    with pytest.raises(RuntimeError, match="capturing"):
        graphs.capture(step, outputs)
    assert graphs.pool is None and graphs.captured == 0
    graphs.capture(step, outputs)  # the next capture gets a fresh pool
    assert len(backend.handles) == 2 and backend.pools[backend.handles[1]] == 1


def test_a_failed_capture_is_one_line_and_the_run_goes_on_uncaptured(tiny):
    """As under tensor parallelism when a collective cannot be captured: one warning, then the
    static path without graphs, with the eager engine's logits."""
    model, _ = tiny
    fast, eager = FastHFTarget(model, graphs=FakeGraphs(fail_on_capture=1)), HFTarget(model)
    prompt = prompts(1)[0]
    fast.prefill(prompt), eager.prefill(prompt)
    with pytest.warns(SpecbenchWarning, match="CUDA graph capture failed .*runs uncaptured"):
        logits, _ = fast.verify(5, DraftTree.empty())
    torch.testing.assert_close(logits, eager.verify(5, DraftTree.empty())[0], rtol=0, atol=1e-9)
    fast.commit([]), eager.commit([])
    assert fast.decoder.graphs is None and fast.decoder.graph_set.captured == 0
    torch.testing.assert_close(fast.verify(7, DraftTree.empty())[0], eager.verify(7, DraftTree.empty())[0], rtol=0, atol=1e-9)


def test_a_capture_failing_during_the_warm_up_leaves_it_uncaptured(tiny):
    """The warm-up captures many steps; once one fails (one warning) it stops capturing, and
    decoding runs the static path uncaptured with the eager engine's logits."""
    model, _ = tiny
    fast, eager = FastHFTarget(model, graphs=FakeGraphs(fail_on_capture=2)), HFTarget(model)
    with pytest.warns(SpecbenchWarning, match="CUDA graph capture failed") as caught:
        fast.warm_up(8, (), 100)
    assert len([w for w in caught if issubclass(w.category, SpecbenchWarning)]) == 1
    assert fast.decoder.graphs is None and fast.decoder.graph_set.captured == 0
    prompt = prompts(1)[0]
    fast.prefill(prompt), eager.prefill(prompt)
    tree = DraftTree.chain(torch.tensor([5, 6, 7]))
    torch.testing.assert_close(fast.verify(4, tree)[0], eager.verify(4, tree)[0], rtol=0, atol=1e-9)


# --- masks, buckets and spans --------------------------------------------------------

def reference_mask(block: torch.Tensor, start: int, span: int) -> torch.Tensor:
    bucket = block.shape[0]
    mask = torch.full((bucket, span), torch.finfo(block.dtype).min, dtype=block.dtype)
    mask[:, :start] = 0
    mask[:, start : start + bucket] = block
    return mask


def test_mask_band_updates_equal_a_full_refill():
    """Only the band between the old and the new tree block is rewritten; after any sequence
    of starts (growing, rolling back for a new sequence) and shapes the mask is the full one."""
    model = tiny_llama(0)
    decoder = StaticDecoder(model.get_decoder(), model.lm_head, torch.device("cpu"), torch.float64, bucketed=True)
    step = static_cache._Step(8, 64, (), torch.float64, "cpu")
    trees = [(-1, -1, 0), (-1, 0, 1, 2, 3, 4, 5), None, ()]
    g = torch.Generator().manual_seed(0)
    for start in [0, 3, 4, 4, 20, 21, 56, 2, 30, 0, 9]:
        parents = trees[int(torch.randint(len(trees), (1,), generator=g))]
        rows = 1 + len(parents) if parents is not None else 5
        shape = decoder.shape(parents, rows, 8)
        decoder._fill(step, torch.arange(rows), shape, start)
        assert torch.equal(step.mask[0, 0], reference_mask(shape.block, start, 64)), start
        assert step.positions.tolist() == (shape.depths + start).tolist()
        assert step.slots.tolist() == list(range(start, start + 8))


def test_bucket_sizes():
    assert [bucket_size(q) for q in (1, 2, 3, 5, 64, 65, 128, 129, 300)] == [1, 2, 4, 8, 64, 128, 128, 256, 384]
    assert buckets_up_to(1) == [1] and buckets_up_to(5) == [1, 2, 4, 8] and buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_up_to(500) == [1, 2, 4, 8, 16, 32, 64, GRAPH_MAX_BUCKET]
    assert max(bucket_size(q) - q for q in range(1, GRAPH_MAX_BUCKET + 1)) == buckets.MAX_BUCKET_PADDING


def test_spans_are_few_and_cover_every_step():
    """A step ending at `end` reads span_for(end) >= end positions, one of at most MAX_SPANS per capacity."""
    assert all_spans(256) == [256] and all_spans(1024) == [256, 512, 768, 1024]
    for capacity in (256, 768, 4096, 8192, 33024):
        spans = all_spans(capacity)
        assert len(spans) <= MAX_SPANS and spans[-1] == capacity
        for end in range(1, capacity + 1, 37):
            assert span_for(end, capacity) in spans and span_for(end, capacity) >= end
    assert span_for(300, 1024) == 512 and span_for(256, 1024) == 256


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


# --- the cache itself -----------------------------------------------------------------

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
    regrowths = EVENTS.regrowths
    cache.reserve(100)
    assert cache.capacity == 256 and cache.generation == 1
    assert torch.equal(cache.kv[..., :6, :], before)
    cache.reserve(50)  # fits: nothing moves
    assert cache.generation == 1
    cache.truncate(0)
    cache.reserve(1000)  # between sequences: reallocated, nothing to copy
    assert cache.generation == 2
    # the cache counts no event: its StaticDecoder counts the growth it did not plan
    # (test_unplanned_growth_mid_sequence_drops_graphs_with_their_pool); drafters' own caches grow by design
    assert EVENTS.regrowths == regrowths


def test_drafters_write_by_position_roll_back_and_keep_a_path():
    """StaticKV as EAGLE's and DFlash's own cache: put() writes rows [q, kv_heads, d] at positions,
    layer_kv() reads a layer's prefix [kv_heads, length, d]; truncate rolls back (later puts
    overwrite), compact keeps an accepted path, reserve grows keeping the prefix, per layer apart."""
    cache = StaticKV(num_layers=2, capacity=4)

    def rows(first: int, q: int, layer: int) -> torch.Tensor:  # [q, 2 kv heads, 1]: head h of position p holds 1000h + 100layer + p
        positions = torch.arange(first, first + q, dtype=torch.float32)
        return torch.stack([positions + 100 * layer, positions + 100 * layer + 1000], dim=1)[..., None]

    def stored(layer: int) -> list[list[float]]:
        keys, values = cache.layer_kv(layer, cache.length)
        assert torch.equal(values, -keys) and keys.shape == (2, cache.length, 1)
        return keys[..., 0].tolist()

    def put(first: int, q: int) -> None:
        cache.reserve(first + q)
        for layer in range(2):
            cache.put(layer, first, rows(first, q, layer), -rows(first, q, layer))
        cache.length = first + q

    regrowths = EVENTS.regrowths
    put(0, 3)
    assert cache.kv.dtype == torch.float32 and stored(1) == [[100, 101, 102], [1100, 1101, 1102]]
    put(3, 5)  # past the first capacity: grown mid-sequence, the prefix kept
    assert cache.capacity >= 8 and stored(0) == [list(range(8)), [1000 + p for p in range(8)]]
    assert EVENTS.regrowths == regrowths
    cache.truncate(5)  # roll back: positions 5.. are stale
    assert cache.length == 5 and stored(0) == [list(range(5)), [1000 + p for p in range(5)]]
    cache.put(0, 5, rows(50, 1, 0), -rows(50, 1, 0))  # rewrite position 5 of layer 0 only
    cache.put(1, 5, rows(5, 1, 1), -rows(5, 1, 1))
    cache.length = 6
    assert stored(0)[0] == [0, 1, 2, 3, 4, 50] and stored(1)[0] == [100, 101, 102, 103, 104, 105]
    cache.compact(base=2, keep=[0, 3])  # keep positions 2 and 5 at 2 and 3
    assert cache.length == 4 and stored(0) == [[0, 1, 2, 50], [1000, 1001, 1002, 1050]]
    assert stored(1)[0] == [100, 101, 102, 105]


# --- choosing the engine ------------------------------------------------------

def test_resolve_engine():
    assert resolve_engine("auto", torch.device("cpu")) == "fast"  # oneDNN-prepacked weights: faster than eager in scripts/bench_engine.py (docs/engine.md)
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


# --- the run: warm-up and what run.json says about it -----------------------------------

def benchmark_run(models, tmp_path, warmup: bool):
    from specbench.runner import Benchmark, RunConfig
    from specbench.store import RunStore
    from specbench.targets.loading import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(models["target"]), torch.device("cpu"), torch.float32)
    target = FastHFTarget(model, tokenizer, graphs=FakeGraphs())
    config = RunConfig(target=str(models["target"]), drafter="prompt-lookup", workload="builtin-completion", limit=2,
                       max_new_tokens=24, warmup=warmup)
    bench = Benchmark(config, target=target)
    store = RunStore.create(tmp_path / "run", bench.run_info("test"))
    bench.run(store)
    return bench, json.loads((tmp_path / "run" / "run.json").read_text())["extra"]["engine"]


def test_run_warm_up_captures_before_timing(models, tmp_path):
    bench, engine = benchmark_run(models, tmp_path, warmup=True)
    k = bench.drafter.max_draft_tokens
    spans = len(all_spans(engine["capacity"]))
    assert engine["engine"] == "fast" and engine["cuda_graphs"]
    # prompt lookup reads no hidden states: plain decoding's bucket 1 is one of its own
    assert engine["graphs"] == len(buckets_up_to(1 + k)) * spans and engine["capture_ms"] > 0
    assert engine["capacity"] >= engine["planned_positions"]
    assert engine["timed_captures"] == 0 and engine["timed_regrowths"] == 0 and engine["timed_capture_prompts"] == []


def test_run_without_warm_up_says_it_captured_while_timed(models, tmp_path):
    from specbench.records import EngineFacts
    from specbench.report.tables import engine_line

    _, engine = benchmark_run(models, tmp_path, warmup=False)
    assert engine["graphs"] == 0 and engine["timed_captures"] > 0 and len(engine["timed_capture_prompts"]) >= 1
    line = engine_line(EngineFacts(**engine))
    assert "inside timed prompts" in line and f"{engine['timed_captures']} captures" in line


def test_cli_run_on_fast_engine(models, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(
        ["run", "--target", models["target"], "--drafter", "draft-model", "--draft-model", models["draft"],
         "--engine", "fast", "--workload", "builtin-completion", "--limit", 2, "--max-new-tokens", 16, "--dtype", "float32",
         "--out", tmp_path, "--json"],
        capsys, monkeypatch,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["exact_match_rate"] == 1.0
    assert summary["engine"]["engine"] == "fast" and summary["engine"]["capacity"] >= 256
    run_dir = next(tmp_path.iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    assert info["decode"]["engine"] == "fast"
    from specbench.cli import show_run

    show_run(run_dir, as_json=False)  # what `run` prints without --json
    out = capsys.readouterr().out
    # on a CPU the fast engine packs its linear weights and measures its buckets in the warm-up
    engine = info["extra"]["engine"]
    assert engine["packed_linears"] and not engine["compiled_step"] and engine["timed_compiles"] == 0
    assert engine["lean_layers"] == 2  # the tiny llama's layers, each checked against transformers' on a probe
    assert "profile_ms" not in engine  # buckets are the next power of two: the same in every run, whatever the timings
    assert "fast engine: linear weights prepacked for oneDNN, 2 layers in fewer operations" in out and "cheapest measured bucket" not in out
    assert f"static KV cache {engine['capacity']} positions" in out


def test_cli_unknown_engine_is_one_line(models, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--target", models["target"], "--engine", "turbo", "--out", tmp_path], capsys, monkeypatch)
    assert code == 2
    assert "unknown engine 'turbo'" in err and "Traceback" not in err
