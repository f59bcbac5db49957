"""Walk a logged sequence the way the online decode loop would, from teacher-forced ranks.

At the step with m tokens emitted the loop drafts (a chain of up to k tokens,
never more than the max_new_tokens - m still allowed, or a tree pruned to that
depth), accepts the longest draft path that matches the target and emits it
plus the target's own next token: m advances by accepted + 1. A chain accepts
min(run, k) where run = the number of leading draft positions whose true token
has rank 0; a tree accepts depth d iff the true tokens' rank path (r1..rd) is
one of its paths. Tokens past the log's end (after its EOS) never match, which
is exactly how the loop counts a step that accepts an EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from specbench.errors import UserError
from specbench.records import StepMeasure
from specbench.simulate.proposals import TeacherForced


@dataclass(frozen=True)
class Shape:
    """A draft shape to score: a chain of k tokens, or a tree given as child-rank paths."""

    name: str
    k: int | None = None
    paths: tuple[tuple[int, ...], ...] | None = None

    @staticmethod
    def chain(k: int) -> Shape:
        if k < 1:
            raise UserError(f"--k must be at least 1 (got {k})")
        return Shape(f"k={k}", k=k)

    @staticmethod
    def tree(name: str, paths) -> Shape:
        clean = []
        for path in paths:
            if not (isinstance(path, (list, tuple)) and path and all(isinstance(r, int) and r >= 0 for r in path)):
                raise UserError(f"tree '{name}': every path must be a non-empty list of child ranks >= 0 (got {path!r})")
            clean.append(tuple(path))
        present = set(clean)
        for path in clean:
            if len(path) > 1 and path[:-1] not in present:
                raise UserError(f"tree '{name}': path {list(path)} has no parent path {list(path[:-1])}; trees must be prefix-closed")
        if not clean:
            raise UserError(f"tree '{name}' has no paths")
        return Shape(f"tree={name}", paths=tuple(sorted(set(clean), key=lambda p: (len(p), p))))

    @property
    def depth(self) -> int:
        return self.k if self.k is not None else max(len(p) for p in self.paths)

    @property
    def size(self) -> int:
        return self.k if self.k is not None else len(self.paths)


def load_tree(spec: str) -> Shape:
    """A tree from a JSON file holding a list of paths (Medusa's format), named by the file stem."""
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--tree {spec}: no such file; give a JSON file with a list of child-rank paths, e.g. [[0], [1], [0, 0]]")
    try:
        paths = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--tree {spec}: not valid JSON ({exc.msg})") from None
    if isinstance(paths, dict):
        paths = paths.get("paths")
    if not isinstance(paths, list):
        raise UserError(f"--tree {spec}: expected a JSON list of paths")
    return Shape.tree(path.stem, paths)


def walk(proposals: TeacherForced, n_out: int, max_new_tokens: int, shape: Shape) -> list[StepMeasure]:
    """The steps (tree size, depth, accepted; no timings) the loop takes over one logged sequence."""
    if shape.depth > proposals.depth:
        raise ValueError("proposals were scored for fewer draft positions than the shape needs")
    ranks = proposals.ranks[:, : shape.depth]
    if shape.k is not None:
        run = (ranks == 0).long().cumprod(dim=1).sum(dim=1).tolist()  # leading first choices
        lengths = proposals.lengths.tolist() if proposals.lengths is not None else None
    else:
        rank_rows = ranks.tolist()
    steps, m = [], 1
    while m < n_out:
        remaining = max_new_tokens - m
        if shape.k is not None:
            k = min(shape.k, remaining, lengths[m] if lengths is not None else shape.k)
            size, depth, accepted = k, k, min(run[m], k)
        else:
            paths = [p for p in shape.paths if len(p) <= remaining]
            size, depth = len(paths), max((len(p) for p in paths), default=0)
            present = set(paths)
            row, accepted = rank_rows[m], 0
            while accepted < depth and tuple(row[: accepted + 1]) in present:
                accepted += 1
        steps.append(StepMeasure(0.0, 0.0, 0.0, size, depth, accepted))
        m += accepted + 1
    return steps
