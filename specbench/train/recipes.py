"""`specbench train`: which drafters can be trained, by which recipe, with which defaults.

A recipe is a function `(TrainConfig, target, overwrite, on_step) -> dict` in its own
module; `train` loads the frozen target, runs it and reports progress.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specbench.engine.options import option
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.train.common import TrainConfig


@dataclass
class RecipeOptions:
    """The options recipes read (each recipe names which in `Recipe.options`)."""

    layers: int = option(1, "draft-model: how many of the target's first layers the draft keeps", min=1)
    k: int = option(4, "draft-model: chain length the acceptance estimate assumes", min=1)
    num_heads: int = option(4, "medusa/hydra/hydra-decoder: number of heads", min=1)
    tie_lm_head: bool = option(False, "heads read the target's LM head (no LM head of their own; hydra: no embedding copy either): small checkpoints")
    decoder_layers: int = option(1, "hydra-decoder: trunk layers, copied from the target's last N", min=1)
    hydra_layers: int = option(4, "hydra: ResBlocks per head (the first grounded, the rest one shared block)", min=0)
    draft_vocab: int = option(8192, "eagle3: draft vocabulary size, the N most frequent answer tokens of the data (d2t)", min=1)
    ttt_steps: int = option(4, "eagle3: draft steps unrolled in training-time test, each fed its own previous output "
                               "(the reference trains 7; a depth-3 tree drafts 3 levels)", min=1)
    feature_noise: float = option(0.1, "eagle: uniform noise U(-a, a) added to the target's features in training (the paper's 0.1)", min=0)
    block_size: int = option(16, "dflash: the block (anchor + drafted tokens) the draft is trained on", min=2)
    draft_layers: int = option(5, "dflash: draft decoder layers", min=1)
    anchors: int = option(16, "dflash: random anchors (blocks) per training sequence and step", min=1)
    loss_decay: float = option(7.0, "dflash: block position i's loss weighs exp(-(i - 1) / decay)", gt=0)


@dataclass(frozen=True)
class Recipe:
    module: str
    function: str
    default_lr: float  # peak AdamW learning rate when --lr is not given
    options: tuple[str, ...]  # the recipe-specific options it reads from TrainConfig.options


_HEADS = "specbench.train.heads"
RECIPES = {
    "draft-model": Recipe("specbench.train.draft", "train_draft_model", 1e-3, ("layers", "k")),
    "medusa": Recipe(_HEADS, "train_heads", 1e-3, ("num_heads", "tie_lm_head")),
    "hydra": Recipe(_HEADS, "train_heads", 5e-4, ("num_heads", "tie_lm_head", "hydra_layers")),  # Hydra++'s rate
    "hydra-decoder": Recipe(_HEADS, "train_heads", 1e-3, ("num_heads", "tie_lm_head", "decoder_layers")),
    "eagle": Recipe("specbench.train.eagle", "train_eagle", 1e-3, ("feature_noise",)),
    "eagle3": Recipe("specbench.train.eagle", "train_eagle", 1e-3, ("draft_vocab", "ttt_steps")),
    "dflash": Recipe("specbench.train.dflash", "train_dflash", 1e-3, ("block_size", "draft_layers", "anchors", "loss_decay")),
}


def recipe_for(drafter: str) -> Recipe:
    if drafter not in RECIPES:
        raise UserError(f"cannot train drafter '{drafter}': trainable drafters are {', '.join(RECIPES)}")
    return RECIPES[drafter]


def train(config: TrainConfig, recipe_options: RecipeOptions | None = None, device: str = "auto", dtype: str = "float32",
          overwrite: bool = False, progress: Progress = SILENT) -> Path:
    """Train `config.drafter` for the frozen `config.target`; the checkpoint directory."""
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.train.data import check_out

    recipe = recipe_for(config.drafter)
    given = asdict(recipe_options or RecipeOptions())
    config.options = {k: v for k, v in given.items() if k in recipe.options}
    config.check()
    if config.lr is None:
        config.lr = recipe.default_lr
    check_out(Path(config.out), overwrite, "checkpoint directory")
    torch.manual_seed(config.seed)
    dev = resolve_device(device)
    with progress.status(f"loading {config.target}"):
        target = HFTarget.load(config.target, dev, resolve_dtype(dtype, dev))
    target.model.requires_grad_(False)
    function = getattr(importlib.import_module(recipe.module), recipe.function)
    advance = progress.task(f"train {config.drafter}", config.steps)

    def on_step(step: int, row: dict) -> None:
        losses = " ".join(f"{key} {value:.3f}" for key, value in row.items() if key not in ("step", "lr", "eval") and isinstance(value, float))
        advance(losses=losses)
        if "eval" in row:
            progress.note(f"step {step}: held-out {row['eval']}")

    with torch.enable_grad():
        function(config, target, overwrite=overwrite, on_step=on_step)
    return Path(config.out)
