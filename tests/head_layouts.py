"""Tiny head checkpoints written in the *exact* published layouts: the file
names, key names, dtypes (bf16), torch.save pickles and configs of
FasterDecoding/medusa-vicuna-*, Medusa-2, ankner/hydra-vicuna-* and
shiqihe/hydra-decoder-*. The modules are rebuilt here the way the reference
code builds them (not with specbench's own classes), so the key layout is
the reference's, shared blocks and Dropout slots included.

Weights are random but near the target's LM head, so the heads draft
plausible tokens and decoding accepts some of them.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn


class RefMedusaResBlock(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class RefHydraResBlock(nn.Module):
    def __init__(self, hidden_size, num_condition=0):
        super().__init__()
        self.linear = nn.Linear(hidden_size * (num_condition + 1), hidden_size)
        self.res_connection = nn.Linear(hidden_size * (num_condition + 1), hidden_size) if num_condition > 0 else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.res_connection(x) + self.act(self.linear(x))


def _perturb(module: nn.Module, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def reference_medusa_heads(target, num_heads: int, num_layers: int, own_lm_head: bool = True, seed: int = 0) -> nn.ModuleList:
    """MedusaModel.medusa_head: `[ResBlock] * num_layers` (one shared object) then Linear(H, V, bias=False)."""
    H, V = target.hidden_size, target.vocab_size
    torch.manual_seed(seed)
    heads = []
    for _ in range(num_heads):
        block = RefMedusaResBlock(H)
        layers = [block] * num_layers
        if own_lm_head:
            lm = nn.Linear(H, V, bias=False)
            with torch.no_grad():
                lm.weight.copy_(target.lm_head.weight)
            layers.append(lm)
        heads.append(nn.Sequential(*layers))
    heads = nn.ModuleList(heads).double()
    with torch.no_grad():
        for head in heads:
            head[0].linear.weight.normal_(0, 0.05)
    _perturb(heads, 0.02, seed + 1)
    return heads


def write_medusa_v1(directory: Path, target, num_heads: int = 5, num_layers: int = 1, fmt: str = "pt", seed: int = 0) -> nn.ModuleList:
    """FasterDecoding/medusa-vicuna-*-v1.3: config.json (which under-reports the heads:
    it says 2) + medusa_lm_head.pt, a torch.save of the bf16 state dict."""
    directory.mkdir(parents=True, exist_ok=True)
    heads = reference_medusa_heads(target, num_heads, num_layers, seed=seed).to(torch.bfloat16)
    config = {"base_model_name_or_path": target.model_id, "medusa_num_heads": 2, "medusa_num_layers": num_layers}
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "pt":
        torch.save(heads.state_dict(), directory / "medusa_lm_head.pt")
    else:
        from safetensors.torch import save_model

        save_model(heads, str(directory / "medusa_lm_head.safetensors"))  # dedups the shared block's tensors
    return heads


def write_medusa2_full(directory: Path, target, num_heads: int = 3, seed: int = 0) -> nn.ModuleList:
    """A Medusa-2 full checkpoint: model.safetensors with `model.*`/`lm_head.*` and `medusa_head.*` beside them."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    heads = reference_medusa_heads(target, num_heads, 1, seed=seed).to(torch.bfloat16)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in target.model.state_dict().items()}
    tensors |= {f"medusa_head.{k}": v.contiguous() for k, v in heads.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"architectures": ["MedusaModel"], "model_type": "llama", "medusa_num_heads": num_heads, "medusa_num_layers": 1,
              "base_model_name_or_path": target.model_id}
    (directory / "config.json").write_text(json.dumps(config))
    return heads


