"""VocabTrim (Goel et al., 2025): a drafter LM head over only the N target
tokens generated most often.

The kept ids are counted from calibration text — by preference the target's
own generations (a run directory or a target log), else a workload's text —
and saved as a list (most frequent first) so runs can reuse it. A trimmed head
slices the LM-head rows (bias too) and maps its indices back to target ids.
Verification stays over the full vocabulary, so greedy decoding stays exact: a
target token outside the set can never be drafted and simply becomes the
correction token.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from specbench.checks import check_count
from specbench.errors import UserError
from specbench.files import atomic_write_text, jsonl_rows, read_text, write_lock

FORMAT = "specbench-vocab-trim/1"


def _run_sequences(directory: Path) -> list[list[int]]:
    """Output ids of a run's plain-decoding turns (the target's own generations)."""
    from specbench.records import BASELINE
    from specbench.store import RunStore

    _, turns = RunStore.open(directory).load()
    own = [t for t in turns if t.mode == BASELINE] or turns  # without a baseline the spec outputs are the target's too (greedy)
    return [list(t.output_ids) for t in own]


def _log_sequences(path: Path) -> list[list[int]]:
    """A JSONL target log: every row's generated ids (rows without them, like a header, are skipped)."""
    sequences = []

    def bad_line(number: int, why: str) -> None:
        raise UserError(f"{path}:{number}: {why}; --vocab-trim-from takes a run directory, a target log, a workload or an id list")

    for number, row in jsonl_rows(read_text(path, "target log").splitlines(), str(path), bad_line):
        for key in ("output_ids", "continuation_ids", "target_ids"):
            if isinstance(row.get(key), list):
                sequences.append([t for t in row[key] if isinstance(t, int) and not isinstance(t, bool)])
    if not any(sequences):
        raise UserError(f"{path}: no generated token ids found (expected 'output_ids' or 'continuation_ids' per row)")
    return sequences


def _workload_sequences(name: str, tokenizer) -> list[list[int]]:
    from specbench.workloads import load_workload

    if tokenizer is None:
        raise UserError("counting a workload's tokens needs the target's tokenizer")
    return [tokenizer(turn)["input_ids"] for prompt in load_workload(name) for turn in prompt.turns]


def token_sequences(source: str, tokenizer) -> tuple[list[list[int]], str]:
    """(token id sequences, what was read) from calibration text: a run directory or a target log
    (.jsonl), whose sequences are the target's own generations, or a workload (its prompts'
    turns, tokenised). VocabTrim counts tokens in them; plugin drafters may read them too."""
    path = Path(source)
    if path.is_dir():
        return _run_sequences(path), f"run {path}"
    if path.is_file() and path.suffix == ".jsonl":
        try:
            return _log_sequences(path), f"log {path}"
        except UserError:
            return _workload_sequences(source, tokenizer), f"workload {path}"
    return _workload_sequences(source, tokenizer), f"workload {source}"


def token_counts(source: str, tokenizer) -> tuple[Counter, str]:
    """(counts, what was counted) from a run directory, a target log (.jsonl) or a workload."""
    sequences, counted = token_sequences(source, tokenizer)
    return Counter(token for sequence in sequences for token in sequence), counted


def ranked_ids(counts: Counter, vocab_size: int) -> list[int]:
    """Every id, most frequent first; ties and unseen ids in ascending id order."""
    seen = sorted((i for i in counts if 0 <= i < vocab_size), key=lambda i: (-counts[i], i))
    seen_set = set(seen)
    return seen + [i for i in range(vocab_size) if i not in seen_set]


def build_id_list(source: str, out: Path, target: str, top: int | None = None) -> tuple[list[int], str, int]:
    """`specbench vocab-trim build`: count token frequencies in `source` once and save the ranked
    ids (the top `top`, default all) for `--vocab-trim-from`. (ids, what was counted, distinct tokens seen)."""
    from specbench.checks import check_output_file
    from specbench.targets.loading import load_config, load_tokenizer

    check_output_file(out, "--out", inputs=(source,))
    vocab_size = load_config(target).vocab_size
    check_count(top, "--top", maximum=vocab_size)
    tokenizer = load_tokenizer(target)
    if tokenizer is None:
        raise UserError(f"no tokenizer found for '{target}'; pass a target whose tokenizer is available locally")
    with write_lock(out):  # one writer of `out`: a second build into it is refused
        counts, counted = token_counts(source, tokenizer)
        ids = ranked_ids(counts, vocab_size)[:top]
        save_ids(out, ids, target, vocab_size, counted)
    return ids, counted, len(counts)


