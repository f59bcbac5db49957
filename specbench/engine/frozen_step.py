"""A whole decode step of a Llama-family model compiled with its weights frozen in: a CPU
benchmark variant of the fast engine (`scripts/bench_engine.py --cpu-fast frozen`).

Why: on the development machine a bf16 step of the lean engine (engine/lean_layer.py) spends
most of its time in oneDNN's matrix-vector products, which stream the weights at about two
thirds of the memory bandwidth and cost ~15 µs per call besides, and the rest in ~35 small
operations per layer. Inductor, given the weights as constants (`freezing`) and its own C++
GEMM micro-kernels (`max_autotune_gemm`, backend CPP), emits products that read the weights at
about the bandwidth and fuses everything else: a plain bf16 step of SmolLM2-135M measured 2.0x
the lean one's speed, and every verify of up to 16 tokens was faster too (docs/engine.md). The
price: 80-230 s of compiling per bucket on 2 cores, paid again by every process (below). So
this is a variant the benchmark measures, not what `--engine auto` runs.

How: `FrozenStep` computes the step from the model's own modules (embedding, each layer's
projections and norms, rotary embeddings, final norm, LM head), with attention reading the
StaticKV read-only: each layer's new keys/values are placed at the step's slots in a copy of
that layer's cache slice inside the graph, and returned; `FrozenCompiler._step` writes them into
the cache after the graph, in one copy for every layer. Written inside the graph, the cache
is functionalised into a copy of the whole [layers, ...] buffer per layer, which made a
compiled step slower than the eager one. The hidden states a drafter taps come out of the
graph too (one graph per bucket and taps). Prefills (exact-size forwards) run on the decoder's
packed lean modules.

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
from specbench.engine.tapped import check_taps

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
    heads, q, head_dim], the tapped hidden states [q, H * len(taps)] or None), taps as
    engine/tapped.py reads them: j the input of layer j, None or the layer count the final
    normed state."""

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

    @staticmethod
    def _linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # 5-8 rows as products of 4: inductor's micro-kernel, which reads the weights at the bandwidth up
        # to 4 rows, took 5x as long for 8 (bf16 on AVX-512), and oneDNN's product for 8 rows costs what 16 do
        if 4 < x.shape[0] <= 8:
            return torch.cat([linear(chunk) for chunk in x.split(4)])
        return linear(x)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor,
                taps: tuple = ()):
        rows, heads, kv_heads, dim = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        x = self.embed(ids)  # [rows, hidden]
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [rows, 1, dim]
        bias = mask[0, 0].float()  # [rows, span]: 0 visible, dtype min masked
        check_taps(taps, len(self.layers))
        new, tapped = [], {}
        for index, layer in enumerate(self.layers):
            if index in taps:
                tapped[index] = x
            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            q = self._linear(attn.q_proj, h).view(rows, heads, dim)
            k = self._linear(attn.k_proj, h).view(rows, kv_heads, dim)
            v = self._linear(attn.v_proj, h).view(rows, kv_heads, dim)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            keys = kv[index, 0].index_copy(1, slots, k.transpose(0, 1)).float()  # [kv heads, span, dim]
            values = kv[index, 1].index_copy(1, slots, v.transpose(0, 1)).float()
            new.append(torch.stack((k, v)))
            # grouped heads: query head kv * group + g reads kv head kv
            queries = q.float().view(rows, kv_heads, group, dim).permute(1, 2, 0, 3)  # [kv, group, rows, dim]
            if rows == 1:  # products as sums, which inductor fuses into one loop with the softmax
                scores = (queries[:, :, :, None, :] * keys[:, None, None]).sum(-1) * self.scaling + bias
                probs = scores.softmax(-1)  # [kv, group, rows, span]
                attended = (probs[..., None] * values[:, None, None]).sum(-2)  # [kv, group, rows, dim]
            else:  # batched products (inductor's GEMM kernels): as fused sums 16 rows took 0.9 ms per layer
                scores = torch.matmul(queries.reshape(kv_heads, group * rows, dim), keys.transpose(1, 2))
                scores = scores.view(kv_heads, group, rows, -1) * self.scaling + bias
                probs = scores.softmax(-1)
                attended = torch.matmul(probs.view(kv_heads, group * rows, -1), values).view(kv_heads, group, rows, dim)
            attended = attended.permute(2, 0, 1, 3).reshape(rows, heads * dim).to(x.dtype)
            x = x + self._linear(attn.o_proj, attended)
            h = self._norm(x, layer.post_attention_layernorm)
            x = x + self._linear(mlp.down_proj, F.silu(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h))
        final = self._norm(x, self.norm)
        states = [tapped.get(j, final) for j in taps]  # None and the layer count: the final normed state
        hidden = (states[0] if len(states) == 1 else torch.cat(states, dim=-1)) if taps else None
        logits = self._linear(self.head, final).float()
        return logits, torch.stack(new).permute(0, 1, 3, 2, 4), hidden  # new: [layers, 2, kv heads, rows, dim]


class FrozenCompiler(CompiledStep):
    """The compiler of a StaticDecoder whose steps run as a compiled FrozenStep (one graph per
    bucket, capacity and taps), accounted as CompiledStep accounts its compilations."""

    def __init__(self, cache_dir: Path | None, backbone: nn.Module, head: nn.Module) -> None:
        """backbone, head: the model's own modules (the decoder runs packed copies of them for its
        exact forwards, the prefills: engine/packed.py)."""
        super().__init__(cache_dir)
        self.backbone, self.head = backbone, head
        self.decoder = None
        self.compiled = None
        self.shapes: set[tuple] = set()  # (bucket, span, cache shape, taps) already compiled

    def wrap(self, fn, decoder=None):
        raise_recompile_limit()
        self.decoder = decoder  # whose cache the steps read and write
        self.compiled = torch.compile(FrozenStep(self.backbone, self.head).eval(), dynamic=False)
        return self._step

    def _step(self, step):
        cache = self.decoder.cache
        shape = (step.bucket, step.span, cache.kv.shape, step.taps)
        # inductor reads these options when it compiles (a shape's first call): `torch.compile(options=)`
        # was measured not to apply `freezing` (the products ran as aten::mm on the plain weights)
        with inductor_config.patch(INDUCTOR_OPTIONS) if shape not in self.shapes else contextlib.nullcontext():
            logits, new, hidden = self.compiled(step.ids, step.positions, step.slots, step.mask, cache.kv[:, :, :, : step.span],
                                                step.taps)
        self.shapes.add(shape)
        cache.kv.index_copy_(3, step.slots, new)  # every layer's new keys and values in one copy
        return logits, hidden

    def stats(self) -> dict:
        return {**super().stats(), "frozen": True}
