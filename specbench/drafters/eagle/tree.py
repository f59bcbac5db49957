"""EAGLE-2's dynamic, context-aware draft tree, for B independent drafting problems at
once (B = 1 online; every step of a logged sequence at once in `simulate`).

1. The K best tokens under the draft's log-probs at the root become depth-1
   candidates, scored by their log-prob.
2. `rounds` times: the frontier (K nodes) is run through the draft in one forward
   (`expand`); each frontier node's K best children are scored parent score +
   log p(child) (the log of the product of the confidences along the path); all K²
   children join the candidate pool and the K best of them are the next frontier.
3. The best `keep` candidates of the pool (K + rounds·K² of them) are the tree, in
   pool order, which puts parents before children.

Ties are broken towards the lower pool index (stable sorts), so a child, whose score
never exceeds its parent's, can never be kept without its parent: the kept set is
always a tree. (The reference uses torch.topk there, whose order on exact ties is
unspecified; the two agree whenever scores differ.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specbench.engine.tree import DraftTree

# expand(round, tokens [B, K], parents [B, K] or None) -> log-probs [B, K, V] of each
# frontier node's children. `tokens` are the frontier's head-row ids; `parents` the index
# of each frontier node's parent within the previous round's frontier (None in round 0,
# whose frontier continues from the root).
Expand = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Pool:
    """Every candidate node, in pool order: depth-1 first, then each round's K² children
    (parent by parent, each parent's children best first)."""

    scores: torch.Tensor  # [B, n] cumulative log-prob
    tokens: torch.Tensor  # [B, n] head-row ids
    parents: torch.Tensor  # [B, n] pool index of the parent, -1 for depth 1
    depths: torch.Tensor  # [n] depth of each pool slot (the same for every b)


def best_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best per row, best first, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def grow(first: torch.Tensor, top_k: int, rounds: int, expand: Expand) -> Pool:
    """The candidate pool from the root's log-probs `first` [B, V]."""
    B = first.shape[0]
    device = first.device
    scores, tokens = first.topk(top_k, dim=-1)  # [B, K]
    pool_scores, pool_tokens = [scores], [tokens]
    pool_parents = [torch.full((B, top_k), -1, dtype=torch.long, device=device)]
    depths = [torch.ones(top_k, dtype=torch.long)]
    frontier = torch.arange(top_k, device=device).expand(B, top_k)  # pool index of each frontier node
    choice = None
    for round_ in range(rounds):
        logp = expand(round_, tokens, choice)  # [B, K, V]
        child_scores, child_tokens = logp.topk(top_k, dim=-1)  # [B, K, K]
        total = (scores[:, :, None] + child_scores).flatten(1)  # [B, K²]
        child_tokens = child_tokens.flatten(1)
        pool_scores.append(total)
        pool_tokens.append(child_tokens)
        pool_parents.append(frontier[:, :, None].expand(B, top_k, top_k).flatten(1))
        depths.append(torch.full((top_k * top_k,), round_ + 2, dtype=torch.long))
        if round_ + 1 < rounds:
            order = best_first(total, top_k)
            base = top_k + round_ * top_k * top_k
            scores, tokens = total.gather(1, order), child_tokens.gather(1, order)
            choice, frontier = order // top_k, base + order
    return Pool(torch.cat(pool_scores, 1), torch.cat(pool_tokens, 1), torch.cat(pool_parents, 1), torch.cat(depths))


def select(pool: Pool, keep: int) -> torch.Tensor:
    """[B, keep'] pool indices of the kept nodes, ascending (keep' = min(keep, pool size))."""
    return best_first(pool.scores, keep).sort(dim=1).values


def kept_tree(pool: Pool, kept: torch.Tensor, b: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(head-row ids, parents as indices into the kept nodes) of problem b's tree."""
    index = kept[b]
    position = torch.full((pool.scores.shape[1],), -1, dtype=torch.long, device=index.device)
    position[index] = torch.arange(index.numel(), device=index.device)
    parents = pool.parents[b, index]
    return pool.tokens[b, index], torch.where(parents >= 0, position[parents.clamp(min=0)], parents)


def draft_tree(pool: Pool, kept: torch.Tensor, to_target: Callable[[torch.Tensor], torch.Tensor]) -> DraftTree:
    rows, parents = kept_tree(pool, kept)
    return DraftTree(to_target(rows), parents)


def accepted_lengths(pool: Pool, kept: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each problem b: (depth of its kept tree, length of the longest path of kept
    nodes whose tokens are true[b, 0], true[b, 1], ...). `true` [B, D] holds head-row
    ids, -1 where the true token cannot be drafted or lies past the log's end."""
    B, n = pool.scores.shape
    device = pool.scores.device
    in_tree = torch.zeros(B, n, dtype=torch.bool, device=device)
    in_tree.scatter_(1, kept, True)
    depths = pool.depths.to(device)
    tree_depth = torch.where(in_tree, depths[None], torch.zeros_like(depths)[None]).max(1).values
    current = torch.full((B,), -1, dtype=torch.long, device=device)  # pool index of the last accepted node
    alive = torch.ones(B, dtype=torch.bool, device=device)
    accepted = torch.zeros(B, dtype=torch.long, device=device)
    for d in range(1, int(depths.max()) + 1):
        if d > true.shape[1]:
            break
        match = in_tree & (depths[None] == d) & (pool.parents == current[:, None]) & (pool.tokens == true[:, d - 1 : d])
        found = match.any(1) & alive
        current = torch.where(found, match.long().argmax(1), current)
        accepted += found.long()
        alive = found
    return tree_depth, accepted
