"""What Medusa- and Hydra-style head drafters share: their options, the
catalogue lookup of published heads and trees, a tree of ranks, typical
acceptance above temperature 0, the target's hidden state at the last
accepted row, the teacher-forced pass for `simulate`, and VocabTrim of their
LM heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from specbench.catalogue import drafter_entry
from specbench.drafters.catalogued import TreeOptions, catalogued_tree, catalogued_trim, catalogued_weights
from specbench.drafters.trees import resolve_tree
from specbench.drafters.vocab_trim import TrimmedHead, asked_trim, head_rows
from specbench.engine.acceptance import TypicalAcceptance
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import (
    FINAL,
    RANK_NONE,
    Drafter,
    OwnTrees,
    TeacherForced,
    VerifyOutcome,
    true_ranks,
)
from specbench.engine.tree import TreeShape
from specbench.errors import UserError

FRESH = "fresh"
DEFAULT_TREE = "mc_sim_7b_63"
_TYPICAL = TypicalAcceptance()  # the references' defaults, declared once in engine/acceptance.py


DEFAULT_NUM_HEADS = 4


@dataclass
class HeadCount:
    """How many heads fresh heads get: one declaration for `run --heads fresh` (a drafter option)
    and `train` (a recipe option)."""

    num_heads: int | None = option(None, f"fresh heads (run --heads fresh, train): how many (default: the catalogue's, "
                                         f"else {DEFAULT_NUM_HEADS})", min=1)

    def heads_to_make(self, entry: dict | None = None) -> int:
        return self.num_heads or (entry or {}).get("num_heads", DEFAULT_NUM_HEADS)


@dataclass
class HeadOptions(HeadCount, TreeOptions):
    """Options every head drafter takes."""

    heads: str | None = option(
        None, "head checkpoint (directory, file or hub id), or 'fresh' (reference init); default from catalogue/heads.toml")
    posterior_threshold: float = option(_TYPICAL.posterior_threshold, "typical acceptance at --temperature > 0: threshold", gt=0, max=1)
    posterior_alpha: float = option(_TYPICAL.posterior_alpha, "typical acceptance at --temperature > 0: entropy factor", gt=0, max=1)

    @property
    def typical(self) -> TypicalAcceptance:
        return TypicalAcceptance(self.posterior_threshold, self.posterior_alpha)


@dataclass
class HeadTraining(HeadCount, CommandConfig):
    """`specbench train`'s options for every head drafter."""

    tie_lm_head: bool = option(False, "heads read the target's LM head (no LM head of their own; hydra: no embedding copy either): "
                                      "small checkpoints")


def module_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


@dataclass
class HeadSettings:
    """What a head drafter is built from, once the catalogue filled in what the user left out."""

    heads: str  # a checkpoint location, or FRESH
    tree: TreeShape
    entry: dict  # the catalogue entry (defaults such as num_heads for fresh heads)


