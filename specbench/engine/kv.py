"""KV-cache surgery shared by the target and by drafters with their own cache.

Caches are transformers DynamicCache objects whose layers hold
keys/values of shape [batch, heads, seq, head_dim], or the fast engine's
StaticKV (specbench/engine/static_cache.py), which does the same in place.
"""

from __future__ import annotations

import torch

from specbench.engine.static_cache import StaticKV


def truncate(cache, length: int) -> None:
    """Drop every cached position from `length` on (roll back to a prefix)."""
    if isinstance(cache, StaticKV):
        return cache.truncate(length)
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


@torch.inference_mode()
def compact(cache, base: int, keep: list[int]) -> None:
    """Keep positions base + keep[i] at base + i and drop the rest after base.

    `keep` is ascending with keep[i] >= i, so gathering into place never reads
    a slot that was already overwritten (the gather is materialised first anyway).
    """
    if isinstance(cache, StaticKV):
        return cache.compact(base, keep)
    if keep != list(range(len(keep))):  # a prefix is already in place
        index = torch.tensor(keep, device=cache.layers[0].keys.device) + base
        for layer in cache.layers:
            layer.keys[..., base : base + len(keep), :] = layer.keys.index_select(-2, index)
            layer.values[..., base : base + len(keep), :] = layer.values.index_select(-2, index)
    truncate(cache, base + len(keep))

