"""`specbench train --drafter eagle|eagle3`: self-distilled EAGLE-1 and EAGLE-3 drafts
on a frozen target, written in the published layouts (`drafters/eagle/layouts.py`),
so `--drafter eagle|eagle3 --weights DIR` loads them as it loads the published ones.

The network is the drafter's own (`drafters/eagle/model.EagleNet`), one layer of the
target's shape (hidden size, heads, MLP width, rotary base), its Linears drawn from
N(0, initializer_range) as transformers initialises a Llama. The embedding is the
target's, frozen and never stored.

- eagle (EAGLE-1): draft position i reads the target's final normed state f_i with the
  token x_{i+1} and predicts f_{i+1}; its logits are the target's LM head applied to
  that prediction, so the LM head is the target's too (not stored). Loss, as the EAGLE
  paper trains it: SmoothL1(out_i, f_{i+1}) (mean over the hidden dimension) +
  0.1 x the cross-entropy of the draft's distribution against the target's at i+1
  (softmax of the target's logits from f_{i+1}); input features get uniform noise
  U(-a, a) (`--feature-noise`, the paper's 0.1). `fc` has a bias (the reference's
  default; the config says `"bias": true`).
- eagle3 (EAGLE-3): the draft fuses the states entering layers 2, L//2, L-3 (cached by
  `train-data --hidden-taps eagle3`) through `fc`, and predicts over its own draft
  vocabulary: the `--draft-vocab` most frequent answer tokens of the training data,
  sorted ascending (d2t[d] = id - d, t2d marks them; the lowest unused ids pad a short
  list, as speculators pads). Its LM head starts as the target's rows for those ids.
  Training-time test: `--ttt-steps` passes, step s feeding each row its own output of
  step s-1 and the next true token, at the position and with the attention the drafter
  gives a depth-(s+1) node (`EagleNet.unrolled`). Loss of step s: the cross-entropy of
  the draft against the target's distribution restricted to the draft vocabulary,
  counted where the target's token is in the draft vocabulary (the reference's
  position mask; on greedy self-distilled data the target's token is the data's next
  token), weighted 0.8^s and summed over steps, as the reference trains.

Only answer positions count (tokens the target produced), like the heads. Held-out
evaluation is teacher-forced along the true text: the draft's top-1 at depth d is right
when it equals the target's greedy token there, with the draft fed its own outputs at
depth > 1 (`EagleNet.unrolled`); `chain_accept_per_depth[d]` is the rate at which depths
1..d+1 are all right, the acceptance a top-1 chain gets past depth d+1 under greedy
decoding, and `tau_chain_estimate` = 1 + their sum.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specbench.drafters.eagle.layouts import EAGLE1, EAGLE3, write_checkpoint
from specbench.drafters.eagle.model import EagleConfig, EagleNet
from specbench.engine.protocol import TrainableTarget
from specbench.errors import UserError
from specbench.train.common import TrainConfig, TrainLog, TrainVocab, batches, chain_scores, split_data, train_loop, train_vocab
from specbench.train.data import prepare_out

REGRESSION_WEIGHT, TOKEN_WEIGHT = 1.0, 0.1  # EAGLE-1's loss weights (the reference's v_w, p_w)
STEP_DECAY = 0.8  # EAGLE-3: step s's loss weighs 0.8^s (the reference's)
EVAL_DEPTH = 4  # draft depths scored on held-out data (a depth-3 tree drafts 3; EAGLE-2's depth 3 drafts 4)


def eagle3_layers(num_layers: int) -> tuple[int, int, int]:
    """The target layers EAGLE-3 fuses by default: the states entering 2, L//2 and L-3."""
    return (2, num_layers // 2, num_layers - 3)


def draft_config(target, version: int, draft_vocab: int) -> EagleConfig:
    """A one-layer draft of the target's shape."""
    cfg = target.config
    H, heads = target.hidden_size, cfg.num_attention_heads
    if H % heads:
        raise UserError(f"target '{target.name}': hidden size {H} is not a multiple of its {heads} attention heads; "
                        "an EAGLE draft takes head_dim = hidden / heads")
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    return EagleConfig(version=version, hidden_size=H, intermediate_size=cfg.intermediate_size, num_heads=heads,
                       num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=H // heads,
                       vocab_size=target.vocab_size, draft_vocab_size=draft_vocab if version == 3 else target.vocab_size,
                       target_hidden_size=H, hidden_act=getattr(cfg, "hidden_act", "silu"),
                       rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)), rope_theta=float(theta), fc_bias=version == 1)


