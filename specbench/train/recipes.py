"""`specbench train`: the options recipes read, and the command that runs one.

A drafter declares its recipe (`Drafter.recipe`, engine/protocol.py): a function
`(TrainConfig, target, overwrite, on_step) -> dict`, found through the drafter's entry
point like everything else about it; `train` loads the frozen target, runs it and
reports progress.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import TrainableTarget, TrainRecipe
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.train.common import TrainConfig


@dataclass
class RecipeOptions(CommandConfig):
    """The options recipes read (each recipe names which in `Recipe.options`)."""

    layers: int = option(1, "draft-model: how many of the target's first layers the draft keeps", min=1)
    k: int = option(4, "draft-model: chain length the acceptance estimate assumes", min=1)
    num_heads: int = option(4, "medusa/hydra/hydra-decoder: number of heads", min=1)
    tie_lm_head: bool = option(False, "heads read the target's LM head (no LM head of their own; hydra: no embedding copy either): small checkpoints")
    decoder_layers: int = option(1, "hydra-decoder: trunk layers, copied from the target's last N", min=1)
    hydra_layers: int = option(4, "hydra: ResBlocks per head (the first grounded, the rest one shared block)", min=1)
    draft_vocab: int = option(8192, "eagle3: draft vocabulary size, the N most frequent answer tokens of the data (d2t)", min=1)
    ttt_steps: int = option(4, "eagle3: draft steps unrolled in training-time test, each fed its own previous output "
                               "(the reference trains 7; a depth-3 tree drafts 3 levels)", min=1)
    feature_noise: float = option(0.1, "eagle: uniform noise U(-a, a) added to the target's features in training (the paper's 0.1)", min=0)


def recipe_for(drafter: str) -> TrainRecipe:
    """The recipe `drafter` declares; one line naming the trainable drafters if it declares none."""
    from specbench.drafters.registry import drafter_class, loadable_drafters

    recipe = drafter_class(drafter).recipe
    if recipe is None:
        trainable = [name for name, cls in loadable_drafters().items() if cls.recipe is not None]
        raise UserError(f"cannot train drafter '{drafter}': trainable drafters are {', '.join(trainable)}")
    unknown = set(recipe.options) - set(RecipeOptions.__dataclass_fields__)
    if unknown:  # a plugin's recipe naming an option `train` has no flag for
        raise UserError(f"drafter '{drafter}' declares a recipe reading {', '.join(sorted(unknown))}, which `specbench train` does not take")
    return recipe


def train(config: TrainConfig, recipe_options: RecipeOptions | None = None, device: str = "auto", dtype: str = "float32",
          overwrite: bool = False, progress: Progress = SILENT) -> Path:
    """Train `config.drafter` for the frozen `config.target`; the checkpoint directory."""
    from specbench.targets import load_target
    from specbench.train.data import check_out

    recipe = recipe_for(config.drafter)
    given = asdict(recipe_options or RecipeOptions())
    config.options = {k: v for k, v in given.items() if k in recipe.options}  # both checked when made (CommandConfig)
    if config.lr is None:
        config.lr = recipe.default_lr
    check_out(Path(config.out), overwrite, "checkpoint directory")
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

    with torch.enable_grad():
        function(config, target, overwrite=overwrite, on_step=on_step)
    return Path(config.out)