def write_medusa_version2(directory: Path, target, num_heads: int = 4, seed: int = 0) -> nn.ModuleList:
    """A "version 2" heads-only file: ResBlocks only, logits through the base lm_head."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    heads = reference_medusa_heads(target, num_heads, 1, own_lm_head=False, seed=seed).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(directory / "medusa_lm_head.safetensors"))
    config = {"version": "2", "medusa_num_heads": num_heads, "medusa_num_layers": 1, "base_model_name_or_path": target.model_id}
    (directory / "config.json").write_text(json.dumps(config))
    return heads


class RefHydraHead(nn.Module):
    """HydraPrefixMLP / HydraMLP as the reference builds them (heads and prefix layer only)."""

    def __init__(self, target, arch: str, num_heads: int, num_layers: int, seed: int):
        super().__init__()
        from transformers import AutoModel

        H, V = target.hidden_size, target.vocab_size
        torch.manual_seed(seed)
        if arch == "prefix-mlp":
            prefix_config = copy.deepcopy(target.config)
            prefix_config.num_hidden_layers = 1
            self.prefix_embeding_layer = AutoModel.from_config(prefix_config)
        self.input_embed_fn = nn.Embedding(V, H)
        with torch.no_grad():
            self.input_embed_fn.weight.copy_(target.model.get_input_embeddings().weight)
        if arch == "prefix-mlp":
            self.hydra_mlp = nn.ModuleList(
                [nn.Sequential(nn.Dropout(0.2), RefHydraResBlock(H, h + 1), *([nn.Dropout(0.2), RefHydraResBlock(H)] * (num_layers - 1)))
                 for h in range(num_heads)]
            )
            self.hydra_lm_head = nn.ModuleList([nn.Sequential(nn.Dropout(0.2), nn.Linear(H, V)) for _ in range(num_heads)])
            lms = [lm[1] for lm in self.hydra_lm_head]
        else:
            self.hydra_mlp = nn.ModuleList(
                [nn.Sequential(RefHydraResBlock(H, h + 1), *([RefHydraResBlock(H)] * (num_layers - 1))) for h in range(num_heads)]
            )
            self.hydra_lm_head = nn.ModuleList([nn.Linear(H, V) for _ in range(num_heads)])
            lms = list(self.hydra_lm_head)
        self.double()
        with torch.no_grad():
            for lm in lms:
                lm.weight.copy_(target.lm_head.weight)
                lm.bias.normal_(0, 0.05)
            for h, mlp in enumerate(self.hydra_mlp):
                first = mlp[1] if arch == "prefix-mlp" else mlp[0]
                # the residual passes the base state through, as training would teach it
                first.res_connection.weight.zero_()
                first.res_connection.weight[:, :H] = torch.eye(H)
                first.linear.weight.normal_(0, 0.02)


def write_hydra(directory: Path, target, arch: str = "prefix-mlp", num_heads: int = 4, num_layers: int = 4, offset: int = 0, seed: int = 0,
                tied: bool = False) -> RefHydraHead:
    """ankner/hydra-vicuna-*-v1.3: config.json + hydra_lm_head.pt (bf16 state dict of the head module).
    `tied`: as `specbench train --tie-lm-head` writes it, without `hydra_lm_head.*` and
    `input_embed_fn.*` (the heads read the target's)."""
    directory.mkdir(parents=True, exist_ok=True)
    head = RefHydraHead(target, arch, num_heads, num_layers, seed).to(torch.bfloat16)
    config = {"base_model_name_or_path": target.model_id, "grounded_heads": True, "hidden_state_offset": offset,
              "hydra_head_arch": arch, "hydra_num_heads": num_heads, "hydra_num_layers": num_layers}
    (directory / "config.json").write_text(json.dumps(config))
    state = head.state_dict()
    if tied:
        state = {k: v for k, v in state.items() if not k.startswith(("hydra_lm_head.", "input_embed_fn."))}
    torch.save(state, directory / "hydra_lm_head.pt")
    return head


# --- the reference package's own modules, as decoder-layer Hydra pickles them ----------------------
# TCtower/Hydra trains with `medusa.model.modeling_llama_kv`, its copy of transformers 4.31's Llama
# classes, so the published `medusa_lm_head.pt` names those classes (and 4.31's LlamaConfig), never
# today's transformers. Rebuilt here as plain modules with the reference's attribute names, so the
# pickle this fixture writes does not change when the installed transformers does.

REFERENCE_KV_MODULE = "medusa.model.modeling_llama_kv"
REFERENCE_CONFIG_MODULE = "transformers.models.llama.configuration_llama"


class RefLlamaConfig:
    """The attributes a 4.31 LlamaConfig pickles (its __dict__), taken from the target's config."""

    __module__, __qualname__ = REFERENCE_CONFIG_MODULE, "LlamaConfig"

    def __init__(self, target_config) -> None:
        c = target_config
        self.vocab_size = c.vocab_size
        self.max_position_embeddings = c.max_position_embeddings
        self.hidden_size = c.hidden_size
        self.intermediate_size = c.intermediate_size
        self.num_hidden_layers = c.num_hidden_layers
        self.num_attention_heads = c.num_attention_heads
        self.num_key_value_heads = c.num_key_value_heads
        self.hidden_act = "silu"
        self.initializer_range = 0.02
        self.rms_norm_eps = c.rms_norm_eps
        self.pretraining_tp = 1
        self.use_cache = True
        self.rope_scaling = None
        self.return_dict = True
        self.torch_dtype = "float16"
        self.architectures = ["LlamaForCausalLM"]
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 0
        self.tie_word_embeddings = False
        self.transformers_version = "4.31.0"


class RefLlamaRMSNorm(nn.Module):
    __module__, __qualname__ = REFERENCE_KV_MODULE, "LlamaRMSNorm"

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps


class RefLlamaRotaryEmbedding(nn.Module):
    """4.31's rotary module: inv_freq a persistent buffer, the cos/sin tables non-persistent
    ones, all three inside the pickled module (the base is 10000, whatever the target's)."""

    __module__, __qualname__ = REFERENCE_KV_MODULE, "LlamaRotaryEmbedding"

    def __init__(self, dim, max_position_embeddings=2048, base=10000):
        super().__init__()
        self.dim, self.max_position_embeddings, self.base = dim, max_position_embeddings, base
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))
        self.max_seq_len_cached = max_position_embeddings
        freqs = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin_cached", emb.sin()[None, None], persistent=False)


