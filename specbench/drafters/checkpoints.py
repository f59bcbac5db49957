"""Finding and reading drafter checkpoint files: a local file or directory, or a hub id
(only the files a drafter needs are downloaded), read into tensors without running
any code a file carries.

- safetensors: read directly; specbench's own int8-per-row storage (bundled heads)
  is rebuilt in the dtype its metadata names.
- torch pickles (`.pt`, `.bin`): torch's weights-only loader; files that pickle
  whole modules (decoder-layer Hydra) go through `unpickle.py`, which rebuilds
  tensors and inert stand-ins only, when the caller allows it.
The published layouts themselves are parsed where each drafter lives
(`heads/layouts.py`); formats and traps: docs/heads.md.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specbench.drafters.unpickle import ModulePickle, flatten
from specbench.errors import UserError
from specbench.files import CHECKPOINT_FIX, check_unit, read_text, reading_weights


# Rotary tables some published files carry inside their modules (EAGLE's `inv_freq`; decoder-layer
# Hydra's pickled 4.31 layers also keep `cos_cached`/`sin_cached`): derived from the config, never
# weights, so loaders recompute them from the target and skip these keys, and only these.
ROTARY_TABLE = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


def stored_dtype(state: dict[str, torch.Tensor]) -> str:
    """The dtype most of a checkpoint's floating tensors are stored in ("none" without any)."""
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    return str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else "none"


@dataclass
class Checkpoint:
    name: str  # what the user gave (hub id, directory or file)
    directory: Path
    config: dict
    state: dict[str, torch.Tensor]  # tensors keyed as in the published file
    files: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"heads": self.name, "head_files": self.files, "base_model": self.config.get("base_model_name_or_path")}


# --- finding the files --------------------------------------------------------

def locate(spec: str, file_names: tuple[str, ...], what: str = "heads") -> tuple[Path, Path | None]:
    """(directory, preferred weights file or None) for a directory, a file or a hub id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.parent, path
    if path.is_dir():
        return path, None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"{what} '{spec}' not found: pass a local directory or file, or a hub id (owner/name)")
    return download(spec, file_names, what), None


def locate_first(spec: str, candidates: tuple[str, ...], what: str) -> tuple[Path, Path]:
    """(directory, weights file) for a directory, a file or a hub id, taking the first of
    `candidates` that exists; a hub repository is listed first, so only that one file
    (and the JSON files) is downloaded, not every twin of it."""
    path = Path(spec).expanduser()
    if not path.exists() and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        wanted = candidates
        try:
            from huggingface_hub import list_repo_files

            present = set(list_repo_files(spec))
            wanted = tuple(c for c in candidates if c in present)[:1] or candidates
        except Exception:  # offline: a cached snapshot may still hold them
            pass
        directory = download(spec, wanted, what)
    else:
        directory, file = locate(spec, candidates, what)
        if file is not None:
            return directory, file
    found = next((directory / c for c in candidates if (directory / c).is_file()), None)
    if found is None:
        raise UserError(f"no {what} weights in '{spec}': expected {' or '.join(candidates)} (with config.json)")
    return directory, found


def download(repo_id: str, file_names: tuple[str, ...], what: str = "heads") -> Path:
    from huggingface_hub import snapshot_download

    from specbench.targets.loading import quiet_transformers

    quiet_transformers()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", *file_names]))
    except Exception as exc:  # offline, unknown repo, gated: one clear line either way
        raise UserError(
            f"cannot fetch {what} '{repo_id}' ({type(exc).__name__}): download them first "
            f"(`hf download {repo_id}`) or pass a local directory"
        ) from None


def read_json(file: Path, what: str = "file") -> dict:
    try:
        data = json.loads(read_text(file, what))
    except json.JSONDecodeError as exc:
        raise UserError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object")
    return data


def read_config(directory: Path) -> dict:
    """The directory's config.json ({} without one), once the directory is checked whole: a checkpoint
    `specbench train` wrote is refused when half written or mixed with files of another (files.check_unit)."""
    check_unit(directory, "checkpoint directory", CHECKPOINT_FIX)
    file = directory / "config.json"
    if not file.is_file():
        return {}
    return read_json(file, "checkpoint config")


# --- reading tensors ----------------------------------------------------------

def read_tensors(file: Path, allow_pickled_modules: bool = False) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise UserError(f"checkpoint file {file} does not exist")
    with reading_weights(file, "checkpoint"):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as handle:  # one read: the tensors and the storage metadata
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return dequantize_int8(tensors, metadata) if metadata.get(INT8_STORAGE) else tensors
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not allow_pickled_modules:
                raise
            # pickled modules (decoder-layer Hydra): rebuild stand-ins, never run their code
            data = torch.load(file, map_location="cpu", weights_only=False, pickle_module=ModulePickle)
    out: dict[str, torch.Tensor] = {}
    flatten(data, "", out)
    if not out:
        raise UserError(f"{file} holds no tensors; it is not a drafter checkpoint")
    return out


# --- int8 storage (specbench's bundled heads) ----------------------------------
# Bundled heads must fit the package's size budget, so their matrices are stored
# as int8 with one scale per output row and rebuilt in the recorded dtype on load
# (the writer is specbench/train/bundle.py): the module, keys and layout stay the
# published ones. Vectors (biases, norms) stay as they are, integer maps too.

INT8_STORAGE = "specbench_int8_rowwise"  # safetensors metadata key: the dtype to rebuild in
INT8_SCALE = ".int8_scale"


def dequantize_int8(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, metadata[INT8_STORAGE])
    out = {}
    for key, value in tensors.items():
        if key.endswith(INT8_SCALE):
            continue
        scale = tensors.get(key + INT8_SCALE)
        if scale is not None:
            out[key] = (value.float() * scale[:, None]).to(dtype)
        else:  # vectors in the stored float dtype; integer and bool tensors (EAGLE-3's d2t/t2d) as they are
            out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def read_safetensors_prefix(directory: Path, prefix: str, repo_id: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors whose names start with `prefix` from a (possibly sharded) safetensors checkpoint.

    For a hub checkpoint (`repo_id`), only the shards that hold such tensors are fetched: a
    Medusa-2 model keeps its heads beside the full base weights, which the heads do not need."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "checkpoint index").get("weight_map", {})
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(prefix)})
    else:
        shards = [p.name for p in sorted(directory.glob("*.safetensors"))]
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (directory / shard).is_file():
            if repo_id is None:
                raise UserError(f"{directory / shard} is listed in {index.name} but missing: copy the whole checkpoint")
            download(repo_id, (shard,))
        with reading_weights(directory / shard, "checkpoint shard"), safe_open(str(directory / shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key.removeprefix(prefix)] = f.get_tensor(key)
    return out, [s for s in shards]
