"""The bf16 kernel the CPU fast engine computes bf16 products with (engine/bf16_kernel.py):
sums rounded once, rows independent of their number, used where it runs and nowhere else."""

import tempfile

import pytest
import torch
from tiny import prompts, tiny_llama

from specbench.engine import bf16_kernel, kv
from specbench.engine.loop import decode
from specbench.engine.packed import _linear, _linear_add, _pack, kernels_in_use
from specbench.engine.protocol import PlainDecoding
from specbench.records import EngineFacts
from specbench.report.tables import engine_line
from specbench.targets.batched import RowsHFTarget
from specbench.targets.fast import FastHFTarget

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
runs_here = pytest.mark.skipif(bf16_kernel.unavailable() is not None, reason=f"{bf16_kernel.unavailable()}")
ROWS = (*range(1, 15), 16, 17, 40)  # every kernel (1 to 13 rows in one pass) and several passes (8 + 6, 8 + 8, 8 + 9, ...)


HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@pytest.fixture(params=["VDPBF16PS", "AMX"])
def products(request):
    """The kernel's products on each instruction this CPU has, the process's choice restored after."""
    if request.param == "AMX" and not HAS_AMX:
        pytest.skip("the CPU has no AMX")
    library = bf16_kernel._library()
    before = library.amx_enable(-1)
    library.amx_enable(int(request.param == "AMX"))
    try:
        assert bf16_kernel.products() == request.param
        yield request.param
    finally:
        library.amx_enable(before)


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@runs_here
@pytest.mark.parametrize("n, k", [(32, 48), (144, 10), (16, 2)])
def test_a_product_is_the_exact_sum_rounded_once_to_bf16(n, k):
    weight, bias = bf16(n, k, seed=0), bf16(n, seed=1)
    packed = _pack(weight)
    assert isinstance(packed, bf16_kernel.PackedBf16)
    for rows in ROWS:
        x, residual = bf16(rows, k, seed=rows), bf16(rows, n, seed=100 + rows)
        for b, r in ((None, None), (bias, None), (None, residual), (bias, residual)):
            exact = x.double() @ weight.double().T + (b.double() if b is not None else 0) + (r.double() if r is not None else 0)
            got = (_linear_add(x, packed, b, r) if r is not None else _linear(x, packed, b)).double()
            # fp32 sums of at most a few dozen terms, then one rounding to bf16 (8 bits): within 1 bf16 ulp
            ulp = exact.abs().clamp_min(1e-3) * 2.0 ** -7
            assert ((got - exact).abs() <= ulp).all(), (rows, b is not None, r is not None)


@runs_here
def test_a_rows_result_does_not_depend_on_how_many_rows_are_computed_with_it():
    """Every output is summed over k in one order whatever the row count, so a verify's rows
    equal plain decoding's one-row products bit for bit."""
    weight = bf16(96, 64, seed=2)
    packed = _pack(weight)
    x = bf16(40, 64, seed=3)
    alone = torch.cat([_linear(x[i : i + 1], packed, None) for i in range(40)])
    for rows in ROWS:
        assert torch.equal(_linear(x[:rows], packed, None), alone[:rows]), rows
    assert torch.equal(_linear(x.view(2, 20, 64), packed, None).view(40, 96), alone)  # leading dims kept


@runs_here
@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX")
def test_where_the_cpu_has_amx_the_products_run_on_it():
    """An AMX build that stopped compiling would fall back to VDPBF16PS unseen: here it is seen."""
    assert bf16_kernel.products() == "AMX"
    assert kernels_in_use(torch.bfloat16) == "specbench's bf16 kernels (products by AMX), oneDNN for weights they do not take"
    assert bf16_kernel.dot_peak_flops(1_000_000) > 0


