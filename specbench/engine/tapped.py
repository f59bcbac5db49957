"""A transformers decoder stack run with its hidden states tapped: what every target engine
(eager, fast, compiled) calls to get the final hidden state and the states a drafter reads."""

from __future__ import annotations

import torch

from specbench.engine.protocol import Taps


def tapped_forward(backbone, taps: Taps, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch 1 (see `tapped_rows`): the tapped states of row 0, [L, H * len(taps)]."""
    last, states = tapped_rows(backbone, taps, **inputs)
    return last, states[0] if states is not None else None


def check_taps(taps: Taps, num_layers: int) -> None:
    """Every tap None or a layer index 0..num_layers (tapped_rows says what each means)."""
    for j in taps:
        if j is not None and not 0 <= j <= num_layers:
            raise ValueError(f"hidden-state tap {j} is outside 0..{num_layers}")


def is_final(tap: int | None, num_layers: int) -> bool:
    """Whether a tap asks for the final normed state: None, or the layer count (HF's last entry)."""
    return tap is None or tap == num_layers


def tapped_rows(backbone, taps: Taps, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a transformers decoder stack; returns (last_hidden_state [B, L, H], the tapped
    states [B, L, H * len(taps)] or None for no taps). A tap None is the final normed hidden
    state; j is the input of decoder layer j (HF's hidden_states[j]; j = number of layers
    is HF's last entry, the final normed state). Several taps are concatenated in order."""
    num_layers = len(backbone.layers)
    check_taps(taps, num_layers)
    tapped: dict[int, torch.Tensor] = {}
    hooks = [
        # the hidden state entering layer j is the layer's first positional argument
        backbone.layers[j].register_forward_pre_hook(lambda module, args, j=j: tapped.setdefault(j, args[0]))
        for j in sorted({j for j in taps if j is not None and j < num_layers})
    ]
    try:
        out = backbone(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if not taps:
        return out.last_hidden_state, None
    final = out.last_hidden_state
    states = [final if is_final(j, num_layers) else tapped[j] for j in taps]
    return out.last_hidden_state, states[0] if len(states) == 1 else torch.cat(states, dim=-1)