def save_ids(path: Path, ids: list[int], target: str, vocab_size: int, source: str) -> None:
    atomic_write_text(path, json.dumps({"format": FORMAT, "target": target, "vocab_size": vocab_size, "source": source, "ids": ids}) + "\n")


def load_ids(path: Path, vocab_size: int) -> tuple[list[int], str]:
    try:
        data = json.loads(read_text(path, "vocab-trim id list"))
        ids, fmt = data["ids"], data.get("format")
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a vocab-trim id list; make one with `specbench vocab-trim build`") from None
    if fmt != FORMAT or data.get("vocab_size") != vocab_size:
        raise UserError(f"{path} was built for a vocabulary of {data.get('vocab_size')} tokens, this target has {vocab_size}; rebuild it for this target")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids) \
            or len(set(ids)) != len(ids) or not ids:
        raise UserError(f"{path}: 'ids' must be distinct token ids in 0..{vocab_size - 1}; rebuild it with `specbench vocab-trim build`")
    return ids, data.get("source", str(path))


def keep_ids(top: int | None, source: str, tokenizer, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """The kept ids (ascending) and a description for the run record."""
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        ranked, counted = load_ids(path, vocab_size)
    else:
        counts, counted = token_counts(source, tokenizer)
        ranked = ranked_ids(counts, vocab_size)
    top = len(ranked) if top is None else check_count(top, "--vocab-trim", maximum=min(vocab_size, len(ranked)))
    kept = sorted(ranked[:top])
    digest = hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16]
    return torch.tensor(kept), {"vocab_trim": top, "counted_from": counted, "ids_sha256": digest}


# A drafter head over part of the vocabulary (a VocabTrim cut, EAGLE-3's draft vocabulary) is
# described by one mapping, named `head_ids` wherever it is held: the target id of each head row.
# The functions below are the two directions of that mapping.


def asked_trim(options, target) -> tuple[torch.Tensor, dict] | None:
    """The ids a drafter's VocabTrim options (engine.options.VocabTrimOptions) keep for `target`
    and their description for run.json; None when no VocabTrim is asked."""
    if not options.vocab_trim_from or options.vocab_trim == 0:  # 0: none, whatever a catalogue entry says
        return None
    return keep_ids(options.vocab_trim, options.vocab_trim_from, target.tokenizer, target.vocab_size)


class TrimmedHead(nn.Module):
    """An LM head restricted to the rows `head_ids`: forward() gives logits over them, row i
    standing for target id head_ids[i]."""

    packs_as_linear = True  # forward is F.linear over weight and bias: engine/packed.py packs it as one

    def __init__(self, head: nn.Linear, head_ids: torch.Tensor) -> None:
        super().__init__()
        head_ids = head_ids.to(head.weight.device)
        self.register_buffer("head_ids", head_ids)
        self.vocab_size = head.weight.shape[0]
        self.weight = nn.Parameter(head.weight.detach()[head_ids].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = nn.Parameter(bias.detach()[head_ids].clone(), requires_grad=False) if bias is not None else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)

    def to_vocab_probs(self, probs: torch.Tensor) -> torch.Tensor:
        return to_vocab_probs(probs, self.head_ids, self.vocab_size)


def head_rows(tokens: torch.Tensor, head_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each target id's row in the head, -1 for a token the head cannot draft (simulation ranks
    true tokens in the head's row space)."""
    lookup = torch.full((vocab_size,), -1, dtype=torch.long, device=head_ids.device)
    lookup[head_ids] = torch.arange(head_ids.numel(), device=head_ids.device)
    return lookup[tokens.to(head_ids.device)].to(tokens.device)


def to_vocab_probs(probs: torch.Tensor, head_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Probabilities over the head's rows → over the full vocabulary, 0 outside the head."""
    full = probs.new_zeros(*probs.shape[:-1], vocab_size)
    return full.index_copy_(-1, head_ids, probs)
