"""A decoder's linear layers with their weights prepacked for oneDNN: the fast engine's step on a CPU.

Why: a decode step of a small model on a CPU is a few hundred matrix-vector products, and
torch's default CPU linear re-lays each weight out for its kernel on every call. oneDNN's
linear over a weight packed once ahead of time (what inductor's `freezing` does) reads the
weights at close to the memory bandwidth: on the development machine SmolLM2-135M's 211
products of one bf16 step took 14.1 ms through `F.linear` and 7.2 ms prepacked, and verifying
2 rows no longer costs 1.7x one in fp32 (docs/engine.md has the measurements).

How: `packed_copy` returns a copy of a module tree that shares every parameter and buffer
with the original (no weight is copied; anything that reads `.weight` still sees the same
tensor) and replaces each `nn.Linear` by a `PackedLinear` holding the packed weight besides.
The original modules are untouched, so an eager target over the same model stays eager.
Sibling projections that read one input — attention's q/k/v, the MLP's gate/up, by
transformers' names — are computed as one product of their stacked weights: fewer calls, one
pass over the input. Each member checks that it is called with the very tensor the product
was computed for, so a model that calls them otherwise is still computed right, one by one.

Numerics: oneDNN sums in another order than torch's default kernels, so logits differ from
the eager engine's by rounding; a run's plain baseline uses the same packed steps as its
drafter, and greedy mismatches are classified by the divergence diagnosis.
"""

from __future__ import annotations

import torch
from torch import nn

from specbench.engine import bf16_kernel

# transformers' names for sibling projections of one input (Llama, Mistral, Qwen, Gemma, ...)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PACKABLE = (torch.float32, torch.bfloat16)
# whose kernels a packed step runs: "auto" = specbench's bf16 kernels (engine/bf16_kernel.py: the
# products of the bf16 weights they take, the lean layers' RMSNorm) where they run here, oneDNN's
# products and torch's operations for the rest; "onednn" = oneDNN and torch for all
KERNELS = ("auto", "onednn")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN is built in and takes this dtype on this device (a CPU)."""
    return (device.type == "cpu" and dtype in PACKABLE and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def kernels_in_use(dtype: torch.dtype, kernels: str = "auto") -> str:
    """Which kernels a packed step in `dtype` runs, in words (run.json, the engine line)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if dtype != torch.bfloat16:
        return "oneDNN"
    if kernels == "onednn":
        return "oneDNN (asked for)"
    why = bf16_kernel.unavailable()
    if why:
        return f"oneDNN ({why})"
    return f"specbench's bf16 kernels (products by {bf16_kernel.products()}), oneDNN for weights they do not take"


def _pack(weight: torch.Tensor, kernels: str = "auto") -> torch.Tensor | bf16_kernel.PackedBf16:
    if kernels == "auto" and bf16_kernel.fits(weight) and bf16_kernel.unavailable() is None:
        return bf16_kernel.PackedBf16(weight)
    # the batch-size hint (1) picks the layout for decode steps; any number of rows works
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _linear(x: torch.Tensor, packed: torch.Tensor | bf16_kernel.PackedBf16, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(packed, bf16_kernel.PackedBf16):
        return bf16_kernel.linear(x, packed, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _linear_add(x: torch.Tensor, packed: torch.Tensor | bf16_kernel.PackedBf16, bias: torch.Tensor | None,
                residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ W.T (+ bias) in one call: the sum is the product's post-op, rounded once."""
    if isinstance(packed, bf16_kernel.PackedBf16):
        return bf16_kernel.linear(x, packed, bias, residual).reshape(residual.shape)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise.binary(rows, residual.reshape(rows.shape[0], -1), packed, bias, "add")
    return out.reshape(residual.shape)


class PackedLinear(nn.Module):
    """An nn.Linear's product over its prepacked weight; `weight` and `bias` are the original's.
    Also made for a module that computes F.linear(x, self.weight, self.bias) and says so with a
    class attribute `packs_as_linear = True` (a drafter's vocabulary-trimmed LM head)."""

    def __init__(self, linear: nn.Module, kernels: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)


class _Siblings:
    """The stacked product of sibling projections, kept for the input it was computed for
    until every sibling has taken its part."""

    def __init__(self, linears: list[nn.Linear], kernels: str = "auto") -> None:
        self.packed = _pack(torch.cat([linear.weight for linear in linears]), kernels)
        self.bias = torch.cat([linear.bias for linear in linears]).detach() if linears[0].bias is not None else None
        self.sizes = [linear.out_features for linear in linears]
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.waiting: set[int] = set()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.input is not x or index not in self.waiting:
            self.parts = _linear(x, self.packed, self.bias).split(self.sizes, dim=-1)
            self.input, self.waiting = x, set(range(len(self.sizes)))
        self.waiting.discard(index)
        out = self.parts[index]
        if not self.waiting:  # all taken: hold no tensor past this layer
            self.input, self.parts = None, ()
        return out


class SiblingLinear(nn.Module):
    """One of several projections of one input, computed together (`_Siblings`); called
    with another input, it computes the stacked product for that input and takes its part."""

    def __init__(self, linear: nn.Linear, siblings: _Siblings, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.siblings, self.index = siblings, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.siblings.part(self.index, x)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing the tensors of `module` but with its own dicts (children,
    hooks), so that changing the copy's children or hooks leaves the original as it was."""
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = {key: (value.copy() if isinstance(value, (dict, set)) else value) for key, value in module.__dict__.items()}
    return new


def packed_copy(module: nn.Module, group_siblings: bool = True, kernels: str = "auto", memo: dict | None = None) -> nn.Module:
    """`module` with every nn.Linear (itself included) replaced by a PackedLinear, sharing all
    parameters and buffers; the original is left as it was. A module found in several places (a
    head's shared ResBlock, repeated in its Sequential) has one copy in all of them. `kernels`:
    see KERNELS."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    if type(module) is nn.Linear or getattr(type(module), "packs_as_linear", False):  # exactly: subclasses (quantized, sharded) compute otherwise
        memo[id(module)] = PackedLinear(module, kernels)
        return memo[id(module)]
    new = memo[id(module)] = _shallow(module)
    children = {name: child for name, child in module._modules.items()}  # every slot: named_children() lists a repeated module once
    if group_siblings:
        for names in SIBLINGS:
            linears = [children.get(name) for name in names]
            if all(type(linear) is nn.Linear for linear in linears) and len({linear.in_features for linear in linears}) == 1 \
                    and len({linear.bias is None for linear in linears}) == 1:
                siblings = _Siblings(linears, kernels)
                for index, name in enumerate(names):
                    new._modules[name] = SiblingLinear(children.pop(name), siblings, index)
    for name, child in children.items():
        if child is not None:
            new._modules[name] = packed_copy(child, group_siblings, kernels, memo)
    return new
