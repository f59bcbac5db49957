"""Drafter options, declared once per drafter as a dataclass.

Each field is one option: its annotation gives the type (bool, int, float or
str, optionally `| None`), its default is the default, and `option(...)` adds
the help text and bounds. Everything else is generated from that one
declaration: `-o key=value` parsing and checking, the typed `--key` flags of
`run` and `simulate`, the `specbench drafters` listing. A plugin drafter that
declares its options this way gets all of it for free.

Cross-field rules (e.g. min_ngram <= max_ngram) go in `check()`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from specbench.checks import MAX_COUNT, check_count, check_number
from specbench.errors import SpecbenchWarning, UserError

SIMPLE_TYPES: tuple[type, ...] = (bool, int, float, str)
_TRUE, _FALSE, _NONE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}, {"none", "null"}


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None, gt: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field for one drafter option or one command flag: default, help text and bounds
    (min/max inclusive, gt exclusive, choices for text). Drafter options are checked by
    `DrafterOptions.parse`, command flags by `CommandConfig` when the config is made."""
    return dataclasses.field(default=default, metadata={"help": help, "min": min, "max": max, "gt": gt, "choices": choices})


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def bounds_text(meta: Mapping[str, Any]) -> str:
    """A field's declared bounds in words (`>= 1 and <= 0.9`), '' where it declares none."""
    parts = []
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']:g}")
    if meta.get("min") is not None:
        parts.append(f">= {meta['min']:g}")
    if meta.get("max") is not None:
        parts.append(f"<= {meta['max']:g}")
    if meta.get("choices"):
        parts.append("one of " + ", ".join(meta["choices"]))
    return " and ".join(parts)


@dataclass
class CommandConfig:
    """Base of every command's configuration dataclass. Each field declared with `option(...)` is
    a flag of the command (flags.with_config) and is checked against its declared type and bounds
    when the config is made, so the command line and library callers are refused alike, before any
    work: an int is a count (checks.check_count: at least 1 unless `min` says otherwise), a float
    finite and in range, text one of its `choices`. Subclasses that define `__post_init__` call super."""

    def __post_init__(self) -> None:
        check_declared(self)


