"""The catalogue: data a person can read, in TOML and JSON files beside this module.

- `targets.toml`: target aliases (hub ids, the embedded GGUF default).
- `draft_models.toml`: draft-model aliases and which target each serves by default.
- `heads.toml`: which published (or bundled) head checkpoint and tree serve a drafter on a target.
- `trees.json`: the published Medusa/Hydra trees, by name.

The named workloads have a folder each in the top-level `workloads/`.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib.resources import files


@cache
def catalogue(name: str) -> dict[str, dict]:
    """A TOML table of the catalogue (targets, draft_models, heads)."""
    return tomllib.loads(files("specbench.catalogue").joinpath(f"{name}.toml").read_text())


def drafter_entry(drafter: str, target_name: str, target_id: str = "") -> dict:
    """The catalogue entry (heads.toml) serving `drafter` on a target: by the alias given,
    or by the hub id an alias stands for (`--target lmsys/vicuna-13b-v1.3` finds vicuna-13b's)."""
    entries = catalogue("heads").get(drafter, {})
    if target_name in entries:
        return entries[target_name]
    aliases = [alias for alias, t in catalogue("targets").items() if isinstance(t, dict) and t.get("hf_id") == target_id]
    return next((entries[alias] for alias in aliases if alias in entries), {})