@runs_here
@pytest.mark.parametrize("k", [64, 96, 48])  # chunks of 32 on AMX; 48 is not, and runs on VDPBF16PS there too
def test_on_either_instruction_a_rows_product_is_its_own_and_the_sum_rounded_once(products, k):
    """AMX sums a chunk of 32 k at a time into a tile's row; each row of the tile reads only its own
    row of x, so its result is the same with 1 row or 16 (and in passes of 16 beyond)."""
    weight, bias = bf16(48, k, seed=4), bf16(48, seed=5)
    packed = _pack(weight)
    x, residual = bf16(40, k, seed=6), bf16(40, 48, seed=7)
    alone = torch.cat([_linear_add(x[i : i + 1], packed, bias, residual[i : i + 1]) for i in range(40)])
    exact = x.double() @ weight.double().T + bias.double() + residual.double()
    assert ((alone.double() - exact).abs() <= exact.abs().clamp_min(1e-3) * 2.0 ** -7).all()
    for rows in ROWS:
        assert torch.equal(_linear_add(x[:rows], packed, bias, residual[:rows]), alone[:rows]), rows


@runs_here
def test_every_row_is_summed_in_k_order_whatever_the_row_count():
    """2^24 + 1 - 2^24 is 0 summed in order in fp32 (the 1 is lost) and 1 in reverse: the sum of
    each output over k is taken in one order for every row count, so rounding cannot differ."""
    weight = torch.zeros(16, 16, dtype=torch.bfloat16)
    weight[:, 0], weight[:, 2], weight[:, 4] = 2.0 ** 24, 1.0, -(2.0 ** 24)  # one per pair of k
    packed = _pack(weight)
    for rows in ROWS:
        assert torch.equal(_linear(torch.ones(rows, 16, dtype=torch.bfloat16), packed, None), torch.zeros(rows, 16, dtype=torch.bfloat16)), rows


@runs_here
def test_the_kernel_takes_the_bf16_weights_it_fits_and_onednn_the_rest():
    assert isinstance(_pack(bf16(32, 48, seed=0)), bf16_kernel.PackedBf16)
    for weight in (bf16(24, 48, seed=0), bf16(32, 7, seed=0), torch.randn(32, 48)):  # 24 rows, odd columns, fp32
        assert isinstance(_pack(weight), torch.Tensor)
    assert isinstance(_pack(bf16(32, 48, seed=0), "onednn"), torch.Tensor)
    assert kernels_in_use(torch.bfloat16).startswith("specbench's bf16 kernel")
    assert kernels_in_use(torch.bfloat16, "onednn") == "oneDNN (asked for)" and kernels_in_use(torch.float32) == "oneDNN"
    with pytest.raises(TypeError, match="takes bf16 inputs"):
        bf16_kernel.linear(torch.randn(1, 48), _pack(bf16(32, 48, seed=0)))
    with pytest.raises(ValueError, match="kernels must be one of auto, onednn"):
        kernels_in_use(torch.bfloat16, "mkl")