def check_declared(config) -> None:
    """Refuse, as one line naming the flag, a field of `config` outside what its `option(...)` declares."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta:
            continue
        value, flag = getattr(config, f.name), flag_of(f.name)
        kind, _ = _simple_type(hints[f.name])
        if kind is int:
            low = 1 if meta.get("min") is None else meta["min"]
            check_count(value, flag, minimum=low, maximum=meta.get("max"))
        elif kind is float:
            check_number(value, flag, minimum=meta.get("min"), maximum=meta.get("max"), above=meta.get("gt"))
        elif meta.get("choices") and value is not None and value not in meta["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(meta['choices'])} (got {value!r})")


@dataclass(frozen=True)
class OptionSpec:
    """What one declared option is: read off its dataclass field."""

    name: str
    type: type  # one of SIMPLE_TYPES
    optional: bool  # None is a valid value
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    @property
    def type_name(self) -> str:
        return self.type.__name__ + (" or none" if self.optional else "")

    def bounds(self) -> str:
        return bounds_text({"gt": self.gt, "min": self.min, "max": self.max, "choices": self.choices})

    def describe(self) -> str:
        """`name: type = default (bounds) - help`, for listings."""
        bounds = self.bounds()
        return f"{self.name}: {self.type_name} = {self.default!r}{f' ({bounds})' if bounds else ''}  {self.help}"

    def convert(self, drafter: str, value: Any) -> Any:
        """The value as this option's type: text (from -o or a flag) is parsed, typed values checked;
        then the bounds. One line naming the option on any misfit."""
        def refuse(why: str) -> UserError:
            return UserError(f"drafter '{drafter}' option {self.name} {why}: set it with {self.flag} or -o {self.name}=VALUE")

        def out_of_bounds(why: str) -> UserError:
            return UserError(f"{self.flag} {why} (got {value!r}); it is drafter '{drafter}' option {self.name}, {self.bounds()}")

        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and self.type is not str):
            if self.optional:
                return None
            raise refuse("cannot be none")
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            try:
                if self.type is bool:
                    if text not in _TRUE | _FALSE:
                        raise ValueError(value)
                    value = text in _TRUE
                else:
                    value = self.type(text)
            except ValueError:
                raise refuse(f"takes {self.type.__name__}, not {_shown(value)}") from None
        elif self.type is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `-o tree=63` given as JSON would be a number
        elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (isinstance(value, bool) and self.type is not bool):
            raise refuse(f"takes {self.type.__name__}, not {value!r}")
        if self.type is float and not math.isfinite(value):
            raise refuse(f"must be a finite number, not {value!r}")
        if self.gt is not None and not value > self.gt:
            raise out_of_bounds(f"must be greater than {self.gt:g}")
        if self.min is not None and value < self.min:
            raise out_of_bounds(f"must be at least {self.min:g}")
        top = self.max if self.max is not None else MAX_COUNT if self.type is int and self.min is not None else None
        if top is not None and value > top:  # a count past a billion is a typo, and would overflow what it sizes
            raise out_of_bounds(f"must be at most {top:g}")
        if self.choices and value not in self.choices:
            raise out_of_bounds(f"must be one of {', '.join(self.choices)}")
        return value


def _shown(text: str) -> str:
    """Text as the user meant it in a message: a number as a number (2.5), anything else quoted ('abc')."""
    try:
        number = float(text)
    except ValueError:
        return repr(text)
    return text.strip() if math.isfinite(number) else repr(text)


@dataclass
class DrafterOptions:
    """Base of every drafter's options dataclass. Subclasses declare fields with `option(...)`."""

    # the option that sets the draft's shape (a chain drafter's length, an int; a tree drafter's
    # tree, text a tree spec resolves from): `simulate` and `tune` set it per scored shape, and it
    # is not the user's to give them. None: no option sets the shape (chains are capped per step
    # through ctx.max_tokens). `Drafter.shape_spec` checks it.
    shape_option: ClassVar[str | None] = None
    # options renamed: the old name still works for one release, with a one-line note (old -> new)
    renamed: ClassVar[dict[str, str]] = {}

    def check(self, drafter: str) -> None:
        """Rules across fields; raise UserError. Subclasses extend it (call super)."""

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        return option_specs(cls)

    @classmethod
    def parse(cls, drafter: str, given: Mapping[str, Any]):
        """An instance from user-given values (text or typed), refusing unknown names and misfits."""
        given = cls.current_names(drafter, given)
        specs = cls.specs()
        unknown = sorted(set(given) - set(specs))
        if unknown:
            takes = ", ".join(specs) or "no options"
            raise UserError(f"drafter '{drafter}' does not take option(s) {', '.join(unknown)}; it takes: {takes}")
        options = cls(**{name: specs[name].convert(drafter, value) for name, value in given.items()})
        options.check(drafter)
        return options

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def current_names(cls, drafter: str, given: Mapping[str, Any], note: bool = True) -> dict[str, Any]:
        """`given` with every renamed option under its current name (one deprecation line each)."""
        current = dict(given)
        for old, new in cls.renamed.items():
            if old not in current:
                continue
            if new in current:
                raise UserError(f"drafter '{drafter}': give {flag_of(new)} only ({flag_of(old)} is its old name)")
            if note:
                warnings.warn(f"drafter '{drafter}' option {old} is deprecated and goes in the next release: use {flag_of(new)} "
                              f"(-o {new}=...)", SpecbenchWarning)
            current[new] = current.pop(old)
        return current


@cache
def option_specs(cls: type) -> dict[str, OptionSpec]:
    """What each field of an options dataclass (drafter options, a recipe's training options) declares."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        kind, optional = _simple_type(hints[f.name])
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a drafter option must be bool, int, float or str (optionally | None)")
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        specs[f.name] = OptionSpec(f.name, kind, optional, default, meta.get("help", ""), meta.get("min"), meta.get("max"),
                                   meta.get("gt"), meta.get("choices"))
    return specs


def _simple_type(hint) -> tuple[type | None, bool]:
    """(the simple type, whether None is allowed) of an annotation, or (None, _) if it is not one."""
    if hint in SIMPLE_TYPES:
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in SIMPLE_TYPES and len(typing.get_args(hint)) == 2:
            return args[0], True
    return None, False


# --- options several drafters share ------------------------------------------------


@dataclass
class ChainOptions(DrafterOptions):
    """Drafters that propose a chain of up to k tokens."""

    shape_option: ClassVar[str | None] = "k"
    k: int = option(4, "tokens drafted per step", min=1)


@dataclass
class VocabTrimOptions(DrafterOptions):
    """Drafters with an LM head that VocabTrim can cut to the N most frequent target tokens."""

    vocab_trim: int | None = option(None, "VocabTrim: keep only the N most frequent target tokens in the drafter's LM head "
                                          "(0: the whole vocabulary, where the catalogue would trim)", min=0)
    vocab_trim_from: str | None = option(
        None, "VocabTrim counts tokens in: a run dir, a target log, a workload, or an id list from `vocab-trim build`")

    def check(self, drafter: str) -> None:
        super().check(drafter)
        if self.vocab_trim and not self.vocab_trim_from:
            raise UserError("--vocab-trim needs --vocab-trim-from RUN_DIR|LOG.jsonl|WORKLOAD|IDS.json to count tokens in")
