"""The published DFlash checkpoint layouts, read strictly into one `DFlashConfig` and the
canonical key names of `DFlashNet` (formats and traps: docs/dflash.md).

- `dflash` (z-lab DFlash v1, e.g. z-lab/Qwen3-8B-DFlash-b16): config.json with
  `architectures: ["DFlashDraftModel"]`, top-level `block_size`, `dflash_config`
  {mask_token_id, target_layer_ids}; model.safetensors with `fc.weight`,
  `hidden_norm.weight`, `norm.weight`, `layers.{i}.*` (no embedding, no LM head).
- `dflash2` (`DFlash2DraftModel`): everything under `dflash_config` (block_size, conv_*,
  selector_*, output_multiplier, final_logit_softcapping), sliding layers, explicit
  `is_causal`; adds `layers.{i}.{attention,mlp}_conv.{base_kernel,kernel_projection.weight}`
  and `candidate_selector.*`, whose two codebooks carry no `.weight` suffix on disk.
- `muse-glimmer-assistant` (Meta's `MuseGlimmerAssistantModel`): a flat config (no
  dflash_config, no vocab_size) and the v1 tensors with `encoder.fc.weight` /
  `encoder.output_norm_enc.weight` for `fc.weight` / `hidden_norm.weight`.

Config values are read as published: `dflash_config.X` wins over a top-level `X`.
Tensors are strict: a missing, an unexpected or a mis-shaped key is one error line,
named as the file names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.activations import ACT2FN

from specbench.drafters.checkpoints import locate_first, read_config, read_tensors, stored_dtype
from specbench.drafters.dflash.model import DFlashConfig, DFlashNet
from specbench.errors import UserError

V1, DFLASH2, ASSISTANT = "dflash", "dflash2", "muse-glimmer-assistant"
LAYOUTS = (V1, DFLASH2, ASSISTANT)
ARCHITECTURES = {"DFlashDraftModel": V1, "DFlash2DraftModel": DFLASH2, "MuseGlimmerAssistantModel": ASSISTANT}
WEIGHT_FILES = ("model.safetensors",)
# file name -> canonical name, per layout (every other key is named alike)
RENAMES = {
    V1: {},
    DFLASH2: {f"candidate_selector.{c}": f"candidate_selector.{c}.weight" for c in ("predecessor_codebook", "successor_codebook")},
    ASSISTANT: {"encoder.fc.weight": "fc.weight", "encoder.output_norm_enc.weight": "hidden_norm.weight"},
}


@dataclass
class DFlashCheckpoint:
    name: str
    directory: Path
    files: list[str]
    layout: str
    config: DFlashConfig
    state: dict[str, torch.Tensor]  # canonical keys, as stored
    raw_config: dict[str, Any] = field(default_factory=dict)
    causal_from: str = ""

    @property
    def stored_dtype(self) -> str:
        return stored_dtype(self.state)

    def describe(self) -> dict:
        c = self.config
        return {"heads": self.name, "head_files": self.files, "format": self.layout, "stored_dtype": self.stored_dtype,
                "draft_layers": c.num_layers, "block_size": c.block_size, "mask_token_id": c.mask_token_id,
                "target_layer_ids": list(c.target_layer_ids), "causal": c.causal[0] if len(set(c.causal)) == 1 else list(c.causal),
                "causal_from": self.causal_from, "sliding_window": c.sliding_window[0] if len(set(c.sliding_window)) == 1 else
                list(c.sliding_window)}


def file_name(layout: str, key: str) -> str:
    """A canonical key as the layout's file names it."""
    back = {v: k for k, v in RENAMES[layout].items()}
    return back.get(key, key)


# --- reading -------------------------------------------------------------------------

def read_checkpoint(spec: str) -> DFlashCheckpoint:
    directory, file = locate_first(spec, WEIGHT_FILES, "DFlash draft")
    raw = read_config(directory)
    if not raw:
        raise UserError(f"no config.json beside {file}: a DFlash checkpoint needs its config (block size, mask token, target layers)")
    state = read_tensors(file)
    layout = detect_layout(raw, state, spec)
    config, causal_from = parse_config(raw, layout, spec)
    renames = RENAMES[layout]
    stray = [k for k in state if k in renames.values()]  # a canonical name this layout's files never use
    if stray:
        raise UserError(f"{spec}: unexpected key '{stray[0]}' for a {layout} checkpoint (its files name it "
                        f"'{file_name(layout, stray[0])}'); the file does not match its config")
    state = {renames.get(k, k): v for k, v in state.items()}
    return DFlashCheckpoint(spec, directory, [file.name], layout, config, state, raw, causal_from)


