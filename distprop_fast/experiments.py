"""Command line ``distprop-experiment``: run grids and sweeps, and report on them.

Subcommands:

* ``run GRID --root DIR``: train every run of a built-in grid
  (:data:`distprop_fast.grids.GRIDS`) or of a JSON grid file, skipping finished
  runs and resuming interrupted ones.
* ``sweep --root DIR --runs N --seed S``: random search over DistProp's margin
  and step sizes (:mod:`distprop_fast.sweep`).
* ``report ROOT``: Table 1, defect and test-curve figures and curves.csv for a
  grid root, or the robustness report for a sweep root.

Exit status: 0 when every run finished, 1 when a run failed, 2 for invalid
input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distprop_fast.grids import GRIDS, expand_grid, load_grid
from distprop_fast.report import NoFinishedRunsError, write_report
from distprop_fast.runner import ERROR_FILE, RunSpec, run_all
from distprop_fast.sweep import is_sweep_root, sweep_specs, write_sweep_report

logger = logging.getLogger("distprop_fast.experiments")

EXIT_RUN_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


class TqdmLoggingHandler(logging.Handler):
    """Write log records through ``tqdm.write`` so they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging.Handler's contract: report, never raise
            self.handleError(record)


def configure_logging() -> None:
    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_execution_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", type=Path, required=True, help="directory that contains one subdirectory per run"
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs trained at once, each in its own process (default: 1)",
    )
    parser.add_argument(
        "--threads-per-job",
        type=positive_int,
        default=None,
        help="torch CPU threads per run (default: CPU cores // jobs); "
        "jobs x threads-per-job must not exceed the CPU cores",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="torchvision-layout data root (default: $DISTPROP_DATA, then ./data)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps of every run (default: the grid's or the data set's)",
    )


def build_parser() -> argparse.ArgumentParser:
    from distprop_fast.data import DATASETS

    parser = argparse.ArgumentParser(
        prog="distprop-experiment",
        description="Run experiment grids and hyper-parameter sweeps, and report on them.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    grid_list = "; ".join(f"{name}: {grid.description}" for name, grid in GRIDS.items())
    run = commands.add_parser(
        "run",
        help="train every run of a grid",
        description="Train every run of a grid into ROOT/<dataset>/<method>/seed<k>. Finished "
        "runs (summary.json) are skipped, interrupted ones resume from checkpoint.pt, and a "
        "failed run leaves error.txt. Built-in grids: " + grid_list + ".",
    )
    run.add_argument("grid", help="a built-in grid name or a JSON grid file")
    add_execution_options(run)
    run.add_argument(
        "--methods", default=None, help="comma-separated rows of the grid to run (default: all)"
    )
    run.add_argument(
        "--seeds", default=None,
        help="comma-separated training seeds that replace the grid's (default: the grid's)",
    )

    sweep = commands.add_parser(
        "sweep",
        help="random search over DistProp's margin and step sizes",
        description="Sample DistProp's margin (uniform in [0.1, 0.64]) and step sizes "
        "(log-uniform: weights [9e-5, 5.6e-3], Gaussians [0.227, 3.28], multipliers "
        "[1e-7, 1.6e-2]) and train one run per sample into ROOT/<dataset>/distprop/sample<k>.",
    )
    add_execution_options(sweep)
    sweep.add_argument("--runs", type=positive_int, required=True, help="number of samples")
    sweep.add_argument(
        "--seed",
        type=int,
        required=True,
        help="sampling seed (>= 0), also the training seed of every run",
    )
    sweep.add_argument(
        "--dataset", choices=DATASETS, default="mnist", help="data set (default: %(default)s)"
    )

    report = commands.add_parser(
        "report",
        help="write tables and figures for a grid or sweep root",
        description="For a grid root: table.md, defect.png, test_curves.png and curves.csv. "
        "For a sweep root (one with sweep.json): sweep.md, sweep.csv and "
        "parallel_coordinates.png.",
    )
    report.add_argument("root", type=Path, help="the --root of a run or sweep command")
    report.add_argument(
        "--out", type=Path, default=None, help="output directory (default: ROOT/report)"
    )
    return parser


def threads_per_job(jobs: int, requested: int | None) -> int:
    """Return the torch threads per run, checking jobs x threads against the CPU cores.

    Raises:
        ValueError: jobs x threads exceeds ``os.cpu_count()``.
    """
    cores = os.cpu_count() or 1
    threads = requested if requested is not None else max(1, cores // jobs)
    if jobs * threads > cores:
        raise ValueError(
            f"--jobs {jobs} x --threads-per-job {threads} = {jobs * threads} threads, but this "
            f"machine has {cores} CPU cores (os.cpu_count()); lower --jobs or --threads-per-job"
        )
    return threads


def execute(specs: list[RunSpec], jobs: int) -> int:
    """Run all specs and return the exit status."""
    result = run_all(specs, jobs=jobs)
    finished = len(result.outcomes) - len(result.failed)
    logger.info(
        "%d runs: %d finished now, %d skipped (finished before), %d failed",
        len(specs),
        finished,
        len(result.skipped),
        len(result.failed),
    )
    if result.failed:
        names = ", ".join(outcome.name for outcome in result.failed)
        logger.error("failed runs (details in each run's %s): %s", ERROR_FILE, names)
    return EXIT_RUN_FAILED if result.failed else 0


def command_run(args: argparse.Namespace) -> int:
    threads = threads_per_job(args.jobs, args.threads_per_job)
    grid = load_grid(args.grid)
    rows = [row.strip() for row in args.methods.split(",") if row.strip()] if args.methods else None
    seeds = None
    if args.seeds:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            raise ValueError(
                f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}"
            ) from None
    specs = expand_grid(
        grid, args.root, data_dir=args.data_dir, threads=threads, steps=args.steps, rows=rows,
        seeds=seeds,
    )
    logger.info(
        "grid %s: %d runs under %s, %d at a time", grid.name, len(specs), args.root, args.jobs
    )
    return execute(specs, args.jobs)


def command_sweep(args: argparse.Namespace) -> int:
    threads = threads_per_job(args.jobs, args.threads_per_job)
    specs = sweep_specs(
        args.root,
        args.runs,
        args.seed,
        dataset=args.dataset,
        steps=args.steps,
        data_dir=args.data_dir,
        threads=threads,
    )
    logger.info("sweep with seed %d: %d runs under %s", args.seed, len(specs), args.root)
    return execute(specs, args.jobs)


def command_report(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.root / "report"
    if is_sweep_root(args.root):
        paths = write_sweep_report(args.root, out)
    else:
        paths = write_report(args.root, out)
    for path in paths:
        print(path)
    return 0


COMMANDS = {"run": command_run, "sweep": command_sweep, "report": command_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, NoFinishedRunsError, ImportError) as err:
        print(f"distprop-experiment: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(
            "distprop-experiment: interrupted; repeat the command to resume from the last "
            "checkpoints",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
