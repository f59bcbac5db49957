"""`hydra`: sequentially dependent ("grounded") draft heads (Ankner et al., 2024).

Head h reads concat[base hidden state at t, emb(x_{t+1}), ..., emb(x_{t+h+1})]:
the root's embedding and those of every token drafted before it on the
branch. Drafting is level by level, as the reference does it: head h runs
once on all rows of level h (the nodes of depth h that have children, in
node order), takes the top-k children of each, and the rows of the next
level extend their parent's features with the child's embedding.

Hydra++ (arch "prefix-mlp", the published checkpoints) first runs the base
hidden states through one extra decoder layer with its own final norm and its
own KV cache. That layer only ever sees accepted tokens: after each
verification it is fed the rows of the root and the accepted nodes.

Embeddings: the published files carry `input_embed_fn.weight`, a bf16 copy
of the base embedding table that the reference writes back over the base
model. Here the heads use it for their own lookups and the target is left
untouched, so the target's outputs (and plain decoding) are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from specbench.drafters.base import DraftContext, VerifyOutcome
from specbench.drafters.checkpoints import check_base_model, check_shape, load_hydra, load_hydra_state
from specbench.drafters.heads import HydraHeads, OwnDecoder
from specbench.drafters.medusa import FRESH, HeadDrafter, module_bytes, typical_rule
from specbench.engine.acceptance import TypicalAcceptance
from specbench.engine.tree import DraftTree, TreeShape


class HydraDrafter(HeadDrafter):
    name = "hydra"
    summary = "Hydra / Hydra++ heads: each head sees the tokens drafted before it on the branch; drafted level by level"

    def __init__(
        self,
        target,
        heads: HydraHeads,
        tree: TreeShape,
        embed: nn.Embedding,
        prefix: OwnDecoder | None = None,
        hidden_state_offset: int = 0,
        typical: TypicalAcceptance | None = None,
        info: dict | None = None,
    ) -> None:
        super().__init__(target, tree, heads.num_heads, typical or TypicalAcceptance(), {"arch": heads.arch, **(info or {})})
        self.heads = heads.to(target.device).eval()
        self.embed = embed.to(target.device).eval()
        self.prefix = prefix.to(target.device, target.dtype).eval() if prefix is not None else None
        # offset k > 0: the output of target layer L-k (the input of layer L-k+1), before the norm
        self.hidden_state_layer = target.num_layers - hidden_state_offset if hidden_state_offset else None

    @classmethod
    def create(
        cls,
        target,
        heads: str | None = None,
        tree: str | None = None,
        num_heads: int | None = None,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
    ) -> HydraDrafter:
        spec, shape, entry = cls.settings(cls.name, target, heads, tree)
        typical = typical_rule(posterior_threshold, posterior_alpha)
        if spec == FRESH:
            module, prefix = fresh_hydra_heads(target, num_heads or entry.get("num_heads", 4))
            embed = nn.Embedding.from_pretrained(target.model.get_input_embeddings().weight.detach().clone())
            return cls(target, module, shape, embed, prefix, 0, typical, {"heads": FRESH})
        checkpoint, layout = load_hydra(spec, target)
        check_base_model(checkpoint, target)
        module = HydraHeads(layout.arch, layout.num_heads, layout.num_layers, target.hidden_size, target.vocab_size, layout.grounded)
        module = module.to(target.device, target.dtype)
        load_hydra_state(module, {k: v for k, v in checkpoint.state.items() if k.startswith("hydra_")}, target, spec)
        table = checkpoint.state.get("input_embed_fn.weight")
        if table is not None:
            check_shape(f"{spec} 'input_embed_fn.weight'", table, (target.vocab_size, target.hidden_size), target)
            embed = nn.Embedding.from_pretrained(table.to(target.dtype))
        else:
            embed = nn.Embedding.from_pretrained(target.model.get_input_embeddings().weight.detach().clone())
        prefix = None
        if layout.arch == "prefix-mlp":
            prefix = OwnDecoder(target.config, 1).to(target.device, target.dtype)
            prefix_state = {k.removeprefix("prefix_embeding_layer."): v.to(target.dtype) for k, v in checkpoint.state.items() if k.startswith("prefix_embeding_layer.")}
            prefix.load_layers(prefix_state, spec)
        info = {**checkpoint.describe(), "hydra_layers": layout.num_layers, "grounded": layout.grounded, "hidden_state_offset": layout.hidden_state_offset}
        return cls(target, module, shape, embed, prefix, layout.hidden_state_offset, typical, info)

    def memory_model(self) -> tuple[int, int]:
        used = [self.heads.hydra_mlp[h] for h in range(self.shape.depth)] + [self.heads.hydra_lm_head[h] for h in range(self.shape.depth)]
        total = module_bytes(*used) + (module_bytes(self.prefix.model.layers, self.prefix.model.norm) if self.prefix else 0)
        passes = max(self.shape.depth, 1)  # one sequential head pass per level
        return total // passes, passes

    def _base(self, rows: torch.Tensor) -> torch.Tensor:
        """The heads' base hidden state at the last of `rows` (accepted rows, in order)."""
        if self.prefix is None:
            return rows[-1]
        return self.prefix.feed(rows)[-1]

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        if self.prefix is not None:
            self.prefix.reset()
        self.last_hidden = self._base(prompt_hidden)

    def on_verified(self, outcome: VerifyOutcome) -> None:
        self.last_hidden = self._base(outcome.hidden[self.accepted_rows(outcome)])

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        shape, heads = self.shape, self.heads
        if not len(shape):
            return DraftTree.empty(self.device)
        base = self.last_hidden[None].to(self.embed.weight.dtype)
        root = ctx.tokens[-1:].to(self.device)
        # level 0: one row, the root; features [rows, (level + 2) * H]
        features = torch.cat([base, self.embed(root)], dim=-1) if heads.grounded else base
        levels = []
        for d in range(1, shape.depth + 1):
            best = heads.head(d - 1, features if heads.grounded else base).topk(shape.level_topk[d]).indices
            parent_rows = shape.parent_rows[d].to(self.device) if heads.grounded else torch.zeros_like(shape.parent_rows[d]).to(self.device)
            tokens = best[parent_rows, shape.level_ranks[d].to(self.device)]
            levels.append(tokens)
            expand = shape.expand_positions[d].to(self.device)
            if heads.grounded and d < shape.depth and expand.numel():
                features = torch.cat([features[parent_rows[expand]], self.embed(tokens[expand])], dim=-1)
        return shape.draft_tree(levels)


def fresh_hydra_heads(target, num_heads: int, num_layers: int = 4, seed: int = 0) -> tuple[HydraHeads, OwnDecoder]:
    """Hydra++ at the reference's init: ResBlocks with zero `linear` weights, LM heads
    copied from the target's (biases at PyTorch's default init), a randomly initialised prefix layer."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = HydraHeads("prefix-mlp", num_heads, num_layers, target.hidden_size, target.vocab_size, grounded=True)
        prefix = OwnDecoder(target.config, 1)
    heads = heads.to(target.device, target.dtype)
    with torch.no_grad():
        for linear in heads.lm_head_weights():
            linear.weight.copy_(target.lm_head.weight)
    return heads, prefix
