"""A Llama-family decoder layer in fewer operations, for the CPU fast engine.

Why: with its weights prepacked (engine/packed.py) a CPU decode step of a small model is no
longer bound by its matrix products but by the layers' other work: transformers' layer runs
~40 small operations and Python calls per layer (casts around the norms, rotary halves,
attention dispatch, views), each a few microseconds, times 30 layers. This layer computes the
same function with about half of them: one stacked q/k/v product and one gate/up product,
`F.rms_norm`, `F.scaled_dot_product_attention` with grouped heads. Measured on the development
machine (docs/engine.md) it is a quarter faster per bf16 step than the packed transformers layer.
In bf16 on a CPU with AVX512_BF16 its norms, attention and SiLU·up run on specbench's bf16
kernels (engine/bf16_kernel.py) as its products do, which keeps a row's result independent of
the other rows (`fast_kernels`).

What it takes: a layer whose modules are Llama's (q/k/v/o projections, gate/up/down MLP with
SiLU, two RMSNorms, rotary embeddings handed in by the model, full attention) — Llama, Mistral
without a sliding window, Qwen2 (biases on q/k/v). `lean_layers` swaps a layer only when its
output equals the transformers layer's on a probe, to the dtype's rounding; anything else
keeps transformers' layer, so an unknown variant (extra norms, other activations) is computed
right, only not faster. The taps a drafter reads (a layer's input) are unchanged: the model's
own forward still calls each layer module.

`step_modules` is the one way a step's modules are made (the fast engine's target and draft
decoders, batch rows): on a CPU that packs (engine/packed.py `can_pack`) the packed copy, then its
lean layers (`packed_step_modules`); elsewhere the modules as they are.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from specbench.engine import bf16_kernel
from specbench.engine.kv import StaticKV
from specbench.engine.packed import _linear, _linear_add, _pack, can_pack, packed_copy
from specbench.errors import SpecbenchWarning

LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative, on a probe's layer output


class ForwardShared:
    """What every lean layer of one forward computes alike (the signed sin of the rotary
    embeddings, a one-row attention's fp32 mask operand), made by the stack's first lean layer
    in each forward and read by the others: inputs may be static buffers changed in place
    between forwards, so nothing is kept from one forward to the next."""

    def __init__(self) -> None:
        self.sin: torch.Tensor | None = None  # what signed_sin was made from (held: its identity is checked)
        self.signed_sin: torch.Tensor | None = None
        self.masks: dict[tuple, torch.Tensor] = {}


class LeanLayer(nn.Module):
    """The decoder layer `layer` (a transformers Llama-family layer), computed over its own
    weights with stacked, prepacked products."""

    def __init__(self, layer: nn.Module, kernels: str = "auto") -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx = attn.layer_idx
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv = _pack(torch.cat([p.weight for p in projections]), kernels)
        self.qkv_bias = torch.cat([p.bias for p in projections]).detach() if attn.q_proj.bias is not None else None
        self.sizes = [p.out_features for p in projections]
        self.o, self.o_bias = _pack(attn.o_proj.weight, kernels), attn.o_proj.bias
        self.gate_up = _pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), kernels)
        self.gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]).detach() if mlp.gate_proj.bias is not None else None
        self.intermediate = mlp.gate_proj.out_features
        self.down, self.down_bias = _pack(mlp.down_proj.weight, kernels), mlp.down_proj.bias
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.fast_kernels = (kernels == "auto" and self.norm1.dtype == self.norm2.dtype == torch.bfloat16
                          and self.norm1.numel() % 16 == 0 and bf16_kernel.unavailable() is None)
        # the whole layer in one call of the kernels (bf16_kernel.layer_step) where every piece fits them
        biases = (self.qkv_bias, self.o_bias, self.gate_up_bias, self.down_bias)
        self.fused = (self.fast_kernels and self.head_dim % 32 == 0 and self.head_dim <= 256 and self.intermediate % 16 == 0
                      and all(isinstance(p, bf16_kernel.PackedBf16) for p in (self.qkv, self.o, self.gate_up, self.down))
                      and all(b is None or (b.dtype == torch.bfloat16 and b.is_contiguous()) for b in biases)
                      and self.norm1.is_contiguous() and self.norm2.is_contiguous())
        self.shared, self.leads = ForwardShared(), True  # lean_layers gives a stack's layers one, led by the first

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # as transformers' RMSNorm (in fp32, cast back, then scaled): torch's rms_norm computes a
        # bf16 input in fp32 and rounds once, the same values without two casts of our own; the
        # bf16 kernel computes the same in one call (torch's took 30-45 us for one row)
        if self.fast_kernels and x.dtype == torch.bfloat16:
            return bf16_kernel.rms_norm(x, weight.detach(), eps)
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        # transformers' x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x) * signed_sin
        # (signed_sin: sin with its first half negated; a negation is exact): 4 operations, not 7
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of a few query rows over the cache, computed in fp32 (softmax in fp32 as
        transformers' eager attention), the query heads that share a key/value head stacked as
        rows of one product: torch's CPU kernels for bf16 products this small take about twice
        as long as converting the span to fp32 first, and its SDPA measured 8 % slower per step
        for one row (even given it twice) and 170 us a layer for 16 rows (docs/engine.md)."""
        batch, _, rows, dim = q.shape
        span, group = k.shape[2], self.heads // self.kv_heads
        # query heads kv * group .. kv * group + group - 1 read key/value head kv (transformers' repeat_kv)
        queries = q.reshape(batch * self.kv_heads, group * rows, dim).float()
        keys = k.reshape(batch * self.kv_heads, span, dim).float().transpose(1, 2)
        if mask is None:
            scores = torch.bmm(queries, keys).mul_(self.scaling)
        else:  # scaling and the additive mask in the product's own pass, its fp32 operand made once per forward
            shape = (batch, self.kv_heads, group, rows, span)
            bias = self.shared.masks.get(shape)
            if bias is None:
                bias = mask.reshape(mask.shape[0], 1, 1, rows, span).float().expand(shape).reshape(batch * self.kv_heads, group * rows, span)
                self.shared.masks[shape] = bias
            scores = torch.baddbmm(bias, queries, keys, alpha=self.scaling)
        probs = scores.softmax(-1)
        out = torch.bmm(probs, v.reshape(batch * self.kv_heads, span, dim).float())
        return out.to(q.dtype).reshape(batch, self.heads, rows, dim)  # [batch * kv heads, group * rows, dim] -> heads

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None, past_key_values=None,
                **kwargs) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values
        batch, rows, _ = hidden_states.shape
        cos, sin = position_embeddings  # [batch, rows, head_dim], the same for every layer of a forward
        if self.fused and batch == 1 and hidden_states.dtype == cos.dtype == torch.bfloat16 and isinstance(cache, StaticKV) \
                and cache.kv is not None and cache.kv.dtype == torch.bfloat16 and cache.slots is not None \
                and cache.slots.numel() == rows and (attention_mask is not None or rows == 1) \
                and (attention_mask is None or attention_mask.shape[-1] >= (cache.span or cache.capacity)):
            # the one-row fast engine's cache: the layer in one call, the same operations as below
            layer_kv = cache.kv[self.layer_idx]
            return bf16_kernel.layer_step(self, hidden_states, cos, sin, layer_kv[0], layer_kv[1], cache.slots,
                                          cache.span or cache.capacity, attention_mask)
        if self.leads or self.shared.sin is not sin:  # a forward that did not start at the leader makes its own
            half = sin.shape[-1] // 2
            self.shared.sin = sin
            self.shared.signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)
            self.shared.masks = {}
        h = self._norm(hidden_states, self.norm1, self.eps1)
        qk, v = _linear(h, self.qkv, self.qkv_bias).split((self.sizes[0] + self.sizes[1], self.sizes[2]), dim=-1)
        # q and k rotated in one pass: [batch, rows, heads + kv heads, head_dim]
        qk = self._rotate(qk.view(batch, rows, self.heads + self.kv_heads, self.head_dim), cos.unsqueeze(2), self.shared.signed_sin)
        q, k = qk.transpose(1, 2).split((self.heads, self.kv_heads), dim=1)
        v = v.view(batch, rows, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if (rows == 1 or attention_mask is not None) and self.fast_kernels and bf16_kernel.attends(q, k, v):
            # [batch, rows, heads, dim] queries as the rotation left them: the kernel reads them in place
            attended = bf16_kernel.attend(qk[:, :, : self.heads], k, v, attention_mask, self.scaling)
        else:
            if rows == 1 or attention_mask is not None:
                attended = self._attend(q, k, v, attention_mask)
            else:  # no mask for several rows: a causal chunk that is all the keys (transformers drops the mask only then)
                if k.shape[2] != rows:
                    raise ValueError(f"{rows} rows after {k.shape[2] - rows} cached positions need an attention mask")
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                          enable_gqa=self.heads != self.kv_heads)
            attended = attended.transpose(1, 2).reshape(batch, rows, self.heads * self.head_dim)
        x = _linear_add(attended, self.o, self.o_bias, hidden_states)
        gate_up = _linear(self._norm(x, self.norm2, self.eps2), self.gate_up, self.gate_up_bias)
        if self.fast_kernels and self.intermediate % 16 == 0:
            return _linear_add(bf16_kernel.silu_mul(gate_up), self.down, self.down_bias, x)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return _linear_add(F.silu(gate) * up, self.down, self.down_bias, x)


NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * bf16(x * rsqrt(mean(x^2) + eps)), as the kernel's


class LeanNorm(nn.Module):
    """A stack's final RMSNorm (one of NORMS, bf16, width a multiple of 16) in one call of the
    bf16 kernel: transformers' norm runs 7 operations, 0.1-0.2 ms per step when the caches are
    cold from the step's weights (measured in a SmolLM2 decode, docs/engine.md)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_kernel.rms_norm(x, self.weight.detach(), self.eps)


class TableRotary(nn.Module):
    """A rotary embedding's cos and sin read from a table the module itself computed for positions
    0..n-1 (grown by doubling): each value is a function of one position alone (a product with
    inv_freq, then cos or sin), so the table holds the module's own results, without its 8
    operations per forward. Only for RoPE types whose frequencies never change (not dynamic)."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self.tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def takes(rotary: nn.Module | None) -> bool:
        rope_type = getattr(rotary, "rope_type", None)
        return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope" and hasattr(rotary, "inv_freq")

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables.get(x.dtype, (None, None))
        top = int(position_ids.max()) + 1
        if cos is None or top > cos.shape[0]:
            size = max(top, 2 * (cos.shape[0] if cos is not None else 256))
            cos, sin = self.rotary(x, torch.arange(size, device=x.device)[None])
            cos, sin = cos[0], sin[0]
            self.tables[x.dtype] = cos, sin
        return cos[position_ids], sin[position_ids]

    def rows(self, x: torch.Tensor, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [count, head_dim] of positions start..start+count-1: views of the table, no indexing."""
        cos, _ = self.tables.get(x.dtype, (None, None))
        if cos is None or start + count > cos.shape[0]:
            self.forward(x, torch.tensor([start + count - 1], device=x.device))  # grows the table
        cos, sin = self.tables[x.dtype]
        return cos[start : start + count], sin[start : start + count]


def runs_lean(model: nn.Module | None) -> bool:
    """`model` (a transformers decoder stack: layers, rotary_emb, norm) is an engine copy whose
    every layer LeanLayer computes in one call of the kernels (`fused`): `stack_forward` takes it."""
    layers = getattr(model, "layers", None)
    return (layers is not None and len(layers) > 0 and all(isinstance(layer, LeanLayer) and layer.fused for layer in layers)
            and hasattr(model, "rotary_emb") and hasattr(model, "norm"))


@torch.inference_mode()
def stack_forward(model: nn.Module, hidden: torch.Tensor, cache: StaticKV) -> torch.Tensor:
    """The normed outputs [m, H] of rows `hidden` [m, H] (bf16) at the positions after `cache.length`
    through `model` (`runs_lean`), their keys and values added to `cache`: what the model's own forward
    over a DynamicCache computes (the same layers, rotary and a causal mask), without transformers'
    wrapper around the layers, which costs more than a one-layer stack's own work (a drafter's prefix
    layer: 0.43 ms through the model's forward for one row, docs/engine.md)."""
    rows, start = hidden.shape[0], cache.length
    cache.reserve(start + rows)  # a drafter's own cache grows with its context (doubling: rarely)
    # the positions as a view of a table: each torch call here cost tens of microseconds, the caches
    # cold from the target's step (docs/heads.md)
    positions = _arange(start + rows, hidden.device)[start:]
    cache.slots, cache.span = positions, start + rows
    stack = _lean_stack(model)
    if stack is not None and cache.kv is not None and isinstance(model.rotary_emb, TableRotary):
        # every layer and the final norm in one call, no mask (the kernels' causal chunk), the rotary
        # rows as views of their table too
        cos, sin = model.rotary_emb.rows(hidden, start, rows)
        if stack.runs(cache):
            cache.length = start + rows
            return bf16_kernel.stack_step(stack.weights, hidden[None], cos, sin, cache.kv, positions, start + rows, None,
                                          model.norm)[0]
    cos, sin = model.rotary_emb(hidden[None], positions[None])
    mask = None  # one row sees every cached position; several see the cache and each other causally
    if rows > 1:
        allowed = torch.ones(rows, start + rows, dtype=torch.bool, device=hidden.device).tril(start)
        mask = torch.zeros(1, 1, rows, start + rows, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
    states = hidden[None]
    for layer in model.layers:  # a layer per call, the first allocating the cache
        states = layer(states, attention_mask=mask, position_embeddings=(cos, sin), cache=cache)
    cache.length = start + rows
    return model.norm(states)[0]


_ARANGES: dict[torch.device, torch.Tensor] = {}


def _arange(length: int, device: torch.device) -> torch.Tensor:
    """0..length-1 (long) as a view of one table per device, grown by doubling."""
    table = _ARANGES.get(device)
    if table is None or table.numel() < length:
        table = _ARANGES[device] = torch.arange(max(length, 2 * (table.numel() if table is not None else 256)), device=device)
    return table[:length]


def _lean_stack(model: nn.Module) -> LeanStack | None:
    """The model's layers as one stack_step call (LeanStack), made once per model; None where
    they cannot be (then a layer per call)."""
    if "_lean_stack" not in model.__dict__:
        model.__dict__["_lean_stack"] = LeanStack.make(model)
    return model.__dict__["_lean_stack"]


STACKS = ("LlamaModel", "MistralModel", "Qwen2Model")  # forwards that are embed, rotary, the layers, norm: nothing else


class LeanStack:
    """A step of a lean decoder stack (`runs_lean`, one of STACKS) over a StaticKV, as the model's
    own forward computes it (embedding, rotary, every layer, final norm) with all the layers in one
    call of the kernels (bf16_kernel.stack_step): no Python per layer and no transformers forward
    around them, which took 1-1.8 ms of a 7-11 ms SmolLM2 step (docs/engine.md). Taps (a layer's
    input) and a cache not yet allocated take the model's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weights = bf16_kernel.StackWeights(model.layers)

    @staticmethod
    def make(model: nn.Module) -> LeanStack | None:
        if type(model).__name__ not in STACKS or not runs_lean(model) or not isinstance(getattr(model, "norm", None), LeanNorm):
            return None
        return LeanStack(model) if bf16_kernel.StackWeights.takes(model.layers) else None

    def runs(self, cache: StaticKV) -> bool:
        return cache.kv is not None and cache.kv.dtype == torch.bfloat16 and cache.kv.is_contiguous() and cache.slots is not None

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: StaticKV, mask: torch.Tensor | None) -> torch.Tensor:
        """The normed last hidden states [1, q, H] of tokens `ids` [q] at `positions` [q]; their keys and
        values go to the cache's `slots`, attention reads its first `span` positions under `mask`."""
        model = self.model
        hidden = model.embed_tokens(ids[None])
        cos, sin = model.rotary_emb(hidden, positions[None])
        return bf16_kernel.stack_step(self.weights, hidden, cos, sin, cache.kv, cache.slots, cache.span or cache.capacity, mask,
                                      model.norm)


def _takes(layer: nn.Module) -> bool:
    """A Llama-family layer with exactly the modules LeanLayer computes."""
    if type(layer).__name__ not in LAYERS:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in linears):
        return False
    if getattr(attn.config, "sliding_window", None) and getattr(attn.config, "use_sliding_window", True):
        return False
    act = getattr(mlp, "act_fn", None)  # torch's SiLU or transformers' own
    return type(act).__name__ in ("SiLU", "SiLUActivation") and {n for n, _ in attn.named_children()} == {"q_proj", "k_proj", "v_proj", "o_proj"}


@torch.inference_mode()
def _agrees(layer: nn.Module, lean: LeanLayer, rotary: nn.Module, dtype: torch.dtype) -> bool:
    """The lean layer's output is the transformers layer's on a probe: a causal chunk of 5
    tokens into a cache, then one more token attending to all 6 (the two attention paths)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 6, lean.norm1.numel(), generator=generator).to(dtype)
    positions = torch.arange(6)[None]
    cos, sin = rotary(hidden, positions)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 6, 6, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    caches = [DynamicCache(config=layer.self_attn.config) for _ in range(2)]
    for rows in (slice(0, 5), slice(5, 6)):
        inputs = (hidden[:, rows], mask[:, :, rows, : rows.stop], positions[:, rows])
        embeddings = (cos[:, rows], sin[:, rows])
        want = layer(*inputs, caches[0], position_embeddings=embeddings)  # the cache positionally: its name varies by version
        want = want[0] if isinstance(want, tuple) else want
        got = lean(inputs[0], attention_mask=inputs[1], position_embeddings=embeddings, cache=caches[1])
        scale = want.float().abs().max().clamp_min(1e-6)
        if not ((got.float() - want.float()).abs().max() / scale) <= TOLERANCE.get(dtype, 1e-4):
            return False
    return True


def lean_layers(step_backbone: nn.Module, backbone: nn.Module, dtype: torch.dtype, kernels: str = "auto") -> int:
    """In `step_backbone` (the fast engine's own copy of `backbone`, engine/packed.py
    `packed_copy`), replace each decoder layer that LeanLayer computes equally by a LeanLayer
    over `backbone`'s layer; returns how many were replaced. A layer that disagrees on the
    probe stays as it is, with a warning; `backbone` itself is never changed."""
    layers, rotary = getattr(backbone, "layers", None), getattr(backbone, "rotary_emb", None)
    if layers is None or rotary is None or dtype not in TOLERANCE:
        return 0
    swapped, kept, shared = 0, {}, ForwardShared()
    for index, layer in enumerate(layers):
        if not _takes(layer):
            continue
        try:
            lean = LeanLayer(layer, kernels)
            agrees = _agrees(layer, lean, rotary, dtype)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:  # a variant this layer does not know
            agrees, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            why = "its output differs from transformers' layer on a probe"
        if not agrees:
            kept.setdefault(why, []).append(index)
            continue
        lean.shared, lean.leads = shared, swapped == 0  # the stack's first lean layer runs first in every forward
        step_backbone.layers[index] = lean
        swapped += 1
    if swapped and all(isinstance(layer, LeanLayer) and layer.fast_kernels for layer in step_backbone.layers):
        _lean_edges(step_backbone, backbone, dtype)
    for why, indices in kept.items():  # one line per reason, not one per layer
        # stacklevel 3: past packed_step_modules, at the target that asked for the step
        warnings.warn(f"layer(s) {', '.join(map(str, indices))} ({type(layers[indices[0]]).__name__}) run as transformers writes "
                      f"them on the CPU fast engine ({why})", SpecbenchWarning, stacklevel=3)
    return swapped


def _lean_edges(step_backbone: nn.Module, backbone: nn.Module, dtype: torch.dtype) -> None:
    """Around lean layers on the kernels, the stack's final norm (LeanNorm, where it agrees with the
    norm on a probe as a layer must) and its rotary embedding (TableRotary) in fewer operations."""
    norm = getattr(backbone, "norm", None)
    if type(norm).__name__ in NORMS and getattr(norm, "weight", None) is not None and norm.weight.dtype == torch.bfloat16 \
            and norm.weight.dim() == 1 and norm.weight.numel() % 16 == 0 and norm.weight.is_contiguous():
        probe = torch.randn(3, norm.weight.numel(), generator=torch.Generator().manual_seed(0)).to(dtype)
        lean = LeanNorm(norm)
        with torch.no_grad():
            got, want = lean(probe).float(), norm(probe).float()
        if (got - want).abs().max() / want.abs().max().clamp_min(1e-6) <= TOLERANCE[dtype]:
            step_backbone.norm = lean
    if TableRotary.takes(getattr(backbone, "rotary_emb", None)):
        step_backbone.rotary_emb = TableRotary(backbone.rotary_emb)


class StepModules(NamedTuple):
    backbone: nn.Module
    head: nn.Module | None
    lean_layers: int  # decoder layers computed by LeanLayer
    packed: bool  # the linear weights prepacked for oneDNN


def packed_step_modules(backbone: nn.Module, head: nn.Module | None, dtype: torch.dtype, lean: bool = True,
                        kernels: str = "auto") -> StepModules:
    """The modules a CPU step runs: copies of `backbone` and `head` sharing their weights, with the
    linear weights prepacked (engine/packed.py), and with `lean` the Llama-family layers that agree
    on the probe computed by LeanLayer (a warning names the others). The originals stay as they
    were, so an eager target over the same model stays eager. The caller decides whether to pack
    (engine/packed.py `can_pack`)."""
    step_backbone = packed_copy(backbone, kernels=kernels)
    step_head = packed_copy(head, kernels=kernels) if head is not None else None
    swapped = lean_layers(step_backbone, backbone, dtype, kernels) if lean else 0
    return StepModules(step_backbone, step_head, swapped, True)


def step_modules(backbone: nn.Module, head: nn.Module | None, device: torch.device, dtype: torch.dtype,
                 lean: bool = True, kernels: str = "auto") -> StepModules:
    """The modules a step of `backbone` and `head` runs on `device` in `dtype`: packed (and with
    `lean` made lean) where oneDNN takes them, the originals elsewhere (CUDA, float16)."""
    if can_pack(device, dtype):
        return packed_step_modules(backbone, head, dtype, lean, kernels)
    return StepModules(backbone, head, 0, False)
