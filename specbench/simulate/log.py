"""The target log: what `specbench record` writes and `specbench simulate` reads.

A versioned JSONL file:
- line 1, the header: {"format": "specbench-target-log", "version": 1, target,
  target_id, tokenizer, vocab_size, dtype, device, max_new_tokens, temperature,
  eos_token_ids, workload, workload_hash, topk, hidden_file, hidden_size,
  target_forward_bytes, created, environment, source}
- optionally {"type": "profile", ...}: the target's verify latency, ms per
  forward of n tokens (n = 1, 2, ...) over a context of `context_tokens`.
- one {"type": "turn", ...} per prompt and turn: prompt_id, turn, category,
  prompt_ids, output_ids (the target's greedy continuation; out[0] is the
  prefill's token), wall_ms and ttft_ms of the recording, and with --topk N
  topk_ids / topk_logprobs per output position (the distribution out[j] was
  chosen from).
The hidden states (--hidden, --hidden-taps) go to a safetensors side file next
to the log, over prompt + output[:-1] ([P+N-1, H] per tensor): keyed
"<prompt_id>#<turn>" the target's final (normed) hidden states, keyed
"<prompt_id>#<turn>@<j>" the hidden state entering decoder layer j (what EAGLE-3
drafts fuse). The header's `hidden_taps` lists what the side file holds (null for
the final states); logs written before it existed hold the final states only.
"""

from __future__ import annotations

import glob
import json
import math
import re
import uuid
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specbench.errors import UserError
from specbench.files import atomic_write, atomic_write_text, first_line, jsonl_rows, read_text, reading_weights

FORMAT = "specbench-target-log"
VERSION = 1


@dataclass
class LogHeader:
    target: str
    target_id: str
    tokenizer: str | None
    vocab_size: int
    dtype: str
    device: str
    max_new_tokens: int
    eos_token_ids: list[int]
    workload: str
    workload_hash: str
    temperature: float = 0.0
    topk: int | None = None
    hidden_file: str | None = None
    hidden_size: int | None = None
    hidden_taps: list[int | None] | None = None  # what the side file holds: None = final states, j = input of layer j
    num_layers: int | None = None  # the target's decoder layers (drafters that tap layers need it)
    target_forward_bytes: int | None = None
    created: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    source: str = "specbench record"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}


@dataclass
class VerifyProfile:
    """Target forward latency by tokens per forward: ms[n-1] for n tokens."""

    context_tokens: int
    ms: list[float]
    device_name: str = ""
    repeats: int = 1
    note: str = ""  # how it was obtained when not by `specbench profile` here (e.g. measured elsewhere, interpolated)
    # t(B, n) for B > 1 (`profile --batch`): batch_ms[str(B)][n-1] = ms of one forward of B rows, each verifying n
    # tokens, on the batch engine a run at --batch-size B uses (docs/batch.md); `ms` is t(1, n)
    batch_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def batch_sizes(self) -> list[int]:
        return [1, *sorted(int(b) for b in self.batch_ms)]

    def at_batch(self, rows: int, where: str = "the profile") -> VerifyProfile:
        """The profile of forwards of `rows` rows (t(rows, ·)), refused in one line where it was not measured."""
        if rows == 1:
            return self
        if str(rows) not in self.batch_ms:
            raise UserError(f"{where} has no forwards of {rows} rows (it has batch sizes {', '.join(map(str, self.batch_sizes))}): "
                            f"measure them with `specbench profile --batch 1,{rows}`")
        return VerifyProfile(self.context_tokens, self.batch_ms[str(rows)], self.device_name, self.repeats,
                             f"{rows} rows per forward" + (f"; {self.note}" if self.note else ""))

    def verify_ms(self, tokens: int) -> float:
        """ms for a forward of `tokens` tokens; linear beyond the measured range."""
        if tokens <= len(self.ms):
            return self.ms[tokens - 1]
        if len(self.ms) < 2:
            return self.ms[-1] * tokens
        slope = (self.ms[-1] - self.ms[-2])
        return self.ms[-1] + slope * (tokens - len(self.ms))

    def to_json(self) -> dict[str, Any]:
        row = {"type": "profile", **asdict(self)}
        if not self.batch_ms:  # a batch-1 profile is written as before batches existed
            del row["batch_ms"]
        return row


