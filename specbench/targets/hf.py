"""The `hf` target: a transformers causal LM that verifies token trees (the `Target`
contract of engine/protocol.py), on the eager engine.

The target owns its KV cache. `prefill` fills it with the prompt; `verify`
runs root + all tree nodes in one forward with tree attention (each node sees
the context, the root and its own ancestors; positions = context length +
depth); `commit` keeps only the accepted path in the cache, compacted into
place, so nothing is ever recomputed. `targets/fast.py` is the same target on
the fast engine (a static KV cache, CUDA graphs on CUDA).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specbench.checks import context_window
from specbench.engine import kv
from specbench.engine.compat import cache_kwargs
from specbench.engine.protocol import Taps
from specbench.engine.tapped import tapped_forward
from specbench.engine.tree import DraftTree, kept_rows
from specbench.errors import UserError


def forward_bytes(model, head: torch.nn.Module | None = None) -> int:
    """Bytes of weights one decode forward reads: every parameter except the input
    embedding table (a lookup reads a row per token; a tied table is read as the
    LM head), with `head` in place of the model's LM head when given."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    embed, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(nbytes(p) for p in model.parameters())  # a tied table is yielded once
    if embed.data_ptr() != out.data_ptr():
        total -= nbytes(embed)
    if head is not None:
        total += sum(nbytes(p) for p in head.parameters()) - nbytes(out)
    return total


class HFTarget:
    engine = "eager"  # targets/fast.py: FastHFTarget is the static-cache engine

    def __init__(self, model, tokenizer=None, name: str = "", model_id: str = "", backend: str = "hf", weight_bytes: int | None = None) -> None:
        """`backend` names how the model was loaded ("deepspeed": sharded by AutoTP, then wrapped
        here like any other); `weight_bytes`: bytes one forward reads over all ranks together,
        when the model in hand is one rank's shard."""
        self.model = model
        self.backend = backend
        self._weight_bytes = weight_bytes
        self.tokenizer = tokenizer
        self.name = name or model_id or type(model).__name__
        self.model_id = model_id or self.name
        self.backbone = model.get_decoder()  # final normed hidden states
        self._lm_head = model.get_output_embeddings()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = self._lm_head.weight.shape[0]
        self.hidden_size = self.config.get_text_config().hidden_size
        self.eos_token_ids = self._eos_ids()
        self.cache: DynamicCache | None = None
        self.seq_len = 0  # tokens whose KV is in the cache

    @classmethod
    def load(cls, name: str, device: torch.device, dtype: torch.dtype) -> HFTarget:
        from specbench.targets.loading import load_causal_lm

        model, tokenizer, source = load_causal_lm(name, device, dtype)
        return cls(model, tokenizer, name=name, model_id=source.model_id)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for cfg in (self.model.config, getattr(self.model, "generation_config", None)):
            eos = getattr(cfg, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # --- what drafters may read (engine/protocol.py `Target`) -------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def lm_head(self) -> torch.nn.Module:
        return self._lm_head

    def step_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A drafter's modules as this engine runs them (the fast engine packs their linears on a
        CPU); the eager engine runs them as they are."""
        return module

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self.backbone.layers)

    def decoder_layer_state(self, last: int) -> dict[str, torch.Tensor]:
        layers = self.backbone.layers
        state = {}
        for j in range(last):
            for key, value in layers[len(layers) - last + j].state_dict().items():
                state[f"layers.{j}.{key}"] = value
        state["norm.weight"] = self.backbone.norm.weight
        return state

    def forward_bytes(self) -> int:
        return self._weight_bytes or forward_bytes(self.model)

    def context_window(self) -> int | None:
        return context_window(self.config.get_text_config())

    def warm_up(self, max_rows: int, taps: Taps = (), max_positions: int | None = None) -> float:
        """The eager engine captures nothing (FastHFTarget does): 0 ms."""
        return 0.0

    def engine_stats(self) -> dict:
        """What run.json records about the engine (the fast one: cache capacity, graphs)."""
        return {}

    # --- decoding ------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, taps: Taps):
        last, hidden = tapped_forward(self.backbone, taps, input_ids=ids[None], position_ids=positions[None], attention_mask=mask,
                                      use_cache=True, **cache_kwargs(self.backbone, self.cache))
        # the head sees [1, L, H], as in the model's own forward (DeepSpeed's sharded head needs it)
        return self._lm_head(last)[0].float(), hidden

    def prefill(self, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None):
        """Start a sequence. Returns (logits [L, V] fp32, hidden [L, H·len(taps)] or None)."""
        self.cache = DynamicCache(config=self.config)
        prompt = prompt.to(self.device)
        positions = torch.arange(prompt.numel(), device=self.device)
        logits, hidden = self._forward(prompt, positions, None, taps)
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            raise UserError(
                f"target '{self.name}' uses a sliding-window or hybrid KV cache, which tree "
                "verification does not support yet; choose a full-attention model"
            )
        self.seq_len = prompt.numel()
        return logits, hidden

    def tree_mask(self, tree: DraftTree) -> torch.Tensor:
        """[1, 1, 1+n, ctx+1+n] additive mask: 0 where attention is allowed."""
        rows = len(tree) + 1
        allowed = torch.ones(rows, self.seq_len + rows, dtype=torch.bool)
        allowed[:, self.seq_len :] = tree.ancestor_mask()
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[None, None].to(self.device)

    def verify(self, root: int, tree: DraftTree, taps: Taps = ()):
        """One forward over root + tree. Returns (logits [1+n, V] fp32, hidden [1+n, H·len(taps)] or None):
        row 0 predicts the root's successor, row i+1 node i's."""
        ids = torch.cat([torch.tensor([root], device=self.device), tree.tokens.to(self.device)])
        depths = torch.tensor([0, *tree.depths], device=self.device)
        return self._forward(ids, self.seq_len + depths, self.tree_mask(tree), taps)

    def rollback(self) -> None:
        """Forget what the last verify wrote, committing nothing (for timing the same verify again)."""
        kv.truncate(self.cache, self.seq_len)

    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep the root and the accepted path's KV; drop the rest of the verified tree."""
        keep = kept_rows(accepted_nodes)
        kv.compact(self.cache, self.seq_len, keep)
        self.seq_len += len(keep)
