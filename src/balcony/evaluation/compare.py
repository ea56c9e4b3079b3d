"""`balcony compare`: Balcony against LayerSkip and depth pruning, trained on the same tokens.

    balcony compare --methods balcony,layerskip,pruned --tokens 1000000 --out runs/compare \\
        --data recipes/corpus --kl-topk 64 --precision bf16 --tasks table1 --limit 200

Each method trains from the base (`balcony train --method M`) into OUT/M with the same data, seed,
steps and schedule, so every one reads the same token stream; then each is evaluated at every
exit, and at its full model, on held-out text (KL to the original model and top-1 agreement with
it, perplexity) and on the downstream tasks (`evaluate_downstream`, one sweep per task). The
report (`compare_report`) is one table of method x exit, with each method's trained parameters,
training tokens and wall time, and the change of its full model (none for balcony and pruned, by
construction: they never touch the base).

With the sparse KL (`--kl-topk`) the methods share one teacher cache (OUT/teacher-cache): the
teacher is the same frozen base for all, so it runs once, in a pass of its own before any training
(timed apart, so each method's wall time is its own cost).

Every stage is resumable: run the same command again after a stop (Ctrl-C, a kill, a reboot) and
each training continues from its latest checkpoint, finished trainings and evaluations (JSON in
OUT/M) are read back instead of run, and teacher rows already cached are not taught again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.errors import BalconyError
from ..core.model import BalconyModel
from ..core.policy import FULL
from ..default import HELDOUT_TEXT, is_default
from ..training.config import METHODS, LossOptions, TrainConfig
from ..training.data import build_dataset
from ..training.distill import DistillStats, distill, next_token_labels
from ..training.layerskip import LayerSkipModel
from ..training.loggers import METRICS_NAME
from ..training.methods import trainable_parameters, trained
from ..training.trainer import Trainer
from .compare_report import build_report
from .downstream import evaluate_downstream
from .tasks import expand

TEACHER_CACHE = "teacher-cache"
TRAINING = "training.json"
REPORT = "compare.json"


def parse_methods(text: str | list[str]) -> list[str]:
    """The methods named (comma-separated or a list), each once, in order; an unknown one is refused."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise BalconyError(f"--methods takes some of {', '.join(METHODS)}, comma-separated, not {text!r}")
    return list(dict.fromkeys(names))


def compare(out: str, tokens: int, methods: str | list[str] = METHODS, *, heldout: str | None = None,
            tasks: str | None = None, limit: int | None = None, include_path: str | None = None,
            layerskip_lr: float = 5e-5, device: str | None = None, progress: bool = True, **train_options) -> dict:
    """Train every method on the same `tokens` training tokens into `out`/METHOD, evaluate each at
    every exit and its full model, and return (and write to `out`/compare.json) the report.

    `train_options`: `balcony train`'s flat options (model, data, exits, seq_len, batch_size, lr,
    precision, kl_topk, seed, ...), the same for every method but LayerSkip's rate (`layerskip_lr`:
    it trains the whole model). `heldout`: the held-out text (default: the shipped held-out chat
    text for the default model). `tasks`: downstream tasks (`table1`, ...), `limit` documents each.
    """
    methods = parse_methods(methods)
    if tokens < 1:
        raise BalconyError(f"--tokens must be a positive number of training tokens per method, not {tokens}")
    root = Path(out)
    configs = {m: _config(m, root, tokens, layerskip_lr, {**train_options, "progress": progress}) for m in methods}
    for config in configs.values():
        config.check()  # a bad option fails before any work
    heldout = heldout or (str(HELDOUT_TEXT) if is_default(train_options.get("model")) else None)
    if heldout is None:
        raise BalconyError("name held-out text with --heldout (a text file, folder or JSONL): the shipped one is "
                           "the default model's")
    columns = expand([t for t in tasks.split(",") if t]) if tasks else []
    root.mkdir(parents=True, exist_ok=True)
    teacher = _prefill(configs, root, device, progress)
    training = {m: train_method(c, device=device, progress=progress) for m, c in configs.items()}
    _same_stream(training)
    results = {m: evaluate_method(m, Path(c.out), training[m], heldout=heldout, seq_len=c.data.seq_len,
                                  columns=columns, limit=limit, include_path=include_path, device=device,
                                  progress=progress)
               for m, c in configs.items()}
    if columns and all(m == "layerskip" for m in methods):  # the original's own scores: no other sweep has them
        results["original"] = evaluate_original(configs["layerskip"], training["layerskip"], columns, limit,
                                                include_path, device, progress)
    report = build_report(methods, training, results, columns, teacher=teacher, settings={
        "tokens": tokens, "heldout": heldout, "tasks": columns, "limit": limit, "layerskip_lr": layerskip_lr,
        **{k: v for k, v in train_options.items() if k != "progress"}})
    _write_json(root / REPORT, report)
    return report