@dataclass
class LogTurn:
    prompt_id: str
    turn: int
    category: str
    prompt_ids: list[int]
    output_ids: list[int]
    wall_ms: float | None = None
    ttft_ms: float | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None

    @property
    def key(self) -> str:
        return f"{self.prompt_id}#{self.turn}"

    def to_json(self) -> dict[str, Any]:
        row = {"type": "turn", **asdict(self)}
        if self.topk_ids is None:
            del row["topk_ids"], row["topk_logprobs"]
        return row


@dataclass
class TargetLog:
    path: Path
    header: LogHeader
    turns: list[LogTurn]
    profile: VerifyProfile | None = None

    @property
    def hidden_path(self) -> Path | None:
        return self.path.parent / self.header.hidden_file if self.header.hidden_file else None

    @property
    def recorded_taps(self) -> tuple[int | None, ...]:
        """The hidden states the side file holds (None = the final states), in the drafter's `taps` terms."""
        if not self.header.hidden_file:
            return ()
        return tuple(self.header.hidden_taps) if self.header.hidden_taps is not None else (None,)

    def hidden(self, turn: LogTurn, taps: tuple[int | None, ...] = (None,)) -> torch.Tensor:
        """The recorded states of `taps`, concatenated in that order ([P+N-1, H·len(taps)])."""
        from safetensors import safe_open

        path = self.hidden_path
        if path is None or not path.exists():
            raise UserError(f"{self.path}: its hidden-state side file {path} is missing; record again with --hidden")
        with reading_weights(path, "hidden-state side file"), safe_open(str(path), framework="pt") as f:
            recording = (f.metadata() or {}).get("recording")
            if recording is not None and not path.name.endswith(f".{recording}.hidden.safetensors"):
                raise UserError(f"{path} belongs to another recording than {self.path} (a file copied or renamed between "
                                "logs); record again with --hidden")
            keys = set(f.keys())
            parts = []
            for tap in taps:
                key = hidden_key(turn.key, tap)
                if key not in keys:
                    what = "hidden states" if tap is None else f"hidden states entering layer {tap}"
                    raise UserError(f"{path} holds no {what} for prompt {turn.prompt_id} turn {turn.turn}; record again with --hidden / --hidden-taps")
                parts.append(f.get_tensor(key))
        rows = len(turn.prompt_ids) + len(turn.output_ids) - 1
        if any(part.shape[0] != rows for part in parts):  # states of another recording of this prompt
            raise UserError(f"{path} holds {parts[0].shape[0]} rows of hidden states for prompt {turn.prompt_id} turn {turn.turn}, "
                            f"whose {rows} positions the log records: it belongs to another recording; record again with --hidden")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def hidden_key(turn_key: str, tap: int | None) -> str:
    """The side file's key of one turn's final states (tap None) or of the input of layer `tap`."""
    return turn_key if tap is None else f"{turn_key}@{tap}"


def hidden_file_for(log_path: Path, tag: str = "") -> Path:
    """The side file of a log; `tag` tells apart the files of successive recordings to one path."""
    return log_path.with_name(log_path.stem + (f".{tag}" if tag else "") + ".hidden.safetensors")


