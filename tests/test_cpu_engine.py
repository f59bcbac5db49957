"""The CPU engine: `--dtype auto` (bf16 where the CPU computes it natively), the compiled step,
and the verify bucket chosen from a measured profile."""

import pytest
import torch
from tiny import prompts, save_tiny_model, tiny_llama

from specbench import environment
from specbench.drafters.prompt_lookup import PromptLookupDrafter, PromptLookupOptions
from specbench.engine.buckets import bucket_size, cheapest_bucket
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.errors import UserError
from specbench.targets import fast as fast_module
from specbench.targets.batched import RowsHFTarget
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget
from specbench.targets.loading import dtype_choice, load_causal_lm, resolve_dtype

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("amx, avx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                (False, False, torch.float32)])
def test_dtype_auto_on_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch, amx, avx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx)
    dtype, why = dtype_choice("auto", torch.device("cpu"))
    assert dtype == expected and resolve_dtype("auto", torch.device("cpu")) == expected
    assert why.startswith("auto: ") and ("AMX" in why if amx else "AVX512_BF16" in why)
    assert environment.cpu_bf16()[0] == (expected == torch.bfloat16)


def test_a_given_dtype_is_kept_and_a_wrong_one_is_one_line():
    assert dtype_choice("float32", torch.device("cpu")) == (torch.float32, "given")
    with pytest.raises(UserError, match="unknown dtype 'fp8': use auto, float32"):
        dtype_choice("fp8", torch.device("cpu"))


# --- the verify bucket, chosen from a measured profile ----------------------------------

def test_cheapest_bucket_from_a_profile():
    profile = {1: 10.0, 2: 18.0, 4: 16.0, 8: 12.0, 16: 20.0}  # not monotone: 8 tokens cost less than 2
    assert [cheapest_bucket(q, profile) for q in (1, 2, 3, 5, 8, 9, 16)] == [1, 8, 8, 8, 8, 16, 16]
    assert cheapest_bucket(17, profile) == bucket_size(17) == 32  # past the profile: the next bucket
    assert cheapest_bucket(3, None) == 4 and cheapest_bucket(2, {2: 5.0, 4: 5.0}) == 2  # ties: the smaller


def test_a_verify_runs_at_the_profiles_cheapest_bucket_with_the_same_tokens():
    model = tiny_llama(0)
    eager, fast = HFTarget(model), FastHFTarget(model, bucketed=True, compiled=False)
    fast.decoder.profile = {1: 1.0, 2: 9.0, 4: 9.0, 8: 2.0}  # as if padding to 8 were cheapest for 2..8 tokens
    prompt = prompts(1)[0]
    expected = decode(eager, PromptLookupDrafter(eager, PromptLookupOptions(k=3)), prompt, 24).output_ids
    assert decode(fast, PromptLookupDrafter(fast, PromptLookupOptions(k=3)), prompt, 24).output_ids == expected
    assert {bucket for bucket, _, _ in fast.decoder.graph_set.steps} == {1, 8}


# --- linear weights prepacked for oneDNN (engine/packed.py) -------------------------------

