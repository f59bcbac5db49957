"""Tiny EAGLE checkpoints written in the *exact* published layouts: the file names,
config templates, key names and storage dtypes of yuhuili/EAGLE-Vicuna-7B-v1.3
(fp32, fc.bias, no rope_theta / num_key_value_heads / bias in the config),
yuhuili/EAGLE-LLaMA3-Instruct-8B (fp16, "bias": false, rope_theta, GQA),
yuhuili/EAGLE3-LLaMA3.1-Instruct-8B (fp16 midlayer.*, d2t offsets, bool t2d, no
embed_tokens) and a vllm-project/speculators conversion of it (config.json with
speculators_model_type / transformer_layer_config + model.safetensors, layers.0.*).
The key names and configs are spelled out here by hand, not produced by specbench.

The weights are built to draft well for the tiny targets of tests/test_eagle.py:
- EAGLE-1: the target has one layer and unit-RMS embeddings, so fc = [I | 0] plus a
  copy of the target's layer (minus its input norm, a no-op on unit-RMS rows)
  reproduces the target's next hidden state (up to the first token, which the draft
  never sees); logits go through the target's LM head, whose argmax ignores the final
  norm's positive scale.
- EAGLE-3: the target's embeddings are tiny and its layers after the first add
  nothing, so fc = 0 and a copy of layer 0 acting on the embedding half reproduces
  the target at depth 1 (deeper levels carry the fed-back state in the residual and
  draft less well, as an untrained draft would).
`noise` perturbs every matrix so that drafts are good, not perfect.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch


def _noisy(tensor: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    return tensor + torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * noise if noise and tensor.dim() == 2 else tensor.clone()


def _target_layer0(target) -> dict[str, torch.Tensor]:
    layer = target.model.model.layers[0]
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _mha(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """GQA k/v projection rows repeated per query head: the same attention as MHA."""
    d = weight.shape[0] // kv_heads
    return weight.view(kv_heads, d, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * d, -1)


def eagle1_state(target, mha: bool, fc_bias: bool, noise: float = 0.0, seed: int = 0) -> OrderedDict:
    """The EAGLE-1 keys (cnets1.py Model with one layer), float64."""
    g = torch.Generator().manual_seed(seed)
    cfg = target.config
    H, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    layer = _target_layer0(target)
    state = OrderedDict()
    state["embed_tokens.weight"] = target.input_embeddings.weight.detach().clone()
    fc = torch.cat([torch.eye(H, dtype=torch.float64), torch.zeros(H, H, dtype=torch.float64)], dim=1)  # [embedding | feature]
    state["fc.weight"] = _noisy(fc, noise, g)
    if fc_bias:
        state["fc.bias"] = torch.randn(H, generator=g, dtype=torch.float64) * noise
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w = layer[f"self_attn.{name}.weight"]
        if mha and name in ("k_proj", "v_proj"):
            w = _mha(w, kv_heads, heads)
        state[f"layers.0.self_attn.{name}.weight"] = _noisy(w, noise, g)
    for name in ("gate_proj", "up_proj", "down_proj"):
        state[f"layers.0.mlp.{name}.weight"] = _noisy(layer[f"mlp.{name}.weight"], noise, g)
    state["layers.0.post_attention_layernorm.weight"] = layer["post_attention_layernorm.weight"].clone()
    return state


def _llama_config(target, **extra) -> dict:
    cfg = target.config
    return {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": cfg.hidden_size, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "torch_dtype": "float16", "transformers_version": "4.28.1", "use_cache": True, "vocab_size": target.vocab_size, **extra}


def write_eagle1_vicuna(directory: Path, target, noise: float = 0.0, seed: int = 0) -> OrderedDict:
    """yuhuili/EAGLE-Vicuna-7B-v1.3: fc.bias, fp32 storage, an MHA draft, no rope_theta,
    num_key_value_heads or bias in the config; the old rotary buffer in the pickle."""
    directory.mkdir(parents=True, exist_ok=True)
    state = eagle1_state(target, mha=True, fc_bias=True, noise=noise, seed=seed)
    d = target.config.hidden_size // target.config.num_attention_heads
    state["layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    (directory / "config.json").write_text(json.dumps(_llama_config(target)))
    stored = OrderedDict((k, v.float()) for k, v in state.items())
    torch.save(stored, directory / "pytorch_model.bin")
    return stored


def write_eagle1_llama3(directory: Path, target, rope_theta: float, noise: float = 0.0, seed: int = 0) -> OrderedDict:
    """yuhuili/EAGLE-LLaMA3-Instruct-8B: no fc.bias ("bias": false), fp16 storage, GQA,
    rope_theta in the config."""
    directory.mkdir(parents=True, exist_ok=True)
    state = eagle1_state(target, mha=False, fc_bias=False, noise=noise, seed=seed)
    config = _llama_config(target, num_key_value_heads=target.config.num_key_value_heads, rope_theta=rope_theta, bias=False,
                           rms_norm_eps=1e-5)
    (directory / "config.json").write_text(json.dumps(config))
    stored = OrderedDict((k, v.half()) for k, v in state.items())
    torch.save(stored, directory / "pytorch_model.bin")
    return stored


def eagle3_state(target, draft_ids: torch.Tensor, noise: float = 0.0, seed: int = 0) -> OrderedDict:
    """The EAGLE-3 keys (cnets.py Model): midlayer.* with 2H-wide q/k/v, fc [H, 3H], norm,
    lm_head over the draft vocabulary, d2t offsets and t2d membership, no embed_tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = target.config
    H, V = cfg.hidden_size, target.vocab_size
    layer = _target_layer0(target)
    state = OrderedDict()
    for name in ("q_proj", "k_proj", "v_proj"):
        w = layer[f"self_attn.{name}.weight"]
        state[f"midlayer.self_attn.{name}.weight"] = _noisy(torch.cat([w, torch.zeros_like(w)], dim=1), noise, g)  # [embedding | hidden]
    state["midlayer.self_attn.o_proj.weight"] = _noisy(layer["self_attn.o_proj.weight"], noise, g)
    for name in ("gate_proj", "up_proj", "down_proj"):
        state[f"midlayer.mlp.{name}.weight"] = _noisy(layer[f"mlp.{name}.weight"], noise, g)
    state["midlayer.hidden_norm.weight"] = torch.ones(H, dtype=torch.float64)
    state["midlayer.input_layernorm.weight"] = layer["input_layernorm.weight"].clone()
    state["midlayer.post_attention_layernorm.weight"] = layer["post_attention_layernorm.weight"].clone()
    state["fc.weight"] = _noisy(torch.zeros(H, 3 * H, dtype=torch.float64), noise / 10, g)
    state["norm.weight"] = target.model.model.norm.weight.detach().clone()
    state["lm_head.weight"] = _noisy(target.lm_head.weight.detach()[draft_ids], noise, g)
    ids = draft_ids.sort().values  # selected target ids, ascending
    state["d2t"] = ids - torch.arange(ids.numel())  # offsets: target id = d + d2t[d]
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    state["t2d"] = t2d
    return state


