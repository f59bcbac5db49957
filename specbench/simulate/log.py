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

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specbench.errors import UserError

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

    def verify_ms(self, tokens: int) -> float:
        """ms for a forward of `tokens` tokens; linear beyond the measured range."""
        if tokens <= len(self.ms):
            return self.ms[tokens - 1]
        if len(self.ms) < 2:
            return self.ms[-1] * tokens
        slope = (self.ms[-1] - self.ms[-2])
        return self.ms[-1] + slope * (tokens - len(self.ms))

    def to_json(self) -> dict[str, Any]:
        return {"type": "profile", **asdict(self)}


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
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            parts = []
            for tap in taps:
                key = hidden_key(turn.key, tap)
                if key not in keys:
                    what = "hidden states" if tap is None else f"hidden states entering layer {tap}"
                    raise UserError(f"{path} holds no {what} for prompt {turn.prompt_id} turn {turn.turn}; record again with --hidden / --hidden-taps")
                parts.append(f.get_tensor(key))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def hidden_key(turn_key: str, tap: int | None) -> str:
    """The side file's key of one turn's final states (tap None) or of the input of layer `tap`."""
    return turn_key if tap is None else f"{turn_key}@{tap}"


def hidden_file_for(log_path: Path) -> Path:
    return log_path.with_name(log_path.stem + ".hidden.safetensors")


def write_log(path: Path, header: LogHeader, turns: list[LogTurn], profile: VerifyProfile | None = None) -> None:
    lines = [header.to_json()] + ([profile.to_json()] if profile else []) + [t.to_json() for t in turns]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in lines))
    tmp.replace(path)


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


def read_log(path: Path) -> TargetLog:
    """Read and validate a target log; any malformed line is one UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"target log {path} does not exist; write one with `specbench record`")
    header, profile, turns, seen = None, None, [], set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg}); the log is corrupt or truncated") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object per line")
            if header is None:
                if row.get("format") != FORMAT:
                    raise UserError(f"{where}: not a specbench target log (no \"format\": \"{FORMAT}\" header); DSD logs: use --prompts or `specbench convert-log`")
                if row.get("version") != VERSION:
                    raise UserError(f"{where}: target log version {row.get('version')} is not supported (this specbench reads version {VERSION})")
                try:
                    header = LogHeader(**_fields(LogHeader, row, where, "the header"))
                except TypeError as exc:
                    raise UserError(f"{where}: malformed header ({exc})") from None
                if not isinstance(header.vocab_size, int) or header.vocab_size < 1:
                    raise UserError(f"{where}: header 'vocab_size' must be a positive integer")
                if not isinstance(header.max_new_tokens, int) or header.max_new_tokens < 1:
                    raise UserError(f"{where}: header 'max_new_tokens' must be a positive integer")
                continue
            kind = row.get("type")
            if kind == "profile":
                try:
                    profile = VerifyProfile(**_fields(VerifyProfile, row, where, "the profile"))
                except TypeError as exc:
                    raise UserError(f"{where}: malformed profile ({exc})") from None
                if not profile.ms or not all(isinstance(x, (int, float)) and x > 0 for x in profile.ms):
                    raise UserError(f"{where}: profile 'ms' must be a non-empty list of positive numbers")
            elif kind == "turn":
                turn = LogTurn(**_fields(LogTurn, row, where, "the turn record"))
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
        row = json.loads(Path(path).read_text())
        row.pop("type", None)
        return VerifyProfile(**row)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{path}: not a verify-latency profile ({exc}); write one with `specbench profile --out FILE`") from None