@runs_here
def test_the_built_library_leaves_no_file_behind_once_loaded(tmp_path, monkeypatch):
    """A process killed later (SIGKILL runs no exit handler) must not leave its build behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    library = bf16_kernel._library.__wrapped__()
    assert not list(tmp_path.iterdir())
    x, w = bf16(3, 48, seed=1), bf16(32, 48, seed=2)  # the loaded library still computes
    packed = _pack(w)
    monkeypatch.setattr(bf16_kernel, "_library", lambda: library)
    torch.testing.assert_close(bf16_kernel.linear(x, packed).float(), (x.float() @ w.float().T), atol=0.2, rtol=0.02)


def test_without_a_working_compiler_the_reason_is_given_and_onednn_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match="exited with 1"):
        bf16_kernel._library.__wrapped__()
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(bf16_kernel, "unavailable", lambda: "the CPU has no AVX512_BF16")
    assert isinstance(_pack(bf16(32, 48, seed=0)), torch.Tensor)
    assert kernels_in_use(torch.bfloat16) == "oneDNN (the CPU has no AVX512_BF16)"


@runs_here
def test_the_bf16_fast_engine_runs_its_products_and_norms_on_the_kernels_and_says_so():
    model = tiny_llama(0).to(torch.bfloat16)  # every product's weight fits: 96 = q + k + v rows, 192, 48, the 96-id head
    kernel, onednn = FastHFTarget(model), FastHFTarget(model, kernels="onednn")
    assert kernel.lean_layers == onednn.lean_layers == 2  # the lean layer agrees with transformers' on the kernel too
    layer = kernel.decoder.backbone.layers[0]
    assert all(isinstance(p, bf16_kernel.PackedBf16) for p in (layer.qkv, layer.o, layer.gate_up, layer.down, kernel.lm_head.packed))
    assert layer.fast_kernels and not onednn.decoder.backbone.layers[0].fast_kernels
    assert not isinstance(onednn.decoder.backbone.layers[0].qkv, bf16_kernel.PackedBf16)
    stats = kernel.engine_stats()
    assert stats["kernels"].startswith("specbench's bf16 kernel") and onednn.engine_stats()["kernels"] == "oneDNN (asked for)"
    assert "(kernels: specbench's bf16 kernels" in engine_line(EngineFacts(engine="fast", packed_linears=True, kernels=stats["kernels"]))
    assert "prepacked for oneDNN" in engine_line(EngineFacts(engine="fast", packed_linears=True, kernels="oneDNN"))
    rows = RowsHFTarget(kernel, 2)  # batch rows run the same kernels as their target
    assert isinstance(rows.decoder.backbone.layers[0].qkv, bf16_kernel.PackedBf16)
    # the two engines' logits differ by rounding only, and the greedy tokens of a short decode agree
    ids = torch.tensor([5, 9, 3, 7, 11])
    want, got = onednn.prefill(ids)[0].float(), kernel.prefill(ids)[0].float()
    assert ((got - want).abs().max() / want.abs().max()) < 5e-2
    kernel.eos_token_ids = onednn.eos_token_ids = set()
    prompt = prompts(1)[0]
    assert decode(kernel, PlainDecoding(kernel), prompt, 8).output_ids == decode(onednn, PlainDecoding(onednn), prompt, 8).output_ids


@runs_here
def test_the_norm_kernel_is_transformers_rmsnorm_of_a_bf16_state():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(bf16(48, seed=4))
    for rows in (1, 3, 16):
        x = bf16(2, rows, 48, seed=rows) * 3
        want, got = norm(x), bf16_kernel.rms_norm(x, norm.weight.detach(), 1e-5)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        # the same two roundings; the fp32 sum of squares in another order moves a value by at most one bf16 step
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -7 + 1e-6).all()
        assert (got == want).float().mean() > 0.95


@runs_here
@pytest.mark.parametrize("rows, width", [(5, 48), (40, 160)])  # row by row, and on the threads (rows x width >= 6144)
def test_the_mlp_kernel_is_silu_of_the_gate_times_the_up_projection_in_bf16(rows, width):
    gate_up = bf16(2, rows, 2 * width, seed=6) * 4
    gate, up = gate_up.split(width, dim=-1)
    want, got = torch.nn.functional.silu(gate) * up, bf16_kernel.silu_mul(gate_up)
    assert got.shape == want.shape == (2, rows, width)
    # the same two roundings; exp in another approximation moves a value by at most one bf16 step
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -7 + 1e-6).all()
    assert (got == want).float().mean() > 0.95
    assert torch.equal(bf16_kernel.silu_mul(gate_up[:, :1]), got[:, :1])  # a row's result is its own


@runs_here
@pytest.mark.parametrize("dim", [64, 32])
def test_attention_is_the_fp64_softmax_rounded_and_a_rows_result_is_its_own(dim, products):
    """Grouped heads (9 queries over 3 key/value heads), a causal block after a 20-position
    context with one masked position, keys and values as strided views of one cache buffer."""
    batch, heads, kv_heads, rows, context, capacity = 2, 9, 3, 6, 20, 40
    span, low = context + rows, torch.finfo(torch.bfloat16).min
    qk = bf16(batch, rows, heads + kv_heads, dim, seed=7)
    cache = bf16(batch, 2, kv_heads, capacity, dim, seed=8)
    q, k, v = qk[:, :, :heads], cache[:, 0, :, :span], cache[:, 1, :, :span]
    mask = torch.zeros(1, 1, rows, span, dtype=torch.bfloat16)
    mask[..., context:] = torch.full((rows, rows), low).triu(1)
    mask[..., 3] = low
    assert bf16_kernel.attends(q, k, v)
    got = bf16_kernel.attend(q, k, v, mask, dim ** -0.5)
    keys, values = (t.double().repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    scores = q.double().transpose(1, 2) @ keys.transpose(-1, -2) * dim ** -0.5 + mask.double()
    exact = (scores.softmax(-1) @ values).transpose(1, 2).reshape(batch, rows, heads * dim)
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-4).all()
    for row in range(rows):  # alone, over only the positions it sees, without a mask: the same bits
        alone_mask = mask[..., row : row + 1, : context + row + 1]
        alone = bf16_kernel.attend(q[:, row : row + 1], k[:, :, : context + row + 1], v[:, :, : context + row + 1], alone_mask, dim ** -0.5)
        assert torch.equal(alone[:, 0], got[:, row]), row


@runs_here
@pytest.mark.parametrize("length", [3, 15])  # 16 rows: the products in two passes of 8, the MLP on the threads
def test_on_the_kernels_a_chain_verifys_logits_are_plain_decodings_bit_for_bit(length, products):
    """Products, norms, attention and the MLP each compute a row alone, so verifying a chain
    of 3 gives, row by row, the logits of 4 one-token steps: a drafter's output equals plain
    decoding's with no near-ties to classify (on SmolLM2 with oneDNN's products they differ by
    up to 0.4, docs/engine.md)."""
    from specbench.engine.tree import DraftTree

    model = tiny_llama(0, hidden=256).to(torch.bfloat16)  # head_dim 64: the attention kernel's fast path
    prompt, chain = prompts(1)[0], torch.randint(3, 40, (length,), generator=torch.Generator().manual_seed(length))
    fast = FastHFTarget(model)
    with torch.inference_mode():
        fast.prefill(prompt, max_positions=64)
        together = fast.verify(int(prompt[-1]), DraftTree.chain(chain))[0]
        fast.prefill(prompt, max_positions=64)
        alone = []
        for token in [int(prompt[-1]), *chain.tolist()]:
            alone.append(fast.verify(token, DraftTree.chain(torch.zeros(0, dtype=torch.long)))[0][0])
            fast.commit([])  # keep the root: the next step follows it
    assert torch.equal(together, torch.stack(alone))


@runs_here
def test_on_the_kernels_a_tree_nodes_logits_are_plain_decodings_of_its_path_bit_for_bit(products):
    """A tree's node attends to its ancestors across masked siblings; the sums skip those
    positions as exact zeros, so each node's logits are those of plain decoding along its path."""
    from specbench.engine.tree import DraftTree

    model = tiny_llama(1, hidden=256).to(torch.bfloat16)  # head_dim 64: the attention kernel's fast path
    prompt = prompts(1)[0]
    # root -> a, b; a -> c, d; b -> e; c -> f
    tokens, parents = torch.tensor([7, 30, 11, 41, 5, 60]), torch.tensor([-1, -1, 0, 0, 1, 2])
    fast = FastHFTarget(model)
    with torch.inference_mode():
        fast.prefill(prompt, max_positions=64)
        together = fast.verify(int(prompt[-1]), DraftTree(tokens, parents))[0]
        for node in range(len(tokens)):
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(int(parents[path[-1]]))
            fast.prefill(prompt, max_positions=64)
            for token in [int(prompt[-1]), *tokens[path[::-1]].tolist()]:
                logits = fast.verify(token, DraftTree.chain(torch.zeros(0, dtype=torch.long)))[0][0]
                fast.commit([])
            assert torch.equal(together[node + 1], logits), node