def _config(method: str, root: Path, tokens: int, layerskip_lr: float, options: dict) -> TrainConfig:
    """`method`'s training config: the shared options, its own folder and (layerskip) its own rate."""
    options = {**options, "method": method, "out": str(root / method), "max_tokens": tokens}
    options.pop("max_steps", None)  # the budget is in tokens, the same for every method
    if method == "layerskip":
        options["lr"] = layerskip_lr
    if options.get("kl_topk"):  # the same frozen teacher for every method: one cache
        options["teacher_cache"] = str(root / TEACHER_CACHE)
    return TrainConfig.from_flat(**options)


def _prefill(configs: dict[str, TrainConfig], root: Path, device: str | None, progress: bool) -> dict | None:
    """Teach every training row into the shared teacher cache (once, timed) before any method trains."""
    first = next(iter(configs.values()))
    if not first.loss.teacher_cache or all(_finished(c) is not None for c in configs.values()):
        return _read_json(root / "teacher.json")
    record = _read_json(root / "teacher.json") or {"rows": 0, "seconds": 0.0}
    print("[compare] teacher: filling the shared teacher cache", file=sys.stderr)
    began = time.perf_counter()
    taught = Trainer(first, device=device).prefill_teacher(progress)
    if taught:
        record = {"rows": record["rows"] + taught, "seconds": record["seconds"] + time.perf_counter() - began}
        _write_json(root / "teacher.json", record)
    return record


def _key(config: TrainConfig) -> dict:
    """What makes a training the same one again (not where its folder is, whether it resumes or
    draws a progress bar)."""
    key = asdict(config)
    for group, name in (("checkpoints", "resume"), ("logging", "progress"), ("loss", "teacher_cache")):
        key[group].pop(name)
    key.pop("out")
    return key


def _finished(config: TrainConfig) -> dict | None:
    """The record of `config`'s finished training, or None; one made with other settings is refused."""
    done = _read_json(Path(config.out) / TRAINING)
    if done is not None and done["key"] != _key(config):
        raise BalconyError(f"{config.out} was trained with other settings: give another --out, or delete {config.out} "
                           "to train it again")
    return done


