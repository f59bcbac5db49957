"""The DFlash draft network (DFlash v1, DFlash2, Meta's Muse Glimmer assistant), with
parameter names every published layout maps onto key for key (docs/dflash.md):
`fc.weight`, `hidden_norm.weight`, `layers.{i}.*`, `norm.weight`, and for DFlash2
`layers.{i}.{attention,mlp}_conv.*` and `candidate_selector.*`.

One forward drafts a whole block. The block is [anchor, mask, ..., mask] embedded with
the TARGET's input embedding; every draft layer is a Qwen3 decoder layer whose queries
come from the block alone and whose keys/values are the fused context features
(hidden_norm(fc(taps)), the same for every layer, no input norm) followed by the
block. Output i of the block proposes the token AT the block's position i (not the
next one); the anchor's output is unused. Logits: the target's LM head on the normed
output, times `output_multiplier`, soft-capped by `final_logit_softcapping`.

DFlash2 adds per layer a grouped dynamic causal convolution along the block before and
after attention and the MLP (two taps: a position sees itself and its left neighbour
in the block; the anchor sees zero padding), and a candidate selector that walks the
block left to right choosing among each position's top candidates with a score that
depends on the previous token.

Attention is written out so one routine serves the online step (one block, context
from the draft's KV cache) and `simulate` (the blocks of every step of a logged
sequence at once, each seeing only its own step's prefix of the context).
The module keeps no state between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from specbench.drafters.eagle.model import Rotary, rotate


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm, computed in float32 for half types and in the input's own dtype above
    (float64 tests stay float64)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


@dataclass(frozen=True)
class DFlashConfig:
    """What the draft network is built from, whatever layout it was read from."""

    layout: str  # "dflash" (v1), "dflash2", "muse-glimmer-assistant"
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]  # "output of target layer k" = HF hidden_states[k + 1]
    causal: tuple[bool, ...]  # per draft layer
    sliding_window: tuple[int | None, ...]  # per draft layer
    vocab_size: int | None = None
    num_target_layers: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    input_embedding_scale: float = 1.0
    # DFlash2 only
    conv_kernel_size: int | None = None
    conv_group_size: int | None = None
    selector_rank: int | None = None
    selector_top_k: int | None = None

    @property
    def dflash2(self) -> bool:
        return self.conv_kernel_size is not None

    @property
    def taps(self) -> tuple[int, ...]:
        """specbench taps (the state entering layer j = HF hidden_states[j]) for the config's ids."""
        return tuple(k + 1 for k in self.target_layer_ids)


class GroupedDynamicConv(nn.Module):
    """DFlash2's convolution along the block: y_t = sum_o (base[o] + dyn_t[o]) * x_{t-o}, o = 0..K-1,
    x_{t-o} = 0 before the block's start; dyn_t is a per-token, per-group correction
    (kernel_projection(x_t), one value per group of `group` channels). One module holds the
    kernels of two convolutions: `prepare` (before a sublayer, base_kernel[0], which also
    returns the correction for the second) and `finish` (after it, base_kernel[1])."""

    def __init__(self, hidden: int, kernel: int, group: int) -> None:
        super().__init__()
        self.kernel, self.group = kernel, group
        self.groups = hidden // group
        self.base_kernel = nn.Parameter(torch.zeros(2, kernel, hidden))
        self.kernel_projection = nn.Linear(hidden, 2 * kernel * self.groups, bias=False)

    def _convolve(self, x: torch.Tensor, dyn: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x [B, T, H], dyn [B, T, K, groups], base [K, H]."""
        B, T, H = x.shape
        blocks = x.view(B, T, self.groups, self.group)
        out = torch.zeros_like(blocks)
        for o in range(self.kernel):
            values = blocks if o == 0 else F.pad(blocks[:, :-o], (0, 0, 0, 0, o, 0))
            out = out + (base[o].view(1, 1, self.groups, self.group).to(x.dtype) + dyn[:, :, o, :, None]) * values
        return out.view(B, T, H)

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dyn = self.kernel_projection(x).view(*x.shape[:-1], 2, self.kernel, self.groups)
        return self._convolve(x, dyn[:, :, 0], self.base_kernel[0]), dyn[:, :, 1]

    def finish(self, x: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
        return self._convolve(x, dyn, self.base_kernel[1])


class Attention(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., R, H] -> rotated, normed keys and values [..., R, nKV, d]."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        k = rotate_rows(self.k_norm(self.k_proj(x).view(shape)), cos, sin)
        return k, self.v_proj(x).view(shape)


def rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., R, heads, d] with cos/sin [..., R, d] (any leading batch dims)."""
    flat = x.reshape(-1, *x.shape[-2:])
    return rotate(flat, cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])).view_as(x)


