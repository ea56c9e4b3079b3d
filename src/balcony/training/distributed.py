"""One process or many: rank bookkeeping, the gradient all-reduce, and FSDP2 sharding.

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the process group is started here;
on a single process every collective is a no-op, so the trainer reads the same either way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..core.errors import BalconyError
from ..core.model import BalconyModel


class Ranks:
    """This process's place among the training processes; a no-op on a single process."""

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

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum `params`' gradients over the ranks: one all-reduce of them all, flattened."""
        if self.world < 2 or not params:
            return
        flat = self.sum_(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, make):
        """`make()` on rank 0, then on the other ranks (which may read what rank 0 wrote)."""
        made = None
        for turn in ("main", "others"):
            if (turn == "main") == self.main:
                made = make()
            self.barrier()
        return made

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


def shard(model: BalconyModel, ranks: Ranks) -> None:
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


def full_state(state: dict) -> dict:
    """Plain tensors from a state dict that may hold FSDP-sharded DTensors (gathering them: a
    collective, so every rank takes part)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def placed_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` placed like `reference`: the same device, and sharded the same way under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full.to(reference.device)
