"""`--init-from`: start from trained balconies, keeping some of their exits or growing them deeper."""

from __future__ import annotations

from ..core.config import BalconyConfig
from ..core.errors import BalconyError
from ..core.model import BalconyModel
from .config import TrainConfig


def from_trained(c: TrainConfig, device: str | None) -> BalconyModel:
    """The trained balconies of `c.init_from` (those at `c.exits` if given), grown to `c.balcony_layers`
    layers if that is more.

    Growing keeps the trained layers as the *last* layers of each balcony (with its norm); the
    new leading layers get the usual init (copies of the base layers after the exit), so the
    grown balcony starts as "one more trunk layer, then the trained balcony".
    """
    source = BalconyModel.from_pretrained(c.init_from, base=c.model, device=device)
    exits = source.exits if c.exits is None else sorted(c.exits)
    if not set(exits) <= set(source.exits):
        raise BalconyError(f"--init-from {c.init_from} has exits {source.exits}, not {exits}: "
                           "drop --exits (or name some of those) or start fresh balconies without --init-from")
    have = {e: source.balcony_config.layers_at(e) for e in exits}
    want = dict(have)
    if c.balcony_layers is not None:
        try:
            wanted = BalconyConfig(exits=exits, balcony_layers=c.balcony_layers)
        except ValueError as err:
            raise BalconyError(str(err)) from err
        want = {e: wanted.layers_at(e) for e in exits}
    short = {e: have[e] for e in exits if want[e] < have[e]}
    if short:
        raise BalconyError(f"--init-from {c.init_from} has balconies of {short} layers (exit: layers): "
                           f"--balcony-layers {c.balcony_layers} would drop trained layers; ask for as many or more")
    if want == have and exits == source.exits:
        return source
    if want != have and "next" in (source.balcony_config.init, c.init):
        raise BalconyError(f"growing balconies with init 'next' (layers that continue the trunk) is not supported "
                           f"(--init-from {c.init_from} is init {source.balcony_config.init!r}, --init {c.init!r}): "
                           "train fresh balconies with --init next --balcony-layers N instead")
    layers = next(iter(want.values())) if len(set(want.values())) == 1 else {str(e): n for e, n in want.items()}
    model = BalconyModel.from_base(source.base, exits=exits, init=c.init, balcony_layers=layers,
                                   tokenizer=source.tokenizer)
    for e in model.exits:
        grown, trained = model.balconies[str(e)], source.balconies[str(e)]
        for layer, old in zip(grown.layers[want[e] - have[e]:], trained.layers):
            layer.load_state_dict(old.state_dict())
        grown.norm.load_state_dict(trained.norm.state_dict())
    return model
