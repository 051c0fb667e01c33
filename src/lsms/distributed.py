"""Several processes and machines: DistributedDataParallel set-up from ``torchrun``'s environment.

``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without them everything here
degrades to a single process (rank 0 of 1) and no process group is created. Backend: NCCL when the process
owns a GPU, gloo otherwise (CPU). Validation is split with :class:`ShardSampler` (every sample on exactly one
rank, no padding) and the per-sample records are gathered and de-duplicated by id with
:func:`gather_records`, so metrics are computed over the whole split exactly once.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the process's GPU (``cuda:LOCAL_RANK``) if there is one, then Apple ``mps``, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N (N a GPU number) or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for but MPS is not available; use --device cpu or auto")
    return dev


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group ``torchrun`` describes (or return a single-process environment)."""
    if not launched_by_torchrun():
        return DistEnv(device=pick_device(device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if world_size == 1:
        return DistEnv(rank, local_rank, 1, dev)
    if dev.type == "mps":
        raise ValueError("multi-process training on MPS is not supported; use --device cpu or a CUDA machine")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    log.debug("rank %d/%d (local %d) on %s with %s", rank, world_size, local_rank, dev, backend)
    return DistEnv(rank, local_rank, world_size, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP syncs buffers at the start of each forward, so after the last training step the ranks differ by one
    update; validation and the saved checkpoint must use the same (rank 0's) statistics.
    """
    if env.distributed:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def all_reduce_mean(value: float, env: DistEnv) -> float:
    """Mean of a Python number over ranks (for logging)."""
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def gather_records(records: list[dict[str, Any]], env: DistEnv, key: str = "id") -> list[dict[str, Any]]:
    """All ranks' per-sample records, each id once, sorted by id (identical on every rank)."""
    if env.distributed:
        parts: list[list[dict[str, Any]] | None] = [None] * env.world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in (part or [])]
    unique: dict[Any, dict[str, Any]] = {}
    for r in records:
        unique.setdefault(r[key], r)  # a padded duplicate (if any sampler padded) is dropped here
    return [unique[k] for k in sorted(unique, key=str)]


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r gets indices r, r + W, r + 2W, ... — every sample exactly once, no padding.

    (``DistributedSampler`` pads the last round with repeats so that all ranks have equal length, which would
    count those samples twice.)
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class GroupedSampler(Sampler[int]):
    """Training sampler that keeps the expressions of one image together in a batch.

    Each epoch the groups (e.g. all expressions of one slice) are shuffled (seed + epoch, the same on every
    rank), flattened, and cut into global batches of ``batch_size * world_size``; rank r takes its contiguous
    ``batch_size`` slice of each. A batch then holds the same image with different sentences and different
    targets, which is what forces a referring model to read the text. Incomplete last batches are dropped,
    like ``DistributedSampler(drop_last=True)``; call :meth:`set_epoch` every epoch.

    Args:
        groups: sample indices per group.
        batch_size: per-rank batch size.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.groups = [list(g) for g in groups if g]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch = 0
        total = sum(len(g) for g in self.groups)
        self.num_batches = total // (batch_size * world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        flat = [i for k in order for i in self.groups[k]]
        step = self.batch_size * self.world_size
        out: list[int] = []
        for b in range(self.num_batches):
            start = b * step + self.rank * self.batch_size
            out.extend(flat[start:start + self.batch_size])
        return iter(out)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective under DDP: every rank must call it)."""
    if not env.distributed:
        return [obj]
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, obj)
    return parts
