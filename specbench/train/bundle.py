"""Ship a trained drafter as package data (specbench/bundled/NAME).

Medusa heads trained with `--tie-lm-head` are bundled as they are written (the
published layout: config.json + medusa_lm_head.pt), in bf16 as the published
heads are: four ResBlocks of 576×576 are 2.7 MB. Hydra++ heads trained with
`--tie-lm-head` carry their grounded first blocks ((h+2)H→H, twice) and the
prefix decoder layer: 9.5M parameters for 3 heads × 1 layer on SmolLM2, 19 MB in
bf16, so they are bundled with `--int8` (matrices int8 + one scale per row,
rebuilt in bf16 on load; the keys stay the published ones): 9.6 MB.

A `draft-model` checkpoint from `specbench train` keeps the target's embedding
table (and LM head) frozen, so the bundle stores only the trained weights, in
fp16, and names the base target whose tables complete it at load time
(`specbench.targets.loading`). For SmolLM2-135M the tied 49152×576 table is 28M
of a 1-layer draft's 32M parameters: 7 MB bundled instead of 130 MB.

An EAGLE checkpoint from `specbench train --drafter eagle|eagle3` already leaves out
the target's embedding (and EAGLE-1 its LM head); it is bundled in its published
layout (config.json + model.safetensors), in bf16 or, with `--int8`, with its
matrices int8 + per-row scales (d2t/t2d untouched), which the EAGLE loader rebuilds.

    python -m specbench.train.bundle CHECKPOINT_DIR NAME --base smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specbench.drafters.checkpoints import INT8_SCALE, INT8_STORAGE
from specbench.errors import UserError
from specbench.files import CHECKPOINT_FIX, check_unit, reading_weights
from specbench.targets.loading import BUNDLE_INFO, BUNDLE_WEIGHTS, model_location

PACKAGE = Path(__file__).resolve().parent.parent / "bundled"


def quantize_int8(state: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to save, metadata): 2-D float matrices as int8 + per-row scales, the rest cast to `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if value.ndim == 2 and value.is_floating_point():
            weight = value.float()
            scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
            out[key] = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[key + INT8_SCALE] = scale.to(torch.float32).contiguous()
        else:  # vectors in `dtype`; integer and bool tensors (EAGLE-3's d2t, t2d) as they are
            out[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return out, {"format": "pt", INT8_STORAGE: str(dtype).removeprefix("torch.")}


def bundle_draft(checkpoint: Path, name: str, base_target: str, dest: Path = PACKAGE) -> Path:
    """Write dest/NAME: config.json, weights.safetensors (fp16, no vocabulary tables), bundle.json."""
    check_unit(checkpoint, "checkpoint directory", CHECKPOINT_FIX)  # never bundle a half-written or mixed one
    with reading_weights(checkpoint / "model.safetensors", "draft checkpoint"):
        state = load_file(checkpoint / "model.safetensors")
    base_file = Path(model_location(base_target)) / "model.safetensors"
    from_base = []
    with safe_open(base_file, "pt") as base:
        for key in list(state):
            if key in base.keys() and ("embed_tokens" in key or key.startswith("lm_head")):
                if not torch.equal(state[key].float(), base.get_tensor(key).float()):
                    raise UserError(f"'{checkpoint}': {key} differs from {base_target}'s; it cannot be re-tied at load")
                from_base.append(key)
                del state[key]
    out = dest / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, out / BUNDLE_WEIGHTS, metadata={"format": "pt"})
    shutil.copy(checkpoint / "config.json", out / "config.json")
    train = train_log(checkpoint)
    info = {
        "kind": "draft-model",
        "base_target": base_target,
        "from_base": sorted(from_base),
        "dtype": "float16",
        "trained": trained_summary(train),
    }
    (out / BUNDLE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


HEAD_FILES = ("medusa_lm_head.pt", "hydra_lm_head.pt")


def bundle_heads(checkpoint: Path, name: str, dest: Path = PACKAGE, dtype: torch.dtype = torch.bfloat16, int8: bool = False) -> Path:
    """Copy a head checkpoint in its published layout, tensors cast to `dtype` (bf16, as
    published); with `int8`, its matrices stored as int8 + per-row scales in
    `*_lm_head.safetensors` (see quantize_int8), rebuilt in `dtype` on load."""
    check_unit(checkpoint, "checkpoint directory", CHECKPOINT_FIX)  # never bundle a half-written or mixed one
    weights = next((checkpoint / f for f in HEAD_FILES if (checkpoint / f).is_file()), None)
    if weights is None:
        raise UserError(f"'{checkpoint}' holds no {' or '.join(HEAD_FILES)}")
    with reading_weights(weights, "head checkpoint"):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    if int8 and any(isinstance(v, dict) for v in state.values()):
        raise UserError(f"'{weights}' nests modules (hydra-decoder layout); --int8 takes flat state dicts")
    out = dest / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if int8:
        tensors, metadata = quantize_int8(state, dtype)
        save_file(tensors, out / weights.with_suffix(".safetensors").name, metadata=metadata)
    else:
        cast = lambda obj: {k: cast(v) for k, v in obj.items()} if isinstance(obj, dict) else obj.to(dtype).contiguous()  # noqa: E731
        torch.save(cast(state), out / weights.name)
    shutil.copy(checkpoint / "config.json", out / "config.json")
    train = train_log(checkpoint)
    stored = "int8 per-row, rebuilt as " if int8 else ""
    info = {"kind": train.get("kind"), "dtype": stored + str(dtype).removeprefix("torch."),
            "trained": trained_summary(train)}
    (out / BUNDLE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


def train_log(checkpoint: Path) -> dict:
    """The log `specbench train` writes beside a checkpoint ({} for a checkpoint made elsewhere)."""
    log = checkpoint / "specbench_train.json"
    return json.loads(log.read_text()) if log.exists() else {}


def trained_summary(train: dict) -> dict:
    """What bundle.json keeps of the training log."""
    return {"config": train.get("config"), "final_eval": (train.get("evals") or [None])[-1], "seconds": train.get("seconds")}


def is_eagle_checkpoint(checkpoint: Path) -> bool:
    return train_log(checkpoint).get("kind") in ("eagle", "eagle3")


def bundle_eagle(checkpoint: Path, name: str, dest: Path = PACKAGE, dtype: torch.dtype = torch.bfloat16, int8: bool = False) -> Path:
    """Copy an EAGLE checkpoint in its layout (config.json + model.safetensors), float tensors
    in `dtype`, or with `int8` its matrices as int8 + per-row scales (rebuilt in `dtype` on load)."""
    from specbench.drafters.checkpoints import read_tensors

    weights = checkpoint / "model.safetensors"
    state = read_tensors(weights)
    if "embed_tokens.weight" in state:
        raise UserError(f"'{weights}' carries its own embedding table; a bundle takes the target's (train writes none)")
    out = dest / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if int8:
        tensors, metadata = quantize_int8(state, dtype)
    else:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        metadata = {"format": "pt"}
    save_file(tensors, out / "model.safetensors", metadata=metadata)
    config = json.loads((checkpoint / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    train = train_log(checkpoint)
    info = {"kind": train.get("kind"), "dtype": ("int8 per-row, rebuilt as " if int8 else "") + str(dtype).removeprefix("torch."),
            "trained": trained_summary(train)}
    (out / BUNDLE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("name")
    parser.add_argument("--base", default="smollm2-135m", help="the target whose vocabulary tables complete the draft")
    parser.add_argument("--int8", action="store_true", help="heads and EAGLE drafts: store matrices as int8 with per-row scales")
    args = parser.parse_args()
    if is_eagle_checkpoint(args.checkpoint):
        print(bundle_eagle(args.checkpoint, args.name, int8=args.int8))
    elif (args.checkpoint / "model.safetensors").exists():
        print(bundle_draft(args.checkpoint, args.name, args.base))
    else:
        print(bundle_heads(args.checkpoint, args.name, int8=args.int8))


if __name__ == "__main__":
    main()
