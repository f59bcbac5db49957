"""`train --drafter dflash`: a DFlash v1 draft for the frozen target, written in z-lab's
v1 layout (docs/dflash.md).

Data: `train-data --hidden-taps dflash` caches the states the draft reads (the outputs of
the layers z-lab's tap rule picks). Per sequence, random anchors in the answer; each
anchor's block [anchor, mask x (b - 1)] sees the context features of the positions before
it (exactly what the drafter shows it online) and is trained to predict the b - 1 tokens
after the anchor, position i weighted exp(-(i - 1) / decay): later positions, which are
accepted only when every earlier one is, weigh less. Held out: the teacher-forced chain
acceptance at every answer position, per depth, and the τ it implies.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from specbench.drafters.dflash.layouts import tap_rule, write_v1
from specbench.drafters.dflash.model import DFlashConfig, DFlashNet
from specbench.errors import UserError
from specbench.train.common import TrainConfig, TrainLog, batches, chain_scores, split_data, train_loop
from specbench.train.data import prepare_out

MASK_NAMES = ("<|MASK|>", "<empty_output>")  # z-lab's Qwen3 mask token; SmolLM2's unused special


def mask_token(target) -> int:
    """A row of the target's table for the mask: a named unused special if the tokenizer has one,
    else the last id."""
    tokenizer = target.tokenizer
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    for name in MASK_NAMES:
        if name in vocab and vocab[name] < target.vocab_size:
            return int(vocab[name])
    return target.vocab_size - 1


def draft_config(target, block: int, layers: int, taps: int) -> DFlashConfig:
    """A Qwen3-style draft of the target's geometry (as z-lab's drafts copy their target's)."""
    cfg = target.config
    H, heads = target.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or H // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    ids = tuple(tap_rule(target.num_layers, taps))
    if min(ids) < 0 or max(ids) + 1 >= target.num_layers:
        raise UserError(f"target '{target.name}' has {target.num_layers} layers, too few for {taps} DFlash taps {list(ids)}")
    return DFlashConfig(layout="dflash", hidden_size=H, intermediate_size=cfg.intermediate_size, num_heads=heads,
                        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim, num_layers=layers,
                        block_size=block, mask_token_id=mask_token(target), target_layer_ids=ids, causal=(False,) * layers,
                        sliding_window=(None,) * layers, vocab_size=target.vocab_size, num_target_layers=target.num_layers,
                        hidden_act=getattr(cfg, "hidden_act", "silu"), rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
                        rope_theta=float(theta))


def fresh_draft(target, config: DFlashConfig) -> DFlashNet:
    net = DFlashNet(config, target.hidden_size)
    std = float(getattr(target.config, "initializer_range", 0.02))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
    net = net.to(target.device, target.dtype)
    net.set_target(target.input_embeddings, target.lm_head)
    return net


