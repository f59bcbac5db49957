"""Batch > 1 (`--batch-size B`): the hf target's model decoding B sequences at once.

`RowsHFTarget` keeps B rows in one preallocated KV cache (engine/kv.py `RowsKV`),
each with its own length. A row is prefilled alone when it takes a sequence; one forward
then verifies every live row's root + tree, padded to the largest tree of the step with
masked nodes, and each row keeps its own accepted path. No row moves, pads or recomputes
anything when another accepts more. It is the `RowsTarget` of engine/protocol.py; the decode
loop (engine/loop.py `decode_rows`) drives it, and drives a one-row Target the same way.

On CUDA over the fast engine its verify steps are CUDA graphs, one per (bucket, span, taps)
at this batch size, captured before anything is timed (engine/static_cache.py `RowsDecoder`);
on a CPU it runs uncaptured with the linear weights prepacked and Llama layers in fewer
operations, as the one-row fast engine does (engine/packed.py, engine/lean_layer.py). The
weights are those of the target it wraps; none is copied.
"""

from __future__ import annotations

import torch

from specbench.engine.buckets import MAX_BUCKET_PADDING, grown_capacity
from specbench.engine.lean_layer import step_modules
from specbench.engine.protocol import Taps
from specbench.engine.static_cache import RowsDecoder
from specbench.engine.tree import DraftTree, kept_rows
from specbench.errors import UserError
from specbench.targets.hf import HFTarget


class RowsHFTarget:
    """`rows` sequences at once on the model of an hf target (`base`), which drafters are built on."""

    engine = "rows"

    def __init__(self, base: HFTarget, rows: int, graphs=None) -> None:
        """graphs: None = CUDA graphs where `base` is the fast engine on CUDA (as its own steps are
        captured); True/False; or a graph backend object (tests)."""
        self.base, self.rows = base, rows
        self.device, self.dtype, self.eos_token_ids = base.device, base.dtype, base.eos_token_ids
        # on a CPU the kernels the one-row fast engine runs (engine/lean_layer.py `step_modules`)
        backbone, head, self.lean_layers, self.packed = step_modules(base.backbone, base.lm_head, base.device, base.dtype,
                                                                     kernels=getattr(base, "kernels", "auto"))
        if graphs is None:
            graphs = base.device.type == "cuda" and getattr(base, "engine", "") == "fast"
        self.decoder = RowsDecoder(backbone, head, rows, base.device, base.dtype, graphs=graphs)
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

    def warm_up(self, max_positions: int | None = None, verify_tokens: int = 1, prompt_tokens: int = 0, taps: Taps = ()) -> float:
        """Before anything is timed: size every row for sequences of up to `max_positions`, refused
        in one line (naming the largest batch that fits) when the rows' KV cache and the largest
        forward's activations (every row verifying `verify_tokens`, or one row prefilling
        `prompt_tokens`) would not fit. With CUDA graphs, then capture every bucket plain decoding
        (the root alone) and a drafter (1..verify_tokens per row, with its `taps`) verify. Returns
        the ms spent capturing."""
        if max_positions:
            padding = MAX_BUCKET_PADDING if self.decoder.graphs is not None else 0  # a captured step's bucket padding
            self.check_fits(max_positions + padding, verify_tokens, prompt_tokens)
            self.decoder.plan(max_positions)
        return self.decoder.warm_up(1, ()) + self.decoder.warm_up(verify_tokens, taps)

    def engine_stats(self) -> dict:
        return {"rows": self.rows, "capacity": self.cache.capacity, "packed_linears": self.packed, "lean_layers": self.lean_layers,
                **self.decoder.stats()}

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

    def activation_bytes(self, rows: int, tokens: int, span: int) -> int:
        """An estimate of the memory one forward of `rows` rows of `tokens` tokens each, attending over
        `span` positions, holds at its peak (one layer's working set at a time, then the logits):
        hidden-sized states (residual, normed input, attention and MLP outputs), the new queries,
        keys and values, the MLP's gate, up and product, the attention's mask, fp32 scores and
        softmax and the keys and values it reads (expanded to every head), and the logits in the
        model's dtype and in fp32. Not counted: allocator slack and kernels' own workspaces."""
        config = self.base.config.get_text_config()
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        size = torch.finfo(self.dtype).bits // 8
        n = rows * tokens
        per_token = size * (4 * hidden + (heads + 2 * kv_heads) * head_dim + 3 * intermediate + span) + 4 * 2 * heads * span
        read_kv = size * 2 * rows * heads * span * head_dim
        logits = n * self.base.vocab_size * (size + 4)
        return n * per_token + read_kv + logits

    def memory_needed(self, rows: int, positions: int, verify_tokens: int, prompt_tokens: int) -> tuple[int, int]:
        """(KV cache bytes, activation bytes of the largest forward) of `rows` rows planned for
        `positions`: every row verifying `verify_tokens` (root + the largest tree), or one row
        prefilling a prompt of `prompt_tokens` alone."""
        verify = self.activation_bytes(rows, verify_tokens, positions)
        prefill = self.activation_bytes(1, prompt_tokens, prompt_tokens) if prompt_tokens else 0
        return rows * self.kv_bytes_per_row(positions), max(verify, prefill)

    def check_fits(self, positions: int, verify_tokens: int = 1, prompt_tokens: int = 0) -> None:
        if self.cache.kv is not None and positions <= self.cache.capacity:
            return  # already there
        free = free_memory(self.device)
        if free is None:
            return
        kv, activations = self.memory_needed(self.rows, positions, verify_tokens, prompt_tokens)
        if kv + activations <= free:
            return
        fits = next((b for b in range(self.rows - 1, 0, -1) if sum(self.memory_needed(b, positions, verify_tokens, prompt_tokens)) <= free), 0)
        gib = 2**30
        raise UserError(f"--batch-size {self.rows} needs {(kv + activations) / gib:.2f} GiB ({kv / gib:.2f} GiB of KV cache for sequences "
                        f"of up to {positions} positions, {activations / gib:.2f} GiB of activations in its largest forward) and "
                        f"{free / gib:.2f} GiB is free on {self.device}: "
                        + (f"the largest batch that fits is {fits} " if fits else "not even one row fits ")
                        + "(fewer --max-new-tokens, a shorter workload or a smaller tree fit more)")


MEMINFO = "/proc/meminfo"  # where a CPU's free memory is read (MemAvailable)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open(MEMINFO) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