@runs_here
def test_attention_reads_the_cache_up_to_the_last_slot_written_with_the_bits_of_the_whole_span(monkeypatch, products):
    """A decoder's step reads a span rounded up for its captured steps' sake; the kernels stop
    at the step's last slot. What lies after it (a rejected verify's keys) is masked, and a
    masked position adds an exact zero: the logits are those of reading the whole span."""
    from specbench.engine.tree import DraftTree

    model = tiny_llama(2, hidden=256).to(torch.bfloat16)
    prompt, chain = prompts(1)[0], DraftTree.chain(torch.tensor([7, 30, 11]))
    fast = FastHFTarget(model)
    read = []
    with torch.inference_mode():
        fast.prefill(prompt, max_positions=200)
        fast.cache.kv[:, :, :, prompt.numel():] = bf16(*fast.cache.kv[:, :, :, prompt.numel():].shape, seed=9) * 8  # stale keys
        to_last_slot = fast.verify(int(prompt[-1]), chain)[0]
        fast.commit([])
        monkeypatch.setattr(bf16_kernel, "_read_span", lambda span, slots: read.append((span, int(slots.max()) + 1)) or span)
        kv.truncate(fast.cache, prompt.numel())
        whole_span = fast.verify(int(prompt[-1]), chain)[0]
    assert read and all(span > last for span, last in read)  # the whole span did read further
    assert torch.equal(to_last_slot, whole_span)


