"""`eagle` (EAGLE-1 weights, drafted as EAGLE-2 does) and `eagle3`: one-layer drafts
that run autoregressively on the target's hidden states and their own.

Per step: the draft first catches up on the accepted context it has not seen — each
new position pairs the target's state there with the next token — in its own KV
cache, which only ever holds accepted context (tree nodes never stay). Then it
drafts either EAGLE-2's dynamic tree (tree.py: depth rounds of top-k expansion, the
best total_tokens - 1 candidates kept) or any static tree of ranks (level by level,
like Hydra). At temperature > 0, trees of deterministic top-k drafts are accepted
with EAGLE's rule (`TreeSampling`, lossless in distribution), and chains are sampled
from the draft and accepted by speculative sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from specbench.drafters.catalogued import TREE_HELP, TreeOptions, WeightsOptions, catalogued_tree, catalogued_weights
from specbench.drafters.conditioned import StateConditioned
from specbench.drafters.eagle.layouts import EagleCheckpoint, build_net, read_checkpoint
from specbench.drafters.eagle.model import EagleNet, RowsDraftKV
from specbench.drafters.eagle.tree import Pool, accepted_lengths, draft_tree, grow, kept_tree, select
from specbench.drafters.trees import resolve_tree
from specbench.drafters.vocab_trim import TrimmedHead, asked_trim, head_rows, to_vocab_probs
from specbench.engine.acceptance import TreeSampling, sample
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import (
    FINAL,
    RANK_NONE,
    DraftContext,
    Drafter,
    OwnTrees,
    TeacherForced,
    TrainRecipe,
    true_ranks,
)
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.engine.kv import StaticKV

DYNAMIC = "dynamic"
# EaModel.from_pretrained's defaults (the paper-evaluation scripts use depth 5)
TOTAL_TOKENS, DEPTH, TOP_K = 60, 7, 10


@dataclass
class EagleOptions(WeightsOptions, TreeOptions):
    tree: str | None = option(None, TREE_HELP + "; eagle/eagle3 also take 'dynamic' (EAGLE-2's context-aware tree, their "
                                                "default); default from the catalogue")
    total_tokens: int = option(TOTAL_TOKENS, "dynamic tree: tokens verified per step, the root included (total_tokens - 1 drafted)", min=2)
    depth: int = option(DEPTH, "dynamic tree: expansion rounds (the longest draft is depth + 1 tokens)", min=1)
    top_k: int = option(TOP_K, "dynamic tree: children per node and beam width", min=1)
    tap_layers: str | None = option(
        None, "eagle3: the target layers whose INPUT hidden states the draft fuses, low,mid,high (e.g. 2,16,29); "
        "default: the checkpoint's, else 2, L//2, L-3")

    def check(self, drafter: str) -> None:
        super().check(drafter)
        if self.tap_layers is not None:
            parse_layers(self.tap_layers)

    @property
    def pool_size(self) -> int:
        return self.top_k + self.depth * self.top_k ** 2


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        layers = ()
    if len(layers) != 3 or min(layers) < 0:
        raise UserError(f"--tap-layers takes three layer indices, low,mid,high (e.g. 2,16,29), not '{text}'")
    return layers


def eagle3_taps(given: str | None, checkpoint: tuple[int, ...] | None, num_layers: int | None) -> tuple[tuple[int, ...], str]:
    """The target layers an EAGLE-3 draft fuses (the hidden states ENTERING them), and where that came from."""
    if num_layers is None:
        raise UserError("an EAGLE-3 draft needs the target's layer count, which this log does not record; pass --target")
    if given:
        layers, source = parse_layers(given), "--tap-layers"
    elif checkpoint:
        layers, source = tuple(checkpoint), "checkpoint config"
    else:
        layers, source = (2, num_layers // 2, num_layers - 3), "default 2, L//2, L-3"
    if len(layers) != 3:
        raise UserError(f"an EAGLE-3 draft fuses three target states; its config names {len(layers)} layers {list(layers)}")
    if not all(0 <= j < num_layers for j in layers):
        raise UserError(f"EAGLE-3 taps {list(layers)} ({source}) fall outside the target's {num_layers} layers "
                        "(the inputs of layers 0..L-1); pass --tap-layers")
    return layers, source


@dataclass
class EagleTraining(CommandConfig):
    """`specbench train --drafter eagle`'s own options."""

    feature_noise: float = option(0.1, "eagle: uniform noise U(-a, a) added to the target's features in training (the paper's 0.1)", min=0)


