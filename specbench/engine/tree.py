"""Draft token trees: what a drafter proposes and the target verifies in one forward.

A tree is stored flat in *node order*: node i has a token and the index of its
parent (-1 for a child of the root, i.e. of the last emitted token). Parents
always precede their children, so depth and ancestry can be computed in one
pass. A chain of k tokens is the tree with parents [-1, 0, 1, ..., k-2].
The root itself is not a node: it is the last token already emitted, which the
target has not yet seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def kept_rows(accepted_nodes: list[int]) -> list[int]:
    """The rows of a verify forward (row 0 the root, row i + 1 node i) on the accepted path: the
    root and the accepted nodes, in order. Their KV is what the target commits, their hidden
    states what drafters reading the target's states consume."""
    return [0] + [n + 1 for n in accepted_nodes]


@dataclass(frozen=True)
class DraftTree:
    tokens: torch.Tensor  # [n] long, the drafted token ids in node order
    parents: torch.Tensor  # [n] long, parent node index, -1 = the root
    # [n, V] the distribution each node's token was drawn from (speculative
    # sampling needs it); None for drafters that propose deterministically.
    draft_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1:
            raise ValueError("tokens and parents must be 1-D and of equal length")
        parents = self.parents.tolist()
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede their children")

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> DraftTree:
        none = torch.empty(0, dtype=torch.long, device=device)
        return DraftTree(none, none.clone())

    @staticmethod
    def chain(tokens: torch.Tensor, draft_probs: torch.Tensor | None = None) -> DraftTree:
        tokens = tokens.reshape(-1).long()
        parents = torch.arange(-1, tokens.numel() - 1, device=tokens.device)
        return DraftTree(tokens, parents, draft_probs)

    def __len__(self) -> int:
        return self.tokens.numel()

    @cached_property
    def depths(self) -> list[int]:
        """Depth of each node: children of the root are at depth 1."""
        depths: list[int] = []
        for p in self.parents.tolist():
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @cached_property
    def shape_key(self) -> tuple[int, ...]:
        """The parents as a tuple: trees with equal keys share masks and positions."""
        return tuple(self.parents.tolist())

    @cached_property
    def is_chain(self) -> bool:
        return self.parents.tolist() == list(range(-1, len(self) - 1))

    @cached_property
    def children(self) -> list[list[int]]:
        """children[0] lists the root's children; children[i + 1] node i's, in node order."""
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents.tolist()):
            kids[p + 1].append(i)
        return kids

    def ancestor_mask(self) -> torch.Tensor:
        """[1+n, 1+n] bool: row r may attend column c (root = row/col 0, node i = i+1).

        Every row sees the root and its own ancestors and itself.
        """
        n = len(self)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents.tolist()):
            row = i + 1
            if p >= 0:
                mask[row] = mask[p + 1]
            mask[row, row] = True
        return mask

    def subtree(self, keep: list[bool]) -> DraftTree:
        """The nodes where `keep` is True, in node order, their parents renumbered. A kept node's
        parent must be kept (a pruned tree never keeps a node without its ancestors)."""
        if all(keep):
            return self
        parents, index, renumbered, position = self.parents.tolist(), [], [], {}
        for node, kept in enumerate(keep):
            if kept:
                parent = parents[node]
                if parent >= 0 and parent not in position:
                    raise ValueError(f"node {node} is kept without its parent {parent}")
                position[node] = len(index)
                index.append(node)
                renumbered.append(position[parent] if parent >= 0 else -1)
        where = torch.tensor(index, dtype=torch.long, device=self.tokens.device)
        probs = self.draft_probs[where] if self.draft_probs is not None else None
        return DraftTree(self.tokens[where], torch.tensor(renumbered, dtype=torch.long, device=self.tokens.device), probs)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (inclusive)."""
        path = []
        parents = self.parents.tolist()
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]



# a tree is verified in one target forward; these bounds are checked before a tree is built
# (chain:1000000 would be a million paths of up to a million ranks each before any other check)
MAX_TREE_NODES = 16384
MAX_TREE_DEPTH = 1024


def check_tree_size(nodes: int, depth: int, name: str) -> None:
    from specbench.errors import UserError

    if nodes > MAX_TREE_NODES or depth > MAX_TREE_DEPTH:
        raise UserError(f"tree '{name}' has {nodes} nodes, {depth} deep; specbench verifies trees of at most {MAX_TREE_NODES} nodes "
                        f"and {MAX_TREE_DEPTH} deep (each is one target forward): use a smaller --tree")


class TreeShape:
    """A tree of *ranks*, the Medusa/Hydra "choices" format: each path lists child
    ranks from the root, e.g. [0, 1] = the 2nd-best child of the best child.
    A drafter turns it into a DraftTree by filling in the token of each rank.

    Node order is the paths sorted by (length, path), as the reference
    implementations sort them, so parents precede children and siblings are in
    rank order. Every per-depth index a level-by-level drafter needs is
    precomputed here, once per tree.
    """

    def __init__(self, paths: list[list[int]], name: str = "") -> None:
        self.name = name or f"{len(paths)}-node tree"
        self.paths = validate_paths(paths, self.name)
        index = {tuple(p): i for i, p in enumerate(self.paths)}
        self.parents = [index[tuple(p[:-1])] if len(p) > 1 else -1 for p in self.paths]
        self.ranks = [p[-1] for p in self.paths]
        self.depths = [len(p) for p in self.paths]
        self.depth = max(self.depths, default=0)
        has_children = {parent for parent in self.parents if parent >= 0}
        # level d (1-based) holds the nodes at depth d; `expanded[d]` are the nodes
        # at depth d that have children, in node order: the rows a level-by-level
        # drafter carries to level d + 1 (level 0 is the root alone)
        self.level_nodes: list[list[int]] = [[] for _ in range(self.depth + 1)]
        for i, d in enumerate(self.depths):
            self.level_nodes[d].append(i)
        self.expanded: list[list[int]] = [[-1]] + [[i for i in nodes if i in has_children] for nodes in self.level_nodes[1:]]
        # for each level d >= 1: the row (within expanded[d - 1]) of each node's parent
        self.parent_rows: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)]
        self.level_ranks: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)]
        for d in range(1, self.depth + 1):
            row_of = {node: r for r, node in enumerate(self.expanded[d - 1])}
            self.parent_rows.append(torch.tensor([row_of[self.parents[i]] for i in self.level_nodes[d]]))
            self.level_ranks.append(torch.tensor([self.ranks[i] for i in self.level_nodes[d]]))
        # for each level d: positions (within level d) of the nodes that have children
        self.expand_positions: list[torch.Tensor] = [torch.zeros(1, dtype=torch.long)] + [
            torch.tensor([k for k, node in enumerate(self.level_nodes[d]) if node in has_children], dtype=torch.long)
            for d in range(1, self.depth + 1)
        ]
        # top-k needed per level (the largest rank + 1)
        self.level_topk = [0] + [int(r.max()) + 1 for r in self.level_ranks[1:]]
        self.parents_tensor = torch.tensor(self.parents, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def chain(k: int) -> TreeShape:
        check_tree_size(k, k, f"chain:{k}")
        return TreeShape([[0] * d for d in range(1, k + 1)], name=f"chain:{k}")

    def draft_tree(self, level_tokens: list[torch.Tensor]) -> DraftTree:
        """A DraftTree from the tokens of each level (level d's tokens in node order); fewer
        levels than the shape's depth give the tree cut at that depth."""
        if not self.paths or not level_tokens:
            return DraftTree.empty()
        tokens = torch.cat(level_tokens).long()  # levels are contiguous in node order
        return DraftTree(tokens, self.parents_tensor[: tokens.numel()].to(tokens.device))


def validate_paths(paths, name: str) -> list[list[int]]:
    """The paths in node order, or a UserError saying what is wrong with them."""
    from specbench.errors import UserError

    if not isinstance(paths, list) or not all(
        isinstance(p, (list, tuple)) and p and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p)
        for p in paths
    ):
        raise UserError(f"tree '{name}' must be a list of non-empty paths of child ranks (ints >= 0), e.g. [[0], [1], [0, 0]]")
    if not paths:
        raise UserError(f"tree '{name}' has no paths: a tree needs at least one, e.g. [[0]] (or use chain:K)")
    check_tree_size(len(paths), max(len(p) for p in paths), name)
    paths = [list(p) for p in paths]
    seen = {tuple(p) for p in paths}
    if len(seen) != len(paths):
        dup = next(p for i, p in enumerate(paths) if tuple(p) in {tuple(q) for q in paths[:i]})
        raise UserError(f"tree '{name}' lists path {dup} twice")
    for p in paths:
        if len(p) > 1 and tuple(p[:-1]) not in seen:
            raise UserError(f"tree '{name}' is not prefix-closed: path {p} has no parent path {p[:-1]}")
        if p[-1] > 0 and tuple(p[:-1] + [p[-1] - 1]) not in seen:
            # a node's children must be its best ranks 0..k-1: drafting rank r
            # while leaving out a likelier sibling is never what a tree means
            raise UserError(f"tree '{name}': path {p} has no sibling {p[:-1] + [p[-1] - 1]}; ranks under a node must run 0, 1, ... without gaps")
    return sorted(paths, key=lambda p: (len(p), p))
