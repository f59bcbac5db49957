"""`specbench train`: run the recipe a drafter declares.

A drafter declares its recipe (`Drafter.recipe`, engine/protocol.py): a function
`(TrainConfig, target, overwrite, on_step) -> dict`, its default learning rate and its
own training options, found through the drafter's entry point like everything else
about it; `train` checks the options, loads the frozen target, runs the recipe and
reports progress.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from specbench.engine.options import flag_of
from specbench.engine.protocol import TrainableTarget, TrainRecipe
from specbench.errors import SpecbenchWarning, UserError
from specbench.files import write_lock, written_unit
from specbench.progress import SILENT, Progress
from specbench.train.common import TrainConfig


def recipe_for(drafter: str) -> TrainRecipe:
    """The recipe `drafter` declares; one line naming the trainable drafters if it declares none."""
    from specbench.drafters.registry import drafter_class, loadable_drafters

    recipe = drafter_class(drafter).recipe
    if recipe is None:
        trainable = [name for name, cls in loadable_drafters().items() if cls.recipe is not None]
        raise UserError(f"cannot train drafter '{drafter}': trainable drafters are {', '.join(trainable)}")
    return recipe


def recipe_options(drafter: str, recipe: TrainRecipe, given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's own options, `given` (name -> value) over its declared defaults, checked as
    declared. Options of other drafters' training are left out with a one-line warning (they were
    always ignored: a command line written for several drafters keeps working)."""
    takes = recipe.Options.__dataclass_fields__
    other = [name for name in given if name not in takes]
    if other:
        listed = ", ".join(flag_of(name) for name in takes) or "none of its own"
        warnings.warn(f"train --drafter {drafter} ignores {', '.join(flag_of(name) for name in other)} (other drafters' training "
                      f"options); its own: {listed}", SpecbenchWarning, stacklevel=2)
    return asdict(recipe.Options(**{name: value for name, value in given.items() if name in takes}))


def train(config: TrainConfig, options: dict[str, Any] | None = None, device: str = "auto", dtype: str = "float32",
          overwrite: bool = False, progress: Progress = SILENT) -> Path:
    """Train `config.drafter` for the frozen `config.target` with its recipe's `options` (name ->
    value; the rest default); the checkpoint directory."""
    from specbench.checks import check_output_dir
    from specbench.train.data import check_out, data_dirs

    recipe = recipe_for(config.drafter)
    config.options = recipe_options(config.drafter, recipe, options or {})
    if config.lr is None:
        config.lr = recipe.default_lr
    check_output_dir(Path(config.out), "--out")  # a path that cannot be a directory is refused before a lock file is made beside it
    # one writer per checkpoint directory, the lock first: a directory another train is filling is refused as such, not as "not empty"
    with write_lock(Path(config.out)):
        check_out(Path(config.out), overwrite, "checkpoint directory", inputs=(*[(d, "--data") for d in data_dirs(config.data)],
                                                                                   *[(d, "--eval-data") for d in data_dirs(config.eval_data or "")]))
        return _train(config, recipe, device, dtype, overwrite, progress)


def _train(config: TrainConfig, recipe: TrainRecipe, device: str, dtype: str, overwrite: bool, progress: Progress) -> Path:
    from specbench.targets import load_target

    torch.manual_seed(config.seed)
    target: TrainableTarget = load_target(config.target, device, dtype, "eager", progress=progress)  # recipes read target.model
    target.model.requires_grad_(False)
    module, _, name = recipe.function.partition(":")
    function = getattr(importlib.import_module(module), name)
    advance = progress.task(f"train {config.drafter}", config.steps)

    def on_step(step: int, row: dict) -> None:
        losses = " ".join(f"{key} {value:.3f}" for key, value in row.items() if key not in ("step", "lr", "eval") and isinstance(value, float))
        advance(losses=losses)
        if "eval" in row:
            progress.note(f"step {step}: held-out {row['eval']}")

    # one unit: readers refuse the directory while it is half written (a kill, a failure between two saves)
    # and any file of it changed or left from an earlier checkpoint (files.check_unit)
    with written_unit(Path(config.out)), torch.enable_grad():
        function(config, target, overwrite=overwrite, on_step=on_step)
    return Path(config.out)
