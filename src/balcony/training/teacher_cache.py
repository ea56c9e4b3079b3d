"""The teacher's top-k next tokens per training row, kept on disk so later epochs skip the teacher.

Of the full model, the sparse KL needs only each position's k most likely next tokens and
their log-probabilities. The base is frozen, so those depend on the row alone: the first visit
of a row writes them here, and every later visit (the next epoch, a resumed run, the next run
on the same corpus) reads them back. The trunk then stops at the deepest exit and the teacher's
head is not run at all: on the default model that is five of 30 layers and a 49k-row head,
a quarter of a sparse step.

Rows are addressed by their position in the packed data, and the folder by everything the
values depend on (base weights, precision, k, remainder draws, the rows themselves), so a grown
corpus or another base gets a fresh cache instead of a stale one. Values are stored exactly (fp32
log-probs; token ids as uint16 when the vocabulary fits), and a row's remainder draws are a
function of the row, so a cached step equals an uncached one. Each row carries a crc32 of its
values: a row damaged on disk is taught again, never read as a different teacher.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from ..core.config import fingerprint_weights
from ..core.model import BalconyModel
from .distill import TeacherTop


class TeacherCache:
    """Memory-mapped [rows, seq, k] arrays in `root/<key>/`; several ranks of one machine may share it
    (they write different rows)."""

    def __init__(self, root: str | Path, model: BalconyModel, rows: torch.Tensor, k: int, tail_samples: int,
                 precision: str, seed: int):
        n, seq = rows.shape
        vocab = model.base.config.vocab_size
        self.k = k
        key = {"base": fingerprint_weights(model.base), "precision": precision, "k": k, "tail_samples": tail_samples,
               "seed": seed, "rows": list(rows.shape),
               "rows_sha256": hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        ids = np.uint16 if vocab <= 65536 else np.int32
        self.shapes = {"logp.npy": ((n, seq, k), np.float32), "ids.npy": ((n, seq, k + tail_samples), ids),
                       "tail_plogp.npy": ((n, seq), np.float32), "crc.npy": ((n,), np.uint32),
                       "filled.npy": ((n,), np.bool_)}
        try:
            self.arrays = self._open(key)
        except (OSError, ValueError) as err:  # a torn or foreign file: the cache is derived data, rebuild it
            warnings.warn(f"teacher cache {self.dir} is unreadable ({err}); starting it afresh", stacklevel=2)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.arrays = self._open(key)

    def _open(self, key: dict) -> dict[str, np.memmap]:
        fresh = not all((self.dir / name).exists() for name in self.shapes)
        if fresh:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "key.json").write_text(json.dumps(key, indent=2) + "\n")
        arrays = {}
        for name, (shape, dtype) in self.shapes.items():
            path = str(self.dir / name)
            if not fresh:  # read-only first: "r+" would silently extend a truncated file with zeros
                np.lib.format.open_memmap(path, mode="r")
            array = (np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape) if fresh
                     else np.lib.format.open_memmap(path, mode="r+"))
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"{name} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}")
            arrays[name] = array
        return arrays

    @property
    def filled(self) -> int:
        return int(self.arrays["filled.npy"].sum())

    def has(self, rows: torch.Tensor) -> bool:
        """Whether every one of `rows` is cached (a damaged one is found, and taught again, on `get`)."""
        return bool(self.arrays["filled.npy"][rows.numpy()].all())

    def get(self, rows: torch.Tensor) -> TeacherTop | None:
        """The rows' teacher, in the flattened batch's order; None unless every row is cached."""
        index = rows.numpy()
        if not self.arrays["filled.npy"][index].all():
            return None
        damaged = [int(i) for i in index if self._crc(i) != self.arrays["crc.npy"][i]]
        if damaged:
            warnings.warn(f"teacher cache {self.dir}: rows {damaged[:5]} are damaged on disk; teaching them again",
                          stacklevel=2)
            self.arrays["filled.npy"][damaged] = False
            return None
        logp = torch.from_numpy(self.arrays["logp.npy"][index]).reshape(-1, self.k)
        ids = torch.from_numpy(self.arrays["ids.npy"][index].astype(np.int64)).reshape(logp.shape[0], -1)
        tail_plogp = torch.from_numpy(self.arrays["tail_plogp.npy"][index]).reshape(-1)
        return TeacherTop(logp, ids[:, : self.k], ids[:, self.k :], tail_plogp)

    def put(self, rows: torch.Tensor, teacher: TeacherTop) -> None:
        index = rows.numpy()

        def rowwise(t: torch.Tensor, name: str) -> np.ndarray:
            shape, dtype = self.shapes[name]
            return t.detach().cpu().reshape(len(index), *shape[1:]).numpy().astype(dtype)

        self.arrays["logp.npy"][index] = rowwise(teacher.logp.float(), "logp.npy")
        self.arrays["ids.npy"][index] = rowwise(torch.cat([teacher.ids, teacher.tail_ids], dim=-1), "ids.npy")
        self.arrays["tail_plogp.npy"][index] = rowwise(teacher.tail_plogp.float(), "tail_plogp.npy")
        self.arrays["crc.npy"][index] = [self._crc(i) for i in index]
        self.arrays["filled.npy"][index] = True  # last: a row is marked only once its values are in

    def _crc(self, row: int) -> int:
        crc = 0
        for name in ("logp.npy", "ids.npy", "tail_plogp.npy"):
            crc = zlib.crc32(np.ascontiguousarray(self.arrays[name][row]).tobytes(), crc)
        return crc

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()
