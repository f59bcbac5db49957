"""`specbench train --drafter medusa|hydra|hydra-decoder`: draft heads on a frozen target.

The modules are the drafters' own (specbench.drafters.heads.modules), initialised as
the references initialise them (ResBlocks at identity — zero `linear` weight —
and LM heads copied from the target's `lm_head`), and the checkpoints are
written in the published layouts, so the drafters load them exactly as they
load the published ones:

- medusa: `config.json` (`base_model_name_or_path`, `medusa_num_heads`,
  `medusa_num_layers`) + `medusa_lm_head.pt`, keys `{h}.0.linear.*` and
  `{h}.1.weight` — or, with `--tie-lm-head`, no `{h}.1.weight` ("version 2"
  heads that read the base LM head). Medusa-1 loss: the sum over heads of the
  cross-entropy of head k at position t against the token at t+k+2.
- hydra (Hydra++, arch prefix-mlp): `config.json` (`hydra_head_arch`,
  `hydra_num_heads`, `hydra_num_layers`, `grounded_heads`,
  `hidden_state_offset`) + `hydra_lm_head.pt` with `hydra_mlp.*`,
  `hydra_lm_head.{h}.1.*`, `prefix_embeding_layer.*` and `input_embed_fn.weight`
  — or, with `--tie-lm-head`, neither LM heads nor the embedding copy: the
  heads read the target's (what makes them small enough to bundle).
  Teacher loss: cross-entropy of head h at t against softmax of the base
  logits at t+h+1 (the base model's own distribution for x_{t+h+2}); heads
  read the teacher-forced embeddings of the true next tokens; dropout 0.2.
- hydra-decoder: `config.json` (`medusa_num_heads`, `medusa_num_layers`,
  `medusa_num_decoder_layers`) + `medusa_lm_head.pt` holding `medusa_head`,
  `medusa_rms_norm` and `medusa_decoder_layers` (as tensors, which the loader
  reads like the published pickled modules); a trunk of N decoder layers
  copied from the target's last N, reading the hidden state that enters layer
  L-N, trained with the Medusa-1 loss through the heads.

Medusa and Hydra train from the cached final hidden states (train-data's
`hidden.safetensors`): the target body never runs. The decoder variant needs
an intermediate layer's state, so it runs the target per batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specbench.engine.protocol import TrainableTarget
from specbench.train.common import (
    TrainConfig,
    TrainLog,
    TrainVocab,
    batches,
    sequence,
    split_data,
    train_loop,
    train_vocab,
)
from specbench.train.data import prepare_out

HYDRA_DROPOUT = 0.2


class HeadRecipe:
    """One drafter kind: build the trainable modules, compute per-head logits over a
    sequence, and write the checkpoint."""

    soft_targets = False  # Hydra++: distil the base distribution; Medusa: hard labels

    def __init__(self, target, num_heads: int, tie_lm_head: bool, options: dict) -> None:
        self.target, self.num_heads, self.tie = target, num_heads, tie_lm_head
        self.options = options

    def modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor, hidden: torch.Tensor, vocab: TrainVocab | None = None) -> list[torch.Tensor]:
        """Per head h, logits [L - h - 2, V] at positions t = 0..L-h-3 (each predicts x_{t+h+2});
        over `vocab`'s ids only when given."""
        raise NotImplementedError

    def save(self, out: Path) -> None:
        raise NotImplementedError

    def needs_body(self) -> bool:
        return False

    def parameters(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for module in self.modules():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)


def _tensors(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module_state.items()}