@runs_here
def test_a_head_drafter_drafts_on_the_engines_packed_copy_of_its_heads_and_prefix_layer():
    from specbench.drafters.heads.hydra import HydraDrafter
    from specbench.engine.lean_layer import LeanLayer
    from specbench.engine.packed import PackedLinear
    from specbench.targets.hf import HFTarget

    model = tiny_llama(0, vocab=256).to(torch.bfloat16)  # an LM head the kernels take (rows a multiple of 16)
    fast = FastHFTarget(model)
    fast.eos_token_ids = set()
    drafter = HydraDrafter.build(fast, heads="fresh", tree="chain:2")  # Hydra++: a prefix layer, heads on the target's LM head
    prompt = prompts(1)[0]
    got = decode(fast, drafter, prompt, 16)
    step = drafter.step_heads
    assert step is not drafter.heads and isinstance(step.hydra_mlp[0][1].linear, PackedLinear)
    assert isinstance(step.hydra_mlp[0][1].linear.packed, bf16_kernel.PackedBf16)
    assert step.hydra_mlp[0][1].linear.weight is drafter.heads.hydra_mlp[0][1].linear.weight  # shared, not copied
    assert isinstance(drafter._step_prefix.layers[0], LeanLayer) and not isinstance(drafter.prefix.model.layers[0], LeanLayer)
    assert got.output_ids == decode(fast, PlainDecoding(fast), prompt, 16).output_ids  # a chain: bit for bit, no near-tie
    blocks = [m for m in step.hydra_mlp[0] if not isinstance(m, torch.nn.Dropout)]  # fresh heads: 4 layers, the last 3 one module
    assert all(isinstance(b.linear, PackedLinear) for b in blocks) and blocks[1] is blocks[2] is blocks[3]  # repeated, packed once
    assert all(step.fused_head(h) is not None for h in range(2)) and drafter.heads.fused_head(0) is None  # the head kernel ran
    eager = HFTarget(model)
    assert HydraDrafter.build(eager, heads="fresh", tree="chain:2").step_heads.hydra_mlp[0][1].linear.__class__ is torch.nn.Linear


def packed_hydra_heads(num_layers: int, tie: bool, hidden: int = 64, vocab: int = 304):
    """Grounded Hydra heads with random weights (ResBlocks not at identity) and their CPU fast
    engine copy (every linear packed for the kernels)."""
    from specbench.drafters.heads.modules import HydraHeads
    from specbench.engine.packed import packed_copy

    torch.manual_seed(num_layers)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False) if tie else None
    heads = HydraHeads("prefix-mlp", 3, num_layers, hidden, vocab, base_lm_head=lm_head)
    for parameter in heads.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    if tie:
        torch.nn.init.normal_(lm_head.weight, std=0.3)
        lm_head.to(torch.bfloat16)
    heads.to(torch.bfloat16)
    step = packed_copy(heads)
    if tie:
        step.base_lm_head = [packed_copy(lm_head)]
    return heads, step