@dataclass
class Eagle3Training(CommandConfig):
    """`specbench train --drafter eagle3`'s own options."""

    draft_vocab: int = option(8192, "eagle3: draft vocabulary size, the N most frequent answer tokens of the data (d2t)", min=1)
    ttt_steps: int = option(4, "eagle3: draft steps unrolled in training-time test, each fed its own previous output "
                               "(the reference trains 7; a depth-3 tree drafts 3 levels)", min=1)


class EagleDrafter(StateConditioned, Drafter):
    name = "eagle"
    recipe = TrainRecipe("specbench.train.eagle:train_eagle", 1e-3, EagleTraining)
    summary = ("EAGLE-1/2: a one-layer draft on the target's final hidden state and the next token; EAGLE-2's dynamic tree "
               "(or any tree), tree sampling at T > 0")
    Options = EagleOptions
    drafts: ClassVar[str] = "tree"
    version: ClassVar[int] = 1

    def __init__(self, target, net: EagleNet, checkpoint: EagleCheckpoint | None, options: EagleOptions, tree: str = DYNAMIC,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(target, options)
        self.net = net
        self.device, self.dtype = target.device, target.dtype
        self.dynamic = tree == DYNAMIC
        self.shape = None if self.dynamic else resolve_tree(tree)
        self.info: dict[str, Any] = {**(checkpoint.describe() if checkpoint else {}), **(info or {}), "tree": tree}
        if self.dynamic:
            self.info |= {"total_tokens": options.total_tokens, "depth": options.depth, "top_k": options.top_k}
        else:
            self.info["tree_nodes"] = len(self.shape)
            self.levels = [(r.to(self.device), k.to(self.device), e.to(self.device))
                           for r, k, e in zip(self.shape.parent_rows, self.shape.level_ranks, self.shape.expand_positions)]
        if net.config.version == 1:
            if options.tap_layers:
                raise UserError("--tap-layers is for eagle3: an EAGLE-1 draft reads the target's final hidden state")
            net.set_head(target.lm_head, None)  # EAGLE-1's logits: the target's own LM head
            self.taps = FINAL  # the target's final (normed) hidden state
        else:
            layers, source = eagle3_taps(options.tap_layers, checkpoint.taps if checkpoint else None, target.num_layers)
            self.taps = layers
            self.info |= {"taps": list(layers), "taps_from": source, "draft_vocab": net.config.draft_vocab_size,
                          "target_vocab": net.config.vocab_size}
        self.apply_vocab_trim(options)
        head_rows = int(net.head.weight.shape[0])
        needed = options.top_k if self.dynamic else max(self.shape.level_topk, default=0)
        if head_rows < needed:
            raise UserError(f"the draft can propose {head_rows} distinct tokens, fewer than the {needed} per node the tree asks for")
        # chains sample from the draft and use speculative sampling; trees of top-k drafts EAGLE's rule
        self.acceptance = None if (self.shape is not None and len(self.shape) == self.shape.depth) else TreeSampling()
        self.kv = StaticKV(net.config.num_layers)  # accepted context only
        self.pending: torch.Tensor | None = None  # target states of accepted positions the draft has not seen

    @classmethod
    def create(cls, target, options: EagleOptions) -> EagleDrafter:
        spec, entry = catalogued_weights(cls.name, target, options.weights, "draft",
                                         "pass --weights PATH|ID (an EAGLE checkpoint directory, weights file or hub id)")
        checkpoint = read_checkpoint(spec)
        if checkpoint.config.version != cls.version:
            other = "eagle3" if checkpoint.config.version == 3 else "eagle"
            raise UserError(f"'{spec}' is an EAGLE-{checkpoint.config.version} checkpoint ({checkpoint.layout} layout): use --drafter {other}")
        net = build_net(checkpoint, target)
        return cls(target, net, checkpoint, options, catalogued_tree(entry, target, options.tree, DYNAMIC))

    # --- what the loop and the reports ask --------------------------------------------
    @property
    def max_draft_tokens(self) -> int:
        if self.dynamic:
            return min(self.options.total_tokens - 1, self.options.pool_size)
        return len(self.shape)

    @property
    def passes(self) -> int:
        """Sequential draft forwards per step: the catch-up (which gives depth 1), then one per level."""
        return self.options.depth + 1 if self.dynamic else max(self.shape.depth, 1)

    def memory_model(self) -> tuple[int, int]:
        return self.net.weight_bytes(), self.passes

    def describe(self) -> dict:
        return self.info

    # --- VocabTrim: a cut of the head in use -------------------------------------------
    def apply_vocab_trim(self, options: EagleOptions) -> None:
        """Keep only the head rows whose target ids are among the N most frequent target
        tokens: EAGLE-1's rows of the target's LM head; EAGLE-3's draft vocabulary (already
        a trim of the target's) cut further to the ids in the top N."""
        asked = asked_trim(options, self.target)
        if asked is None:
            return
        kept, info = asked
        kept = kept.to(self.device)
        current = self.net.head_ids if self.net.head_ids is not None else torch.arange(self.net.head.weight.shape[0], device=self.device)
        rows = torch.isin(current, kept).nonzero().flatten()
        if not rows.numel():
            raise UserError(f"--vocab-trim {options.vocab_trim}: none of the kept ids is in the draft's vocabulary")
        self.net.set_head(TrimmedHead(self.net.head, rows), current[rows])
        self.info |= {**info, "drafted_vocab": int(rows.numel())}

    def head_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head row of each target id, -1 where the draft cannot propose it."""
        if self.net.head_ids is None:
            return tokens
        return head_rows(tokens.to(self.device), self.net.head_ids, self.target.vocab_size)

    def vocab_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over head rows as one over the target's vocabulary."""
        if self.net.head_ids is None:
            return probs
        return to_vocab_probs(probs, self.net.head_ids, self.target.vocab_size)

    # --- one sequence ------------------------------------------------------------------
    batches = True  # per row: its row of one RowsDraftKV (fork); each draft pass runs over every live row (propose_rows)
    rows_kv: RowsDraftKV | None = None  # the forks' caches, one row each

    def fork(self, row: int) -> EagleDrafter:
        if self.rows_kv is None:
            self.rows_kv = RowsDraftKV(self.net.config, self.dtype, self.device, row + 1)
        self.rows_kv.grow(row + 1)
        clone = super().fork(row)
        clone.kv = self.rows_kv.row(row)
        return clone

    def draft_cache(self) -> StaticKV:
        return self.kv

    def catch_up(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the accepted positions not yet in the draft's cache; the output at the last one [1, H].
        Position j pairs the target's state f_j with the token x_{j+1}, so with T tokens the
        draft holds positions 0..T-2, the last one carrying the root."""
        start, end = self.kv.length, tokens.numel() - 1
        if self.pending is None or self.pending.shape[0] != end - start:
            raise RuntimeError(f"EAGLE draft: {end - start} new positions but the target's states of "
                               f"{0 if self.pending is None else self.pending.shape[0]}; begin/on_verified were not called in order")
        out = self.net.context(tokens[start + 1 : end + 1].to(self.device), self.pending.to(self.device, self.dtype), self.kv)
        self.pending = None
        return out[-1:]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        root = self.catch_up(ctx.tokens)
        logits = self.net.logits(root)
        if self.dynamic:
            pool, kept = self.dynamic_tree(root, logits, torch.tensor([self.kv.length], device=self.device), self.kv)
            return draft_tree(pool, kept, self.net.to_target)
        return self.static_tree(ctx, root, logits)

    # --- batch > 1: each draft pass over every live row ------------------------------------
    @torch.inference_mode()
    def propose_rows(self, rows: list[EagleDrafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """Every live row's tree with one draft forward per pass for all rows: the rows' catch-ups
        in one forward, then EAGLE-2's rounds (or the static tree's levels) over every row's nodes,
        each row reading its own row of the shared RowsDraftKV. Each row drafts what it drafts alone."""
        if any(row.row is None for row in rows):  # batch 1: the drafter itself
            return super().propose_rows(rows, contexts)
        kv, index = self.rows_kv, [row.row for row in rows]
        tokens, features = [], []
        for row, ctx in zip(rows, contexts):
            start, end = row.kv.length, ctx.tokens.numel() - 1
            if row.pending is None or row.pending.shape[0] != end - start:
                raise RuntimeError(f"EAGLE draft row {row.row}: {end - start} new positions but the target's states of "
                                   f"{0 if row.pending is None else row.pending.shape[0]}; begin/on_verified were not called in order")
            tokens.append(ctx.tokens[start + 1 : end + 1].to(self.device))
            features.append(row.pending.to(self.device, self.dtype))
            row.pending = None
        roots = torch.cat([out[-1:] for out in self.net.context_rows(tokens, features, kv, index)])
        logits = self.net.logits(roots)
        seq = torch.tensor(index, device=self.device)
        if self.dynamic:
            context = torch.tensor([kv.lengths[r] for r in index], device=self.device)
            pool, kept = self.dynamic_tree(roots, logits, context, kv, seq)
            return [DraftTree(self.net.to_target(ids), parents) for ids, parents in (kept_tree(pool, kept, b) for b in range(len(rows)))]
        return self.static_rows(contexts, roots, logits, [kv.lengths[r] for r in index], kv, seq)

    def static_rows(self, contexts: list[DraftContext], roots: torch.Tensor, logits: torch.Tensor, bases: list[int],
                    kv: RowsDraftKV, seq: torch.Tensor) -> list[DraftTree]:
        """`static_tree` for several rows: level d's expanded nodes of every row still drafting run in one forward."""
        shape, B = self.shape, len(contexts)
        depths = [min(shape.depth, ctx.max_tokens) for ctx in contexts]
        sampling = [ctx.temperature > 0 and self.acceptance is None for ctx in contexts]
        hidden, own = list(roots.split(1)), [None] * B
        row_logits = list(logits.split(1))
        levels: list[list[torch.Tensor]] = [[] for _ in range(B)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        live = list(range(B))
        for d in range(1, shape.depth + 1):
            parent_rows, ranks, expand = self.levels[d]
            for b in live:
                if sampling[b]:
                    q = torch.softmax(row_logits[b][0] / contexts[b].temperature, dim=-1)
                    rows = torch.tensor([sample(q, contexts[b].generator)], device=self.device)
                    probs[b].append(self.vocab_probs(q))
                else:
                    rows = row_logits[b].topk(shape.level_topk[d], dim=-1).indices[parent_rows, ranks]
                levels[b].append(self.net.to_target(rows))
            live = [b for b in live if d < depths[b]]
            if not live or not expand.numel():
                break
            parents, n = parent_rows[expand], expand.numel()
            grown = [None if own[b] is None else [(k[parents], v[parents]) for k, v in own[b]] for b in live]
            shared_own = None if grown[0] is None else [(torch.cat([g[i][0] for g in grown]), torch.cat([g[i][1] for g in grown]))
                                                        for i in range(len(grown[0]))]
            positions = torch.tensor([bases[b] + d - 1 for b in live for _ in range(n)], device=self.device)
            visible = torch.tensor([bases[b] for b in live for _ in range(n)], device=self.device)
            out, new_own = self.net.nodes(torch.cat([levels[b][-1][expand] for b in live]), torch.cat([hidden[b][parents] for b in live]),
                                          positions, kv, visible, shared_own, seq[live].repeat_interleave(n))
            level_logits = self.net.logits(out)
            for i, b in enumerate(live):
                hidden[b], row_logits[b] = out[i * n : (i + 1) * n], level_logits[i * n : (i + 1) * n]
                own[b] = [(k[i * n : (i + 1) * n], v[i * n : (i + 1) * n]) for k, v in new_own]
        trees = []
        for b in range(B):
            tree = shape.draft_tree(levels[b])
            trees.append(DraftTree(tree.tokens, tree.parents, torch.stack(probs[b])) if sampling[b] else tree)
        return trees

    def dynamic_tree(self, root: torch.Tensor, logits: torch.Tensor, context: torch.Tensor, kv: StaticKV | RowsDraftKV,
                     seq: torch.Tensor | None = None) -> tuple[Pool, torch.Tensor]:
        """EAGLE-2's tree for B problems at once: root outputs [B, H] and their logits, each
        seeing the first context[b] positions of `kv` (online B = 1; simulate: every step), or
        with `seq` of row seq[b] of a RowsDraftKV (batch > 1: one problem per live row)."""
        K, B = self.options.top_k, root.shape[0]
        visible = context.repeat_interleave(K)
        rows_of = None if seq is None else seq.repeat_interleave(K)
        state: dict[str, Any] = {}

        def expand(round_: int, tokens: torch.Tensor, choice: torch.Tensor | None) -> torch.Tensor:
            if choice is None:  # round 0: the depth-1 nodes continue from the root's output
                hidden, own = root.repeat_interleave(K, dim=0), None
            else:
                rows = (torch.arange(B, device=choice.device)[:, None] * K + choice).reshape(-1)
                hidden, own = state["out"][rows], [(k[rows], v[rows]) for k, v in state["own"]]
            ids = self.net.to_target(tokens.reshape(-1))
            state["out"], state["own"] = self.net.nodes(ids, hidden, visible + round_, kv, visible, own, rows_of)
            return torch.log_softmax(self.net.logits(state["out"]), dim=-1).view(B, K, -1)

        pool = grow(torch.log_softmax(logits, dim=-1), K, self.options.depth, expand)
        return pool, select(pool, self.options.total_tokens - 1)

    def static_tree(self, ctx: DraftContext, root: torch.Tensor, logits: torch.Tensor) -> DraftTree:
        """A tree of ranks, level by level: level d's expanded nodes run in one forward, each
        on its parent's output, seeing the context, its ancestors and itself."""
        shape = self.shape
        depth = min(shape.depth, ctx.max_tokens)  # deeper nodes could not be emitted
        sampling = ctx.temperature > 0 and self.acceptance is None  # a chain at T > 0
        base = self.kv.length
        hidden, own = root, None
        levels, probs = [], []
        for d in range(1, depth + 1):
            parent_rows, ranks, expand = self.levels[d]
            if sampling:
                q = torch.softmax(logits[0] / ctx.temperature, dim=-1)
                rows = torch.tensor([sample(q, ctx.generator)], device=self.device)
                probs.append(self.vocab_probs(q))
            else:
                rows = logits.topk(shape.level_topk[d], dim=-1).indices[parent_rows, ranks]
            tokens = self.net.to_target(rows)
            levels.append(tokens)
            if d == depth or not expand.numel():
                break
            parents = parent_rows[expand]
            own = None if own is None else [(k[parents], v[parents]) for k, v in own]
            n = expand.numel()
            hidden, own = self.net.nodes(tokens[expand], hidden[parents], torch.full((n,), base + d - 1, device=self.device),
                                         self.kv, torch.full((n,), base, device=self.device), own)
            logits = self.net.logits(hidden)
        tree = shape.draft_tree(levels)
        return DraftTree(tree.tokens, tree.parents, torch.stack(probs)) if sampling else tree

    # --- simulate: one teacher-forced pass ----------------------------------------------
    @torch.inference_mode()
    def teacher_forced(self, prompt, output, depth, hidden):
        """Exact for greedy decoding. While the drafts match, the draft's cache at step m holds
        exactly the accepted prefix, so one causal pass over the logged sequence gives every
        step's catch-up (step m reads the output at position P+m-2). Deeper levels run on the
        draft's own outputs, so they are replayed, batched over all steps at once: for a tree
        of ranks, the node on the true branch at each depth (its ancestors are the true tokens,
        so its output does not depend on the rest of the tree); for the dynamic tree, the
        whole tree of every step, whose kept set then says how far the log's tokens reach."""
        states, source = hidden()
        p, n = prompt.numel(), output.numel()
        ranks = torch.full((n, depth), RANK_NONE, dtype=torch.long)
        own_trees = None
        if n >= 2:
            output = output.to(self.device)
            sequence = torch.cat([prompt.reshape(-1).to(self.device), output])
            kv = StaticKV(self.net.config.num_layers)
            context = self.net.context(sequence[1 : p + n - 1], states[: p + n - 2].to(self.device, self.dtype), kv)
            steps = torch.arange(1, n, device=self.device)  # step m: m tokens emitted, root out[m-1]
            root = context[p + steps - 2]
            visible = p + steps - 1  # context positions step m's draft sees
            true = self.head_rows(output)
            logits = self.net.logits(root)
            ranks[1:, 0] = true_ranks(logits, true[steps])
            nodes, own = root, None
            for d in range(2, depth + 1):  # run the true node at depth d-1 to rank the true token at depth d
                rows = n - d  # steps m = 1..n-d have out[m+d-1] in the log
                if rows < 1:
                    break
                m = steps[:rows]
                own = None if own is None else [(k[:rows], v[:rows]) for k, v in own]
                nodes, own = self.net.nodes(output[m + d - 2], nodes[:rows], visible[:rows] + d - 2, kv, visible[:rows], own)
                ranks[1 : rows + 1, d - 1] = true_ranks(self.net.logits(nodes), true[m + d - 1])
            if self.dynamic:
                own_trees = self.own_trees(root, logits, visible, true, kv)
        elif self.dynamic:
            own_trees = OwnTrees(*(torch.zeros(n, dtype=torch.long) for _ in range(3)))
        return TeacherForced(ranks, capped=True, hidden_source=source, own_trees=own_trees)

    def own_trees(self, root, logits, visible, true, kv) -> OwnTrees:
        """The dynamic tree of every step (rows 1..N-1) and how much of the log it accepts."""
        pool, kept = self.dynamic_tree(root, logits, visible, kv)
        n = true.numel()
        reach = self.options.depth + 1
        index = torch.arange(1, n, device=self.device)[:, None] + torch.arange(reach, device=self.device)[None]  # out[m+d-1]
        future = torch.where(index < n, true[index.clamp(max=n - 1)], torch.full_like(index, -1))
        depths, accepted = accepted_lengths(pool, kept, future)
        pad = lambda x: torch.cat([torch.zeros(1, dtype=torch.long), x.long().cpu()])  # noqa: E731 - row 0 is unused
        return OwnTrees(pad(torch.full((n - 1,), kept.shape[1])), pad(depths), pad(accepted))


class Eagle3Drafter(EagleDrafter):
    name = "eagle3"
    recipe = TrainRecipe("specbench.train.eagle:train_eagle", 1e-3, Eagle3Training)
    summary = ("EAGLE-3: a one-layer draft fusing three target layers' hidden states, its own reduced vocabulary (d2t); "
               "EAGLE-2's dynamic tree (or any tree), tree sampling at T > 0")
    version = 3
