"""`hydra-decoder`: decoder-layer Hydra, a trunk of N decoder layers in front of Medusa heads.

The trunk starts as a copy of the target's last N decoder layers, with its own
norm and KV cache, reading the hidden state that enters target layer L-N. It
is fed the accepted tokens' rows at the start of the next draft (the
reference runs it over the whole tree with the tree mask and compacts its
cache to the accepted path: the same keys, values and outputs, for fewer rows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from specbench.catalogue import drafter_entry
from specbench.drafters.heads.base import FRESH, HeadOptions, HeadTraining, module_bytes
from specbench.drafters.heads.layouts import (
    check_base_model,
    load_hydra_decoder,
    load_medusa_state,
)
from specbench.drafters.heads.medusa import MedusaDrafter, fresh_medusa_heads
from specbench.drafters.heads.modules import MedusaHeads, OwnDecoder
from specbench.engine.options import option
from specbench.engine.protocol import TrainRecipe
from specbench.engine.tree import TreeShape
from specbench.errors import UserError


DEFAULT_DECODER_LAYERS = 1


@dataclass
class TrunkDepth:
    """How deep a fresh trunk is: one declaration for `run --drafter hydra-decoder` (a drafter
    option) and `train --drafter hydra-decoder` (a recipe option)."""

    decoder_layers: int | None = option(None, "hydra-decoder, fresh trunk (run, train): decoder layers copied from the target's "
                                              f"last N (default: the catalogue's, else {DEFAULT_DECODER_LAYERS})", min=1)

    def layers_to_copy(self, entry: dict | None = None) -> int:
        return self.decoder_layers or (entry or {}).get("decoder_layers", DEFAULT_DECODER_LAYERS)


@dataclass
class DecoderOptions(TrunkDepth, HeadOptions):
    pass


@dataclass
class DecoderTraining(TrunkDepth, HeadTraining):
    pass


class HydraDecoderDrafter(MedusaDrafter):
    name = "hydra-decoder"
    recipe = TrainRecipe("specbench.train.heads:train_heads", 1e-3, DecoderTraining)
    summary = "decoder-layer Hydra: a trunk of N decoder layers (copied from the target's last N, own KV cache) in front of Medusa heads"
    Options = DecoderOptions

    def __init__(self, target, heads: MedusaHeads, trunk: OwnDecoder, tree: TreeShape, options: DecoderOptions | None = None,
                 info: dict | None = None) -> None:
        n = trunk.config.num_hidden_layers
        super().__init__(target, heads, tree, options, {"decoder_layers": n, **(info or {})})
        self.trunk = trunk.to(target.device, target.dtype).eval()
        self.taps = (target.num_layers - n,)  # the trunk reads what enters target layer L - N

    @classmethod
    def create(cls, target, options: DecoderOptions) -> HydraDecoderDrafter:
        if options.heads is None and options.decoder_layers is not None and not drafter_entry(cls.name, target.name, target.model_id):
            options = replace(options, heads=FRESH)  # `--decoder-layers N` on any target: an untrained trunk copied from its last N layers
        settings = cls.settings(target, options)
        if settings.heads == FRESH:
            n = options.layers_to_copy(settings.entry)
            module = fresh_medusa_heads(target, options.heads_to_make(settings.entry))
            drafter = cls(target, module, copied_trunk(target, n), settings.tree, options, {"heads": FRESH})
            return drafter.apply_vocab_trim(options)
        checkpoint, layout = load_hydra_decoder(settings.heads, target)
        if options.decoder_layers is not None and options.decoder_layers != layout.num_decoder_layers:
            raise UserError(f"--decoder-layers {options.decoder_layers} contradicts '{settings.heads}', which has {layout.num_decoder_layers}")
        check_base_model(checkpoint, target)
        medusa = layout.medusa
        module = MedusaHeads(medusa.num_heads, medusa.num_layers, target.hidden_size, target.vocab_size,
                             None if medusa.own_lm_head else target.lm_head).to(target.device, target.dtype)
        head_state = {k.removeprefix("medusa_head."): v for k, v in checkpoint.state.items() if k.startswith("medusa_head.")}
        load_medusa_state(module, head_state, target, settings.heads)
        trunk = OwnDecoder(target.config, layout.num_decoder_layers).to(target.device, target.dtype)
        trunk.load_layers({k: v.to(target.dtype) for k, v in checkpoint.state.items() if not k.startswith("medusa_head.")}, settings.heads)
        return cls(target, module, trunk, settings.tree, options, checkpoint.describe()).apply_vocab_trim(options)

    def memory_model(self) -> tuple[int, int]:
        heads_bytes, _ = super().memory_model()
        return heads_bytes + module_bytes(self.trunk.model.layers, self.trunk.model.norm), 1

    def fork(self, row: int) -> HydraDecoderDrafter:
        """A row's drafter: the trunk's weights shared, its KV cache the row's own."""
        clone = super().fork(row)
        clone.trunk = copy.copy(self.trunk)  # reset() then gives the copy a cache of its own
        return clone

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.trunk.reset()
        super().begin(prompt_tokens, prompt_hidden)

    def consume(self, rows: torch.Tensor) -> torch.Tensor:
        return self.trunk.feed(rows)[-1]

    def teacher_base(self, states):
        self.trunk.reset()
        return self.trunk.feed(states)


def copied_trunk(target, n: int) -> OwnDecoder:
    """N decoder layers copied from the target's last N, and its final norm."""
    if not 1 <= n <= target.num_layers:
        raise UserError(f"--decoder-layers must be between 1 and the target's {target.num_layers} layers (got {n})")
    trunk = OwnDecoder(target.config, n).to(target.device, target.dtype)
    trunk.load_layers(target.decoder_layer_state(n), f"trunk copied from '{target.name}'")
    return trunk
