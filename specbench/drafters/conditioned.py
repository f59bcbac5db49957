"""What the drafters whose draft network reads the target's hidden states share (EAGLE, DFlash):
the states of accepted positions their own cache has not taken yet."""

from __future__ import annotations

import torch

from specbench.engine.kv import StaticKV
from specbench.engine.protocol import VerifyOutcome


class StateConditioned:
    """A drafter (mixed in before `Drafter`) whose draft is conditioned on the target's hidden
    states: `pending` holds those its draft cache (`draft_cache`, the accepted context) has not
    taken yet — the prompt's at a sequence's start, then each verify's kept rows: the anchor and
    the accepted nodes, never the rejected rest, never the bonus."""

    pending: torch.Tensor | None = None

    def draft_cache(self) -> StaticKV:
        raise NotImplementedError

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.draft_cache().truncate(0)
        self.pending = prompt_hidden

    def on_verified(self, outcome: VerifyOutcome) -> None:
        rows = outcome.kept_hidden
        self.pending = rows if self.pending is None else torch.cat([self.pending, rows])
