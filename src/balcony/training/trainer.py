"""Train balconies by self-distillation against the frozen base: one machine or many.

    balcony train --model default --exits 15,20,25 --data self --out runs/smollm2

Per step: one no-grad pass of the frozen trunk gives every exit's hidden state and the
teacher; each balcony runs on its exit; the chunked KL (distill.py) backpropagates into the
balconies only. AdamW, cosine schedule with warm-up, gradient clipping and accumulation.

Runs under `torchrun` / `accelerate launch` unchanged: with WORLD_SIZE > 1 every rank takes
its slice of each global batch, balcony gradients (and only those) are summed across ranks
with one all-reduce per step, and rank 0 alone writes. Checkpoints are atomic folders with
no pickle in them; `resume=True` continues exactly (optimiser, schedule, RNG, data
position); SIGINT/SIGTERM write a checkpoint before exiting.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.config import WEIGHTS_NAME, BalconyConfig
from ..core.errors import BalconyError
from ..core.model import BalconyModel
from ..default import is_default
from .data import PackedData, build_dataset
from .distill import (DistillStats, TeacherTop, common_tokens, distill, next_token_labels, recall_positions,
                      teacher_topk)
from .teacher_cache import TeacherCache

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "learning_curve.png"  # validation agreement and KL per exit against training tokens


class TrainingInterrupted(BalconyError, KeyboardInterrupt):
    """Training stopped by a signal after writing a checkpoint; `resume=True` continues it."""


@dataclass
class TrainConfig:
    out: str
    model: str | None = None  # base: hub id, path, or None/"default" for the embedded model
    exits: list[int] | None = None  # None: about 1/2, 2/3 and 5/6 of the depth
    init: str = "copy"
    init_from: str | None = None  # start from these trained balconies (an artifact) instead of fresh ones
    # decoder layers per balcony, or {exit: n}; None: 1, or init_from's. More than init_from's grows it.
    balcony_layers: int | dict | None = None
    data: str | None = None  # None: "self" (text sampled from the model) for the default model
    text_field: str = "text"
    corpus_sources: str | None = None  # comma-separated: train on these sources of a corpus folder only
    corpus_shards: str | None = None  # shard numbers of a corpus folder, e.g. "93-97" or "93-": those only
    skip_tokens: int = 0  # start this far into the data's token stream (past what an earlier run read)
    seq_len: int = 512
    batch_size: int = 4  # sequences per micro-batch on each process
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None  # training budget in tokens (instead of steps); None and no steps: one epoch
    lr: float = 3e-4  # paper: 5e-4 at ~1M tokens/step; smaller batches take a smaller rate
    warmup: float = 0.01  # fraction of the steps (paper: 1%)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    exit_weights: list[float] | None = None  # None: mean over exits
    ce_weight: float = 0.0  # paper: 0
    top1_weight: float = 0.0  # cross-entropy against the teacher's top-1 token (what greedy decoding follows)
    # extra loss weight where the next token is a less common one already in the row (in-context
    # recall, what LAMBADA asks); validation reports agreement there either way
    recall_weight: float = 0.0
    precision: str = "fp32"  # or "bf16" autocast for the trunk, balconies and head (KL stays fp32)
    chunk_tokens: int = 512
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
    activation_checkpointing: bool = False
    val_fraction: float = 0.05
    val_sequences: int = 64  # cap on held-out sequences per validation
    eval_every: int = 50
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    report_to: str = "none"  # "tensorboard" or "wandb"
    fsdp: bool = False  # shard base and balcony layers over the ranks (FSDP2), for bases too big for one device
    resume: bool = False
    progress: bool = True
    # test hook: stop (as if interrupted) after this many steps, writing a checkpoint
    stop_after: int | None = field(default=None, repr=False)

    def check(self) -> None:
        """Refuse settings no run can use, naming the setting."""
        if self.precision not in ("fp32", "bf16"):
            raise BalconyError(f"precision must be fp32 or bf16, not {self.precision!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "chunk_tokens", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise BalconyError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise BalconyError(f"lr must be positive, not {self.lr}")
        if self.skip_tokens < 0:
            raise BalconyError(f"skip_tokens must be 0 or more, not {self.skip_tokens}")
        for name in ("ce_weight", "top1_weight", "recall_weight"):
            if getattr(self, name) < 0:
                raise BalconyError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.kl_tail_samples < 0:
            raise BalconyError(f"kl_tail_samples must be 0 or more, not {self.kl_tail_samples}")
        if self.kl_topk < 0 or (self.kl_topk and self.kl_samples < 1):
            raise BalconyError(f"kl_topk must be 0 (exact KL) or positive with kl_samples >= 1, not {self.kl_topk} / "
                               f"{self.kl_samples}")
        if self.kl_topk and self.ce_weight:
            raise BalconyError("the sparse KL (--kl-topk) has no cross-entropy term: drop --ce-weight or use --kl-topk 0")
        if self.teacher_cache and not self.kl_topk:
            raise BalconyError("--teacher-cache keeps the sparse KL's top k: set --kl-topk (the exact KL needs every logit)")


# ----------------------------------------------------------------------------- distributed


class _Dist:
    """Rank bookkeeping; a no-op on a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str:
        if requested:
            return requested
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the loop