def draft_vocabulary(data, indices: list[int], size: int, vocab_size: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `size` most frequent answer tokens of these sequences, sorted ascending; the counts).
    Ties go to the lower id; fewer than `size` seen tokens are padded with the lowest unused ids."""
    if not 1 <= size <= vocab_size:
        raise UserError(f"--draft-vocab must be between 1 and the target's {vocab_size} tokens (got {size})")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in indices:
        ids, start = data.sequence(i)
        counts += torch.bincount(ids[start:max_length], minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)  # stable: equal counts keep id order
    return order[:size].sort().values, counts


def fresh_draft(target, config: EagleConfig, draft_ids: torch.Tensor | None) -> EagleNet:
    net = EagleNet(config, embedding=target.input_embeddings)
    std = float(getattr(target.config, "initializer_range", 0.02))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        if config.version == 3:
            net.lm_head.weight.copy_(target.lm_head.weight.detach()[draft_ids.to(target.lm_head.weight.device)])
            if draft_ids.numel() != config.vocab_size:
                net.d2t.copy_(draft_ids - torch.arange(draft_ids.numel()))
                net.t2d.zero_()
                net.t2d[draft_ids] = True
    net = net.to(target.device, target.dtype)
    net.set_head(target.lm_head if config.version == 1 else net.lm_head, None if config.version == 1 else net.draft_to_target())
    return net


class EagleRecipe:
    """One sequence's losses and held-out scores for an EAGLE draft."""

    def __init__(self, target, net: EagleNet, layers: tuple[int, ...], steps: int, noise: float) -> None:
        self.target, self.net, self.layers, self.steps, self.noise = target, net, layers, steps, noise
        self.version = net.config.version
        if self.version == 3 and net.head_ids is not None:
            self.draft_row = torch.full((target.vocab_size,), -1, dtype=torch.long, device=target.device)
            self.draft_row[net.head_ids] = torch.arange(net.head_ids.numel(), device=target.device)
        else:
            self.draft_row = None

    def inputs(self, data, i: int, max_length: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        """(ids [n], answer start, final states [n, H], the draft's step-0 stream [n-1, W])."""
        a = int(data.offsets[i])
        ids, start = data.sequence(i)
        n = min(len(ids), max_length)
        device, dtype = self.target.device, self.target.dtype
        final = data.hidden[a : a + n].to(device, dtype)
        if self.version == 1:
            stream = final[: n - 1]
        else:
            stream = data.taps_of(i, self.layers)[:n].to(device, dtype)[: n - 1]
        return ids[:n].to(device), min(start, n), final, stream

    def teacher(self, final: torch.Tensor, vocab: TrainVocab | None) -> torch.Tensor:
        """The target's logits from its final states, over the vocabulary the draft predicts."""
        weight = self.target.lm_head.weight
        with torch.no_grad():
            if self.version == 3:
                ids = self.net.head_ids
                return F.linear(final, weight[ids] if ids is not None else weight).float()
            return (vocab.linear(final, weight) if vocab is not None else F.linear(final, weight)).float()

    def draft_logits(self, out: torch.Tensor, vocab: TrainVocab | None) -> torch.Tensor:
        if self.version == 1 and vocab is not None:
            return vocab.linear(out, self.target.lm_head.weight).float()
        return self.net.logits(out)

    def losses(self, ids, start, final, stream, vocab: TrainVocab | None, train: bool) -> dict[str, tuple[torch.Tensor, int]]:
        """Named (summed loss, count) over the answer positions of one sequence."""
        n = ids.numel()
        if self.version == 1:
            if train and self.noise:
                stream = stream + (torch.rand_like(stream) * 2 - 1) * self.noise
            out = self.net.context(ids[1:], stream)
            rows = torch.arange(max(start - 2, 0), n - 2, device=ids.device)  # out_i predicts f_{i+1}, x_{i+2}; f_{n-1} is not cached
            if not rows.numel():
                zero = out.sum() * 0
                return {"regression": (zero, 0), "token": (zero, 0)}
            regression = F.smooth_l1_loss(out[rows].float(), final[rows + 1].float(), reduction="none").mean(-1).sum()
            p = torch.softmax(self.teacher(final[rows + 1], vocab), dim=-1)
            token = -(p * torch.log_softmax(self.draft_logits(out[rows], vocab), dim=-1)).sum()
            return {"regression": (regression, rows.numel()), "token": (token, rows.numel())}
        outputs = self.net.unrolled(ids, stream, self.steps)
        teacher = torch.softmax(self.teacher(final, None), dim=-1)  # [n, Vd]; row n-1 unused
        parts = {}
        for s, out in enumerate(outputs):
            rows = torch.arange(max(start - 2 - s, 0), max(n - 2 - s, 0), device=ids.device)  # row i predicts x_{i+2+s} from p at i+1+s
            if self.draft_row is not None and rows.numel():
                rows = rows[self.draft_row[ids[rows + 2 + s]] >= 0]  # the target's token is in the draft vocabulary
            if not rows.numel():
                parts[f"step{s}"] = (out.sum() * 0, 0)
                continue
            logp = torch.log_softmax(self.net.logits(out[rows]), dim=-1)
            parts[f"step{s}"] = (-(teacher[rows + 1 + s] * logp).sum(), rows.numel())
        return parts

    def combine(self, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> tuple[torch.Tensor, dict[str, float]]:
        means = {k: sums[k] / max(counts[k], 1) for k in sums}
        if self.version == 1:
            total = REGRESSION_WEIGHT * means["regression"] + TOKEN_WEIGHT * means["token"]
        else:
            total = sum(STEP_DECAY**s * means[f"step{s}"] for s in range(self.steps))
        return total, {k: round(float(v.detach()) if torch.is_tensor(v) else float(v), 4) for k, v in means.items()}

    @torch.no_grad()
    def score(self, ids, start, final, stream) -> torch.Tensor | None:
        """[rows, EVAL_DEPTH] booleans: the draft's top-1 at depth d+1 equals the target's
        greedy token, along the true text (rows whose every depth is in the answer)."""
        n = ids.numel()
        rows = torch.arange(max(start - 2, 0), n - 1 - EVAL_DEPTH, device=ids.device)
        if not rows.numel():
            return None
        greedy = F.linear(final[: n - 1], self.target.lm_head.weight).argmax(-1)  # the target's token after position p
        outputs = self.net.unrolled(ids, stream, EVAL_DEPTH)
        hits = [self.net.to_target(self.net.logits(out[rows]).argmax(-1)) == greedy[rows + 1 + d] for d, out in enumerate(outputs)]
        return torch.stack(hits, dim=1)


def train_eagle(config: TrainConfig, target: TrainableTarget, overwrite: bool = False, on_step=None) -> dict:
    options = config.options
    version = 3 if config.drafter == "eagle3" else 1
    steps = int(options.get("ttt_steps", 1)) if version == 3 else 1
    noise = float(options.get("feature_noise", 0.0)) if version == 1 else 0.0
    if not noise >= 0 or noise == float("inf"):
        raise UserError(f"--feature-noise must be a finite number >= 0 (got {noise})")
    layers = eagle3_layers(target.num_layers) if version == 3 else ()
    if version == 3 and not all(0 <= j < target.num_layers for j in layers):
        raise UserError(f"target '{target.name}' has {target.num_layers} layers, too few for EAGLE-3's taps {list(layers)} (2, L//2, L-3)")
    out = Path(config.out)
    data, train_idx, evald, eval_idx = split_data(config, target, need_hidden=True, need_taps=version == 3)
    for d in {id(data): data, id(evald): evald}.values():
        if d.hidden is None:
            raise UserError(f"data '{d.directory}' has no cached hidden states; {config.drafter} trains from them: "
                            "regenerate it without --no-cache-hidden")
        if version == 3:
            d.require_taps(layers, "eagle3")
    draft_ids, counts = None, None
    if version == 3:
        draft_ids, counts = draft_vocabulary(data, train_idx, int(options.get("draft_vocab", 8192)), target.vocab_size, config.max_length)
    prepare_out(out, overwrite, "checkpoint directory")
    net = fresh_draft(target, draft_config(target, version, draft_ids.numel() if draft_ids is not None else target.vocab_size), draft_ids)
    net.requires_grad_(True)
    recipe = EagleRecipe(target, net, layers, steps, noise)
    vocab = train_vocab(config, data, train_idx, target.vocab_size, target.device) if version == 1 else None
    vocab = vocab if vocab is not None and vocab.ids is not None else None

    def step_loss(batch):
        sums, counts_ = {}, {}
        for i in batch:
            for key, (loss, count) in recipe.losses(*recipe.inputs(data, i, config.max_length), vocab, train=True).items():
                sums[key] = sums.get(key, 0) + loss
                counts_[key] = counts_.get(key, 0) + count
        return recipe.combine(sums, counts_)

    @torch.no_grad()
    def evaluate() -> dict:
        sums, counts_, hits = {}, {}, []
        for i in eval_idx:
            inputs = recipe.inputs(evald, i, config.max_length)
            for key, (loss, count) in recipe.losses(*inputs, None, train=False).items():
                sums[key] = sums.get(key, 0) + float(loss)
                counts_[key] = counts_.get(key, 0) + count
            scored = recipe.score(*inputs)
            if scored is not None:
                hits.append(scored)
        loss, parts = recipe.combine(sums, counts_)
        result = {"loss": round(float(loss), 4), "loss_parts": parts}
        if not hits:
            return {**result, "note": "held-out sequences too short to score"}
        return {**result, **chain_scores(torch.cat(hits))}

    log = TrainLog(config)
    params = [p for p in net.parameters() if p.requires_grad]
    train_loop(config, params, step_loss, evaluate, batches(data, train_idx, config.batch_tokens, config.max_length, config.seed), log, on_step)
    net.requires_grad_(False)
    write_checkpoint(out, net, EAGLE3 if version == 3 else EAGLE1, verifier=target.model_id)
    extra = {"kind": config.drafter, "trained_parameters": sum(p.numel() for p in params)}
    if version == 3:
        answer = counts.sum()
        extra |= {"taps": list(layers), "draft_vocab": int(draft_ids.numel()),
                  "draft_vocab_coverage": round(float(counts[draft_ids].sum() / max(int(answer), 1)), 4),
                  "distinct_answer_tokens": int((counts > 0).sum())}
    log.save(out, extra)
    return {"evals": log.evals, "history": log.history}
