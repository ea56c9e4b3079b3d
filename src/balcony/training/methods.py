"""The training methods `balcony train --method` selects, each as the trainer drives it.

* `balcony` (the paper's): a frozen base; the balconies train (`BalconyModel`).
* `pruned`: depth pruning with healing at a balcony's cost: for each exit e, the first e base
  layers (frozen), a trained copy of base layer e and a trained copy of the final norm, then the
  shared head. That is a one-layer balcony of init "next", so it is one: the same model class,
  loss, artifact and `balcony export ARTIFACT --exit e` (a standalone model of e + 1 layers).
  What differs from the paper's balcony is the init only (layer e, the trunk continued, instead
  of the base's last layer), and what it stands for: a compressed model per exit.
* `layerskip`: every parameter of a copy of the base trains, with layer dropout and the KL at
  every exit and the last layer (`LayerSkipModel`); its full model changes.

Each is wrapped in a small adapter of one shape: the module whose parameters train and whose
state a checkpoint keeps (`trainable`), the keys of the loss (`loss_exits`), the head that scores
them when it is not the teacher's (`student_head`), the forward, and saving and loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.card import Training
from ..core.config import WEIGHTS_NAME
from ..core.errors import BalconyError
from ..core.model import BalconyModel, ExitOutputs
from .config import TrainConfig
from .distributed import placed_like
from .grow import from_trained
from .layerskip import LayerSkipModel


def build_model(c: TrainConfig, device: str | None) -> BalconyModel | LayerSkipModel:
    """The model `c.method` trains, fresh from the base (or from `c.init_from`'s balconies)."""
    if c.method == "layerskip":
        model = LayerSkipModel.from_base(c.model, c.exits, layer_dropout=c.layer_dropout, device=device)
        # what else the artifact says it was trained with (train_config.json beside it has everything)
        model.layerskip_config.options = {"lr": c.optim.lr, "max_tokens": c.optim.max_tokens, "seq_len": c.data.seq_len,
                                          "kl_topk": c.loss.kl_topk, "precision": c.precision, "seed": c.seed}
        return model
    if c.init_from is not None:
        return from_trained(c, device)
    try:  # pruned: init "next" (TrainConfig sees to it)
        return BalconyModel.from_base(c.model, exits=c.exits, init=c.init, balcony_layers=c.balcony_layers or 1,
                                      device=device)
    except ValueError as err:  # a bad balcony_layers, named by BalconyConfig
        raise BalconyError(str(err)) from err


class Balconies:
    """A `BalconyModel` (methods balcony and pruned): its balconies train, scored by the shared head."""

    student_head = None

    def __init__(self, model: BalconyModel):
        self.model = model
        self.trainable = model.balconies
        self.loss_exits = model.exits

    def forward(self, ids: torch.Tensor, *, teacher: bool = True, checkpoint: bool = False, seed: int = 0) -> ExitOutputs:
        return self.model.forward_exits(ids, teacher=teacher, checkpoint=checkpoint)

    def teacher(self, ids: torch.Tensor) -> ExitOutputs:
        """The frozen full model alone (no exits): what the teacher cache is filled from."""
        return self.model.forward_exits(ids, exits=[])

    def save(self, directory: str | Path, state_dict: dict | None = None, training: Training | None = None,
             card: bool = True) -> None:
        self.model.save_pretrained(directory, state_dict=state_dict, training=training, card=card)

    def load(self, directory: str | Path) -> None:
        weights = load_file(str(Path(directory) / WEIGHTS_NAME))
        current = self.trainable.state_dict()
        self.trainable.load_state_dict({k: placed_like(v, current[k]) for k, v in weights.items()})


class LayerSkip:
    """A `LayerSkipModel`: the whole student trains; the loss covers every exit and its last layer
    (key `num_layers`), each scored by the student's own head."""

    def __init__(self, model: LayerSkipModel):
        self.model = model
        self.trainable = model.student
        self.loss_exits = [*model.exits, model.num_layers]
        self.student_head = model.student_parts.head

    def forward(self, ids: torch.Tensor, *, teacher: bool = True, checkpoint: bool = False, seed: int = 0) -> ExitOutputs:
        # layer dropout is drawn from `seed` (a fixed function of the step: exact resume), in training only
        return self.model.forward_exits(ids, teacher=teacher, checkpoint=checkpoint, dropout_seed=seed)

    def teacher(self, ids: torch.Tensor) -> ExitOutputs:
        """The frozen original alone: what the teacher cache is filled from."""
        return ExitOutputs(hidden={}, teacher_hidden=self.model.teacher_hidden(ids))

    def save(self, directory: str | Path, state_dict: dict | None = None, training: Training | None = None,
             card: bool = True) -> None:
        self.model.save_pretrained(directory, state_dict=state_dict, training=training, card=card)

    def load(self, directory: str | Path) -> None:
        self.model.load_student(directory)


def trained(model: BalconyModel | LayerSkipModel) -> Balconies | LayerSkip:
    """The adapter the trainer drives `model` through."""
    return LayerSkip(model) if isinstance(model, LayerSkipModel) else Balconies(model)


def trainable_parameters(model: BalconyModel | LayerSkipModel) -> int:
    """How many parameters the method trains (shared ones, e.g. a tied head, once)."""
    return sum(p.numel() for p in trained(model).trainable.parameters())
