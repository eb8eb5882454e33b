"""Crash-safe checkpoints of a training run.

A run directory holds at most two checkpoints: ``checkpoint.pt``, the newest,
and ``checkpoint.prev.pt``, the one before it. A new checkpoint is written to a
temporary file, flushed and fsync'ed, and renamed over ``checkpoint.pt`` only
after the old one has been hard-linked to ``checkpoint.prev.pt``. At every
moment of a save, a kill leaves ``checkpoint.pt`` either the old or the new
complete file, so loading never sees a partial write. Loading falls back to
``checkpoint.prev.pt`` when the newest file is damaged by other means (a full
disk, a copy cut short).

Files are read with ``torch.load(weights_only=True)``: a checkpoint holds only
tensors, numbers, strings, lists and dicts, and no pickled code runs on load.

A distributed run writes one pair of files per rank, named by the stem
``checkpoint-rank{r}`` (``checkpoint-rank{r}.pt`` and ``checkpoint-rank{r}.prev.pt``).
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from distprop_fast.solvers import NonFiniteError

FORMAT_VERSION = 1
CHECKPOINT_STEM = "checkpoint"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"


def checkpoint_names(stem: str = CHECKPOINT_STEM) -> tuple[str, str]:
    """Return the file names ``(newest, previous)`` of the checkpoints named by ``stem``."""
    return f"{stem}.pt", f"{stem}.prev.pt"

# Errors torch.load raises on a truncated, overwritten or foreign file.
_LOAD_ERRORS = (
    RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError
)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, from another format, or from another run."""


def find_non_finite(payload, prefix: str = "") -> str | None:
    """Return the key path of the first floating tensor in ``payload`` holding NaN or Inf."""
    if isinstance(payload, torch.Tensor):
        if payload.is_floating_point() and not torch.isfinite(payload).all():
            return prefix or "<root>"
        return None
    if isinstance(payload, dict):
        items = payload.items()
    elif isinstance(payload, (list, tuple)):
        items = enumerate(payload)
    else:
        return None
    for key, value in items:
        found = find_non_finite(value, f"{prefix}/{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save_checkpoint(
    directory: Path, payload: dict, step: int, stem: str = CHECKPOINT_STEM
) -> Path:
    """Write ``payload`` as the newest checkpoint of ``directory`` and keep the previous one.

    ``stem`` names the pair of files (see :func:`checkpoint_names`).

    Raises:
        NonFiniteError: a tensor of the payload holds NaN or Inf. Nothing is
            written, so the last good checkpoint stays in place.
    """
    bad = find_non_finite(payload)
    if bad is not None:
        raise NonFiniteError(
            f"{bad} holds NaN or Inf after step {step}; the checkpoint was not written and "
            "the previous one is intact. Try smaller step sizes or a larger margin",
            "saved tensor", step, None,
        )
    directory = Path(directory)
    newest_name, previous_name = checkpoint_names(stem)
    newest = directory / newest_name
    previous = directory / previous_name
    tmp = directory / (newest_name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if newest.exists():
        # A hard link keeps checkpoint.pt in place while the previous copy is made.
        link = directory / (previous_name + ".tmp")
        link.unlink(missing_ok=True)
        os.link(newest, link)
        os.replace(link, previous)
    os.replace(tmp, newest)
    _fsync_directory(directory)
    return newest


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> dict:
    """Read and check one checkpoint file.

    Raises:
        CheckpointError: the file is damaged, not a checkpoint, or of another format.
    """
    return _read(Path(path))


def _read(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({err})") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a distprop_fast checkpoint (no format_version)")
    version = payload["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, but this version of distprop_fast "
            f"reads format {FORMAT_VERSION}; resume it with the version that wrote it, or "
            "start over in a new --output-dir"
        )
    for key in ("config", "step", "trainer", "loader", "rng"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks the entry {key!r}; it is damaged")
    return payload


def load_checkpoint(directory: Path, stem: str = CHECKPOINT_STEM) -> tuple[dict, Path] | None:
    """Return ``(payload, path)`` of the newest readable checkpoint, or ``None`` if there is none.

    A damaged ``checkpoint.pt`` is skipped with a warning in favour of
    ``checkpoint.prev.pt``. ``stem`` names the pair of files.

    Raises:
        CheckpointError: checkpoint files exist but none can be read, or the
            newest readable one has another format version.
    """
    directory = Path(directory)
    paths = [directory / name for name in checkpoint_names(stem)]
    problems = []
    for path in paths:
        if not path.exists():
            continue
        try:
            payload = _read(path)
        except CheckpointError as err:
            if "checkpoint format" in str(err):
                raise
            problems.append(str(err))
            continue
        if problems:
            warnings.warn(
                f"{problems[0]}; resuming from the older {path.name} instead", stacklevel=2
            )
        return payload, path
    if problems:
        raise CheckpointError(
            "no readable checkpoint: " + "; ".join(problems) + ". Delete the checkpoint files "
            "to start the run over, or restore them from a backup"
        )
    return None