class RefLlamaMLP(nn.Module):
    __module__, __qualname__ = REFERENCE_KV_MODULE, "LlamaMLP"

    def __init__(self, config):
        super().__init__()
        self.pretraining_tp = config.pretraining_tp
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = nn.SiLU()


class RefLlamaAttention(nn.Module):
    __module__, __qualname__ = REFERENCE_KV_MODULE, "LlamaAttention"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.pretraining_tp = config.pretraining_tp
        self.max_position_embeddings = config.max_position_embeddings
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rotary_emb = RefLlamaRotaryEmbedding(self.head_dim, max_position_embeddings=self.max_position_embeddings)


class RefLlamaDecoderLayer(nn.Module):
    __module__, __qualname__ = REFERENCE_KV_MODULE, "LlamaDecoderLayer"

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = RefLlamaAttention(config=config)
        self.mlp = RefLlamaMLP(config)
        self.input_layernorm = RefLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RefLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def published_class(base: type, name: str, module: str) -> type:
    return type(name, (base,), {"__module__": module, "__qualname__": name})


def save_naming_modules(payload, path: Path, classes: dict[str, dict[str, type]]) -> None:
    """torch.save `payload` while `classes` ({module: {name: class}}) stand at those module paths,
    so the pickle names them there; every replaced sys.modules entry is put back."""
    saved = {name: sys.modules.get(name) for name in classes}
    try:
        for module_name, members in classes.items():
            module = types.ModuleType(module_name)
            for name, cls in members.items():
                setattr(module, name, cls)
            sys.modules[module_name] = module
        torch.save(payload, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_hydra_decoder(directory: Path, target, num_decoder_layers: int = 1, num_heads: int = 3, seed: int = 0) -> dict:
    """shiqihe/hydra-decoder-*: medusa_lm_head.pt holding *pickled modules*
    {"medusa_head": ModuleList, "medusa_rms_norm": LlamaRMSNorm, "medusa_decoder_layers": ModuleList},
    whose classes live in the reference package (medusa.model.*), not installed where they are loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    ResBlock = published_class(RefMedusaResBlock, "ResBlock", "medusa.model.medusa_model")
    reference = (RefLlamaRMSNorm, RefLlamaRotaryEmbedding, RefLlamaMLP, RefLlamaAttention, RefLlamaDecoderLayer)
    classes = {
        "medusa": {}, "medusa.model": {},
        "medusa.model.medusa_model": {"ResBlock": ResBlock},
        REFERENCE_KV_MODULE: {cls.__qualname__: cls for cls in reference},
        REFERENCE_CONFIG_MODULE: {"LlamaConfig": RefLlamaConfig},
    }
    config = RefLlamaConfig(target.config)
    H, V = target.hidden_size, target.vocab_size
    torch.manual_seed(seed)
    heads = nn.ModuleList()
    for _ in range(num_heads):
        lm = nn.Linear(H, V, bias=False)
        heads.append(nn.Sequential(ResBlock(H), lm))
    layers = nn.ModuleList([RefLlamaDecoderLayer(config) for _ in range(num_decoder_layers)])
    norm = RefLlamaRMSNorm(H, eps=config.rms_norm_eps)
    L = len(target.backbone.layers)
    with torch.no_grad():
        for head in heads:
            head[0].linear.weight.normal_(0, 0.05)
            head[1].weight.copy_(target.lm_head.weight.float())
        for j, layer in enumerate(layers):  # the trunk starts as the base model's last layers
            base = dict(target.backbone.layers[L - num_decoder_layers + j].named_parameters())
            mine = dict(layer.named_parameters())
            assert set(mine) == set(base), sorted(set(mine) ^ set(base))
            for name, param in mine.items():
                param.copy_(base[name])
        norm.weight.copy_(target.backbone.norm.weight)
    payload = {"medusa_head": heads.to(torch.bfloat16), "medusa_rms_norm": norm.to(torch.bfloat16),
               "medusa_decoder_layers": layers.to(torch.bfloat16)}
    save_naming_modules(payload, directory / "medusa_lm_head.pt", classes)
    config_json = {"medusa_num_heads": num_heads, "medusa_num_layers": 1, "medusa_num_decoder_layers": num_decoder_layers,
                   "base_model_name_or_path": target.model_id}
    (directory / "config.json").write_text(json.dumps(config_json))
    return {"medusa_head": heads, "medusa_rms_norm": norm, "medusa_decoder_layers": layers}