class MLP(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACT2FN[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = MLP(c)
        if c.dflash2:
            self.attention_conv = GroupedDynamicConv(c.hidden_size, c.conv_kernel_size, c.conv_group_size)
            self.mlp_conv = GroupedDynamicConv(c.hidden_size, c.conv_kernel_size, c.conv_group_size)


class CandidateSelector(nn.Module):
    """DFlash2: score of candidate x at a position after token p = draft logit(x) +
    <predecessor_codebook[p] * hidden_projection(h), successor_codebook[x]>."""

    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.top_k = c.selector_top_k
        self.predecessor_codebook = nn.Embedding(c.vocab_size, c.selector_rank)
        self.successor_codebook = nn.Embedding(c.vocab_size, c.selector_rank)
        self.hidden_projection = nn.Linear(c.hidden_size, c.selector_rank, bias=False)

    def scores(self, projected: torch.Tensor, unary: torch.Tensor, candidates: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """projected [R, r] (hidden_projection of the position's output), unary/candidates [R, K]
        (the position's top-K logits and ids), previous [R] -> scores [R, K]."""
        pair = self.predecessor_codebook(previous).to(projected.dtype) * projected
        return unary + torch.einsum("rk,rck->rc", pair, self.successor_codebook(candidates).to(projected.dtype))


NEG = float("-inf")


class DFlashNet(nn.Module):
    """The draft network. It owns no embedding and no LM head: both are the target's, read
    (never written) through `set_target`."""

    def __init__(self, config: DFlashConfig, target_hidden: int | None = None) -> None:
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(len(c.target_layer_ids) * (target_hidden or c.hidden_size), c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        if c.dflash2:
            self.candidate_selector = CandidateSelector(c)
        self.rotary = Rotary(c.head_dim, c.rope_theta, None)
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self._target: list = [None, None]  # (input embedding table, LM head): the target's, not ours to save

    def set_target(self, embedding: nn.Embedding, head: nn.Module) -> None:
        self._target[:] = [embedding, head]

    # --- context: the target's features at committed positions -> each layer's K/V --------
    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """features [C, n_taps * H_target] at `positions` [C] -> per layer (keys, values) [C, nKV, d].
        KV injection: the same fused states feed every layer's k/v projections (no input norm)."""
        fused = self.hidden_norm(self.fc(features))
        cos, sin = self.rotary(positions, fused.dtype)
        return [layer.self_attn.keys_values(fused, cos, sin) for layer in self.layers]

    # --- the block --------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._target[0].weight
        x = F.embedding(ids, table)  # the raw row: no target-side embedding scale
        return x * self.config.input_embedding_scale if self.config.input_embedding_scale != 1.0 else x

    def block(self, ids: torch.Tensor, start: torch.Tensor, context: list[tuple[torch.Tensor, torch.Tensor]],
              visible: torch.Tensor | None, context_ok: torch.Tensor | None = None,
              key_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ids [B, b] at positions start[B] + 0..b-1; block r sees the first visible[r]
        positions of `context` (per layer keys/values [C, nKV, d]) and its own block. Returns
        the final normed outputs [B, b, H]. Several sequences' contexts side by side (batch > 1):
        `context_ok` [B, C] says which keys block r sees and `key_positions` [C] each key's position."""
        c = self.config
        B, b = ids.shape
        x = self.embed(ids)
        positions = start[:, None] + torch.arange(b, device=ids.device)[None]  # [B, b]
        cos, sin = self.rotary(positions.reshape(-1), x.dtype)
        cos, sin = cos.view(B, b, -1), sin.view(B, b, -1)
        C = context[0][0].shape[0] if context else 0
        key_pos = torch.arange(C, device=ids.device) if key_positions is None else key_positions
        masks = {}
        for causal, window in set(zip(c.causal, c.sliding_window)):
            ctx_ok = key_pos[None, None] < visible[:, None, None] if context_ok is None else context_ok[:, None]  # [B, 1, C]
            if window is not None:  # context keys are before every query: only the distance counts
                ctx_ok = ctx_ok & (positions[:, :, None] - key_pos[None, None] < window)
            ctx_ok = ctx_ok.expand(B, b, C)
            i = torch.arange(b, device=ids.device)
            own_ok = torch.ones(b, b, dtype=torch.bool, device=ids.device)
            if causal:
                own_ok &= i[None] <= i[:, None]
            if window is not None:
                own_ok &= (i[:, None] - i[None]).abs() < window if not causal else (i[:, None] - i[None]) < window
            masks[(causal, window)] = (ctx_ok, own_ok)
        for layer, (ctx_k, ctx_v), causal, window in zip(self.layers, context or [(None, None)] * len(self.layers),
                                                         c.causal, c.sliding_window):
            residual = x
            h = layer.input_layernorm(x)
            if c.dflash2:
                h, dyn = layer.attention_conv.prepare(h)
            attn = layer.self_attn
            q = rotate_rows(attn.q_norm(attn.q_proj(h).view(B, b, attn.num_heads, attn.head_dim)), cos, sin)
            k, v = attn.keys_values(h, cos, sin)
            out = self._attend(q, ctx_k, ctx_v, k, v, *masks[(causal, window)])
            h = attn.o_proj(out.reshape(B, b, -1))
            if c.dflash2:
                h = layer.attention_conv.finish(h, dyn)
            x = residual + h
            residual = x
            h = layer.post_attention_layernorm(x)
            if c.dflash2:
                h, dyn = layer.mlp_conv.prepare(h)
            h = layer.mlp(h)
            if c.dflash2:
                h = layer.mlp_conv.finish(h, dyn)
            x = residual + h
        return self.norm(x)

    def _attend(self, q, ctx_k, ctx_v, k, v, ctx_ok, own_ok) -> torch.Tensor:
        """q [B, b, nH, d]; context keys/values [C, nKV, d] masked by ctx_ok [B, b, C]; the block's
        own k/v [B, b, nKV, d] masked by own_ok [b, b]. Softmax in at least float32."""
        B, b, nH, d = q.shape
        nKV = k.shape[2]
        g = nH // nKV
        wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qs = q.view(B, b, nKV, g, d)
        own = torch.einsum("bikgd,bjkd->bkgij", qs, k) * self.scale
        own = own.masked_fill(~own_ok[None, None, None], NEG)
        parts = [own]
        if ctx_k is not None and ctx_k.shape[0]:
            span = ctx_ok.shape[-1]
            ctx = torch.einsum("bikgd,ckd->bkgic", qs, ctx_k[:span]) * self.scale
            parts.insert(0, ctx.masked_fill(~ctx_ok[:, None, None], NEG))
        probs = torch.softmax(torch.cat(parts, -1).to(wide), dim=-1).to(q.dtype)
        out = torch.einsum("bkgij,bjkd->bikgd", probs[..., -b:], v)
        if len(parts) == 2:
            out = out + torch.einsum("bkgic,ckd->bikgd", probs[..., : ctx_k[:span].shape[0]], ctx_v[:span])
        return out.reshape(B, b, nH, d)

    # --- logits -------------------------------------------------------------------------
    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., V] in at least float32 from normed outputs [..., H]."""
        shape = out.shape
        logits = self._target[1](out.reshape(1, -1, shape[-1]))[0]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        c = self.config
        if c.output_multiplier != 1.0:
            logits = logits * c.output_multiplier
        if c.final_logit_softcapping:
            logits = torch.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        return logits.view(*shape[:-1], -1)

    def candidates(self, out: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DFlash2: per position the selector's (projected hidden [.., r], top-K logits [.., K], ids [.., K])."""
        unary, ids = logits.topk(self.config.selector_top_k, dim=-1)
        return self.candidate_selector.hidden_projection(out).to(unary.dtype), unary, ids

    def weight_bytes(self) -> int:
        """Bytes of weights one draft pass reads, the target's LM head included (the embedding
        lookup reads a row per token, so it is left out, as for targets)."""
        seen, total = set(), 0
        for p in [*self.parameters(), *(self._target[1].parameters() if self._target[1] is not None else [])]:
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        if self.config.dflash2:  # the codebooks are read a row per candidate, not whole
            total -= sum(p.numel() * p.element_size() for p in (self.candidate_selector.predecessor_codebook.weight,
                                                                self.candidate_selector.successor_codebook.weight))
        return total