def detect_layout(raw: dict, state: dict, what: str) -> str:
    archs = raw.get("architectures") or []
    named = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES] if isinstance(archs, list) else []
    if named:
        return named[0]
    if any(k.startswith("candidate_selector.") for k in state):
        return DFLASH2
    if any(k.startswith("encoder.") for k in state):
        return ASSISTANT
    if "fc.weight" in state and "hidden_norm.weight" in state:
        return V1
    raise UserError(f"{what}: not a DFlash checkpoint: config.json names none of {', '.join(ARCHITECTURES)} and the file "
                    "has neither fc.weight + hidden_norm.weight nor encoder.fc.weight")


def _value(raw: dict, name: str, default: Any = None) -> Any:
    """dflash_config.X over a top-level X (the reference's precedence)."""
    nested = raw.get("dflash_config") if isinstance(raw.get("dflash_config"), dict) else {}
    if name in nested and nested[name] is not None:
        return nested[name]
    value = raw.get(name)
    return default if value is None else value


def _int(raw: dict, name: str, what: str, default: int | None = None, minimum: int = 1) -> int:
    value = _value(raw, name, default)
    if value is None:
        raise UserError(f"{what}: config.json lacks '{name}'")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{what}: config '{name}' must be an integer >= {minimum} (got {value!r})")
    return value


def _float(raw: dict, name: str, what: str, default: float | None) -> float | None:
    value = _value(raw, name, default)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"{what}: config '{name}' must be a number (got {value!r})")
    return float(value)


