"""`medusa`: independent draft heads on the target's last hidden state.

Medusa head k reads the target's final normed hidden state at the last
verified position t (the one whose logits chose the root x_{t+1}) and
predicts x_{t+k+2}; the tree node at depth d with last rank r gets the r-th
best token of head d-1, whatever its parent (the heads do not see the branch).

The reference runs the heads inside the verify forward, over every tree
row, and keeps the accepted row's output. Here the heads run in `propose`,
on that one row only: the same logits, and `draft_ms` is exactly the heads'
cost (the verify forward is unchanged, as in the reference).
"""

from __future__ import annotations

from typing import Any

import torch

from specbench.drafters.heads.base import FRESH, HeadDrafter, HeadOptions, HeadTraining, module_bytes
from specbench.drafters.heads.layouts import (
    check_base_model,
    load_medusa,
    load_medusa_state,
)
from specbench.drafters.heads.modules import MedusaHeads
from specbench.engine.protocol import DraftContext, TrainRecipe
from specbench.engine.tree import DraftTree, TreeShape


class MedusaDrafter(HeadDrafter):
    name = "medusa"
    recipe = TrainRecipe("specbench.train.heads:train_heads", 1e-3, HeadTraining)
    summary = "Medusa heads on the target's last hidden state (independent heads), a token tree, typical acceptance at T > 0"

    def __init__(self, target, heads: MedusaHeads, tree: TreeShape, options: HeadOptions | None = None, info: dict | None = None) -> None:
        super().__init__(target, tree, len(heads.heads), options, info or {})
        self.heads = heads.to(target.device).eval()

    @classmethod
    def create(cls, target, options: HeadOptions) -> MedusaDrafter:
        settings = cls.settings(target, options)
        if settings.heads == FRESH:
            module = fresh_medusa_heads(target, options.heads_to_make(settings.entry))
            drafter = cls(target, module, settings.tree, options, {"heads": FRESH})
        else:
            checkpoint, layout = load_medusa(settings.heads, target)
            check_base_model(checkpoint, target)
            module = MedusaHeads(layout.num_heads, layout.num_layers, target.hidden_size, target.vocab_size,
                                 None if layout.own_lm_head else target.lm_head).to(target.device, target.dtype)
            load_medusa_state(module, checkpoint.state, target, settings.heads)
            info = {**checkpoint.describe(), "medusa_layers": layout.num_layers, "own_lm_head": layout.own_lm_head}
            drafter = cls(target, module, settings.tree, options, info)
        return drafter.apply_vocab_trim(options)

    def lm_head_slots(self) -> list[tuple[Any, int]]:
        if self.heads.base_lm_head[0] is not None:
            return [(self.heads.base_lm_head, 0)]
        return [(head, len(head) - 1) for head in self.heads.heads]

    def memory_model(self) -> tuple[int, int]:
        used = list(self.heads.heads)[: self.shape.depth]
        extra = self.heads.base_lm_head[0]
        return module_bytes(*used) + (module_bytes(extra) * self.shape.depth if extra is not None else 0), 1

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        shape = self.shape
        self.catch_up()
        if not len(shape):
            return DraftTree.empty(self.device)
        levels = []
        for d in range(1, min(shape.depth, ctx.max_tokens) + 1):  # deeper nodes could not be emitted
            best = self.to_target_ids(self.head_logits(d, self.last_hidden).topk(shape.level_topk[d]).indices)
            levels.append(best[shape.level_ranks[d].to(best.device)])
        return shape.draft_tree(levels)

    @torch.inference_mode()
    def propose_rows(self, rows: list[MedusaDrafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """Every live row's tree with one pass of each head over all rows (the heads read only the
        row's last state, so the rows stack into one batch)."""
        shape = self.shape
        if any(row.row is None for row in rows) or not len(shape):  # batch 1: row by row
            return super().propose_rows(rows, contexts)
        for row in rows:
            row.catch_up()
        hidden = torch.stack([row.last_hidden for row in rows])
        depths = [min(shape.depth, ctx.max_tokens) for ctx in contexts]  # deeper nodes could not be emitted
        levels: list[list[torch.Tensor]] = [[] for _ in rows]
        for d in range(1, max(depths) + 1):
            best = self.to_target_ids(self.head_logits(d, hidden).topk(shape.level_topk[d]).indices)  # [rows, top-k]
            ranks = shape.level_ranks[d].to(best.device)
            for j in range(len(rows)):
                if d <= depths[j]:
                    levels[j].append(best[j][ranks])
        return [shape.draft_tree(row_levels) for row_levels in levels]

    def head_logits(self, d: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head d's logits as a drafting step computes them (`step_heads`)."""
        return logits_of(self.step_heads, d, hidden)

    def level_logits(self, d, base, output, m):
        return logits_of(self.heads, d, base)  # the heads themselves: training may change them after a step copy was made


def logits_of(heads: MedusaHeads, d: int, hidden: torch.Tensor) -> torch.Tensor:
    """Head d's logits (its own LM head, or the target's for heads-only checkpoints)."""
    head = heads.heads[d - 1]
    out = head(hidden.to(head[0].linear.weight.dtype))
    return out if heads.base_lm_head[0] is None else heads.base_lm_head[0](out)


def fresh_medusa_heads(target, num_heads: int, seed: int = 0) -> MedusaHeads:
    """One ResBlock per head at identity, LM heads copied from the target's (the reference's init)."""
    with torch.random.fork_rng():  # the init draws random biases: seeded, and the caller's RNG untouched
        torch.manual_seed(seed)
        module = MedusaHeads(num_heads, 1, target.hidden_size, target.vocab_size)
    module = module.to(target.device, target.dtype)
    with torch.no_grad():
        for linear in module.lm_head_weights():
            linear.weight.copy_(target.lm_head.weight)
    return module
