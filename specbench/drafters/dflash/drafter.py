"""`dflash`: parallel block drafting (DFlash v1, DFlash2, Meta's Muse Glimmer assistant).

Per step, one draft forward over the block [anchor, mask x k] at positions S..S+k (S =
the anchor's position, the tokens committed so far): output i proposes the token at
S + i. Before it, the draft's context cache catches up on the target's features of the
positions committed since the last step (the anchor and the accepted tokens of the
previous step: never a rejected token, never the bonus, which has no target pass yet);
the block's own keys/values are never kept. The proposal is a chain of k tokens
(argmax per position; DFlash2: the candidate selector's path), a best-first tree over
each position's top candidates (`--tree dynamic`, by accumulated log-probability, as
SGLang's dflash_tree), or any tree of ranks. `--k` shortens the block (vLLM's
num_speculative_tokens = block - 1). At temperature > 0 chains are sampled from the draft
and accepted by speculative sampling, trees accepted by tree sampling.

Near max_new_tokens the block keeps its length and only the drafts still allowed are
proposed, so the drafts never depend on how far the sequence may run.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from specbench.drafters.catalogued import WeightsOptions, catalogued_weights
from specbench.drafters.conditioned import StateConditioned
from specbench.drafters.dflash.layouts import DFlashCheckpoint, build_net, read_checkpoint
from specbench.drafters.dflash.model import DFlashNet
from specbench.drafters.trees import resolve_tree
from specbench.engine.acceptance import TreeSampling, sample
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import RANK_NONE, DraftContext, Drafter, OwnTrees, TeacherForced, TrainRecipe
from specbench.engine.kv import StaticKV
from specbench.engine.tree import DraftTree
from specbench.errors import UserError

DYNAMIC = "dynamic"


@dataclass
class DFlashOptions(WeightsOptions):
    shape_option: ClassVar[str | None] = "tree"  # a chain is the tree spec chain:k (simulate and tune set it per shape)
    k: int | None = option(None, "tokens drafted per step (dflash: the block holds k + 1 positions, vLLM's num_speculative_tokens; "
                                 "default the checkpoint's block_size - 1)", min=1)
    tree: str | None = option(None, "a tree from catalogue/trees.json (e.g. mc_sim_7b_63), chain:K, or a .json list of paths; 'dynamic': "
                                    "the drafter's own tree (dflash: best-first over each block position's top_k tokens); "
                                    "dflash default: a chain of k")
    total_tokens: int = option(32, "dynamic tree: tokens verified per step, the root included (total_tokens - 1 drafted)", min=2)
    top_k: int = option(4, "dynamic tree: children per node (dflash: candidates per block position)", min=1)

    def check(self, drafter: str) -> None:
        super().check(drafter)
        if self.tree and self.k is not None and self.tree != DYNAMIC:
            if not (self.tree.startswith("chain:") and self.tree == f"chain:{self.k}"):
                raise UserError(f"--k {self.k} and --tree {self.tree} both set the block: a tree of ranks sets it by its depth; "
                                "pass one of them")


def ordered(scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the `width` best entries of the last dim, ties to the lower index
    (as argmax and true_ranks break them)."""
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :width], index[..., :width]


