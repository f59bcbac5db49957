"""Batch > 1 (`--batch-size B`): the hf target's model decoding B sequences at once.

`RowsHFTarget` keeps B rows in one preallocated KV cache (engine/static_cache.py `RowsKV`),
each with its own length. A row is prefilled alone when it takes a sequence; one forward
then verifies every live row's root + tree, padded to the largest tree of the step with
masked nodes, and each row keeps its own accepted path. No row moves, pads or recomputes
anything when another accepts more. It is the `RowsTarget` of engine/protocol.py; the decode
loop (engine/loop.py `decode_rows`) drives it, and drives a one-row Target the same way.

It runs the forward uncaptured (no CUDA graphs yet); on a CPU with the linear weights prepacked
and Llama layers in fewer operations, as the one-row fast engine does (engine/packed.py,
engine/lean_layer.py). The weights are those of the target it wraps; none is copied.
"""

from __future__ import annotations

import torch

from specbench.engine.buckets import grown_capacity
from specbench.engine.lean_layer import packed_step_modules
from specbench.engine.packed import can_pack
from specbench.engine.protocol import Taps
from specbench.engine.static_cache import RowsDecoder
from specbench.engine.tree import DraftTree, kept_rows
from specbench.errors import UserError
from specbench.targets.hf import HFTarget


class RowsHFTarget:
    """`rows` sequences at once on the model of an hf target (`base`), which drafters are built on."""

    engine = "rows"

    def __init__(self, base: HFTarget, rows: int) -> None:
        self.base, self.rows = base, rows
        self.device, self.dtype, self.eos_token_ids = base.device, base.dtype, base.eos_token_ids
        backbone, head = base.backbone, base.lm_head
        self.packed, self.lean_layers = can_pack(base.device, base.dtype), 0
        if self.packed:  # as the one-row fast engine runs on a CPU (engine/lean_layer.py `packed_step_modules`)
            backbone, head, self.lean_layers = packed_step_modules(backbone, head, base.dtype)
        self.decoder = RowsDecoder(backbone, head, rows, base.device, base.dtype)
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
        """Before anything is timed: size every row for sequences of up to `max_positions`, refused
        in one line (naming the largest batch that fits) when the rows' KV cache would not fit."""
        if max_positions:
            self.check_fits(max_positions)
            self.decoder.plan(max_positions)

    def engine_stats(self) -> dict:
        return {"rows": self.rows, "capacity": self.cache.capacity, "packed_linears": self.packed, "lean_layers": self.lean_layers}

    def kv_bytes_per_row(self, positions: int) -> int:
        """The KV cache of one row planned for `positions` positions (capacity rounded as RowsKV rounds it)."""
        config = self.base.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        capacity = self.cache.capacity
        if positions > capacity:  # as RowsKV.reserve grows it
            capacity = grown_capacity(capacity, positions)
        return config.num_hidden_layers * 2 * kv_heads * capacity * head_dim * torch.finfo(self.dtype).bits // 8

    def check_fits(self, positions: int) -> None:
        if self.cache.kv is not None and positions <= self.cache.capacity:
            return  # already there
        per_row, free = self.kv_bytes_per_row(positions), free_memory(self.device)
        if free is not None and per_row * self.rows > free:
            raise UserError(f"--batch-size {self.rows} needs {per_row * self.rows / 2**30:.2f} GiB of KV cache for sequences of up to "
                            f"{positions} positions, and {free / 2**30:.2f} GiB is free on {self.device}: the largest batch that fits "
                            f"is {free // per_row} (fewer --max-new-tokens or a shorter workload fit more)")


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
