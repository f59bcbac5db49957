"""The CPU fast engine's bf16 kernels where the CPU has AVX512_BF16: products of few rows,
RMSNorm, attention, SiLU·up, and a whole Llama layer in one call (bf16_kernel.c).

Why: a bf16 decode step of a small model reads its weights once per step, so a product of 1-16
rows should cost what reading its weight costs. oneDNN's prepacked product does not get there
on the development machine (an AMD EPYC with AVX512_BF16, no AMX): SmolLM2-135M's 211 products
of one step read at 21 GB/s for 1 row, where the memory reads at 33-58 GB/s, and torch's small
operations around them cost as much again. These kernels (VDPBF16PS over weights packed once in
its operand layout, on 2 MiB pages) read the weights at the bandwidth for 1-4 rows, and a layer
per call took a plain SmolLM2 step from 24 to 7 ms (docs/engine.md). No library we can use does
that: inductor's own micro-kernel does it only inside a whole compiled step.

How: the C source is compiled once per process with the system's C compiler (about half a
second) into a temporary directory and loaded with ctypes after torch, so its OpenMP calls run
on torch's own thread pool. Where anything is missing — the CPU's AVX512_BF16, a compiler that
knows it, OpenMP — `unavailable()` says what, and the engine keeps oneDNN's products.

Where the CPU has AMX (and Linux grants the tile state) the products run on AMX tiles instead, for
every row count: 16 rows then cost about what one costs (docs/engine.md); `products()` says which.

Numerics: each output is summed over k in one fixed order whatever the number of rows, in fp32,
with the bias and a residual added before the one rounding to bf16 (as oneDNN's post-ops);
attention sums in position order. So a verified row's logits are plain decoding's, bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("bf16_kernel.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
AMX_FLAGS = ("-mamx-tile", "-mamx-bf16", "-DSPECBENCH_AMX")
BLOCK = 16  # output columns per vector: n must be a multiple


HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # packed weights are placed in chunks of this many bytes, on huge pages
MADV_HUGEPAGE = 14


class PackedBf16:
    """A [out_features, in_features] bf16 weight in the kernel's layout (bf16_kernel.c)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.data = _ARENA.take(weight.numel())
        _library().pack_weight(weight.detach().contiguous().data_ptr(), self.data.data_ptr(), *weight.shape)


