"""What a training run is told: the model and its exits, then one group of options per concern.

    TrainConfig(out="runs/x", exits=[15, 20, 25],
                data=DataOptions(source="self", seq_len=512),
                optim=OptimOptions(lr=3e-4, max_steps=2000),
                loss=LossOptions(kl_topk=64),
                checkpoints=CheckpointOptions(every=100),
                logging=LogOptions(report_to="tensorboard"))

`balcony train` has one flat flag per field (`--lr`, `--kl-topk`, ...): a field's flag is its
name, or the `flag` in its metadata where the name alone would repeat its group's
(`CheckpointOptions.every` is `--checkpoint-every`). `TrainConfig.from_flat` maps those flat
names back into the groups.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields

from ..core.errors import BalconyError


def _at_least(value: float, low: float, name: str, what: str) -> None:
    if value < low:
        raise BalconyError(f"{name} must be {what}, not {value}")


@dataclass
class DataOptions:
    source: str | None = field(default=None, metadata={"flag": "data"})  # None: "self" for the default model
    text_field: str = "text"
    corpus_sources: str | None = None  # comma-separated: train on these sources of a corpus folder only
    corpus_shards: str | None = None  # shard numbers of a corpus folder, e.g. "93-97" or "93-": those only
    skip_tokens: int = 0  # start this far into the data's token stream (past what an earlier run read)
    seq_len: int = 512
    val_fraction: float = 0.05
    val_sequences: int = 64  # cap on held-out sequences per validation

    def check(self) -> None:
        _at_least(self.seq_len, 1, "seq_len", "at least 1")
        _at_least(self.skip_tokens, 0, "skip_tokens", "0 or more")


@dataclass
class OptimOptions:
    batch_size: int = 4  # sequences per micro-batch on each process
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None  # training budget in tokens (instead of steps); None and no steps: one epoch
    lr: float = 3e-4  # paper: 5e-4 at ~1M tokens/step; smaller batches take a smaller rate
    warmup: float = 0.01  # fraction of the steps (paper: 1%)
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def check(self) -> None:
        for name in ("batch_size", "grad_accum"):
            _at_least(getattr(self, name), 1, name, "at least 1")
        if self.lr <= 0:
            raise BalconyError(f"lr must be positive, not {self.lr}")


@dataclass
class LossOptions:
    """What `distill` minimises, and how it computes it."""

    exit_weights: list[float] | None = None  # one per exit, in exit order; None: mean over exits
    ce_weight: float = 0.0  # cross-entropy against the data (paper: 0)
    top1_weight: float = 0.0  # cross-entropy against the teacher's top-1 token (what greedy decoding follows)
    # extra loss weight where the next token is a less common one already in the row (in-context
    # recall, what LAMBADA asks); validation reports agreement there either way
    recall_weight: float = 0.0
    chunk_tokens: int = 512  # tokens per head + KL chunk: memory against speed
    # 0: the exact full-vocabulary KL. k > 0: the sparse KL (teacher's top k + tail mass, the
    # student's normaliser from kl_samples random vocabulary rows): the head costs k + kl_samples rows
    kl_topk: int = 0
    kl_samples: int = 2048
    # sparse KL: ids per token drawn from the teacher's distribution outside its top k, so the
    # remainder is learnt too (the exact KL in expectation); 0: the remainder is one bucket
    kl_tail_samples: int = 16
    # sparse KL: a folder that keeps the teacher's top k per training row, so later epochs (and
    # later runs on the same data) skip the teacher's top layers and head; None: no cache
    teacher_cache: str | None = None

    def weights(self, exits: list[int]) -> dict[int, float]:
        """Each exit's weight in the loss."""
        if self.exit_weights is not None and len(self.exit_weights) != len(exits):
            raise BalconyError(f"{len(self.exit_weights)} exit weights given for {len(exits)} exits {exits}")
        return dict(zip(exits, self.exit_weights or [1.0 / len(exits)] * len(exits)))

    def check(self) -> None:
        _at_least(self.chunk_tokens, 1, "chunk_tokens", "at least 1")
        for name in ("ce_weight", "top1_weight", "recall_weight", "kl_tail_samples"):
            _at_least(getattr(self, name), 0, name, "0 or more")
        if self.kl_topk < 0 or (self.kl_topk and self.kl_samples < 1):
            raise BalconyError(f"kl_topk must be 0 (exact KL) or positive with kl_samples >= 1, not {self.kl_topk} / "
                               f"{self.kl_samples}")
        if self.kl_topk and self.ce_weight:
            raise BalconyError("the sparse KL (--kl-topk) has no cross-entropy term: drop --ce-weight or use --kl-topk 0")
        if self.teacher_cache and not self.kl_topk:
            raise BalconyError("--teacher-cache keeps the sparse KL's top k: set --kl-topk (the exact KL needs every logit)")


