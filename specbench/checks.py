"""Checks on what a user gives, made before any work starts; each failure is one UserError
naming the flag and the fix.

- `check_count`: ONE rule for every count flag of every command (--limit, --max-new-tokens,
  --top, --latency-steps, --context-tokens, --repeats, ...): a whole number, at least
  `minimum` (1 unless said), at most `maximum` (a billion unless said: a count past that is
  a typo, and would overflow the tensors it sizes). Drafter options (--k, --vocab-trim, ...)
  follow the same rule through the bounds their options dataclass declares (engine/options.py).
- `check_number`: a finite float in a range (NaN and inf are never a temperature).
- `check_output_file` / `check_output_dir`: the place an output goes can be written, is of
  the right kind, and is not one of the command's inputs, before anything is computed.
- `context_window` / `tokens_at_least` / `check_fits`: a prompt past the model's context
  window is refused before prefill (specbench never truncates a prompt: the numbers would
  describe another workload), quickly even for a prompt of megabytes.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from specbench.errors import UserError

MAX_COUNT = 10**9


def check_count(value: int | None, flag: str, minimum: int = 1, maximum: int | None = None) -> int | None:
    """`value` if it is a whole number in [minimum, maximum]; None (flag not given) passes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{flag} takes a whole number (got {value!r})")
    top = MAX_COUNT if maximum is None else maximum
    if value < minimum:
        raise UserError(f"{flag} must be at least {minimum} (got {value})")
    if value > top:
        raise UserError(f"{flag} must be at most {top} (got {value})")
    return value


def check_number(value: float | None, flag: str, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None) -> float | None:
    """`value` if it is a finite number >= minimum (or > above) and <= maximum; None passes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{flag} takes a number (got {value!r})")
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number (got {value})")
    if minimum is not None and value < minimum:
        raise UserError(f"{flag} must be at least {minimum} (got {value})")
    if above is not None and value <= above:
        raise UserError(f"{flag} must be greater than {above} (got {value})")
    if maximum is not None and value > maximum:
        raise UserError(f"{flag} must be at most {maximum} (got {value})")
    return value


# below this, logits / temperature overflow (inf, then NaN probabilities) long before sampling
# differs from greedy decoding in any measurable way
MIN_TEMPERATURE = 1e-3


def check_temperature(value: float, flag: str = "--temperature") -> float:
    """0 (greedy) or a finite temperature of at least MIN_TEMPERATURE."""
    check_number(value, flag, minimum=0)
    if 0 < value < MIN_TEMPERATURE:
        raise UserError(f"{flag} {value:g} is too small to sample at (the logits divided by it overflow): use 0 for greedy "
                        f"decoding or at least {MIN_TEMPERATURE:g}")
    return value


# --- output paths ---------------------------------------------------------------------

def _writable_dir(directory: Path, flag: str, path: Path) -> None:
    """`directory` (existing) accepts new files: tried for real, so read-only mounts and
    permissions count as they will when the output is written (root included)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{flag} {path}: cannot write in {directory} ({reason}); choose a writable place") from None


