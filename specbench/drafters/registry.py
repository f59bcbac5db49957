"""The registry behind `--drafter`: every class in the entry-point group
`specbench.drafters` (built-ins are declared in pyproject.toml exactly as a
plugin declares its own), and building one from user-given options.
"""

from __future__ import annotations

import contextlib
import io
import sys
from importlib.metadata import entry_points
from typing import Any

from specbench.engine.options import DrafterOptions, OptionSpec, option_specs
from specbench.engine.protocol import Drafter, Target
from specbench.errors import UserError

ENTRY_POINT_GROUP = "specbench.drafters"


def installed_drafters() -> dict[str, Any]:
    """name -> entry point, for every drafter installed in this environment."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def drafter_class(name: str) -> type[Drafter]:
    found = installed_drafters()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UserError(f"unknown drafter '{name}': installed drafters are {known} (see `specbench drafters`)")
    try:
        cls = _import_plugin(found[name])
    except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
        raise UserError(f"drafter '{name}' failed to import ({exc}); reinstall the package that provides it") from exc
    except SystemExit as exc:  # e.g. argparse run at import time, on an argv that is specbench's
        raise UserError(f"drafter '{name}' ({found[name].value}) exits when imported (exit code {exc.code}), as a script would; "
                        "fix the plugin so its module only defines things at import") from None
    if not (isinstance(cls, type) and issubclass(cls, Drafter)):
        raise UserError(f"drafter '{name}' ({found[name].value}) is not a specbench Drafter subclass")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, DrafterOptions)):
        raise UserError(f"drafter '{name}' declares Options that are not a DrafterOptions dataclass; fix the plugin")
    return cls


def _import_plugin(entry):
    """Load an entry point as a library: specbench's command line is not the plugin's (one that
    parses sys.argv at import sees none) and what it prints while importing is not shown."""
    saved = sys.argv
    sys.argv = [entry.value.partition(":")[0]]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return entry.load()
    finally:
        sys.argv = saved


def parse_options(name: str, given: dict[str, Any]) -> tuple[type[Drafter], DrafterOptions]:
    """The drafter class and its options from user-given values, checked before any model loads."""
    cls = drafter_class(name)
    return cls, cls.Options.parse(name, given)


def build_drafter(name: str, target: Target, given: dict[str, Any]) -> Drafter:
    cls, options = parse_options(name, given)
    return cls.create(target, options)


def loadable_drafters() -> dict[str, type[Drafter]]:
    """Every installed drafter that imports cleanly (a broken plugin is left out, not fatal)."""
    classes = {}
    for name in sorted(installed_drafters()):
        try:
            classes[name] = drafter_class(name)
        except UserError:
            continue
    return classes


def option_flags() -> dict[str, OptionSpec]:
    """One typed flag per option name across the installed drafters, for `run` and `simulate`.
    A name two drafters declare with different types gets no flag (it stays reachable with -o)."""
    return _one_flag_each(cls.Options for cls in loadable_drafters().values())


def recipe_option_flags() -> dict[str, OptionSpec]:
    """One typed flag per training option across the installed drafters' recipes, for `train`."""
    return _one_flag_each(cls.recipe.Options for cls in loadable_drafters().values() if cls.recipe is not None)


def _one_flag_each(classes) -> dict[str, OptionSpec]:
    flags: dict[str, OptionSpec] = {}
    clashes: set[str] = set()
    for cls in classes:
        for name, spec in option_specs(cls).items():
            seen = flags.get(name)
            if seen is None:
                flags[name] = spec
            elif seen.type is not spec.type:
                clashes.add(name)
    return {name: spec for name, spec in flags.items() if name not in clashes}


def typed_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave, each converted to its declared type (text from -o or a flag
    becomes an int, a bool...), checked as a whole: what a run records and resumes from."""
    cls, options = parse_options(name, given)
    return {key: getattr(options, key) for key in cls.Options.current_names(name, given, note=False)}
