"""The parts of a training run that change when it runs on several processes.

:func:`distprop_fast.train.train` calls these with its
:class:`~distprop_fast.distributed.context.DistributedContext`. For a
single-process context they do what a single process always did.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distprop_fast.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    find_non_finite,
    load_checkpoint,
    save_checkpoint,
)
from distprop_fast.data import (
    IndexedDataset,
    IndexOnlyLoader,
    ShardedBatchLoader,
    ShardedStreamingBatchLoader,
    make_batch_loader,
)
from distprop_fast.distributed.checkpoints import (
    load_rank_checkpoint,
    rank_checkpoint_files,
    rank_stem,
)
from distprop_fast.distributed.context import DistributedContext
from distprop_fast.solvers import NonFiniteError

# Fields that may differ between the processes of one distributed run.
PER_PROCESS_FIELDS = frozenset({"threads", "data_dir", "download", "workers"})


def check_same_config(config, context: DistributedContext) -> None:
    """Raise on every rank when the processes of a distributed run got different options."""
    if not context.distributed:
        return
    own = {k: v for k, v in dataclasses.asdict(config).items() if k not in PER_PROCESS_FIELDS}
    differ = sorted({k for other in context.gather_objects(own) for k in own if other[k] != own[k]})
    if differ:
        raise ValueError(
            f"the processes of this run were started with different {', '.join(differ)}; "
            "launch every process with the same options"
        )


def load_run_checkpoint(out_dir: Path, context: DistributedContext):
    """Return the checkpoint this process resumes from, or ``None`` to start from step 0.

    Raises:
        CheckpointError: as :func:`load_rank_checkpoint`, or a single process
            was asked to resume the per-rank checkpoints of a distributed run.
    """
    if context.distributed:
        return load_rank_checkpoint(out_dir, context)
    if not (out_dir / CHECKPOINT_NAME).exists() and rank_checkpoint_files(out_dir):
        raise CheckpointError(
            f"{out_dir} contains the per-rank checkpoints of a distributed run; resume it with "
            "torchrun, the same number of processes and the same --distributed"
        )
    return load_checkpoint(out_dir)


def save_run_checkpoint(out_dir: Path, payload: dict, done: int, context: DistributedContext):
    """Save this process's checkpoint; in a distributed run, every rank its own file.

    Raises:
        NonFiniteError: a saved tensor of any rank contains NaN or Inf; no
            rank writes, so every rank keeps its previous checkpoints.
    """
    if not context.distributed:
        save_checkpoint(out_dir, payload, done)
        return
    payload = {**payload, "world_size": context.world_size, "rank": context.rank}
    bad = find_non_finite(payload)
    if context.any(bad is not None):
        raise NonFiniteError(
            f"{bad or 'a tensor on another rank'} contains NaN or Inf after step {done}; no "
            "rank wrote this checkpoint and the previous ones are intact. Try smaller step "
            "sizes or a larger margin",
            "saved tensor", done, None,
        )
    save_checkpoint(out_dir, payload, done, stem=rank_stem(context.rank))


def make_run_loader(train_data, config, generator, step, context: DistributedContext):
    """Return the loader of this process's batches.

    Data-parallel ranks get their part of every global batch. Block-parallel
    ranks other than rank 0 get the batch indices only, because they do not
    read images, but they draw the same permutations from the shared generator.
    """
    pin_memory = context.device.type == "cuda"
    if context.mode == "data":
        if isinstance(train_data, IndexedDataset):
            return ShardedBatchLoader(train_data, config.batch_size, generator, step.partition)
        return ShardedStreamingBatchLoader(
            train_data, config.batch_size, generator, step.partition, config.workers, pin_memory
        )
    loader = make_batch_loader(train_data, config.batch_size, generator, config.workers, pin_memory)
    if context.mode == "block" and step.own_blocks[0] != 0:
        return IndexOnlyLoader(loader)
    return loader


def rank_slice(data, context: DistributedContext | None):
    """Return this rank's contiguous slice of a split, for evaluation split across ranks."""
    if context is None or not context.distributed:
        return data
    begin = context.rank * len(data) // context.world_size
    end = (context.rank + 1) * len(data) // context.world_size
    if isinstance(data, IndexedDataset):
        return IndexedDataset(data.x[begin:end], data.y[begin:end], data.num_classes, data.name)
    return torch.utils.data.Subset(data, range(begin, end))


def variable_counts(formulation, context: DistributedContext) -> dict[str, int]:
    """Count states and multipliers of the whole run, sparse rows of every rank included."""
    counts = formulation.variable_counts()
    if not context.distributed:
        return counts
    local = {"state_variables": 0, "multipliers": 0}
    for table in formulation.sparse_tables():
        key = "state_variables" if table.role == "state" else "multipliers"
        local[key] += table.table.numel()
    totals = torch.tensor([local["state_variables"], local["multipliers"]], device=context.device)
    context.all_reduce_(totals)
    counts["state_variables"] += int(totals[0]) - local["state_variables"]
    counts["multipliers"] += int(totals[1]) - local["multipliers"]
    return counts

