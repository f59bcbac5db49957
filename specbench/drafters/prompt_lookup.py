"""`prompt-lookup`: training-free n-gram drafting from the context itself.

The last n tokens (n from max_ngram down to min_ngram) are looked up in the
earlier context; the tokens that followed their most recent earlier occurrence
are proposed as a chain of up to k tokens. No match: an empty draft (the step
is a plain decoding step).
"""

from __future__ import annotations

from specbench.drafters.base import DraftContext, Drafter
from specbench.engine.tree import DraftTree
from specbench.errors import UserError


class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"
    summary = "training-free n-gram lookup in the prompt and output so far; a chain of up to k tokens"

    def __init__(self, target, k: int = 5, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if k < 1:
            raise UserError(f"--k must be at least 1 (got {k})")
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"need 1 <= min_ngram <= max_ngram (got {min_ngram}, {max_ngram})")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def propose(self, ctx: DraftContext) -> DraftTree:
        sequence = ctx.tokens
        length = sequence.numel()
        k = min(self.k, ctx.max_tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = sequence[-n:]
            windows = sequence[:-1].unfold(0, n, 1)  # every earlier n-gram, the suffix itself excluded
            starts = (windows == pattern).all(dim=1).nonzero()
            if starts.numel():
                begin = int(starts[-1]) + n
                return DraftTree.chain(sequence[begin : begin + k])
        return DraftTree.empty(sequence.device)
