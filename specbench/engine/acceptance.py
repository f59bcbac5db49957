"""Acceptance rules: given a draft tree and the target's logits over it, which
path is kept and which token the target adds after it.

- greedy: lossless; the output equals plain greedy decoding token for token.
- speculative sampling (chains, temperature > 0): lossless in distribution
  (Leviathan et al. / Chen et al.).
- typical acceptance (Medusa/Hydra trees, temperature > 0): lossy; a node is
  kept when the target gives its token enough probability (Medusa's rule).
- tree sampling (EAGLE-2 trees, temperature > 0): lossless in distribution for
  trees whose tokens are a deterministic function of the context (top-k
  drafts): walk down, try each child x in turn with probability p(x), zero and
  renormalise p on a rejection (EAGLE's rule with q = 1).
A drafter picks its rule at temperature > 0 with `Drafter.acceptance` (an
`AcceptanceRule`); None means speculative sampling.
Ties in argmax break to the lowest token id (torch.argmax returns the first
maximum), the same in plain and speculative decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specbench.engine.tree import DraftTree


@dataclass(frozen=True)
class Acceptance:
    accepted_nodes: list[int]  # node indices of the accepted path, in order from the root
    bonus: int  # the target's token after the last accepted node (correction or extra)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """Longest root-to-node path whose every token is the target's argmax at its
    parent; the first such path in node order wins a tie."""
    return accept_predicted(tree, logits.argmax(dim=-1).tolist())


def accept_predicted(tree: DraftTree, predicted: list[int]) -> Acceptance:
    """Greedy acceptance given the target's choice after the root (predicted[0]) and
    after each node (predicted[i + 1]). Simulation passes the logged tokens here."""
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths
    on_path = [False] * len(tokens)
    best_node, best_depth = -1, 0
    for i, parent in enumerate(parents):
        if (parent < 0 or on_path[parent]) and tokens[i] == predicted[parent + 1]:
            on_path[i] = True
            if depths[i] > best_depth:
                best_node, best_depth = i, depths[i]
    path = tree.path_to(best_node) if best_node >= 0 else []
    return Acceptance(path, predicted[best_node + 1])


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def accept_speculative_sampling(
    tree: DraftTree, logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> Acceptance:
    """Chain drafts: accept x_i with probability min(1, p(x_i) / q(x_i)); on the
    first rejection draw the correction from normalise(max(0, p - q)); if all
    are accepted draw the bonus from p. A drafter without draft_probs proposed
    deterministically, so q is one-hot on its token."""
    if not tree.is_chain:
        raise ValueError("speculative sampling needs a chain draft")
    target_probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    tokens = tree.tokens.tolist()
    draft_probs = tree.draft_probs.float().cpu() if tree.draft_probs is not None else None
    for i, token in enumerate(tokens):
        p = target_probs[i]
        if draft_probs is not None:
            q = draft_probs[i]
        else:
            q = torch.zeros_like(p)
            q[token] = 1.0
        ratio = float(p[token] / q[token]) if q[token] > 0 else 0.0
        u = float(torch.rand(1, generator=generator))
        if u < min(1.0, ratio):
            continue
        residual = torch.clamp(p - q, min=0)
        # residual mass is 0 only when p == q, where rejection has probability 0
        correction = sample(residual if residual.sum() > 0 else p, generator)
        return Acceptance(list(range(i)), correction)
    return Acceptance(list(range(len(tokens))), sample(target_probs[len(tokens)], generator))


class AcceptanceRule:
    """An acceptance rule for temperature > 0, chosen by the drafter (`Drafter.acceptance`):
    called with the draft tree and the target's logits over root + nodes."""

    name = ""

    def __call__(self, tree: DraftTree, logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> Acceptance:
        raise NotImplementedError


@dataclass(frozen=True)
class TypicalAcceptance(AcceptanceRule):
    """Medusa's typical acceptance: token x is accepted where the target gives it
    p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))). The reference
    helpers take these two in swapped positions; here they are named."""

    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    name = "typical"

    def __call__(self, tree, logits, temperature, generator) -> Acceptance:
        return accept_typical(tree, logits, temperature, self, generator)

    def thresholds(self, probs: torch.Tensor) -> torch.Tensor:
        entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)  # the reference's epsilon
        return torch.minimum(torch.full_like(entropy, self.posterior_threshold), self.posterior_alpha * torch.exp(-entropy))


