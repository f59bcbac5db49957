"""A whole decode step of a Llama-family model compiled with its weights frozen in: a CPU
benchmark variant of the fast engine (`scripts/bench_engine.py --cpu-fast frozen`).

Why: on the development machine a bf16 step of the lean engine (engine/lean_layer.py) spends
most of its time in oneDNN's matrix-vector products, which stream the weights at about two
thirds of the memory bandwidth and cost ~15 µs per call besides, and the rest in ~35 small
operations per layer. Inductor, given the weights as constants (`freezing`) and its own C++
GEMM micro-kernels (`max_autotune_gemm`, backend CPP), emits products that read the weights at
about the bandwidth and fuses everything else: a plain bf16 step of SmolLM2-135M measured 2.0-2.3x
faster than the lean one (docs/engine.md). The price: 65-130 s of compiling per bucket on 2
cores, paid again by every process (below), and verifies of 8 tokens or more slower than the
lean engine's. So this is a variant the benchmark measures, not what `--engine auto` runs.

How: `FrozenStep` computes the step from the model's own modules (embedding, each layer's
projections and norms, rotary embeddings, final norm, LM head), with attention reading the
StaticKV read-only: each layer's new keys/values are placed at the step's slots in a copy of
that layer's cache slice inside the graph, and returned; `FrozenCompiler._step` writes them into
the cache after the graph, in one copy for every layer. Prefills (exact-size forwards) run on
the decoder's packed lean modules. Written inside the graph, the cache
is functionalised into a copy of the whole [layers, ...] buffer per layer, which made a
compiled step slower than the eager one. Steps with taps (drafters reading hidden states)
are not compiled: they raise, and the variant is for plain decoding and verify profiles.

Caching: none across processes. Inductor's FX graph cache keys frozen weights by shape, not
by value, so it is switched off here rather than trusted with two models of one shape (a test
compiles one shape for two models in one process; each must give its own eager tokens); with
it on, it did not store these graphs anyway (their oneDNN-packed constants do not pickle).
Every process compiles its buckets again.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from specbench.engine.compiled_step import CompiledStep, raise_recompile_limit
from specbench.engine.lean_layer import _takes

INDUCTOR_OPTIONS = {
    "freezing": True,  # weights as constants: inductor lays them out for its kernels once
    "fx_graph_cache": False,  # module docstring
    "max_autotune_gemm": True,
    # its C++ micro-kernels (measured faster than oneDNN for one row) where they take the shape, else ATen
    "max_autotune_gemm_backends": "CPP,ATEN",
}


class FrozenStep(nn.Module):
    """One step of `backbone` (a transformers Llama-family decoder stack) and `head` over a
    StaticKV storage read-only; returns (logits [q, V] fp32, new keys/values [layers, 2, kv
    heads, q, head_dim])."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        layers = backbone.layers
        if not all(_takes(layer) for layer in layers) or getattr(backbone, "rotary_emb", None) is None:
            raise ValueError("the frozen step computes Llama-family layers only")
        # submodules (a ModuleList, not a list): freezing makes only the compiled module's own parameters constants
        self.embed, self.layers, self.norm, self.head, self.rotary = backbone.embed_tokens, layers, backbone.norm, head, backbone.rotary_emb
        attn = layers[0].self_attn
        self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)  # as LeanLayer._norm

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor):
        rows, heads, kv_heads, dim = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        x = self.embed(ids)  # [rows, hidden]
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [rows, 1, dim]
        bias = mask[0, 0].float()  # [rows, span]: 0 visible, dtype min masked
        new = []
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            q = attn.q_proj(h).view(rows, heads, dim)
            k = attn.k_proj(h).view(rows, kv_heads, dim)
            v = attn.v_proj(h).view(rows, kv_heads, dim)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            keys = kv[index, 0].index_copy(1, slots, k.transpose(0, 1)).float()  # [kv heads, span, dim]
            values = kv[index, 1].index_copy(1, slots, v.transpose(0, 1)).float()
            new.append(torch.stack((k, v)))
            # grouped heads: query head kv * group + g reads kv head kv; products as sums, which
            # inductor fuses (its GEMM backend has no kernel for these small batched products)
            queries = q.float().view(rows, kv_heads, group, dim).permute(1, 2, 0, 3)  # [kv, group, rows, dim]
            scores = (queries[:, :, :, None, :] * keys[:, None, None]).sum(-1) * self.scaling + bias
            probs = scores.softmax(-1)  # [kv, group, rows, span]
            attended = (probs[..., None] * values[:, None, None]).sum(-2)  # [kv, group, rows, dim]
            attended = attended.permute(2, 0, 1, 3).reshape(rows, heads * dim).to(x.dtype)
            x = x + attn.o_proj(attended)
            h = self._norm(x, layer.post_attention_layernorm)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        logits = self.head(self._norm(x, self.norm)).float()
        return logits, torch.stack(new).permute(0, 1, 3, 2, 4)  # [layers, 2, kv heads, rows, dim]


class FrozenCompiler(CompiledStep):
    """The compiler of a StaticDecoder whose steps run as a compiled FrozenStep (one graph per
    bucket and capacity), accounted as CompiledStep accounts its compilations."""

    def __init__(self, cache_dir: Path | None, backbone: nn.Module, head: nn.Module) -> None:
        """backbone, head: the model's own modules (the decoder runs packed copies of them for its
        exact forwards, the prefills: engine/packed.py)."""
        super().__init__(cache_dir)
        self.backbone, self.head = backbone, head
        self.decoder = None
        self.compiled = None
        self.shapes: set[tuple] = set()  # (bucket, span, cache shape) already compiled

    def wrap(self, fn, decoder=None):
        raise_recompile_limit()
        self.decoder = decoder  # whose cache the steps read and write
        self.compiled = torch.compile(FrozenStep(self.backbone, self.head).eval(), dynamic=False)
        return self._step

    def _step(self, step):
        if step.taps:
            raise ValueError("the frozen step computes no hidden-state taps")
        cache = self.decoder.cache
        shape = (step.bucket, step.span, cache.kv.shape)
        # inductor reads these options when it compiles (a shape's first call): `torch.compile(options=)`
        # was measured not to apply `freezing` (the products ran as aten::mm on the plain weights)
        with inductor_config.patch(INDUCTOR_OPTIONS) if shape not in self.shapes else contextlib.nullcontext():
            logits, new = self.compiled(step.ids, step.positions, step.slots, step.mask, cache.kv[:, :, :, : step.span])
        self.shapes.add(shape)
        cache.kv.index_copy_(3, step.slots, new)  # every layer's new keys and values in one copy
        return logits, None

    def stats(self) -> dict:
        return {**super().stats(), "frozen": True}