class _Arena:
    """Packed weights side by side in chunks backed by 2 MiB pages where the kernel lets a
    process ask for them (transparent huge pages in `madvise` mode): a 4 KiB page ends the
    hardware prefetcher's stream and costs a TLB miss every 64 vectors. Measured (SmolLM2-135M's
    211 products, 2 threads): 1 row 6.83 -> 5.21 ms, 16 rows 14.61 -> 12.81 ms per step.
    A chunk lives as long as any weight placed in it."""

    def __init__(self) -> None:
        self.chunk: torch.Tensor | None = None
        self.used = 0

    def take(self, numel: int) -> torch.Tensor:
        nbytes = -(-numel * 2 // 64) * 64  # each weight on its own cache lines
        if self.chunk is None or self.used + nbytes > self.chunk.numel():
            size = max(CHUNK, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
            raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % HUGE_PAGE
            _advise_huge_pages(raw.data_ptr() + start, size)  # before the first write, which places the pages
            self.chunk, self.used = raw[start : start + size], 0
        out = self.chunk[self.used : self.used + nbytes].view(torch.bfloat16)[:numel]
        self.used += nbytes
        return out


def _advise_huge_pages(address: int, size: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), MADV_HUGEPAGE)  # a hint: refused, nothing changes
    except (OSError, AttributeError):
        pass


_ARENA = _Arena()


def fits(weight: torch.Tensor) -> bool:
    """The kernel takes this weight: bf16 on a CPU, rows a multiple of 16, an even number of columns."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[0] % BLOCK == 0 and weight.shape[1] % 2 == 0)


def linear(x: torch.Tensor, packed: PackedBf16, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) (+ residual) over the last dimension of x (bf16), rounded once."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"the bf16 kernel takes bf16 inputs, not {x.dtype}")
    rows = x.reshape(-1, packed.in_features).contiguous()
    out = torch.empty(rows.shape[0], packed.out_features, dtype=torch.bfloat16)
    if residual is not None:
        residual = residual.reshape(out.shape).to(torch.bfloat16).contiguous()
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    _library().linear(rows.data_ptr(), rows.shape[0], packed.in_features, packed.data.data_ptr(), packed.out_features,
                      out.data_ptr(), _address(bias), _address(residual))
    return out.reshape(*x.shape[:-1], packed.out_features)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of a bf16 x over its last dimension (a multiple of 16), scaled by `weight`."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(rows)
    _library().rms_norm(rows.data_ptr(), rows.shape[0], rows.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a bf16 [..., 2 * width] = [gate | up] (width a multiple of 16), as
    transformers computes it in bf16 (each of the two results rounded)."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width).contiguous()
    out = torch.empty(rows.shape[0], width, dtype=torch.bfloat16)
    _library().silu_mul(rows.data_ptr(), rows.shape[0], width, out.data_ptr())
    return out.view(*gate_up.shape[:-1], width)


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """`attend` takes these: bf16, head_dim a multiple of 16 up to 256, each head's positions dense."""
    dim = q.shape[-1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and dim % 16 == 0 and dim <= 256 and q.stride(-1) == 1
            and all(t.stride(-1) == 1 and t.stride(-2) == dim and t.stride(0) == v.stride(0) and t.stride(1) == v.stride(1) for t in (k, v)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention in fp32 (bf16_kernel.c `attend`): q [batch, rows, heads, dim], k and v [batch,
    kv_heads, span, dim] (`attends`), mask None or additive [batch or 1, 1, rows, span];
    returns [batch, rows, heads * dim] bf16."""
    batch, rows, heads, dim = q.shape
    kv_heads, span = k.shape[1], k.shape[2]
    out = torch.empty(batch, rows, heads * dim, dtype=torch.bfloat16)
    mask = _mask_rows(mask)
    if mask is not None:
        mask_batch = mask.stride(0) if mask.shape[0] > 1 else 0
    _library().attend(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                      _address(mask), mask_batch if mask is not None else 0,
                      mask.stride(2) if mask is not None else 0, batch, heads, kv_heads, rows, span, dim, scale, out.data_ptr())
    return out


def layer_step(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               slots: torch.Tensor, span: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One Llama decoder layer (engine/lean_layer.py LeanLayer `layer`, its weights packed for
    these kernels) over one sequence's rows `hidden` [1, rows, H]: bf16_kernel.c `layer_step`.
    keys, values: the layer's cache [kv_heads, capacity, head_dim]; the rows' keys and values go
    to `slots`, attention reads the first `span` positions under the additive `mask` [.., rows, span]."""
    rows, width, hidden, out, cos, sin, slots, mask = _sequence_rows(hidden, cos, sin, slots, mask)
    span = _read_span(span, slots)
    _library().layer_step(
        hidden.data_ptr(), rows, width, out.data_ptr(), layer.norm1.data_ptr(), layer.eps1, layer.norm2.data_ptr(), layer.eps2,
        layer.qkv.data.data_ptr(), _address(layer.qkv_bias), layer.o.data.data_ptr(), _address(layer.o_bias),
        layer.gate_up.data.data_ptr(), _address(layer.gate_up_bias), layer.down.data.data_ptr(), _address(layer.down_bias),
        layer.heads, layer.kv_heads, layer.head_dim, layer.intermediate, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
        values.data_ptr(), keys.shape[1], slots.data_ptr(), span, _address(mask), mask.stride(-2) if mask is not None else 0,
        layer.scaling)
    return out.view(1, rows, width)


def dot_peak_flops(iterations: int = 50_000_000) -> float:
    """The most FLOP/s the instruction of this process's products (`products()`) reaches on
    torch's threads, for a verify's compute floor: VDPBF16PS (bf16_kernel.c `dot_peak`; 50M rounds,
    about 0.2 s on 2 Zen 4 cores) or TDPBF16PS (`amx_peak`, a 64th of the rounds: each is 64 times
    the products)."""
    if products() == "AMX":
        return _library().amx_peak(max(iterations // 64, 1))
    return _library().dot_peak(iterations)


class _LayerWeights(ctypes.Structure):
    """bf16_kernel.c `layer_weights`."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("norm1", "norm2", "qkv_w", "qkv_bias", "o_w", "o_bias", "gate_up_w",
                                                     "gate_up_bias", "down_w", "down_bias")] + [("eps1", ctypes.c_float),
                                                                                                 ("eps2", ctypes.c_float)]


class StackWeights:
    """The weights of lean layers (engine/lean_layer.py, each `fused`) of one shape, as `stack_step`
    reads them: their addresses gathered once (the layers hold the tensors, which never move)."""

    SHAPE = ("heads", "kv_heads", "head_dim", "intermediate", "scaling")

    def __init__(self, layers) -> None:
        self.layers = list(layers)  # held: the addresses below point into them
        first = self.layers[0]
        self.shape = tuple(getattr(first, name) for name in self.SHAPE)
        self.array = (_LayerWeights * len(self.layers))(*(
            _LayerWeights(layer.norm1.data_ptr(), layer.norm2.data_ptr(), layer.qkv.data.data_ptr(), _address(layer.qkv_bias),
                          layer.o.data.data_ptr(), _address(layer.o_bias), layer.gate_up.data.data_ptr(),
                          _address(layer.gate_up_bias), layer.down.data.data_ptr(), _address(layer.down_bias), layer.eps1, layer.eps2)
            for layer in self.layers))

    @classmethod
    def takes(cls, layers) -> bool:
        layers = list(layers)
        return bool(layers) and len({tuple(getattr(layer, name) for name in cls.SHAPE) for layer in layers}) == 1 \
            and len({layer.norm1.numel() for layer in layers}) == 1


class _ResBlock(ctypes.Structure):
    """bf16_kernel.c `res_block`."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("lin_w", "lin_bias", "res_w", "res_bias")] + [("in_width", ctypes.c_int64)]


class HeadWeights:
    """A draft head as `head_top` reads it: ResBlocks, each (linear, residual or None for the
    identity) as (PackedBf16, bias) pairs, then an LM head (PackedBf16, bias); the addresses
    gathered once (the tensors are held, and never move)."""

    def __init__(self, blocks: list[tuple[tuple, tuple | None]], lm_head: tuple) -> None:
        def bf16(bias):  # as `linear` takes a bias
            return bias.detach().to(torch.bfloat16).contiguous() if bias is not None else None

        blocks = [((lin, bf16(lin_bias)), (res[0], bf16(res[1])) if res else None) for (lin, lin_bias), res in blocks]
        self.lm_packed, self.lm_bias = lm_head[0], bf16(lm_head[1])
        self.held = blocks  # the addresses below point into them
        (first, _), _ = blocks[0]
        self.in_features, self.hidden = first.in_features, first.out_features
        self.vocab = self.lm_packed.out_features
        self.array = (_ResBlock * len(blocks))(*(
            _ResBlock(lin.data.data_ptr(), _address(lin_bias), res[0].data.data_ptr() if res else None,
                      _address(res[1]) if res else None, lin.in_features)
            for (lin, lin_bias), res in blocks))


def head_top(weights: HeadWeights, features: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` most likely tokens of each row of bf16 `features` [N, in] under the head
    (bf16_kernel.c `head_top`): ids [N, top] (long, by descending logit) and their softmax
    probabilities [N, top] (fp32)."""
    if not 0 < top <= weights.vocab:
        raise ValueError(f"top must be 1..{weights.vocab} (the head's vocabulary), not {top}")  # as torch.topk refuses
    rows = features.contiguous()
    ids = torch.empty(rows.shape[0], top, dtype=torch.long)
    probs = torch.empty(rows.shape[0], top, dtype=torch.float32)
    _library().head_top(rows.data_ptr(), rows.shape[0], weights.array, len(weights.array), weights.hidden,
                        weights.lm_packed.data.data_ptr(), _address(weights.lm_bias), weights.vocab, top, ids.data_ptr(),
                        probs.data_ptr())
    return ids, probs


def stack_step(weights: StackWeights, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
               slots: torch.Tensor, span: int, mask: torch.Tensor | None, norm=None) -> torch.Tensor:
    """Every layer of `weights` over one sequence's rows `hidden` [1, rows, H] (bf16_kernel.c `stack_step`):
    what `layer_step` computes layer after layer. kv: the stack's cache [layers, 2, kv_heads, capacity,
    head_dim] (contiguous, bf16); the rows' keys and values go to `slots`, attention reads the first
    `span` positions under the additive `mask` [.., rows, span] (None: each row the positions up
    to its own slot, as a causal chunk after the cache; one row: every position). `norm`: a final
    RMSNorm (weight, eps: engine/lean_layer.py LeanNorm) applied to the output in the same call."""
    rows, width, hidden, out, cos, sin, slots, mask = _sequence_rows(hidden, cos, sin, slots, mask)
    span = _read_span(span, slots)
    heads, kv_heads, dim, intermediate, scaling = weights.shape
    _library().stack_step(weights.array, len(weights.layers), hidden.data_ptr(), rows, width, out.data_ptr(), heads, kv_heads, dim,
                          intermediate, cos.data_ptr(), sin.data_ptr(), kv.data_ptr(), kv.shape[3], slots.data_ptr(), span,
                          _address(mask), mask.stride(-2) if mask is not None else 0, scaling,
                          norm.weight.data_ptr() if norm is not None else None, norm.eps if norm is not None else 0.0)
    return out.view(1, rows, width)


def _sequence_rows(hidden, cos, sin, slots, mask):
    """The inputs of layer_step and stack_step as the kernels read them: one sequence's rows [rows,
    H] dense, its output buffer, cos/sin [rows, head_dim], the slots and the mask (`_mask_rows`)."""
    rows, width = hidden.shape[1], hidden.shape[2]
    hidden = hidden.reshape(rows, width).contiguous()
    cos, sin = cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()
    return rows, width, hidden, torch.empty_like(hidden), cos, sin, slots.contiguous(), _mask_rows(mask)


def _read_span(span: int, slots: torch.Tensor) -> int:
    """The cache positions attention needs to read: up to the last slot this step writes. Every
    step masks the positions after it (stale keys of earlier verifies, or nothing), and a masked
    position adds an exact zero after the others, so the bits are those of the whole span; a
    decoder's span is rounded up for its captured steps' sake (engine/buckets.py `span_for`),
    and reading it all cost a 16-row SmolLM2 verify at 144 positions of 255 about 1 ms."""
    return min(span, int(slots.max()) + 1)


def _address(tensor: torch.Tensor | None) -> int | None:
    """A tensor's data address for the kernels, NULL for none (an absent bias or mask)."""
    return tensor.data_ptr() if tensor is not None else None


def _mask_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An additive mask as the kernels read it: bf16, each row's positions dense."""
    if mask is None:
        return None
    mask = mask.to(torch.bfloat16)
    return mask if mask.stride(-1) == 1 else mask.contiguous()


@functools.cache
def unavailable() -> str | None:
    """None where the kernel runs here, else why not (in words, for run.json and the engine line)."""
    if sys.platform != "linux":
        return "the bf16 kernel is built on Linux only"
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "the CPU has no AVX512_BF16"
    try:
        _library()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the bf16 kernel did not build: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
    return None


@functools.cache
def _library() -> ctypes.CDLL:
    library = build(SOURCE)
    library.amx_enable(1)  # products on AMX where the build and the CPU have it (and Linux grants it)
    return library


def products() -> str:
    """What computes the kernel's products in this process: 'AMX' or 'VDPBF16PS'."""
    return "AMX" if _library().amx_enable(-1) else "VDPBF16PS"


def _cpu_has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def build(source: Path) -> ctypes.CDLL:
    """The kernels of a C source (this module's SOURCE; scripts/bench_products.py builds another
    revision's beside it), compiled and loaded, their signatures declared."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on the PATH")
    # the built file is removed as soon as it is loaded (the mapping outlives the name), so no
    # process leaves it behind however it ends, killed included
    directory = Path(tempfile.mkdtemp(prefix="specbench-bf16-"))
    try:
        target = directory / "bf16_kernel.so"
        def compile_with(flags):
            return subprocess.run([compiler, *flags, str(source), "-o", str(target), "-lm"], check=False, capture_output=True,
                                  text=True, timeout=120)

        amx = _cpu_has_amx()
        done = compile_with(FLAGS + AMX_FLAGS if amx else FLAGS)
        if done.returncode != 0 and amx:  # a compiler that does not know AMX: the kernels without it
            done = compile_with(FLAGS)
        if done.returncode != 0:
            raise OSError(done.stderr or f"{compiler} exited with {done.returncode}")
        library = ctypes.CDLL(str(target))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.pack_weight.argtypes = [pointer, pointer, size, size]
    library.pack_weight.restype = None
    library.linear.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer]
    library.linear.restype = None
    library.rms_norm.argtypes = [pointer, size, size, pointer, ctypes.c_float, pointer]
    library.rms_norm.restype = None
    library.attend.argtypes = [pointer, size, size, size, pointer, pointer, size, size, pointer, size, size, size, size, size, size,
                               size, size, ctypes.c_float, pointer]
    library.attend.restype = None
    library.silu_mul.argtypes = [pointer, size, size, pointer]
    library.silu_mul.restype = None
    library.layer_step.argtypes = [pointer, size, size, pointer, pointer, ctypes.c_float, pointer, ctypes.c_float,
                                   pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                   size, size, size, size, pointer, pointer, pointer, pointer, size,
                                   pointer, size, pointer, size, ctypes.c_float]
    library.layer_step.restype = None
    library.stack_step.argtypes = [pointer, size, pointer, size, size, pointer, size, size, size, size, pointer, pointer,
                                   pointer, size, pointer, size, pointer, size, ctypes.c_float, pointer, ctypes.c_float]
    library.stack_step.restype = None
    library.head_top.argtypes = [pointer, size, pointer, size, size, pointer, pointer, size, size, pointer, pointer]
    library.head_top.restype = None
    library.dot_peak.argtypes = [size]
    library.dot_peak.restype = ctypes.c_double
    if hasattr(library, "amx_enable"):  # a revision from before AMX (scripts/bench_products.py --against) has neither
        library.amx_enable.argtypes = [ctypes.c_int]
        library.amx_enable.restype = ctypes.c_int
        library.amx_peak.argtypes = [size]
        library.amx_peak.restype = ctypes.c_double
    return library