def write_log(path: Path, header: LogHeader, turns: list[LogTurn], profile: VerifyProfile | None = None,
              hidden_rows: dict | None = None) -> None:
    """Write a log (and its hidden-state side file) so that a kill at any point leaves either the
    old log, whole, or the new one, whole: the side file gets a name of its own, the log is renamed
    into place last (that rename is the commit), and only then is the old side file removed."""
    path = Path(path)
    old_side = _side_file_of(path)
    if hidden_rows is not None:
        from safetensors.torch import save_file

        tag = uuid.uuid4().hex[:8]
        side = hidden_file_for(path, tag)
        # the side file names the recording it belongs to (its header), which the reader checks against the log's
        atomic_write(side, lambda tmp: save_file(hidden_rows, str(tmp), metadata={"recording": tag}))
        header.hidden_file = side.name
    lines = [header.to_json()] + ([profile.to_json()] if profile else []) + [t.to_json() for t in turns]
    try:
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in lines))
    except BaseException:
        if hidden_rows is not None:
            (path.parent / header.hidden_file).unlink(missing_ok=True)
        raise
    if old_side is not None and old_side.name != header.hidden_file:
        old_side.unlink(missing_ok=True)
    for stray in path.parent.glob(f"{glob.escape(path.stem)}.*.hidden.safetensors"):  # a recording killed before its commit
        if stray.name != header.hidden_file and re.fullmatch(r"[0-9a-f]{8}", stray.name[len(path.stem) + 1 : -len(".hidden.safetensors")]):
            stray.unlink(missing_ok=True)


