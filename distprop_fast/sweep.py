"""Random search over DistProp's margin and step sizes, and its robustness report.

The ranges are those of the robustness study in "DistProp: A Scalable Approach
to Lagrangian Training via Distributional Approximation" (ICLR 2022
submission): of 170 DistProp runs on MNIST sampled from them, 103 reached at
least 90 % of the best run's test accuracy. Step sizes are drawn log-uniformly
and the margin uniformly. Sample ``k`` depends only on the sweep seed and ``k``,
so a larger ``--runs`` with the same seed extends a sweep without changing
its earlier samples.

Each sample trains in ``ROOT/<dataset>/distprop/sample<k>`` with the sweep seed
as training seed; ``ROOT/sweep.json`` records the sweep's settings.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distprop_fast.report import NoFinishedRunsError, load_root, pyplot
from distprop_fast.runner import CONFIG_FILE, RunSpec, train_supports_checkpoints, training_module

SWEEP_FILE = "sweep.json"
SWEEP_METHOD = "distprop"


@dataclass(frozen=True)
class Range:
    """A closed interval of one hyper-parameter; ``log`` means sampled log-uniformly."""

    low: float
    high: float
    log: bool


SWEEP_RANGES = {
    "margin": Range(0.1, 0.64, log=False),
    "lr_weights": Range(9e-5, 5.6e-3, log=True),
    "lr_states": Range(0.227, 3.28, log=True),
    "lr_multipliers": Range(1e-7, 1.6e-2, log=True),
}

# Runs within 10 % of the best accuracy, and runs in all, in the paper's study.
PAPER_WITHIN_10_PERCENT = (103, 170)
WITHIN_FRACTION = 0.9


def sample_hyperparameters(seed: int, count: int) -> list[dict[str, float]]:
    """Draw ``count`` settings of margin and step sizes from :data:`SWEEP_RANGES`.

    Values are rounded to 4 significant digits for readable tables; rounding
    cannot leave a range whose bounds have at most 4 significant digits.

    Raises:
        ValueError: ``seed`` is negative or ``count`` is below 1.
    """
    if seed < 0:
        raise ValueError(f"sweep seed must be >= 0, got {seed}")
    if count < 1:
        raise ValueError(f"number of sweep runs must be at least 1, got {count}")
    samples = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        sample = {}
        for name, bounds in SWEEP_RANGES.items():
            if bounds.log:
                value = math.exp(rng.uniform(math.log(bounds.low), math.log(bounds.high)))
            else:
                value = rng.uniform(bounds.low, bounds.high)
            sample[name] = float(f"{value:.4g}")
        samples.append(sample)
    return samples


def record_sweep(root: Path, settings: dict) -> None:
    """Write ``sweep.json``, or check that an existing one used the same settings.

    Raises:
        ValueError: the root contains a sweep with another seed, data set or step budget.
    """
    path = root / SWEEP_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        for key in ("seed", "dataset", "steps"):
            if stored.get(key) != settings[key]:
                raise ValueError(
                    f"{root} contains a sweep with {key} = {stored.get(key)!r}, not "
                    f"{settings[key]!r}; repeat its settings or choose another --root"
                )
        settings = {**settings, "runs": max(int(stored.get("runs", 0)), settings["runs"])}
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def sweep_specs(
    root: Path,
    count: int,
    seed: int,
    *,
    dataset: str = "mnist",
    steps: int | None = None,
    data_dir: str | None = None,
    threads: int | None = None,
) -> list[RunSpec]:
    """Record the sweep in ``root/sweep.json`` and return one DistProp run per sample.

    Raises:
        ValueError: invalid seed or count, or a different sweep already in ``root``.
    """
    samples = sample_hyperparameters(seed, count)
    settings = {
        "seed": seed,
        "dataset": dataset,
        "steps": steps,
        "runs": count,
        "method": SWEEP_METHOD,
        "ranges": {
            name: {"low": r.low, "high": r.high, "log": r.log} for name, r in SWEEP_RANGES.items()
        },
    }
    record_sweep(root, settings)

    config_class = training_module().TrainConfig
    extra = {}
    if train_supports_checkpoints():
        extra["checkpoint_every"] = config_class.eval_every
    specs = []
    for index, sample in enumerate(samples):
        name = f"{dataset}/{SWEEP_METHOD}/sample{index:03d}"
        config = config_class(
            method=SWEEP_METHOD,
            dataset=dataset,
            seed=seed,
            steps=steps,
            data_dir=data_dir,
            threads=threads,
            output_dir=str(root / name),
            **sample,
            **extra,
        )
        specs.append(RunSpec(name=name, config=config))
    return specs


def is_sweep_root(root: Path) -> bool:
    return (root / SWEEP_FILE).is_file()


@dataclass
class SweepRow:
    """One sample of a sweep: its hyper-parameters and, when it finished, its results."""

    name: str
    params: dict[str, float]
    steps: int | None
    accuracy: float | None
    defect: float | None

    @property
    def failed(self) -> bool:
        return self.accuracy is None or math.isnan(self.accuracy)


def load_sweep_rows(root: Path) -> tuple[list[SweepRow], int]:
    """Return the finished and failed samples under ``root``, and the count of unfinished ones.

    Raises:
        NoFinishedRunsError: no sample has finished.
    """
    contents = load_root(root)
    rows = []
    for run in contents.finished:
        rows.append(
            SweepRow(
                name=run.run_dir.relative_to(root).as_posix(),
                params={name: float(run.config.get(name, math.nan)) for name in SWEEP_RANGES},
                steps=run.summary.get("steps"),
                accuracy=float(run.summary.get("test_accuracy", math.nan)),
                defect=run.summary.get("final_mean_abs_defect"),
            )
        )
    for run_dir in contents.failed:
        config_path = run_dir / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        rows.append(
            SweepRow(
                name=run_dir.relative_to(root).as_posix(),
                params={name: float(config.get(name, math.nan)) for name in SWEEP_RANGES},
                steps=None,
                accuracy=None,
                defect=None,
            )
        )
    return rows, len(contents.unfinished)


@dataclass
class Robustness:
    """How many runs stay within 10 % of the best accuracy (accuracy >= 0.9 x best)."""

    best: SweepRow
    within: int
    total: int
    threshold: float


def robustness(rows: list[SweepRow]) -> Robustness:
    """Count the runs with accuracy >= 0.9 x best; failed runs count as outside.

    Raises:
        NoFinishedRunsError: no run has a finite accuracy.
    """
    finished = [row for row in rows if not row.failed]
    if not finished:
        raise NoFinishedRunsError("no sweep run finished with a finite test accuracy")
    best = max(finished, key=lambda row: row.accuracy)
    threshold = WITHIN_FRACTION * best.accuracy
    within = sum(1 for row in finished if row.accuracy >= threshold)
    return Robustness(best=best, within=within, total=len(rows), threshold=threshold)


def format_value(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def sweep_markdown(rows: list[SweepRow], unfinished: int, settings: dict) -> str:
    """Return the robustness summary beside the paper's, and a table of all runs."""
    result = robustness(rows)
    paper_within, paper_total = PAPER_WITHIN_10_PERCENT
    failed = sum(1 for row in rows if row.failed)
    lines = [
        "# DistProp robustness sweep",
        "",
        (
            f"Sampling seed {settings.get('seed')}, data set {settings.get('dataset')}, "
            f"steps {settings.get('steps') or 'the data set default'}."
        ),
        "",
        "| | runs within 10 % of the best accuracy | runs | share |",
        "|---|---:|---:|---:|",
        f"| this sweep | {result.within} | {result.total} | {result.within / result.total:.1%} |",
        f"| paper (MNIST) | {paper_within} | {paper_total} | {paper_within / paper_total:.1%} |",
        "",
        (
            f"Best test accuracy {result.best.accuracy:.4f} ({result.best.name}); a run is within "
            f"10 % when its accuracy is at least {result.threshold:.4f}. {failed} failed runs "
            f"count as outside; {unfinished} unfinished runs are left out."
        ),
        "",
        (
            "| run | margin | lr weights | lr states | lr multipliers | steps | test accuracy "
            "| within 10 % | final mean abs defect |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    ordered = sorted(rows, key=lambda row: (row.failed, -(row.accuracy or 0.0), row.name))
    for row in ordered:
        if row.failed:
            within = "failed"
        elif row.accuracy >= result.threshold:
            within = "yes"
        else:
            within = "no"
        lines.append(
            f"| {row.name} | {format_value(row.params['margin'], '.4g')} "
            f"| {format_value(row.params['lr_weights'], '.4g')} "
            f"| {format_value(row.params['lr_states'], '.4g')} "
            f"| {format_value(row.params['lr_multipliers'], '.4g')} "
            f"| {row.steps if row.steps is not None else '–'} "
            f"| {format_value(row.accuracy, '.4f')} | {within} "
            f"| {format_value(row.defect, '.3g')} |"
        )
    return "\n".join(lines) + "\n"


def write_sweep_csv(path: Path, rows: list[SweepRow]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *SWEEP_RANGES, "steps", "test_accuracy", "final_mean_abs_defect"])
        for row in rows:
            writer.writerow([row.name, *row.params.values(), row.steps, row.accuracy, row.defect])


def axis_position(value: float, bounds: Range) -> float:
    """Map a value to [0, 1] along its axis, on a log scale for log-sampled ranges."""
    if bounds.log:
        low, high, value = math.log10(bounds.low), math.log10(bounds.high), math.log10(value)
    else:
        low, high = bounds.low, bounds.high
    return (value - low) / (high - low) if high > low else 0.5


def axis_ticks(bounds: Range, count: int = 5) -> list[float]:
    if bounds.log:
        return list(np.logspace(math.log10(bounds.low), math.log10(bounds.high), count))
    return list(np.linspace(bounds.low, bounds.high, count))


def plot_parallel_coordinates(rows: list[SweepRow], ranges: dict[str, Range], path: Path) -> None:
    """Draw one vertical axis per hyper-parameter plus test accuracy, lines coloured by accuracy.

    Step-size axes are logarithmic and span the sampled ranges; the accuracy axis
    spans the finished runs and marks 0.9 x the best accuracy in red. Failed runs
    are grey and stop at the last hyper-parameter axis.
    """
    plt = pyplot()
    from matplotlib import cm, colors

    finished = [row for row in rows if not row.failed]
    accuracies = [row.accuracy for row in finished]
    low, high = min(accuracies), max(accuracies)
    if high - low < 1e-9:
        low, high = low - 0.01, high + 0.01
    axes = {**ranges, "test accuracy": Range(low, high, log=False)}
    norm = colors.Normalize(vmin=low, vmax=high)
    cmap = plt.get_cmap("viridis")

    figure, axis = plt.subplots(figsize=(10, 5.5))
    xs = list(range(len(axes)))
    for row in [row for row in rows if row.failed]:
        ys = [axis_position(row.params[name], ranges[name]) for name in ranges]
        axis.plot(xs[: len(ys)], ys, color="0.6", linewidth=0.8, linestyle="--")
    # Best runs last, so they are drawn on top.
    for row in sorted(finished, key=lambda row: row.accuracy):
        values = [*(row.params[name] for name in ranges), row.accuracy]
        ys = [axis_position(v, bounds) for v, bounds in zip(values, axes.values())]
        axis.plot(xs, ys, color=cmap(norm(row.accuracy)), linewidth=1.2, alpha=0.85)

    for x, (name, bounds) in zip(xs, axes.items()):
        axis.axvline(x, color="black", linewidth=0.8)
        for tick in axis_ticks(bounds):
            y = axis_position(tick, bounds)
            axis.plot([x - 0.03, x], [y, y], color="black", linewidth=0.8)
            axis.text(
                x - 0.05,
                y,
                f"{tick:.3g}",
                ha="right",
                va="center",
                fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5},
            )
    threshold = WITHIN_FRACTION * max(accuracies)
    if threshold >= low:
        y = axis_position(threshold, axes["test accuracy"])
        axis.plot([xs[-1] - 0.08, xs[-1] + 0.08], [y, y], color="red", linewidth=2)
        axis.text(xs[-1] + 0.1, y, "0.9 x best", color="red", va="center", fontsize=7)
    axis.set_xticks(xs)
    axis.set_xticklabels([name + (" (log)" if bounds.log else "") for name, bounds in axes.items()])
    axis.set_yticks([])
    axis.set_xlim(-0.4, len(axes) - 0.8)
    axis.set_ylim(-0.05, 1.05)
    for spine in axis.spines.values():
        spine.set_visible(False)
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axis, label="test accuracy")
    axis.set_title(f"DistProp sweep: {len(finished)} finished, {len(rows) - len(finished)} failed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def stored_ranges(settings: dict) -> dict[str, Range]:
    """Return the ranges recorded in ``sweep.json``, falling back to :data:`SWEEP_RANGES`."""
    ranges = dict(SWEEP_RANGES)
    for name, bounds in settings.get("ranges", {}).items():
        if name in ranges:
            ranges[name] = Range(float(bounds["low"]), float(bounds["high"]), bool(bounds["log"]))
    return ranges


def write_sweep_report(root: Path, out: Path) -> list[Path]:
    """Write sweep.md, sweep.csv and parallel_coordinates.png for the sweep in ``root``.

    Returns the written paths.

    Raises:
        NoFinishedRunsError: no sample has finished.
        ImportError: matplotlib is missing.
    """
    settings = json.loads((root / SWEEP_FILE).read_text())
    rows, unfinished = load_sweep_rows(root)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.md", out / "sweep.csv", out / "parallel_coordinates.png"]
    paths[0].write_text(sweep_markdown(rows, unfinished, settings))
    write_sweep_csv(paths[1], rows)
    plot_parallel_coordinates(rows, stored_ranges(settings), paths[2])
    return paths
