"""Walk a logged sequence the way the online decode loop would, from teacher-forced ranks.

At the step with m tokens emitted the loop drafts (a chain of up to k tokens
or a tree; drafters that honour ctx.max_tokens, like draft-model and
prompt-lookup, never draft more than the max_new_tokens - m still allowed,
while head drafters draft their whole tree), accepts the longest draft path that matches the target and emits it
plus the target's own next token: m advances by accepted + 1. A chain accepts
min(run, k) where run = the number of leading draft positions whose true token
has rank 0; a tree accepts depth d iff the true tokens' rank path (r1..rd) is
one of its paths. Tokens past the log's end (after its EOS) never match, which
is exactly how the loop counts a step that accepts an EOS. A drafter that picks
its own tree every step (EAGLE-2's dynamic tree, shape `dynamic`) reports each
step's tree and accepted length itself (`TeacherForced.own_trees`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specbench.engine.protocol import TeacherForced
from specbench.engine.tree import TreeShape
from specbench.errors import UserError
from specbench.records import StepMeasure


@dataclass(frozen=True, eq=False)
class Shape:
    """A draft shape to score: a chain of k tokens, or a tree of child ranks (engine/tree.py)."""

    name: str
    k: int | None = None
    tree: TreeShape | None = None
    spec: str = ""  # what `--tree` / a head drafter's `tree` option resolves to this shape
    dynamic: bool = False  # the drafter's own tree per step (its bounds are the drafter's, not the shape's)

    @staticmethod
    def chain(k: int) -> Shape:
        if k < 1:
            raise UserError(f"--k must be at least 1 (got {k})")
        return Shape(f"k={k}", k=k, spec=f"chain:{k}")

    @staticmethod
    def of_tree(tree: TreeShape, spec: str = "") -> Shape:
        if not len(tree):
            raise UserError(f"tree '{tree.name}' has no paths")
        label = Path(tree.name).stem if tree.name.endswith(".json") else tree.name
        return Shape(f"tree={label}", tree=tree, spec=spec or tree.name)

    @staticmethod
    def from_spec(spec: str) -> Shape:
        """--tree NAME|chain:K|paths.json (see drafters/trees.py), or `dynamic`."""
        from specbench.drafters.trees import resolve_tree

        if spec == DYNAMIC:
            return Shape("tree=dynamic", spec=DYNAMIC, dynamic=True)
        return Shape.of_tree(resolve_tree(spec), spec)

    @property
    def depth(self) -> int:
        """Draft positions the shape needs scored by rank (0 for a dynamic tree, which needs none)."""
        return self.k if self.k is not None else self.tree.depth if self.tree is not None else 0

    @property
    def size(self) -> int:
        return self.k if self.k is not None else len(self.tree) if self.tree is not None else 0


DYNAMIC = "dynamic"


def walk(proposals: TeacherForced, n_out: int, max_new_tokens: int, shape: Shape) -> list[StepMeasure]:
    """The steps (tree size, depth, accepted; no timings) the loop takes over one logged sequence."""
    own = proposals.own_trees
    if shape.dynamic and own is None:
        raise UserError("the drafter does not draft its own tree per step; --tree dynamic is for eagle, eagle3 and dflash")
    if own is not None:  # the drafter's own tree every step (dynamic, or pruned per step)
        sizes, depths, accepted = own.sizes.tolist(), own.depths.tolist(), own.accepted.tolist()
        by_depth = own.sizes_by_depth.tolist() if own.sizes_by_depth is not None and proposals.capped else None
        steps, m = [], 1
        while m < n_out:
            size, depth, taken = sizes[m], depths[m], accepted[m]
            allowed = max_new_tokens - m
            if by_depth is not None and allowed < depth:  # cut at the tokens still allowed, as the loop's drafter cuts it
                size, depth, taken = by_depth[m][allowed - 1], allowed, min(taken, allowed)
            steps.append(StepMeasure(0.0, 0.0, 0.0, size, depth, taken))
            m += taken + 1
        return steps
    if shape.depth > proposals.depth:
        raise ValueError("proposals were scored for fewer draft positions than the shape needs")
    ranks = proposals.ranks[:, : shape.depth]
    if shape.k is not None:
        run = (ranks == 0).long().cumprod(dim=1).sum(dim=1).tolist()  # leading first choices
        lengths = proposals.lengths.tolist() if proposals.lengths is not None else None
    else:
        rank_rows = ranks.tolist()
        all_paths = [tuple(p) for p in shape.tree.paths]
        whole = (len(all_paths), shape.tree.depth, set(all_paths))
    steps, m = [], 1
    while m < n_out:
        remaining = max_new_tokens - m
        if shape.k is not None:
            k = min(shape.k, remaining if proposals.capped else shape.k, lengths[m] if lengths is not None else shape.k)
            size, depth, accepted = k, k, min(run[m], k)
        else:
            if proposals.capped and remaining < shape.tree.depth:
                paths = [p for p in all_paths if len(p) <= remaining]
                size, depth, present = len(paths), max((len(p) for p in paths), default=0), set(paths)
            else:
                size, depth, present = whole
            row, accepted = rank_rows[m], 0
            while accepted < depth and tuple(row[: accepted + 1]) in present:
                accepted += 1
        steps.append(StepMeasure(0.0, 0.0, 0.0, size, depth, accepted))
        m += accepted + 1
    return steps
