"""Per-rank checkpoints of a distributed run.

Every rank writes its own pair of files, ``checkpoint-rank{r}.pt`` and
``checkpoint-rank{r}.prev.pt``, into the output directory. A data-parallel
rank's file contains its shard of the multiplier table (and, for ExtraProp, of
the state tables) with their accumulators, beside the replicated weights,
Gaussians, loader and random states. A block-parallel rank's file contains the
whole formulation as that rank last saw it, its step rules and, on rank 0,
the multiplier table. No rank ever gathers another rank's rows.

All ranks save at the same steps, but a crash can stop the run after some
ranks have replaced their newest file and before the others have. On resume
the ranks agree on the newest step that all of them have saved, and a rank whose
newest file is one save ahead loads its previous file instead.
"""

from __future__ import annotations

from pathlib import Path

from distprop_fast.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    checkpoint_names,
    load_checkpoint,
    read_checkpoint,
)
from distprop_fast.distributed.context import DistributedContext

RANK_FILE_PATTERN = "checkpoint-rank*.pt"


def rank_stem(rank: int) -> str:
    """Return the stem of rank ``rank``'s checkpoint files."""
    return f"checkpoint-rank{rank}"


def rank_checkpoint_files(directory: Path) -> list[Path]:
    """Return the per-rank checkpoint files in ``directory``, newest and previous alike."""
    return sorted(Path(directory).glob(RANK_FILE_PATTERN))


def _newest(directory: Path, context: DistributedContext) -> tuple[dict | None, dict]:
    """Read this rank's newest checkpoint; return it and a summary for the other ranks."""
    info = {"problem": None, "step": None, "world_size": None}
    if (directory / CHECKPOINT_NAME).exists():
        info["problem"] = (
            f"{directory} contains a single-process checkpoint ({CHECKPOINT_NAME}); resume it "
            "without torchrun, or start the distributed run in another --output-dir"
        )
        return None, info
    try:
        found = load_checkpoint(directory, rank_stem(context.rank))
    except CheckpointError as err:
        info["problem"] = str(err)
        return None, info
    if found is None:
        return None, info
    info["step"] = int(found[0]["step"])
    info["world_size"] = found[0].get("world_size")
    return found, info


def load_rank_checkpoint(
    directory: Path, context: DistributedContext
) -> tuple[dict, Path] | None:
    """Return this rank's checkpoint at the newest step that every rank has saved, or ``None``.

    Every rank must call it. It returns ``None`` on every rank when no rank has
    a checkpoint, and it raises on every rank alike.

    Raises:
        CheckpointError: a rank's files cannot be read, the directory contains a
            single-process checkpoint, the run was written by another number
            of processes, or the ranks share no saved step.
    """
    directory = Path(directory)
    found, info = _newest(directory, context)
    infos = context.gather_objects(info)

    problems = [f"rank {r}: {i['problem']}" for r, i in enumerate(infos) if i["problem"]]
    if problems:
        raise CheckpointError("cannot resume: " + "; ".join(problems))
    saved_sizes = sorted({i["world_size"] for i in infos if i["step"] is not None})
    if saved_sizes and saved_sizes != [context.world_size]:
        raise CheckpointError(
            f"{directory} was written by a run of {saved_sizes} processes, this run has "
            f"{context.world_size}; resume with the same number of processes (torchrun "
            "--nproc-per-node), or start over in another --output-dir"
        )
    steps = [i["step"] for i in infos]
    if all(step is None for step in steps):
        return None
    missing = [r for r, step in enumerate(steps) if step is None]
    if missing:
        raise CheckpointError(
            f"ranks {missing} have no checkpoint in {directory} while the others do, so the "
            f"run stopped during its first save; delete {RANK_FILE_PATTERN} there to start over"
        )

    target = min(steps)
    chosen, problem = found, None
    if info["step"] != target:
        # This rank saved once more than the slowest rank, so its previous file has the target step.
        path = directory / checkpoint_names(rank_stem(context.rank))[1]
        try:
            chosen = (read_checkpoint(path), path)
            if int(chosen[0]["step"]) != target:
                problem = f"{path} contains step {chosen[0]['step']}, not {target}"
        except (CheckpointError, OSError) as err:
            problem = str(err)
    problems = [p for p in context.gather_objects(problem) if p]
    if problems:
        raise CheckpointError(
            f"the ranks share no saved step (newest steps {steps}): " + "; ".join(problems)
        )
    return chosen
