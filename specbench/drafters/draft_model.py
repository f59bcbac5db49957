"""`draft-model`: an independent small causal LM that drafts a chain of k tokens.

The draft keeps its own KV cache across steps. Before drafting it compares its
cached tokens with the current sequence and rolls the cache back to their
common prefix, so accepted tokens are never re-prefilled and rejected ones
never linger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from specbench.catalogue import catalogue
from specbench.drafters.catalogued import catalogued_setting, catalogued_trim
from specbench.drafters.vocab_trim import TrimmedHead, asked_trim, head_rows
from specbench.engine import kv
from specbench.engine.acceptance import sample
from specbench.engine.compat import cache_kwargs
from specbench.engine.options import ChainOptions, CommandConfig, VocabTrimOptions, option
from specbench.engine.protocol import (
    DraftContext,
    Drafter,
    FastEngineTarget,
    TrainRecipe,
    TeacherForced,
    autoregressive_ranks,
    true_ranks,
)
from specbench.engine.static_cache import RowsDecoder, StaticDecoder
from specbench.engine.kv import StaticKV
from specbench.engine.lean_layer import step_modules
from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.targets.fast import check_full_attention
from specbench.targets.hf import forward_bytes


def check_same_vocabulary(target, draft_model, draft_tokenizer, draft_name: str) -> None:
    target_tok = target.tokenizer
    if target_tok is not None and draft_tokenizer is not None:
        if target_tok.get_vocab() != draft_tokenizer.get_vocab():
            raise UserError(
                f"vocabulary mismatch: draft '{draft_name}' ({len(draft_tokenizer)} tokens) and target "
                f"'{target.name}' ({len(target_tok)} tokens) use different tokenizers; pick a draft "
                "model trained with the target's tokenizer"
            )
    rows = draft_model.get_output_embeddings().weight.shape[0]
    if rows != target.vocab_size:
        raise UserError(
            f"vocabulary mismatch: draft '{draft_name}' predicts {rows} token ids, target "
            f"'{target.name}' {target.vocab_size}; pick a draft model with the target's vocabulary"
        )


def default_draft_model(target_name: str) -> str | None:
    """The draft alias the catalogue names as the default for this target (`default_for`), if any."""
    for alias, entry in catalogue("draft_models").items():
        if target_name in entry.get("default_for", []):
            return alias
    return None


def common_prefix(cached: list[int], sequence: list[int]) -> int:
    """How many of the draft's cached tokens still agree with `sequence`; the root (its last
    token) is never counted, so there is always at least one token to feed."""
    common = 0
    for a, b in zip(cached, sequence[:-1]):
        if a != b:
            break
        common += 1
    return common


DEFAULT_K = 4  # the chain DSD and Spec-Bench's SpS draft


@dataclass
class DraftModelOptions(ChainOptions, VocabTrimOptions):
    draft_model: str | None = option(None, "the draft: alias (catalogue/draft_models.toml), hub id or local directory; default from the catalogue")
    k: int | None = option(None, f"tokens drafted per step (default: the catalogue's for its default draft on this device, else {DEFAULT_K})",
                           min=1)


@dataclass
class DraftModelTraining(CommandConfig):
    """`specbench train --drafter draft-model`'s own options."""

    layers: int = option(1, "draft-model: how many of the target's first layers the draft keeps", min=1)
    k: int = option(4, "draft-model: chain length the acceptance estimate assumes", min=1)


