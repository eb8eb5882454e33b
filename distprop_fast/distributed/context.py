"""The process group a training run uses, and the few collectives the trainer needs.

A run launched by ``torchrun`` finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in its environment and joins the group
through ``env://``. A caller that has already initialised a process group
(a test spawning processes on a file store, say) keeps it, and the run uses it.
Gloo serves CPU runs and NCCL CUDA runs, one GPU per process (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MODES = ("none", "data", "block")
EXCHANGES = ("synchronous", "stale")
DIST_BACKENDS = ("gloo", "nccl")

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    """Return the size of the initialised process group, else ``$WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {text!r}") from None


@dataclass
class DistributedContext:
    """The rank, world size and device of this process in a run.

    A single-process run has ``mode="none"``, rank 0 and world size 1, and every
    collective below is then a no-op, so the trainer calls them unconditionally.

    Attributes:
        mode: ``"none"``, ``"data"`` (data-parallel) or ``"block"`` (block-parallel DistProp).
        rank: this process's rank in ``[0, world_size)``.
        world_size: the number of processes.
        device: the device this process computes on.
        owns_group: whether :meth:`start` initialised the process group, so
            :meth:`close` destroys it.
    """

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def start(
        cls, mode: str, device: str, backend: str | None = None
    ) -> DistributedContext:
        """Join (or reuse) the process group of a ``data`` or ``block`` run.

        Args:
            mode: one of :data:`MODES`.
            device: ``"cpu"`` or ``"cuda"``; a distributed CUDA run puts rank
                ``r`` on ``cuda:LOCAL_RANK``.
            backend: ``"gloo"`` or ``"nccl"``; ``None`` picks NCCL for CUDA and
                Gloo for CPU.

        Raises:
            ValueError: an unknown mode or backend, a missing torchrun variable,
                or a device with an index in a distributed run.
        """
        if mode not in MODES:
            raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
        if mode == "none":
            return cls(device=torch.device(device))
        if not dist.is_available():
            raise ValueError("this PyTorch build has no torch.distributed; use --distributed none")
        requested = torch.device(device)
        if requested.index is not None:
            raise ValueError(
                f"a distributed run puts each process on cuda:LOCAL_RANK, so --device must be "
                f"'cuda' without an index, got {device!r}"
            )
        if backend is None:
            backend = "nccl" if requested.type == "cuda" else "gloo"
        if backend not in DIST_BACKENDS:
            raise ValueError(f"dist backend must be one of {DIST_BACKENDS}, got {backend!r}")

        owns_group = False
        if not dist.is_initialized():
            missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
            if missing:
                raise ValueError(
                    f"--distributed {mode} needs a process group, but {', '.join(missing)} "
                    "is not set; launch the run with torchrun (see README), or initialise "
                    "torch.distributed before calling train()"
                )
            dist.init_process_group(backend)
            owns_group = True
        rank, world_size = dist.get_rank(), dist.get_world_size()

        if requested.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
            torch.cuda.set_device(local_rank)
            requested = torch.device("cuda", local_rank)
        logger.info(
            "rank %d of %d joined the %s process group (%s mode) on %s",
            rank, world_size, dist.get_backend(), mode, requested,
        )
        return cls(mode, rank, world_size, requested, owns_group)

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or reduce with ``op``) ``tensor`` across ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s copy, in place."""
        if self.distributed:
            dist.broadcast(tensor, src)
        return tensor

    def any(self, flag: bool) -> bool:
        """Return whether ``flag`` is true on at least one rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1 if flag else 0], device=self.device)
        self.all_reduce_(value, dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_objects(self, obj) -> list:
        """Return every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :meth:`start` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
