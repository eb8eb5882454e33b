"""Start a Gloo process group of CPU processes on this machine, without torchrun.

The tests and benchmarks use it. The processes meet through a file store, so
no TCP store listens anywhere, and Gloo connects them over the loopback
interface only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_IFF_LOOPBACK = 0x8


def loopback_interface() -> str:
    """Return the name of the loopback network interface (``lo`` on Linux)."""
    for flags in sorted(Path("/sys/class/net").glob("*/flags")):
        if int(flags.read_text(), 16) & _IFF_LOOPBACK:
            return flags.parent.name
    return "lo"


def join_local_group(rank: int, world_size: int, store: str | os.PathLike, threads: int = 1) -> None:
    """Join the Gloo group of ``world_size`` local processes that meet at the file ``store``."""
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(store).resolve()}", rank=rank, world_size=world_size
    )


def spawn_local(worker, world_size: int, directory: str | os.PathLike, *args) -> None:
    """Run ``worker(rank, world_size, store, *args)`` in ``world_size`` new processes.

    ``store`` is a fresh file in ``directory`` for :func:`join_local_group`.
    The call returns when every process has exited and raises if one failed.
    """
    store = Path(directory) / "process-group-store"
    store.unlink(missing_ok=True)
    mp.spawn(worker, args=(world_size, str(store), *args), nprocs=world_size, join=True)