class DraftModelDrafter(Drafter):
    name = "draft-model"
    recipe = TrainRecipe("specbench.train.draft:train_draft_model", 1e-3, DraftModelTraining)
    summary = "independent small LM sharing the target's vocabulary (DSD/Sheared-LLaMA style); a chain of k tokens"
    Options = DraftModelOptions
    batches = True  # one draft forward per draft position for every row (propose_rows)

    def __init__(self, target, model, k: int = 4, tokenizer=None, model_name: str = "", trim: TrimmedHead | None = None, trim_info: dict | None = None) -> None:
        super().__init__(target, DraftModelOptions(k=k))
        self.k = k
        self.model = model
        self.model_name = model_name or type(model).__name__
        check_same_vocabulary(target, model, tokenizer, self.model_name)
        self.backbone = model.get_decoder()
        self.trim = trim  # VocabTrim: a head over the kept ids only
        self.head = trim if trim is not None else model.get_output_embeddings()
        self.trim_info = trim_info or {}
        self.device = next(model.parameters()).device
        self.fast: StaticDecoder | None = None  # the target's engine: fast = a static cache (CUDA graphs on CUDA)
        if target.engine == "fast":
            check_full_attention(model, self.model_name)
            dtype = next(model.parameters()).dtype
            fast_target: FastEngineTarget = target  # the contract a fast-engine target keeps (engine/protocol.py)
            self.fast = fast_target.static_decoder(self.backbone, self.head, self.device, dtype)
        self.cache: DynamicCache | StaticKV | None = self.fast.cache if self.fast else None
        self.cached: list[int] = []  # the tokens whose KV is in self.cache (a fork's: in its row of rows_decoder)
        self.rows_decoder: RowsDecoder | None = None  # batch > 1: every fork's KV, one row each
        self.rows_modules: tuple | None = None  # the backbone and head the rows decoder runs (packed on a CPU)

    @classmethod
    def create(cls, target, options: DraftModelOptions) -> DraftModelDrafter:
        draft_model = options.draft_model or default_draft_model(target.name)
        if not draft_model:
            raise UserError("drafter 'draft-model' needs --draft-model ID|ALIAS|PATH (e.g. --draft-model sheared-796m)")
        from specbench.targets.loading import load_causal_lm

        model, tokenizer, source = load_causal_lm(draft_model, target.device, target.dtype, table="draft_models")
        # the catalogue's default draft drafts with its entry's VocabTrim and k for this device; a draft named is not
        entry = catalogue("draft_models")[draft_model] if options.draft_model is None else {}
        options = catalogued_trim(entry, target, options)
        k = catalogued_setting(entry, target, "k", options.k, DEFAULT_K)
        trim, trim_info = None, None
        if asked := asked_trim(options, target):
            kept, trim_info = asked
            trim = TrimmedHead(model.get_output_embeddings(), kept)
        return cls(target, model, k=k, tokenizer=tokenizer, model_name=source.model_id, trim=trim, trim_info=trim_info)

    @property
    def max_draft_tokens(self) -> int:
        return self.k


    def warm_up(self, max_positions: int | None = None) -> float:
        """Size the draft's static cache and capture its feeds' buckets (1..k+1 tokens)."""
        if self.fast is None:
            return 0.0
        return self.fast.warm_up(self.k + 1, (), max_positions)

    def memory_model(self) -> tuple[int, int]:
        return forward_bytes(self.model, self.trim), self.k  # k sequential forwards per step

    def describe(self) -> dict:
        return {"draft_model": self.model_name, **self.trim_info}

    def fork(self, row: int) -> DraftModelDrafter:
        """A row's draft: its KV is row `row` of this drafter's RowsDecoder (propose_rows). The fast
        engine's static draft cache holds one sequence, so batches run the draft on a RowsDecoder of
        its own (prepacked on a CPU, as the batch target is)."""
        if self.fast is not None:
            raise UserError("draft-model at --batch-size > 1 runs its draft on the eager engine: use --engine eager")
        clone = super().fork(row)
        clone.cached = []
        return clone

    def _rows_decoder(self, rows: int) -> RowsDecoder:
        """The draft over a RowsKV of at least `rows` rows, shared by this drafter's forks."""
        if self.rows_decoder is None or self.rows_decoder.cache.rows < rows:
            dtype = next(self.model.parameters()).dtype
            if self.rows_modules is None:  # the kernels the batch target runs (targets/batched.py)
                self.rows_modules = step_modules(self.backbone, self.head, self.device, dtype)[:2]
            self.rows_decoder = RowsDecoder(*self.rows_modules, rows, self.device, dtype)
        return self.rows_decoder

    @torch.inference_mode()
    def propose_rows(self, rows: list[DraftModelDrafter], contexts: list[DraftContext]) -> list[DraftTree]:
        """Every live row's chain with one draft forward per draft position for all rows (each
        row rolled back to its own common prefix, fed at its own length)."""
        if any(row.row is None for row in rows):  # batch 1: the drafter itself, row by row
            return super().propose_rows(rows, contexts)
        decoder = self._rows_decoder(max(row.row for row in rows) + 1)
        feeds = []
        for row, ctx in zip(rows, contexts):
            sequence = ctx.tokens.tolist()
            common = common_prefix(row.cached, sequence)
            del row.cached[common:]
            decoder.cache.lengths[row.row] = common
            if common == 0:  # a new sequence: size the rows before its first feed
                decoder.plan(self.furthest_position(len(sequence), ctx.max_tokens))
            feeds.append(sequence[common:])
        ks = [min(self.k, ctx.max_tokens) for ctx in contexts]
        drafted: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        live = list(range(len(rows)))
        while live:
            logits = self._feed_rows(decoder, [rows[j] for j in live], [feeds[j] for j in live])
            for j, row_logits in zip(live, logits):
                ctx = contexts[j]
                if ctx.temperature > 0:
                    q = torch.softmax(row_logits / ctx.temperature, dim=-1)
                    index = sample(q, ctx.generator)
                    probs[j].append(self.trim.to_vocab_probs(q) if self.trim is not None else q)
                else:
                    index = int(row_logits.argmax())
                drafted[j].append(int(self.trim.head_ids[index]) if self.trim is not None else index)
                feeds[j] = [drafted[j][-1]]
            live = [j for j in live if len(drafted[j]) < ks[j]]  # the last draft token's successor is never needed
        return [DraftTree.chain(torch.tensor(d, device=ctx.tokens.device), torch.stack(p) if p else None)
                for d, p, ctx in zip(drafted, probs, contexts)]

    def _feed_rows(self, decoder: RowsDecoder, rows: list[DraftModelDrafter], feeds: list[list[int]]) -> list[torch.Tensor]:
        """Feed each row its tokens after what it has cached, in one forward; each row's logits at its last token."""
        ids = [torch.tensor(feed, device=self.device) for feed in feeds]
        logits, _ = decoder.forward([row.row for row in rows], ids, [None] * len(rows))
        for row, feed in zip(rows, feeds):
            decoder.cache.lengths[row.row] += len(feed)
            row.cached.extend(feed)
        return [row_logits[-1] for row_logits in logits]

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        if self.fast:
            self.cache.truncate(0)
        else:
            self.cache = DynamicCache(config=self.model.config)
        self.cached = []

    @torch.inference_mode()
    def _logits(self, new_tokens: list[int]) -> torch.Tensor:
        """Feed tokens after self.cached and return the head's logits at the last one
        (over the kept ids when trimmed)."""
        ids = torch.tensor([new_tokens], device=self.device)
        if self.fast:
            logits = self.fast.forward(ids[0])[0][-1]  # the decoder runs the head (inside its graph)
            self.cache.length += len(new_tokens)
        else:
            positions = torch.arange(len(self.cached), len(self.cached) + len(new_tokens), device=self.device)
            out = self.backbone(input_ids=ids, position_ids=positions[None], use_cache=True, **cache_kwargs(self.backbone, self.cache))
            logits = self.head(out.last_hidden_state[0, -1]).float()
        self.cached.extend(new_tokens)
        return logits

    def propose(self, ctx: DraftContext) -> DraftTree:
        sequence = ctx.tokens.tolist()
        common = common_prefix(self.cached, sequence)
        kv.truncate(self.cache, common)
        del self.cached[common:]
        if self.fast and common == 0:  # a new sequence: size the static cache before its first feed
            self.fast.plan(self.furthest_position(len(sequence), ctx.max_tokens))

        k = min(self.k, ctx.max_tokens)
        logits = self._logits(sequence[common:])
        drafted, probs = [], []
        for i in range(k):
            if ctx.temperature > 0:
                q = torch.softmax(logits / ctx.temperature, dim=-1)
                index = sample(q, ctx.generator)
                probs.append(self.trim.to_vocab_probs(q) if self.trim is not None else q)
            else:
                index = int(logits.argmax())
            token = int(self.trim.head_ids[index]) if self.trim is not None else index
            drafted.append(token)
            if i + 1 < k:  # the last draft token's successor is never needed
                logits = self._logits([token])
        tokens = torch.tensor(drafted, device=ctx.tokens.device)
        return DraftTree.chain(tokens, torch.stack(probs) if probs else None)

    @torch.inference_mode()
    def teacher_forced(self, prompt, output, depth, hidden=None):
        """One forward of the draft model over prompt + output: the rank of each true
        next token under the draft's (possibly trimmed) head, shifted per draft position."""
        sequence = torch.cat([prompt.reshape(-1), output.reshape(-1)]).to(self.device)
        positions = torch.arange(sequence.numel() - 1, device=self.device)
        out = self.backbone(input_ids=sequence[None, :-1], position_ids=positions[None], use_cache=False)
        logits = self.head(out.last_hidden_state[0])
        true = sequence[1:]
        if self.trim is not None:
            true = head_rows(true, self.trim.head_ids, self.trim.vocab_size)
        ranks = true_ranks(logits, true)
        return TeacherForced(autoregressive_ranks(ranks, prompt.numel(), output.numel(), depth))
