"""The EAGLE draft network (EAGLE-1/2 and EAGLE-3), with parameter names that every
published layout maps onto key for key (docs/eagle.md): `fc.*`, `layers.{i}.*`,
and for EAGLE-3 `norm.weight`, `lm_head.weight`, `d2t`, `t2d` (the `speculators`
names; EAGLE-3 originals say `midlayer.` for `layers.0.`).

- EAGLE-1/2: x = fc(concat(emb(token), feature)); layer 0 has NO input norm
  (attention reads x itself), later layers are ordinary pre-norm decoder layers;
  the output goes straight into the TARGET's LM head (no norm of its own).
- EAGLE-3: the feature is fc(concat(low, mid, high target states)) at accepted
  positions and the draft's own previous output in the tree; layer 0's attention
  reads concat(input_layernorm(emb(token)), hidden_norm(h)) (embedding first) and
  its residual is h (hidden_norm(h) with `norm_before_residual`); logits =
  lm_head(norm(out)) over the draft vocabulary, mapped to target ids by d2t.

Attention is written out rather than borrowed from transformers, so that one
routine serves the three kinds of rows the drafter and `simulate` run: a causal
chunk of accepted context appended to the draft's KV cache, tree nodes that see
the accepted context plus their own ancestors, and (in simulate) the nodes of
many steps at once, each seeing only its own step's prefix of the context.
The module keeps no state between calls; training can call it with autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from specbench.engine.kv import StaticKV


@dataclass(frozen=True)
class EagleConfig:
    """What the draft network is built from, whatever layout it was read from."""

    version: int  # 1: EAGLE-1/2; 3: EAGLE-3
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (embedding rows; length of t2d)
    draft_vocab_size: int  # rows of the draft's own LM head (EAGLE-3); EAGLE-1 reads the target's
    target_hidden_size: int  # width of each fused target state (EAGLE-3's fc reads 3x this)
    num_layers: int = 1
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    fc_bias: bool = False
    qkv_bias: bool = False
    norm_before_residual: bool = False  # EAGLE-3: residual = hidden_norm(h) instead of h
    norm_before_fc: bool = False  # EAGLE-3 (speculators): RMSNorm over the 3 concatenated taps before fc
    fc_norm: bool = False  # EAGLE-3 (speculators): one RMSNorm per tap before fc

    @property
    def num_taps(self) -> int:
        return 3 if self.version == 3 else 1

    @property
    def fc_in(self) -> int:
        return 2 * self.hidden_size if self.version == 1 else 3 * self.target_hidden_size


# --- rotary embeddings: computed for the positions asked, never from a table sized by the config --------

def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """RoPE inverse frequencies (Llama's), with `linear` or `llama3` scaling."""
    # on the CPU explicitly: the net may be built under a meta-device context before its weights are assigned
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(dtype) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling '{kind}'")
    return inv


class Rotary:
    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        self.head_dim = head_dim
        # float32 as the reference computes them; float64 models get float64 (tests)
        self.inv = {dtype: inverse_frequencies(head_dim, theta, scaling, dtype) for dtype in (torch.float32, torch.float64)}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        inv = self.inv[compute].to(positions.device)
        freqs = positions.to(compute)[:, None] * inv[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, heads, d] rotated by the per-row cos/sin [R, d] (Llama's rotate_half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# --- attention over shared context keys and row-private (tree-ancestor) keys ------------------------------

def attention(q: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None, lengths: torch.Tensor | None,
              own: tuple[torch.Tensor, torch.Tensor] | None, scale: float, seq: torch.Tensor | None = None) -> torch.Tensor:
    """q [R, nH, d]; shared = (keys, values) [nKV, C, d] of which row r sees the first
    lengths[r]; own = (keys, values) [R, A, nKV, d] that row r alone sees (its tree
    ancestors and itself). Returns [R, nH, d]. Softmax in at least float32. With `seq` [R]
    (batch > 1: several sequences' caches, RowsDraftKV) shared is [S, nKV, C, d] and row r
    reads sequence seq[r]'s."""
    R, nH, d = q.shape
    kv_heads = (shared[0].shape[-3] if shared is not None else own[0].shape[2])
    group = nH // kv_heads
    wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out = q.new_empty(R, nH, d)
    width = (int(lengths.max()) if shared is not None and R else 0) + (own[0].shape[1] if own is not None else 0)
    chunk = max(1, (1 << 24) // max(1, nH * width))  # bound the score tensor's size
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        qs = q[r0:r1].view(r1 - r0, kv_heads, group, d)
        scores, values = [], []
        if shared is not None:
            span = int(lengths[r0:r1].max())
            if seq is None:
                keys, vals = shared[0][:, :span], shared[1][:, :span]
                s = torch.einsum("rkgd,kcd->rkgc", qs, keys) * scale
                values.append(("rkgc,kcd->rkgd", vals))
            else:  # each row its own sequence's keys and values
                keys, vals = shared[0][seq[r0:r1], :, :span], shared[1][seq[r0:r1], :, :span]
                s = torch.einsum("rkgd,rkcd->rkgc", qs, keys) * scale
                values.append(("rkgc,rkcd->rkgd", vals))
            hidden = torch.arange(span, device=q.device)[None] >= lengths[r0:r1, None]
            scores.append(s.masked_fill(hidden[:, None, None], float("-inf")))
        if own is not None:
            scores.append(torch.einsum("rkgd,rakd->rkga", qs, own[0][r0:r1]) * scale)
            values.append(("rkga,rakd->rkgd", own[1][r0:r1]))
        probs = torch.softmax(torch.cat(scores, dim=-1).to(wide), dim=-1).to(q.dtype)
        result, start = 0, 0
        for (equation, vals), s in zip(values, scores):
            result = result + torch.einsum(equation, probs[..., start : start + s.shape[-1]], vals)
            start += s.shape[-1]
        out[r0:r1] = result.reshape(r1 - r0, nH, d)
    return out


# rows' attention: (layer index, q, k, v of the rows, already rotated) -> [R, nH, d]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DraftAttention(nn.Module):
    def __init__(self, config: EagleConfig, in_width: int) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(in_width, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(in_width, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(in_width, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable) -> torch.Tensor:
        R = x.shape[0]
        q = rotate(self.q_proj(x).view(R, self.num_heads, self.head_dim), cos, sin)
        k = rotate(self.k_proj(x).view(R, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(R, self.num_kv_heads, self.head_dim)
        return self.o_proj(attend(q, k, v).reshape(R, self.num_heads * self.head_dim))


class DraftMLP(nn.Module):
    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """One draft decoder layer. EAGLE-3's first layer fuses embedding and hidden state in
    its attention; EAGLE-1's first layer has no input norm; later layers are plain."""

    def __init__(self, config: EagleConfig, index: int) -> None:
        super().__init__()
        H = config.hidden_size
        self.fused = config.version == 3 and index == 0
        self.norm_before_residual = config.norm_before_residual and self.fused
        self.self_attn = DraftAttention(config, 2 * H if self.fused else H)
        self.mlp = DraftMLP(config)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        # EAGLE-1 layer 0 has none: not created, not applied (a weight-1 RMSNorm would still normalise)
        self.input_layernorm = LlamaRMSNorm(H, eps=config.rms_norm_eps) if (self.fused or index > 0) else None
        self.hidden_norm = LlamaRMSNorm(H, eps=config.rms_norm_eps) if self.fused else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable) -> torch.Tensor:
        if self.fused:
            normed = self.hidden_norm(x)
            attn_in = torch.cat([self.input_layernorm(emb), normed], dim=-1)  # embedding FIRST
            residual = normed if self.norm_before_residual else x
        elif self.input_layernorm is not None:
            attn_in, residual = self.input_layernorm(x), x
        else:
            attn_in, residual = x, x
        h = residual + self.self_attn(attn_in, cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class RowsDraftKV:
    """Batch > 1: every row's draft cache in one tensor [rows, layers, 2, kv_heads, capacity, d],
    one length per row, so one draft forward serves every live row (EagleDrafter.propose_rows);
    `row(b)` is row b's cache with a drafter's StaticKV interface (engine/kv.py: length,
    reserve, put, layer_kv, truncate). Rows and capacity grow in place."""

    def __init__(self, config: EagleConfig, dtype: torch.dtype, device: torch.device, rows: int, capacity: int = 256) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self.rows, self.capacity = 0, capacity
        self.kv: torch.Tensor | None = None
        self.lengths: list[int] = []
        self.grow(rows)

    def grow(self, rows: int, capacity: int | None = None) -> None:
        rows, capacity = max(rows, self.rows), max(capacity or 0, self.capacity)
        if self.kv is not None and rows == self.rows and capacity == self.capacity:
            return
        c = self.config
        grown = torch.zeros(rows, c.num_layers, 2, c.num_kv_heads, capacity, c.head_dim, dtype=self.dtype, device=self.device)
        if self.kv is not None:
            grown[: self.rows, ..., : self.capacity, :] = self.kv
        self.kv, self.rows, self.capacity = grown, rows, capacity
        self.lengths += [0] * (rows - len(self.lengths))

    def reserve(self, tokens: int) -> None:
        if tokens > self.capacity:
            self.grow(self.rows, max(tokens, 2 * self.capacity))

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    def layer_kv(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's first `length` positions: [rows, kv_heads, length, d] each."""
        return self.kv[:, layer, 0, :, :length], self.kv[:, layer, 1, :, :length]

    def write_rows(self, layer: int, seq: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [R, kv_heads, d]: query row r's at position slots[r] of row seq[r]."""
        self.kv[seq, layer, 0, :, slots] = keys
        self.kv[seq, layer, 1, :, slots] = values

    def row(self, b: int) -> RowKV:
        return RowKV(self, b)


class RowKV:
    """Row `b` of a RowsDraftKV as a drafter's StaticKV (what one row's drafter reads and writes alone)."""

    def __init__(self, rows: RowsDraftKV, b: int) -> None:
        self.rows, self.b = rows, b

    @property
    def length(self) -> int:
        return self.rows.lengths[self.b]

    @length.setter
    def length(self, value: int) -> None:
        self.rows.lengths[self.b] = value

    @property
    def capacity(self) -> int:
        return self.rows.capacity

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def reserve(self, tokens: int) -> None:
        self.rows.reserve(tokens)

    def put(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.rows.kv[self.b, layer, 0, :, start : start + keys.shape[0]] = keys.transpose(0, 1)
        self.rows.kv[self.b, layer, 1, :, start : start + keys.shape[0]] = values.transpose(0, 1)

    def layer_kv(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows.kv[self.b, layer, 0, :, :length], self.rows.kv[self.b, layer, 1, :, :length]


# row-private keys and values per layer: [R, A, kv_heads, d] each (a row's tree ancestors, then itself)
Own = list[tuple[torch.Tensor, torch.Tensor]]


class EagleNet(nn.Module):
    """The draft network. Its registered parameters and buffers carry the canonical key
    names; the embedding table is registered only when the checkpoint has its own
    (`own_embedding`), else the target's is read (never written). EAGLE-1's logits go
    through the target's LM head (`set_head`)."""

    def __init__(self, config: EagleConfig, embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        if c.version == 3:
            if c.norm_before_fc:
                self.input_norm = LlamaRMSNorm(c.fc_in, eps=c.rms_norm_eps)
            if c.fc_norm:
                self.fc_norm = nn.ModuleList(LlamaRMSNorm(c.target_hidden_size, eps=c.rms_norm_eps) for _ in range(3))
        self.fc = nn.Linear(c.fc_in, H, bias=c.fc_bias)
        self.layers = nn.ModuleList(DraftLayer(c, i) for i in range(c.num_layers))
        if c.version == 3:
            self.norm = LlamaRMSNorm(H, eps=c.rms_norm_eps)
            self.lm_head = nn.Linear(H, c.draft_vocab_size, bias=False)
            if c.draft_vocab_size != c.vocab_size:
                self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
                self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        if embedding is None:
            self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self._shared_embedding = [embedding]  # a list: the target's table is not ours to save
        self._head: list[nn.Module | None] = [self.lm_head if c.version == 3 else None]
        # target id of each row of the head in use (None: row i is target id i)
        self.head_ids: torch.Tensor | None = None
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)
        self.scale = 1.0 / math.sqrt(c.head_dim)

    # --- vocabularies ---------------------------------------------------------------
    @property
    def own_embedding(self) -> bool:
        return self._shared_embedding[0] is None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self._shared_embedding[0] if self._shared_embedding[0] is not None else self.embed_tokens
        return table(tokens)

    @property
    def head(self) -> nn.Module:
        return self._head[0]

    def set_head(self, head: nn.Module, head_ids: torch.Tensor | None) -> None:
        """The LM head the draft's logits come from (EAGLE-1: the target's, or a VocabTrim
        cut of it; EAGLE-3: its own, or a cut) and the target id of each of its rows."""
        self._head[0] = head
        self.head_ids = head_ids

    def draft_to_target(self) -> torch.Tensor | None:
        """EAGLE-3: target id of every draft-vocabulary id (d + d2t[d]); None when Vd == V."""
        if self.config.version == 3 and self.config.draft_vocab_size != self.config.vocab_size:
            return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t
        return None

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Draft logits over the head's rows, in at least float32."""
        x = self.norm(out) if self.config.version == 3 else out
        logits = self.head(x[None])[0]  # [1, R, H] as in a model's own forward: a sharded (DeepSpeed) head needs the batch dim
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def to_target(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head_ids[rows] if self.head_ids is not None else rows

    # --- forwards ---------------------------------------------------------------------
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """EAGLE-3: the target's concatenated taps [R, 3 Ht] -> [R, H]."""
        if self.config.fc_norm:
            parts = features.split(self.config.target_hidden_size, dim=-1)
            features = torch.cat([norm(part) for norm, part in zip(self.fc_norm, parts)], dim=-1)
        elif self.config.norm_before_fc:
            features = self.input_norm(features)
        return self.fc(features)

    def _run(self, tokens: torch.Tensor, stream: torch.Tensor, positions: torch.Tensor, from_target: bool, attend: Attend) -> torch.Tensor:
        emb = self.embed(tokens).to(stream.dtype)
        if self.config.version == 1:
            x = self.fc(torch.cat([emb, stream], dim=-1))  # embedding FIRST
        else:
            x = self.fuse(stream) if from_target else stream  # the draft's own output is fed back as is
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, emb, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
        return x

    def context(self, tokens: torch.Tensor, features: torch.Tensor, kv: StaticKV | None = None) -> torch.Tensor:
        """Accepted context at the next positions of `kv` (a causal chunk, appended to it):
        row j pairs the token x_{j+1} with the target's state f_j. Returns outputs [q, H].
        Without `kv` the chunk is a whole sequence from position 0 and nothing is cached
        (no in-place writes: the teacher-forced forward training differentiates)."""
        start, q = (kv.length if kv is not None else 0), tokens.shape[0]
        if kv is not None:
            kv.reserve(start + q)
        positions = torch.arange(start, start + q, device=tokens.device)
        lengths = positions + 1

        def attend(layer, qs, keys, values):
            if kv is None:
                return attention(qs, (keys.transpose(0, 1), values.transpose(0, 1)), lengths, None, self.scale)
            kv.put(layer, start, keys, values)
            return attention(qs, kv.layer_kv(layer, start + q), lengths, None, self.scale)

        out = self._run(tokens, features, positions, True, attend)
        if kv is not None:
            kv.length = start + q
        return out

    def context_rows(self, tokens: list[torch.Tensor], features: list[torch.Tensor], kv: RowsDraftKV,
                     rows: list[int]) -> list[torch.Tensor]:
        """`context` for several rows of a RowsDraftKV in one forward: row rows[i]'s accepted chunk
        (tokens[i], features[i]) appended at its own length, each position seeing its own row's
        cache up to itself. Returns each row's outputs [q_i, H]."""
        sizes = [t.shape[0] for t in tokens]
        starts = [kv.lengths[r] for r in rows]
        kv.reserve(max(s + q for s, q in zip(starts, sizes)))
        device = tokens[0].device
        seq = torch.tensor([r for r, q in zip(rows, sizes) for _ in range(q)], device=device)
        positions = torch.cat([torch.arange(s, s + q, device=device) for s, q in zip(starts, sizes)])
        lengths = positions + 1

        def attend(layer, qs, keys, values):
            kv.write_rows(layer, seq, positions, keys, values)
            return attention(qs, kv.layer_kv(layer, int(lengths.max())), lengths, None, self.scale, seq)

        out = self._run(torch.cat(tokens), torch.cat(features), positions, True, attend)
        for r, s, q in zip(rows, starts, sizes):
            kv.lengths[r] = s + q
        return list(out.split(sizes))

    def nodes(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: StaticKV | RowsDraftKV,
              visible: torch.Tensor, own: Own | None, seq: torch.Tensor | None = None) -> tuple[torch.Tensor, Own]:
        """Tree nodes: token, the draft output it continues from, position; row r sees the
        first visible[r] context positions of `kv`, then its ancestors (`own`, per layer
        [R, A, kv_heads, d]) and itself. Returns (outputs [R, H], own with each row's
        key/value appended), leaving `kv` untouched. With `seq` (a RowsDraftKV) row r's
        context is that of cache row seq[r]."""
        grown: Own = []

        def attend(layer, qs, keys, values):
            mine = (keys[:, None], values[:, None])
            if own is not None:
                mine = (torch.cat([own[layer][0], mine[0]], dim=1), torch.cat([own[layer][1], mine[1]], dim=1))
            grown.append(mine)
            shared = kv.layer_kv(layer, int(visible.max())) if kv.length else None
            return attention(qs, shared, visible if shared is not None else None, mine, self.scale, seq if shared is not None else None)

        out = self._run(tokens, hidden, positions, False, attend)
        return out, grown

    def unrolled(self, tokens: torch.Tensor, stream: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """EAGLE-3's training-time test, and the chain a draft follows along a known text:
        `steps` draft passes over a sequence x_0..x_{n-1}, with autograd, nothing cached.
        Row i (0..n-2) of step 0 is context position i: the token x_{i+1} with the target's
        state `stream[i]`. Step s >= 1 feeds row i the token x_{i+1+s} (the last token again
        past the end; callers mask those rows) with step s-1's own output at row i, at
        position i + s: the depth-(s+1) node on the true path of a draft from context
        position i. It sees step 0's keys at rows 0..i (the accepted context) and its own
        keys of steps 1..s (its ancestors and itself), exactly what the drafter shows that
        node. Returns each step's outputs [n-1, H]."""
        rows = stream.shape[0]
        index = torch.arange(rows, device=tokens.device)
        lengths = index + 1
        context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        chain: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        outputs, hidden = [], stream

        for step in range(steps):
            def attend(layer, qs, keys, values, step=step):
                if step == 0:
                    context[layer] = (keys.transpose(0, 1), values.transpose(0, 1))
                    return attention(qs, context[layer], lengths, None, self.scale)
                mine = (keys[:, None], values[:, None])
                if layer in chain:
                    mine = (torch.cat([chain[layer][0], mine[0]], dim=1), torch.cat([chain[layer][1], mine[1]], dim=1))
                chain[layer] = mine
                return attention(qs, context[layer], lengths, mine, self.scale)

            ids = tokens[(index + 1 + step).clamp(max=tokens.numel() - 1)]
            hidden = self._run(ids, hidden, index + step, step == 0, attend)
            outputs.append(hidden)
        return outputs

    def weight_bytes(self) -> int:
        """Bytes of weights one draft pass reads (the embedding lookup reads a row per token, so it
        is left out, as for targets), the LM head in use included."""
        seen, total = set(), 0
        modules = [m for name, m in self.named_children() if name not in ("embed_tokens", "lm_head")] + [self.head]
        for module in modules:
            for p in module.parameters():
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
        return total
