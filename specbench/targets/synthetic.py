"""Random-weight Llama models of named shapes: speed does not depend on weight values, so a
7B-shaped target (or a small draft of its vocabulary) needs no checkpoint. The benchmark
scripts (scripts/bench_engine.py, scripts/bench_heads.py, scripts/gpu_check.py) build
their targets here."""

from __future__ import annotations

import torch

SHAPES = {  # LlamaConfig fields
    # lmsys/vicuna-7b-v1.3's config
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, rms_norm_eps=1e-6),
    # a small draft model of Vicuna's vocabulary (~80 M parameters)
    "vicuna-draft": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                         vocab_size=32000, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "tiny-draft": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=256),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int | None = None):
    """A LlamaForCausalLM of `shape` with transformers' random init (seeded when `seed` is given),
    in eval mode on `device`. EOS is left as the config's default: callers that force a fixed
    length clear the target's eos_token_ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()