@runs_here
@pytest.mark.parametrize("num_layers,tie", [(1, True), (2, False), (3, True)])
def test_a_heads_top_tokens_in_one_kernel_call_are_the_modules_top_k_and_softmax(num_layers, tie, monkeypatch):
    """On the packed copy a Hydra head's top tokens and their probabilities come from one call
    (bf16_kernel.head_top): the same ResBlocks (grounded first block, shared later ones), LM head
    (tied or its own, with its bias), top-k and softmax as the modules compute, for any number of rows."""
    heads, step = packed_hydra_heads(num_layers, tie)
    calls, head_top = [], bf16_kernel.head_top
    monkeypatch.setattr(bf16_kernel, "head_top", lambda *args: calls.append(args[1].shape[0]) or head_top(*args))
    for h, rows in ((0, 1), (1, 3), (2, 16)):
        features = bf16(rows, 64 * (h + 2), seed=h)
        ids, probs = step.top_tokens(h, features, 4)
        logits = step.head(h, features).float()  # the packed modules one call at a time
        ranked = [sorted(range(logits.shape[1]), key=lambda t: (-row[t], t))[:4] for row in logits.tolist()]
        assert ids.tolist() == ranked  # by logit, equal logits (bf16 ties often) by id
        want = torch.softmax(logits, dim=-1).gather(-1, ids)
        assert torch.allclose(probs, want, rtol=1e-5, atol=1e-9) and probs.dtype == torch.float32
    assert calls == [1, 3, 16]
    assert heads.fused_head(0) is None  # the modules themselves: torch's top-k, as simulate drafts


@runs_here
def test_the_head_kernels_top_tokens_rank_equal_logits_by_id():
    """Tied logits (frequent in bf16) are ranked lowest id first, the same every time, and the
    probabilities of the whole vocabulary sum to 1."""
    _, step = packed_hydra_heads(1, tie=True)
    lm = step.base_lm_head[0]
    weight = lm.weight.detach().clone()
    weight[[250, 7, 31]] = weight[100].clone()  # four tokens with one logit, whatever the state
    lm.weight, lm.packed = torch.nn.Parameter(weight, requires_grad=False), bf16_kernel.PackedBf16(weight)
    step.__dict__.pop("_fused_heads", None)
    features = bf16(2, 128, seed=3)
    ids, probs = step.top_tokens(0, features, 304)
    logits = step.head(0, features).float()
    assert ids.tolist() == [sorted(range(304), key=lambda t: (-row[t], t)) for row in logits.tolist()]
    for row in ids.tolist():
        assert [t for t in row if t in (7, 31, 100, 250)] == [7, 31, 100, 250]
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)


@runs_here
@pytest.mark.parametrize("drafter", ["plain", "prompt-lookup"])
def test_batch_rows_on_the_kernels_equal_each_prompts_own_decode(drafter, monkeypatch):
    """Rows of different sequences share every product and attention call (per-row masks and
    positions); each row's output is that prompt's decode alone on the one-row engine."""
    from specbench.drafters.prompt_lookup import PromptLookupDrafter
    from specbench.engine.lean_layer import LeanLayer
    from specbench.engine.loop import Request, decode_rows

    model = tiny_llama(2, hidden=256).to(torch.bfloat16)
    fast = FastHFTarget(model)
    fast.eos_token_ids = set()
    make = (lambda target: PlainDecoding(target)) if drafter == "plain" else (lambda target: PromptLookupDrafter(target))
    batch_prompts, budgets = prompts(4), [12, 7, 12, 9]
    alone = [decode(fast, make(fast), p, n).output_ids for p, n in zip(batch_prompts, budgets)]
    rows = RowsHFTarget(fast, 3)
    assert isinstance(rows.decoder.backbone.layers[0], LeanLayer) and rows.decoder.backbone.layers[0].fast_kernels
    batches, attend = [], bf16_kernel.attend
    monkeypatch.setattr(bf16_kernel, "attend", lambda q, *rest: batches.append(q.shape[0]) or attend(q, *rest))
    batch = decode_rows(rows, make(rows), [Request(p, n) for p, n in zip(batch_prompts, budgets)])
    assert [d.output_ids for d in batch.decoded] == alone
    assert max(batches) == 3  # the rows' attention ran on the kernel, three sequences in one call


