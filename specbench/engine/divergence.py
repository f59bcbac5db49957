"""Where two greedy decodes of one target differ: a near-tie rounding can flip, or a bug?

Greedy speculative decoding emits plain greedy decoding's tokens in exact
arithmetic. In floating point the two paths compute the same logits with
different shapes (a root + tree forward against one token at a time, a
compacted KV cache against an appended one), so the kernels sum in different
orders and round differently. Where the target's two best tokens are closer
than that rounding, the argmax can go either way, and from that token on the
outputs differ for no fault of the drafter or the engine.

The rule, applied at the first position where the outputs differ, to the
logits rows that chose the token there on each path (`loop.Top2`: each row's
best TOP_K tokens and logits). Plain decoding chose a, the speculative path b.
Call each path's **pair margin** its logit of its own token minus its logit of
the other path's token: m_plain = l_plain(a) − l_plain(b), m_spec = l_spec(b) −
l_spec(a) (both ≥ 0 under greedy). It is a **near-tie** when both hold:

1. each path's token is among the other path's best TOP_K (so its logit there
   is known): the two paths ranked the same tokens near the top. With two tied
   tokens this is "swapped" (each chose the other's runner-up); with three or
   more near-equal tokens the other path's token may be third or further down;
2. m_plain + m_spec ≤ tolerance = TIE_FACTOR · eps · s, where s is the larger
   max |logit| of the two rows and eps the rounding unit of the computation:
   eps(storage) + √n · eps(accumulation). Storage is the coarser of the
   target's dtype and fp32 (the loop compares fp32 logits; TF32 where CUDA
   runs fp32 matmuls in it); accumulation is fp32 (half-precision matmuls
   accumulate in fp32), or the dtype itself when it is wider; n = hidden size.

Anything else is a **divergence**: a difference rounding does not explain.

Why the sum of margins: let d = l_a − l_b be the exact difference of the two
tokens' logits, and e_plain, e_spec each path's error on it. Plain chose a
(d + e_plain = m_plain) and the speculative path chose b (d + e_spec = −m_spec),
so m_plain + m_spec = e_plain − e_spec: exactly how far the two paths disagree
about l_a − l_b, whatever d is. That disagreement is what rounding must account for.

Why this eps: each logit is stored with relative error up to eps/2, so the last
rounding alone moves the pair difference of two paths by up to 2·eps·s. Errors
from upstream add to it: in half precision they are of the same order (every
layer rounds its activations to the dtype); in fp32 they are dominated by the
summation order of length-n dot products, which grows like √n · eps(fp32).

Why TIE_FACTOR = 16: measured on CPU with scripts/rounding_disagreement.py
(12–16-token chains verified in one forward against one-token steps at the same
positions, 34–39 positions each, SmolLM2-135M and random Llamas of 512 × 8,
1024 × 24 and 2048 × 8), the two paths disagreed on the top pair's difference
by at most 1.7 eps(dtype)·s in fp16 and bf16, and 20 eps(fp32)·s
(0.45 √n eps(fp32)·s) in fp32: at most 10 % of the tolerance. 16 leaves an
order of magnitude for other kernels (GPU GEMM tilings, fused attention). A bug
(a wrong KV row, mask or position) moves logits by O(1) logit units: ~10^5 eps·s
and more in fp32, tens to hundreds in fp16, only a few in bf16. For a 4096-wide
model the tolerance is ~1.2e-4·s in fp32, ~1.6e-2·s in fp16 and ~1.3e-1·s in
bf16: fp32's is ~130× smaller than fp16's, and bf16's is wide enough that a
near-tie there deserves a rerun in fp16 or fp32.

A near-tie says rounding *can* explain the flip, not that it did. To settle
one, decode in a wider dtype: a near-tie moves or vanishes, a bug stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specbench.engine.loop import Decoded, Top2
from specbench.records import DIVERGENCE, NEAR_TIE, first_divergence

TIE_FACTOR = 16
TF32_EPS = 2.0**-10  # TF32 keeps 10 mantissa bits, as fp16 does


def rounding_eps(dtype: torch.dtype, hidden_size: int, device: torch.device | None = None) -> float:
    """eps(storage) + √n · eps(accumulation), as the module docstring defines them."""
    fp32 = torch.finfo(torch.float32).eps
    own = torch.finfo(dtype).eps if dtype.is_floating_point else fp32
    if dtype == torch.float32 and device is not None and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        own = TF32_EPS
    return max(own, fp32) + math.sqrt(hidden_size) * min(own, fp32)


def margin(top: Top2) -> float:
    return top.chosen_logit - top.runner_up_logit


def pair_margins(plain: Top2, spec: Top2) -> tuple[float, float] | None:
    """(m_plain, m_spec): each path's logit of its token minus its logit of the other path's
    token; None when one path's row does not hold the other's token among its best."""
    plain_of_spec, spec_of_plain = plain.logit_of(spec.chosen), spec.logit_of(plain.chosen)
    if plain_of_spec is None or spec_of_plain is None:
        return None
    return plain.chosen_logit - plain_of_spec, spec.chosen_logit - spec_of_plain


def tolerance(plain: Top2, spec: Top2, eps: float) -> float:
    return TIE_FACTOR * eps * max(plain.scale, spec.scale)


def classify(plain: Top2, spec: Top2, eps: float) -> str:
    """NEAR_TIE or DIVERGENCE for the rows that chose the first differing token."""
    margins = pair_margins(plain, spec)
    return NEAR_TIE if margins is not None and sum(margins) <= tolerance(plain, spec, eps) else DIVERGENCE


@dataclass(frozen=True)
class Diagnosis:
    """The first differing position of two decodes and what the target's logits say about it."""

    position: int
    kind: str
    plain_top2: list[int] | None  # [chosen, runner-up] on the plain path; None past its end
    spec_top2: list[int] | None
    plain_margin: float | None  # pair margins (see the module docstring); the runner-up margins where
    spec_margin: float | None  # one path's token is not among the other's best
    tolerance: float | None


def diagnose(position: int, plain: list[Top2], spec: list[Top2], eps: float) -> Diagnosis:
    """Diagnosis at `position` (first_divergence of the two outputs). An output that ended
    there has no row to compare (nor has a decode without top-2 records): a divergence."""
    a = plain[position] if position < len(plain) else None
    b = spec[position] if position < len(spec) else None
    ids = lambda top: None if top is None else [top.chosen, top.runner_up]  # noqa: E731
    gap = lambda top: None if top is None else margin(top)  # noqa: E731
    if a is None or b is None:
        return Diagnosis(position, DIVERGENCE, ids(a), ids(b), gap(a), gap(b), None)
    plain_margin, spec_margin = pair_margins(a, b) or (gap(a), gap(b))
    return Diagnosis(position, classify(a, b, eps), ids(a), ids(b), plain_margin, spec_margin, tolerance(a, b, eps))


def compare_decodes(plain: Decoded, spec: Decoded, eps: float) -> Diagnosis | None:
    """None when `spec` emitted exactly what `plain` did; else the diagnosis at the first differing token."""
    position = first_divergence(spec.output_ids, plain.output_ids)
    return None if position is None else diagnose(position, plain.top2, spec.top2, eps)
