"""Execution of many training runs: skipping, resuming, a process pool and progress.

A run is one :class:`~distprop_fast.train.TrainConfig` with its own ``output_dir``.
The state of that directory decides what happens to it:

* ``summary.json`` present: the run finished and is skipped.
* ``checkpoint.pt`` present: the run was interrupted and resumes from the checkpoint.
* ``error.txt`` present (and no summary): the run failed earlier and starts again.

A run that raises is recorded in its ``error.txt`` and the other runs go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import logging
import multiprocessing
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("distprop_fast.experiments")

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
ERROR_FILE = "error.txt"

# Fields that may differ between a stored run and a new request for it without
# changing what the run computes: where files and data live, and CPU threads.
IGNORED_CONFIG_FIELDS = ("output_dir", "data_dir", "download", "threads", "checkpoint_every")


def training_module():
    """Return the ``distprop_fast.train`` module, looked up at call time.

    The package re-exports the function ``train`` under the module's name, so
    ``import distprop_fast.train`` would bind the function, not the module.
    """
    return importlib.import_module("distprop_fast.train")


def train_supports_resume() -> bool:
    """Return whether ``train()`` accepts ``resume=``, so interrupted runs can continue."""
    return "resume" in inspect.signature(training_module().train).parameters


def train_supports_checkpoints() -> bool:
    """Return whether ``TrainConfig`` has a ``checkpoint_every`` field."""
    fields = {field.name for field in dataclasses.fields(training_module().TrainConfig)}
    return "checkpoint_every" in fields


@dataclass
class RunSpec:
    """One run of a grid or sweep.

    Attributes:
        name: the run directory relative to the grid's root, used in messages.
        config: the unresolved training configuration; ``output_dir`` is the run directory.
        total_steps: the resolved step budget, set by :func:`plan_runs`; None when the
            run is sized in epochs.
    """

    name: str
    config: object  # distprop_fast.train.TrainConfig, kept untyped to avoid importing torch here
    total_steps: int | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass
class RunOutcome:
    """Result of one run: ``finished`` with its summary, or ``failed`` with the error message."""

    name: str
    status: str
    summary: dict | None = None
    error: str | None = None


class ConfigMismatchError(ValueError):
    """A run directory contains results of a different configuration than the one requested."""


def check_choices(config) -> None:
    """Raise ValueError when a named option of ``config`` is not one this version offers.

    The lists are read from the modules that define them, so methods, solvers or
    networks added later are accepted without a change here.
    """
    from distprop_fast.data import DATASETS
    from distprop_fast.formulations.distprop import GAUSSIAN_INITS, NOISE_MODES
    from distprop_fast.formulations.extraprop import SHRINKS
    from distprop_fast.models import NETWORKS
    from distprop_fast.ops import BACKENDS
    from distprop_fast.solvers import SOLVERS, STEP_RULES

    choices = {
        "method": training_module().METHODS,
        "dataset": DATASETS,
        "network": NETWORKS,
        "solver": SOLVERS,
        "weight_rule": STEP_RULES,
        "state_rule": STEP_RULES,
        "multiplier_rule": STEP_RULES,
        "shrink": SHRINKS,
        "noise": NOISE_MODES,
        "gaussian_init": GAUSSIAN_INITS,
        "backend": BACKENDS,
    }
    for field, allowed in choices.items():
        value = getattr(config, field, None)
        if value is not None and value not in allowed:
            raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")


def resolve_config(spec: RunSpec):
    """Return the resolved config of a run, raising ValueError that names the run."""
    try:
        check_choices(spec.config)
        return spec.config.resolved()
    except ValueError as err:
        raise ValueError(f"run {spec.name}: {err}") from None


def config_differences(stored: dict, requested: dict) -> list[str]:
    """List the fields where a stored ``config.json`` and a requested config disagree.

    Only fields present in both are compared, so a config written by an older
    version with fewer fields still matches. ``steps`` is skipped when the run is
    sized in epochs, because training replaces it by the epoch count in steps.
    """
    ignored = set(IGNORED_CONFIG_FIELDS)
    if requested.get("epochs") is not None:
        ignored.add("steps")
    differences = []
    for key in sorted(stored.keys() & requested.keys() - ignored):
        if stored[key] != requested[key]:
            differences.append(f"{key}: {stored[key]!r} stored, {requested[key]!r} requested")
    return differences


def check_stored_config(spec: RunSpec, resolved) -> None:
    """Raise ConfigMismatchError when a finished run in the directory had other settings.

    Without this check a changed grid would skip runs whose results no longer
    match it. Checkpoints are left to ``train()``, which decides which fields a
    resumed run may change.
    """
    run_dir = spec.run_dir
    config_path = run_dir / CONFIG_FILE
    if not (run_dir / SUMMARY_FILE).exists() or not config_path.exists():
        return
    stored = json.loads(config_path.read_text())
    differences = config_differences(stored, dataclasses.asdict(resolved))
    if differences:
        raise ConfigMismatchError(
            f"{run_dir} contains a finished run with a different configuration ("
            + "; ".join(differences)
            + "). Delete that directory or choose another --root."
        )


def plan_runs(specs: list[RunSpec]) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split runs into those to execute and those already finished.

    Every run is validated first, so a typo in a grid fails before any training.

    Raises:
        ValueError: a config is invalid (unknown method, negative step size, ...).
        ConfigMismatchError: a run directory contains results of other settings.
    """
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"several runs share a directory: {', '.join(duplicates)}")
    pending, finished = [], []
    for spec in specs:
        resolved = resolve_config(spec)
        check_stored_config(spec, resolved)
        spec.total_steps = resolved.steps if resolved.epochs is None else None
        if (spec.run_dir / SUMMARY_FILE).exists():
            finished.append(spec)
        else:
            pending.append(spec)
    return pending, finished


