"""The stand-in for a target that `simulate` and `tune` build a drafter against when only the
target's log is at hand: what the log records of the target, and one clear line for anything
only the real target has."""

from __future__ import annotations

import torch

from specbench.errors import UserError
from specbench.simulate.log import TargetLog


class NotInLog(UserError):
    """A drafter asked the stand-in target for something only the real target has."""


class LoggedTarget:
    """The `Target` contract as far as a log can honour it: the logged target's identity,
    vocabulary, tokenizer, EOS ids and weight bytes. It runs no forward and holds no
    weights: asking for them is one line naming --target, which loads the real one."""

    backend = "log"
    engine = "log"

    def __init__(self, log: TargetLog, device: torch.device, dtype: torch.dtype) -> None:
        from specbench.targets.loading import load_tokenizer

        h = log.header
        self.name, self.model_id = h.target, h.target_id
        self.vocab_size, self.hidden_size = h.vocab_size, h.hidden_size
        self.num_layers = h.num_layers
        self.eos_token_ids = set(h.eos_token_ids)
        self.device, self.dtype = device, dtype
        self.tokenizer = load_tokenizer(h.target, h.tokenizer)
        self._bytes = h.target_forward_bytes

    def _missing(self, what: str) -> NotInLog:
        return NotInLog(f"the drafter needs the target's {what}, which a log does not hold; pass --target so simulate can load it")

    def forward_bytes(self) -> int | None:
        return self._bytes

    def context_window(self) -> int | None:
        return None

    def warm_up(self, max_rows: int, taps=(), max_positions=None) -> float:
        return 0.0

    def engine_stats(self) -> dict:
        return {}

    def prefill(self, prompt, taps=(), max_positions=None):
        raise self._missing("forward pass")

    def verify(self, root, tree, taps=()):
        raise self._missing("forward pass")

    def commit(self, accepted_nodes) -> None:
        raise self._missing("KV cache")

    @property
    def config(self):
        raise self._missing("config")

    @property
    def lm_head(self):
        raise self._missing("LM head")

    @property
    def input_embeddings(self):
        raise self._missing("input embeddings")

    def decoder_layer_state(self, last: int):
        raise self._missing("decoder layers")
