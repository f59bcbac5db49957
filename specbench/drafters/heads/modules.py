"""The draft-head modules of Medusa and Hydra, laid out so that their state-dict
keys are exactly the published checkpoints' keys (see checkpoints.py).

- Medusa head h: ResBlock(s) then Linear(H -> V, no bias); with more than one
  layer the ResBlock is one shared module (the reference repeats the object).
  "Version 2" heads have no Linear of their own and use the base LM head.
- Hydra head h (grounded): its first block reads (h + 2) * H features — the
  base hidden state, then the embeddings of the root and of every token
  drafted before on the branch — through a ResBlock whose residual is itself
  a Linear; later blocks are one shared H -> H ResBlock; Linear(H -> V) with bias,
  or, for heads trained with a tied LM head (specbench's bundled heads), none:
  the base LM head is used, as for Medusa's "version 2" heads.
- OwnDecoder: decoder layers with their own final norm and their own KV cache,
  fed hidden states instead of token ids: Hydra++'s prefix layer and the
  decoder-layer Hydra trunk.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache

from specbench.drafters.checkpoints import ROTARY_TABLE
from specbench.engine import bf16_kernel, kv
from specbench.engine.compat import cache_kwargs
from specbench.engine.kv import StaticKV
from specbench.engine.lean_layer import runs_lean, stack_forward
from specbench.engine.packed import PackedLinear


class MedusaResBlock(nn.Module):
    """x + SiLU(W x + b)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # reference init: identity plus SiLU(bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """K Medusa heads; `forward(hidden [.., H])` -> logits [K, .., V]. Keys
    `{h}.{i}.linear.*` and `{h}.{L}.weight`, as in medusa_lm_head.pt."""

    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int, base_lm_head: nn.Module | None = None) -> None:
        super().__init__()
        # base_lm_head given: "version 2" heads without an LM head of their own
        self.base_lm_head = [base_lm_head]  # a list so it is not registered (not ours to save)
        heads = []
        for _ in range(num_heads):
            block = MedusaResBlock(hidden_size)
            layers: list[nn.Module] = [block] * num_layers  # one shared block, as the reference builds it
            if base_lm_head is None:
                layers.append(nn.Linear(hidden_size, vocab_size, bias=False))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        outs = [head(hidden) for head in self.heads]
        if self.base_lm_head[0] is not None:
            outs = [self.base_lm_head[0](o) for o in outs]
        return torch.stack(outs)

    def lm_head_weights(self) -> list[nn.Linear]:
        return [head[-1] for head in self.heads] if self.base_lm_head[0] is None else []


class HydraResBlock(nn.Module):
    """res_connection(x) + SiLU(linear(x)); the residual is a Linear when the input
    is wider than H (a grounded head's first block), else the identity."""

    def __init__(self, hidden_size: int, num_condition: int = 0) -> None:
        super().__init__()
        width = hidden_size * (num_condition + 1)
        self.linear = nn.Linear(width, hidden_size)
        self.res_connection = nn.Linear(width, hidden_size) if num_condition > 0 else nn.Identity()
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_connection(x) + self.act(self.linear(x))


class HydraHeads(nn.Module):
    """Hydra heads with the published keys. arch "mlp": `hydra_mlp.{h}.{0,1..}`,
    `hydra_lm_head.{h}.*`; arch "prefix-mlp" (Hydra++): Dropout at even indices,
    `hydra_mlp.{h}.{1,3,..}`, `hydra_lm_head.{h}.1.*`, plus `prefix_embeding_layer.*`
    (held separately, see OwnDecoder). Dropout is inert at inference. With
    `base_lm_head` the heads own no LM head (no `hydra_lm_head.*` weights)."""

    def __init__(self, arch: str, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int, grounded: bool = True,
                 base_lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.arch, self.grounded, self.num_heads = arch, grounded, num_heads
        self.base_lm_head = [base_lm_head]  # a list so it is not registered (not ours to save)
        mlp, lm = [], []
        for h in range(num_heads):
            first = HydraResBlock(hidden_size, h + 1 if grounded else 0)
            shared = HydraResBlock(hidden_size)
            if arch == "prefix-mlp":
                drop = nn.Dropout(0.0)
                mlp.append(nn.Sequential(nn.Dropout(0.0), first, *([drop, shared] * (num_layers - 1))))
                own = [nn.Linear(hidden_size, vocab_size)] if base_lm_head is None else []
                lm.append(nn.Sequential(nn.Dropout(0.0), *own))
            else:
                mlp.append(nn.Sequential(first, *([shared] * (num_layers - 1))))
                lm.append(nn.Linear(hidden_size, vocab_size) if base_lm_head is None else nn.Identity())
        self.hydra_mlp = nn.ModuleList(mlp)
        self.hydra_lm_head = nn.ModuleList(lm)

    @property
    def tied(self) -> bool:
        return self.base_lm_head[0] is not None

    def head(self, h: int, features: torch.Tensor) -> torch.Tensor:
        out = self.hydra_lm_head[h](self.hydra_mlp[h](features))
        return self.base_lm_head[0](out) if self.tied else out

    def top_tokens(self, h: int, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head h's k most likely tokens for each row of features [N, width], by descending logit
        ([N, k]), and their softmax probabilities over the vocabulary (fp32 [N, k]). On the CPU fast
        engine's copy (its linears packed for the bf16 kernels) one kernel call does it all."""
        fused = self.fused_head(h)
        if fused is not None and features.dtype == torch.bfloat16:
            return bf16_kernel.head_top(fused, features, k)
        logits = self.head(h, features)
        top = logits.topk(k)
        return top.indices, torch.softmax(logits.float(), dim=-1).gather(-1, top.indices)

    def fused_head(self, h: int) -> bf16_kernel.HeadWeights | None:
        """Head h as bf16_kernel.head_top computes it, if its blocks and LM head are all packed for
        the bf16 kernels (the CPU fast engine's copy); None otherwise. Gathered once per head."""
        made = self.__dict__.setdefault("_fused_heads", {})  # keyed by this object too: an engine copy starts with a copy of it
        key = (id(self), h)
        if key not in made:
            made[key] = _head_weights([m for m in self.hydra_mlp[h] if not isinstance(m, nn.Dropout)], self.lm_head_weights()[h])
        return made[key]

    def lm_head_weights(self) -> list[nn.Linear]:
        """Head h's LM head (the base one for every head when tied)."""
        if self.tied:
            return [self.base_lm_head[0]] * self.num_heads
        return [lm[-1] if isinstance(lm, nn.Sequential) else lm for lm in self.hydra_lm_head]


def _head_weights(blocks: list[nn.Module], lm_head: nn.Module) -> bf16_kernel.HeadWeights | None:
    """ResBlocks then an LM head as bf16_kernel.head_top reads them, where every product is packed
    for the bf16 kernels and every activation is SiLU; None where anything is otherwise."""
    def packed(module):
        ok = isinstance(module, PackedLinear) and isinstance(module.packed, bf16_kernel.PackedBf16)
        return (module.packed, module.bias) if ok else None

    pairs = []
    for block in blocks:
        if not isinstance(block, HydraResBlock) or type(block.act) is not nn.SiLU:
            return None
        linear, identity = packed(block.linear), isinstance(block.res_connection, nn.Identity)
        residual = None if identity else packed(block.res_connection)
        if linear is None or (residual is None and not identity):
            return None
        pairs.append((linear, residual))
    head = packed(lm_head)
    return bf16_kernel.HeadWeights(pairs, head) if pairs and head is not None else None


class OwnDecoder(nn.Module):
    """N decoder layers of the target's architecture plus a final norm, with their
    own KV cache, fed hidden states (not token ids) at consecutive positions.
    Only accepted tokens' states are ever fed, so the cache never needs
    compacting, only a rollback when a new sequence starts."""

    def __init__(self, target_config, num_layers: int) -> None:
        super().__init__()
        from transformers import AutoModel

        config = copy.deepcopy(target_config)
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[-num_layers:]
        config.vocab_size = 1  # its token embedding is never used; keep it from costing V x H
        config.pad_token_id = None  # (a padding id would not fit that one-row table)
        self.model = AutoModel.from_config(config)
        self.cache: DynamicCache | StaticKV | None = None  # made by the first feed of a sequence, for the model it runs
        self.config = config

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def reset(self) -> None:
        self.cache = None

    def truncate(self, length: int) -> None:
        kv.truncate(self.cache, length)

    @torch.inference_mode()
    def feed(self, hidden: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Run rows [m, H] after what is cached; returns the normed outputs [m, H]. `model`: the
        layers as a drafting step runs them (a target engine's copy of `self.model`), if not these."""
        model = model if model is not None else self.model
        if self.cache is None:  # a CPU engine's lean copy runs its layers itself, over a static cache
            lean = runs_lean(model) and hidden.dtype == torch.bfloat16
            self.cache = StaticKV(len(model.layers)) if lean else DynamicCache(config=self.config)
        if isinstance(self.cache, StaticKV):
            return stack_forward(model, hidden, self.cache)
        start = self.cached
        positions = torch.arange(start, start + hidden.shape[0], device=hidden.device)
        out = model(inputs_embeds=hidden[None], position_ids=positions[None], use_cache=True, **cache_kwargs(self.model, self.cache))
        return out.last_hidden_state[0]

    def layer_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the published names (`layers.{j}.*`, `norm.weight`), the unused embedding left out."""
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(("embed_tokens.", "rotary_emb."))}

    def load_layers(self, state: dict[str, torch.Tensor], what: str) -> None:
        from specbench.errors import UserError

        mine = self.layer_state_dict()
        extra = sorted(k for k in state if k not in mine and not ROTARY_TABLE.search(k))
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise UserError(f"{what}: cannot map '{extra[0]}'{more} onto this target's decoder layers; the checkpoint does not match them")
        missing = sorted(set(mine) - set(state))
        if missing:
            raise UserError(f"{what}: no weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; the checkpoint does not match this target's decoder layers")
        for key, value in mine.items():
            if state[key].shape != value.shape:
                raise UserError(f"{what}: '{key}' has shape {tuple(state[key].shape)}, this target needs {tuple(value.shape)}")
        self.model.load_state_dict({k: state[k] for k in mine}, strict=False)