def accept_typical(
    tree: DraftTree, logits: torch.Tensor, temperature: float, rule: TypicalAcceptance, generator: torch.Generator | None
) -> Acceptance:
    """Longest path of nodes that pass the typical test at their parent; among
    equally long paths the most likely under the target (as Medusa picks). The
    token after it is sampled from the target's distribution with the tokens
    below the threshold removed (Medusa's typical sampling of the next root)."""
    probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
    thresholds = rule.thresholds(probs)
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths
    log_likelihood = [0.0] * len(tokens)
    on_path = [False] * len(tokens)
    best_node, best_depth, best_ll = -1, 0, 0.0
    for i, parent in enumerate(parents):
        p = float(probs[parent + 1, tokens[i]])
        if (parent < 0 or on_path[parent]) and p > float(thresholds[parent + 1]):
            on_path[i] = True
            log_likelihood[i] = (log_likelihood[parent] if parent >= 0 else 0.0) + float(torch.log(torch.tensor(p)))
            if depths[i] > best_depth or (depths[i] == best_depth and log_likelihood[i] > best_ll):
                best_node, best_depth, best_ll = i, depths[i], log_likelihood[i]
    last = probs[best_node + 1]
    kept = torch.where(last < thresholds[best_node + 1], torch.zeros_like(last), last)
    path = tree.path_to(best_node) if best_node >= 0 else []
    return Acceptance(path, sample(kept / kept.sum(), generator))


def accept_tree_sampling(tree: DraftTree, logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> Acceptance:
    """EAGLE-2's rule for trees of deterministic (top-k) drafts. From the root, try the
    current node's children in node order: accept child x with probability p(x) (q = 1,
    the draft being deterministic); on a rejection set p(x) = 0 and renormalise, then try
    the next child. An accepted child becomes the current node; when every child is
    rejected (or there are none) the next token is drawn from the renormalised p.

    Each emitted token is distributed exactly as p at its position: a token the node
    drafted as its j-th child comes out with probability prod_{i<j}(1 - p'_i) p'_j = p(x),
    any other token with (1 - sum of the children's p) p(x) / (1 - sum) = p(x). So when the
    tree is a function of the context alone (no random draws), the output has the target's
    sampling distribution (lossless in distribution)."""
    probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
    tokens = tree.tokens.tolist()
    children = tree.children
    path: list[int] = []
    node = -1
    while True:
        p = probs[node + 1].clone()
        chosen = None
        for child in children[node + 1]:
            x = tokens[child]
            u = float(torch.rand(1, dtype=torch.float64, generator=generator))
            if u < float(p[x]):
                chosen = child
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:  # all mass was on rejected tokens: probability 0, guarded against rounding
                p = probs[node + 1].clone()
                break
            p /= total
        if chosen is None:
            return Acceptance(path, sample(p, generator))
        path.append(chosen)
        node = chosen


@dataclass(frozen=True)
class TreeSampling(AcceptanceRule):
    """EAGLE-2's acceptance at temperature > 0 (`accept_tree_sampling`): lossless in
    distribution for trees of deterministic drafts."""

    name = "tree-sampling"

    def __call__(self, tree, logits, temperature, generator) -> Acceptance:
        return accept_tree_sampling(tree, logits, temperature, generator)


def accept(
    tree: DraftTree,
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    rule: AcceptanceRule | None = None,
) -> Acceptance:
    """Greedy at temperature 0; above it, the drafter's rule (typical acceptance for
    Medusa/Hydra, tree sampling for EAGLE trees), else speculative sampling."""
    if temperature <= 0:
        return accept_greedy(tree, logits)
    if rule is not None:
        return rule(tree, logits, temperature, generator)
    return accept_speculative_sampling(tree, logits, temperature, generator)
