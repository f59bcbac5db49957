"""`prompt-lookup`: training-free n-gram drafting from the context itself.

The last n tokens (n from max_ngram down to min_ngram) are looked up in the
earlier context; the tokens that followed their most recent earlier occurrence
are proposed as a chain of up to k tokens. No match: an empty draft (the step
is a plain decoding step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specbench.engine.options import ChainOptions, option
from specbench.engine.protocol import DraftContext, Drafter, context_only_ranks
from specbench.engine.tree import DraftTree
from specbench.errors import UserError


@dataclass
class PromptLookupOptions(ChainOptions):
    k: int = option(5, "tokens drafted per step (at most)", min=1)
    max_ngram: int = option(3, "longest n-gram matched", min=1)
    min_ngram: int = option(2, "shortest n-gram matched", min=1)

    def check(self, drafter: str) -> None:
        super().check(drafter)
        if self.min_ngram > self.max_ngram:
            raise UserError(f"need min_ngram <= max_ngram (got {self.min_ngram}, {self.max_ngram}): e.g. --min-ngram 2 --max-ngram 3")


class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"
    summary = "training-free n-gram lookup in the prompt and output so far; a chain of up to k tokens"
    Options = PromptLookupOptions
    batches = True  # a function of each row's context alone

    def __init__(self, target, options: PromptLookupOptions | None = None) -> None:
        super().__init__(target, options)
        self.k, self.max_ngram, self.min_ngram = self.options.k, self.options.max_ngram, self.options.min_ngram

    @property
    def max_draft_tokens(self) -> int:
        return self.k


    def lookup(self, sequence: torch.Tensor, k: int) -> torch.Tensor:
        """Up to k tokens that followed the most recent earlier occurrence of the longest
        matching suffix n-gram; empty when none matches."""
        length = sequence.numel()
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = sequence[-n:]
            windows = sequence[:-1].unfold(0, n, 1)  # every earlier n-gram, the suffix itself excluded
            starts = (windows == pattern).all(dim=1).nonzero()
            if starts.numel():
                begin = int(starts[-1]) + n
                return sequence[begin : begin + k]
        return sequence[:0]

    def propose(self, ctx: DraftContext) -> DraftTree:
        found = self.lookup(ctx.tokens, min(self.k, ctx.max_tokens))
        return DraftTree.chain(found) if found.numel() else DraftTree.empty(ctx.tokens.device)

    def teacher_forced(self, prompt, output, depth, hidden=None):
        """The lookup at every step's context (the true prefix): a function of the context alone."""
        sequence, p = torch.cat([prompt.reshape(-1).cpu(), output.reshape(-1).cpu()]), prompt.numel()
        return context_only_ranks(output.cpu(), depth, lambda m: self.lookup(sequence[: p + m], depth).tolist())
