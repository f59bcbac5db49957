"""Reading torch pickles that hold whole modules (decoder-layer Hydra's `medusa_lm_head.pt`)
without running their code: an unpickler that rebuilds tensors and inert stand-ins
for an allow-list of module classes and refuses every other global.
"""

from __future__ import annotations

import pickle

import torch


class _PickledObject:
    """Stands in for an allow-listed class (a torch/transformers/reference module
    or config) inside a pickle: keeps its state, runs none of its code."""

    def __init__(self, *args, **kwargs) -> None:
        self.state: dict = {}

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}


_STUB_PREFIXES = ("medusa.", "hydra.", "transformers.", "torch.nn.modules.", "__main__")
_REAL_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),  # protocol-2 pickles use the Python 2 names
    ("__builtin__", "frozenset"),
}


class _ModuleUnpickler(pickle.Unpickler):
    stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _REAL_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_STUB_PREFIXES) or module in ("torch.nn", "copyreg"):
            if (module, name) == ("copyreg", "_reconstructor"):
                return lambda cls, base, state: cls.__new__(cls)
            key = (module, name)
            if key not in self.stubs:
                self.stubs[key] = type(name, (_PickledObject,), {"__module__": module})
            return self.stubs[key]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


class ModulePickle:
    """The `pickle_module` handed to torch.load: only its Unpickler is used."""

    Unpickler = _ModuleUnpickler
    __name__ = "specbench_module_pickle"

    @staticmethod
    def load(*args, **kwargs):
        raise pickle.UnpicklingError("legacy (pre-zip) torch files are not supported")


def flatten(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Tensors of a pickled module tree (or nested dicts) under dotted names, like state_dict()."""
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
    elif isinstance(obj, dict):
        for key, value in obj.items():
            flatten(value, f"{prefix}{key}.", out)
    elif isinstance(obj, _PickledObject):
        for slot in ("_parameters", "_buffers", "_modules"):
            for key, value in (obj.state.get(slot) or {}).items():
                if value is not None:
                    flatten(value, f"{prefix}{key}.", out)


