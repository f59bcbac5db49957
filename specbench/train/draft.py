"""`specbench train --drafter draft-model`: distil a shallow draft from the target itself.

The draft is the target's own first `--layers` decoder layers (DSD's lesson:
depth drives draft latency, so keep it shallow and wide — the target's width),
its final norm, and the target's embedding table and LM head, which stay frozen
and tied to the target's. The layers and the norm are trained on the target's
own answers (`specbench train-data`) to match the target's next-token
distribution: forward KL(p_target ‖ p_draft) at every answer position.

The output is a plain transformers model directory (config, safetensors,
tokenizer): `--drafter draft-model --draft-model DIR` loads it like any other
draft. Because the embedding/LM head are frozen copies of the target's, a
bundled copy needs only the trained layers (see `specbench.train.bundle`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from specbench.engine.protocol import TrainableTarget
from specbench.errors import UserError
from specbench.train.common import (
    TrainConfig,
    TrainLog,
    batches,
    sequence,
    split_data,
    train_loop,
    train_vocab,
)
from specbench.train.data import prepare_out


def shallow_copy_config(config, layers: int):
    """The target's config with only its first `layers` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    for key in ("layer_types", "sliding_window_layers"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, value[:layers])
    return config


def build_draft(target_model, layers: int):
    """A causal LM of the target's class: the target's first `layers` layers, its final norm,
    its embedding table and LM head (shared tensors, frozen)."""
    from transformers import AutoModelForCausalLM

    total = target_model.config.num_hidden_layers
    if not 1 <= layers < total:
        raise UserError(f"--layers must be between 1 and {total - 1} (the target has {total} layers); got {layers}")
    config = shallow_copy_config(target_model.config, layers)
    param = next(target_model.parameters())
    draft = AutoModelForCausalLM.from_config(config, dtype=param.dtype).to(param.device)
    source = target_model.state_dict()
    state = {k: v for k, v in source.items() if k in draft.state_dict()}
    missing = set(draft.state_dict()) - set(state)
    if missing:
        raise UserError(f"cannot build a draft from '{type(target_model).__name__}': no weights for {sorted(missing)[:3]}")
    draft.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    # the vocabulary side is the target's, frozen: only layers + norm train
    draft.get_input_embeddings().weight = target_model.get_input_embeddings().weight
    draft.get_output_embeddings().weight = target_model.get_output_embeddings().weight
    for p in (*draft.get_input_embeddings().parameters(), *draft.get_output_embeddings().parameters()):
        p.requires_grad_(False)
    return draft


def teacher_logits(target, ids: torch.Tensor, hidden: torch.Tensor | None, span: slice, vocab=None) -> torch.Tensor:
    """The frozen target's logits (fp32) at rows `span` of a sequence: from the cached hidden
    states when given, else from a forward of the target; over `vocab`'s ids only when given."""
    with torch.no_grad():
        if hidden is None:
            hidden = target.backbone(input_ids=ids[None]).last_hidden_state[0]
        hidden = hidden[span].to(target.dtype)
        return (vocab.linear(hidden, target.lm_head.weight) if vocab is not None else target.lm_head(hidden)).float()


def chain_acceptance(match: torch.Tensor, k: int) -> list[float]:
    """Teacher-forced chain acceptance from per-position top-1 matches [P] (bool):
    entry d-1 is the fraction of positions whose next d predictions all match — on greedy
    self-distilled data, exactly the rate at which a k-token chain gets past depth d."""
    out = []
    run = match.clone()
    for d in range(1, k + 1):
        if d > 1:
            run = run[:-1] & match[d - 1 :]
        out.append(float(run.float().mean()) if run.numel() else 0.0)
    return out


def train_draft_model(config: TrainConfig, target: TrainableTarget, overwrite: bool = False, on_step=None) -> dict:
    layers = int(config.options.get("layers", 1))
    k = int(config.options.get("k", 4))
    out = Path(config.out)
    data, train_idx, evald, eval_idx = split_data(config, target, need_hidden=True)
    prepare_out(out, overwrite, "checkpoint directory")
    draft = build_draft(target.model, layers)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    device = target.device
    vocab = train_vocab(config, data, train_idx, target.vocab_size, device)

    def positions(ids: torch.Tensor, start: int) -> slice:
        return slice(max(start - 1, 0), len(ids) - 1)  # predict answer tokens start..L-1

    def step_loss(batch: list[int]):
        total, count = 0.0, 0
        for i in batch:
            ids, start, hidden = sequence(data, i, config.max_length, device)
            span = positions(ids, start)
            teacher = teacher_logits(target, ids, hidden, span, vocab)
            h = draft.get_decoder()(input_ids=ids[None]).last_hidden_state[0, span]
            logq = F.log_softmax(vocab.linear(h, draft.get_output_embeddings().weight).float(), -1)
            logp = F.log_softmax(teacher, -1)
            total = total + (logp.exp() * (logp - logq)).sum()
            count += teacher.shape[0]
        loss = total / max(count, 1)
        return loss, {"kl": round(loss.item(), 5)}

    @torch.no_grad()
    def evaluate() -> dict:
        draft.eval()
        matches, kls = [], []
        for i in eval_idx:
            ids, start, hidden = sequence(evald, i, config.max_length, device)
            span = positions(ids, start)
            teacher = teacher_logits(target, ids, hidden, span)
            logits = draft(input_ids=ids[None]).logits[0, span].float()
            logp, logq = F.log_softmax(teacher, -1), F.log_softmax(logits, -1)
            kls.append((logp.exp() * (logp - logq)).sum(-1))
            matches.append(logits.argmax(-1) == teacher.argmax(-1))
        draft.train()
        accept = chain_acceptance(torch.cat(matches), k) if matches else [0.0] * k
        return {
            "kl": round(float(torch.cat(kls).mean()), 5) if kls else None,
            "top1": round(accept[0], 4),
            "accept_per_position": [round(a, 4) for a in accept],
            "tau_estimate": round(1 + sum(accept), 3),
        }

    log = TrainLog(config)
    train_loop(config, params, step_loss, evaluate, batches(data, train_idx, config.batch_tokens, config.max_length, config.seed), log, on_step)
    draft.eval()
    save_draft(draft, target, out)
    log.save(out, {"kind": "draft-model", "layers": layers, "trained_parameters": sum(p.numel() for p in params)})
    return {"evals": log.evals, "history": log.history}


def save_draft(draft, target, out: Path) -> None:
    """A standalone transformers directory: untie from the live target first so the
    saved file holds its own copy of the (frozen, identical) vocabulary tables."""
    draft = copy.deepcopy(draft)
    draft.get_input_embeddings().weight = torch.nn.Parameter(draft.get_input_embeddings().weight.detach().clone())
    if getattr(draft.config, "tie_word_embeddings", False):
        draft.tie_weights()
    else:
        draft.get_output_embeddings().weight = torch.nn.Parameter(draft.get_output_embeddings().weight.detach().clone())
    draft.save_pretrained(out)
    if target.tokenizer is not None:
        target.tokenizer.save_pretrained(out)