def _side_file_of(path: Path) -> Path | None:
    """The side file an existing log at `path` names (None when there is no such log or it names none)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
        name = header.get("hidden_file") if isinstance(header, dict) and header.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None
    if not isinstance(name, str) or Path(name).name != name:
        return None  # only ever a file beside the log
    return path.parent / name


def _check_ids(where: str, name: str, value, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UserError(f"{where}: '{name}' must be a list of integer token ids")
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UserError(f"{where}: token id {bad} in '{name}' is outside the vocabulary (0..{vocab_size - 1})")
    return value


def _fields(cls, row: dict, where: str, what: str) -> dict:
    names = cls.__dataclass_fields__
    required = [n for n, f in names.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in row]
    if missing:
        raise UserError(f"{where}: {what} lacks {', '.join(missing)}")
    return {k: v for k, v in row.items() if k in names}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_header(header: LogHeader, where: str) -> None:
    if not isinstance(header.target, str) or not isinstance(header.target_id, str):
        raise UserError(f"{where}: header 'target' and 'target_id' must be text")
    if not isinstance(header.eos_token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in header.eos_token_ids):
        raise UserError(f"{where}: header 'eos_token_ids' must be a list of integer token ids")
    if header.hidden_file is not None and (not isinstance(header.hidden_file, str) or Path(header.hidden_file).name != header.hidden_file):
        raise UserError(f"{where}: header 'hidden_file' must name a file beside the log")
    for name in ("hidden_size", "topk", "target_forward_bytes"):
        value = getattr(header, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{where}: header '{name}' must be a positive integer or null")
    if not _number(header.temperature) or header.temperature < 0:
        raise UserError(f"{where}: header 'temperature' must be a number >= 0")


def _check_profile(profile: VerifyProfile, where: str) -> None:
    if not isinstance(profile.ms, list) or not profile.ms or not all(_number(x) and x > 0 for x in profile.ms):
        raise UserError(f"{where}: profile 'ms' must be a non-empty list of positive numbers")
    if not isinstance(profile.context_tokens, int) or isinstance(profile.context_tokens, bool) or profile.context_tokens < 1:
        raise UserError(f"{where}: profile 'context_tokens' must be a positive integer")
    if not isinstance(profile.batch_ms, dict) or not all(
            isinstance(b, str) and b.isdigit() and int(b) > 1 and isinstance(ms, list) and ms and all(_number(x) and x > 0 for x in ms)
            for b, ms in profile.batch_ms.items()):
        raise UserError(f"{where}: profile 'batch_ms' must map batch sizes > 1 to non-empty lists of positive numbers")


def _check_turn(turn: LogTurn, where: str) -> None:
    if not isinstance(turn.prompt_id, (str, int)) or isinstance(turn.prompt_id, bool):
        raise UserError(f"{where}: 'prompt_id' must be text")
    turn.prompt_id = str(turn.prompt_id)
    if not isinstance(turn.turn, int) or isinstance(turn.turn, bool) or turn.turn < 0:
        raise UserError(f"{where}: 'turn' must be an integer >= 0")
    turn.category = str(turn.category)
    for name in ("wall_ms", "ttft_ms"):
        value = getattr(turn, name)
        if value is not None and (not _number(value) or value < 0):
            raise UserError(f"{where}: '{name}' must be a number >= 0 or null")


def read_log(path: Path) -> TargetLog:
    """Read and validate a target log; any malformed line is one UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"target log {path} does not exist; write one with `specbench record`")
    header, profile, turns, seen = None, None, [], set()
    lines = read_text(path, "target log").splitlines()

    def bad_line(number: int, why: str) -> None:
        where = f"{path}:{number}"
        if header is None and lines[number - 1].lstrip().startswith("tensor("):
            raise UserError(
                f"{path} is a DSD target log (tensor dumps, no prompts): pass --prompts PROMPTS.jsonl "
                "(its prompts, matched by order) and --target NAME, or convert it with `specbench convert-log`"
            )
        if header is None:
            raise UserError(f"{where}: not a specbench target log ({why}); write one with `specbench record`")
        raise UserError(f"{where}: {why}; the log is corrupt or truncated")

    for number, row in jsonl_rows(lines, str(path), bad_line):
        where = f"{path}:{number}"
        if header is None:
            if row.get("format") != FORMAT:
                raise UserError(f"{where}: not a specbench target log (no \"format\": \"{FORMAT}\" header); DSD logs: use --prompts or `specbench convert-log`")
            version = row.get("version")
            if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
                raise UserError(f"{where}: target log version {version} was written by a newer specbench (this one reads version {VERSION}); upgrade specbench to read it")
            if version != VERSION:
                raise UserError(f"{where}: target log version {version!r} is not supported (this specbench reads version {VERSION})")
            try:
                header = LogHeader(**_fields(LogHeader, row, where, "the header"))
            except TypeError as exc:
                raise UserError(f"{where}: malformed header ({exc})") from None
            if not isinstance(header.vocab_size, int) or header.vocab_size < 1:
                raise UserError(f"{where}: header 'vocab_size' must be a positive integer")
            if not isinstance(header.max_new_tokens, int) or header.max_new_tokens < 1:
                raise UserError(f"{where}: header 'max_new_tokens' must be a positive integer")
            _check_header(header, where)
            continue
        kind = row.get("type")
        if kind == "profile":
            try:
                profile = VerifyProfile(**_fields(VerifyProfile, row, where, "the profile"))
            except TypeError as exc:
                raise UserError(f"{where}: malformed profile ({exc})") from None
            _check_profile(profile, where)
        elif kind == "turn":
            turn = LogTurn(**_fields(LogTurn, row, where, "the turn record"))
            _check_turn(turn, where)
            _check_ids(where, "prompt_ids", turn.prompt_ids, header.vocab_size)
            _check_ids(where, "output_ids", turn.output_ids, header.vocab_size)
            if not turn.prompt_ids or not turn.output_ids:
                raise UserError(f"{where}: 'prompt_ids' and 'output_ids' must not be empty")
            if len(turn.output_ids) > header.max_new_tokens:
                raise UserError(f"{where}: {len(turn.output_ids)} output ids exceed the header's max_new_tokens {header.max_new_tokens}")
            if turn.topk_ids is not None and len(turn.topk_ids) != len(turn.output_ids):
                raise UserError(f"{where}: 'topk_ids' has {len(turn.topk_ids)} rows for {len(turn.output_ids)} output ids")
            if (turn.prompt_id, turn.turn) in seen:
                raise UserError(f"{where}: prompt {turn.prompt_id} turn {turn.turn} appears twice")
            seen.add((turn.prompt_id, turn.turn))
            turns.append(turn)
        else:
            raise UserError(f"{where}: unknown record type {kind!r} (expected 'turn' or 'profile')")
    if header is None:
        raise UserError(f"{path}: empty target log")
    if not turns:
        raise UserError(f"{path}: the log holds no turns")
    return TargetLog(path, header, turns, profile)


def read_profile(path: Path) -> VerifyProfile:
    """A profile written by `specbench profile --out FILE` (or the profile line of a log)."""
    try:
        row = json.loads(read_text(path, "profile"))
        row.pop("type", None)
        profile = VerifyProfile(**row)
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a verify-latency profile ({first_line(exc)}); write one with `specbench profile --out FILE`") from None
    _check_profile(profile, str(path))
    return profile
