"""Data-parallel training across processes: `torchrun --nproc_per_node N -m training train ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; without them training runs in one process
as before. One process per GPU (NCCL) or per group of CPU cores (gloo). The recipe's batch_size is the global
batch: each process loads its share of every global batch (training/data.py, shard_bounds), so N processes
take the same optimizer steps on the same samples as one process would. Only rank 0 prints, writes
TensorBoard logs and checkpoints; evaluation is sharded and its sums are added across processes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A condition every process detected together (e.g. a dataset that not every process can read).
    `all_ranks`: each process raises it, so only rank 0 needs to report it."""

    all_ranks = True


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DistributedDataParallel when distributed, else the model.
        Call again whenever the set of trainable parameters changes (DDP fixes it at construction)."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, *values: float | torch.Tensor) -> list[float]:
        """Each value summed over all processes (one all-reduce)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def mean_by_count(self, loss: float, acc: float, n: int) -> tuple[float, float]:
        """(loss, accuracy) over the whole split from each process's (loss, accuracy, count) on its shard."""
        if not self.distributed:
            return loss, acc
        loss_sum, correct, total = self.sum(loss * n, acc * n, n)
        return loss_sum / max(1.0, total), correct / max(1.0, total)

    def agree(self, what: str, load: Callable[[], T], describe: Callable[[T], Any]) -> T:
        """Run `load` in every process and check that all of them succeeded with the same `describe(result)`;
        otherwise every process raises the same DistributedError naming each process's outcome."""
        if not self.distributed:
            return load()
        try:
            result, outcome = load(), None
        except Exception as e:  # noqa: BLE001 -- reported with the other processes' outcomes below
            result, outcome = None, f"{type(e).__name__}: {e}"
        seen = describe(result) if outcome is None else None
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (socket.gethostname(), outcome, seen))
        if all(o is None for _, o, _ in gathered) and all(s == gathered[0][2] for _, _, s in gathered):
            return result  # type: ignore[return-value]
        lines = [f"rank {r} ({host}): " + (f"failed: {o}" if o is not None else f"{s}")
                 for r, (host, o, s) in enumerate(gathered)]
        raise DistributedError(f"the {what} is not the same in every process; every process needs the same data "
                               "at the same path (a shared filesystem or one copy per node). " + "; ".join(lines))


_CONTEXT: Context | None = None


def init(sync_bn: bool = False) -> Context:
    """The process's Context; joins the process group on first use when launched by torchrun."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _CONTEXT = Context(rank, world, local, device)
    if sync_bn and _CONTEXT.distributed and _CONTEXT.device.type != "cuda":
        raise ValueError("sync_bn: SyncBatchNorm runs on CUDA devices only; leave it off for CPU (gloo) training")
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (end of a torchrun job)."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def rank() -> int:
    """This process's rank without joining anything (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def prepare(model: nn.Module, ctx: Context, sync_bn: bool) -> nn.Module:
    """SyncBatchNorm conversion (before the optimizer and the DDP wrapper see the model)."""
    if sync_bn and ctx.distributed:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
