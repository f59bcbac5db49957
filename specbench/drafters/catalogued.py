"""What the drafters of trained weights that draft a tree of ranks share (the head drafters,
EAGLE, DFlash): the `tree` option, their shape, the `weights` option of a draft that is no
heads, and the catalogue's defaults (catalogue/heads.toml) for what the user leaves out: the
weights for this target and the tree for this device."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.resources import files
from typing import ClassVar

from specbench.bundled import resolve_bundled
from specbench.catalogue import drafter_entry
from specbench.engine.options import DrafterOptions, VocabTrimOptions, option
from specbench.errors import UserError

TREE_HELP = "a tree from catalogue/trees.json (e.g. mc_sim_7b_63), chain:K, or a .json list of paths"


@dataclass
class TreeOptions(VocabTrimOptions):
    """Options of a drafter of trained weights that drafts a tree of ranks."""

    shape_option: ClassVar[str | None] = "tree"
    tree: str | None = option(None, TREE_HELP + "; default from the catalogue")


@dataclass
class WeightsOptions(DrafterOptions):
    """Options of a drafter whose trained weights are a draft network (EAGLE, DFlash), not heads."""

    renamed: ClassVar[dict[str, str]] = {"heads": "weights"}  # their first name, from the head drafters
    weights: str | None = option(None, "the draft's weights: a checkpoint directory, weights file or hub id; "
                                       "default from catalogue/heads.toml")


def catalogued_weights(drafter: str, target, given: str | None, what: str, missing: str) -> tuple[str, dict]:
    """(the weights to load: `given`, else the catalogue's for this target, a bundled name resolved;
    the catalogue entry, which holds the drafter's other defaults). `what` the weights are (heads,
    a draft) and `missing` what to pass make the message when neither names any."""
    entry = drafter_entry(drafter, target.name, target.model_id)
    weights = given or entry.get("heads")
    if not weights:
        raise UserError(f"no published {drafter} {what} for target '{target.name}' in the catalogue: {missing}")
    return resolve_bundled(weights), entry


def device_type(target) -> str | None:
    """The target's device type ("cpu", "cuda"), which picks an entry's `NAME_cpu` settings."""
    return getattr(getattr(target, "device", None), "type", None)


def catalogued_setting(entry: dict, target, name: str, given, default):
    """A drafter setting: `given`, else the entry's for this device type (`NAME_cpu`), else its
    `NAME`, else `default`."""
    if given is not None:
        return given
    return entry.get(f"{name}_{device_type(target)}", entry.get(name, default))


def catalogued_tree(entry: dict, target, given: str | None, default: str) -> str:
    """The tree to draft: `given`, else the entry's for this device type (`tree_cpu`: tuned for
    CPUs by `specbench tune`), else its `tree`, else `default`."""
    return catalogued_setting(entry, target, "tree", given or None, default)


def catalogued_trim(entry: dict, target, options: VocabTrimOptions) -> VocabTrimOptions:
    """The VocabTrim to draft with: the user's (`--vocab-trim N --vocab-trim-from ...`; `--vocab-trim 0`
    for none), else the entry's for this device type (`vocab_trim_cpu`: where drafting over the
    whole vocabulary costs more than the tokens it adds, measured), counted in the entry's
    `vocab_trim_from`, an id list under catalogue/."""
    if options.vocab_trim is not None or options.vocab_trim_from is not None:
        return options
    top, source = entry.get(f"vocab_trim_{device_type(target)}"), entry.get("vocab_trim_from")
    if not top or not source:
        return options
    return replace(options, vocab_trim=int(top), vocab_trim_from=str(files("specbench.catalogue").joinpath(source)))
