"""Bucket and span arithmetic of the fast engine (engine/static_cache.py): the padded sizes a
forward runs at, so that a few fixed shapes (captured as CUDA graphs, or compiled on a CPU)
serve every verify.

A forward of q tokens runs at a *bucket* (`bucket_size`; or, with a measured profile, the
cheapest bucket that holds q: `cheapest_bucket`) and its attention reads a *span* of the
KV cache: the live length rounded up (`span_for`), so that a short sequence does not read
the whole capacity.
"""

from __future__ import annotations

GRAPH_MAX_BUCKET = 128  # larger forwards (long prefills, huge trees) run unpadded at their exact size
CAPACITY_STEP = 256  # capacities are multiples of this
SPAN_STEP = 256  # the smallest span step; spans are multiples of the span step (or the capacity)
MAX_SPANS = 16  # at most this many spans per capacity: the span step grows with the capacity
# bucket_size(q) - q < q and a bucket is at most 128, so padding adds at most 63 slots
MAX_BUCKET_PADDING = GRAPH_MAX_BUCKET // 2 - 1


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def grown_capacity(capacity: int, tokens: int) -> int:
    """The capacity a KV cache of `capacity` positions grows to when it must hold `tokens` more than
    that: at least doubled, so that growing (a copy) stays rare, in multiples of CAPACITY_STEP."""
    return round_up(max(tokens, 2 * capacity), CAPACITY_STEP)


def bucket_size(q: int) -> int:
    """The padded query length for q tokens: the next power of two up to 128, then multiples of 128."""
    if q > GRAPH_MAX_BUCKET:
        return round_up(q, GRAPH_MAX_BUCKET)
    b = 1
    while b < q:
        b *= 2
    return b


def buckets_up_to(rows: int) -> list[int]:
    """Every bucket a forward of 1..rows tokens can use (capped at GRAPH_MAX_BUCKET)."""
    top = bucket_size(min(max(rows, 1), GRAPH_MAX_BUCKET))
    out, b = [], 1
    while b <= top:
        out.append(b)
        b *= 2
    return out


def span_step(capacity: int) -> int:
    return max(SPAN_STEP, round_up(-(-capacity // MAX_SPANS), SPAN_STEP))


def span_for(end: int, capacity: int) -> int:
    """How many cache positions a step whose last written slot is end - 1 reads: `end`
    rounded up to the span step (at most the capacity)."""
    return min(capacity, round_up(end, span_step(capacity)))


def all_spans(capacity: int) -> list[int]:
    """Every span a capacity allows (at most MAX_SPANS)."""
    step = span_step(capacity)
    return sorted({min(capacity, step * i) for i in range(1, -(-capacity // step) + 1)})


def cheapest_bucket(q: int, profile: dict[int, float] | None) -> int:
    """The bucket a forward of q tokens runs at: with a measured profile (ms per bucket), the
    cheapest profiled bucket that holds q (where t(n) is not monotone, padding 2 tokens to 8
    can be faster); without one, or past the profiled sizes, bucket_size(q). Ties go to the
    smaller bucket."""
    fits = [b for b in sorted(profile or {}) if b >= q]
    if not fits:
        return bucket_size(q)
    return min(fits, key=lambda b: (profile[b], b))