def test_packed_copy_shares_every_weight_and_leaves_the_model_as_it_was():
    from torch import nn

    from specbench.engine.packed import PackedLinear, SiblingLinear, packed_copy

    model = tiny_llama(0).float()
    backbone = model.get_decoder()
    copy = packed_copy(backbone)
    attention, original = copy.layers[0].self_attn, backbone.layers[0].self_attn
    assert type(original.q_proj) is nn.Linear and type(backbone.layers[0].mlp.down_proj) is nn.Linear  # untouched
    assert isinstance(attention.q_proj, SiblingLinear) and isinstance(attention.o_proj, PackedLinear)
    assert attention.q_proj.weight is original.q_proj.weight and copy.norm.weight is backbone.norm.weight
    assert {id(p) for p in copy.parameters()} == {id(p) for p in backbone.parameters()}  # no weight copied
    # a hook on the copy (a drafter's tap) is the copy's alone
    copy.layers[1].register_forward_pre_hook(lambda module, args: None)
    assert not backbone.layers[1]._forward_pre_hooks
    ids = torch.tensor([[5, 9, 3, 7]])
    with torch.inference_mode():
        want, got = backbone(input_ids=ids).last_hidden_state, copy(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_sibling_projections_are_right_in_any_order_and_on_different_inputs():
    from torch import nn

    from specbench.engine.packed import packed_copy

    torch.manual_seed(0)
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(8, 6, bias=False), nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
    block.gate_proj, block.up_proj = nn.Linear(8, 5, bias=True), nn.Linear(8, 5, bias=True)
    copy = packed_copy(block)
    x, y = torch.randn(3, 8), torch.randn(2, 3, 8)
    calls = [("k_proj", x), ("q_proj", y), ("v_proj", x), ("q_proj", x), ("k_proj", y), ("v_proj", y), ("q_proj", x),
             ("up_proj", x), ("gate_proj", x), ("gate_proj", y), ("up_proj", y)]
    with torch.inference_mode():
        for name, inputs in calls:
            assert torch.allclose(getattr(copy, name)(inputs), getattr(block, name)(inputs), atol=1e-6), name


@pytest.mark.parametrize("drafter", ["medusa", "hydra", "hydra-pruned", "hydra-decoder"])
def test_packed_fast_engine_gives_the_eager_engines_tokens_with_tree_drafters_fp32(drafter):
    from test_fast_engine import make_drafter

    model = tiny_llama(0).float()
    eager, fast = HFTarget(model), FastHFTarget(model)
    assert fast.packed and fast.decoder.bucketed and fast.compiler is None  # what a CPU run gets
    eager.eos_token_ids = fast.eos_token_ids = set()
    fast.warm_up(64, (), 200)
    assert fast.decoder.profile is None  # the next power of two, not a timed choice
    for prompt in prompts(4):
        want = decode(eager, make_drafter(drafter, eager), prompt, 32)
        got = decode(fast, make_drafter(drafter, fast), prompt, 32)
        assert got.output_ids == want.output_ids
        assert [s.accepted for s in got.steps] == [s.accepted for s in want.steps]


def test_lean_layers_replace_llama_layers_in_the_engines_copy_only():
    from specbench.engine.lean_layer import LeanLayer

    model = tiny_llama(0).float()
    fast = FastHFTarget(model)
    assert fast.lean_layers == 2 and all(isinstance(layer, LeanLayer) for layer in fast.decoder.backbone.layers)
    assert not any(isinstance(layer, LeanLayer) for layer in model.model.layers)  # the model is as it was
    state = fast.decoder_layer_state(1)  # what a decoder-layer drafter copies: the model's own names
    assert "layers.0.self_attn.q_proj.weight" in state \
        and state["layers.0.self_attn.q_proj.weight"].data_ptr() == model.model.layers[1].self_attn.q_proj.weight.data_ptr()


def test_a_layer_the_lean_layer_computes_otherwise_stays_with_a_warning(monkeypatch):
    from specbench.engine import lean_layer
    from specbench.errors import SpecbenchWarning

    monkeypatch.setattr(lean_layer.LeanLayer, "_rotate", staticmethod(lambda x, cos, sin: x))  # a rotary it does not know
    message = r"layer\(s\) 0, 1 \(LlamaDecoderLayer\) .* differs from transformers' layer on a probe"
    with pytest.warns(SpecbenchWarning, match=message) as caught:
        fast = FastHFTarget(tiny_llama(0).float())
    assert fast.lean_layers == 0 and fast.engine_stats()["lean_layers"] == 0
    assert [w.filename for w in caught if "layer(s)" in str(w.message)] == [fast_module.__file__]  # the target that asked for the step
    with pytest.warns(SpecbenchWarning, match=message):  # batch rows make their step the same way
        rows = RowsHFTarget(HFTarget(fast.model), 2)
    assert rows.engine_stats()["packed_linears"] and rows.engine_stats()["lean_layers"] == 0
    eager = HFTarget(fast.model)
    prompt = prompts(1)[0]
    assert decode(fast, PlainDecoding(fast), prompt, 16).output_ids == decode(eager, PlainDecoding(eager), prompt, 16).output_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lean_stacks_per_forward_values_are_never_kept_from_another_forward(dtype):
    """The first lean layer of a forward makes what every layer shares (the signed sin, the
    one-row mask operand); a later layer called alone, after forwards at other positions and
    with its mask changed in place (as a static buffer is), computes transformers' layer."""
    from transformers import DynamicCache

    model = tiny_llama(0).to(dtype)
    fast = FastHFTarget(model)
    lean, layer, rotary = fast.decoder.backbone.layers[1], model.model.layers[1], model.model.rotary_emb
    assert not lean.leads and lean.shared is fast.decoder.backbone.layers[0].shared
    hidden = torch.randn(1, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    causal = torch.full((6, 6), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]
    mask = torch.zeros(1, 1, 1, 7, dtype=dtype)  # one buffer for every one-row forward

    def one_row(context: int):
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        outputs = []
        for module, cache in zip((layer, lean), caches):
            for rows, step_mask in ((slice(0, context), causal[..., :context, :context]), (slice(context, context + 1), mask[..., : context + 1])):
                positions = torch.arange(rows.start, rows.stop)[None]
                embeddings = rotary(hidden[:, rows], positions)
                if module is layer:
                    out = layer(hidden[:, rows], step_mask, positions, cache, position_embeddings=embeddings)
                    out = out[0] if isinstance(out, tuple) else out
                else:
                    out = lean(hidden[:, rows], attention_mask=step_mask, position_embeddings=embeddings, cache=cache)
            outputs.append(out.float())
        return outputs

    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for context, masked in ((6, None), (4, 1), (6, 3)):
        mask.zero_()
        if masked is not None:
            mask[..., masked] = torch.finfo(dtype).min
        want, got = one_row(context)
        assert ((got - want).abs().max() / want.abs().max()) <= tolerance


def test_a_product_with_its_residual_is_the_product_plus_the_residual():
    from specbench.engine.packed import _linear, _linear_add, _pack

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 40, generator=generator), torch.randn(24, generator=generator)
    x, residual = torch.randn(2, 3, 40, generator=generator), torch.randn(2, 3, 24, generator=generator)
    packed = _pack(weight)
    for b in (None, bias):
        got = _linear_add(x, packed, b, residual)
        assert got.shape == residual.shape
        torch.testing.assert_close(got, residual + _linear(x, packed, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, residual + torch.nn.functional.linear(x, weight, b), rtol=1e-4, atol=1e-4)


def test_packing_is_only_where_onednn_takes_the_dtype():
    from specbench.engine.packed import can_pack

    assert not FastHFTarget(tiny_llama(0)).packed  # float64: torch's own kernels
    assert not can_pack(torch.device("cuda"), torch.float16)
    assert FastHFTarget(tiny_llama(0).float(), packed=False).packed is False


# --- the compiled step (torch.compile, inductor's CPU backend) ---------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One compiled fast target over a tiny fp32 model (compiling is slow: the module shares it)."""
    import os

    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))  # not the user's cache
    directory = save_tiny_model(tmp_path_factory.mktemp("compiled") / "target", seed=0)
    model, tokenizer, _ = load_causal_lm(str(directory), torch.device("cpu"), torch.float32)
    yield directory, HFTarget(model, tokenizer), FastHFTarget(model, tokenizer, compiled=True, profile_buckets=True)
    if saved is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def test_compiled_step_gives_the_eager_engines_tokens_fp32(compiled):
    _, eager, fast = compiled
    assert fast.compiler is not None and fast.decoder.graphs is None
    fast.warm_up(1 + 3, (), 200)
    assert fast.compiler.compiles >= 1 and fast.compiler.compile_ms > 0
    assert fast.decoder.profile and set(fast.decoder.profile) == {1, 2, 4}
    for prompt in prompts(3):
        for make in (PlainDecoding, lambda t: PromptLookupDrafter(t, PromptLookupOptions(k=3))):
            assert decode(fast, make(fast), prompt, 24).output_ids == decode(eager, make(eager), prompt, 24).output_ids