@runs_here
def test_a_layer_in_one_call_is_the_lean_layers_operations_bit_for_bit(monkeypatch):
    """On the one-row engine's cache each layer runs as one call of the kernels
    (bf16_kernel.layer_step), and a step's whole stack as one (stack_step): the same logits,
    prefill and a branching tree's verify, as the lean layer's operations one by one through
    transformers' forward; the first forward, before the cache exists, takes the model's forward
    (its first layer the one-by-one path)."""
    from specbench.engine.tree import DraftTree

    model = tiny_llama(3, hidden=256).to(torch.bfloat16)
    fused, apart = FastHFTarget(model), FastHFTarget(model)
    for layer in apart.decoder.backbone.layers:
        layer.fused = False
    apart.decoder.lean_stack = None
    assert all(layer.fused for layer in fused.decoder.backbone.layers) and fused.decoder.lean_stack is not None
    calls, stacks, step, stack = [], [], bf16_kernel.layer_step, bf16_kernel.stack_step
    monkeypatch.setattr(bf16_kernel, "layer_step", lambda *args: calls.append(args[1].shape[1]) or step(*args))
    monkeypatch.setattr(bf16_kernel, "stack_step", lambda *args: stacks.append(args[1].shape[1]) or stack(*args))
    prompt, tree = prompts(1)[0], DraftTree(torch.tensor([7, 30, 11, 41, 5]), torch.tensor([-1, -1, 0, 0, 2]))
    chain = DraftTree.chain(torch.tensor([3, 9]))
    with torch.inference_mode():
        got = [fused.prefill(prompt, max_positions=64)[0], fused.verify(int(prompt[-1]), tree)[0]]
        fused.commit([0, 2])
        got.append(fused.verify(17, chain)[0])
        want = [apart.prefill(prompt, max_positions=64)[0], apart.verify(int(prompt[-1]), tree)[0]]
        apart.commit([0, 2])
        want.append(apart.verify(17, chain)[0])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # prefill: layer 1 alone (layer 0 allocated the cache); the verifies: the stack in one call, at their own
    # row counts (6, not padded to 8; then 3)
    assert calls == [len(prompt)] and stacks == [6, 3] and fused.decoder.exact_rows
    # a verify that taps the final normed state (the heads', EAGLE-1's) runs the stack in one call too, with
    # transformers' logits and state; one that taps a layer's input takes transformers' forward
    calls.clear(), stacks.clear()
    with torch.inference_mode():
        fused.commit([0, 1])
        apart.commit([0, 1])
        for taps in ((None,), (2, None)):  # 2: the layer count of the tiny model, its final state too
            got, want = fused.verify(4, chain, taps), apart.verify(4, chain, taps)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1].shape == (3, 256 * len(taps))
    assert stacks == [3, 3] and calls == []
    with torch.inference_mode():
        fused.verify(4, chain, (1,))
    assert stacks == [3, 3] and calls == [3] * 2  # layers 0 and 1 of the tiny model: transformers' forward, a layer per call


@runs_here
@pytest.mark.parametrize("dim", [64, 32])  # the head_dim 64 kernel and the general one
def test_attention_sums_its_weights_in_position_order(dim, products):
    """Two keys of weight 1 with 15 of weight e^-17.25 (< half an fp32 step at 1) between them:
    in position order the small ones are lost and the values' mean is an exact bf16 midpoint,
    rounded to even (1 + 2^-6); summed lane by lane the small ones add up, the total grows and
    the mean rounds down (1 + 2^-7). The order makes a tree node's sums plain decoding's."""
    span = 17
    q = torch.zeros(1, 1, 1, dim, dtype=torch.bfloat16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, span, dim, dtype=torch.bfloat16)
    k[0, 0, 1:16, 0] = -17.25  # scores 0, -17.25 x 15, 0
    v = torch.zeros(1, 1, span, dim, dtype=torch.bfloat16)
    v[0, 0, 0, 0], v[0, 0, 16, 0] = 1 + 2.0 ** -7, 1 + 2.0 ** -6
    out = bf16_kernel.attend(q, k, v, None, 1.0)
    assert out[0, 0, 0].item() == 1 + 2.0 ** -6 and not out[0, 0, 1:].any()