def execute_run(spec: RunSpec) -> RunOutcome:
    """Train one run, resuming from its checkpoint when ``train()`` supports it.

    Any exception is written to the run's ``error.txt`` with its traceback and
    returned as a ``failed`` outcome, so the caller can go on with other runs.
    It may run in a worker process, so it must stay a picklable module-level function.
    """
    run_dir = spec.run_dir
    try:
        training = training_module()
        run_dir.mkdir(parents=True, exist_ok=True)
        if train_supports_resume():
            summary = training.train(spec.config, progress=False, resume=True)
        else:
            if (run_dir / CHECKPOINT_FILE).exists():
                logger.warning(
                    "train() has no resume argument; %s starts again from step 0", spec.name
                )
            summary = training.train(spec.config, progress=False)
    except Exception as err:  # noqa: BLE001 - any failure ends this run only
        message = f"{type(err).__name__}: {err}"
        record_error(run_dir, message, traceback.format_exc())
        return RunOutcome(spec.name, "failed", error=message)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return RunOutcome(spec.name, "finished", summary=summary)


def record_error(run_dir: Path, message: str, details: str) -> None:
    """Write a failed run's error message and traceback to its ``error.txt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(f"{message}\n\n{details}")


def current_step(spec: RunSpec) -> int | None:
    """Return the last step in the run's ``metrics.jsonl``, or None before the first step.

    Reads only the end of the file, because a long run's file has thousands of lines.
    """
    path = spec.run_dir / METRICS_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            tail = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a partly written or partly read line
    return None


class GridProgress:
    """A bar of runs done out of all runs, with the current step of each active run.

    A background thread rereads the active runs' ``metrics.jsonl`` every
    ``poll_s`` seconds. When stderr is not a terminal the bar is hidden and a
    status line is logged every ``log_every_s`` seconds instead.
    """

    def __init__(self, total: int, done: int, poll_s: float = 2.0, log_every_s: float = 60.0):
        from tqdm.auto import tqdm

        # disable=None hides the bar when stderr is not a terminal (logs, CI).
        self._bar = tqdm(total=total, initial=done, unit="run", desc="runs", disable=None)
        self._total = total
        self._done = done
        self._active: list[RunSpec] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_s = poll_s
        self._log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._thread = threading.Thread(target=self._poll, name="grid-progress", daemon=True)
        self._thread.start()

    def set_active(self, specs: list[RunSpec]) -> None:
        with self._lock:
            self._active = list(specs)
        self.refresh()

    def run_ended(self) -> None:
        with self._lock:
            self._done += 1
            self._bar.update(1)

    def refresh(self) -> None:
        with self._lock:
            parts = []
            for spec in self._active:
                step = current_step(spec)
                total = spec.total_steps if spec.total_steps is not None else "?"
                parts.append(f"{spec.name} {step if step is not None else 0}/{total}")
            status = ", ".join(parts)
            if not self._bar.disable:
                self._bar.set_postfix_str(status, refresh=True)
                return
            now = time.monotonic()
            if status and now - self._last_log >= self._log_every_s:
                self._last_log = now
                logger.info("%d/%d runs done; running: %s", self._done, self._total, status)

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.close()


@dataclass
class GridResult:
    """Outcomes of one call of :func:`run_all`; ``skipped`` lists runs that had finished before."""

    outcomes: list[RunOutcome]
    skipped: list[str]

    @property
    def failed(self) -> list[RunOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == "failed"]


def run_all(specs: list[RunSpec], jobs: int = 1) -> GridResult:
    """Execute every unfinished run, ``jobs`` at a time, and return the outcomes.

    With ``jobs == 1`` the runs execute in this process, one after another. With
    more, they execute in a pool of worker processes. The workers are spawned, not
    forked, so that none inherits torch's thread pools from this process.

    Raises:
        ValueError, ConfigMismatchError: from :func:`plan_runs`, before any run starts.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    pending, finished = plan_runs(specs)
    if finished:
        logger.info("skipping %d finished runs (summary.json present)", len(finished))
    if pending and not train_supports_resume():
        logger.warning("train() has no resume argument; interrupted runs start again from step 0")
    result = GridResult(outcomes=[], skipped=[spec.name for spec in finished])
    progress = GridProgress(total=len(specs), done=len(finished))
    try:
        if jobs == 1:
            for spec in pending:
                progress.set_active([spec])
                report_outcome(execute_run(spec), result, progress)
        else:
            run_in_pool(pending, jobs, result, progress)
        progress.set_active([])
    finally:
        progress.close()
    return result


