"""LayerSkip as a trained baseline: a copy of the whole base trains beside the frozen original.

    model = LayerSkipModel.from_base("default", exits=[15, 20, 25], layer_dropout=0.1)
    out = model.forward_exits(ids)     # the student's exits and last layer, and the original's output

LayerSkip (Elhoushi et al., 2024) trains every parameter with two things added: *layer dropout*
whose rate grows with depth (layer l of L is skipped, per sequence, with probability
p_max * l / (L - 1), in training only) and an *early-exit loss* at chosen depths through the
model's own final norm and head. Here each loss is the same KL the balconies learn, to the same
teacher: the frozen original model (kept beside the student, so the teacher cache and sparse
KL of `distill` apply unchanged), at every exit and at the last layer. Exit e is the student's
first e layers, its final norm and its head: e layers and the head, one layer fewer than a
balcony at e. Unlike a balcony, training changes the full model.

The artifact is the student as a plain transformers checkpoint (`save_pretrained`, with the
tokenizer) plus `layerskip_config.json`: the method, the original base and its fingerprint,
the exits and the options.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from safetensors.torch import load_file
from torch import nn

from ..core.architectures import resolve
from ..core.card import EVALUATION, ExitFacts, Training, base_facts, evaluation_body, exits_table, licence_body
from ..core.card import render, training_body, write_card
from ..core.config import fingerprint_weights
from ..core.errors import ArtifactError, ExitError
from ..core.exits import (
    Tapped,
    decoder_of,
    layer_types,
    positions_from_mask,
    stack_model,
)
from ..core.model import ExitOutputs, default_exits, load_base
from ..core.policy import CostTable
from ..default import DEFAULT_NAME, is_default
from ..version import __version__

CONFIG_NAME = "layerskip_config.json"
WEIGHTS_NAME = "model.safetensors"  # what transformers' save_pretrained writes for a model of this size


@dataclass
class LayerSkipConfig:
    """What a LayerSkip artifact records (`layerskip_config.json`)."""

    exits: list[int]
    layer_dropout: float = 0.1
    base_model: str | None = None  # the original (the teacher): hub id, path or "default"
    base_fingerprint: str | None = None
    num_layers: int | None = None
    method: str = "layerskip"
    options: dict = field(default_factory=dict)  # anything else the run that made it set
    balcony_version: str = __version__

    def save(self, directory: str | Path) -> None:
        tmp = Path(directory) / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, Path(directory) / CONFIG_NAME)

    @classmethod
    def load(cls, directory: str | Path) -> LayerSkipConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ArtifactError(f"{path} not found: {directory} is no LayerSkip artifact (`balcony train --method layerskip`)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ArtifactError(f"{path} is invalid ({err}); train it again") from err


class _Skippable(Tapped):
    """A student layer under layer dropout: rows whose `keep` is False pass through it unchanged.
    (A `Tapped` without a tap, for the attributes the decoder reads through it.) With
    `checkpoint`, its activations are recomputed in backward instead of stored."""

    def __init__(self, layer: nn.Module, keep: torch.Tensor | None, checkpoint: bool):
        super().__init__(layer, tap=None)
        self.keep, self.checkpoint = keep, checkpoint

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.checkpoint and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        else:
            out = self.layer(*args, **kwargs)
        if self.keep is None:
            return out
        # every row runs the layer (one batch), and a dropped row takes its input instead
        mixed = torch.where(self.keep.view(-1, 1, 1), out[0] if isinstance(out, tuple) else out, hidden)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


class LayerSkipModel(nn.Module):
    """The frozen original (`base`, the teacher) and a trainable copy of it (`student`)."""

    def __init__(self, base: nn.Module, exits: list[int] | None = None, *, layer_dropout: float = 0.1,
                 tokenizer=None, student: nn.Module | None = None, base_model: str | None = None):
        super().__init__()
        self.parts = resolve(base)  # the teacher's: the trainer's statistics and the teacher cache read these
        self.base, self.tokenizer = base, tokenizer
        num_layers = self.parts.num_layers
        exits = sorted({int(e) for e in (exits or default_exits(num_layers))})
        bad = [e for e in exits if not 1 <= e < num_layers]
        if bad:
            raise ExitError(f"LayerSkip exits must be in 1..{num_layers - 1} for this {num_layers}-layer base, not {bad}")
        base.requires_grad_(False)
        base.eval()
        self.student = copy.deepcopy(base) if student is None else student  # a deep copy keeps tied weights tied
        self.student.requires_grad_(True)
        self.student_parts = resolve(self.student)
        self.base_fingerprint = fingerprint_weights(base)  # also names the `--data self` corpus: the original's
        # exit e runs e layers and the head (a balcony at e: e + 1)
        self.costs = CostTable.of(self.parts.layers[-1], self.parts.head, {None: num_layers, **{e: e for e in exits}})
        self.layerskip_config = LayerSkipConfig(exits=exits, layer_dropout=layer_dropout, base_model=base_model,
                                      base_fingerprint=self.base_fingerprint, num_layers=num_layers)
        self.eval()

    @classmethod
    def from_base(cls, base: str | nn.Module | None = None, exits: list[int] | None = None, *,
                  layer_dropout: float = 0.1, tokenizer=None, device: str | None = None) -> LayerSkipModel:
        """A fresh student (a copy of `base`: a model, hub id, path, or None for the default model)."""
        name = base if isinstance(base, str) or base is None else getattr(base.config, "name_or_path", None)
        if not isinstance(base, nn.Module):
            base, loaded = load_base(base, device=device)
            tokenizer = tokenizer or loaded
        return cls(base, exits, layer_dropout=layer_dropout, tokenizer=tokenizer,
                   base_model=DEFAULT_NAME if is_default(name) else name)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base: str | nn.Module | None = None, *,
                        device: str | None = None) -> LayerSkipModel:
        """A trained student (an artifact `save_pretrained` wrote) beside its original, checked by fingerprint."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = LayerSkipConfig.load(directory)
        tokenizer = None
        if not isinstance(base, nn.Module):
            base, tokenizer = load_base(base if base is not None else config.base_model, device=device)
        if config.base_fingerprint and fingerprint_weights(base) != config.base_fingerprint:
            raise ArtifactError(f"{directory} was trained from a base with other weights than {config.base_model!r}: "
                                "pass the original base it was trained from")
        student = AutoModelForCausalLM.from_pretrained(str(directory), dtype=next(base.parameters()).dtype)
        if device is not None:
            student.to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError, TypeError):
            pass  # the original's, loaded above, if any
        model = cls(base, config.exits, layer_dropout=config.layer_dropout, tokenizer=tokenizer, student=student,
                    base_model=config.base_model)
        model.layerskip_config.options = config.options
        return model

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None, *,
                        training: Training | None = None, card: bool = True) -> None:
        """The student as a transformers checkpoint, its tokenizer, layerskip_config.json and (with
        `card`) a model card, README.md, telling of `training` when a run passes what it did."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.student.save_pretrained(str(directory), state_dict=state_dict)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        self.layerskip_config.save(directory)
        if card:
            write_card(directory, self.model_card(training))

    def model_card(self, training: Training | None = None) -> str:
        """The card of this artifact: what LayerSkip is, the exits, training, licence, use and limits."""
        c, base = self.layerskip_config, base_facts(self.layerskip_config.base_model)
        parameters = sum(p.numel() for p in self.student.parameters())
        exits = [ExitFacts(e, e, parameters, self.costs.relative(e)) for e in c.exits]
        meta = {"library_name": "transformers", "base_model": base.hub_id,
                "base_model_relation": "finetune" if base.hub_id else None, "license": base.licence,
                "tags": ["balcony", "layerskip", "early-exit", "layer-dropout", "self-distillation"]}
        intro = (f"A LayerSkip-style early-exit model trained from {base.words}: the whole model retrained, with "
                 f"layer dropout and a loss at exits {', '.join(map(str, c.exits))} and at the last layer. It is a "
                 "plain transformers checkpoint (`AutoModelForCausalLM.from_pretrained` loads its full model); "
                 "`balcony` trained it as a baseline beside balconies.")
        what = (f"## What it is\n\nEvery parameter of a copy of the base was trained (LayerSkip, Elhoushi et al. "
                f"2024): layer *l* of {c.num_layers} was skipped in training with probability p_max * l / "
                f"({c.num_layers} - 1), p_max = {c.layer_dropout}, and exit *e* is the model's first *e* layers, then "
                "its own final norm and its shared LM head: no extra layers. Unlike balconies, training changes the "
                "full model too. Original base weight fingerprint: "
                f"`{c.base_fingerprint}`; `layerskip_config.json` records the exits and options.")
        table = exits_table(exits, parameters, c.num_layers, layer_word="layers run",
                            full=ExitFacts(c.num_layers, c.num_layers, parameters, 1.0))
        exits_text = (f"## Exits\n\n{table}\n\nTrainable parameters: the whole model ({parameters:,}), shared by "
                      "every exit. Relative cost: per-token FLOPs as a fraction of the full model's.")
        use = ("## Intended use and limits\n\nA baseline to compare balconies with at equal cost, and an early-exit "
               "model in its own right: load it with `LayerSkipModel.from_pretrained(FOLDER)` (from "
               "`balcony.training.layerskip`) beside its original base. Its full model is no longer the base: it "
               "inherits the base's limits and biases and its exits add errors of their own.")
        sections = [("what", what), ("exits", exits_text),
                    ("training", training_body(training) if training else "## Training\n\nNo training run is "
                     "recorded with this artifact."),
                    (EVALUATION, evaluation_body({}, "Not measured here: `balcony compare` evaluates LayerSkip "
                                                     "beside balconies, at every exit, on the same text and tasks.")),
                    ("licence", "## Licence\n\n" + licence_body(base.licence, "This model is", base.hub_id)), ("use", use)]
        return render(meta, f"LayerSkip early exits for {base.short}", intro, sections)

    def load_student(self, directory: str | os.PathLike) -> None:
        """Load student weights `save_pretrained` wrote (a checkpoint) into this student, in place."""
        weights = load_file(str(Path(directory) / WEIGHTS_NAME))
        current = self.student.state_dict()
        found = self.student.load_state_dict({k: v.to(current[k].device) for k, v in weights.items()}, strict=False)
        # a tied head is saved once, under the embedding's name: what is missing must be such a twin
        stored = {current[k].data_ptr() for k in weights}
        untied = [k for k in found.missing_keys if current[k].data_ptr() not in stored]
        if untied or found.unexpected_keys:
            raise ArtifactError(f"{directory} holds other student weights (missing {untied[:3]}, unexpected "
                                f"{found.unexpected_keys[:3]}): it is no checkpoint of this model")

    # ----------------------------------------------------------------- the model

    @property
    def exits(self) -> list[int]:
        return list(self.layerskip_config.exits)

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    @property
    def device(self) -> torch.device:
        return self.parts.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.head.weight.dtype

    def train(self, mode: bool = True) -> LayerSkipModel:
        super().train(mode)
        self.base.eval()  # the original is the teacher: frozen
        return self

    def generate(self, *args, **kwargs):
        """The original model's `generate` (what `--data self` samples from: the teacher)."""
        return self.base.generate(*args, **kwargs)

    def keep_masks(self, batch: int, seed: int) -> list[torch.Tensor] | None:
        """Layer dropout's draw for one batch: per layer, which rows run it (None without dropout).
        A fixed function of `seed`, so a resumed run drops the same layers."""
        p_max, last = self.layerskip_config.layer_dropout, self.num_layers - 1
        if not p_max:
            return None
        draws = torch.rand(self.num_layers, batch, generator=torch.Generator().manual_seed(seed))
        rates = p_max * torch.arange(self.num_layers, dtype=torch.float32) / last
        return list((draws >= rates[:, None]).to(self.device))

    @torch.no_grad()
    def teacher_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The original model's last hidden state (after its final norm): the teacher."""
        return decoder_of(self.base, self.parts)(input_ids=input_ids, attention_mask=attention_mask,
                                                 position_ids=positions_from_mask(attention_mask),
                                                 use_cache=False).last_hidden_state

    def forward_exits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      teacher: bool = True, checkpoint: bool = False, dropout_seed: int | None = None) -> ExitOutputs:
        """The student's normalised hidden states at every exit and after its last layer (key
        `num_layers`), with autograd; with `teacher`, the original's last hidden state (no grad).
        Layer dropout applies in training mode when `dropout_seed` is given."""
        positions = positions_from_mask(attention_mask)
        teacher_hidden = self.teacher_hidden(input_ids, attention_mask) if teacher else None
        keep = self.keep_masks(input_ids.shape[0], dropout_seed) if self.training and dropout_seed is not None else None
        caught: dict[int, torch.Tensor] = {}

        def catch(index: int):
            return lambda hidden, args, kwargs: caught.__setitem__(index, hidden)

        parts, layers = self.student_parts, []
        for i, layer in enumerate(parts.layers):
            if keep is not None or checkpoint:
                layer = _Skippable(layer, None if keep is None else keep[i], checkpoint)
            layers.append(Tapped(layer, catch(i)) if i in self.layerskip_config.exits else layer)
        decoder = decoder_of(stack_model(self.student, parts, layers, parts.norm, layer_types(self.student.config)), parts)
        last = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False).last_hidden_state
        hidden = {e: parts.norm(caught[e]) for e in self.exits}
        hidden[self.num_layers] = last
        return ExitOutputs(hidden=hidden, teacher_hidden=teacher_hidden)