class HeadDrafter(Drafter):
    """Subclasses build their head modules in `create` and implement `propose`,
    `level_logits` (for simulate) and `lm_head_slots` (for VocabTrim)."""

    drafts: ClassVar[str] = "tree"
    Options = HeadOptions

    def __init__(self, target, tree: TreeShape, num_heads: int, options: HeadOptions | None, info: dict[str, Any]) -> None:
        if tree.depth > num_heads:
            raise UserError(f"tree '{tree.name}' is {tree.depth} deep but there are only {num_heads} heads; pick a shallower --tree (e.g. chain:{num_heads})")
        if max(tree.level_topk, default=0) > target.vocab_size:  # a rank is a position in the head's top-k over the vocabulary
            raise UserError(f"tree '{tree.name}' drafts {max(tree.level_topk)} siblings under one node, more than the "
                            f"{target.vocab_size} tokens of the vocabulary; use a narrower --tree")
        super().__init__(target, options)
        self.shape = tree
        self.num_heads = num_heads
        self.acceptance = self.options.typical
        self.taps = FINAL
        self.info = {"tree": tree.name, "tree_nodes": len(tree), "num_heads": num_heads, **info}
        self.device = target.device
        # the target's hidden states of the tokens accepted since the last draft
        # (the prompt at first): consumed at the start of `propose`, so feeding a
        # trunk or prefix layer counts as drafting time, as it is drafting work
        self.pending: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None  # [H] the heads' input at the last accepted position
        self._step_heads: nn.Module | None = None

    @property
    def step_heads(self) -> nn.Module:
        """`self.heads` as a drafting step runs them: the target engine's copy (on the CPU fast
        engine their linears packed as the target's are, sharing every weight), made at the
        first draft, after VocabTrim has swapped the LM heads."""
        if self._step_heads is None:
            step = self.engine_copy(self.heads)
            shared = getattr(self.heads, "base_lm_head", [None])  # a list, not a child: the copy would keep it as it is
            if step is not self.heads and shared[0] is not None:
                step.base_lm_head = [self.engine_copy(shared[0])]  # the target's LM head (packed already) or its trimmed copy
            self._step_heads = step
        return self._step_heads

    def engine_copy(self, module: nn.Module) -> nn.Module:
        """`module` as the target's engine runs a drafter's modules (`step_module`, not part of the
        Target protocol: a target without it runs them as they are)."""
        make = getattr(self.target, "step_module", None)
        return make(module) if make is not None else module

    @classmethod
    def settings(cls, target, options: HeadOptions) -> HeadSettings:
        spec, entry = catalogued_weights(cls.name, target, options.heads, "heads",
                                         "pass --heads PATH|ID, or --heads fresh for heads initialised as the reference initialises them")
        if options.num_heads is not None and spec != FRESH:
            raise UserError("num_heads only applies to --heads fresh; with a checkpoint the tree's depth decides how many heads run")
        return HeadSettings(spec, resolve_tree(catalogued_tree(entry, target, options.tree, DEFAULT_TREE)), entry)

    @property
    def max_draft_tokens(self) -> int:
        return len(self.shape)

    @property
    def max_draft_depth(self) -> int:
        return self.shape.depth

    batches = True  # per row: its pending states (begin replaces them); each level's heads run over all rows at once

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.pending = prompt_hidden

    def on_verified(self, outcome: VerifyOutcome) -> None:
        self.pending = outcome.kept_hidden

    def consume(self, rows: torch.Tensor) -> torch.Tensor:
        """The heads' input state at the last of the newly accepted `rows`."""
        return rows[-1]

    def catch_up(self) -> None:
        if self.pending is not None:
            self.last_hidden = self.consume(self.pending)
            self.pending = None

    def describe(self) -> dict:
        return self.info

    # --- simulation: one teacher-forced pass -----------------------------------------
    def teacher_base(self, states: torch.Tensor) -> torch.Tensor:
        """The heads' base hidden state at every position, from the target's states over
        the whole logged sequence (drafters with a trunk or prefix layer run it once, causally)."""
        return states

    def level_logits(self, d: int, base: torch.Tensor, output: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Logits of draft level d at the steps `m` (rows of `base`), on the true branch."""
        raise NotImplementedError

    @torch.inference_mode()
    def teacher_forced(self, prompt, output, depth, hidden):
        """At the step with m tokens emitted the heads read the base state at position
        P+m-2 (the one whose logits chose the root out[m-1]); level d's rank of the true
        out[m+d-1] follows from one batched head pass per level over all steps."""
        if depth > self.num_heads:
            raise UserError(f"a shape {depth} deep needs {depth} heads; '{self.name}' has {self.num_heads}")
        states, source = hidden()
        p, n = prompt.numel(), output.numel()
        ranks = torch.full((n, depth), RANK_NONE, dtype=torch.long)
        # a log's states are in the dtype it was recorded in; the heads (and a prefix layer) run in the target's
        base = self.teacher_base(states.to(self.device, self.target.dtype))[p - 1 : p + n - 2]  # row j: step m = j + 1
        output = output.to(self.device)
        # trimmed heads rank over the kept ids: the true token's index there, -1 where it cannot be drafted
        true = output if self.head_ids is None else head_rows(output, self.head_ids, self.target.vocab_size)
        for d in range(1, depth + 1):
            m = torch.arange(1, n - d + 1, device=self.device)  # steps whose level-d true token is logged
            if not m.numel():
                break
            ranks[m.cpu(), d - 1] = true_ranks(self.level_logits(d, base[m - 1], output, m), true[m + d - 1])
        own = self.own_trees(base, output) if self.shape_dependent else None  # its own (pruned) tree every step
        return TeacherForced(ranks, capped=True, hidden_source=source, own_trees=own)

    def own_trees(self, base: torch.Tensor, output: torch.Tensor) -> OwnTrees:
        """The tree of every step, for a drafter whose option prunes it per step (`shape_dependent`)."""
        raise NotImplementedError

    # --- VocabTrim: LM heads over the N most frequent target tokens only ---------

    head_ids: torch.Tensor | None = None  # target id of each trimmed-head row (vocab_trim.py)

    def lm_head_slots(self) -> list[tuple[Any, int]]:
        """(container, index) of every LM head the drafter reads, for swapping in a trimmed one."""
        raise NotImplementedError

    def apply_vocab_trim(self, options: HeadOptions) -> HeadDrafter:
        if options.heads is None:  # the catalogue's heads: its VocabTrim for this device too
            options = catalogued_trim(drafter_entry(self.name, self.target.name, self.target.model_id), self.target, options)
        asked = asked_trim(options, self.target)
        if asked is None:
            return self
        kept, info = asked
        if len(kept) < max(self.shape.level_topk):
            raise UserError(f"--vocab-trim {len(kept)} keeps fewer tokens than tree '{self.shape.name}' drafts per node ({max(self.shape.level_topk)})")
        for container, index in self.lm_head_slots():
            container[index] = TrimmedHead(container[index], kept)
        self._step_heads = None
        self.head_ids = kept.to(self.device)
        self.info |= info
        return self

    def to_target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return self.head_ids[indices] if self.head_ids is not None else indices
