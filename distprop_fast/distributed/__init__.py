"""Data-parallel and block-parallel training on ``torch.distributed``.

* :class:`DataParallelStep`: every rank steps on its part of the global batch;
  dense variables are replicated, multiplier rows are sharded by dataset index.
* :class:`BlockParallelStep`: each rank trains a group of DistProp blocks and
  exchanges only the Gaussians of the cuts it shares with its neighbours.
"""

from distprop_fast.distributed.block_parallel import (
    BlockLayout,
    BlockParallelStep,
    GaussianExchange,
)
from distprop_fast.distributed.context import (
    DIST_BACKENDS,
    EXCHANGES,
    MODES,
    DistributedContext,
    launched_world_size,
)
from distprop_fast.distributed.data_parallel import DataParallelStep

__all__ = [
    "DIST_BACKENDS",
    "EXCHANGES",
    "MODES",
    "BlockLayout",
    "BlockParallelStep",
    "DataParallelStep",
    "DistributedContext",
    "GaussianExchange",
    "launched_world_size",
]
