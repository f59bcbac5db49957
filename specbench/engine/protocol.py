"""The contracts the decode loop, the drafters, the targets and `simulate` share.

This module is at the bottom: it imports nothing of specbench above engine/.

Target (`Target`): prefill a prompt; verify a token tree (root + nodes) in one
forward with tree attention; keep the accepted path in its KV cache. It hands
out the hidden states a drafter asks for (`taps`) and, read-only, the weights
head drafters build on (LM head, input embeddings, the config and the decoder
layers they copy). Backends: transformers (`targets/hf.py`, eager or on the
fast engine), DeepSpeed, and `simulate`'s stand-in built from a log.

Drafter (`Drafter`): built from (target, options) where the options are a
dataclass the drafter declares once (engine/options.py). Per generated
sequence the decode loop calls, in order:

1. `begin(prompt_tokens, prompt_hidden)` once, after the target's prefill;
   `prompt_hidden` is the target's hidden states over the prompt
   ([L, H·len(taps)]) when the drafter sets `taps`, else None.
2. `propose(ctx)` before each verification step: a `DraftTree` of tokens to
   follow the root (the last token of `ctx.tokens`); an empty tree makes the
   step a plain decoding step.
3. `on_verified(outcome)` after it: which nodes the target accepted, the
   tokens emitted, and (with `taps`) the target's hidden states over the root
   and every tree node.

`ctx.tokens` at the next `propose` is always the target's output so far, so a
drafter with its own KV cache can simply roll back to the common prefix.

Batch > 1 (`RowsTarget`, docs/batch.md): a drafter that sets `batches` runs one `fork()`
per row, each called in the order above for its own sequence; `propose_rows` proposes
for every live row of a step (row by row unless the drafter batches its draft forwards).

Optional, for `specbench simulate`: `teacher_forced(prompt, output, depth, hidden)`
scores a whole logged sequence in one pass (a `TeacherForced`); drafters
without it are simulated by step replay, which is slower and labelled so.

Capabilities a drafter declares: `drafts` ("chain": drafts one token per
depth; "tree": drafts the top-ranked tokens per node, so any tree of ranks
can be scored), the option that sets that shape (`Options.shape_option`: an
int length for a chain, e.g. `k`; a tree spec for a tree, e.g. `tree`;
simulate and tune set it per shape, `shape_spec` checks it), `taps` (which hidden states it
reads), `acceptance` (its acceptance rule at temperature > 0, from
engine/acceptance.py: typical acceptance for Medusa/Hydra, tree sampling for
EAGLE trees; None = speculative sampling) and `max_draft_tokens` (the largest
tree it can propose: the target sizes its cache and the fast engine its
buckets from it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from specbench.engine.acceptance import AcceptanceRule
from specbench.engine.options import CommandConfig, DrafterOptions, OptionSpec
from specbench.engine.tree import DraftTree, kept_rows
from specbench.errors import UserError

if TYPE_CHECKING:
    from torch import nn

# Which hidden states of the target a drafter reads, as a tuple of taps:
# None = the final normed hidden state (what the LM head reads);
# j = the hidden state entering decoder layer j (HF `hidden_states[j]`, before its norm).
# The target hands them over concatenated along the last dimension, in the tuple's order.
Taps = tuple[int | None, ...]
FINAL: Taps = (None,)


@runtime_checkable
class Target(Protocol):
    """What the decode loop and the drafters may ask of a target model."""

    name: str  # what the user called it (alias, hub id or directory)
    model_id: str  # the hub id or directory actually loaded
    backend: str  # "hf", "deepspeed", "log"
    engine: str  # "eager" | "fast" (engine/static_cache.py) | "log"
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    hidden_size: int
    num_layers: int
    eos_token_ids: set[int]
    tokenizer: Any  # a transformers tokenizer, or None

    def prefill(self, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Start a sequence. (logits [L, V] fp32, hidden [L, H·len(taps)] or None). `max_positions`:
        how far this sequence can reach (prompt + new tokens + the largest verify), so a static
        cache is sized once, before anything is timed."""
        ...

    def verify(self, root: int, tree: DraftTree, taps: Taps = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward over root + tree: (logits [1+n, V] fp32, hidden [1+n, H·len(taps)] or None);
        row 0 predicts the root's successor, row i+1 node i's."""
        ...

    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep the root and the accepted path in the cache; drop the rest of the verified tree."""
        ...

    def forward_bytes(self) -> int | None:
        """Weight bytes one decode forward reads (for the memory-bound model)."""
        ...

    def context_window(self) -> int | None:
        """The most positions the model was built for (None: unknown)."""
        ...

    def warm_up(self, max_rows: int, taps: Taps = (), max_positions: int | None = None) -> float:
        """Before anything is timed: size the cache for sequences of up to `max_positions` and
        capture every forward of 1..max_rows rows (CUDA graphs); the ms spent capturing."""
        ...

    def engine_stats(self) -> dict:
        """What run.json records about the engine (cache capacity, graphs)."""
        ...

    # --- read-only weights head drafters build on (never written) ---------------------
    @property
    def config(self) -> Any:
        """The transformers config (drafters that copy decoder layers build them from it)."""
        ...

    @property
    def lm_head(self) -> nn.Module:
        """The LM head (hidden -> vocabulary logits)."""
        ...

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The input token embedding table."""
        ...

    def decoder_layer_state(self, last: int) -> dict[str, torch.Tensor]:
        """The weights of the last `last` decoder layers and the final norm, named
        `layers.{j}.*` (j = 0..last-1) and `norm.weight`."""
        ...


@runtime_checkable
class FastEngineTarget(Target, Protocol):
    """A target on the fast engine (`engine == "fast"`): a drafter that runs a model of its own
    (draft-model) runs it on the same engine, bucketed and captured as the target's steps are."""

    def static_decoder(self, backbone: nn.Module, head: nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
        """An engine.static_cache.StaticDecoder for `backbone` + `head`, on this target's buckets and graphs."""
        ...


@runtime_checkable
class RowsTarget(Protocol):
    """A target that decodes `rows` sequences at once (batch > 1; targets/batched.py), each row
    its own sequence with its own KV length: a row is prefilled alone when it takes a sequence,
    and one forward verifies every live row's tree (padded to the largest with masked nodes).
    engine/loop.py drives a plain `Target` through the same calls as one row."""

    rows: int
    device: torch.device
    eos_token_ids: set[int]

    def prefill_row(self, row: int, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Start a sequence in `row`, as Target.prefill."""
        ...

    def verify_rows(self, rows: list[int], roots: list[int], trees: list[DraftTree], taps: Taps = ()) -> tuple[list, list]:
        """One forward over each row's root + tree: per row what Target.verify returns."""
        ...

    def commit_row(self, row: int, accepted_nodes: list[int]) -> None:
        """As Target.commit, in `row` only."""
        ...


@runtime_checkable
class TrainableTarget(Target, Protocol):
    """A target `specbench train` and `train-data` can use (the `hf` backend): the transformers
    model itself, which they run frozen (its answers, hidden states and logits) and copy
    layers and embeddings from. Decoding never touches it."""

    model: nn.Module


@dataclass
class DraftContext:
    tokens: torch.Tensor  # [L] prompt + emitted tokens; the last one is the root
    prompt_len: int
    max_tokens: int  # emitted tokens still allowed; drafting more is wasted work
    temperature: float  # 0 = greedy
    generator: torch.Generator | None  # the run's RNG, for drafters that sample


@dataclass
class VerifyOutcome:
    tree: DraftTree
    accepted_nodes: list[int]  # node indices on the accepted path, root excluded
    emitted: list[int]  # accepted draft tokens then the target's bonus token
    hidden: torch.Tensor | None  # [1 + n, H·len(taps)] the target's states, root first

    @property
    def kept_hidden(self) -> torch.Tensor:
        """The target's states at the root and the accepted nodes (what the target kept)."""
        return self.hidden[kept_rows(self.accepted_nodes)]


# --- simulation: what one teacher-forced pass over a logged sequence yields ----------

# rank of a true token the drafter did not propose (or that lies past the log's end)
RANK_NONE = 1 << 30


@dataclass
class TeacherForced:
    """While a greedy drafter's proposals match the target, its context *is* the target's
    prefix, so one pass of the drafter over a logged sequence gives, at every step the
    loop could take, the rank of each true next token under each draft position.

    Indexing: the logged output is out[0..N-1] (out[0] comes from the prefill). At the
    step taken when m tokens have been emitted (root = out[m-1]), draft position i
    (1-based) is scored against the true token out[m+i-1]."""

    # [N, D] int64: ranks[m, i-1] = rank (0 = first choice) of out[m+i-1] under draft
    # position i at the step with m tokens emitted; RANK_NONE where it was not proposed
    # or lies past the end of the log. Row 0 is never used (out[0] is the prefill's).
    ranks: torch.Tensor
    # [N] how many chain positions the drafter would propose at step m when allowed
    # D (prompt lookup may find fewer or none); None: always D
    lengths: torch.Tensor | None = None
    # True when ranks order the drafter's whole distribution (trees can be scored);
    # False when the drafter proposes one token per position (ranks are 0 or RANK_NONE)
    ranked: bool = True
    hidden_source: str | None = None  # where the target hidden states came from, if used
    # True when the drafter never drafts past the tokens still allowed (it honours
    # ctx.max_tokens, as draft-model and prompt-lookup do); False when it always drafts
    # its whole shape: the walk must size the drafts as the loop would
    capped: bool = True
    # drafters that choose their tree per step (EAGLE-2's dynamic tree) rather than
    # filling a tree of ranks: what the loop would see at every step
    own_trees: OwnTrees | None = None

    @property
    def depth(self) -> int:
        return self.ranks.shape[1]


@dataclass
class OwnTrees:
    """Per step m (rows 0..N-1, row 0 unused, as in `TeacherForced.ranks`), the tree the
    drafter would propose when m tokens have been emitted: its node count, its depth, and
    how many of its nodes the logged continuation accepts (the longest path of true
    tokens out[m], out[m+1], ... in it; never past the log's end). Without `sizes_by_depth`
    such trees are not capped by the tokens still allowed (the drafter always drafts its
    whole tree); with it, the walk cuts a step's tree at the tokens still allowed, as a
    drafter that honours ctx.max_tokens does (TeacherForced.capped)."""

    sizes: torch.Tensor  # [N] int64
    depths: torch.Tensor  # [N] int64
    accepted: torch.Tensor  # [N] int64
    sizes_by_depth: torch.Tensor | None = None  # [N, D] int64: the tree's nodes at depth <= d + 1


# hidden(): the target's states (the drafter's taps) over prompt + output[:-1] ([P+N-1, H·len(taps)])
# and a description of where they came from ("log side file ...", "teacher-forced target forward")
HiddenProvider = Callable[[], tuple[torch.Tensor, str]]


def true_ranks(logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Rank of `true[t]` in `logits[t]` (ties break to the lower id, as greedy argmax does);
    RANK_NONE where true[t] < 0 (a token the drafter cannot propose)."""
    logits = logits.float()
    valid = true >= 0
    index = true.clamp(min=0)
    chosen = logits.gather(1, index[:, None])
    ids = torch.arange(logits.shape[1], device=logits.device)
    rank = (logits > chosen).sum(1) + ((logits == chosen) & (ids[None] < index[:, None])).sum(1)
    return torch.where(valid, rank, torch.full_like(rank, RANK_NONE)).long().cpu()


def context_only_ranks(output: torch.Tensor, depth: int, draft: Callable[[int], list[int]]) -> TeacherForced:
    """The teacher-forced pass of a drafter whose proposal is a function of the context alone
    (prompt lookup, n-gram tables): `draft(m)` is what it drafts, up to `depth` tokens, at the step
    taken with m tokens emitted (the context: prompt + output[:m]). Ranks are 0 where a drafted
    token is the logged one and RANK_NONE elsewhere (one token per position: ranked=False)."""
    logged, n_out = output.reshape(-1).tolist(), output.numel()
    ranks = torch.full((n_out, depth), RANK_NONE, dtype=torch.long)
    lengths = torch.zeros(n_out, dtype=torch.long)
    for m in range(1, n_out):
        drafted = draft(m)[:depth]
        lengths[m] = len(drafted)
        for i, token in enumerate(drafted[: n_out - m]):
            if token == logged[m + i]:
                ranks[m, i] = 0
    return TeacherForced(ranks, lengths, ranked=False)


def autoregressive_ranks(position_ranks: torch.Tensor, prompt_len: int, n_out: int, depth: int) -> torch.Tensor:
    """[N, depth] ranks for an autoregressive drafter from its per-position ranks.

    position_ranks[t] is the rank of sequence[t+1] given sequence[:t+1] (t = 0..P+N-2).
    Draft position i at step m continues the true prefix of length P+m+i-1, so its rank
    is position_ranks[P+m+i-2], i.e. the rank of out[m+i-1]."""
    of_output = position_ranks[prompt_len - 1 :]  # [N]: rank of out[j]
    padded = torch.cat([of_output, torch.full((depth,), RANK_NONE, dtype=torch.long)])
    return padded.unfold(0, depth, 1)[:n_out].clone()


# --- drafters ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRecipe:
    """How `specbench train` trains a drafter, declared by the drafter (a plugin's too): the
    function `(TrainConfig, target, overwrite, on_step) -> dict`, named `module:function` as an
    entry point is and imported only when training starts; its peak learning rate when --lr is
    not given; its own training options (a CommandConfig dataclass: `train` makes them flags,
    checks them, and hands them to the function as TrainConfig.options)."""

    function: str
    default_lr: float
    Options: type[CommandConfig] = CommandConfig


class Drafter:
    """Base class for drafters. Subclasses set `name`, `summary` and `Options`, and implement `propose`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[DrafterOptions]] = DrafterOptions
    drafts: ClassVar[Literal["chain", "tree"]] = "chain"
    taps: Taps = ()
    # the acceptance rule at temperature > 0 (None: speculative sampling, for chains)
    acceptance: AcceptanceRule | None = None
    recipe: ClassVar[TrainRecipe | None] = None  # how `specbench train` trains it; None: it is not trained
    # True when the draft at one position depends on the shape drafted (DFlash: the block's
    # positions attend to each other, so a shorter block drafts differently): simulate then
    # scores each shape with the teacher-forced pass of the drafter built for it
    drafts_depend_on_shape: ClassVar[bool] = False
    # True when it decodes at batch > 1 (--batch-size): each row runs on its own `fork`;
    # False: a run at batch > 1 refuses it in one line
    batches: ClassVar[bool] = False
    row: int | None = None  # the batch row of a fork; None: not a fork

    def __init__(self, target: Target, options: DrafterOptions | None = None) -> None:
        self.target = target
        self.options = options if options is not None else self.Options()

    @property
    def shape_dependent(self) -> bool:
        """Whether this drafter's drafts depend on the shape it drafts (`drafts_depend_on_shape`,
        or an option that makes them so: `pruned_per_step`): simulate then scores each shape with
        its own drafter."""
        return self.drafts_depend_on_shape or bool(self.pruned_per_step)

    @property
    def pruned_per_step(self) -> str:
        """What cuts this drafter's tree every step (an option; the fix `tune` names, which scores
        trees of ranks whole), or '' where nothing does."""
        return ""

    @classmethod
    def create(cls, target: Target, options: DrafterOptions) -> Drafter:
        """Build from the target and the parsed options (`cls.Options`)."""
        return cls(target, options)

    @classmethod
    def shape_spec(cls) -> OptionSpec | None:
        """The option that sets this drafter's draft shape (`Options.shape_option`), checked to be
        one: an int length for a chain drafter, text (a tree spec) for a tree drafter."""
        name = cls.Options.shape_option
        if name is None:
            return None
        spec = cls.Options.specs().get(name)
        wanted = int if cls.drafts == "chain" else str
        if spec is None or spec.type is not wanted:
            what = "not one of its options" if spec is None else f"a {spec.type.__name__} option"
            raise UserError(f"drafter '{cls.name}' names '{name}' its shape option ({cls.Options.__name__}.shape_option), which is {what}: "
                            f"a {cls.drafts} drafter's shape option must be a {wanted.__name__} option; fix the drafter")
        return spec

    @classmethod
    def build(cls, target: Target, **given: Any) -> Drafter:
        """`create` from option values given by name (text or typed), checked as `-o` checks them."""
        return cls.create(target, cls.Options.parse(cls.name, given))

    @property
    def max_draft_tokens(self) -> int:
        """The most tree nodes one proposal can hold (0: it never drafts)."""
        return 0

    def furthest_position(self, tokens: int, max_new_tokens: int) -> int:
        """The most positions a sequence of `tokens` that may emit `max_new_tokens` more can reach with
        this drafter: every new token, then the largest verify past them (the root and a whole
        proposal). Static KV caches, the target's and a draft's own, are sized for it."""
        return tokens + max_new_tokens + self.max_draft_tokens + 1

    @property
    def max_draft_depth(self) -> int:
        """The deepest node one proposal can hold (a chain's depth is its length)."""
        return self.max_draft_tokens

    def warm_up(self, max_positions: int | None = None) -> float:
        """Before a timed run: size the drafter's own static caches for sequences of up to
        `max_positions` and capture its CUDA graphs. Returns the ms spent capturing."""
        return 0.0

    def begin(self, prompt_tokens: torch.Tensor, prompt_hidden: torch.Tensor | None) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree:
        raise NotImplementedError

    def on_verified(self, outcome: VerifyOutcome) -> None:
        pass

    def fork(self, row: int) -> Drafter:
        """The drafter of batch row `row` (0..B-1; it decodes every sequence that row takes, each
        from `begin`): the same weights, its own per-sequence state. A shallow copy serves drafters
        whose `begin` replaces all of that state; a drafter holding state objects `begin` only
        resets (a static KV) overrides this, and one that batches its draft forwards keeps the
        row's state at index `row`."""
        clone = copy.copy(self)
        clone.row = row
        return clone

    def propose_rows(self, rows: list[Drafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """The trees of a batch's live rows (`rows`: this drafter's forks, one per context). Row by
        row here; a drafter that batches its draft forwards across rows overrides it."""
        return [row.propose(ctx) for row, ctx in zip(rows, contexts)]

    def teacher_forced(self, prompt: torch.Tensor, output: torch.Tensor, depth: int, hidden: HiddenProvider | None) -> TeacherForced:
        """Optional simulation hook: for a logged greedy sequence (prompt ids, the target's
        output ids), the rank of every true next token under each of `depth` draft
        positions at every step, from one pass over the sequence. `hidden()` yields the
        target's states (this drafter's taps) over prompt + output[:-1] for drafters that
        read them. Leave unimplemented to be simulated by step replay."""
        raise NotImplementedError

    @classmethod
    def has_teacher_forced(cls) -> bool:
        return cls.teacher_forced is not Drafter.teacher_forced

    def memory_model(self) -> tuple[int, int]:
        """(bytes of weights one draft pass reads, sequential draft passes per step),
        for the memory-bound speedup model (MBSU). Training-free drafters read none."""
        return 0, 0

    def describe(self) -> dict[str, Any]:
        """Facts about this drafter instance worth keeping in run.json (e.g. which files it loaded)."""
        return {}


class PlainDecoding(Drafter):
    """No draft: every step verifies the root alone. The baseline."""

    name = "plain"
    summary = "no drafter; one target forward per token (the baseline)"
    batches = True

    def propose(self, ctx: DraftContext) -> DraftTree:
        return DraftTree.empty(ctx.tokens.device)
