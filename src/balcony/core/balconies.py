"""A balcony, and how a fresh one is made from the base it sits on."""

from __future__ import annotations

import copy

from torch import nn

from .architectures import BaseParts
from .exits import twin_layer


class Balcony(nn.Module):
    """One exit: decoder layers of the base's kind (one, as in the paper, unless configured) and a
    norm of the final-norm kind."""

    def __init__(self, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


def new_balcony(base: nn.Module, parts: BaseParts, exit_layer: int, sources: list[int], init: str) -> Balcony:
    """A trainable balcony at `exit_layer` whose layers are twins of the base layers `sources`
    (`BalconyConfig.sources`): copies of their weights, or the base's own random init for
    init "random" (its norm too)."""
    # layer i of the balcony sits at depth e + i of its exit model: that is its KV-cache slot
    layers = [twin_layer(base, parts, source, exit_layer + i, copy_weights=init != "random")
              for i, source in enumerate(sources)]
    norm = copy.deepcopy(parts.norm)
    if init == "random":
        norm.apply(base._init_weights)
    balcony = Balcony(layers, norm)
    balcony.requires_grad_(True)
    return balcony
