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

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (inclusive)."""
        path = []
        parents = self.parents.tolist()
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]