def rank_of(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rank of column index[r] in scores[r] (ties to the lower column); RANK_NONE where index < 0."""
    valid = index >= 0
    idx = index.clamp(min=0)
    chosen = scores.gather(1, idx[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    rank = (scores > chosen).sum(1) + ((scores == chosen) & (cols[None] < idx[:, None])).sum(1)
    return torch.where(valid, rank, torch.full_like(rank, RANK_NONE)).long().cpu()


class Block:
    """One step's drafting material: the block's outputs at positions 1..k and their logits,
    and for DFlash2 the selector's candidates. `children(d, parent_token)` gives the ranked
    children of a node at depth d - 1 (the anchor at 0): (tokens, log-probs), best first."""

    def __init__(self, net: DFlashNet, out: torch.Tensor, anchor: int, width: int = 1, logits: torch.Tensor | None = None) -> None:
        self.net, self.anchor, self.width = net, anchor, width  # width: the most children a node needs
        self.logits = net.logits(out) if logits is None else logits  # [k, V] (given: several rows' in one product)
        self.dflash2 = net.config.dflash2
        if self.dflash2:
            K = net.config.selector_top_k
            self.unary, self.candidates = ordered(self.logits, K)
            self.projected = net.candidate_selector.hidden_projection(out).to(self.unary.dtype)
        self._cache: dict[tuple[int, int], tuple[list[int], list[float]]] = {}

    def scores(self, d: int, parent_token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, token ids) the draft ranks position d by, given the token before it."""
        if not self.dflash2:
            return self.logits[d - 1], None
        previous = torch.tensor([parent_token], device=self.logits.device)
        s = self.net.candidate_selector.scores(self.projected[d - 1 : d], self.unary[d - 1 : d], self.candidates[d - 1 : d], previous)
        return s[0], self.candidates[d - 1]

    def children(self, d: int, parent_token: int, width: int) -> tuple[list[int], list[float]]:
        key = (d, -1 if not self.dflash2 else parent_token)
        if key not in self._cache:
            scores, ids = self.scores(d, parent_token)
            values, index = ordered(torch.log_softmax(scores.double(), -1), min(self.width, scores.numel()))
            tokens = index if ids is None else ids[index]
            self._cache[key] = (tokens.tolist(), values.tolist())
        tokens, values = self._cache[key]
        return tokens[:width], values[:width]


def best_first(block: Block, depth: int, budget: int, width: int) -> tuple[list[int], list[int]]:
    """A tree of up to `budget` nodes over positions 1..depth: nodes taken best-first by the sum
    of their path's log-probabilities (a child never beats its parent, so parents come first)."""
    tokens, parents = [], []
    heap: list[tuple[float, int, int, int, int]] = []
    counter = 0

    def push(d: int, parent: int, parent_token: int, score: float) -> None:
        nonlocal counter
        for token, logp in zip(*block.children(d, parent_token, width)):
            heapq.heappush(heap, (-(score + logp), counter, d, parent, token))
            counter += 1

    push(1, -1, block.anchor, 0.0)
    while heap and len(tokens) < budget:
        negative, _, d, parent, token = heapq.heappop(heap)
        tokens.append(token)
        parents.append(parent)
        if d < depth:
            push(d + 1, len(tokens) - 1, token, -negative)
    return tokens, parents


def ranked_tree(block: Block, shape) -> tuple[list[int], list[int]]:
    """A tree of ranks filled in: the node with path (r1..rd) holds the r_d-th child of its parent."""
    tokens = []
    for i, path in enumerate(shape.paths):
        parent = shape.parents[i]
        parent_token = block.anchor if parent < 0 else tokens[parent]
        ids, _ = block.children(len(path), parent_token, path[-1] + 1)
        tokens.append(ids[path[-1]])
    return tokens, list(shape.parents)


@dataclass
class DFlashTraining(CommandConfig):
    """`specbench train --drafter dflash`'s own options."""

    block_size: int = option(16, "dflash: the block (anchor + drafted tokens) the draft is trained on", min=2)
    draft_layers: int = option(5, "dflash: draft decoder layers", min=1)
    anchors: int = option(16, "dflash: random anchors (blocks) per training sequence and step", min=1)
    loss_decay: float = option(7.0, "dflash: block position i's loss weighs exp(-(i - 1) / decay)", gt=0)


class DFlashDrafter(StateConditioned, Drafter):
    name = "dflash"
    recipe = TrainRecipe("specbench.train.dflash:train_dflash", 1e-3, DFlashTraining)
    summary = ("DFlash: one forward of a block-diffusion draft drafts a whole block ([anchor, mask x k]) from the target's "
               "hidden states (v1, DFlash2, Muse Glimmer assistant); a chain, a best-first tree or any tree of ranks")
    Options = DFlashOptions
    drafts: ClassVar[str] = "tree"
    drafts_depend_on_shape: ClassVar[bool] = True

    def __init__(self, target, net: DFlashNet, checkpoint: DFlashCheckpoint | None, options: DFlashOptions) -> None:
        super().__init__(target, options)
        self.net = net
        c = net.config
        self.device, self.dtype = target.device, target.dtype
        self.taps = c.taps
        tree = options.tree
        self.dynamic = tree == DYNAMIC
        self.shape = None
        if tree and not self.dynamic and not tree.startswith("chain:"):
            self.shape = resolve_tree(tree)
            k = self.shape.depth
        elif tree and tree.startswith("chain:"):
            k = resolve_tree(tree).depth
        else:
            k = options.k or c.block_size - 1
        if k > c.block_size - 1:
            raise UserError(f"the draft was trained on blocks of {c.block_size} ({c.block_size - 1} drafted tokens); "
                            f"{'--k' if not tree else '--tree ' + tree} asks for {k}: use at most {c.block_size - 1}")
        if self.shape is not None and c.dflash2 and max(p[-1] for p in self.shape.paths) >= c.selector_top_k:
            raise UserError(f"tree '{tree}' ranks past the selector's {c.selector_top_k} candidates per position")
        self.k = k
        # the most children one node needs: a tree's widest rank, the dynamic tree's top_k
        self.width = options.top_k if self.dynamic else max(p[-1] for p in self.shape.paths) + 1 if self.shape is not None else 1
        self.chain = self.shape is None and not self.dynamic
        self.acceptance = None if self.chain else TreeSampling()
        self.info: dict[str, Any] = {**(checkpoint.describe() if checkpoint else {}), "taps": list(self.taps), "k": k,
                                     "block": k + 1, "tree": tree or f"chain:{k}"}
        if self.dynamic:
            self.info |= {"total_tokens": options.total_tokens, "top_k": options.top_k}
        self.context = StaticKV(net.config.num_layers)  # committed positions' keys/values only
        self.pending: torch.Tensor | None = None

    @classmethod
    def create(cls, target, options: DFlashOptions) -> DFlashDrafter:
        spec, _ = catalogued_weights(cls.name, target, options.weights, "draft",
                                     "pass --weights PATH|ID (a DFlash v1, DFlash2 or Muse Glimmer checkpoint directory, "
                                     "model.safetensors or hub id)")
        checkpoint = read_checkpoint(spec)
        return cls(target, build_net(checkpoint, target), checkpoint, options)

    # --- what the loop and the reports ask --------------------------------------------
    @property
    def max_draft_tokens(self) -> int:
        if self.dynamic:
            return self.options.total_tokens - 1
        return len(self.shape) if self.shape is not None else self.k

    @property
    def max_draft_depth(self) -> int:
        if self.dynamic:
            return min(self.k, self.options.total_tokens - 1)
        return self.shape.depth if self.shape is not None else self.k

    def memory_model(self) -> tuple[int, int]:
        return self.net.weight_bytes(), 1  # one draft forward per step, whatever the block

    def describe(self) -> dict:
        return self.info

    # --- one sequence ------------------------------------------------------------------
    # batch > 1: each row's context cache its own (fork); one block forward for every live row
    # (propose_rows), the target's verify over every row at once
    batches = True

    def fork(self, row: int) -> DFlashDrafter:
        clone = super().fork(row)
        clone.context = StaticKV(self.net.config.num_layers)
        clone.pending = None
        return clone

    def draft_cache(self) -> StaticKV:
        return self.context

    def extend_context(self, features: torch.Tensor) -> None:
        """Append the keys/values of newly committed positions, from the target's features there."""
        start, n = self.context.length, features.shape[0]
        self.context.reserve(start + n)
        positions = torch.arange(start, start + n, device=self.device)
        for i, (keys, values) in enumerate(self.net.context_kv(features.to(self.device, self.dtype), positions)):
            self.context.put(i, start, keys, values)
        self.context.length = start + n

    def context_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the context's (keys, values) [length, nKV, d], as DFlashNet.block reads them."""
        if self.context.kv is None:
            return []
        length = self.context.length
        return [(keys.transpose(0, 1), values.transpose(0, 1))
                for keys, values in (self.context.layer_kv(i, length) for i in range(self.context.num_layers))]

    def catch_up(self, tokens: torch.Tensor) -> int:
        """Take the pending features into the context, up to the anchor (the last token); its position."""
        S = tokens.numel() - 1
        have = self.context.length + (0 if self.pending is None else self.pending.shape[0])
        if have != S:
            raise RuntimeError(f"DFlash draft: the anchor is at position {S} but the target's features cover {have} positions; "
                               "begin/on_verified were not called in order")
        if self.pending is not None and self.pending.shape[0]:
            self.extend_context(self.pending)
        self.pending = None
        return S

    def block_ids(self, anchors: list[int]) -> torch.Tensor:
        """[anchor, mask × (b − 1)] per block."""
        ids = torch.full((len(anchors), self.k + 1), self.net.config.mask_token_id, dtype=torch.long, device=self.device)
        ids[:, 0] = torch.tensor(anchors, device=self.device)
        return ids

    def run_block(self, tokens: torch.Tensor) -> Block:
        """Catch the context up to the anchor (the last token), then one forward over the block."""
        start = torch.tensor([self.catch_up(tokens)], device=self.device)
        out = self.net.block(self.block_ids([int(tokens[-1])]), start, self.context_layers(), start)[0, 1:]
        return Block(self.net, out, int(tokens[-1]), self.width)

    @torch.inference_mode()
    def propose_rows(self, rows: list[DFlashDrafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """Every live row's block in one forward: the rows' contexts side by side, each block seeing
        only its own row's keys (a mask), at its own anchor position. Each row drafts what it
        drafts alone."""
        if any(row.row is None for row in rows) or len(rows) == 1:  # batch 1: the drafter itself
            return super().propose_rows(rows, contexts)
        start = torch.tensor([row.catch_up(ctx.tokens) for row, ctx in zip(rows, contexts)], device=self.device)
        lengths = [row.context.length for row in rows]  # host-side: no device sync per row
        owner = torch.repeat_interleave(torch.arange(len(rows), device=self.device), torch.tensor(lengths, device=self.device))
        context_ok = owner[None] == torch.arange(len(rows), device=self.device)[:, None]  # [rows, keys]: each key's own row
        key_positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        per_row = [row.context_layers() for row in rows if row.context.length]  # per row, per layer (keys, values)
        layers = [tuple(torch.cat(parts) for parts in zip(*(kv[i] for kv in per_row))) for i in range(len(per_row[0]))] if per_row else []
        anchors = [int(ctx.tokens[-1]) for ctx in contexts]
        out = self.net.block(self.block_ids(anchors), start, layers, None, context_ok, key_positions)[:, 1:]
        logits = self.net.logits(out)  # every row's positions through the LM head in one product
        return [self.tree_from(Block(self.net, out[r], anchors[r], self.width, logits[r]), ctx) for r, ctx in enumerate(contexts)]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        return self.tree_from(self.run_block(ctx.tokens), ctx)

    def tree_from(self, block: Block, ctx: DraftContext) -> DraftTree:
        """The step's draft from its block: the chain, a tree of ranks or the best-first tree."""
        if self.dynamic:
            tokens, parents = best_first(block, self.k, self.options.total_tokens - 1, self.options.top_k)
        elif self.shape is not None:
            tokens, parents = ranked_tree(block, self.shape)
        else:
            return self.draft_chain(block, min(self.k, ctx.max_tokens), ctx)
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=self.device),
                         torch.tensor(parents, dtype=torch.long, device=self.device))

    def draft_chain(self, block: Block, n: int, ctx: DraftContext) -> DraftTree:
        """Greedy: each position's best (DFlash2: the selector's path from the anchor). At T > 0:
        each position sampled from the draft (DFlash2: from the selector's scores given the token
        sampled before it), with the distributions for speculative sampling."""
        sampling = ctx.temperature > 0
        tokens, probs, previous = [], [], block.anchor
        for d in range(1, n + 1):
            scores, ids = block.scores(d, previous)
            if sampling:
                q = torch.softmax(scores.double() / ctx.temperature, -1)
                choice = sample(q, ctx.generator)
                full = q.new_zeros(block.logits.shape[-1])
                full[ids if ids is not None else torch.arange(q.numel(), device=q.device)] = q
                probs.append(full)
            else:
                choice = int(scores.argmax())
            previous = int(ids[choice]) if ids is not None else choice
            tokens.append(previous)
        chain = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return DraftTree.chain(chain, torch.stack(probs) if sampling else None)

    # --- simulate: every step's block in one batched pass --------------------------------
    @torch.inference_mode()
    def teacher_forced(self, prompt, output, depth, hidden):
        """Exact for greedy decoding. While the drafts match, the draft's context at step m (m tokens
        emitted, anchor out[m-1] at position P+m-1) holds the target's features of positions
        0..P+m-2, so the context keys/values of the whole sequence are computed once and every
        step's block runs in one batch, block r seeing the first P+m-1 of them and itself."""
        states, source = hidden()
        p, n = prompt.numel(), output.numel()
        width = min(depth, self.k)
        ranks = torch.full((n, depth), RANK_NONE, dtype=torch.long)
        sizes, depths, accepted = (torch.zeros(n, dtype=torch.long) for _ in range(3))
        if n >= 2:
            output = output.to(self.device)
            context = self.net.context_kv(states[: p + n - 2].to(self.device, self.dtype), torch.arange(p + n - 2, device=self.device))
            mask = self.net.config.mask_token_id
            chunk = max(1, 4096 // (self.k + 1))
            for m0 in range(1, n, chunk):
                steps = torch.arange(m0, min(n, m0 + chunk), device=self.device)
                ids = torch.full((steps.numel(), self.k + 1), mask, dtype=torch.long, device=self.device)
                ids[:, 0] = output[steps - 1]
                start = p + steps - 1
                outs = self.net.block(ids, start, context, start)[:, 1:]
                for row, m in enumerate(steps.tolist()):
                    block = Block(self.net, outs[row], int(output[m - 1]), self.width)
                    for d in range(1, width + 1):
                        if m + d - 1 >= n:
                            break
                        previous = int(output[m + d - 2])  # the true token before position d (the anchor for d = 1)
                        scores, ids_d = block.scores(d, previous)
                        true = int(output[m + d - 1])
                        column = true if ids_d is None else int((ids_d == true).nonzero()[0]) if (ids_d == true).any() else -1
                        ranks[m, d - 1] = rank_of(scores[None], torch.tensor([column], device=scores.device))[0]
                    if self.dynamic:
                        tokens, parents = best_first(block, self.k, self.options.total_tokens - 1, self.options.top_k)
                        sizes[m], depths[m], accepted[m] = self._walk(tokens, parents, output[m:].tolist())
        own = OwnTrees(sizes, depths, accepted) if self.dynamic else None
        return TeacherForced(ranks, capped=self.chain, hidden_source=source, own_trees=own)

    @staticmethod
    def _walk(tokens: list[int], parents: list[int], future: list[int]) -> tuple[int, int, int]:
        """(size, depth, accepted) of a tree against the true continuation `future` (out[m], ...)."""
        depth_of, best, node_depth = {}, 0, []
        for i, (token, parent) in enumerate(zip(tokens, parents)):
            d = 1 if parent < 0 else node_depth[parent] + 1
            node_depth.append(d)
            on_path = parent < 0 or depth_of.get(parent, False)
            if on_path and d <= len(future) and token == future[d - 1]:
                depth_of[i] = True
                best = max(best, d)
        return len(tokens), max(node_depth, default=0), best