@runs_here
def test_a_prefix_layer_on_the_engines_lean_copy_runs_its_layers_itself_with_the_models_own_results(monkeypatch):
    """Hydra++'s prefix layers (OwnDecoder) fed through the CPU engine's lean copy run over a static
    cache (`stack_forward`: a layer per call of the kernels until the cache exists, then the whole
    stack in one, several rows as a causal chunk without a mask) and give the bits the model's own
    forward over a DynamicCache gives, feed after feed."""
    from transformers import DynamicCache

    from specbench.drafters.heads.modules import OwnDecoder
    from specbench.engine.kv import StaticKV

    model = tiny_llama(4, hidden=256).to(torch.bfloat16)
    fast = FastHFTarget(model)
    prefix = OwnDecoder(model.config, 2).to(torch.bfloat16)
    step = fast.step_module(prefix.model)
    calls, stacks, layer_step, stack_step = [], [], bf16_kernel.layer_step, bf16_kernel.stack_step
    monkeypatch.setattr(bf16_kernel, "layer_step", lambda *args: calls.append(args[1].shape[1]) or layer_step(*args))
    monkeypatch.setattr(bf16_kernel, "stack_step", lambda *args: stacks.append((args[1].shape[1], args[7])) or stack_step(*args))
    through_model = OwnDecoder(model.config, 2).to(torch.bfloat16)
    through_model.model = prefix.model
    step.config._attn_implementation = "eager"  # transformers' mask on every forward: the kernels' attention both ways
    for _ in range(2):  # a second sequence after reset()
        prefix.reset(), through_model.reset()
        through_model.cache = DynamicCache(config=through_model.config)
        for rows in (7, 1, 2, 1, 3):
            states = bf16(rows, 256, seed=rows)
            got, want = prefix.feed(states, step), through_model.feed(states, step)
            assert isinstance(prefix.cache, StaticKV) and torch.equal(got, want), rows
        assert prefix.cached == through_model.cached == 14
    assert calls == [7] * 2  # a sequence's first feed: its first layer allocates the cache, the second runs on the kernels
    assert stacks == [(rows, None) for rows in (1, 2, 1, 3)] * 2  # then the stack, maskless


@runs_here
def test_a_lean_layer_given_no_mask_for_a_chunk_attends_causally():
    """transformers leaves the mask out for a chunk that is all the keys (sdpa's causal flag does
    its work): a lean layer over a DynamicCache then attends causally, as the model's own layer
    does, not to the positions after each row."""
    from transformers import DynamicCache

    from specbench.drafters.heads.modules import OwnDecoder

    model = tiny_llama(4, hidden=256).to(torch.bfloat16)
    prefix = OwnDecoder(model.config, 1).to(torch.bfloat16)
    assert prefix.model.config._attn_implementation == "sdpa"
    step = FastHFTarget(model).step_module(prefix.model)
    states, outs = bf16(7, 256, seed=1), []
    for module in (step, prefix.model):
        prefix.cache = DynamicCache(config=prefix.config)
        outs.append(prefix.feed(states, module).float())
    assert (outs[0] - outs[1]).abs().max() <= 0.05 * outs[1].abs().max()  # non-causal: 0.33 off where they reach 3


@runs_here
def test_around_lean_layers_the_rotary_comes_from_a_table_of_its_own_values_and_the_final_norm_from_the_kernel():
    from specbench.engine.lean_layer import LeanNorm, TableRotary

    model = tiny_llama(5, hidden=256).to(torch.bfloat16)
    backbone = FastHFTarget(model).decoder.backbone
    assert isinstance(backbone.rotary_emb, TableRotary) and isinstance(backbone.norm, LeanNorm)
    assert type(model.model.rotary_emb).__name__ == "LlamaRotaryEmbedding" and type(model.model.norm).__name__ == "LlamaRMSNorm"
    x = torch.zeros(1, 1, 256, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for rows, start in [(1, 0), (3, 17), (16, 250), (5, 300), (1, 1000)]:  # the table grows past 256 and 512
        positions = (torch.arange(rows) + start)[None]
        want, got = model.model.rotary_emb(x, positions), backbone.rotary_emb(x, positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (rows, start)
    states = torch.randn(2, 4, 256, generator=generator).to(torch.bfloat16)
    assert torch.equal(backbone.norm(states), bf16_kernel.rms_norm(states, model.model.norm.weight.detach(), model.model.norm.variance_epsilon))