def _nearest_existing(path: Path, flag: str, given: Path) -> Path:
    """The closest existing ancestor of `path`, which must be a directory (it will hold the output)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {given}: {parent} is a file, not a directory")
            return parent
    return Path(os.sep)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path: Path | str | None, flag: str, inputs: tuple = ()) -> Path | None:
    """An output file: not a directory, not one of `inputs`, its directory writable (missing
    directories are created when the file is written). A symlink is written through to its target."""
    if path is None:
        return None
    given = Path(path)
    if str(given).strip() == "":
        raise UserError(f"{flag} needs a file path")
    target = given.resolve() if given.is_symlink() else given
    if target.is_dir():
        raise UserError(f"{flag} {given} is a directory; give a file path (e.g. {given / 'out'}{_suffix_hint(flag)})")
    if target.exists() and not target.is_file():
        raise UserError(f"{flag} {given} exists and is not a regular file")
    for source in inputs:
        if source is not None and _same_file(target, Path(source)):
            raise UserError(f"{flag} {given} is also an input of this command; writing it would destroy that input: choose another path")
    parent = target.parent if target.parent.exists() else _nearest_existing(target, flag, given)
    if target.parent.exists() and not target.parent.is_dir():
        raise UserError(f"{flag} {given}: {target.parent} is a file, not a directory")
    _writable_dir(parent, flag, given)
    return given


def check_distinct_outputs(*outputs: tuple[Path | str | None, str]) -> None:
    """No two of a command's output files ((path, flag) pairs; None: not asked for) are one file:
    the second written would silently replace the first."""
    given = [(Path(path), flag) for path, flag in outputs if path is not None]
    for i, (path, flag) in enumerate(given):
        for other, other_flag in given[:i]:
            if path.resolve() == other.resolve():
                raise UserError(f"{other_flag} and {flag} both name {path}; one would replace the other: give each its own file")


def _suffix_hint(flag: str) -> str:
    return {"--csv": ".csv", "--parquet": ".parquet", "--html": ".html"}.get(flag, ".json" if flag == "--out" else "")


def check_output_dir(path: Path | str | None, flag: str) -> Path | None:
    """An output directory: a directory if it exists, else creatable (its nearest existing
    ancestor a writable directory). Nothing is created here."""
    if path is None:
        return None
    given = Path(path)
    if str(given).strip() == "":
        raise UserError(f"{flag} needs a directory path")
    target = given.resolve() if given.is_symlink() else given
    if target.exists():
        if not target.is_dir():
            raise UserError(f"{flag} {given} is a file, not a directory; give a directory path")
        _writable_dir(target, flag, given)
        return given
    if given.is_symlink():
        raise UserError(f"{flag} {given} is a symlink to {target}, which does not exist")
    _writable_dir(_nearest_existing(target, flag, given), flag, given)
    return given


# --- the context window -------------------------------------------------------------

WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_window(config) -> int | None:
    """The positions a model was built for (from its transformers config), None where the config does not say."""
    for name in WINDOW_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def tokens_at_least(tokenizer, text: str, budget: int) -> int:
    """The token count of `text` when it is at most `budget`; past that, a count > budget from a
    prefix (tokenising megabytes takes seconds, a prefix that already overflows milliseconds)."""
    size = max(4096, 8 * budget)
    while True:
        count = len(tokenizer(text[:size], add_special_tokens=False)["input_ids"])
        if count > budget or size >= len(text):
            return count
        size *= 4


def check_fits(prompt_tokens: int, new_tokens: int, window: int | None, what: str, model: str,
               draft_tokens: int = 0, new_flag: str = "--max-new-tokens") -> None:
    """Refuse, before prefill, a prompt that with `new_tokens` generated (and a draft of
    `draft_tokens` verified at the end) needs more positions than the model has."""
    if not window:
        return
    if prompt_tokens >= window:
        raise UserError(
            f"{what} has {'at least ' if prompt_tokens > window else ''}{prompt_tokens} tokens, past the "
            f"{window}-token context window of {model}; refused before prefill (prompts are never truncated): "
            f"leave it out (--limit, --categories, or edit the workload) or use a target with a longer window"
        )
    needed = prompt_tokens + new_tokens + draft_tokens
    if needed > window:
        room = window - prompt_tokens - draft_tokens
        draft = f" + a {draft_tokens}-token draft" if draft_tokens else ""
        fix = f"lower {new_flag} to {room} or less" if room >= 1 else "use a smaller draft (--k, --tree)"
        raise UserError(
            f"{what} ({prompt_tokens} tokens) + {new_flag} {new_tokens}{draft} needs {needed} positions, past the "
            f"{window}-token context window of {model}: {fix}, or leave the prompt out"
        )
