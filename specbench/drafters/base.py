"""The drafter protocol and the registry behind `--drafter`.

A drafter is any class registered in the entry-point group `specbench.drafters`
(built-ins are declared in pyproject.toml exactly like a plugin's). Per
generated sequence the decode loop calls, in order:

1. `begin(prompt_tokens, prompt_hidden)` once, after the target's prefill;
   `prompt_hidden` is the target's hidden states over the prompt ([L, H])
   when the class sets `needs_hidden_states` (final normed, or the input of
   layer `hidden_state_layer`), else None.
2. `propose(ctx)` before each verification step: return a `DraftTree` of
   tokens to follow the root (the last token of `ctx.tokens`). An empty tree
   makes the step a plain decoding step.
3. `on_verified(outcome)` after it: which nodes the target accepted, the
   tokens emitted, and (if asked for) the target's hidden states over the
   root and every tree node.

The drafter learns what was accepted both from `on_verified` and from the
next `ctx.tokens`, which always equal the target's output so far: a drafter
with its own KV cache can simply roll back to the common prefix.

Optional, for `specbench simulate`: `teacher_forced(prompt, output, depth, hidden)`
scores a whole logged sequence in one pass (see specbench/simulate/proposals.py).
Drafters without it are simulated by step replay, which is slower and labelled so.
"""

from __future__ import annotations

import builtins
import inspect
import types
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from specbench.checks import check_drafter_options
from specbench.engine.acceptance import TypicalAcceptance
from specbench.engine.tree import DraftTree
from specbench.errors import UserError

if TYPE_CHECKING:
    from specbench.simulate.proposals import HiddenProvider, TeacherForced
    from specbench.targets.hf import HFTarget

ENTRY_POINT_GROUP = "specbench.drafters"


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
    hidden: torch.Tensor | None  # [1 + n, H] target final hidden states, root first


class Drafter:
    """Base class for drafters. Subclasses set `name`/`summary` and implement `propose`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_hidden_states: ClassVar[bool] = False
    # which hidden states `begin`/`on_verified` receive when needs_hidden_states:
    # None = the target's final normed output; j = the input of decoder layer j
    # (before any norm), e.g. for a trunk that replaces the last layers
    hidden_state_layer: int | None = None
    # the acceptance rule at temperature > 0 for tree drafters (None: speculative sampling)
    typical_acceptance: TypicalAcceptance | None = None

    @classmethod
    def create(cls, target: HFTarget, **options: Any) -> Drafter:
        """Build from the target and the user's options (CLI flags or `-o key=value`)."""
        return cls(target, **options)

    def begin(self, prompt_tokens: torch.Tensor, prompt_hidden: torch.Tensor | None) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree:
        raise NotImplementedError

    def on_verified(self, outcome: VerifyOutcome) -> None:
        pass

    def teacher_forced(
        self, prompt: torch.Tensor, output: torch.Tensor, depth: int, hidden: HiddenProvider | None
    ) -> TeacherForced:
        """Optional simulation hook: for a logged greedy sequence (prompt ids, the target's
        output ids), the rank of every true next token under each of `depth` draft
        positions at every step (a `TeacherForced`), from one pass over the sequence.
        `hidden()` yields the target's final hidden states over prompt + output[:-1] for
        drafters that read them. Leave unimplemented to be simulated by step replay."""
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

    def __init__(self, target: HFTarget) -> None:
        self.device = target.device

    def propose(self, ctx: DraftContext) -> DraftTree:
        return DraftTree.empty(self.device)


def installed_drafters() -> dict[str, Any]:
    """name -> entry point, for every drafter installed in this environment."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def drafter_class(name: str) -> type[Drafter]:
    found = installed_drafters()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UserError(f"unknown drafter '{name}': installed drafters are {known} (see `specbench drafters`)")
    try:
        cls = found[name].load()
    except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
        raise UserError(f"drafter '{name}' failed to import ({exc}); reinstall the package that provides it") from exc
    if not (isinstance(cls, type) and issubclass(cls, Drafter)):
        raise UserError(f"drafter '{name}' ({found[name].value}) is not a specbench Drafter subclass")
    return cls


def drafter_options(cls: type[Drafter]) -> dict[str, inspect.Parameter]:
    """The keyword options a drafter's `create` accepts (target excluded)."""
    target = cls.create if cls.create.__func__ is not Drafter.create.__func__ else cls.__init__
    params = inspect.signature(target).parameters.values()
    return {
        p.name: p
        for p in params
        if p.name not in ("self", "cls", "target") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


SIMPLE_TYPES = (bool, int, float, str)


def _declared_types(cls: type[Drafter]) -> dict[str, tuple[type, ...]]:
    """Option name -> the simple types its annotation allows (NoneType included when optional);
    options annotated otherwise, or not at all, are left unchecked."""
    target = cls.create if cls.create.__func__ is not Drafter.create.__func__ else cls.__init__
    namespace = {**vars(builtins), **getattr(inspect.unwrap(target), "__globals__", {})}
    declared = {}
    for option, parameter in drafter_options(cls).items():
        hint = parameter.annotation
        try:  # postponed annotations are text; one that does not resolve is left unchecked
            hint = eval(hint, namespace) if isinstance(hint, str) else hint  # noqa: S307 - the drafter's own annotation
        except Exception:  # noqa: BLE001
            continue
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if all(t in SIMPLE_TYPES or t is type(None) for t in allowed):
            declared[option] = allowed
    return declared


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a bool is an int to isinstance, never to an option
        return bool in allowed
    return isinstance(value, allowed) or (isinstance(value, int) and float in allowed)


def typed_options(name: str, cls: type[Drafter], options: dict[str, Any]) -> dict[str, Any]:
    """`options` with numbers given for text options turned into text; a value of the wrong type
    (`-o k=abc`) is refused here, before any model loads, instead of failing inside the drafter."""
    out = dict(options)
    for option, allowed in _declared_types(cls).items():
        if option not in out:
            continue
        value = out[option]
        if value is None and type(None) in allowed:
            continue
        if str in allowed and isinstance(value, (int, float)):
            out[option] = str(value)
        elif not _fits(value, allowed):
            wanted = " or ".join(t.__name__ for t in allowed if t is not type(None))
            raise UserError(f"drafter '{name}' option {option} takes {wanted}, not {value!r}: e.g. -o {option}=VALUE")
    return out


def check_options(name: str, options: dict[str, Any]) -> type[Drafter]:
    """The drafter class for `name`, after checking it takes every option given, with values of its types."""
    cls = drafter_class(name)
    accepted = drafter_options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "no options"
        raise UserError(f"drafter '{name}' does not take option(s) {', '.join(unknown)}; it takes: {takes}")
    check_drafter_options(typed_options(name, cls, options))
    return cls


def build_drafter(name: str, target: HFTarget, options: dict[str, Any]) -> Drafter:
    cls = check_options(name, options)
    return cls.create(target, **typed_options(name, cls, options))
