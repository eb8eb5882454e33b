"""Worker processes for tests/test_distributed.py.

Each worker joins a Gloo process group through a file store in the test's
temporary directory (:mod:`distprop_fast.distributed.local`). Gloo is bound
to the loopback interface, so nothing listens outside this machine, and no
TCP store is created. A worker runs its scenarios and saves what the test
compares into the same directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distprop_fast.data import BatchLoader, IndexedDataset, ShardedBatchLoader, load_dataset
from distprop_fast.distributed import DistributedContext
from distprop_fast.distributed.local import join_local_group, spawn_local
from distprop_fast.train import TrainConfig, build

# Training examples the step tests use: a fixed random subset of the embedded
# digits, small so that runs and ExtraProp's initial forward pass stay short.
NUM_EXAMPLES = 300


def spawn(worker, world_size: int, directory: Path, *args) -> None:
    """Run ``worker(rank, world_size, store_path, *args)`` in ``world_size`` processes."""
    spawn_local(worker, world_size, directory, *args)


def join_group(rank: int, world_size: int, store: str) -> None:
    join_local_group(rank, world_size, store, threads=1)


def small_digits() -> IndexedDataset:
    """Return :data:`NUM_EXAMPLES` embedded training digits, the same subset in every process."""
    data = load_dataset("digits5k", train=True)
    # Every class, not the first class only: the file is grouped by class.
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:NUM_EXAMPLES]
    keep = keep.sort().values
    return IndexedDataset(data.x[keep].clone(), data.y[keep].clone(), data.num_classes, data.name)


def step_config(**changes) -> TrainConfig:
    """Return the resolved config of a short MLP run on :func:`small_digits`."""
    values = {
        "method": "distprop", "network": "mlp", "batch_size": 100, "steps": 6,
        "samples_per_class": 2, "lr_multipliers": 1e-2, "multiplier_rule": "adagrad",
        "backend": "reference",
    }
    values.update(changes)
    return TrainConfig(**values).resolved()


def trained_state(formulation, step) -> dict:
    """Return copies of every variable a run changes, keyed by a readable name."""
    state = {f"formulation/{k}": v.detach().clone() for k, v in formulation.state_dict().items()}
    for table, rule in zip(step.tables, step.sparse_rules):
        state[f"table/{table.name}"] = table.table.detach().clone()
        if rule.accum is not None:
            state[f"accumulator/{table.name}"] = rule.accum.clone()
    return state


def run_single(config: TrainConfig, data: IndexedDataset) -> tuple[dict, list[dict]]:
    """Train ``config.steps`` steps in this process; return the state and the per-step statistics."""
    formulation, step, generator = build(config, data)
    loader = BatchLoader(data, config.batch_size, generator)
    stats = [step(*loader.next_batch()) for _ in range(config.steps)]
    return trained_state(formulation, step), stats


def _data_steps(rank: int, context, job: dict) -> dict:
    data = small_digits()
    config = step_config(distributed="data", **job["changes"])
    formulation, step, generator = build(config, data, context)
    loader = ShardedBatchLoader(data, config.batch_size, generator, step.partition)
    stats = [step(*loader.next_batch()) for _ in range(config.steps)]
    saved = step.state_dict()
    return {
        "state": trained_state(formulation, step),
        "stats": stats,
        "table_shapes": {t.name: tuple(t.table.shape) for t in formulation.sparse_tables()},
        "accumulator_shapes": {
            t.name: tuple(r.accum.shape) for t, r in zip(step.tables, step.sparse_rules)
            if r.accum is not None
        },
        "owned": step.partition.global_indices(),
        "checkpoint_tables": {name: tuple(t.shape) for name, t in saved["tables"].items()},
    }


def _block_steps(rank: int, context, job: dict) -> dict:
    data = small_digits()
    config = step_config(distributed="block", **job["changes"])
    formulation, step, generator = build(config, data, context)
    loader = BatchLoader(data, config.batch_size, generator)
    stats = [step(*loader.next_batch()) for _ in range(config.steps)]
    step.finish()
    owned = {}
    for b in step.own_blocks:
        for key, value in formulation.network.blocks[b].state_dict().items():
            owned[f"formulation/network.blocks.{b}.{key}"] = value.clone()
    for c in step.touched_cuts:
        owned[f"formulation/w_mu.{c}"] = formulation.w_mu[c].detach().clone()
        owned[f"formulation/w_sigma.{c}"] = formulation.w_sigma[c].detach().clone()
    for c in step.target_cuts:
        if c >= 1:
            owned[f"formulation/later_multipliers.{c - 1}"] = (
                formulation.later_multipliers[c - 1].detach().clone()
            )
    for table, rule in zip(step.tables, step.sparse_rules):
        owned[f"table/{table.name}"] = table.table.clone()
        if rule.accum is not None:
            owned[f"accumulator/{table.name}"] = rule.accum.clone()
    return {
        "state": owned,
        "stats": stats,
        "table_rows": formulation.first_multipliers.table.shape[0],
        "blocks": list(step.own_blocks),
    }


def _train(rank: int, context, job: dict) -> dict:
    from distprop_fast.train import train

    summary = train(TrainConfig(**job["config"]), progress=False, resume=job.get("resume", False))
    return {"summary": summary}


def _train_expecting_error(rank: int, context, job: dict) -> dict:
    from distprop_fast.train import train

    try:
        train(TrainConfig(**job["config"]), progress=False, resume=job.get("resume", False))
    except ValueError as err:  # CheckpointError too; the test checks type and message
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None}


def _cli(rank: int, context, job: dict) -> dict:
    """Run ``distprop-train`` with ``job["argv"]`` and return its exit status."""
    from distprop_fast.cli import main

    return {"status": main(job["argv"])}


def _skew_checkpoints(rank: int, context, job: dict) -> dict:
    """Make rank 1's newest checkpoint one save older than rank 0's, as a crash between saves would."""
    directory = Path(job["directory"])
    if rank == 0:
        (directory / "checkpoint-rank1.prev.pt").replace(directory / "checkpoint-rank1.pt")
    dist.barrier()
    return {}


JOBS = {
    "data_steps": _data_steps,
    "block_steps": _block_steps,
    "train": _train,
    "train_expecting_error": _train_expecting_error,
    "skew_checkpoints": _skew_checkpoints,
    "cli": _cli,
}


def run_jobs(rank: int, world_size: int, store: str, out: str, jobs: list[dict]) -> None:
    """Run each job on this rank and save its result as ``{out}/{name}-rank{rank}.pt``."""
    join_group(rank, world_size, store)
    mode_context = {}
    for job in jobs:
        kind = job["kind"]
        mode = {"data_steps": "data", "block_steps": "block"}.get(kind)
        context = None
        if mode is not None:
            context = mode_context.setdefault(mode, DistributedContext.start(mode, "cpu"))
        result = JOBS[kind](rank, context, job)
        torch.save(result, Path(out) / f"{job['name']}-rank{rank}.pt")
    dist.destroy_process_group()
