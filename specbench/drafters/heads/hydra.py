"""`hydra`: sequentially dependent ("grounded") draft heads (Ankner et al., 2024).

Head h reads concat[base hidden state at t, emb(x_{t+1}), ..., emb(x_{t+h+1})]:
the root's embedding and those of every token drafted before it on the
branch. Drafting is level by level, as the reference does it: head h runs
once on all rows of level h (the nodes of depth h that have children, in
node order), takes the top-k children of each, and the rows of the next
level extend their parent's features with the child's embedding.

Hydra++ (arch "prefix-mlp", the published checkpoints) first runs the base
hidden states through one extra decoder layer with its own final norm and its
own KV cache. That layer only ever sees accepted tokens: at the start of each
draft it is fed the target's rows of the root and the nodes accepted since.

Heads trained by specbench with `--tie-lm-head` (the bundled ones) carry no
`hydra_lm_head.*` and no `input_embed_fn.weight`: they read the target's LM
head and embedding table.

Embeddings: the published files carry `input_embed_fn.weight`, a bf16 copy
of the base embedding table that the reference writes back over the base
model. Here the heads use it for their own lookups and the target is left
untouched, so the target's outputs (and plain decoding) are unchanged.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from specbench.drafters.catalogued import catalogued_setting
from specbench.drafters.heads.base import FRESH, HeadDrafter, HeadOptions, HeadTraining, module_bytes
from specbench.drafters.heads.layouts import (
    check_base_model,
    check_shape,
    load_hydra,
    load_hydra_state,
)
from specbench.drafters.heads.modules import HydraHeads, OwnDecoder
from specbench.engine.options import option
from specbench.engine.protocol import DraftContext, OwnTrees, TrainRecipe
from specbench.engine.tree import DraftTree, TreeShape


@dataclass
class HydraOptions(HeadOptions):
    prune_below: float | None = option(
        None, "drop every drafted node whose path probability (the product of the heads' probabilities of its tokens "
              "from the root) is below P, and draft no deeper once a level keeps none (BiLD's fallback rule on a tree; "
              "docs/heads.md); 0 drafts the whole tree; default from the catalogue (0 where it names none)", min=0, max=1)


@dataclass
class HydraTraining(HeadTraining):
    hydra_layers: int = option(4, "hydra: ResBlocks per head (the first grounded, the rest one shared block)", min=1)


class HydraDrafter(HeadDrafter):
    name = "hydra"
    recipe = TrainRecipe("specbench.train.heads:train_heads", 5e-4, HydraTraining)  # Hydra++'s rate
    Options = HydraOptions
    summary = "Hydra / Hydra++ heads: each head sees the tokens drafted before it on the branch; drafted level by level"

    def __init__(
        self,
        target,
        heads: HydraHeads,
        tree: TreeShape,
        embed: nn.Embedding,
        prefix: OwnDecoder | None = None,
        hidden_state_offset: int = 0,
        options: HeadOptions | None = None,
        info: dict | None = None,
        prune_below: float = 0.0,
    ) -> None:
        super().__init__(target, tree, heads.num_heads, options, {"arch": heads.arch, **(info or {})})
        self.heads = heads.to(target.device).eval()
        self.embed = embed.to(target.device).eval()
        self.prefix = prefix.to(target.device, target.dtype).eval() if prefix is not None else None
        # offset k > 0: the output of target layer L-k (the input of layer L-k+1), before the norm
        if hidden_state_offset:
            self.taps = (target.num_layers - hidden_state_offset,)
        self._step_prefix: nn.Module | None = None
        self.prune_below = prune_below
        self.info["prune_below"] = prune_below

    @property
    def pruned_per_step(self) -> str:
        if self.prune_below > 0:  # which nodes survive depends on the tree drafted
            return f"it prunes its tree every step (prune_below {self.prune_below:g}); tune the tree with --prune-below 0"
        return ""

    @classmethod
    def create(cls, target, options: HydraOptions) -> HydraDrafter:
        settings = cls.settings(target, options)
        # the catalogue's pruning goes with the catalogue's heads (as its VocabTrim does)
        prune = catalogued_setting(settings.entry if options.heads is None else {}, target, "prune_below", options.prune_below, 0.0)
        if settings.heads == FRESH:
            module, prefix = fresh_hydra_heads(target, options.heads_to_make(settings.entry))
            drafter = cls(target, module, settings.tree, target_embedding(target), prefix, 0, options, {"heads": FRESH}, prune)
            return drafter.apply_vocab_trim(options)
        spec = settings.heads
        checkpoint, layout = load_hydra(spec, target)
        check_base_model(checkpoint, target)
        module = HydraHeads(layout.arch, layout.num_heads, layout.num_layers, target.hidden_size, target.vocab_size, layout.grounded,
                            target.lm_head if layout.tied_lm_head else None)
        module = module.to(target.device, target.dtype)
        load_hydra_state(module, {k: v for k, v in checkpoint.state.items() if k.startswith("hydra_")}, target, spec)
        table = checkpoint.state.get("input_embed_fn.weight")
        if table is not None:
            check_shape(f"{spec} 'input_embed_fn.weight'", table, (target.vocab_size, target.hidden_size), target)
            embed = nn.Embedding.from_pretrained(table.to(target.dtype))
        else:
            embed = target_embedding(target)
        prefix = None
        if layout.arch == "prefix-mlp":
            prefix = OwnDecoder(target.config, 1).to(target.device, target.dtype)
            prefix_state = {k.removeprefix("prefix_embeding_layer."): v.to(target.dtype) for k, v in checkpoint.state.items() if k.startswith("prefix_embeding_layer.")}
            prefix_state.pop("embed_tokens.weight", None)  # the published one-layer LlamaModel's table: it is fed hidden states, never ids
            prefix.load_layers(prefix_state, spec)
        info = {**checkpoint.describe(), "hydra_layers": layout.num_layers, "grounded": layout.grounded,
                "hidden_state_offset": layout.hidden_state_offset, "own_lm_head": not layout.tied_lm_head}
        drafter = cls(target, module, settings.tree, embed, prefix, layout.hidden_state_offset, options, info, prune)
        return drafter.apply_vocab_trim(options)

    def lm_head_slots(self) -> list[tuple]:
        if self.heads.tied:
            return [(self.heads.base_lm_head, 0)]
        lm = self.heads.hydra_lm_head
        return [(lm[h], 1) if isinstance(lm[h], nn.Sequential) else (lm, h) for h in range(len(lm))]

    def memory_model(self) -> tuple[int, int]:
        used = [self.heads.hydra_mlp[h] for h in range(self.shape.depth)] + [self.heads.hydra_lm_head[h] for h in range(self.shape.depth)]
        total = module_bytes(*used) + (module_bytes(self.prefix.model.layers, self.prefix.model.norm) if self.prefix else 0)
        if self.heads.tied:  # the base LM head is read once per level
            total += module_bytes(self.heads.base_lm_head[0]) * self.shape.depth
        passes = max(self.shape.depth, 1)  # one sequential head pass per level
        return total // passes, passes

    def fork(self, row: int) -> HydraDrafter:
        """A row's drafter: the prefix layer's weights shared, its KV cache the row's own."""
        clone = super().fork(row)
        if self.prefix is not None:
            clone.prefix = copy.copy(self.prefix)  # reset() then gives the copy a cache of its own
        return clone

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        if self.prefix is not None:
            self.prefix.reset()
        super().begin(prompt_tokens, prompt_hidden)

    def consume(self, rows: torch.Tensor) -> torch.Tensor:
        """The heads' base state: the last accepted row, through the prefix layer for Hydra++ (its
        layer as the target's engine runs it, made at the first draft and shared by forked rows)."""
        if self.prefix is None:
            return rows[-1]
        if self._step_prefix is None:
            self._step_prefix = self.engine_copy(self.prefix.model)
        return self.prefix.feed(rows, self._step_prefix)[-1]

    def teacher_base(self, states):
        if self.prefix is None:
            return states
        self.prefix.reset()
        return self.prefix.feed(states)

    def level_logits(self, d, base, output, m):
        """Head d-1 on the true branch: the base state, then the embeddings of the root
        out[m-1] and of the true tokens out[m..m+d-2] drafted before it."""
        base = base.to(self.embed.weight.dtype)
        if not self.heads.grounded:
            return self.heads.head(d - 1, base)
        branch = torch.stack([output[m - 1 + j] for j in range(d)], dim=1)  # [steps, d]
        features = torch.cat([base, self.embed(branch).flatten(1)], dim=-1)
        return self.heads.head(d - 1, features)

    def draft_levels(self, heads: HydraHeads, base: torch.Tensor, roots: torch.Tensor, depth: int) -> Levels:
        """The tree drafted for R rows at once (base states [R, H], roots [R]), level by level as the
        reference drafts: head d-1 once over every row's level-d inputs (the nodes of depth d - 1 that
        have children), each node the top-k child of its parent's row. With `prune_below`, a node is
        kept where its path probability (its parent's times the head's softmax probability of its
        token) reaches the floor, and drafting stops at the first level where no row keeps a node."""
        grounded, floor = heads.grounded, self.prune_below
        base = base[:, None].to(self.embed.weight.dtype)  # [R, 1, H]
        features = torch.cat([base, self.embed(roots[:, None])], dim=-1) if grounded else base  # [R, rows, (level + 2) * H]
        path = None  # path probability of each row carried down to the next level (the root's: 1)
        levels = Levels([], [] if floor > 0 else None)
        for d in range(1, depth + 1):
            index = self.level_index[d]
            inputs = features if grounded else base
            ids, probs = (t.unflatten(0, inputs.shape[:2]) for t in heads.top_tokens(d - 1, inputs.flatten(0, 1), self.shape.level_topk[d]))
            tokens = self.to_target_ids(index.node_of(ids))  # [R, level nodes]
            if floor > 0:  # on the host, in Python floats: a few numbers per row, and one call instead of several
                probs = index.node_of(probs).tolist()  # [R][level nodes]
                path = probs if path is None else [[row[p] * q for p, q in zip(index.parent_list, qs)] for row, qs in zip(path, probs)]
                keep = [[p >= floor for p in row] for row in path]
                if not any(map(any, keep)):
                    break
                levels.keep.append(keep)
            levels.tokens.append(tokens)
            if d < depth:
                if grounded:
                    features = torch.cat([index.expanded_parents(features), self.embed(index.expanded(tokens))], dim=-1)
                if path is not None:
                    path = [[row[i] for i in index.expand_list] for row in path]
        return levels

    @functools.cached_property
    def level_index(self) -> list[LevelIndex | None]:
        """Per level d >= 1 of the shape, its indices on the drafter's device."""
        shape = self.shape
        return [None] + [LevelIndex.of(shape, d, self.heads.grounded, self.device) for d in range(1, shape.depth + 1)]

    def row_tree(self, levels: Levels, row: int, depth: int) -> DraftTree:
        """Row `row`'s tree of `levels`, cut at `depth`, its pruned nodes dropped."""
        tokens = [level[row] for level in levels.tokens[:depth]]
        if not tokens:  # no level drafted, or every node of the first pruned
            return DraftTree.empty(self.device)
        tree = self.shape.draft_tree(tokens)
        if levels.keep is None:
            return tree
        return tree.subtree([kept for keep in levels.keep[: len(tokens)] for kept in keep[row]])

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        self.catch_up()
        if not len(self.shape):
            return DraftTree.empty(self.device)
        depth = min(self.shape.depth, ctx.max_tokens)  # deeper nodes could not be emitted
        levels = self.draft_levels(self.step_heads, self.last_hidden[None], ctx.tokens[-1:].to(self.device), depth)
        return self.row_tree(levels, 0, depth)

    @torch.inference_mode()
    def propose_rows(self, rows: list[HydraDrafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """Every live row's tree, each level's head once over every row's nodes at that level (the
        rows share the tree shape, so their level features stack into [rows, nodes, width])."""
        if any(row.row is None for row in rows) or not len(self.shape):  # batch 1: row by row
            return super().propose_rows(rows, contexts)
        for row in rows:
            row.catch_up()  # Hydra++'s prefix layer: each row's own cache
        base = torch.stack([row.last_hidden for row in rows])
        roots = torch.cat([ctx.tokens[-1:].to(self.device) for ctx in contexts])
        depths = [min(self.shape.depth, ctx.max_tokens) for ctx in contexts]  # deeper nodes could not be emitted
        levels = self.draft_levels(self.step_heads, base, roots, max(depths))
        return [self.row_tree(levels, j, depths[j]) for j in range(len(rows))]

    def own_trees(self, base: torch.Tensor, output: torch.Tensor) -> OwnTrees:
        """With `prune_below`: the pruned tree of every step (rows 1..N-1; step m's base state is
        row m - 1 of `base`, its root out[m-1]), drafted for all steps at once as `propose` drafts
        it, and how far the logged continuation reaches in it."""
        n, shape = output.numel(), self.shape
        levels = self.draft_levels(self.heads, base, output[: n - 1], shape.depth) if n >= 2 else Levels([], [])
        if not levels.tokens:  # no step, or no step keeps a node
            none = torch.zeros(n, dtype=torch.long)
            return OwnTrees(none, none, none, torch.zeros(n, shape.depth, dtype=torch.long))
        tokens = torch.cat(levels.tokens, dim=1)  # [N - 1, drafted nodes]
        keep = torch.cat([torch.tensor(kept, dtype=torch.bool, device=tokens.device) for kept in levels.keep], dim=1)
        depths = torch.tensor(shape.depths[: tokens.shape[1]], device=tokens.device)
        index = torch.arange(1, n, device=tokens.device)[:, None] + depths[None] - 1  # node i of step m: out[m + depth_i - 1]
        future = torch.where(index < n, output[index.clamp(max=n - 1)], torch.full_like(index, -1))
        on_path = keep & (tokens == future)
        for i, parent in enumerate(shape.parents[: tokens.shape[1]]):  # parents precede children
            if parent >= 0:
                on_path[:, i] &= on_path[:, parent]
        accepted = torch.where(on_path, depths[None], 0).max(1).values
        kept_depth = torch.where(keep, depths[None], 0).max(1).values
        by_depth = torch.stack([(keep & (depths[None] <= d)).sum(1) for d in range(1, shape.depth + 1)], dim=1)
        rows = [by_depth[:, -1], kept_depth, accepted, by_depth]
        return OwnTrees(*(torch.cat([torch.zeros_like(x[:1]), x]).long().cpu() for x in rows))  # row 0 is unused


@dataclass
class LevelIndex:
    """How level d's nodes sit among the rows a level-by-level draft carries ([R, rows, ...]): each
    node's parent row and rank, the logits row its token comes from (its parent's, or the one row
    of heads that are not grounded), and the positions of the nodes that have children. An index
    that changes nothing (a chain's) is None and skipped: each indexing is a call of its own."""

    parent_list: list[int]
    expand_list: list[int]
    logits_rows: torch.Tensor | None  # with `ranks`; both None: rank 0 of each row in order
    ranks: torch.Tensor | None
    expand: torch.Tensor | None
    expand_parents: torch.Tensor | None  # parent_rows[expand]

    @staticmethod
    def of(shape: TreeShape, d: int, grounded: bool, device) -> LevelIndex:
        parent_rows, ranks, expand = shape.parent_rows[d], shape.level_ranks[d], shape.expand_positions[d]
        rows = parent_rows if grounded else torch.zeros_like(parent_rows)
        count = len(shape.expanded[d - 1]) if grounded else 1  # the rows level d's logits have

        def unless_identity(index: torch.Tensor, length: int) -> torch.Tensor | None:
            return None if index.tolist() == list(range(length)) else index.to(device)

        in_order = rows.tolist() == list(range(count)) and not any(ranks.tolist())
        return LevelIndex(parent_rows.tolist(), expand.tolist(), None if in_order else rows.to(device),
                          None if in_order else ranks.to(device), unless_identity(expand, len(parent_rows)),
                          unless_identity(parent_rows[expand], len(shape.expanded[d - 1])))

    def node_of(self, top: torch.Tensor) -> torch.Tensor:
        """[R, level nodes] from [R, logits rows, top-k]: each node's entry at its row and rank."""
        return top[..., 0] if self.ranks is None else top[:, self.logits_rows, self.ranks]

    def expanded(self, nodes: torch.Tensor) -> torch.Tensor:
        """The nodes that have children, from [R, level nodes, ...]."""
        return nodes if self.expand is None else nodes[:, self.expand]

    def expanded_parents(self, rows: torch.Tensor) -> torch.Tensor:
        """Their parents' carried rows, from [R, rows, ...]."""
        return rows if self.expand_parents is None else rows[:, self.expand_parents]


@dataclass
class Levels:
    """A tree of ranks drafted for R rows: each level's tokens [R, level nodes] and, when pruning,
    which of them are kept (per level, per row, per node; None: all)."""

    tokens: list[torch.Tensor]
    keep: list[list[list[bool]]] | None


def target_embedding(target) -> nn.Embedding:
    """The target's own embedding table, shared (frozen, never written), for heads whose
    file carries no `input_embed_fn.weight` (fresh and tied heads)."""
    return nn.Embedding.from_pretrained(target.input_embeddings.weight.detach())


def fresh_hydra_heads(target, num_heads: int, num_layers: int = 4, seed: int = 0, tie_lm_head: bool = False) -> tuple[HydraHeads, OwnDecoder]:
    """Hydra++ at the reference's init: ResBlocks with zero `linear` weights, LM heads
    copied from the target's (biases at PyTorch's default init) or, tied, the target's
    own, a randomly initialised prefix layer."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = HydraHeads("prefix-mlp", num_heads, num_layers, target.hidden_size, target.vocab_size, grounded=True,
                           base_lm_head=target.lm_head if tie_lm_head else None)
        prefix = OwnDecoder(target.config, 1)
    heads = heads.to(target.device, target.dtype)
    if not tie_lm_head:
        with torch.no_grad():
            for linear in heads.lm_head_weights():
                linear.weight.copy_(target.lm_head.weight)
    return heads, prefix
