"""Checkpoints a run continues from exactly, written atomically, with no pickle in them.

    OUT/checkpoints/step-00000300/
        balcony_config.json, balcony_model.safetensors   the balconies (a loadable artifact; for
                                                          `--method layerskip`, its artifact)
        optimizer.safetensors                             AdamW's moments, the torch (and CUDA) RNG
        trainer_state.json                                step, schedule, Python's RNG, the run's identity

The step fixes the data position (the row order is a function of the seed and the step). Each
checkpoint is written to a hidden temporary folder and renamed into place, so a crash leaves
the previous checkpoints whole. Resuming checks the run's identity (exits, data, batch, seed,
length) so a checkpoint never continues a different run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import BalconyError
from .distributed import full_state, placed_like

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
# trainer_state.json's layout. Checkpoints written before it was recorded have this layout too.
FORMAT = 1
_STATE_KEYS = ("step", "param_groups", "scheduler", "rng_python")


class Checkpoints:
    """OUT/checkpoints of one run: save the training state, or restore the latest saved. `trained`
    is what the method trains (`methods.trained`): its `trainable` module, `save` and `load`."""

    def __init__(self, out: str | Path, trained, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, keep: int, main: bool = True):
        self.root = Path(out) / CHECKPOINTS
        self.trained, self.optimizer, self.scheduler = trained, optimizer, scheduler
        self.keep, self.main = keep, main

    def exist(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())

    def save(self, step: int, run: dict) -> Path:
        """Write step-N (a temporary folder, then a rename) and keep the latest `keep`. Every rank
        calls it (gathering FSDP shards is collective); only the main rank writes. `run`: what
        identifies the run, checked on resume."""
        final = self.root / f"step-{step:08d}"
        weights = full_state(self.trained.trainable.state_dict())
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: full_state(v) for i, v in optimizer["state"].items()}
        if not self.main:
            return final
        tmp = self.root / f".tmp-step-{step:08d}"
        try:
            self._write(tmp, weights, optimizer, step, run)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as err:  # a full disk, a lost mount: what is on disk is still whole
            shutil.rmtree(tmp, ignore_errors=True)
            kept = sorted(p.name for p in self.root.glob("step-*")) if self.root.is_dir() else []
            raise BalconyError(f"could not write the checkpoint {final} ({err}); "
                               + (f"the previous checkpoint {self.root / kept[-1]} is intact: free space and run "
                                  "again with --resume" if kept else "no earlier checkpoint exists: free space and "
                                  "start again")) from err
        kept = sorted(p for p in self.root.iterdir() if p.name.startswith("step-"))
        for old in kept[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write(self, tmp: Path, weights: dict, optimizer: dict, step: int, run: dict) -> None:
        """Everything of step `step` into the folder `tmp` (made afresh)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step-*"):  # left by a run killed inside a write
            shutil.rmtree(stale)
        tmp.mkdir()
        self.trained.save(tmp, weights, card=False)  # the model card belongs to the finished artifact
        tensors, groups = _flatten_optimizer(optimizer)
        tensors["rng/torch"] = torch.random.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {"format": FORMAT, "step": step, **run, "param_groups": groups, "scheduler": scheduler,
                 "rng_python": _json_rng(random.getstate())}
        (tmp / STATE_NAME).write_text(json.dumps(state) + "\n")

    def restore(self, run: dict) -> int:
        """Load the latest checkpoint into the model, optimizer, scheduler and RNGs; returns its step."""
        candidates = sorted(p for p in self.root.glob("step-*") if (p / STATE_NAME).is_file()) if self.root.is_dir() else []
        if not candidates:
            raise BalconyError(f"--resume: no checkpoint in {self.root}; start without --resume")
        path = candidates[-1]
        state = _read_state(path, run)
        self.trained.load(path)
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
        return state["step"]


def _read_state(path: Path, run: dict) -> dict:
    """trainer_state.json, refused (saying why and what to do) unless it continues this run."""
    state = json.loads((path / STATE_NAME).read_text())
    found = state.get("format", FORMAT)
    if found != FORMAT:
        raise BalconyError(f"--resume: {path} is checkpoint format {found}, this balcony reads format {FORMAT}; "
                           "resume with the balcony version that wrote it, or start a new --out")
    missing = [k for k in (*_STATE_KEYS, *run) if k not in state]
    if missing:
        raise BalconyError(f"--resume: {path / STATE_NAME} lacks {', '.join(missing)}: it is no complete balcony "
                           "checkpoint; delete that folder to resume from an earlier one, or start a new --out")
    mismatches = [f"{name}: checkpoint {state[name]!r} vs now {now!r}" for name, now in run.items() if state[name] != now]
    if mismatches:
        raise BalconyError(f"--resume: {path} was written by a different run ({'; '.join(mismatches)}); "
                           "resume with the same options and data, or start a new --out")
    return state


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
        state.setdefault(int(index), {})[key] = value if key == "step" else placed_like(value, params[int(index)])
    return {"state": state, "param_groups": groups}


def _json_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng(data: list):
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
