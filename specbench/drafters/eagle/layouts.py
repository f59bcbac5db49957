"""The published EAGLE checkpoint layouts, read strictly into one `EagleConfig` and the
canonical key names of `EagleNet`, and written back (formats and traps: docs/eagle.md).

- `eagle` (EAGLE-1/2 as published, e.g. yuhuili/EAGLE-Vicuna-7B-v1.3): config.json
  (a LlamaConfig-shaped dict) + pytorch_model.bin (or model.safetensors); keys `fc.*`,
  `layers.{i}.*`, `embed_tokens.weight`.
- `eagle3` (EAGLE-3 as published, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): the same
  files; keys `midlayer.*`, `fc.weight`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d`.
- `speculators-eagle3` (vllm-project/speculators): config.json with
  `speculators_model_type: "eagle3"`, `speculators_config` and the draft layer's own
  `transformer_layer_config` + model.safetensors; the EAGLE-3 keys with `layers.0.`
  for `midlayer.`.

The format is told by the config's `speculators_model_type` and by the keys, never by
`architectures` (copies of the same weights carry different ones). Every default the
reference code applies to an absent key is applied here, and nothing is silently
ignored: a missing or unexpected key is one error line, the only optional keys being
`embed_tokens.weight`, `d2t`/`t2d` when the draft vocabulary is the target's, and
rotary `inv_freq` buffers.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.activations import ACT2FN

from specbench.drafters.checkpoints import ROTARY_TABLE, locate_first, read_config, read_tensors, stored_dtype
from specbench.drafters.eagle.model import EagleConfig, EagleNet
from specbench.errors import SpecbenchWarning, UserError

EAGLE1, EAGLE3, SPECULATORS = "eagle", "eagle3", "speculators-eagle3"
LAYOUTS = (EAGLE1, EAGLE3, SPECULATORS)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the same tensors where a repo has both
SPECULATORS_VERSION = "0.3.0"  # the format version the writer follows


@dataclass
class EagleCheckpoint:
    name: str  # what the user gave (hub id, directory or file)
    directory: Path
    files: list[str]
    layout: str  # one of LAYOUTS
    config: EagleConfig
    state: dict[str, torch.Tensor]  # canonical keys (EagleNet's), as stored
    raw_config: dict[str, Any] = field(default_factory=dict)
    taps: tuple[int, ...] | None = None  # target layers (inputs of) the checkpoint names, if it does
    verifier: str | None = None  # the target it was trained for, if the config says

    @property
    def stored_dtype(self) -> str:
        return stored_dtype(self.state)

    def describe(self) -> dict:
        c = self.config
        info = {"heads": self.name, "head_files": self.files, "format": self.layout, "stored_dtype": self.stored_dtype,
                "draft_layers": c.num_layers, "rope_theta": c.rope_theta, "fc_bias": c.fc_bias}
        if c.version == 3:
            info["norm_before_residual"] = c.norm_before_residual
        if self.verifier:
            info["base_model"] = self.verifier
        return info


# --- reading -------------------------------------------------------------------------

def read_checkpoint(spec: str) -> EagleCheckpoint:
    """An EAGLE checkpoint from a directory, a weights file or a hub id, in any published layout."""
    directory, file = locate_first(spec, WEIGHT_FILES, "EAGLE draft")
    raw = read_config(directory)
    if not raw:
        raise UserError(f"no config.json beside {file}: an EAGLE checkpoint needs its config (hidden size, heads, vocabulary)")
    state = read_tensors(file)
    layout = detect_layout(raw, state, spec)
    taps, verifier = None, None
    if layout == SPECULATORS:
        config, taps, verifier = speculators_config(raw, spec)
    else:
        config = original_config(raw, 3 if layout == EAGLE3 else 1, spec)
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if ids is not None:  # SpecForge's configs: "output of layer k" = the input of layer k + 1
            taps = tuple(int(i) + 1 for i in _int_list(ids, "eagle_config.eagle_aux_hidden_state_layer_ids", spec))
    if layout == EAGLE3:
        if any(k.startswith("layers.") for k in state) and any(k.startswith("midlayer.") for k in state):
            raise UserError(f"{spec}: holds both midlayer.* and layers.* weights; an EAGLE-3 draft has one layer")
        state = {("layers.0." + k.removeprefix("midlayer.")) if k.startswith("midlayer.") else k: v for k, v in state.items()}
    return EagleCheckpoint(spec, directory, [file.name], layout, config, state, raw, taps, verifier)


def detect_layout(raw: dict, state: dict[str, torch.Tensor], what: str) -> str:
    kind = raw.get("speculators_model_type")
    if kind is not None:
        if kind == "eagle3":
            return SPECULATORS
        raise UserError(f"{what}: speculators model type '{kind}' is not supported; specbench reads 'eagle3' speculators "
                        "checkpoints and the original EAGLE-1/2 and EAGLE-3 layouts")
    if "d2t" in state or any(k.startswith("midlayer.") for k in state):
        return EAGLE3
    fc = state.get("fc.weight")
    if fc is not None and fc.dim() == 2 and any(k.startswith("layers.") for k in state):
        if fc.shape[1] == 2 * fc.shape[0]:
            return EAGLE1
        if "lm_head.weight" in state:  # EAGLE-3 keys renamed to layers.0 (as vLLM renames them), no speculators config
            return EAGLE3
    raise UserError(f"{what}: not an EAGLE checkpoint: expected midlayer.* or d2t (EAGLE-3), layers.0.* with fc.weight "
                    "[H, 2H] (EAGLE-1/2), or a config.json with speculators_model_type")


def _int_list(value, name: str, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{what}: config '{name}' must be a list of layer indices")
    return value


def _positive(raw: dict, key: str, what: str, default: int | None = None) -> int:
    value = raw.get(key)
    value = default if value is None else value  # absent or null: the default
    if value is None:
        raise UserError(f"{what}: config.json lacks '{key}'")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{what}: config '{key}' must be a positive integer (got {value!r})")
    return value


def rope_settings(raw: dict, what: str) -> tuple[float, dict | None]:
    """(base, scaling) from a draft config: `rope_theta` if present, else (configs saved by
    transformers >= 5) `rope_parameters.rope_theta`, else 10000; scaling `linear` or `llama3`."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    theta = raw.get("rope_theta", params.get("rope_theta"))
    theta = 10000.0 if theta is None else theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UserError(f"{what}: config 'rope_theta' must be a positive number (got {theta!r})")
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    needs = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind not in needs:
        raise UserError(f"{what}: rope scaling '{kind}' is not supported for EAGLE drafts (none, linear, llama3)")
    missing = [k for k in needs[kind] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise UserError(f"{what}: rope scaling '{kind}' lacks {', '.join(missing)}")
    return float(theta), (dict(scaling, rope_type=kind) if kind != "default" else None)


def _layer_fields(raw: dict, what: str, honour_head_dim: bool) -> dict:
    """The decoder-layer fields of a LlamaConfig-shaped dict, with the reference's defaults."""
    H = _positive(raw, "hidden_size", what)
    heads = _positive(raw, "num_attention_heads", what)
    # absent: an MHA draft, whatever the target uses
    kv_heads = _positive(raw, "num_key_value_heads", what, default=heads)
    if honour_head_dim and raw.get("head_dim"):
        head_dim = _positive(raw, "head_dim", what)
    else:  # the EAGLE code takes H / nH and ignores any head_dim key
        if H % heads:
            raise UserError(f"{what}: hidden_size {H} is not a multiple of num_attention_heads {heads}")
        head_dim = H // heads
    if heads % kv_heads:
        raise UserError(f"{what}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    act = raw.get("hidden_act", "silu")
    if act not in ACT2FN:
        raise UserError(f"{what}: unknown hidden_act '{act}'")
    theta, scaling = rope_settings(raw, what)
    eps = raw.get("rms_norm_eps", 1e-6)
    return dict(hidden_size=H, intermediate_size=_positive(raw, "intermediate_size", what), num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim, vocab_size=_positive(raw, "vocab_size", what), hidden_act=act, rms_norm_eps=float(eps),
                rope_theta=theta, rope_scaling=scaling, qkv_bias=bool(raw.get("qkv_bias", raw.get("attention_bias", False))))


def original_config(raw: dict, version: int, what: str) -> EagleConfig:
    fields = _layer_fields(raw, what, honour_head_dim=False)
    H, V = fields["hidden_size"], fields["vocab_size"]
    layers = _positive(raw, "num_hidden_layers", what, default=1)
    if version == 3 and layers != 1:
        raise UserError(f"{what}: an EAGLE-3 draft has one layer (midlayer); config says num_hidden_layers {layers}")
    bias = raw.get("bias", True)  # absent means fc HAS a bias (the reference's default)
    return EagleConfig(
        version=version, num_layers=layers, draft_vocab_size=_positive(raw, "draft_vocab_size", what, default=V) if version == 3 else V,
        target_hidden_size=_positive(raw, "target_hidden_size", what, default=H),
        fc_bias=bool(bias) if version == 1 else False, **fields)


def speculators_config(raw: dict, what: str) -> tuple[EagleConfig, tuple[int, ...] | None, str | None]:
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise UserError(f"{what}: a speculators config needs 'transformer_layer_config' (the draft layer's LlamaConfig)")
    fields = _layer_fields(layer, f"{what} transformer_layer_config", honour_head_dim=True)
    H, V = fields["hidden_size"], fields["vocab_size"]
    layers = _positive(layer, "num_hidden_layers", what, default=1)
    if layers != 1:
        raise UserError(f"{what}: speculators drafts with {layers} layers are not supported yet (one layer, layers.0)")
    if raw.get("norm_before_fc") and raw.get("fc_norm"):
        raise UserError(f"{what}: config sets both norm_before_fc and fc_norm, which exclude each other")
    if raw.get("norm_output"):
        raise UserError(f"{what}: config sets norm_output, which specbench does not implement; convert the draft without it")
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    taps = tuple(_int_list(ids, "eagle_aux_hidden_state_layer_ids", what)) if ids is not None else None  # inputs of these layers
    verifier = ((raw.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    config = EagleConfig(
        version=3, num_layers=1, draft_vocab_size=_positive(raw, "draft_vocab_size", what, default=V),
        target_hidden_size=_positive(raw, "target_hidden_size", what, default=H),
        # vLLM, which this format is made for, takes it as true when the key is absent
        norm_before_residual=bool(raw.get("norm_before_residual", True)),
        norm_before_fc=bool(raw.get("norm_before_fc")), fc_norm=bool(raw.get("fc_norm")), **fields)
    return config, taps, verifier


# --- fitting a checkpoint to a target, strictly ----------------------------------------------

def expected_keys(config: EagleConfig, own_embedding: bool) -> dict[str, tuple[int, ...]]:
    """Every key an EagleNet of this config holds, with its shape."""
    with torch.device("meta"):
        net = EagleNet(config, embedding=None if own_embedding else torch.nn.Embedding(1, 1))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _hint(key: str, checkpoint: EagleCheckpoint, missing: bool) -> str:
    raw = checkpoint.raw_config
    if key == "fc.bias" and missing:
        return " (config.json has no \"bias\" key, which means fc has a bias; a file without fc.bias says \"bias\": false)"
    if key == "fc.bias":
        return " (config.json says \"bias\": false)" if checkpoint.config.version == 1 else " (EAGLE-3's fc has no bias)"
    if key == "layers.0.input_layernorm.weight" and checkpoint.config.version == 1:
        return " (EAGLE-1's first layer has no input norm)"
    if key in ("d2t", "t2d") and not missing:
        return " (draft_vocab_size equals vocab_size, so no map is used)" if "draft_vocab_size" in raw else ""
    return ""


def check_fit(checkpoint: EagleCheckpoint, target) -> None:
    """One line for a checkpoint that does not fit the target: vocabulary, hidden size, map."""
    c, what = checkpoint.config, f"EAGLE draft '{checkpoint.name}'"
    if target.vocab_size is not None and c.vocab_size != target.vocab_size:
        raise UserError(f"vocabulary mismatch: {what} is for a vocabulary of {c.vocab_size} tokens, target '{target.name}' has "
                        f"{target.vocab_size}; use a draft trained for this target")
    wanted = c.target_hidden_size if c.version == 3 else c.hidden_size
    if target.hidden_size and wanted != target.hidden_size:
        raise UserError(f"hidden-size mismatch: {what} reads target states of width {wanted}, target '{target.name}' has hidden "
                        f"size {target.hidden_size}; use a draft trained for this target")
    if target.hidden_size and c.hidden_size != target.hidden_size and "embed_tokens.weight" not in checkpoint.state:
        raise UserError(f"{what} is {c.hidden_size} wide and has no embed_tokens.weight, and the target's embedding is "
                        f"{target.hidden_size} wide; the checkpoint must carry its own embedding")
    if c.version == 3 and c.draft_vocab_size != c.vocab_size:
        if "d2t" not in checkpoint.state or "t2d" not in checkpoint.state:
            gone = "d2t" if "d2t" not in checkpoint.state else "t2d"
            raise UserError(f"missing map: {what} drafts over {c.draft_vocab_size} of {c.vocab_size} tokens but has no '{gone}' "
                            "(draft -> target ids); the checkpoint is incomplete")


def check_vocab_map(checkpoint: EagleConfig | Any, d2t: torch.Tensor, t2d: torch.Tensor, what: str) -> None:
    """d2t holds offsets (target id = d + d2t[d]); t2d marks exactly those target ids."""
    c = checkpoint
    ids = torch.arange(c.draft_vocab_size) + d2t.long().cpu()
    if ids.min() < 0 or ids.max() >= c.vocab_size or ids.unique().numel() != ids.numel():
        raise UserError(f"{what}: d2t does not map the draft vocabulary into distinct target ids 0..{c.vocab_size - 1} "
                        "(d2t holds offsets, target id = d + d2t[d]); the map is corrupt")
    marked = torch.zeros(c.vocab_size, dtype=torch.bool)
    marked[ids] = True
    if not torch.equal(marked, t2d.bool().cpu()):
        raise UserError(f"{what}: d2t and t2d disagree on which target ids the draft vocabulary holds; the map is corrupt")


def build_net(checkpoint: EagleCheckpoint, target) -> EagleNet:
    """The draft network with the checkpoint's weights in the target's dtype, on its device,
    after checking every key (strict) and the fit to the target."""
    check_fit(checkpoint, target)
    c, state, what = checkpoint.config, checkpoint.state, checkpoint.name
    own = "embed_tokens.weight" in state
    expected = expected_keys(c, own)
    optional = {"embed_tokens.weight"} | ({"d2t", "t2d"} if c.version == 3 and c.draft_vocab_size == c.vocab_size else set())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in optional and not ROTARY_TABLE.search(k)]
    for keys, word in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            key = keys[0] if checkpoint.layout != EAGLE3 else keys[0].replace("layers.0.", "midlayer.")
            raise UserError(f"{what}: {word} key '{key}'{more} for an {checkpoint.layout} checkpoint"
                            f"{_hint(keys[0], checkpoint, word == 'missing')}; the file does not match its config")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{what}: '{key}' has shape {tuple(state[key].shape)}, its config.json implies {shape}"
                            + (" (no num_key_value_heads: an MHA draft)" if "k_proj" in key and "num_key_value_heads" not in
                               (checkpoint.raw_config.get("transformer_layer_config") or checkpoint.raw_config) else ""))
    if c.version == 3 and c.draft_vocab_size != c.vocab_size:
        check_vocab_map(c, state["d2t"], state["t2d"], what)
    if checkpoint.verifier and target.model_id and checkpoint.verifier.rstrip("/") != str(target.model_id).rstrip("/"):
        warnings.warn(f"EAGLE draft '{what}' was trained for '{checkpoint.verifier}', the target is '{target.model_id}'",
                      SpecbenchWarning, stacklevel=2)
    embedding = None if own else target.input_embeddings
    with torch.device("meta"):
        net = EagleNet(c, embedding=torch.nn.Embedding(1, 1) if not own else None)
    net._shared_embedding[0] = embedding
    device, dtype = target.device, target.dtype
    # the reference computes in the target's dtype whatever the stored one
    weights = {k: (state[k].to(device, dtype) if state[k].is_floating_point() else state[k].to(device)) for k in expected}
    net.load_state_dict(weights, strict=True, assign=True)
    if c.version == 3:
        net.set_head(net.lm_head, net.draft_to_target())
    return net.eval().requires_grad_(False)


# --- writing (for `train`) -------------------------------------------------------------------

def _llama_fields(c: EagleConfig, dtype: str) -> dict:
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "num_hidden_layers": c.num_layers, "hidden_act": c.hidden_act,
            "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size, "max_position_embeddings": 2048,
            "rope_theta": c.rope_theta, **({"rope_scaling": c.rope_scaling} if c.rope_scaling else {}), "torch_dtype": dtype}


def checkpoint_config(config: EagleConfig, layout: str, dtype: str = "float32", taps: tuple[int, ...] | None = None,
                      verifier: str | None = None) -> dict:
    """config.json in a layout's published template."""
    c = config
    if layout == SPECULATORS:
        if c.version != 3:
            raise ValueError("the speculators layout holds EAGLE-3 drafts")
        layer = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": c.head_dim, **_llama_fields(c, dtype)}
        return {
            "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": SPECULATORS_VERSION,
            "speculators_config": {
                "algorithm": "eagle3", "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "verifier": {"name_or_path": verifier, "architectures": []}},
            "transformer_layer_config": layer, "draft_vocab_size": c.draft_vocab_size,
            "target_hidden_size": c.target_hidden_size if c.target_hidden_size != c.hidden_size else None,
            "norm_before_residual": c.norm_before_residual, "norm_before_fc": c.norm_before_fc, "fc_norm": c.fc_norm,
            "eagle_aux_hidden_state_layer_ids": list(taps) if taps else None, "torch_dtype": dtype,
        }
    if c.norm_before_residual or c.norm_before_fc or c.fc_norm:
        raise ValueError("norm_before_residual, norm_before_fc and fc_norm exist only in the speculators layout")
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_llama_fields(c, dtype)}
    if layout == EAGLE1:
        out["bias"] = c.fc_bias
    else:
        out["draft_vocab_size"] = c.draft_vocab_size
        if c.target_hidden_size != c.hidden_size:
            out["target_hidden_size"] = c.target_hidden_size
    return out


def write_checkpoint(directory: Path, net: EagleNet, layout: str, taps: tuple[int, ...] | None = None, verifier: str | None = None,
                     weights_file: str = "model.safetensors") -> Path:
    """Write `net` as a published layout: config.json + weights (model.safetensors, or
    pytorch_model.bin as the EAGLE repositories publish). The embedding is written only
    when the net owns one."""
    if layout not in LAYOUTS or (layout == EAGLE1) != (net.config.version == 1):
        raise ValueError(f"layout {layout} does not hold an EAGLE-{net.config.version} draft")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if layout == EAGLE3:
        state = {("midlayer." + k.removeprefix("layers.0.")) if k.startswith("layers.0.") else k: v for k, v in state.items()}
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype = str(floats[0]).removeprefix("torch.") if floats else "float32"
    config = checkpoint_config(net.config, layout, dtype, taps, verifier)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(directory / weights_file))
    else:
        torch.save(state, directory / weights_file)
    return directory