class DFlashRecipe:
    def __init__(self, net: DFlashNet, layers: tuple[int, ...], anchors: int, decay: float, seed: int) -> None:
        self.net, self.layers, self.anchors, self.decay = net, layers, anchors, decay
        b = net.config.block_size
        self.weights = torch.tensor([math.exp(-i / decay) for i in range(b - 1)])
        self.generator = torch.Generator().manual_seed(seed)

    def inputs(self, data, i: int, max_length: int):
        ids, start = data.sequence(i)
        ids = ids[:max_length]
        features = data.taps_of(i, self.layers)[: len(ids)]
        device = self.net.fc.weight.device
        return ids.to(device), min(start, len(ids)), features.to(device, self.net.fc.weight.dtype)

    def blocks(self, ids: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft logits [A, b - 1, V], labels [A, b - 1], -100 past the end) for blocks at `anchors`."""
        c = self.net.config
        b, n = c.block_size, ids.numel()
        block = torch.full((anchors.numel(), b), c.mask_token_id, dtype=torch.long, device=ids.device)
        block[:, 0] = ids[anchors]
        context = self.net.context_kv(features[: n - 1], torch.arange(n - 1, device=ids.device))
        out = self.net.block(block, anchors, context, anchors)[:, 1:]
        index = anchors[:, None] + torch.arange(1, b, device=ids.device)[None]
        labels = torch.where(index < n, ids[index.clamp(max=n - 1)], torch.full_like(index, -100))
        return self.net.logits(out), labels

    def anchor_range(self, n: int, start: int) -> torch.Tensor:
        """Anchors whose next token lies in the answer: positions start - 1 .. n - 2 (at least 1)."""
        return torch.arange(max(start - 1, 1), n - 1)

    def loss(self, ids, start, features) -> tuple[torch.Tensor, float]:
        every = self.anchor_range(ids.numel(), start)
        if not every.numel():
            return None, 0.0
        pick = every[torch.randperm(every.numel(), generator=self.generator)[: self.anchors]].to(ids.device)
        logits, labels = self.blocks(ids, features, pick)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none")
        weights = self.weights.to(ce.device)[None].expand_as(labels).reshape(-1) * (labels.reshape(-1) >= 0)
        return (ce * weights).sum(), float(weights.sum())

    @torch.no_grad()
    def score(self, ids, start, features) -> torch.Tensor | None:
        """[anchors, b - 1] bool: the draft's greedy token equals the true one (False past the end)."""
        every = self.anchor_range(ids.numel(), start).to(ids.device)
        if not every.numel():
            return None
        logits, labels = self.blocks(ids, features, every)
        return logits.argmax(-1) == labels


def train_dflash(config: TrainConfig, target, overwrite: bool = False, on_step=None) -> dict:
    options = config.options
    block, layers_n, taps_n = int(options.get("block_size", 16)), int(options.get("draft_layers", 5)), 5
    anchors, decay = int(options.get("anchors", 16)), float(options.get("loss_decay", 7.0))
    if block < 2:
        raise UserError(f"--block-size must be at least 2 (got {block})")
    if not decay > 0 or decay == float("inf"):
        raise UserError(f"--loss-decay must be a finite number > 0 (got {decay})")
    net_config = draft_config(target, block, layers_n, taps_n)
    taps = net_config.taps
    out = Path(config.out)
    data, train_idx, evald, eval_idx = split_data(config, target, need_hidden=False, need_taps=True)
    for d in {id(data): data, id(evald): evald}.values():
        d.require_taps(taps, "dflash")
    prepare_out(out, overwrite, "checkpoint directory")
    net = fresh_draft(target, net_config)
    net.requires_grad_(True)
    recipe = DFlashRecipe(net, taps, anchors, decay, config.seed)

    def step_loss(batch):
        total, weight = 0, 0.0
        for i in batch:
            loss, w = recipe.loss(*recipe.inputs(data, i, config.max_length))
            if loss is not None:
                total, weight = total + loss, weight + w
        if not weight:
            raise UserError("no training sequence has an answer token to predict; regenerate the data with longer answers")
        return total / weight, {}

    @torch.no_grad()
    def evaluate() -> dict:
        hits = [h for i in eval_idx if (h := recipe.score(*recipe.inputs(evald, i, config.max_length))) is not None]
        if not hits:
            return {"note": "held-out sequences too short to score"}
        return chain_scores(torch.cat(hits), shown=8)

    log = TrainLog(config)
    params = [p for p in net.parameters() if p.requires_grad]
    train_loop(config, params, step_loss, evaluate, batches(data, train_idx, config.batch_tokens, config.max_length, config.seed), log, on_step)
    net.requires_grad_(False)
    tokenizer = target.tokenizer
    write_v1(out, net, torch.float32, getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
    log.save(out, {"kind": "dflash", "taps": list(taps), "target_layer_ids": list(net_config.target_layer_ids),
                   "block_size": block, "mask_token_id": net_config.mask_token_id, "loss_decay": decay,
                   "trained_parameters": sum(p.numel() for p in params)})
    return {"evals": log.evals, "history": log.history}
