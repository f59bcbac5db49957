"""Command-line flags generated from the declarations they come from, so each option is
written once: the fields of a configuration dataclass (`option(default, help)`) and the
options every installed drafter declares (engine/options.py), a plugin's included."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Annotated, Optional

import typer

from specbench.errors import UserError

Option = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="any drafter option as key=value")]


def parse_option(text: str) -> tuple[str, str]:
    """`-o key=value`: the value stays text; the drafter's declared type parses it."""
    if "=" not in text:
        raise UserError(f"-o expects key=value (got '{text}')")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value


def with_drafter_flags(command):
    """Give a command one typed `--flag` per drafter option any installed drafter declares; the
    values given reach the command as `drafter_flags` (name -> value), with every `-o key=value`."""
    from specbench.drafters.registry import option_flags

    return _with_generated_flags(command, option_flags(), "drafter_flags", "Drafter options")


def with_recipe_flags(command):
    """Give `train` one typed `--flag` per training option any installed drafter's recipe declares
    (Drafter.recipe); the values given reach it as `recipe_flags` (name -> value)."""
    from specbench.drafters.registry import recipe_option_flags

    return _with_generated_flags(command, recipe_option_flags(), "recipe_flags", "Recipe options")


def _with_generated_flags(command, specs: dict, receiver: str, panel: str):
    signature = inspect.signature(command, eval_str=True)
    flags = {name: spec for name, spec in specs.items() if name not in signature.parameters}
    generated = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[spec.type],  # noqa: UP045 - typer reads Optional
            typer.Option(spec.flag, help=_with_bounds(spec.help, spec.bounds()), rich_help_panel=panel),
        ])
        for name, spec in flags.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name, None) for name in flags}
        given = {name: value for name, value in values.items() if value is not None}
        if "option" in kwargs:  # -o key=value, where the command takes it
            given |= dict(parse_option(o) for o in kwargs.pop("option") or [])
            kwargs["option"] = None
        return command(**kwargs, **{receiver: given})

    parameters = [p for p in signature.parameters.values() if p.name != receiver]
    wrapper.__signature__ = signature.replace(parameters=parameters + generated)
    return wrapper


def with_config(cls, name: str = "config", **defaults):
    """Give a command one flag per field of the dataclass `cls` that declares help (`option(...)`),
    its declared bounds shown in --help; the command receives `name=cls(**values)`, which refuses
    values outside those bounds (engine.options.CommandConfig). `defaults` overrides a field's
    default for this command."""
    from specbench.engine.options import CommandConfig, bounds_text

    if not issubclass(cls, CommandConfig):  # the bounds its flags show must be the bounds it enforces
        raise TypeError(f"{cls.__name__} must subclass engine.options.CommandConfig to be a command's config")

    hints = typing.get_type_hints(cls)

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
        generated = []
        for f in fields:
            kind = hints[f.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: typer reads Optional
                kind = Optional[next(a for a in typing.get_args(kind) if a is not type(None))]  # noqa: UP045
            default = defaults.get(f.name, f.default)
            required = default is dataclasses.MISSING
            generated.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=... if required else default,
                                               annotation=Annotated[kind, typer.Option(help=_with_bounds(f.metadata["help"], bounds_text(f.metadata)))]))

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {f.name: kwargs.pop(f.name) for f in fields}
            return command(**kwargs, **{name: cls(**values)})

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != name]
        wrapper.__signature__ = signature.replace(parameters=generated + parameters)
        return wrapper

    return decorate


def _with_bounds(help: str, bounds: str) -> str:
    return help + (f" ({bounds})" if bounds else "")


def parse_ks(values: list[str] | None) -> list[int]:
    """--k 1,2,3 --k 6 -> [1, 2, 3, 6]"""
    ks = []
    for part in split_list(values):
        try:
            ks.append(int(part))
        except ValueError:
            raise UserError(f"--k takes integers, comma-separated (got '{part}')") from None
    return ks


def parse_batch_sizes(values: list[str] | None, flag: str = "--batch-size") -> list[int]:
    """--batch-size 1,2,4 --batch-size 8 -> [1, 2, 4, 8] (default [1]); sizes >= 1, each once."""
    sizes = []
    for part in split_list(values) or ["1"]:
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"{flag} takes whole numbers >= 1, comma-separated (got '{part}')")
        if int(part) not in sizes:
            sizes.append(int(part))
    return sizes


def split_list(values: list[str] | None) -> list[str]:
    """--x a,b --x c -> [a, b, c]"""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def typed_params(ctx: typer.Context) -> dict[str, object]:
    """The parameters the user typed (not defaults), by name: what a resumed run compares."""
    given = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given[name] = value
    return given


def deprecated(old: str, new: str):
    """A hidden option under an old name that still works for one release, with a one-line note."""
    return typer.Option(old, hidden=True, help=f"deprecated spelling of {new}")


def drafter_flags(drafter: str, options: dict[str, object]) -> list[str]:
    """Drafter options as the typed flags `run` and `simulate` take (a false bool as -o name=false)."""
    from specbench.drafters.registry import drafter_class

    specs = drafter_class(drafter).Options.specs()
    parts = []
    for name, value in options.items():
        if isinstance(value, bool):
            parts += [specs[name].flag] if value else ["-o", f"{name}=false"]
        else:
            parts += [specs[name].flag, str(value)]
    return parts


def tune_commands(check) -> tuple[str, str]:
    """The `specbench run` that measures tune's choice (simulate.tune.ChosenRun) with the drafter's
    shape option set to it, and the `specbench simulate` that scores it (simulate's --k / --tree)."""
    from specbench.drafters.registry import drafter_class

    options = drafter_flags(check.drafter, check.drafter_options)
    shape_flag = drafter_class(check.drafter).shape_spec().flag
    run = ["specbench", "run", "--target", check.target, "--drafter", check.drafter, *options, shape_flag, check.shape,
           "--workload", check.workload, "--limit", check.limit, "--max-new-tokens", check.max_new_tokens]
    simulate = ["specbench", "simulate", "--log", check.log, "--drafter", check.drafter, *options,
                "--k" if check.kind == "chain" else "--tree", check.shape]
    if getattr(check, "batch_size", 1) > 1:  # chosen for B rows at once: measured and scored at that B
        run += ["--batch-size", check.batch_size]
        simulate += ["--batch-size", check.batch_size] + (["--profile", check.profile] if check.profile else [])
    return " ".join(map(str, run)), " ".join(map(str, simulate))


def resume_refusal(refused) -> str:
    """runner.ResumeConflicts in the flags that would change the resumed run."""
    from specbench.engine.options import flag_of

    def shown(value) -> str:
        return "none" if value is None else ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    named = "; ".join((f"-o {c.name}={shown(c.given)}" if c.drafter_option else f"{flag_of(c.name)} {shown(c.given)}")
                      + f" (the run has {shown(c.stored)})" for c in refused.conflicts)
    return (f"--resume {refused.directory} continues the run as it was started; these flags would change it: {named}. "
            "Drop them, or start a new run")
