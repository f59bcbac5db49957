"""`--tree NAME|path.json|chain:K`: the tree shapes head drafters fill with tokens.

Named trees are data in specbench/catalogue/trees.json, copied from the
published Medusa (and decoder-layer Hydra) choice lists.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path

from specbench.engine.tree import TreeShape
from specbench.errors import UserError
from specbench.files import read_text


@cache
def named_trees() -> dict[str, dict]:
    data = json.loads(files("specbench.catalogue").joinpath("trees.json").read_text())
    return {name: entry for name, entry in data.items() if not name.startswith("_")}


def resolve_tree(spec: str) -> TreeShape:
    """A tree from a catalogue name, `chain:K` (a top-1 chain of K tokens) or a JSON file of paths."""
    if spec.startswith("chain:"):
        try:
            k = int(spec.removeprefix("chain:"))
        except ValueError:
            k = 0
        if k < 1:
            raise UserError(f"--tree {spec}: use chain:K with K >= 1 (e.g. chain:4)")
        return TreeShape.chain(k)
    if spec in named_trees():
        return TreeShape(named_trees()[spec]["paths"], name=spec)
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise UserError(f"tree file '{spec}' does not exist")
        try:
            data = json.loads(read_text(path, "tree file"))
        except json.JSONDecodeError as exc:
            raise UserError(f"tree file '{spec}' is not valid JSON ({exc})") from None
        paths = data.get("paths") if isinstance(data, dict) else data
        return TreeShape(paths, name=path.stem)
    known = ", ".join(named_trees())
    raise UserError(f"unknown tree '{spec}': use one of {known}, chain:K, or a .json file with a list of paths")
