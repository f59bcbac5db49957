"""What every `specbench train` recipe shares: the data split, the batches, the
learning-rate schedule, the output directory, and the training log."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import torch

from specbench.engine.options import CommandConfig, option
from specbench.errors import UserError
from specbench.files import atomic_write_text
from specbench.train.data import TrainData, load_data, load_data_dirs, prepare_out

# the recipes' shared API, the data directory's three names re-exported with it
__all__ = ["TRAIN_LOG", "ProgressFn", "TrainConfig", "TrainData", "TrainLog", "TrainVocab", "batches", "chain_scores", "load_data",
           "lr_factor", "prepare_out", "sequence", "split_data", "train_loop", "train_vocab"]

TRAIN_LOG = "specbench_train.json"


@dataclass
class TrainConfig(CommandConfig):
    """What `specbench train` trains and how; each field's help is what `--help` shows."""

    drafter: str = option(MISSING, "what to train: a drafter that declares a training recipe (draft-model, medusa, hydra, hydra-decoder, eagle, eagle3)")
    data: str = option(MISSING, "a data directory from `specbench train-data` (same target), or several separated by commas, "
                                "trained on as one")
    out: str = option(MISSING, "the checkpoint directory to write")
    target: str = option("smollm2-135m", "the frozen target the drafter is trained for")
    steps: int = option(200, "optimiser steps", min=1)
    batch_tokens: int = option(2048, "answer tokens per optimiser step (whole sequences, packed)", min=1)
    max_length: int = option(1024, "cut sequences to this many tokens", min=1)
    lr: float | None = option(None, "peak learning rate (AdamW); default per drafter (specbench.train.recipes)", gt=0)
    warmup_steps: int = option(20, "linear learning-rate warmup steps, then cosine decay", min=0)
    min_lr_ratio: float = option(0.33, "the cosine ends at this fraction of --lr (Hydra++'s 0.33)", min=0, max=1)
    weight_decay: float = 0.0
    eval_every: int = option(50, "teacher-forced acceptance on held-out data every N steps", min=1)
    eval_data: str | None = option(None, "held-out data directory (e.g. train-data on pool-heldout); default: hold out --eval-fraction of --data")
    # at most 0.9: what is not held out is trained on
    eval_fraction: float = option(0.1, "fraction of --data sequences held out when no --eval-data", gt=0, max=0.9)
    seed: int = option(0, "seed for shuffling and initialisation", min=0, max=2**63 - 1)
    train_vocab: str = option("all", "all: losses over the whole vocabulary; seen: only over ids the training data contains "
                                     "(an order of magnitude cheaper on large vocabularies; evaluation stays full)", choices=("all", "seen"))
    max_minutes: float | None = option(None, "stop after this many minutes of training (the step under way ends, then the last "
                                             "evaluation and the checkpoint); the cosine then runs on the share of the time spent, "
                                             "or of --steps when that is further on", gt=0)
    options: dict = field(default_factory=dict)  # the recipe's own options (Drafter.recipe.Options), checked


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, time_share: float = 0.0) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total`, or at the end of the
    time budget when `time_share` (the share of it spent) is further on."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_share))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_data(config: TrainConfig, target, need_hidden: bool, need_taps: bool = False) -> tuple[TrainData, list[int], TrainData, list[int]]:
    """(train data, its sequence indices, eval data, its sequence indices)."""
    data = load_data_dirs(config.data, target, with_hidden=need_hidden, with_taps=need_taps)
    if config.eval_data:
        evald = load_data_dirs(config.eval_data, target, with_hidden=need_hidden, with_taps=need_taps)
        return data, list(range(len(data))), evald, list(range(len(evald)))
    order = list(range(len(data)))
    random.Random(config.seed).shuffle(order)
    n_eval = max(1, int(round(len(order) * config.eval_fraction))) if len(order) > 1 else 0
    if n_eval == 0:
        raise UserError(f"data '{config.data}' holds a single sequence: too little to train and evaluate on; make more with train-data")
    if n_eval >= len(order):  # --eval-fraction 0.9 of 2 sequences rounds up to both
        raise UserError(f"--eval-fraction {config.eval_fraction:g} of the {len(order)} sequences in '{config.data}' leaves none to train on: "
                        "lower it, or give --eval-data")
    return data, sorted(order[n_eval:]), data, sorted(order[:n_eval])


def batches(data: TrainData, indices: list[int], batch_tokens: int, max_length: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled batches of sequence indices, about `batch_tokens` answer tokens each."""
    rng = random.Random(seed)
    while True:
        order = indices[:]
        rng.shuffle(order)
        batch, tokens = [], 0
        for i in order:
            ids, start = data.sequence(i)
            answer = max(1, min(len(ids), max_length) - start)
            batch.append(i)
            tokens += answer
            if tokens >= batch_tokens:
                yield batch
                batch, tokens = [], 0
        if batch:
            yield batch


def sequence(data: TrainData, i: int, max_length: int, device) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(ids [L] on device, answer start, cached hidden [L, H] or None), cut to max_length."""
    ids, start = data.sequence(i)
    hidden = data.hidden_of(i)
    ids = ids[:max_length].to(device)
    if hidden is not None:
        hidden = hidden[:max_length].to(device)
    return ids, min(start, len(ids)), hidden


class TrainVocab:
    """The ids the training losses' softmax spans: all of them, or (`--train-vocab seen`)
    only those that occur in the training data — every label is among them, and on a
    49152-token vocabulary a few thousand ids make the LM-head matmuls (most of the cost
    of training heads on CPU) an order of magnitude cheaper. Evaluation always uses the
    full vocabulary."""

    def __init__(self, ids: torch.Tensor | None, vocab_size: int, device) -> None:
        self.ids = None if ids is None else ids.to(device)
        self.size = vocab_size if ids is None else len(ids)
        self.index = None
        if ids is not None:
            self.index = torch.full((vocab_size,), -100, dtype=torch.long, device=device)
            self.index[self.ids] = torch.arange(len(ids), device=device)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.ids is None:
            return torch.nn.functional.linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight[self.ids], None if bias is None else bias[self.ids])

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.index is None else self.index[labels]


def train_vocab(config: TrainConfig, data: TrainData, indices: list[int], vocab_size: int, device) -> TrainVocab:
    if config.train_vocab == "all":  # else "seen", the one other choice its declaration allows
        return TrainVocab(None, vocab_size, device)
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    for i in indices:
        seen[data.sequence(i)[0][: config.max_length]] = True
    return TrainVocab(seen.nonzero().flatten(), vocab_size, device)


@dataclass
class TrainLog:
    """The log written beside the checkpoint: config, loss history, evaluations, timing."""

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    stopped: dict | None = None  # set when --max-minutes ended training before --steps

    def save(self, out: Path, extra: dict | None = None) -> None:
        blob = {
            "config": asdict(self.config),
            "seconds": round(time.time() - self.started, 1),
            "history": self.history,
            "evals": self.evals,
            **({"stopped": self.stopped} if self.stopped else {}),
            **(extra or {}),
        }
        atomic_write_text(out / TRAIN_LOG, json.dumps(blob, indent=1) + "\n")


def chain_scores(hits: torch.Tensor, shown: int | None = None) -> dict:
    """Held-out scores from `hits` [positions, depth] (draft token == target's at each depth):
    top-1 per depth, the chain acceptance a greedy chain gets per depth (all shallower depths
    right too) and its τ estimate, 1 + their sum over every depth; `shown` cuts the listed depths."""
    chain = hits.cumprod(dim=1).float().mean(0)
    return {"top1_per_depth": [round(float(x), 4) for x in hits.float().mean(0)[:shown]],
            "chain_accept_per_depth": [round(float(x), 4) for x in chain[:shown]],
            "tau_chain_estimate": round(1 + float(chain.sum()), 3), "positions": int(hits.shape[0])}


ProgressFn = Callable[[int, dict], None]  # (step, {"loss": ..., per-head losses, eval results})


def train_loop(
    config: TrainConfig,
    params: list[torch.nn.Parameter],
    step_loss: Callable[[list[int]], tuple[torch.Tensor, dict]],
    evaluate: Callable[[], dict],
    batch_iter: Iterator[list[int]],
    log: TrainLog,
    on_step: ProgressFn | None = None,
) -> None:
    """Evaluate once before training (step 0), then AdamW over `params`; warmup + cosine to
    min_lr_ratio; evaluate every eval_every steps and at the end. With `max_minutes`, training
    ends after the first step that finishes past the budget (log.stopped says when) and the
    cosine follows the share of the budget spent where that is ahead of the steps'."""
    log.evals.append({"step": 0, **evaluate()})
    if on_step:
        on_step(0, {"step": 0, "eval": log.evals[0]})
    budget = config.max_minutes * 60 if config.max_minutes else None
    began = time.monotonic()
    share = lambda: (time.monotonic() - began) / budget if budget else 0.0  # noqa: E731
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: lr_factor(s, config.warmup_steps, config.steps, config.min_lr_ratio, share())
    )
    for step in range(config.steps):
        loss, parts = step_loss(next(batch_iter))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        row = {"step": step + 1, "loss": round(loss.item(), 5), "lr": schedule.get_last_lr()[0], **parts}
        log.history.append(row)
        out_of_time = budget is not None and step + 1 < config.steps and share() >= 1.0
        if out_of_time:
            log.stopped = {"reason": "--max-minutes", "max_minutes": config.max_minutes, "steps": step + 1,
                           "minutes": round((time.monotonic() - began) / 60, 2)}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps or out_of_time:
            result = {"step": step + 1, **evaluate()}
            log.evals.append(result)
            row = {**row, "eval": result}
        if on_step:
            on_step(step + 1, row)
        if out_of_time:
            break