class MedusaRecipe(HeadRecipe):
    def __init__(self, target, num_heads, tie_lm_head, options) -> None:
        super().__init__(target, num_heads, tie_lm_head, options)
        from specbench.drafters.heads.medusa import fresh_medusa_heads
        from specbench.drafters.heads.modules import MedusaHeads

        if tie_lm_head:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self.heads = MedusaHeads(num_heads, 1, target.hidden_size, target.vocab_size, target.lm_head)
            self.heads = self.heads.to(target.device, target.dtype)
        else:
            self.heads = fresh_medusa_heads(target, num_heads)
        self.heads.requires_grad_(True)

    def modules(self):
        return [self.heads]

    def head_input(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def logits(self, ids, hidden, vocab=None):
        x = self.head_input(ids, hidden)
        out = []
        for h, head in enumerate(self.heads.heads):
            rows = x[: max(len(ids) - h - 2, 0)]
            if self.tie:
                y, lm = head(rows), self.target.lm_head
            else:
                y, lm = head[:-1](rows), head[-1]
            out.append(vocab.linear(y, lm.weight) if vocab is not None else lm(y))
        return out

    def config(self) -> dict:
        return {"base_model_name_or_path": self.target.model_id, "medusa_num_heads": self.num_heads, "medusa_num_layers": 1}

    def save(self, out: Path) -> None:
        (out / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        torch.save(_tensors(self.heads.heads.state_dict()), out / "medusa_lm_head.pt")


class DecoderRecipe(MedusaRecipe):
    """Medusa heads behind a trunk of N decoder layers copied from the target's last N."""

    def __init__(self, target, num_heads, tie_lm_head, options) -> None:
        super().__init__(target, num_heads, tie_lm_head, options)
        from specbench.drafters.heads.decoder import TrunkDepth, copied_trunk

        self.n = TrunkDepth(options.get("decoder_layers")).layers_to_copy()
        self.trunk = copied_trunk(target, self.n)
        self.trunk.requires_grad_(True)
        self.trunk.model.get_input_embeddings().requires_grad_(False)

    def modules(self):
        return [self.heads, self.trunk]

    def needs_body(self) -> bool:
        return True

    def head_input(self, ids, hidden):
        # `hidden` here is the state entering target layer L - N (see body_states)
        positions = torch.arange(len(ids), device=ids.device)
        return self.trunk.model(inputs_embeds=hidden[None], position_ids=positions[None]).last_hidden_state[0]

    def body_states(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.target.backbone(input_ids=ids[None], output_hidden_states=True)
        return out.hidden_states[self.target.num_layers - self.n][0]

    def config(self) -> dict:
        return {**super().config(), "medusa_num_decoder_layers": self.n}

    def save(self, out: Path) -> None:
        (out / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        layers = self.trunk.layer_state_dict()
        torch.save(
            {
                "medusa_head": _tensors(self.heads.heads.state_dict()),
                "medusa_rms_norm": _tensors({"weight": layers["norm.weight"]}),
                "medusa_decoder_layers": _tensors({k.removeprefix("layers."): v for k, v in layers.items() if k.startswith("layers.")}),
            },
            out / "medusa_lm_head.pt",
        )


class HydraRecipe(HeadRecipe):
    soft_targets = True

    def __init__(self, target, num_heads, tie_lm_head, options) -> None:
        super().__init__(target, num_heads, tie_lm_head, options)
        from specbench.drafters.heads.hydra import fresh_hydra_heads

        self.num_layers = int(options.get("hydra_layers", 4))  # at least 1: HydraTraining declares it
        self.heads, self.prefix = fresh_hydra_heads(target, num_heads, self.num_layers, tie_lm_head=tie_lm_head)
        self.prefix = self.prefix.to(target.device, target.dtype)
        self.heads.requires_grad_(True)
        self.prefix.requires_grad_(True)
        self.prefix.model.get_input_embeddings().requires_grad_(False)
        self.embed = target.model.get_input_embeddings()  # frozen: teacher-forced embeddings of the true tokens
        for module in self.heads.modules():
            if isinstance(module, nn.Dropout):
                module.p = HYDRA_DROPOUT

    def modules(self):
        return [self.heads, self.prefix]

    def logits(self, ids, hidden, vocab=None):
        positions = torch.arange(len(ids), device=ids.device)
        base = self.prefix.model(inputs_embeds=hidden[None], position_ids=positions[None]).last_hidden_state[0]
        with torch.no_grad():
            emb = self.embed(ids)
        out = []
        for h in range(self.num_heads):
            n = max(len(ids) - h - 2, 0)  # positions t whose target x_{t+h+2} exists
            # concat[base(t), emb(x_{t+1}), ..., emb(x_{t+h+1})]
            features = torch.cat([base[:n], *[emb[j + 1 : j + 1 + n] for j in range(h + 1)]], dim=-1)
            y = self.heads.hydra_mlp[h](features)
            lm = self.heads.lm_head_weights()[h]
            if self.heads.arch == "prefix-mlp":
                y = self.heads.hydra_lm_head[h][0](y)  # its Dropout
            out.append(vocab.linear(y, lm.weight, lm.bias) if vocab is not None else lm(y))
        return out

    def save(self, out: Path) -> None:
        config = {
            "base_model_name_or_path": self.target.model_id,
            "grounded_heads": True,
            "hidden_state_offset": 0,
            "hydra_head_arch": "prefix-mlp",
            "hydra_num_heads": self.num_heads,
            "hydra_num_layers": self.num_layers,
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = _tensors(self.heads.state_dict())
        state |= {f"prefix_embeding_layer.{k}": v for k, v in _tensors(self.prefix.layer_state_dict()).items()}
        if not self.tie:  # tied heads read the target's own tables: no LM heads, no embedding copy
            state["input_embed_fn.weight"] = self.embed.weight.detach().cpu().clone()
        torch.save(state, out / "hydra_lm_head.pt")


RECIPES = {"medusa": MedusaRecipe, "hydra": HydraRecipe, "hydra-decoder": DecoderRecipe}


def head_losses(recipe: HeadRecipe, ids: torch.Tensor, start: int, logits: list[torch.Tensor], teacher: torch.Tensor | None, vocab: TrainVocab | None = None):
    """Per head: (summed loss, count) over positions t whose target token x_{t+h+2} is in the answer."""
    out = []
    for h, lg in enumerate(logits):
        n = lg.shape[0]
        first = max(start - h - 2, 0)  # t + h + 2 >= start
        if n <= first:
            out.append((lg.sum() * 0, 0))
            continue
        lg = lg[first:n].float()
        if recipe.soft_targets:
            soft = F.softmax(teacher[first + h + 1 : n + h + 1], dim=-1)
            loss = -(soft * F.log_softmax(lg, -1)).sum()
        else:
            labels = ids[first + h + 2 : n + h + 2]
            loss = F.cross_entropy(lg, vocab.labels(labels) if vocab is not None else labels, reduction="sum")
        out.append((loss, n - first))
    return out


def train_heads(config: TrainConfig, target: TrainableTarget, overwrite: bool = False, on_step=None) -> dict:
    options = config.options
    from specbench.drafters.heads.base import HeadCount

    num_heads = HeadCount(options.get("num_heads")).heads_to_make()
    out = Path(config.out)
    recipe_cls = RECIPES[config.drafter]
    data, train_idx, evald, eval_idx = split_data(config, target, need_hidden=recipe_cls is not DecoderRecipe)
    prepare_out(out, overwrite, "checkpoint directory")
    recipe = recipe_cls(target, num_heads, bool(options.get("tie_lm_head")), options)
    recipe.train()
    device = target.device
    vocab = train_vocab(config, data, train_idx, target.vocab_size, device)

    def states(d, i, restrict: TrainVocab | None = None):
        ids, start, hidden = sequence(d, i, config.max_length, device)
        if recipe.needs_body():
            hidden = recipe.body_states(ids)
        elif hidden is None:
            with torch.no_grad():
                hidden = target.backbone(input_ids=ids[None]).last_hidden_state[0]
        hidden = hidden.to(target.dtype)
        teacher = None
        if recipe.soft_targets:
            with torch.no_grad():
                teacher = (restrict.linear(hidden, target.lm_head.weight) if restrict is not None else target.lm_head(hidden)).float()
        return ids, start, hidden, teacher

    def step_loss(batch):
        sums = [0.0] * num_heads
        counts = [0] * num_heads
        for i in batch:
            ids, start, hidden, teacher = states(data, i, vocab)
            for h, (loss, count) in enumerate(head_losses(recipe, ids, start, recipe.logits(ids, hidden, vocab), teacher, vocab)):
                sums[h] = sums[h] + loss
                counts[h] += count
        per_head = [s / max(c, 1) for s, c in zip(sums, counts)]
        total = sum(per_head)
        return total, {f"head{h}": round(float(v.detach()) if torch.is_tensor(v) else v, 4) for h, v in enumerate(per_head)}

    @torch.no_grad()
    def evaluate() -> dict:
        """Teacher-forced acceptance per head on held-out data: head h is right at t when its
        top-1 equals the base model's greedy token for x_{t+h+2}; `chain` is the rate at which
        heads 0..h are all right (a chain draft accepted past depth h + 1)."""
        recipe.train(False)
        right = [[] for _ in range(num_heads)]
        losses = [[0.0, 0] for _ in range(num_heads)]
        for i in eval_idx:
            ids, start, hidden, teacher = states(evald, i)
            logits = recipe.logits(ids, hidden)
            with torch.no_grad():
                greedy = target.lm_head(hidden).argmax(-1) if teacher is None else teacher.argmax(-1)
            for h, (loss, count) in enumerate(head_losses(recipe, ids, start, logits, teacher)):
                losses[h][0] += float(loss)
                losses[h][1] += count
            # positions t with x_{t+num_heads+1} in the answer, so every head is scored on the same t
            n = len(ids) - num_heads - 1
            first = max(start - 2, 0)
            if n <= first:
                continue
            for h in range(num_heads):
                right[h].append(logits[h][first:n].argmax(-1) == greedy[first + h + 1 : n + h + 1])
        recipe.train(True)
        if not right[0]:
            return {"note": "held-out sequences too short to score"}
        hits = [torch.cat(r) for r in right]
        chain, run = [], torch.ones_like(hits[0])
        for h in range(num_heads):
            run = run & hits[h]
            chain.append(round(float(run.float().mean()), 4))
        return {
            "loss_per_head": [round(s / max(c, 1), 4) for s, c in losses],
            "top1_per_head": [round(float(x.float().mean()), 4) for x in hits],
            "chain_accept_per_depth": chain,
            "tau_chain_estimate": round(1 + sum(chain), 3),
            "positions": int(hits[0].numel()),
        }

    log = TrainLog(config)
    train_loop(config, recipe.parameters(), step_loss, evaluate, batches(data, train_idx, config.batch_tokens, config.max_length, config.seed), log, on_step)
    recipe.train(False)
    recipe.save(out)
    log.save(out, {"kind": config.drafter, "trained_parameters": sum(p.numel() for p in recipe.parameters())})
    return {"evals": log.evals, "history": log.history}
