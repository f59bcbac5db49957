"""`specbench train`: which drafters can be trained, by which recipe, with which defaults.

A recipe is a function `(TrainConfig, target, overwrite, on_step) -> dict` in its own
module; `train` loads the frozen target, runs it and reports progress.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.train.common import TrainConfig


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
}


def recipe_for(drafter: str) -> Recipe:
    if drafter not in RECIPES:
        raise UserError(f"cannot train drafter '{drafter}': trainable drafters are {', '.join(RECIPES)}")
    return RECIPES[drafter]


def train(config: TrainConfig, device: str = "auto", dtype: str = "float32", overwrite: bool = False, progress: Progress = SILENT) -> Path:
    """Train `config.drafter` for the frozen `config.target`; the checkpoint directory."""
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype

    recipe = recipe_for(config.drafter)
    if config.steps < 1 or config.batch_tokens < 1:
        raise UserError("--steps and --batch-tokens must be at least 1")
    if config.eval_every < 1:
        raise UserError("--eval-every must be at least 1")
    config.options = {k: v for k, v in config.options.items() if k in recipe.options}
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