@dataclass
class CheckpointOptions:
    every: int = field(default=100, metadata={"flag": "checkpoint_every"})  # steps between checkpoints
    keep: int = field(default=2, metadata={"flag": "keep_checkpoints"})  # the latest this many are kept
    resume: bool = False  # continue from the latest checkpoint in `out`

    def check(self) -> None:
        _at_least(self.every, 1, "checkpoint_every", "at least 1")
        _at_least(self.keep, 1, "keep_checkpoints", "at least 1")


@dataclass
class LogOptions:
    eval_every: int = 50  # steps between validations
    report_to: str = "none"  # also "tensorboard" or "wandb", beside metrics.jsonl
    progress: bool = True

    def check(self) -> None:
        _at_least(self.eval_every, 1, "eval_every", "at least 1")


# what trains (`training.methods`): the paper's balconies; LayerSkip (a copy of the whole model, layer
# dropout and early-exit losses through its own head); depth pruning (layers[:e] + a trained copy
# of layer e and the final norm: a balcony of init "next")
METHODS = ("balcony", "layerskip", "pruned")

GROUPS = {"data": DataOptions, "optim": OptimOptions, "loss": LossOptions, "checkpoints": CheckpointOptions,
          "logging": LogOptions}


@dataclass
class TrainConfig:
    out: str
    model: str | None = None  # base: hub id, path, or None/"default" for the embedded model
    exits: list[int] | None = None  # None: about 1/2, 2/3 and 5/6 of the depth
    method: str = "balcony"  # one of METHODS
    # layerskip: the last layer's dropout rate p_max; layer l (0-based) is skipped with p_max * l / (L - 1)
    layer_dropout: float = 0.1
    init: str = "copy"  # pruned: always "next" (its definition); "copy", the default, is read as "next"
    init_from: str | None = None  # start from these trained balconies (an artifact) instead of fresh ones
    # decoder layers per balcony, or {exit: n}; None: 1, or init_from's. More than init_from's grows it.
    balcony_layers: int | dict | None = None
    precision: str = "fp32"  # or "bf16" autocast for the trunk, balconies and head (KL stays fp32)
    activation_checkpointing: bool = False
    fsdp: bool = False  # shard base and balcony layers over the ranks (FSDP2), for bases too big for one device
    seed: int = 0  # data order, the sparse KL's draws
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    checkpoints: CheckpointOptions = field(default_factory=CheckpointOptions)
    logging: LogOptions = field(default_factory=LogOptions)

    def __post_init__(self):
        if self.method == "pruned" and self.init == "copy":
            self.init = "next"  # the pruned model continues the trunk: layer e, then the final norm

    def check(self) -> None:
        """Refuse settings no run can use, naming the setting."""
        if self.precision not in ("fp32", "bf16"):
            raise BalconyError(f"precision must be fp32 or bf16, not {self.precision!r}")
        for name in GROUPS:
            getattr(self, name).check()
        self._check_method()

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise BalconyError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0 <= self.layer_dropout < 1:
            raise BalconyError(f"layer_dropout must be in [0, 1), not {self.layer_dropout}")
        if self.method == "balcony":
            return
        name = f"--method {self.method}"
        if self.init_from is not None:
            raise BalconyError(f"{name} trains from the base: drop --init-from (it continues trained balconies)")
        if self.balcony_layers not in (None, 1):
            raise BalconyError(f"{name} has one trained layer per exit at most: drop --balcony-layers")
        if self.method == "pruned" and self.init != "next":
            raise BalconyError(f"{name} starts from a copy of layer e and the final norm (init next), not {self.init!r}: "
                               "drop --init")
        if self.method == "layerskip" and self.fsdp:
            raise BalconyError(f"{name} trains the whole model on each process: drop --fsdp")
        if self.method == "layerskip" and self.loss.recall_weight:
            raise BalconyError(f"{name}: --recall-weight weighs balcony outputs only; drop it")

    @classmethod
    def from_flat(cls, **options) -> TrainConfig:
        """A config from `balcony train`'s flat names (lr=..., data=..., checkpoint_every=...), each
        put in the group that holds it; a name that is no option raises TypeError."""
        groups = {}
        for name, group in GROUPS.items():
            groups[name] = group(**{f.name: options.pop(_flag(f)) for f in fields(group) if _flag(f) in options})
        return cls(**options, **groups)

    @classmethod
    def flat_defaults(cls) -> dict:
        """Every flat option's default (`out` has none)."""
        return {name: f.default for name, f in _flat_fields().items() if f.default is not MISSING}


def _flag(f: Field) -> str:
    return f.metadata.get("flag", f.name)


def _flat_fields() -> dict[str, Field]:
    """TrainConfig's own fields and its groups' fields, by flat name."""
    found = {}
    for f in fields(TrainConfig):
        for inner in fields(GROUPS[f.name]) if f.name in GROUPS else [f]:
            found[_flag(inner)] = inner
    return found