def run_in_pool(
    pending: list[RunSpec], jobs: int, result: GridResult, progress: GridProgress
) -> None:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(execute_run, spec): spec for spec in pending}
        waiting = set(futures)
        try:
            while waiting:
                done, waiting = concurrent.futures.wait(
                    waiting, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    report_outcome(outcome_of(future, futures[future]), result, progress)
                # NOTE: the executor marks a few queued calls as running before a
                # worker takes them, so a run may show step 0 for a while.
                progress.set_active([futures[f] for f in waiting if f.running()])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def outcome_of(future: concurrent.futures.Future, spec: RunSpec) -> RunOutcome:
    """Return a worker's outcome; a worker that died (killed, out of memory) counts as failed."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - e.g. BrokenProcessPool
        message = f"worker process failed: {type(err).__name__}: {err}"
        record_error(spec.run_dir, message, traceback.format_exc())
        return RunOutcome(spec.name, "failed", error=message)


def report_outcome(outcome: RunOutcome, result: GridResult, progress: GridProgress) -> None:
    result.outcomes.append(outcome)
    progress.run_ended()
    if outcome.status == "finished":
        summary = outcome.summary or {}
        logger.info(
            "finished %s: test accuracy %.4f after %s steps, %.1f s",
            outcome.name,
            summary.get("test_accuracy", float("nan")),
            summary.get("steps", "?"),
            summary.get("wall_time_s", float("nan")),
        )
    else:
        logger.error("failed %s: %s (details in %s)", outcome.name, outcome.error, ERROR_FILE)
