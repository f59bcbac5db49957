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
from dataclasses import dataclass

import torch
from torch import nn

from specbench.drafters.heads.base import FRESH, HeadDrafter, HeadOptions, HeadTraining, module_bytes
from specbench.drafters.heads.layouts import (
    check_base_model,
    check_shape,
    load_hydra,
    load_hydra_state,
)
from specbench.drafters.heads.modules import HydraHeads, OwnDecoder
from specbench.engine.options import option
from specbench.engine.protocol import DraftContext, TrainRecipe
from specbench.engine.tree import DraftTree, TreeShape


@dataclass
class HydraTraining(HeadTraining):
    hydra_layers: int = option(4, "hydra: ResBlocks per head (the first grounded, the rest one shared block)", min=1)


class HydraDrafter(HeadDrafter):
    name = "hydra"
    recipe = TrainRecipe("specbench.train.heads:train_heads", 5e-4, HydraTraining)  # Hydra++'s rate
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
    ) -> None:
        super().__init__(target, tree, heads.num_heads, options, {"arch": heads.arch, **(info or {})})
        self.heads = heads.to(target.device).eval()
        self.embed = embed.to(target.device).eval()
        self.prefix = prefix.to(target.device, target.dtype).eval() if prefix is not None else None
        # offset k > 0: the output of target layer L-k (the input of layer L-k+1), before the norm
        if hidden_state_offset:
            self.taps = (target.num_layers - hidden_state_offset,)
        self._step_prefix: nn.Module | None = None

    @classmethod
    def create(cls, target, options: HeadOptions) -> HydraDrafter:
        settings = cls.settings(target, options)
        if settings.heads == FRESH:
            module, prefix = fresh_hydra_heads(target, options.heads_to_make(settings.entry))
            drafter = cls(target, module, settings.tree, target_embedding(target), prefix, 0, options, {"heads": FRESH})
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
        drafter = cls(target, module, settings.tree, embed, prefix, layout.hidden_state_offset, options, info)
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

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        shape, heads = self.shape, self.step_heads
        self.catch_up()
        if not len(shape):
            return DraftTree.empty(self.device)
        base = self.last_hidden[None].to(self.embed.weight.dtype)
        root = ctx.tokens[-1:].to(self.device)
        # level 0: one row, the root; features [rows, (level + 2) * H]
        features = torch.cat([base, self.embed(root)], dim=-1) if heads.grounded else base
        levels = []
        depth = min(shape.depth, ctx.max_tokens)  # deeper nodes could not be emitted
        for d in range(1, depth + 1):
            best = self.to_target_ids(heads.head(d - 1, features if heads.grounded else base).topk(shape.level_topk[d]).indices)
            parent_rows = shape.parent_rows[d].to(self.device) if heads.grounded else torch.zeros_like(shape.parent_rows[d]).to(self.device)
            tokens = best[parent_rows, shape.level_ranks[d].to(self.device)]
            levels.append(tokens)
            expand = shape.expand_positions[d].to(self.device)
            if heads.grounded and d < depth and expand.numel():
                features = torch.cat([features[parent_rows[expand]], self.embed(tokens[expand])], dim=-1)
        return shape.draft_tree(levels)

    @torch.inference_mode()
    def propose_rows(self, rows: list[HydraDrafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """Every live row's tree, each level's head once over every row's nodes at that level (the
        rows share the tree shape, so their level features stack into [rows, nodes, width])."""
        shape, heads = self.shape, self.step_heads
        if any(row.row is None for row in rows) or not len(shape):  # batch 1: row by row
            return super().propose_rows(rows, contexts)
        for row in rows:
            row.catch_up()  # Hydra++'s prefix layer: each row's own cache
        base = torch.stack([row.last_hidden for row in rows])[:, None].to(self.embed.weight.dtype)  # [rows, 1, H]
        roots = torch.stack([ctx.tokens[-1:].to(self.device) for ctx in contexts])  # [rows, 1]
        features = torch.cat([base, self.embed(roots)], dim=-1) if heads.grounded else base
        depths = [min(shape.depth, ctx.max_tokens) for ctx in contexts]  # deeper nodes could not be emitted
        depth = max(depths)
        levels: list[list[torch.Tensor]] = [[] for _ in rows]
        for d in range(1, depth + 1):
            inputs = features if heads.grounded else base
            logits = heads.head(d - 1, inputs.flatten(0, 1)).unflatten(0, inputs.shape[:2])
            best = self.to_target_ids(logits.topk(shape.level_topk[d]).indices)  # [rows, nodes, top-k]
            parent_rows = shape.parent_rows[d].to(self.device) if heads.grounded else torch.zeros_like(shape.parent_rows[d]).to(self.device)
            tokens = best[:, parent_rows, shape.level_ranks[d].to(self.device)]  # [rows, level nodes]
            for j in range(len(rows)):
                if d <= depths[j]:
                    levels[j].append(tokens[j])
            expand = shape.expand_positions[d].to(self.device)
            if heads.grounded and d < depth and expand.numel():
                features = torch.cat([features[:, parent_rows[expand]], self.embed(tokens[:, expand])], dim=-1)
        return [shape.draft_tree(row_levels) for row_levels in levels]


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
