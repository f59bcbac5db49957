"""Tiny DFlash checkpoints written in the *published* layouts: the file name
(model.safetensors), the config templates with every published field in the published
order (sizes changed), the key names and the BF16 storage of
- z-lab DFlash v1 (`DFlashDraftModel`, e.g. z-lab/Qwen3-8B-DFlash-b16): top-level
  block_size, dflash_config {mask_token_id, target_layer_ids}, auto_map, a header with
  `__metadata__ {"format": "pt"}`;
- DFlash2 (`DFlash2DraftModel`, z-lab's dflash2 fixture): everything under dflash_config,
  is_causal false before it, sliding layers, rope_parameters, the grouped dynamic
  convolutions and the candidate selector whose codebooks have no `.weight` suffix, a
  header without `__metadata__`;
- Meta's `MuseGlimmerAssistantModel` (z-lab's assistant fixture): a flat config (no
  dflash_config, no vocab_size, an integer attention_dropout) and the v1 tensors with
  `encoder.fc.weight` / `encoder.output_norm_enc.weight`.
The key names and configs are spelled out here by hand, not produced by specbench.

The weights are built, not trained, to draft well for the tiny target of tests/test_dflash.py,
whose next token is sigma(current token) up to the noise of its layers, sigma a permutation
of 3-cycles (so greedy text has period 3) and hidden dimension 0 constant. Draft layer 0
attends by position alone (queries and keys read dimension 0 only, so after q_norm/k_norm
they are constant; queries are pre-rotated by -OFFSET, so RoPE makes position P attend to
P - OFFSET) and copies the context feature there (the target's layer-1 output, about its
token's embedding); the target's LM head then reads sigma of that token. With OFFSET 4 and
period 3, block positions 1..4 are right in a periodic stretch (4 reads the anchor itself),
the rest wrong: accepted lengths vary and depend on the context the draft holds.
`noise` perturbs every matrix.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

MASK = 16  # a token of the target's vocabulary (the draft has no embedding of its own)
OFFSET = 4  # draft layer 0 attends from position P to P - OFFSET
ROPE = 100.0  # the draft's rotary base (small: diverse frequencies, a sharp positional match)
SHARP = 30.0  # q_norm weight: how sharply it attends


def _rotated_ones(head_dim: int, position: int, theta: float) -> torch.Tensor:
    """RoPE (rotate-half form) applied to the all-ones vector at `position`."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.cat([inv, inv]) * position
    ones = torch.ones(head_dim, dtype=torch.float64)
    half = head_dim // 2
    return ones * angles.cos() + torch.cat([-ones[half:], ones[:half]]) * angles.sin()


