"""`ngram-table`: a training-free statistical drafter for specbench.

It counts, in calibration text (the target's own generations from a run
directory or a target log, or a workload's prompts), which token follows each
context of 1 to order-1 tokens. At each step it drafts a chain of up to k
tokens: the most frequent successor of the longest context it has seen (backing
off to shorter ones), then the most frequent successor of that, and so on.
With `context_weight` > 0 it also counts the n-grams of the sequence being
generated (prompt and output so far), so it picks up the phrases of the prompt
at hand, as prompt lookup does, while still knowing the target's habits.

Ties go to the lowest token id, so proposals are a function of the context
alone: `teacher_forced` scores a logged sequence in one pass, exactly as the
decode loop would have drafted it.

It uses only specbench's public drafter protocol (specbench.engine.protocol,
.options, .tree) and the calibration reader it shares with VocabTrim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specbench.drafters.vocab_trim import token_sequences
from specbench.engine.options import ChainOptions, option
from specbench.engine.protocol import DraftContext, Drafter, TeacherForced, context_only_ranks
from specbench.engine.tree import DraftTree
from specbench.errors import UserError

Context = tuple[int, ...]


@dataclass
class NgramTableOptions(ChainOptions):
    k: int = option(4, "tokens drafted per step (at most)", min=1)
    calibration: str | None = option(
        None, "text to count n-grams in: a run dir or a target log (the target's own outputs), or a workload")
    order: int = option(3, "n-gram order: the next token is predicted from the last order-1 tokens (backing off to fewer)",
                        min=2, max=8)
    context_weight: int = option(
        1, "each n-gram of the prompt and output so far counts this many times (0: the calibration text alone)", min=0)

    def check(self, drafter: str) -> None:
        super().check(drafter)
        if self.calibration is None and self.context_weight == 0:
            raise UserError(f"drafter '{drafter}' has nothing to count: give --calibration RUN_DIR|LOG.jsonl|WORKLOAD "
                            "or a --context-weight above 0")


class NgramTable:
    """How often each token followed each context of 1..order-1 tokens, with every context's most
    likely successor kept current as counts grow. A table may sit on another (`under`): its counts
    add to the other's, which it never changes (one per generated sequence, over the calibration's)."""

    def __init__(self, order: int, under: NgramTable | None = None) -> None:
        self.order, self.under = order, under
        self.successors: dict[Context, dict[int, int]] = {}
        # context -> (count, token) of its most likely successor, where this table's own counts
        # made it so (else the one under it holds it). Counts only grow, so one comparison
        # per increment keeps it exact; ties go to the lower id.
        self.top: dict[Context, tuple[int, int]] = {}

    def count(self, context: Context, token: int) -> int:
        own = self.successors.get(context, {}).get(token, 0)
        return own + (self.under.count(context, token) if self.under else 0)

    def most_likely(self, context: Context) -> tuple[int, int] | None:
        """(count, token) of the context's most frequent successor; None for an unseen context."""
        if context in self.top:
            return self.top[context]
        return self.under.most_likely(context) if self.under else None

    def add(self, tokens: Sequence[int], start: int = 1, stop: int | None = None, weight: int = 1) -> None:
        """Count the n-grams that end at tokens[t], for start <= t < stop."""
        for t in range(max(start, 1), len(tokens) if stop is None else stop):
            token = tokens[t]
            for n in range(1, min(self.order - 1, t) + 1):
                context = tuple(tokens[t - n : t])
                seen = self.successors.setdefault(context, {})
                seen[token] = seen.get(token, 0) + weight
                total, best = self.count(context, token), self.most_likely(context)
                if best is None or (total, -token) > (best[0], -best[1]):
                    self.top[context] = (total, token)

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens to follow `tokens`, each the most likely successor of the longest known
        context before it (only the last order-1 tokens matter)."""
        tail = list(tokens[max(len(tokens) - (self.order - 1), 0) :])
        drafted: list[int] = []
        while len(drafted) < k:
            found = next((best for n in range(min(self.order - 1, len(tail)), 0, -1)
                          if (best := self.most_likely(tuple(tail[-n:]))) is not None), None)
            if found is None:
                break
            drafted.append(found[1])
            tail.append(found[1])
        return drafted


class NgramTableDrafter(Drafter):
    name = "ngram-table"
    summary = "training-free: the most frequent continuations in an n-gram table counted from calibration text (and the context)"
    Options = NgramTableOptions

    def __init__(self, target, options: NgramTableOptions | None = None) -> None:
        super().__init__(target, options)
        self.calibration = NgramTable(self.options.order)
        self.calibration_tokens, self.counted_from = 0, None
        if self.options.calibration is not None:
            sequences, self.counted_from = token_sequences(self.options.calibration, target.tokenizer)
            for sequence in sequences:
                outside = [token for token in sequence if not 0 <= token < target.vocab_size]
                if outside:
                    raise UserError(f"{self.counted_from} holds token id {outside[0]}, outside this target's vocabulary of "
                                    f"{target.vocab_size}: calibrate on a run or log of this target")
                self.calibration.add(sequence)
                self.calibration_tokens += len(sequence)
        self.table, self.counted = self.calibration, 0

    @property
    def max_draft_tokens(self) -> int:
        return self.options.k

    def _fresh_table(self) -> NgramTable:
        """The table one generated sequence drafts from: the calibration's, plus its own n-grams."""
        return NgramTable(self.options.order, under=self.calibration) if self.options.context_weight else self.calibration

    def begin(self, prompt_tokens: torch.Tensor, prompt_hidden: torch.Tensor | None) -> None:
        self.table, self.counted = self._fresh_table(), 0

    def _count_context(self, tokens: list[int], upto: int) -> None:
        """Count the sequence's n-grams that end before `upto` and are not counted yet (the loop
        only ever extends the sequence: ctx.tokens is always the target's output so far)."""
        if self.options.context_weight:
            self.table.add(tokens, start=self.counted, stop=upto, weight=self.options.context_weight)
        self.counted = upto

    def propose(self, ctx: DraftContext) -> DraftTree:
        tokens = ctx.tokens.tolist()
        self._count_context(tokens, len(tokens))
        drafted = self.table.draft(tokens, min(self.options.k, ctx.max_tokens))
        if not drafted:
            return DraftTree.empty(ctx.tokens.device)
        return DraftTree.chain(torch.tensor(drafted, device=ctx.tokens.device))

    def teacher_forced(self, prompt, output, depth, hidden=None) -> TeacherForced:
        """The draft at every step's context (the true prefix), counted as the loop counts it:
        proposals depend on the context alone."""
        sequence, p = prompt.reshape(-1).tolist() + output.reshape(-1).tolist(), prompt.numel()
        self.begin(prompt, None)

        def draft(m: int) -> list[int]:  # steps come in order, so the table counts the context as the loop does
            self._count_context(sequence, p + m)
            return self.table.draft(sequence[max(p + m - self.options.order, 0) : p + m], depth)

        return context_only_ranks(output, depth, draft)

    def describe(self) -> dict:
        return {"options": self.options.to_json(), "counted_from": self.counted_from, "calibration_tokens": self.calibration_tokens,
                "calibration_contexts": len(self.calibration.successors)}