def eagle3_config(target, draft_vocab: int) -> dict:
    """yuhuili/EAGLE3-LLaMA3.1-Instruct-8B's config (eagle/traineagle3/config.json): no rope_theta."""
    cfg = target.config
    return {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": cfg.hidden_size, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": target.vocab_size,
            "draft_vocab_size": draft_vocab}


def write_eagle3(directory: Path, target, draft_ids: torch.Tensor, noise: float = 0.0, seed: int = 0) -> OrderedDict:
    directory.mkdir(parents=True, exist_ok=True)
    state = eagle3_state(target, draft_ids.sort().values, noise, seed)
    (directory / "config.json").write_text(json.dumps(eagle3_config(target, draft_ids.numel())))
    stored = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in state.items())
    torch.save(stored, directory / "pytorch_model.bin")
    return stored


def write_speculators(directory: Path, eagle3_dir: Path, verifier: str, norm_before_residual: bool | None = False) -> dict:
    """What speculators' converter makes of an EAGLE-3 original: midlayer. -> layers.0.,
    everything else as is, rope_theta 10000 written out, model.safetensors.
    `norm_before_residual=None` leaves the key out (vLLM then assumes true)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    original = json.loads((eagle3_dir / "config.json").read_text())
    state = torch.load(eagle3_dir / "pytorch_model.bin", weights_only=True)
    renamed = {("layers.0." + k.removeprefix("midlayer.")) if k.startswith("midlayer.") else k: v.contiguous() for k, v in state.items()}
    layer = {k: v for k, v in original.items() if k not in ("draft_vocab_size", "architectures")}
    layer.update({"architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0, "rope_scaling": None,
                  "head_dim": original["hidden_size"] // original["num_attention_heads"], "torch_dtype": "float16"})
    config = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.1.0",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "transformer_layer_config": layer, "draft_vocab_size": original["draft_vocab_size"], "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": None, "torch_dtype": "float16",
    }
    if norm_before_residual is not None:
        config["norm_before_residual"] = norm_before_residual
    (directory / "config.json").write_text(json.dumps(config))
    save_file(renamed, str(directory / "model.safetensors"))
    return renamed