def v1_state(hidden: int, inter: int, heads: int, head_dim: int, layers: int, taps: int, seed: int, noise: float = 0.01,
             conv: tuple[int, int] | None = None, selector: tuple[int, int] | None = None) -> OrderedDict:
    """The canonical keys of the positional-copy draft (v1 names, MHA), float64; with `conv`
    (kernel, group) the DFlash2 convolutions (near the identity), with `selector` (vocab, rank)
    its candidate selector (near neutral; canonical names)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=noise: torch.randn(*shape, generator=g, dtype=torch.float64) * std  # noqa: E731
    eye = torch.eye(hidden, dtype=torch.float64)
    s = OrderedDict()
    fc = torch.zeros(hidden, taps * hidden, dtype=torch.float64)
    fc[:, :hidden] = eye  # the first tap: the target's layer-1 output, about its token's embedding
    s["fc.weight"] = fc + rand(hidden, taps * hidden)
    s["hidden_norm.weight"] = torch.ones(hidden, dtype=torch.float64)
    r = _rotated_ones(head_dim, -OFFSET, ROPE)
    for i in range(layers):
        p = f"layers.{i}."
        s[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        s[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        q = torch.zeros(heads * head_dim, hidden, dtype=torch.float64)
        k = torch.zeros(heads * head_dim, hidden, dtype=torch.float64)
        if i == 0:
            q[:, 0] = r.repeat(heads)
            k[:, 0] = 1.0
        s[p + "self_attn.q_proj.weight"] = q + rand(heads * head_dim, hidden)
        s[p + "self_attn.k_proj.weight"] = k + rand(heads * head_dim, hidden)
        s[p + "self_attn.v_proj.weight"] = (2 * eye if i == 0 else 0 * eye) + rand(hidden, hidden)
        s[p + "self_attn.o_proj.weight"] = (eye if i == 0 else 0 * eye) + rand(hidden, hidden)
        s[p + "self_attn.q_norm.weight"] = torch.full((head_dim,), SHARP, dtype=torch.float64)
        s[p + "self_attn.k_norm.weight"] = torch.ones(head_dim, dtype=torch.float64)
        s[p + "mlp.gate_proj.weight"] = rand(inter, hidden, std=0.3)
        s[p + "mlp.up_proj.weight"] = rand(inter, hidden, std=0.3)
        s[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        if conv:
            kernel, group = conv
            for name in ("attention_conv", "mlp_conv"):
                base = torch.zeros(2, kernel, hidden, dtype=torch.float64)
                base[:, 0] = 1.0  # y_t = x_t (+ noise): near the identity
                s[p + f"{name}.base_kernel"] = base + rand(2, kernel, hidden)
                s[p + f"{name}.kernel_projection.weight"] = rand(2 * kernel * (hidden // group), hidden)
    s["norm.weight"] = torch.ones(hidden, dtype=torch.float64)
    if selector:
        vocab, rank = selector
        s["candidate_selector.hidden_projection.weight"] = rand(rank, hidden, std=0.05)
        s["candidate_selector.predecessor_codebook.weight"] = rand(vocab, rank, std=0.05)
        s["candidate_selector.successor_codebook.weight"] = rand(vocab, rank, std=0.05)
    return s


def _geometry(target) -> dict:
    """The draft's geometry: the target's width (its embedding and LM head are shared), MHA."""
    cfg = target.config
    heads = cfg.num_attention_heads
    return dict(hidden=cfg.hidden_size, inter=cfg.intermediate_size, heads=heads, kv_heads=heads, head_dim=cfg.hidden_size // heads)


def _save(directory: Path, config: dict, state: dict, metadata: dict | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(directory / "model.safetensors"), metadata=metadata)


def write_v1(directory: Path, target, layer_ids: list[int], block_size: int = 8, layers: int = 2, seed: int = 0,
             state: dict | None = None) -> OrderedDict:
    """z-lab/Qwen3-8B-DFlash-b16's config.json (every field, in its order) and model.safetensors."""
    g = _geometry(target)
    state = state or v1_state(g["hidden"], g["inter"], g["heads"], g["head_dim"], layers, len(layer_ids), seed)
    config = {
        "architectures": ["DFlashDraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": block_size,
        "bos_token_id": 1,
        "dflash_config": {"mask_token_id": MASK, "target_layer_ids": layer_ids},
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": g["head_dim"],
        "hidden_act": "silu",
        "hidden_size": g["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": g["inter"],
        "layer_types": ["full_attention"] * layers,
        "max_position_embeddings": 512,
        "max_window_layers": layers,
        "model_type": "qwen3",
        "num_attention_heads": g["heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": g["kv_heads"],
        "num_target_layers": target.num_layers,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": ROPE,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": target.vocab_size,
    }
    _save(directory, config, state, {"format": "pt"})
    return state


def write_dflash2(directory: Path, target, layer_ids: list[int], block_size: int = 8, layers: int = 2, seed: int = 0,
                  window: int = 2048, group: int = 4, rank: int = 8, top_k: int = 6) -> OrderedDict:
    """z-lab's dflash2-config.json (every field, in its order) and the 81-tensor header's names."""
    g = _geometry(target)
    state = v1_state(g["hidden"], g["inter"], g["heads"], g["head_dim"], layers, len(layer_ids), seed, conv=(2, group),
                     selector=(target.vocab_size, rank))
    config = {
        "architectures": ["DFlash2DraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "is_causal": False,
        "dflash_config": {
            "block_size": block_size, "conv_group_size": group, "conv_kernel_size": 2, "final_logit_softcapping": 20.0,
            "mask_token_id": MASK, "output_multiplier": 0.75, "selector_rank": rank, "selector_top_k": top_k,
            "target_layer_ids": layer_ids,
        },
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": g["head_dim"],
        "hidden_act": "silu",
        "hidden_size": g["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": g["inter"],
        "layer_types": ["sliding_attention"] * layers,
        "max_position_embeddings": 512,
        "max_window_layers": layers,
        "model_type": "qwen3",
        "num_attention_heads": g["heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": g["kv_heads"],
        "num_target_layers": target.num_layers,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": ROPE, "rope_type": "default"},
        "sliding_window": window,
        "tie_word_embeddings": False,
        "transformers_version": "5.15.0",
        "use_cache": False,
        "use_sliding_window": True,
        "vocab_size": target.vocab_size,
    }
    on_disk = OrderedDict((k.removesuffix(".weight") if "codebook" in k else k, v) for k, v in state.items())
    _save(directory, config, on_disk, None)
    return state


def write_assistant(directory: Path, target, layer_ids: list[int], block_size: int = 8, layers: int = 2, seed: int = 0,
                    window: int = 2048) -> OrderedDict:
    """z-lab's assistant-config.json (flat; every field, in its order) and its header's names."""
    g = _geometry(target)
    state = v1_state(g["hidden"], g["inter"], g["heads"], g["head_dim"], layers, len(layer_ids), seed)
    config = {
        "architectures": ["MuseGlimmerAssistantModel"],
        "attention_dropout": 0,
        "block_size": block_size,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": g["head_dim"],
        "hidden_act": "silu",
        "hidden_size": g["hidden"],
        "intermediate_size": g["inter"],
        "layer_types": ["sliding_attention"] * layers,
        "mask_token_id": MASK,
        "max_position_embeddings": 512,
        "model_type": "muse_glimmer_assistant",
        "num_attention_heads": g["heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": g["kv_heads"],
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": ROPE, "rope_type": "default"},
        "sliding_window": window,
        "target_layer_ids": layer_ids,
        "transformers_version": "5.15.0.dev0",
    }
    names = {"fc.weight": "encoder.fc.weight", "hidden_norm.weight": "encoder.output_norm_enc.weight"}
    _save(directory, config, OrderedDict((names.get(k, k), v) for k, v in state.items()), {"format": "pt"})
    return state
