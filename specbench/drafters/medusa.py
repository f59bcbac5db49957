"""`medusa` and `hydra-decoder`: independent draft heads on one hidden state.

Medusa head k reads the target's final normed hidden state at the last
verified position t (the one whose logits chose the root x_{t+1}) and
predicts x_{t+k+2}; the tree node at depth d with last rank r gets the r-th
best token of head d-1, whatever its parent (the heads do not see the branch).

The reference runs the heads inside the verify forward, over every tree
row, and keeps the accepted row's output. Here the heads run in `propose`,
on that one row only: the same logits, and `draft_ms` is exactly the heads'
cost (the verify forward is unchanged, as in the reference).

`hydra-decoder` puts a trunk in front of the heads: N decoder layers that
start as copies of the target's last N, with their own norm and KV cache,
reading the hidden state that enters target layer L-N. The trunk is fed the
accepted tokens' rows at the start of the next draft (the reference runs it over
the whole tree with the tree mask and compacts its cache to the accepted
path: the same keys, values and outputs, for fewer rows).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from specbench.drafters.base import DraftContext, Drafter, VerifyOutcome
from specbench.drafters.checkpoints import (
    check_base_model,
    load_hydra_decoder,
    load_medusa,
    load_medusa_state,
)
from specbench.drafters.heads import MedusaHeads, OwnDecoder
from specbench.drafters.trees import resolve_tree
from specbench.drafters.vocab_trim import kept_index
from specbench.engine.acceptance import TypicalAcceptance
from specbench.engine.tree import DraftTree, TreeShape
from specbench.errors import UserError

FRESH = "fresh"
DEFAULT_TREE = "mc_sim_7b_63"


def catalogue_entry(drafter: str, target) -> dict:
    from specbench.targets.loading import catalogue

    entries = catalogue("heads").get(drafter, {})
    if target.name in entries:
        return entries[target.name]
    # a hub id given for an aliased target (`--target lmsys/vicuna-13b-v1.3`) finds the alias's entry
    aliases = [alias for alias, t in catalogue("targets").items() if isinstance(t, dict) and t.get("hf_id") == target.model_id]
    return next((entries[alias] for alias in aliases if alias in entries), {})


def typical_rule(posterior_threshold: float, posterior_alpha: float) -> TypicalAcceptance:
    if not (0 < posterior_threshold <= 1 and 0 < posterior_alpha <= 1):
        raise UserError(
            f"--posterior-threshold and --posterior-alpha must be in (0, 1] (got {posterior_threshold}, {posterior_alpha}); "
            "the references use 0.09 and 0.3"
        )
    return TypicalAcceptance(posterior_threshold, posterior_alpha)


def module_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


class HeadDrafter(Drafter):
    """What Medusa- and Hydra-style drafters share: a tree of ranks, typical
    acceptance above temperature 0, the target's hidden state at the last accepted row."""

    needs_hidden_states: ClassVar[bool] = True

    def __init__(self, target, tree: TreeShape, num_heads: int, typical: TypicalAcceptance, info: dict[str, Any]) -> None:
        if tree.depth > num_heads:
            raise UserError(f"tree '{tree.name}' is {tree.depth} deep but there are only {num_heads} heads; pick a shallower --tree (e.g. chain:{num_heads})")
        if max(tree.level_topk) > target.vocab_size:
            raise UserError(f"tree '{tree.name}' drafts rank {max(tree.level_topk) - 1} under a node, but the vocabulary has only "
                            f"{target.vocab_size} tokens; use a narrower --tree")
        self.target = target
        self.shape = tree
        self.num_heads = num_heads
        self.typical_acceptance = typical
        self.info = {"tree": tree.name, "tree_nodes": len(tree), "num_heads": num_heads, **info}
        self.device = target.device
        # the target's hidden states of the tokens accepted since the last draft
        # (the prompt at first): consumed at the start of `propose`, so feeding a
        # trunk or prefix layer counts as drafting time, as it is drafting work
        self.pending: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None  # [H] the heads' input at the last accepted position

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.pending = prompt_hidden

    def on_verified(self, outcome: VerifyOutcome) -> None:
        self.pending = outcome.hidden[self.accepted_rows(outcome)]

    def consume(self, rows: torch.Tensor) -> torch.Tensor:
        """The heads' input state at the last of the newly accepted `rows`."""
        return rows[-1]

    def catch_up(self) -> None:
        if self.pending is not None:
            self.last_hidden = self.consume(self.pending)
            self.pending = None

    @staticmethod
    def settings(drafter: str, target, heads: str | None, tree: str | None, num_heads: int | None = None) -> tuple[str, TreeShape, dict]:
        entry = catalogue_entry(drafter, target)
        spec = heads or entry.get("heads")
        if spec and spec.startswith("bundled:"):  # heads trained by specbench, shipped in specbench/bundled
            from specbench.targets.loading import bundled_dir

            spec = str(bundled_dir(spec.removeprefix("bundled:")))
        if not spec:
            raise UserError(
                f"no published {drafter} heads for target '{target.name}' in the catalogue: pass --heads PATH|ID, "
                f"or --heads fresh for heads initialised as the reference initialises them"
            )
        if num_heads is not None and (spec != FRESH or num_heads < 1):
            raise UserError("num_heads (>= 1) only applies to --heads fresh; with a checkpoint the tree's depth decides how many heads run")
        return spec, resolve_tree(tree or entry.get("tree") or DEFAULT_TREE), entry

    @staticmethod
    def accepted_rows(outcome: VerifyOutcome) -> list[int]:
        """Rows of the verify output that the target kept: the root and the accepted nodes."""
        return [0] + [n + 1 for n in outcome.accepted_nodes]

    def describe(self) -> dict:
        return self.info

    # --- simulation: one teacher-forced pass (specbench/simulate/proposals.py) -------------
    def teacher_base(self, states: torch.Tensor) -> torch.Tensor:
        """The heads' base hidden state at every position, from the target's states over
        the whole logged sequence (drafters with a trunk or prefix layer run it once, causally)."""
        return states

    def level_logits(self, d: int, base: torch.Tensor, output: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Logits of draft level d at the steps `m` (rows of `base`), on the true branch."""
        raise NotImplementedError

    @torch.inference_mode()
    def teacher_forced(self, prompt, output, depth, hidden):
        """At the step with m tokens emitted the heads read the base state at position
        P+m-2 (the one whose logits chose the root out[m-1]); level d's rank of the true
        out[m+d-1] follows from one batched head pass per level over all steps."""
        from specbench.simulate.proposals import RANK_NONE, TeacherForced, true_ranks

        if depth > self.num_heads:
            raise UserError(f"a shape {depth} deep needs {depth} heads; '{self.name}' has {self.num_heads}")
        states, source = hidden()
        p, n = prompt.numel(), output.numel()
        ranks = torch.full((n, depth), RANK_NONE, dtype=torch.long)
        base = self.teacher_base(states.to(self.device))[p - 1 : p + n - 2]  # row j: step m = j + 1
        output = output.to(self.device)
        # trimmed heads rank over the kept ids: the true token's index there, -1 where it cannot be drafted
        true = output if self.kept_ids is None else kept_index(output, self.kept_ids, self.target.vocab_size)
        for d in range(1, depth + 1):
            m = torch.arange(1, n - d + 1, device=self.device)  # steps whose level-d true token is logged
            if not m.numel():
                break
            ranks[m.cpu(), d - 1] = true_ranks(self.level_logits(d, base[m - 1], output, m), true[m + d - 1])
        return TeacherForced(ranks, capped=True, hidden_source=source)
    # --- VocabTrim: LM heads over the N most frequent target tokens only ---------

    kept_ids: torch.Tensor | None = None  # target id of each trimmed-head index

    def lm_head_slots(self) -> list[tuple[Any, int]]:
        """(container, index) of every LM head the drafter reads, for swapping in a trimmed one."""
        raise NotImplementedError

    def apply_vocab_trim(self, top: int | None, source: str | None) -> HeadDrafter:
        if not top and not source:
            return self
        if not source:
            raise UserError("--vocab-trim needs --vocab-trim-from RUN_DIR|LOG.jsonl|WORKLOAD|IDS.json to count tokens in")
        from specbench.drafters.vocab_trim import TrimmedHead, keep_ids

        kept, info = keep_ids(top, source, self.target.tokenizer, self.target.vocab_size)
        if len(kept) < max(self.shape.level_topk):
            raise UserError(f"--vocab-trim {len(kept)} keeps fewer tokens than tree '{self.shape.name}' drafts per node ({max(self.shape.level_topk)})")
        for container, index in self.lm_head_slots():
            container[index] = TrimmedHead(container[index], kept)
        self.kept_ids = kept.to(self.device)
        self.info |= info
        return self

    def to_target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return self.kept_ids[indices] if self.kept_ids is not None else indices


class MedusaDrafter(HeadDrafter):
    name = "medusa"
    summary = "Medusa heads on the target's last hidden state (independent heads), a token tree, typical acceptance at T > 0"

    def __init__(self, target, heads: MedusaHeads, tree: TreeShape, typical: TypicalAcceptance | None = None, info: dict | None = None) -> None:
        super().__init__(target, tree, len(heads.heads), typical or TypicalAcceptance(), info or {})
        self.heads = heads.to(target.device).eval()

    @classmethod
    def create(
        cls,
        target,
        heads: str | None = None,
        tree: str | None = None,
        num_heads: int | None = None,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        vocab_trim: int | None = None,
        vocab_trim_from: str | None = None,
    ) -> MedusaDrafter:
        spec, shape, entry = cls.settings(cls.name, target, heads, tree, num_heads)
        typical = typical_rule(posterior_threshold, posterior_alpha)
        if spec == FRESH:
            module = fresh_medusa_heads(target, num_heads or entry.get("num_heads", 4))
            return cls(target, module, shape, typical, {"heads": FRESH}).apply_vocab_trim(vocab_trim, vocab_trim_from)
        checkpoint, layout = load_medusa(spec, target)
        check_base_model(checkpoint, target)
        module = MedusaHeads(layout.num_heads, layout.num_layers, target.hidden_size, target.vocab_size,
                             None if layout.own_lm_head else target.lm_head).to(target.device, target.dtype)
        load_medusa_state(module, checkpoint.state, target, spec)
        info = {**checkpoint.describe(), "medusa_layers": layout.num_layers, "own_lm_head": layout.own_lm_head}
        return cls(target, module, shape, typical, info).apply_vocab_trim(vocab_trim, vocab_trim_from)

    def lm_head_slots(self) -> list[tuple[Any, int]]:
        if self.heads.base_lm_head[0] is not None:
            return [(self.heads.base_lm_head, 0)]
        return [(head, len(head) - 1) for head in self.heads.heads]

    def memory_model(self) -> tuple[int, int]:
        used = list(self.heads.heads)[: self.shape.depth]
        extra = self.heads.base_lm_head[0]
        return module_bytes(*used) + (module_bytes(extra) * self.shape.depth if extra is not None else 0), 1

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        shape = self.shape
        self.catch_up()
        if not len(shape):
            return DraftTree.empty(self.device)
        levels = []
        for d in range(1, min(shape.depth, ctx.max_tokens) + 1):  # deeper nodes could not be emitted
            best = self.to_target_ids(self.head_logits(d, self.last_hidden).topk(shape.level_topk[d]).indices)
            levels.append(best[shape.level_ranks[d].to(best.device)])
        return shape.draft_tree(levels)


    def head_logits(self, d: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head d's logits (its own LM head, or the target's for heads-only checkpoints)."""
        head = self.heads.heads[d - 1]
        out = head(hidden.to(head[0].linear.weight.dtype))
        return out if self.heads.base_lm_head[0] is None else self.heads.base_lm_head[0](out)

    def level_logits(self, d, base, output, m):
        return self.head_logits(d, base)


def fresh_medusa_heads(target, num_heads: int, seed: int = 0) -> MedusaHeads:
    """One ResBlock per head at identity, LM heads copied from the target's (the reference's init)."""
    with torch.random.fork_rng():  # the init draws random biases: seeded, and the caller's RNG untouched
        torch.manual_seed(seed)
        module = MedusaHeads(num_heads, 1, target.hidden_size, target.vocab_size)
    module = module.to(target.device, target.dtype)
    with torch.no_grad():
        for linear in module.lm_head_weights():
            linear.weight.copy_(target.lm_head.weight)
    return module


class HydraDecoderDrafter(MedusaDrafter):
    name = "hydra-decoder"
    summary = "decoder-layer Hydra: a trunk of N decoder layers (copied from the target's last N, own KV cache) in front of Medusa heads"

    def __init__(self, target, heads: MedusaHeads, trunk: OwnDecoder, tree: TreeShape, typical: TypicalAcceptance | None = None, info: dict | None = None) -> None:
        n = trunk.config.num_hidden_layers
        super().__init__(target, heads, tree, typical, {"decoder_layers": n, **(info or {})})
        self.trunk = trunk.to(target.device, target.dtype).eval()
        self.hidden_state_layer = target.num_layers - n  # the trunk reads what enters target layer L - N

    @classmethod
    def create(
        cls,
        target,
        heads: str | None = None,
        tree: str | None = None,
        num_heads: int | None = None,
        decoder_layers: int | None = None,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
        vocab_trim: int | None = None,
        vocab_trim_from: str | None = None,
    ) -> HydraDecoderDrafter:
        if heads is None and decoder_layers is not None and not catalogue_entry(cls.name, target):
            heads = FRESH  # `--decoder-layers N` on any target: an untrained trunk copied from its last N layers
        spec, shape, entry = cls.settings(cls.name, target, heads, tree, num_heads)
        typical = typical_rule(posterior_threshold, posterior_alpha)
        if spec == FRESH:
            n = decoder_layers or entry.get("decoder_layers", 1)
            if not 1 <= n <= target.num_layers:
                raise UserError(f"--decoder-layers must be between 1 and the target's {target.num_layers} layers (got {n})")
            module = fresh_medusa_heads(target, num_heads or entry.get("num_heads", 4))
            return cls(target, module, copied_trunk(target, n), shape, typical, {"heads": FRESH}).apply_vocab_trim(vocab_trim, vocab_trim_from)
        checkpoint, layout = load_hydra_decoder(spec, target)
        if decoder_layers is not None and decoder_layers != layout.num_decoder_layers:
            raise UserError(f"--decoder-layers {decoder_layers} contradicts '{spec}', which has {layout.num_decoder_layers}")
        check_base_model(checkpoint, target)
        medusa = layout.medusa
        module = MedusaHeads(medusa.num_heads, medusa.num_layers, target.hidden_size, target.vocab_size,
                             None if medusa.own_lm_head else target.lm_head).to(target.device, target.dtype)
        head_state = {k.removeprefix("medusa_head."): v for k, v in checkpoint.state.items() if k.startswith("medusa_head.")}
        load_medusa_state(module, head_state, target, spec)
        trunk = OwnDecoder(target.config, layout.num_decoder_layers).to(target.device, target.dtype)
        trunk.load_layers({k: v.to(target.dtype) for k, v in checkpoint.state.items() if not k.startswith("medusa_head.")}, spec)
        return cls(target, module, trunk, shape, typical, checkpoint.describe()).apply_vocab_trim(vocab_trim, vocab_trim_from)

    def memory_model(self) -> tuple[int, int]:
        heads_bytes, _ = super().memory_model()
        return heads_bytes + module_bytes(self.trunk.model.layers, self.trunk.model.norm), 1

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.trunk.reset()
        super().begin(prompt_tokens, prompt_hidden)

    def consume(self, rows: torch.Tensor) -> torch.Tensor:
        return self.trunk.feed(rows)[-1]

    def teacher_base(self, states):
        self.trunk.reset()
        return self.trunk.feed(states)


def copied_trunk(target, n: int) -> OwnDecoder:
    """N decoder layers copied from the target's last N, and its final norm."""
    trunk = OwnDecoder(target.config, n).to(target.device, target.dtype)
    layers = target.backbone.layers
    state = {}
    for j in range(n):
        for key, value in layers[len(layers) - n + j].state_dict().items():
            state[f"layers.{j}.{key}"] = value
    state["norm.weight"] = target.backbone.norm.weight
    trunk.load_layers(state, f"trunk copied from '{target.name}'")
    return trunk
