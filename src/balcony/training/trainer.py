"""Train balconies by self-distillation against the frozen base: one machine or many.

    balcony train --model default --exits 15,20,25 --data self --out runs/smollm2

Per step: one no-grad pass of the frozen trunk gives every exit's hidden state and the
teacher; each balcony runs on its exit; the chunked KL (distill.py) backpropagates into the
balconies only. AdamW, cosine schedule with warm-up, gradient clipping and accumulation.
`--method layerskip` / `pruned` train the two baselines (methods.py) through the same loop, data,
schedule, checkpoints and logs; only what trains and what runs forward differ.

Runs under `torchrun` / `accelerate launch` unchanged: with WORLD_SIZE > 1 every rank takes
its slice of each global batch, balcony gradients (and only those) are summed across ranks
with one all-reduce per step (distributed.py), and rank 0 alone writes. Checkpoints
(checkpoint.py) are atomic folders with no pickle in them; `resume` continues exactly
(optimiser, schedule, RNG, data position); SIGINT/SIGTERM write a checkpoint before exiting.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..core.card import Training
from ..core.errors import BalconyError
from ..core.model import BalconyModel
from ..default import is_default
from .checkpoint import Checkpoints
from .config import TrainConfig
from .data import PackedData, build_dataset
from .distill import DistillStats, TeacherTop, common_tokens, distill, next_token_labels, recall_positions, teacher_topk
from .distributed import Ranks, full_state, shard
from .interrupt import StopSignals, TrainingInterrupted
from .layerskip import LayerSkipModel
from .loggers import METRICS_NAME, open_loggers
from .methods import build_model, trained
from .plot import CURVE_NAME, plot_learning_curve
from .teacher_cache import TeacherCache

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "train"]


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, config: TrainConfig, model: BalconyModel | LayerSkipModel | None = None,
                 data: PackedData | None = None, device: str | None = None):
        self.config = c = config
        self.dist = Ranks()
        self.out = Path(c.out)
        c.check()
        self.model = model = model if model is not None else build_model(c, self.dist.device(device))
        if c.fsdp:
            shard(model, self.dist)
        self.method = trained(model)  # what trains, and how it runs forward and is saved
        self.exits = self.method.loss_exits  # layerskip: its exits and its last layer
        self.weights = c.loss.weights(self.exits)  # checked now: before the data is built

        self.data = data = data if data is not None else self._build_data()
        if data.train.shape[1] != c.data.seq_len:
            raise BalconyError(f"data rows have {data.train.shape[1]} tokens but seq_len is {c.data.seq_len}")
        # tokens that never count as recalled (bincount grows past the head's rows if the data does)
        self.common = common_tokens(data.train, model.parts.head.weight.shape[0])
        rows_per_step = c.optim.batch_size * self.dist.world
        if data.train.shape[0] < rows_per_step:
            raise BalconyError(
                f"{data.train.shape[0]} training sequences cannot fill one global batch of {rows_per_step}: "
                "add data, or lower --batch-size or --seq-len"
            )
        self.steps_per_epoch = data.train.shape[0] // rows_per_step // c.optim.grad_accum or 1
        if c.optim.max_steps is not None:
            self.total_steps = c.optim.max_steps
        elif c.optim.max_tokens is not None:
            self.total_steps = max(1, math.ceil(c.optim.max_tokens / self.tokens_per_step))
        else:
            self.total_steps = self.steps_per_epoch

        self.optimizer = torch.optim.AdamW(self.method.trainable.parameters(), lr=c.optim.lr, betas=(0.9, 0.95),
                                           weight_decay=c.optim.weight_decay)
        warmup = max(1, round(c.optim.warmup * self.total_steps)) if c.optim.warmup > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(warmup_cosine, warmup=warmup,
                                                                                   total=self.total_steps))
        self.checkpoints = Checkpoints(self.out, self.method, self.optimizer, self.scheduler, keep=c.checkpoints.keep,
                                       main=self.dist.main)
        self.teacher_cache = None
        if c.loss.teacher_cache:  # rank 0 creates the folder; the others then open it
            self.teacher_cache = self.dist.main_first(lambda: TeacherCache(
                c.loss.teacher_cache, model, data.train, c.loss.kl_topk, c.loss.kl_tail_samples, c.precision, c.seed))
        self.step = 0
        self.validation: dict | None = None  # the latest validation's figures (the model card shows the last)

    def _build_data(self) -> PackedData:
        c, d = self.config, self.config.data
        source = d.source or ("self" if is_default(c.model) else None)
        if source is None:
            raise BalconyError("name training data with --data (a text file, folder, JSONL file, dataset name, or 'self')")
        budget = None
        if c.optim.max_tokens is not None or c.optim.max_steps is not None:
            steps = c.optim.max_steps or math.ceil(c.optim.max_tokens / self.tokens_per_step)
            budget = int(self.tokens_per_step * steps / (1 - d.val_fraction)) + 2 * d.seq_len
        # Rank 0 builds first (it may sample and cache the `self` corpus); the rest then read its cache.
        return self.dist.main_first(lambda: build_dataset(
            source, self.model.tokenizer, d.seq_len, max_tokens=budget, val_fraction=d.val_fraction, model=self.model,
            text_field=d.text_field, corpus_sources=d.corpus_sources.split(",") if d.corpus_sources else None,
            corpus_shards=d.corpus_shards, skip_tokens=d.skip_tokens))

    @property
    def tokens_per_step(self) -> int:
        o = self.config.optim
        return o.batch_size * o.grad_accum * self.config.data.seq_len * self.dist.world

    # ------------------------------------------------------------------ data order

    def _rows(self, step: int, micro: int) -> torch.Tensor:
        """This rank's row indices for (step, micro-batch): a fixed function of the seed and position."""
        batch = self.config.optim.batch_size
        per_global = batch * self.dist.world
        slot = (step * self.config.optim.grad_accum + micro) * per_global  # position in the endless stream of epochs
        n = self.data.train.shape[0] - self.data.train.shape[0] % per_global
        epoch, offset = divmod(slot, n)
        order = torch.randperm(self.data.train.shape[0],
                               generator=torch.Generator().manual_seed(self.config.seed + epoch))[:n]
        start = offset + self.dist.rank * batch
        return order[start : start + batch]

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        enabled = self.config.precision == "bf16"
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _compute_dtype(self):
        return torch.bfloat16 if self.config.precision == "bf16" else torch.float32

    def train_step(self) -> DistillStats:
        c, model = self.config, self.model
        model.train()
        rows = [self._rows(self.step, m) for m in range(c.optim.grad_accum)]
        batches = [self.data.train[r].to(model.device) for r in rows]
        # Every token of a packed row is real; the normalizer is the global token count, so
        # summing gradients over micro-batches and ranks gives the exact global mean.
        normalizer = float(self.dist.sum_(torch.tensor([sum(b.numel() for b in batches)], dtype=torch.float64)).item())
        if c.fsdp:
            normalizer /= self.dist.world  # FSDP's reduce-scatter averages; plain DDP here sums
        stats = DistillStats()
        for m, ids in enumerate(batches):
            stats.add(self._micro_step(m, rows[m], ids, normalizer))
        params = [p for p in self.method.trainable.parameters() if p.grad is not None]
        if not c.fsdp:  # FSDP reduce-scatters its own (summed) gradients
            self.dist.sum_gradients(params)
        if c.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    def _micro_step(self, m: int, rows: torch.Tensor, ids: torch.Tensor, normalizer: float) -> DistillStats:
        """Forward and backward of one micro-batch (rows `rows` of the data, `ids` on the device)."""
        c, loss, model = self.config, self.config.loss, self.model
        top = self._cached_teacher(rows)
        # the sparse KL's vocabulary draws (and layer dropout's): a fixed function of seed, step,
        # micro-batch and rank (exact resume)
        draw = ((c.seed * 1_000_003 + self.step) * 64 + m) * 4096 + self.dist.rank
        with self._autocast():  # a cached teacher: the trunk stops at the deepest exit
            out = self.method.forward(ids, checkpoint=c.activation_checkpointing, teacher=top is None, seed=draw)
        if loss.kl_topk and top is None:
            top = self._teacher_top(out, rows)
        return distill(model, out, None, loss, normalizer=normalizer, compute_dtype=self._compute_dtype(),
                       labels=next_token_labels(ids) if loss.ce_weight else None,
                       recall=recall_positions(ids, self.common) if loss.recall_weight else None,
                       teacher_top=top, sample_seed=draw, student_head=self.method.student_head)

    def _teacher_top(self, out, rows: torch.Tensor) -> TeacherTop:
        """The sparse KL's teacher for `rows` from a pass that ran it, kept in the cache if there is one."""
        loss = self.config.loss
        # each row's remainder draws are its own, cached or not
        top = teacher_topk(self.model, out, None, loss.kl_topk, tail_samples=loss.kl_tail_samples,
                           seeds=[self.config.seed * 1_000_003 + int(r) for r in rows], chunk_tokens=loss.chunk_tokens,
                           compute_dtype=self._compute_dtype())
        if self.teacher_cache:
            self.teacher_cache.put(rows, top)
        return top

    @torch.no_grad()
    def prefill_teacher(self, progress: bool = True) -> int:
        """Teach every row the run will read that the teacher cache lacks, before training, so
        every step reads the cache (and a run's time is its method's alone); returns rows taught."""
        if self.teacher_cache is None:
            raise BalconyError("prefill_teacher fills the teacher cache: set --teacher-cache (with --kl-topk)")
        todo = {}
        for step in range(self.step, self.total_steps):
            for m in range(self.config.optim.grad_accum):
                rows = self._rows(step, m)
                if not self.teacher_cache.has(rows):
                    todo.setdefault(tuple(rows.tolist()), rows)
        for rows in tqdm(todo.values(), desc="teacher", unit="batch", disable=not (progress and self.dist.main)):
            with self._autocast():
                out = self.method.teacher(self.data.train[rows].to(self.model.device))
            self._teacher_top(out, rows)
        self.teacher_cache.flush()
        return sum(len(r) for r in todo.values())

    def _cached_teacher(self, rows: torch.Tensor) -> TeacherTop | None:
        if self.teacher_cache is None:
            return None
        top = self.teacher_cache.get(rows)
        if self.config.fsdp:  # FSDP's forward is collective: skip the teacher only where every rank can
            flag = self.dist.sum_(torch.tensor([float(top is not None)], device=self.model.device))
            top = top if flag.item() == self.dist.world else None
        return top

    @torch.no_grad()
    def validate(self) -> dict:
        """KL(full || exit) and top-1 agreement per exit on the held-out rows (sharded over ranks)."""
        c, model = self.config, self.model
        model.eval()
        val = self.data.val[: c.data.val_sequences]
        batch = c.optim.batch_size
        stats = DistillStats()
        # Every rank runs the same number of forwards (FSDP's all-gathers are collectives);
        # a rank whose share ran out repeats a batch and drops its figures.
        for start in range(0, val.shape[0], batch * self.dist.world):
            mine = start + self.dist.rank * batch
            ids = (val[mine : mine + batch] if mine < val.shape[0] else val[:batch]).to(model.device)
            with self._autocast():
                out = self.method.forward(ids)
            found = distill(model, out, None, c.loss, normalizer=1.0, backward=False, student_head=self.method.student_head,
                            compute_dtype=self._compute_dtype(), recall=recall_positions(ids, self.common))
            if mine < val.shape[0]:
                stats.add(found)
        total = self.dist.sum_(stats.to_tensor(self.exits))
        return DistillStats.from_tensor(total, self.exits).means()

    # ------------------------------------------------------------------ the run

    def fit(self, stop_when: Callable[[Trainer], bool] | None = None) -> BalconyModel:
        """Train to `total_steps` and write the artifact to `out`. `stop_when(trainer)`, asked after
        every step, may stop the run as a signal does: a checkpoint, then TrainingInterrupted."""
        c, main = self.config, self.dist.main
        if c.checkpoints.resume:
            self.step = self.checkpoints.restore(self._identity())
        elif self.checkpoints.exist():
            raise BalconyError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another --out")
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
        self.logger = open_loggers(self.out, c.logging.report_to, asdict(c), main=main)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not (main and c.logging.progress))
        if main and c.loss.kl_topk and not c.loss.teacher_cache and self.total_steps > self.steps_per_epoch:
            bar.write(f"{self.total_steps / self.steps_per_epoch:.1f} epochs over the same rows: --teacher-cache DIR would "
                      "skip the teacher on every visit after a row's first")
        try:
            with StopSignals() as signals:
                self._run(bar, lambda: signals.received is not None or bool(stop_when and stop_when(self)))
                state = full_state(self.method.trainable.state_dict())  # a collective under FSDP: every rank
                if main:
                    self.method.save(self.out, state, training=self.training_record())
                    plot_learning_curve(self.out / METRICS_NAME, self.out / CURVE_NAME)
                self.dist.barrier()
        finally:
            bar.close()
            if self.teacher_cache is not None:
                self.teacher_cache.flush()
            self.logger.close()
            self.dist.close()
        return self.model

    def _run(self, bar, stop_asked: Callable[[], bool]) -> None:
        """The steps from `self.step` to the last, with their logs, validations and checkpoints."""
        c = self.config
        if self.step == 0:
            self.validation = self.validate()
            self.logger.log(0, "val", self.validation)
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            means = self.train_step().means()
            window_tokens += self.tokens_per_step
            rate = window_tokens / (time.perf_counter() - window_start)
            self.logger.log(self.step, "train", {"lr": self.scheduler.get_last_lr()[0], "tokens_per_second": rate,
                                                 "tokens_seen": self.step * self.tokens_per_step, **means})
            bar.set_postfix({f"kl{e}": f"{means[f'kl/{e}']:.3f}" for e in self.exits} | {"tok/s": f"{rate:.0f}"})
            bar.update(1)
            last = self.step == self.total_steps
            if self.step % c.logging.eval_every == 0 or last:
                val = self.validation = self.validate()
                self.logger.log(self.step, "val", {"tokens_seen": self.step * self.tokens_per_step, **val})
                bar.write("step {:>6}  val ".format(self.step) + "  ".join(
                    f"exit {e}: kl {val[f'kl/{e}']:.3f} agree {val[f'agreement/{e}']:.3f}" for e in self.exits))
            if self.step % c.checkpoints.every == 0 and not last:
                self.save_checkpoint()
            if self._should_stop(stop_asked()):
                path = self.save_checkpoint()
                raise TrainingInterrupted(
                    f"training stopped at step {self.step}/{self.total_steps}; checkpoint written to {path}. "
                    "Run the same command with --resume to continue."
                )

    def _should_stop(self, asked: bool) -> bool:
        if self.dist.world > 1:  # a signal may reach one rank only: all stop together, or collectives hang
            return bool(self.dist.sum_(torch.tensor([float(asked)])).item())
        return asked

    def training_record(self) -> Training:
        """What this run did, for the artifact's model card: data, tokens, loss, options, last validation."""
        c, d = self.config, self.config.data
        source = d.source or ("self" if is_default(c.model) else "?")
        data = "`self`: text sampled from the full model itself" if source.startswith("self") else (
            f"`{_named(source)}`")
        data += "".join(f", {words} {value}" for words, value in (
            ("sources", d.corpus_sources), ("shards", d.corpus_shards), ("starting after token", d.skip_tokens)) if value)
        loss = {k: v for k, v in asdict(c.loss).items() if k not in ("chunk_tokens", "teacher_cache")}
        if not c.loss.kl_topk:  # the sparse KL's settings do nothing for the exact KL
            loss = {k: v for k, v in loss.items() if k not in ("kl_samples", "kl_tail_samples")}
        optim = {k: v for k, v in asdict(c.optim).items() if k not in ("max_steps", "max_tokens")}
        options = {**optim, "seq_len": d.seq_len, "precision": c.precision, "seed": c.seed, "processes": self.dist.world,
                   **({"layer_dropout": c.layer_dropout} if c.method == "layerskip" else {"init": c.init}),
                   **({"balcony_layers": c.balcony_layers} if c.balcony_layers not in (None, 1) else {})}
        return Training(data=data + f" ({d.seq_len}-token rows, {d.val_fraction:.0%} held out for validation)",
                        tokens=self.step * self.tokens_per_step, steps=self.step, method=c.method,
                        continued_from=_named(c.init_from), loss=loss, options=options, validation=self.validation)

    # ------------------------------------------------------------------ checkpoints

    def _identity(self) -> dict:
        """What a checkpoint must share with this run to continue it."""
        return {"total_steps": self.total_steps, "exits": self.exits, "data_fingerprint": self.data.fingerprint,
                "tokens_per_step": self.tokens_per_step, "seed": self.config.seed}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically (a temporary folder, then a rename); keep the last N."""
        if self.teacher_cache is not None:
            self.teacher_cache.flush()
        return self.checkpoints.save(self.step, self._identity())


def _named(path: str | None) -> str | None:
    """A folder by its name only (a card says what, not where on this machine); anything else as given."""
    return Path(path).name if path and Path(path).exists() else path


def train(config: TrainConfig | None = None, **options) -> BalconyModel:
    """Train balconies and write the artifact to `config.out` (or to `out` among `options`, flat
    `balcony train` names like lr=...); returns the trained model."""
    config = config or TrainConfig.from_flat(**options)
    return Trainer(config).fit()
