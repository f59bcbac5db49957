"""Check that nothing low in specbench imports anything high.

    python scripts/check_imports.py        # prints the layers and any upward import; exit 1 if any

Every module of the package is parsed (not imported) and each `import` /
`from ... import` of a specbench module, at any depth in the file (function-
local imports count too), is checked against the layers below. A module may
import its own layer and those under it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "specbench"

# bottom first; a module belongs to the first layer with a prefix of its name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations: errors, records, checks, files", ("specbench.errors", "specbench.records", "specbench.progress", "specbench.checks",
                                                    "specbench.files", "specbench.hub")),
    ("contracts and the decode loop", ("specbench.engine",)),
    ("catalogue and measurements", ("specbench.catalogue", "specbench.bundled", "specbench.metrics", "specbench.environment")),
    ("targets, workloads, store", ("specbench.targets", "specbench.workloads", "specbench.store")),
    ("drafters", ("specbench.drafters",)),
    ("simulate, train", ("specbench.simulate", "specbench.train")),
    ("runs and reports", ("specbench.runner", "specbench.report", "specbench.answers")),
    ("command line", ("specbench.cli", "specbench.flags", "specbench.console", "specbench.__main__")),
]


def layer_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported specbench module) for every import in the file."""

    def is_module(name: str) -> bool:
        where = package.parent.joinpath(*name.split("."))
        return where.is_dir() or where.with_suffix(".py").is_file()

    found = []
    home = module if path.name == "__init__.py" else module.rpartition(".")[0]  # what relative imports start from
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = home.split(".")[: len(home.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from specbench import x` imports the submodule x when it is one
            found += [(node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base) for alias in node.names]
    return [(line, name) for line, name in found if name == "specbench" or name.startswith("specbench.")]


def check(package: Path = PACKAGE) -> tuple[list[str], list[str]]:
    """(upward imports, modules outside the layers) of the package at `package`."""
    upward = []
    unplaced = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        mine = layer_of(module)
        if mine is None:
            if module != "specbench":
                unplaced.append(module)
            continue
        for line, target in imports(path, module, package):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(package.parent)}:{line}: {module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return upward, unplaced


def main() -> int:
    upward, unplaced = check()
    for index, (name, prefixes) in enumerate(LAYERS):
        print(f"{index}. {name}: {', '.join(prefixes)}")
    for module in unplaced:
        print(f"not in any layer: {module}")
    for line in upward:
        print(f"upward import: {line}")
    print(f"{len(upward)} upward import(s), {len(unplaced)} module(s) outside the layers")
    return 1 if upward or unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