def train_method(config: TrainConfig, *, device: str | None = None, progress: bool = True) -> dict:
    """Train `config` (continuing from its latest checkpoint), or read back its finished training:
    trained parameters, tokens, steps, wall time, per-exit cost."""
    done = _finished(config)
    if done is not None:
        print(f"[compare] {config.method}: trained already ({config.out})", file=sys.stderr)
        return done
    run = Path(config.out)
    config.checkpoints.resume = any(run.glob("checkpoints/step-*/trainer_state.json"))
    if not config.checkpoints.resume:
        (run / METRICS_NAME).unlink(missing_ok=True)  # a run stopped before its first checkpoint starts afresh
    print(f"[compare] {config.method}: training{' (resumed)' if config.checkpoints.resume else ''} -> {run}",
          file=sys.stderr)
    trainer = Trainer(config, device=device)
    clock = _Clock(run / "clock.json", fresh=not config.checkpoints.resume)
    model = trainer.fit(stop_when=clock.tick)
    record = {"key": _key(config), "method": config.method, "trained_parameters": trainable_parameters(model),
              "tokens": trainer.total_steps * trainer.tokens_per_step, "steps": trainer.total_steps,
              "seconds": clock.total(), "data_fingerprint": trainer.data.fingerprint,
              "costs": {str(e): model.costs.relative(e) for e in model.exits},
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_json(run / TRAINING, record)
    return record


class _Clock:
    """Training wall time that survives restarts: the seconds reached at each step, kept in a file,
    so a resumed run goes on from the time of the step it resumed at (redone steps count once)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.at = {} if fresh else _read_json(path) or {}
        self.began, self.base = time.perf_counter(), None

    def tick(self, trainer: Trainer) -> bool:
        if self.base is None:  # this process's first step: it resumed from the step before
            start = trainer.step - 1
            self.at = {k: v for k, v in self.at.items() if int(k) <= start}
            self.base = max(self.at.values(), default=0.0)
        self.at[str(trainer.step)] = self.total()
        _write_json(self.path, self.at)
        return False  # never stops the run

    def total(self) -> float:
        return (self.base or 0.0) + time.perf_counter() - self.began


def _same_stream(training: dict[str, dict]) -> None:
    found = {m: (t["data_fingerprint"], t["tokens"]) for m, t in training.items()}
    if len(set(found.values())) > 1:
        raise BalconyError(f"the methods did not train on the same tokens ({found}): give one --out per comparison")


def load_method(method: str, run: Path, device: str | None = None) -> BalconyModel | LayerSkipModel:
    """A trained method's artifact: LayerSkip's student beside its original, or balconies on their base."""
    if method == "layerskip":
        return LayerSkipModel.from_pretrained(run, device=device)
    return BalconyModel.from_pretrained(run, device=device)


def evaluate_method(method: str, run: Path, training: dict, *, heldout: str, seq_len: int, columns: list[str],
                    limit: int | None, include_path: str | None, device: str | None = None,
                    progress: bool = True) -> dict:
    """Held-out quality and each downstream task's accuracy of one trained method, each read back
    from OUT/M when it was computed for this training and these settings."""
    loaded: list = []

    def model():
        if not loaded:
            loaded.append(load_method(method, run, device))
        return loaded[0]

    stamp = training["finished"]
    result = {"heldout": _cached(run / "heldout.json", {"training": stamp, "heldout": heldout, "seq_len": seq_len},
                                 lambda: held_out(model(), heldout, seq_len, progress=progress), f"{method}: held-out")}
    result["downstream"] = {
        column: _cached(run / "downstream" / f"{column}.json",
                        {"training": stamp, "limit": limit, "include_path": include_path},
                        lambda column=column: sweep_column(model(), column, limit, include_path, progress),
                        f"{method}: downstream {column}")
        for column in columns}
    return result


def evaluate_original(config: TrainConfig, training: dict, columns: list[str], limit: int | None,
                      include_path: str | None, device: str | None, progress: bool) -> dict:
    """The original model's downstream scores (its full row), from a sweep of its own."""
    run = Path(config.out).parent / "original"
    loaded: list = []

    def model():
        if not loaded:
            base = load_method("layerskip", Path(config.out), device)
            loaded.append(BalconyModel.from_base(base.base, exits=base.exits, tokenizer=base.tokenizer))
        return loaded[0]

    return {"downstream": {column: _cached(run / "downstream" / f"{column}.json",
                                           {"training": training["finished"], "limit": limit,
                                            "include_path": include_path},
                                           lambda column=column: sweep_column(model(), column, limit, include_path,
                                                                              progress), f"original: downstream {column}")
                           for column in columns}}


@torch.no_grad()
def held_out(model: BalconyModel | LayerSkipModel, data: str, seq_len: int, *, batch_size: int = 4,
             progress: bool = True) -> dict:
    """KL(original || method), top-1 agreement with the original and perplexity at every exit (and
    LayerSkip's full model, `full`), on held-out text packed into `seq_len` rows."""
    rows = build_dataset(data, model.tokenizer, seq_len, val_fraction=0.0).train
    method = trained(model)
    model.eval()
    stats = DistillStats()
    for start in tqdm(range(0, rows.shape[0], batch_size), desc="held-out", unit="batch", disable=not progress):
        ids = rows[start : start + batch_size].to(model.device)
        stats.add(distill(model, method.forward(ids), None, LossOptions(), normalizer=1.0, backward=False,
                          labels=next_token_labels(ids), student_head=method.student_head))
    per_exit = {FULL if e == model.num_layers else str(e): {
        "kl": stats.kl[e] / stats.tokens, "agreement": stats.agree[e] / stats.tokens,
        "perplexity": math.exp(stats.ce[e] / stats.label_tokens)} for e in method.loss_exits}
    return {"tokens": int(stats.tokens), "original_perplexity": math.exp(stats.teacher_ce / stats.label_tokens),
            "exits": per_exit}


def sweep_column(model: BalconyModel | LayerSkipModel, column: str, limit: int | None, include_path: str | None,
                 progress: bool = True) -> dict:
    """One downstream column for a method's full model and its exits (and, for balconies, the
    untrained early exit and truncation at the same depths, which the same pass scores)."""
    sweep, family = model, "balcony"
    if isinstance(model, LayerSkipModel):
        # its exit e: the student's first e layers, final norm and head, the sweep's "early exit"
        # of a BalconyModel on the student (whose own balconies are left unread)
        sweep, family = BalconyModel.from_base(model.student, exits=model.exits, tokenizer=model.tokenizer), "early_exit"
    report = evaluate_downstream(sweep, [column], limit=limit, include_path=include_path, progress=progress)
    accuracy, untrained = {}, {}
    for row in report["rows"]:
        where = FULL if row["method"] == FULL else str(row["exit"])
        if row["method"] in (FULL, family):
            accuracy[where] = row["accuracy"][column]
        elif family == "balcony":
            untrained.setdefault(row["method"], {})[where] = row["accuracy"][column]
    return {"accuracy": accuracy, "untrained": untrained, "chance": report["chance"][column],
            "documents": report["documents"][column], "metric": report["metric"][column],
            "seconds": report["seconds"]}


def _cached(path: Path, key: dict, compute, what: str) -> dict:
    """`compute()`'s result, kept in `path` with `key`: read back while the key is the same."""
    found = _read_json(path)
    if found is not None and found.get("key") == key:
        print(f"[compare] {what}: done already", file=sys.stderr)
        return found["result"]
    print(f"[compare] {what}", file=sys.stderr)
    result = compute()
    _write_json(path, {"key": key, "result": result})
    return result


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # absent, or torn by a kill: computed again
        return None


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file, then a rename (a kill leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
