"""`--engine fast`: the hf target over a preallocated KV cache, with CUDA graphs on CUDA and
linear weights prepacked for oneDNN on a CPU (a compiled CPU step is a benchmark variant).

Same contract as HFTarget (prefill, verify a tree, commit the accepted path),
same model weights and attention code; only the cache, the step around the
forward and the linear kernels differ (see specbench/engine/static_cache.py,
engine/packed.py, engine/compiled_step.py and engine/engines.py).
The decode loop does not know which engine it drives, and plain decoding runs
on the same target object, so a run's speedup compares like with like.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specbench.engine import kv
from specbench.engine.protocol import Taps
from specbench.engine.compiled_step import CompiledStep
from specbench.engine.frozen_step import FrozenCompiler
from specbench.engine import bf16_kernel
from specbench.engine.lean_layer import packed_step_modules, runs_lean, step_modules
from specbench.engine.packed import can_pack, kernels_in_use
from specbench.engine.static_cache import StaticDecoder
from specbench.engine.tree import DraftTree, kept_rows
from specbench.errors import UserError
from specbench.targets.hf import HFTarget


def check_full_attention(model, name: str) -> None:
    """The static cache and tree masks assume every layer attends over the whole context."""
    layers = DynamicCache(config=model.config).layers
    if any(type(layer) is not DynamicLayer for layer in layers):
        raise UserError(
            f"'{name}' uses a sliding-window or hybrid KV cache, which the fast engine does not "
            "support; choose a full-attention model or --engine eager"
        )


class FastHFTarget(HFTarget):
    engine = "fast"

    def __init__(self, model, tokenizer=None, name: str = "", model_id: str = "", graphs=None, bucketed: bool = False,
                 compiled: bool | str = False, packed: bool | None = None, lean: bool = True, profile_buckets: bool = False,
                 kernels: str = "auto", **kwargs) -> None:
        """graphs: None = CUDA graphs on CUDA only; True/False; or a graph backend object (tests).
        compiled: the step compiled by torch.compile (engine/compiled_step.py), on a CPU without graphs;
            "frozen": the whole step compiled with its weights frozen (engine/frozen_step.py, a benchmark variant).
        packed: None = on a CPU, linear weights prepacked for oneDNN (engine/packed.py) unless compiled.
        lean: with packed, Llama-family layers computed in fewer operations (engine/lean_layer.py).
        kernels: with packed, whose kernels the step runs (engine/packed.py KERNELS)."""
        super().__init__(model, tokenizer, name=name, model_id=model_id, **kwargs)
        check_full_attention(model, self.name)
        graphs = self.device.type == "cuda" if graphs is None else graphs
        frozen = compiled == "frozen"  # its prefills (exact forwards) run packed: they are not compiled
        packed = can_pack(self.device, self.dtype) and (frozen or not compiled) and not graphs if packed is None else packed
        self.packed = bool(packed)
        self.kernels = kernels
        self.profile_buckets = profile_buckets
        self.lean_layers = 0
        step_backbone, model_modules = self.backbone, (self.backbone, self._lm_head)
        if self.packed:  # a copy of the modules sharing the weights: the model itself stays as it was
            step_backbone, self._lm_head, self.lean_layers, _ = packed_step_modules(self.backbone, self._lm_head, self.dtype, lean,
                                                                                       kernels)
        self.compiler = None
        if compiled and not graphs:
            self.compiler = FrozenCompiler(compile_cache_dir(), *model_modules) if frozen else CompiledStep(compile_cache_dir())
        # a CPU step runs at a bucket measured cheapest (`warm_up`), so it is bucketed even uncompiled;
        # on the bf16 kernels at its own row count (`rows_alone`)
        bucketed = bucketed or self.packed or self.compiler is not None
        self.decoder = StaticDecoder(step_backbone, self.lm_head, self.device, self.dtype, bucketed=bucketed, graphs=graphs,
                                     compiler=self.compiler, exact_rows=rows_alone(step_backbone, self.lm_head))
        self.cache = self.decoder.cache

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None):
        """Start a sequence. max_positions (prompt + new tokens + the largest verify) sizes the
        static cache now, between sequences, so that it never grows while the sequence runs."""
        self.cache.truncate(0)
        prompt = prompt.to(self.device)
        self.decoder.plan(max(max_positions or 0, prompt.numel()))
        out = self.decoder.forward(prompt, None, taps)  # causal, exact size, uncaptured
        self.seq_len = self.cache.length = prompt.numel()
        return out

    @torch.inference_mode()
    def verify(self, root: int, tree: DraftTree, taps: Taps = ()):
        ids = torch.cat([torch.tensor([root], device=self.device), tree.tokens.to(self.device)])
        return self.decoder.forward(ids, tree.shape_key, taps)

    @torch.inference_mode()
    def commit(self, accepted_nodes: list[int]) -> None:
        keep = kept_rows(accepted_nodes)
        kv.compact(self.cache, self.seq_len, keep)
        self.seq_len += len(keep)

    def warm_up(self, max_rows: int, taps: Taps = (), max_positions: int | None = None) -> float:
        """Between sequences: size the cache for max_positions and capture (CUDA) or compile (CPU)
        every bucket a verify of 1..max_rows rows uses; returns the ms that took (0 for neither).
        With `profile_buckets` (CPU, no graphs) each bucket's latency is then measured and a verify
        picks the cheapest bucket that holds it (engine/buckets.py `cheapest_bucket`). Off by
        default: the bucket changes the kernels' summation order, so a choice made from timings
        makes greedy outputs depend on timing noise (a resumed run then differs from an
        uninterrupted one at near-ties); the next power of two is the same in every run."""
        ms = self.decoder.warm_up(max_rows, taps, max_positions)
        if self.profile_buckets and self.decoder.graphs is None and self.decoder.bucketed and not self.decoder.exact_rows:
            self.decoder.measure_profile(max_rows, taps)
        return ms

    def engine_stats(self) -> dict:
        return {"cuda_graphs": self.decoder.graphs is not None, "packed_linears": self.packed, "lean_layers": self.lean_layers,
                "kernels": kernels_in_use(self.dtype, self.kernels) if self.packed else None, **self.decoder.stats()}

    def step_module(self, module):
        """A drafter's modules as this engine runs them: on a CPU a copy sharing every parameter,
        its linear weights packed and its Llama-family decoder layers, if it has any (Hydra++'s
        prefix layer), lean as the target's (engine/lean_layer.py); elsewhere the modules themselves."""
        if not self.packed:
            return module
        return packed_step_modules(module, None, self.dtype, lean=self.lean_layers > 0, kernels=self.kernels).backbone

    def static_decoder(self, backbone, head, device, dtype) -> StaticDecoder:
        """A decoder for another model (a draft's) on this engine: bucketed and captured (or
        compiled, or its linears packed) as the target's steps are."""
        compiler = CompiledStep() if self.compiler is not None and not self.packed else None  # the frozen step's drafts run packed
        if self.packed:
            backbone, head, *_ = step_modules(backbone, head, device, dtype, lean=self.lean_layers > 0,
                                           kernels=self.kernels)
        return StaticDecoder(backbone, head, device, dtype, bucketed=self.decoder.bucketed, graphs=self.decoder.graphs,
                             compiler=compiler, exact_rows=self.packed and rows_alone(backbone, head))


def rows_alone(backbone, head) -> bool:
    """Every row of a step of these (packed) modules is computed alone: each layer one call of the
    bf16 kernels (engine/lean_layer.py `runs_lean`) and the LM head, if any, their product."""
    return runs_lean(backbone) and (head is None or isinstance(getattr(head, "packed", None), bf16_kernel.PackedBf16))


def compile_cache_dir():
    """Where compiled steps are kept between processes: under specbench's cache directory."""
    from specbench.targets.loading import cache_dir

    return cache_dir() / "compiled"


def target_class(engine: str) -> type[HFTarget]:
    return FastHFTarget if engine == "fast" else HFTarget
