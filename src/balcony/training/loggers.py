"""Where training metrics go: OUT/metrics.jsonl always, and tensorboard or wandb on request.

Each logger takes `log(step, split, metrics)` ("train" or "val" records) and `close()`;
`open_loggers` gives the main rank every logger the run asks for, and the other ranks none
(rank 0 alone writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from ..core.errors import BalconyError

METRICS_NAME = "metrics.jsonl"


class Logger(Protocol):
    def log(self, step: int, split: str, metrics: dict) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """One JSON object per record, appended (a resumed run continues the same file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def log(self, step: int, split: str, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BalconyError("--report-to tensorboard needs `pip install tensorboard`") from None
        self.writer = SummaryWriter(str(folder))

    def log(self, step: int, split: str, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, config: dict):
        try:
            import wandb
        except ImportError:
            raise BalconyError("--report-to wandb needs `pip install wandb`") from None
        self.run = wandb.init(project="balcony", config=config)

    def log(self, step: int, split: str, metrics: dict) -> None:
        self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Several loggers as one."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, step: int, split: str, metrics: dict) -> None:
        for logger in self.loggers:
            logger.log(step, split, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_loggers(out: str | Path, report_to: str | None, config: dict, *, main: bool = True) -> Loggers:
    """metrics.jsonl in `out`, plus `report_to` ("none", "tensorboard" or "wandb"; `config` is what
    wandb records of the run); nothing on ranks other than the main one."""
    if not main:
        return Loggers([])
    loggers: list[Logger] = [JsonlLogger(Path(out) / METRICS_NAME)]
    if report_to == "tensorboard":
        loggers.append(TensorBoardLogger(Path(out) / "tensorboard"))
    elif report_to == "wandb":
        loggers.append(WandbLogger(config))
    elif report_to not in (None, "", "none"):
        raise BalconyError(f"--report-to takes none, tensorboard or wandb, not {report_to!r}")
    return Loggers(loggers)
