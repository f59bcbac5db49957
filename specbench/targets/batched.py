"""Batch > 1 (`--batch-size B`): the hf target's model decoding B sequences at once.

`RowsHFTarget` keeps B rows in one preallocated KV cache (engine/static_cache.py `RowsKV`),
each with its own length. A row is prefilled alone when it takes a sequence; one forward
then verifies every live row's root + tree, padded to the largest tree of the step with
masked nodes, and each row keeps its own accepted path. No row moves, pads or recomputes
anything when another accepts more. It is the `RowsTarget` of engine/protocol.py; the decode
loop (engine/loop.py `decode_rows`) drives it, and drives a one-row Target the same way.

It runs the forward as it is (no CUDA graphs, no compiled step yet): the eager engine of
batch > 1. The weights are those of the target it wraps; nothing is copied.
"""

from __future__ import annotations

import torch

from specbench.engine.protocol import Taps
from specbench.engine.static_cache import RowsDecoder
from specbench.engine.tree import DraftTree, kept_rows
from specbench.targets.hf import HFTarget


class RowsHFTarget:
    """`rows` sequences at once on the model of an hf target (`base`), which drafters are built on."""

    engine = "rows"

    def __init__(self, base: HFTarget, rows: int) -> None:
        self.base, self.rows = base, rows
        self.device, self.dtype, self.eos_token_ids = base.device, base.dtype, base.eos_token_ids
        self.decoder = RowsDecoder(base.backbone, base.lm_head, rows, base.device, base.dtype)
        self.cache = self.decoder.cache

    @torch.inference_mode()
    def prefill_row(self, row: int, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None):
        """Start a sequence in `row` (the others keep theirs): (logits [L, V] fp32, hidden or None)."""
        self.cache.lengths[row] = 0
        prompt = prompt.to(self.device)
        self.decoder.plan(max(max_positions or 0, prompt.numel()))
        (logits,), (hidden,) = self.decoder.forward([row], [prompt], [None], taps)
        self.cache.lengths[row] = prompt.numel()
        return logits, hidden

    @torch.inference_mode()
    def verify_rows(self, rows: list[int], roots: list[int], trees: list[DraftTree], taps: Taps = ()):
        """One forward over each row's root + tree; per row (logits [1+n, V], hidden or None)."""
        ids = [torch.cat([torch.tensor([root], device=self.device), tree.tokens.to(self.device)]) for root, tree in zip(roots, trees)]
        return self.decoder.forward(rows, ids, [tree.shape_key for tree in trees], taps)

    @torch.inference_mode()
    def commit_row(self, row: int, accepted_nodes: list[int]) -> None:
        self.cache.compact(row, self.cache.lengths[row], kept_rows(accepted_nodes))

    def warm_up(self, max_positions: int | None = None) -> None:
        """Before anything is timed: size every row for sequences of up to `max_positions`."""
        if max_positions:
            self.decoder.plan(max_positions)

    def engine_stats(self) -> dict:
        return {"rows": self.rows, "capacity": self.cache.capacity}