def test_compiled_step_taps_the_eager_engines_hidden_states(compiled):
    """A drafter's taps (a layer's input, the final state) from the compiled step: the eager engine's, to rounding."""
    from specbench.engine.tree import DraftTree

    _, eager, fast = compiled
    prompt, tree = prompts(1)[0], DraftTree(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 0]))
    taps = (1, None)
    for target in (eager, fast):
        target.prefill(prompt, taps, 64)
    (want_logits, want_hidden), (logits, hidden) = (t.verify(int(prompt[-1]), tree, taps) for t in (eager, fast))
    assert torch.allclose(logits, want_logits, atol=1e-4) and torch.allclose(hidden, want_hidden, atol=1e-4)


def test_frozen_step_gives_each_models_eager_tokens_and_compiles_only_in_the_warm_up(compiled):
    """The whole step compiled with its weights frozen (engine/frozen_step.py), for two models of
    one shape in one process: each gives its own eager engine's tokens (inductor's graph cache
    keys frozen weights by shape: a graph reused from the first model would compute with its
    weights), every bucket compiled in the warm-up and none after; a drafter reading hidden
    states (Medusa, one node: two rows with the final state tapped) drafts and verifies as on
    the eager engine. (`compiled`: inductor's cache in a directory of the test's.)"""
    from specbench.drafters.heads.medusa import MedusaDrafter
    from specbench.engine.tree import DraftTree

    def medusa(target):
        torch.manual_seed(5)  # fresh heads draw random weights: the same heads on both engines
        return MedusaDrafter.build(target, heads="fresh", tree="chain:1")

    for seed, drafters in ((1, (PlainDecoding,)), (0, (PlainDecoding, medusa))):
        model = tiny_llama(seed).float()
        eager, fast = HFTarget(model), FastHFTarget(model, compiled="frozen")
        assert fast.packed and fast.engine_stats()["frozen"]  # prefills run packed, steps compiled
        fast.warm_up(1, (), 200)  # plain: bucket 1
        taps = medusa(fast).taps if len(drafters) > 1 else ()
        if taps:
            fast.warm_up(2, taps, 200)  # Medusa: buckets 1 and 2 (its root, + 1 node), its taps
        compiles = fast.compiler.compiles
        assert compiles == (3 if taps else 1)
        for prompt in prompts(2):
            for make in drafters:
                got, want = decode(fast, make(fast), prompt, 16), decode(eager, make(eager), prompt, 16)
                assert got.output_ids == want.output_ids
                assert [s.accepted for s in got.steps] == [s.accepted for s in want.steps]
        assert fast.compiler.compiles == compiles
    # the tapped states themselves, from the graph the Medusa verifies ran
    for target in (fast, eager):
        target.prefill(prompts(1)[0], max_positions=100)
    (logits, hidden), (eager_logits, eager_hidden) = (target.verify(5, DraftTree(torch.tensor([7]), torch.tensor([-1])), taps=taps)
                                                      for target in (fast, eager))
    torch.testing.assert_close(hidden, eager_hidden.to(hidden.dtype), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert fast.compiler.compiles == compiles


@pytest.mark.parametrize("rows", [1, 3, 6, 12])
def test_frozen_step_computes_the_models_own_logits_and_keys_for_any_number_of_rows(rows):
    """FrozenStep's math, run eagerly (the compiled graph is traced from these same branches: one
    row's attention as fused sums, more rows as batched products, 5-8 rows' products in pieces of
    4), against the model's own forward over a DynamicCache: logits, hidden-state taps, and the new
    keys and values."""
    from transformers import DynamicCache

    from specbench.engine.frozen_step import FrozenStep

    model = tiny_llama(0).float()
    past, ids = prompts(1)[0][None], torch.arange(10, 10 + rows)[None]
    cache = DynamicCache()
    with torch.no_grad():
        model(past, past_key_values=cache, use_cache=True)
        start, span = past.shape[1], past.shape[1] + rows
        # the StaticKV layout [layers, 2, kv heads, positions, head dim]: the prompt's keys and values, room after
        kv = torch.zeros(len(cache.layers), 2, *cache.layers[0].keys.shape[1:2], span + 5, cache.layers[0].keys.shape[-1])
        for index, layer in enumerate(cache.layers):
            kv[index, 0, :, :start], kv[index, 1, :, :start] = layer.keys[0], layer.values[0]
        positions = torch.arange(start, span)
        visible = torch.arange(span)[None, :] <= positions[:, None]
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
        taps = (0, 1, None)  # the embedding, the first layer's output, the final normed state
        logits, new, hidden = FrozenStep(model.model, model.lm_head)(ids[0], positions, positions, mask, kv[:, :, :, :span], taps)
        out = model(ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, torch.cat([out.hidden_states[0], out.hidden_states[1], out.hidden_states[-1]], -1)[0],
                               rtol=1e-4, atol=1e-4)
    for index, layer in enumerate(cache.layers):  # the cache now holds the rows' keys and values after the prompt's
        torch.testing.assert_close(new[index, 0], layer.keys[0, :, start:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(new[index, 1], layer.values[0, :, start:], rtol=1e-4, atol=1e-4)


def test_bench_drafters_cpu_fast_frozen_gives_the_frozen_variant_of_the_runs_target(tmp_path):
    """scripts/bench_drafters.py `--cpu-fast frozen`: the run's own target (its dtype, its name)
    with the frozen whole step; lean (the default) is the target as `--engine auto` loads it."""
    import dataclasses

    from script_modules import load_script

    from specbench.runner import RunConfig

    bench = load_script("bench_drafters")
    save_tiny_model(tmp_path / "target", seed=0)
    config = RunConfig(target=str(tmp_path / "target"), drafter="prompt-lookup", workload="builtin-completion", dtype="float32",
                       device="cpu")
    lean, frozen = bench.load_for_bench(config, "lean"), bench.load_for_bench(config, "frozen")
    assert lean.compiler is None and not lean.engine_stats().get("frozen")
    assert frozen.engine_stats()["frozen"] and frozen.dtype == lean.dtype == torch.float32 and frozen.name == lean.name
    with pytest.raises(UserError, match="variant of the fast engine"):
        bench.load_for_bench(dataclasses.replace(config, engine="eager"), "frozen")


def test_a_run_compiles_in_its_warm_up_and_never_inside_a_timed_prompt(compiled, tmp_path):
    import json

    from specbench.records import EngineFacts
    from specbench.report.tables import engine_line
    from specbench.runner import Benchmark, RunConfig
    from specbench.store import RunStore

    directory, _, fast = compiled
    config = RunConfig(target=str(directory), drafter="prompt-lookup", workload="builtin-completion", limit=2,
                       max_new_tokens=16, dtype="float32")
    bench = Benchmark(config, target=fast)
    bench.run(RunStore.create(tmp_path / "run", bench.run_info("test")))
    engine = json.loads((tmp_path / "run" / "run.json").read_text())["extra"]["engine"]
    assert engine["compiled_step"] and engine["timed_compiles"] == 0 and engine["timed_capture_prompts"] == []
    assert set(engine["profile_ms"]) >= {"1", "2"}  # the bucket profile verifies choose from
    assert "compiled step" in engine_line(EngineFacts(**engine))


def test_compiled_code_is_cached_under_specbenchs_cache_unless_the_user_chose_a_directory(monkeypatch, tmp_path):
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from specbench.engine.compiled_step import use_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing transformers' models sets
    use_cache_dir(tmp_path / "compiled")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled") and (tmp_path / "compiled").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_cache_dir(tmp_path / "compiled")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
