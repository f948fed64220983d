"""Data-parallel training with ``torch.distributed``, started by ``torchrun``.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each process it starts. :func:`setup` reads them, creates the default
process group (NCCL for CUDA devices, gloo for the CPU) and pins each process to the GPU
of its local rank. Without those variables, or with ``WORLD_SIZE=1``, training runs in
one process and every helper here does nothing.

The trainers split each global batch across the processes (:func:`local_rows`), so that
for a given seed and ``--batch-size`` the result does not depend on the number of
processes, up to float rounding in the gradient reduction.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmtok.errors import MmtokError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Position of this process in a distributed run.

    Attributes:
        rank: global rank of this process, 0 to ``world_size - 1``.
        world_size: number of processes; 1 without ``torchrun``.
        local_rank: rank on this machine, which selects the GPU.
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, shows progress and writes files (rank 0)."""
        return self.rank == 0


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise MmtokError(f"environment variable {name} must be an integer, got {value!r}") from error


def setup(device: str | torch.device = "auto") -> Context:
    """Join the process group that ``torchrun`` describes, once per process, and return the context.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Under ``torchrun`` a CUDA
    device becomes ``cuda:LOCAL_RANK``, because each process owns one GPU. The process
    group is destroyed at interpreter exit, or earlier by :func:`shutdown`.
    """
    from mmtok.api import resolve_device

    world_size = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    local_rank = _environment_int("LOCAL_RANK", 0)
    resolved = resolve_device(device)
    if world_size <= 1:
        return Context(0, 1, 0, resolved)

    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MmtokError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise MmtokError(f"WORLD_SIZE is {world_size}, but {' and '.join(missing)} are not set; start with torchrun")
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        atexit.register(shutdown)
        logger.info("joined a %s process group as rank %d of %d on %s", backend, rank, world_size, resolved)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, resolved)


def shutdown() -> None:
    """Destroy the default process group, if this process created one.

    The ranks first wait for each other, so no rank tears down its connections while
    another still uses them.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every process reaches this point; nothing in a single process."""
    if active():
        dist.barrier()


def local_rows(total: int, context: Context) -> slice:
    """Return this process's contiguous part of ``total`` rows of a global batch.

    The first ``total % world_size`` processes get one row more than the others.
    """
    if total < context.world_size:
        raise MmtokError(
            f"the batch of {total} examples is smaller than the {context.world_size} processes; "
            "raise --batch-size or start fewer processes"
        )
    base, extra = divmod(total, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (1 if context.rank < extra else 0))


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Return the element-wise sum of ``values`` over all processes, as a copy on the same device."""
    if not active():
        return values.detach().clone()
    # NCCL reduces only CUDA tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    reduced = values.detach().to(device, copy=True)
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def mean_over_ranks(values: dict[str, float], weight: float) -> dict[str, float]:
    """Average scalars over processes, each weighted by ``weight`` (its number of rows).

    For a batch mean such as a loss, the result equals the mean over the global batch.
    For a statistic of the local batch, such as codebook usage, it is the weighted mean
    of the processes' values. Every process must pass the same keys.
    """
    if not active():
        return dict(values)
    names = sorted(values)
    stacked = torch.tensor([values[name] * weight for name in names] + [weight], dtype=torch.float64)
    total = sum_over_ranks(stacked)
    return {name: float(total[index] / total[-1]) for index, name in enumerate(names)}


def gather_objects(value: Any) -> list[Any]:
    """Return ``value`` of every process, in rank order; ``[value]`` in a single process."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