def _warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, config: TrainConfig, model: BalconyModel | None = None, data: PackedData | None = None,
                 device: str | None = None):
        self.config = c = config
        self.dist = _Dist()
        self.out = Path(c.out)
        c.check()
        if model is None and c.init_from is not None:
            model = _init_from(c, self.dist.device(device))
        if model is None:
            try:
                model = BalconyModel.from_base(c.model, exits=c.exits, init=c.init, balcony_layers=c.balcony_layers or 1,
                                               device=self.dist.device(device))
            except ValueError as err:  # a bad balcony_layers, named by BalconyConfig
                raise BalconyError(str(err)) from err
        if c.fsdp:
            _shard(model, self.dist)
        self.model = model
        self.exits = model.exits
        if c.exit_weights is not None and len(c.exit_weights) != len(self.exits):
            raise BalconyError(f"{len(c.exit_weights)} exit weights given for {len(self.exits)} exits {self.exits}")
        weights = c.exit_weights or [1.0 / len(self.exits)] * len(self.exits)
        self.weights = dict(zip(self.exits, weights))

        if data is None:
            data = self._build_data()
        if data.train.shape[1] != c.seq_len:
            raise BalconyError(f"data rows have {data.train.shape[1]} tokens but seq_len is {c.seq_len}")
        self.data = data
        # tokens that never count as recalled (bincount grows past the head's rows if the data does)
        self.common = common_tokens(data.train, model.parts.head.weight.shape[0])
        rows_per_step = c.batch_size * self.dist.world
        if data.train.shape[0] < rows_per_step:
            raise BalconyError(
                f"{data.train.shape[0]} training sequences cannot fill one global batch of {rows_per_step}: "
                "add data, or lower --batch-size or --seq-len"
            )
        self.steps_per_epoch = data.train.shape[0] // rows_per_step // c.grad_accum or 1
        if c.max_steps is not None:
            self.total_steps = c.max_steps
        elif c.max_tokens is not None:
            self.total_steps = max(1, math.ceil(c.max_tokens / self.tokens_per_step))
        else:
            self.total_steps = self.steps_per_epoch

        params = [p for p in model.balconies.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay)
        warmup = max(1, round(c.warmup * self.total_steps)) if c.warmup > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(_warmup_cosine, warmup=warmup,
                                                                                   total=self.total_steps))
        self.teacher_cache = None
        if c.teacher_cache:  # rank 0 creates the folder; the others then open it
            self.teacher_cache = self._main_first(lambda: TeacherCache(c.teacher_cache, model, data.train, c.kl_topk,
                                                                       c.kl_tail_samples, c.precision, c.seed))
        self.step = 0
        self._stop_signal = None
        self._writer = None

    def _build_data(self) -> PackedData:
        c = self.config
        source = c.data or ("self" if is_default(c.model) else None)
        if source is None:
            raise BalconyError("name training data with --data (a text file, folder, JSONL file, dataset name, or 'self')")
        budget = None
        if c.max_tokens is not None or c.max_steps is not None:
            budget = self.tokens_per_step * (c.max_steps or math.ceil(c.max_tokens / self.tokens_per_step))
            budget = int(budget / (1 - c.val_fraction)) + 2 * c.seq_len
        # Rank 0 builds first (it may sample and cache the `self` corpus); the rest then read its cache.
        return self._main_first(lambda: build_dataset(
            source, self.model.tokenizer, c.seq_len, max_tokens=budget, val_fraction=c.val_fraction, model=self.model,
            text_field=c.text_field, corpus_sources=c.corpus_sources.split(",") if c.corpus_sources else None,
            corpus_shards=c.corpus_shards, skip_tokens=c.skip_tokens))

    def _main_first(self, make):
        """`make()` on rank 0, then on the other ranks (which may read what rank 0 wrote)."""
        made = None
        for turn in ("main", "others"):
            if (turn == "main") == self.dist.main:
                made = make()
            if self.dist.world > 1:
                dist.barrier()
        return made

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * c.seq_len * self.dist.world

    # ------------------------------------------------------------------ data order

    def _rows(self, step: int, micro: int) -> torch.Tensor:
        """This rank's row indices for (step, micro-batch): a fixed function of the seed and position."""
        c = self.config
        per_global = c.batch_size * self.dist.world
        slot = (step * c.grad_accum + micro) * per_global  # position in the endless stream of epochs
        n = self.data.train.shape[0] - self.data.train.shape[0] % per_global
        epoch, offset = divmod(slot, n)
        order = torch.randperm(self.data.train.shape[0], generator=torch.Generator().manual_seed(c.seed + epoch))[:n]
        start = offset + self.dist.rank * c.batch_size
        return order[start : start + c.batch_size]

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        enabled = self.config.precision == "bf16"
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _compute_dtype(self):
        return torch.bfloat16 if self.config.precision == "bf16" else torch.float32

    def train_step(self) -> DistillStats:
        c, model = self.config, self.model
        model.train()
        rows = [self._rows(self.step, m) for m in range(c.grad_accum)]
        batches = [self.data.train[r].to(model.device) for r in rows]
        # Every token of a packed row is real; the normalizer is the global token count, so
        # summing gradients over micro-batches and ranks gives the exact global mean.
        normalizer = float(self.dist.sum_(torch.tensor([sum(b.numel() for b in batches)], dtype=torch.float64)).item())
        if c.fsdp:
            normalizer /= self.dist.world  # FSDP's reduce-scatter averages; plain DDP here sums
        stats = DistillStats()
        for m, ids in enumerate(batches):
            top = self._cached_teacher(rows[m])
            with self._autocast():  # a cached teacher: the trunk stops at the deepest exit
                out = model.forward_exits(ids, checkpoint=c.activation_checkpointing, teacher=top is None)
            if c.kl_topk and top is None:  # each row's remainder draws are its own, cached or not
                top = teacher_topk(model, out, None, c.kl_topk, tail_samples=c.kl_tail_samples,
                                   seeds=[c.seed * 1_000_003 + int(r) for r in rows[m]], chunk_tokens=c.chunk_tokens,
                                   compute_dtype=self._compute_dtype())
                if self.teacher_cache:
                    self.teacher_cache.put(rows[m], top)
            labels = next_token_labels(ids) if c.ce_weight else None
            recall = recall_positions(ids, self.common) if c.recall_weight else None
            # the sparse KL's vocabulary draws: a fixed function of seed, step, micro-batch and rank (exact resume)
            draw = ((c.seed * 1_000_003 + self.step) * 64 + m) * 4096 + self.dist.rank
            stats.add(distill(model, out, None, weights=self.weights, normalizer=normalizer, ce_weight=c.ce_weight,
                              labels=labels, chunk_tokens=c.chunk_tokens, compute_dtype=self._compute_dtype(),
                              topk=c.kl_topk, vocab_samples=c.kl_samples, sample_seed=draw, teacher_top=top,
                              top1_weight=c.top1_weight, recall=recall, recall_weight=c.recall_weight))
        params = [p for p in model.balconies.parameters() if p.grad is not None]
        if self.dist.world > 1 and not c.fsdp:  # FSDP reduce-scatters its own (summed) gradients
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            self.dist.sum_(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

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
        val = self.data.val[: c.val_sequences]
        stats = DistillStats()
        stride = c.batch_size * self.dist.world
        # Every rank runs the same number of forwards (FSDP's all-gathers are collectives);
        # a rank whose share ran out repeats a batch and drops its figures.
        for start in range(0, val.shape[0], stride):
            mine = start + self.dist.rank * c.batch_size
            ids = (val[mine : mine + c.batch_size] if mine < val.shape[0] else val[: c.batch_size]).to(model.device)
            with self._autocast():
                out = model.forward_exits(ids)
            batch = distill(model, out, None, weights=self.weights, normalizer=1.0, backward=False,
                            chunk_tokens=c.chunk_tokens, compute_dtype=self._compute_dtype(),
                            recall=recall_positions(ids, self.common))
            if mine < val.shape[0]:
                stats.add(batch)
        total = self.dist.sum_(stats.to_tensor(self.exits))
        return DistillStats.from_tensor(total, self.exits).means()

    # ------------------------------------------------------------------ the run

    def fit(self) -> BalconyModel:
        c = self.config
        main = self.dist.main
        if c.resume:
            self._load_latest_checkpoint()
        elif (self.out / CHECKPOINTS).is_dir() and any((self.out / CHECKPOINTS).iterdir()):
            raise BalconyError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another --out")
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            self._open_reporter()
        previous = self._install_signal_handlers()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not (main and c.progress))
        if main and c.kl_topk and not c.teacher_cache and self.total_steps > self.steps_per_epoch:
            bar.write(f"{self.total_steps / self.steps_per_epoch:.1f} epochs over the same rows: --teacher-cache DIR would "
                      "skip the teacher on every visit after a row's first")
        try:
            if self.step == 0:
                self._log({"step": 0, "split": "val", **self.validate()})
            window_tokens, window_start = 0, time.perf_counter()
            while self.step < self.total_steps:
                stats = self.train_step()
                means = stats.means()
                window_tokens += self.tokens_per_step
                rate = window_tokens / (time.perf_counter() - window_start)
                record = {"step": self.step, "split": "train", "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_second": rate, "tokens_seen": self.step * self.tokens_per_step, **means}
                self._log(record)
                bar.set_postfix({f"kl{e}": f"{means[f'kl/{e}']:.3f}" for e in self.exits} | {"tok/s": f"{rate:.0f}"})
                bar.update(1)
                last = self.step == self.total_steps
                if self.step % c.eval_every == 0 or last:
                    val = self.validate()
                    self._log({"step": self.step, "split": "val", "tokens_seen": self.step * self.tokens_per_step, **val})
                    bar.write("step {:>6}  val ".format(self.step) + "  ".join(
                        f"exit {e}: kl {val[f'kl/{e}']:.3f} agree {val[f'agreement/{e}']:.3f}" for e in self.exits))
                if self.step % c.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
                if self._should_stop():
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"training stopped at step {self.step}/{self.total_steps}; checkpoint written to {path}. "
                        "Run the same command with --resume to continue."
                    )
            state = _full_state(self.model.balconies.state_dict())  # a collective under FSDP: every rank
            if main:
                self.model.save_pretrained(self.out, state_dict=state)
                plot_learning_curve(self.out / METRICS_NAME, self.out / CURVE_NAME)
            if self.dist.world > 1:
                dist.barrier()
        finally:
            bar.close()
            if self.teacher_cache is not None:
                self.teacher_cache.flush()
            self._restore_signal_handlers(previous)
            if self._writer is not None:
                self._writer.close()
            self.dist.close()
        return self.model

    def _should_stop(self) -> bool:
        stop = self._stop_signal is not None or (self.config.stop_after is not None and self.step >= self.config.stop_after)
        if self.dist.world > 1:  # a signal may reach one rank only: all stop together, or collectives hang
            stop = bool(self.dist.sum_(torch.tensor([float(stop)])).item())
        return stop

    # ------------------------------------------------------------------ logs

    def _log(self, record: dict) -> None:
        if not self.dist.main:
            return
        with (self.out / METRICS_NAME).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            self._writer(record)

    def _open_reporter(self) -> None:
        kind = self.config.report_to
        if kind in (None, "", "none"):
            return
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise BalconyError("--report-to tensorboard needs `pip install tensorboard`") from None
            writer = SummaryWriter(str(self.out / "tensorboard"))

            def write(record):
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(f"{record['split']}/{k}", v, record["step"])

            write.close = writer.close
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise BalconyError("--report-to wandb needs `pip install wandb`") from None
            run = wandb.init(project="balcony", config=asdict(self.config))

            def write(record):
                run.log({f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                        step=record["step"])

            write.close = run.finish
        else:
            raise BalconyError(f"--report-to takes none, tensorboard or wandb, not {kind!r}")
        self._writer = write

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum
            # a second Ctrl-C stops at once
            signal.signal(signum, previous.get(signum) or signal.SIG_DFL)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, old in (previous or {}).items():
            signal.signal(sig, old)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically (a temporary folder, then a rename); keep the last N."""
        root = self.out / CHECKPOINTS
        final = root / f"step-{self.step:08d}"
        weights = _full_state(self.model.balconies.state_dict())  # collectives under FSDP: every rank takes part
        if self.teacher_cache is not None:
            self.teacher_cache.flush()
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: _full_state(v) for i, v in optimizer["state"].items()}
        if not self.dist.main:
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{self.step:08d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.model.save_pretrained(tmp, state_dict=weights)
        tensors, groups = _flatten_optimizer(optimizer)
        tensors["rng/torch"] = torch.random.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "exits": self.exits,
            "data_fingerprint": self.data.fingerprint,
            "tokens_per_step": self.tokens_per_step,
            "seed": self.config.seed,
            "param_groups": groups,
            "scheduler": scheduler,
            "rng_python": _json_rng(random.getstate()),
        }
        (tmp / STATE_NAME).write_text(json.dumps(state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_latest_checkpoint(self) -> None:
        root = self.out / CHECKPOINTS
        candidates = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
        if not candidates:
            raise BalconyError(f"--resume: no checkpoint in {root}; start without --resume")
        path = candidates[-1]
        state = json.loads((path / STATE_NAME).read_text())
        mismatches = [
            f"{name}: checkpoint {state[name]!r} vs now {now!r}"
            for name, now in (("exits", self.exits), ("data_fingerprint", self.data.fingerprint),
                              ("tokens_per_step", self.tokens_per_step), ("seed", self.config.seed),
                              ("total_steps", self.total_steps))
            if state[name] != now
        ]
        if mismatches:
            raise BalconyError(f"--resume: {path} was written by a different run ({'; '.join(mismatches)}); "
                               "resume with the same options and data, or start a new --out")
        weights = load_file(str(path / WEIGHTS_NAME))
        current = self.model.balconies.state_dict()
        self.model.balconies.load_state_dict({k: _like(v, current[k]) for k, v in weights.items()})
        tensors = load_file(str(path / OPTIMIZER_NAME))
        torch.random.set_rng_state(tensors.pop("rng/torch"))
        cuda_rng = tensors.pop("rng/cuda", None)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"], params))
        scheduler = self.scheduler.state_dict()
        scheduler.update(state["scheduler"])
        self.scheduler.load_state_dict(scheduler)
        random.setstate(_python_rng(state["rng_python"]))
        self.step = state["step"]


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"state/{index}/{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list, params: list[torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value if key == "step" else _like(value, params[int(index)])
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- FSDP


def _shard(model: BalconyModel, ranks: _Dist) -> None:
    """FSDP2: shard every base layer (frozen: only all-gathered for the forward) and every balcony.

    The embeddings and the head stay whole on each rank: the chunked loss multiplies by the
    head's weight directly. FSDP averages gradients over ranks (gloo has no pre-scaled sum),
    so under FSDP the loss normaliser is divided by the world size to keep the global mean.
    """
    from torch.distributed.fsdp import fully_shard

    if ranks.world < 2:
        raise BalconyError("--fsdp shards over processes: start it with torchrun --nproc-per-node N (N >= 2)")
    for layer in model.parts.layers:
        fully_shard(layer)
    for balcony in model.balconies.values():
        for layer in balcony.layers:
            fully_shard(layer)
        fully_shard(balcony.norm)


def _init_from(c: TrainConfig, device: str | None) -> BalconyModel:
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


def _full_state(state: dict) -> dict:
    """Plain tensors from a state dict that may hold FSDP-sharded DTensors (gathering them)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def _like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` placed like `reference`: the same device, and sharded the same way under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full.to(reference.device)


def _json_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng(data: list):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def plot_learning_curve(metrics: str | Path, path: str | Path) -> None:
    """Validation top-1 agreement and KL per exit against training tokens, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    val = [r for r in records if r.get("split") == "val"]
    exits = sorted({int(k.split("/")[1]) for r in val for k in r if k.startswith("agreement/")})
    if not exits:
        return
    fig, (agree, kl) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for e in exits:
        points = [(r.get("tokens_seen", 0) / 1e6, r[f"agreement/{e}"], r[f"kl/{e}"]) for r in val if f"agreement/{e}" in r]
        tokens = [p[0] for p in points]
        agree.plot(tokens, [p[1] for p in points], "o-", label=f"exit {e}")
        kl.plot(tokens, [p[2] for p in points], "o-", label=f"exit {e}")
    agree.set_ylabel("top-1 agreement with the full model")
    kl.set_ylabel("KL(full || exit), nats/token")
    kl.set_yscale("log")
    for ax in (agree, kl):
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("balcony: held-out validation during training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(config: TrainConfig | None = None, **options) -> BalconyModel:
    """Train balconies and write the artifact to `config.out`; returns the trained model."""
    config = config or TrainConfig(**options)
    return Trainer(config).fit()