def parse_config(raw: dict, layout: str, what: str) -> tuple[DFlashConfig, str]:
    H = _int(raw, "hidden_size", what)
    heads = _int(raw, "num_attention_heads", what)
    kv_heads = _int(raw, "num_key_value_heads", what, default=heads)
    if heads % kv_heads:
        raise UserError(f"{what}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = _int(raw, "head_dim", what, default=H // heads)
    layers = _int(raw, "num_hidden_layers", what)
    act = _value(raw, "hidden_act", "silu")
    if act not in ACT2FN:
        raise UserError(f"{what}: unknown hidden_act '{act}'")
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        raise UserError(f"{what}: rope scaling {scaling.get('rope_type') or scaling.get('type')!r} is not supported for DFlash drafts")
    theta = _value(raw, "rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UserError(f"{what}: config 'rope_theta' must be a positive number (got {theta!r})")
    ids = _value(raw, "target_layer_ids")
    if ids is None:
        raise UserError(f"{what}: config.json lacks target_layer_ids (dflash_config.target_layer_ids): the target layers the draft reads")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UserError(f"{what}: config 'target_layer_ids' must be a non-empty list of layer indices (got {ids!r})")
    types = _value(raw, "layer_types", ["full_attention"] * layers)
    if not isinstance(types, list) or len(types) != layers or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise UserError(f"{what}: config 'layer_types' must list full_attention/sliding_attention for each of the {layers} layers")
    window = _value(raw, "sliding_window")
    if "sliding_attention" in types and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise UserError(f"{what}: sliding layers need a positive 'sliding_window' (got {window!r})")
    explicit = _value(raw, "causal", _value(raw, "is_causal"))
    if explicit is not None:
        causal, source = (bool(explicit),) * layers, "config is_causal"
    elif layout == ASSISTANT:  # z-lab's reading of Meta's assistant: a bidirectional block, like every v1 draft
        causal, source = (False,) * layers, "muse-glimmer-assistant default (bidirectional block)"
    else:  # the reference's default: sliding layers causal, full ones bidirectional
        causal, source = tuple(t == "sliding_attention" for t in types), "layer_types default (sliding = causal)"
    extra = {}
    if layout == DFLASH2:
        extra = {name: _int(raw, name, what) for name in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")}
        if H % extra["conv_group_size"]:
            raise UserError(f"{what}: hidden_size {H} is not a multiple of conv_group_size {extra['conv_group_size']}")
        if _value(raw, "vocab_size") is None:
            raise UserError(f"{what}: a DFlash2 config needs vocab_size (the selector's codebooks have a row per token)")
    softcap = _float(raw, "final_logit_softcapping", what, None)
    config = DFlashConfig(
        layout=layout, hidden_size=H, intermediate_size=_int(raw, "intermediate_size", what), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, num_layers=layers, block_size=_int(raw, "block_size", what, default=16, minimum=2),
        mask_token_id=_int(raw, "mask_token_id", what, minimum=0), target_layer_ids=tuple(ids), causal=causal,
        sliding_window=tuple(window if t == "sliding_attention" else None for t in types),
        vocab_size=_value(raw, "vocab_size"), num_target_layers=_value(raw, "num_target_layers"), hidden_act=act,
        rms_norm_eps=float(_value(raw, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
        attention_bias=bool(_value(raw, "attention_bias", False)),
        output_multiplier=_float(raw, "output_multiplier", what, 1.0),
        final_logit_softcapping=softcap if softcap and softcap > 0 else None,
        input_embedding_scale=_float(raw, "input_embedding_scale", what, 1.0), **extra)
    return config, source


# --- fitting a checkpoint to a target, strictly ----------------------------------------

def expected_keys(config: DFlashConfig, target_hidden: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = DFlashNet(config, target_hidden)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_fit(checkpoint: DFlashCheckpoint, target) -> None:
    c, what = checkpoint.config, f"DFlash draft '{checkpoint.name}'"
    if target.hidden_size and c.hidden_size != target.hidden_size:
        raise UserError(f"hidden-size mismatch: {what} is {c.hidden_size} wide, target '{target.name}' has hidden size "
                        f"{target.hidden_size}; the draft embeds with the target's table and reads with its LM head: use a draft "
                        "trained for this target")
    if c.vocab_size is not None and target.vocab_size is not None and c.vocab_size != target.vocab_size:
        raise UserError(f"vocabulary mismatch: {what} is for a vocabulary of {c.vocab_size} tokens, target '{target.name}' has "
                        f"{target.vocab_size}; use a draft trained for this target")
    if target.vocab_size is not None and c.mask_token_id >= target.vocab_size:
        raise UserError(f"{what}: mask_token_id {c.mask_token_id} is not a row of target '{target.name}''s embedding "
                        f"({target.vocab_size} rows); use a draft trained for this target")
    layers = target.num_layers
    if layers is not None:
        if c.num_target_layers is not None and c.num_target_layers != layers:
            raise UserError(f"{what} was trained on a target of {c.num_target_layers} layers, '{target.name}' has {layers}; "
                            "use a draft trained for this target")
        bad = [k for k in c.target_layer_ids if k >= layers]
        if bad:
            raise UserError(f"{what}: target_layer_ids {list(c.target_layer_ids)} name layer {bad[0]}, target '{target.name}' has "
                            f"{layers} layers (0..{layers - 1})")


def build_net(checkpoint: DFlashCheckpoint, target) -> DFlashNet:
    """The draft network with the checkpoint's weights in the target's dtype, on its device, after
    checking every key (strict) and the fit to the target; embedding and LM head are the target's."""
    check_fit(checkpoint, target)
    c, state, what, layout = checkpoint.config, checkpoint.state, checkpoint.name, checkpoint.layout
    target_hidden = target.hidden_size or c.hidden_size
    expected = expected_keys(c, target_hidden)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for keys, word in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise UserError(f"{what}: {word} key '{file_name(layout, keys[0])}'{more} for a {layout} checkpoint; "
                            "the file does not match its config")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{what}: '{file_name(layout, key)}' has shape {tuple(state[key].shape)}, its config.json and the "
                            f"target imply {shape}")
    with torch.device("meta"):
        net = DFlashNet(c, target_hidden)
    device, dtype = target.device, target.dtype
    net.load_state_dict({k: state[k].to(device, dtype) for k in expected}, strict=True, assign=True)
    net.set_target(target.input_embeddings, target.lm_head)
    return net.eval().requires_grad_(False)


def tap_rule(num_layers: int, taps: int = 5) -> list[int]:
    """The target layer ids z-lab's drafts are trained on: n taps spread over L layers as
    round(1 + i (L - 4) / (n - 1)), Python's round (half to even); one tap: L // 2."""
    if taps == 1:
        return [num_layers // 2]
    return [round(1 + i * (num_layers - 4) / (taps - 1)) for i in range(taps)]


# --- writing (train): the z-lab DFlash v1 layout ---------------------------------------------

def v1_config(c: DFlashConfig, dtype: str, bos: int | None = None, eos: int | None = None, max_positions: int = 2048) -> dict:
    """config.json in z-lab's DFlash v1 template (the fields of z-lab/Qwen3-4B-DFlash-b16, in
    that order), holding this draft's sizes."""
    return {
        "architectures": ["DFlashDraftModel"], "attention_bias": c.attention_bias, "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": c.block_size, "bos_token_id": bos,
        "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids)}, "dtype": dtype,
        "eos_token_id": eos, "head_dim": c.head_dim, "hidden_act": c.hidden_act, "hidden_size": c.hidden_size,
        "initializer_range": 0.02, "intermediate_size": c.intermediate_size, "layer_types": ["full_attention"] * c.num_layers,
        "max_position_embeddings": max_positions, "max_window_layers": c.num_layers, "model_type": "qwen3",
        "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers, "num_key_value_heads": c.num_kv_heads,
        "num_target_layers": c.num_target_layers, "rms_norm_eps": c.rms_norm_eps, "rope_scaling": None, "rope_theta": c.rope_theta,
        "sliding_window": None, "tie_word_embeddings": False, "transformers_version": "4.57.3", "use_cache": True,
        "use_sliding_window": False, "vocab_size": c.vocab_size,
    }


def write_v1(directory, net: DFlashNet, dtype: torch.dtype = torch.float32, bos: int | None = None, eos: int | None = None) -> None:
    """`net` (a v1 draft) as z-lab publishes one: config.json + model.safetensors (metadata format pt)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if net.config.dflash2:
        raise ValueError("the v1 layout holds DFlash v1 drafts")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = v1_config(net.config, str(dtype).removeprefix("torch."), bos, eos)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
