"""The published draft-head layouts, parsed strictly (formats and traps: docs/heads.md).

- Medusa-1 (`medusa_lm_head.pt`, a bf16 torch pickle, or `.safetensors`): keys
  `{h}.{i}.linear.*`, `{h}.{L}.weight`; the head count comes from the keys (the
  published config under-reports it); a missing `{h}.{L}.weight` means
  "version 2" heads that use the base LM head. Medusa-2 full checkpoints keep
  the same keys under `medusa_head.` beside `model.*`.
- Hydra (`hydra_lm_head.pt`): `hydra_mlp.*`, `hydra_lm_head.*`, `input_embed_fn.weight`,
  and for Hydra++ `prefix_embeding_layer.*` (sic).
- Decoder-layer Hydra (`medusa_lm_head.pt` holding *pickled modules*): read with
  the safe unpickler, flattened to tensors; a file it cannot map is an error,
  never a silent no-op as in the reference loader.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from specbench.drafters.checkpoints import (
    Checkpoint,
    locate,
    read_config,
    read_safetensors_prefix,
    read_tensors,
)
from specbench.errors import SpecbenchWarning, UserError


def check_base_model(checkpoint: Checkpoint, target) -> None:
    base = checkpoint.config.get("base_model_name_or_path")
    if base and target.model_id and base.rstrip("/") != str(target.model_id).rstrip("/"):
        warnings.warn(
            f"heads '{checkpoint.name}' were trained for '{base}', the target is '{target.model_id}'",
            SpecbenchWarning,
            stacklevel=2,
        )


def check_shape(what: str, tensor: torch.Tensor, expected: tuple[int, ...], target) -> None:
    if tuple(tensor.shape) == expected:
        return
    if len(expected) == 2 and expected[0] == target.vocab_size and tensor.shape[0] != target.vocab_size:
        raise UserError(
            f"vocabulary mismatch: {what} predicts {tensor.shape[0]} token ids, target '{target.name}' "
            f"{target.vocab_size}; use heads trained for this target"
        )
    raise UserError(
        f"hidden-size mismatch: {what} has shape {tuple(tensor.shape)}, target '{target.name}' "
        f"(hidden size {target.hidden_size}) needs {expected}; use heads trained for this target"
    )


MEDUSA_BLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
MEDUSA_LM = re.compile(r"^(\d+)\.(\d+)\.weight$")


@dataclass
class MedusaLayout:
    num_heads: int
    num_layers: int
    own_lm_head: bool  # False: "version 2", logits through the base LM head


def medusa_layout(state: dict[str, torch.Tensor], what: str) -> MedusaLayout:
    blocks: dict[int, set[int]] = {}
    lm: dict[int, int] = {}
    for key in state:
        if m := MEDUSA_BLOCK.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        elif m := MEDUSA_LM.match(key):
            lm[int(m[1])] = int(m[2])
        else:
            raise UserError(f"{what}: unexpected key '{key}' for Medusa heads (expected '{{h}}.{{i}}.linear.weight' / '{{h}}.{{L}}.weight')")
    if not blocks:
        raise UserError(f"{what}: no Medusa head keys like '0.0.linear.weight'")
    heads = sorted(blocks)
    if heads != list(range(len(heads))):
        raise UserError(f"{what}: Medusa heads {heads} are not numbered 0..{len(heads) - 1}")
    own = bool(lm)
    if own and (sorted(lm) != heads or len(set(lm.values())) != 1):
        raise UserError(f"{what}: every Medusa head needs its LM head after its ResBlocks ('{{h}}.{{L}}.weight')")
    # the ResBlock is one module repeated L times: a deduplicating writer (safetensors)
    # may store it under one index only, so L comes from the LM head's index
    num_layers = next(iter(lm.values())) if own else max(blocks[0]) + 1
    if any(not blocks[h] <= set(range(num_layers)) for h in heads):
        raise UserError(f"{what}: Medusa ResBlock indices {sorted(blocks[0])} do not fit {num_layers} layer(s)")
    return MedusaLayout(len(heads), num_layers, own)


def load_medusa_state(heads_module, state: dict[str, torch.Tensor], target, what: str) -> None:
    """Copy published Medusa keys into a MedusaHeads. The shared ResBlock may be stored
    under one index only (deduplicated): any stored index stands for all."""
    state = dict(state)
    for key in heads_module.heads.state_dict():
        if key not in state and (m := MEDUSA_BLOCK.match(key)):
            stored = sorted(k for k in state if (n := MEDUSA_BLOCK.match(k)) and n[1] == m[1] and n[3] == m[3])
            if stored:
                state[key] = state[stored[0]]
    mine = heads_module.heads.state_dict()
    for key, value in mine.items():
        if key not in state:
            raise UserError(f"{what}: missing key '{key}'")
        check_shape(f"{what} '{key}'", state[key], tuple(value.shape), target)
    heads_module.heads.load_state_dict({k: state[k].to(target.dtype) for k in mine}, strict=True)


def load_medusa(spec: str, target) -> tuple[Checkpoint, MedusaLayout]:
    """Medusa-1 (`medusa_lm_head.{pt,safetensors}`), Medusa-2 (full checkpoint, `medusa_head.*`) or version 2."""
    directory, file = locate(spec, ("medusa_lm_head.pt", "medusa_lm_head.safetensors"))
    config = read_config(directory)
    candidates = [file] if file else [directory / "medusa_lm_head.safetensors", directory / "medusa_lm_head.pt"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        state = read_tensors(found)
        files = [found.name]
        if all(k.startswith("medusa_head.") for k in state):  # a heads file saved from the Medusa-2 model
            state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
    else:
        from_hub = spec if not Path(spec).expanduser().exists() else None
        state, files = read_safetensors_prefix(directory, "medusa_head.", from_hub)
        if not state:
            raise UserError(
                f"no Medusa heads in '{spec}': expected medusa_lm_head.pt / medusa_lm_head.safetensors, "
                "or a Medusa-2 checkpoint with medusa_head.* tensors"
            )
    checkpoint = Checkpoint(spec, directory, config, state, files)
    return checkpoint, medusa_layout(state, spec)


HYDRA_KEY = re.compile(r"^hydra_(mlp|lm_head)\.(\d+)\.(.+)$")


@dataclass
class HydraLayout:
    arch: str  # "mlp" | "prefix-mlp"
    num_heads: int
    num_layers: int
    grounded: bool
    hidden_state_offset: int
    tied_lm_head: bool = False  # no hydra_lm_head.*: the heads read the base LM head (specbench-trained, --tie-lm-head)


def hydra_layout(checkpoint: Checkpoint, target) -> HydraLayout:
    state, config, what = checkpoint.state, checkpoint.config, checkpoint.name
    heads: set[int] = set()
    own_lm_head = False
    for key in state:
        if m := HYDRA_KEY.match(key):
            heads.add(int(m[2]))
            own_lm_head |= m[1] == "lm_head"
        elif not key.startswith(("prefix_embeding_layer.", "input_embed_fn.")):
            raise UserError(f"{what}: unexpected key '{key}' for Hydra heads (expected hydra_mlp.*, hydra_lm_head.*, input_embed_fn.*, prefix_embeding_layer.*)")
    if not heads:
        raise UserError(f"{what}: no Hydra head keys like 'hydra_mlp.0...'")
    has_prefix = any(k.startswith("prefix_embeding_layer.") for k in state)
    arch = config.get("hydra_head_arch") or ("prefix-mlp" if has_prefix else "mlp")
    if arch not in ("mlp", "prefix-mlp"):
        raise UserError(f"{what}: hydra_head_arch '{arch}' is not supported (mlp, prefix-mlp)")
    if (arch == "prefix-mlp") != has_prefix:
        raise UserError(f"{what}: config says hydra_head_arch '{arch}' but the file {'has' if has_prefix else 'lacks'} prefix_embeding_layer.* weights")
    block_index = re.compile(r"^hydra_mlp\.0\.(\d+)\.linear\.weight$")
    indices = sorted(int(m[1]) for k in state if (m := block_index.match(k)))
    num_layers = config.get("hydra_num_layers") or len(indices)
    first = state.get("hydra_mlp.0.1.linear.weight" if arch == "prefix-mlp" else "hydra_mlp.0.0.linear.weight")
    if first is None:
        raise UserError(f"{what}: no first block for head 0 (hydra_mlp.0.{1 if arch == 'prefix-mlp' else 0}.linear.weight)")
    grounded = config.get("grounded_heads", first.shape[1] == 2 * first.shape[0])
    offset = int(config.get("hidden_state_offset", 0) or 0)
    if not 0 <= offset < target.num_layers:
        raise UserError(f"{what}: hidden_state_offset {offset} is outside the target's {target.num_layers} layers")
    return HydraLayout(arch, max(heads) + 1, int(num_layers), bool(grounded), offset, tied_lm_head=not own_lm_head)


def load_hydra(spec: str, target) -> tuple[Checkpoint, HydraLayout]:
    directory, file = locate(spec, ("hydra_lm_head.pt", "hydra_lm_head.safetensors"))
    candidates = [file] if file else [directory / "hydra_lm_head.pt", directory / "hydra_lm_head.safetensors"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(f"no Hydra heads in '{spec}': expected hydra_lm_head.pt (with config.json)")
    checkpoint = Checkpoint(spec, directory, read_config(directory), read_tensors(found), [found.name])
    return checkpoint, hydra_layout(checkpoint, target)


def load_hydra_state(heads_module, state: dict[str, torch.Tensor], target, what: str) -> None:
    mine = heads_module.state_dict()
    for key, value in mine.items():
        if key not in state:
            raise UserError(f"{what}: missing key '{key}' (num_layers or arch does not match the file)")
        check_shape(f"{what} '{key}'", state[key], tuple(value.shape), target)
    extra = sorted(k for k in state if k.startswith("hydra_") and k not in mine)
    if extra:
        raise UserError(f"{what}: keys this layout does not use, e.g. '{extra[0]}' (num_layers or arch does not match the file)")
    heads_module.load_state_dict({k: state[k].to(target.dtype) for k in mine}, strict=True)


@dataclass
class DecoderLayout:
    medusa: MedusaLayout
    num_decoder_layers: int


def load_hydra_decoder(spec: str, target) -> tuple[Checkpoint, DecoderLayout]:
    """`medusa_lm_head.pt` = {"medusa_head": ModuleList, "medusa_rms_norm": RMSNorm,
    "medusa_decoder_layers": ModuleList} as pickled modules (or the same as tensors)."""
    directory, file = locate(spec, ("medusa_lm_head.pt",))
    found = file or directory / "medusa_lm_head.pt"
    if not found.is_file():
        raise UserError(f"no decoder-layer Hydra heads in '{spec}': expected medusa_lm_head.pt (with config.json)")
    config = read_config(directory)
    flat = read_tensors(found, allow_pickled_modules=True)
    groups = {"medusa_head": {}, "medusa_rms_norm": {}, "medusa_decoder_layers": {}}
    for key, value in flat.items():
        top, _, rest = key.partition(".")
        if top not in groups:
            raise UserError(
                f"{spec}: cannot map '{key}': a decoder-layer Hydra file holds medusa_head, medusa_rms_norm "
                "and medusa_decoder_layers (is this a plain Medusa checkpoint? use --drafter medusa)"
            )
        groups[top][rest] = value
    layer_ids = {int(k.split(".", 1)[0]) for k in groups["medusa_decoder_layers"]}
    n = int(config.get("medusa_num_decoder_layers", len(layer_ids)))
    if n < 1 or layer_ids != set(range(n)) or "weight" not in groups["medusa_rms_norm"]:
        raise UserError(
            f"{spec}: expected {n} decoder layers (medusa_decoder_layers.0..{n - 1}) and medusa_rms_norm.weight, "
            f"found layers {sorted(layer_ids)}; the file does not match its config"
        )
    if n > target.num_layers:
        raise UserError(f"{spec}: {n} decoder layers, but the target has only {target.num_layers}")
    state = {f"medusa_head.{k}": v for k, v in groups["medusa_head"].items()}
    state |= {f"layers.{k}": v for k, v in groups["medusa_decoder_layers"].items()}
    state["norm.weight"] = groups["medusa_rms_norm"]["weight"]
    checkpoint = Checkpoint(spec, directory, config, state, [found.name])
    return checkpoint, DecoderLayout(medusa_layout(groups["medusa_head"], spec), n)
