"""`--engine fast`: the hf target over a preallocated KV cache (and, on CUDA, CUDA graphs).

Same contract as HFTarget (prefill, verify a tree, commit the accepted path),
same model weights and attention code; only the cache and the step around the
forward differ (see specbench/engine/static_cache.py and engine/engines.py).
The decode loop does not know which engine it drives, and plain decoding runs
on the same target object, so a run's speedup compares like with like.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specbench.engine import kv
from specbench.engine.protocol import Taps
from specbench.engine.static_cache import StaticDecoder
from specbench.engine.tree import DraftTree
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

    def __init__(self, model, tokenizer=None, name: str = "", model_id: str = "", graphs: bool | None = None, bucketed: bool = False,
                 **kwargs) -> None:
        super().__init__(model, tokenizer, name=name, model_id=model_id, **kwargs)
        check_full_attention(model, self.name)
        graphs = self.device.type == "cuda" if graphs is None else graphs
        self.decoder = StaticDecoder(self.backbone, self.device, self.dtype, bucketed=bucketed, graphs=graphs)
        self.cache = self.decoder.cache

    def _run(self, ids: torch.Tensor, parents, taps: Taps):
        if len(taps) > 1:
            raise NotImplementedError("the fast engine taps one hidden state per forward")
        tap = taps[0] if taps else None
        out = self.decoder.forward(ids, parents, tap)
        hidden, tapped = (out, None) if tap is None else out
        logits = self.logits(hidden)
        if not taps:
            return logits, None
        # a captured graph's outputs are overwritten by its next replay: hand out a copy
        return logits, (tapped if tap is not None else hidden).clone()

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None):
        self.cache.truncate(0)
        if max_positions:
            self.cache.reserve(max_positions)
        prompt = prompt.to(self.device)
        out = self._run(prompt, None, taps)  # causal; uncaptured above 128 tokens
        self.seq_len = self.cache.length = prompt.numel()
        return out

    @torch.inference_mode()
    def verify(self, root: int, tree: DraftTree, taps: Taps = ()):
        ids = torch.cat([torch.tensor([root], device=self.device), tree.tokens.to(self.device)])
        return self._run(ids, tree.shape_key, taps)

    @torch.inference_mode()
    def commit(self, accepted_nodes: list[int]) -> None:
        keep = [0] + [n + 1 for n in accepted_nodes]
        kv.compact(self.cache, self.seq_len, keep)
        self.seq_len += len(keep)


def target_class(engine: str) -> type[HFTarget]:
    return FastHFTarget if engine == "fast" else HFTarget
