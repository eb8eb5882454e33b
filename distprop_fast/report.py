"""Tables, figures and curves from finished runs under a grid root.

``write_report(root, out)`` writes:

* ``table.md``: one row per data set and method, laid out like Table 1 of the
  DistProp paper (test accuracy and final mean absolute defect), with the mean
  and sample standard deviation (n - 1) of test accuracy over seeds;
* ``defect.png``: mean absolute defect against steps, mean and +-1 standard
  deviation over runs, log scale (the paper's Figure 2);
* ``test_curves.png``: test loss and test error against steps, mean and band
  over seeds (the paper's Figure 3);
* ``curves.csv``: every plotted curve per run, in long format.

A run directory ``.../<method>/seed<k>`` is grouped under ``<method>``; any other
run directory forms a group of its own, named after the directory.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distprop_fast.runner import (
    CONFIG_FILE,
    ERROR_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    training_module,
)

SEED_DIR = re.compile(r"^seed\d+$")
DEFECT_PREFIX = "defect/"

# Table 1 of "DistProp: A Scalable Approach to Lagrangian Training via
# Distributional Approximation" (ICLR 2022 submission): (test accuracy, final
# mean absolute defect). The CIFAR-10 ExtraProp defect is printed there as
# 0.5833, the same number as its accuracy, so it is left out here.
PAPER_TABLE1 = {
    ("mnist", "sgd"): (0.9881, 0.0),
    ("mnist", "penalty"): (0.9627, 0.1),
    ("mnist", "gda"): (0.9743, 0.00072),
    ("mnist", "extraprop"): (0.9827, 0.0000045),
    ("mnist", "distprop"): (0.9903, 0.0026),
    ("cifar10", "sgd"): (0.6309, 0.0),
    ("cifar10", "penalty"): (0.1726, 0.0),
    ("cifar10", "gda"): (0.1611, 0.00086),
    ("cifar10", "extraprop"): (0.5833, None),
    ("cifar10", "distprop"): (0.6540, 0.0745),
}


class NoFinishedRunsError(FileNotFoundError):
    """A root contains no run directory with a ``summary.json``."""


@dataclass
class Run:
    """One finished run: its files, parsed, and the group it belongs to.

    Attributes:
        run_dir: the run directory.
        dataset: the data set name from ``summary.json``.
        group: the method or row name the run is averaged under.
        seed: the training seed.
        summary: the parsed ``summary.json``.
        config: the parsed ``config.json`` (empty when missing).
        records: the ``metrics.jsonl`` records, one per step, sorted by step.
    """

    run_dir: Path
    dataset: str
    group: str
    seed: int
    summary: dict
    config: dict
    records: list[dict] = field(default_factory=list)

    def curve(self, quantity: str) -> dict[int, float]:
        """Return step -> value of one quantity, over the steps that recorded it."""
        values = {}
        for record in self.records:
            value = quantity_value(record, quantity)
            if value is not None:
                values[record["step"]] = value
        return values


def quantity_value(record: dict, quantity: str) -> float | None:
    """Return one quantity of a metrics record, derived ones included, or None if absent."""
    if quantity == "mean_abs_defect":
        defects = [v for k, v in record.items() if k.startswith(DEFECT_PREFIX)]
        # Backprop has no constraints, so its defect is zero, as in its summary.
        return sum(defects) / len(defects) if defects else 0.0
    if quantity == "test_error":
        accuracy = record.get("test_accuracy")
        return None if accuracy is None else 1.0 - accuracy
    value = record.get(quantity)
    return None if value is None else float(value)


def read_metrics(path: Path) -> list[dict]:
    """Read ``metrics.jsonl``, keeping the last record of each step, sorted by step.

    A resumed run may repeat the steps after its checkpoint, and a killed run may
    end with a partly written line, which is skipped.
    """
    by_step = {}
    if not path.exists():
        return []
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def group_name(run_dir: Path) -> str:
    return run_dir.parent.name if SEED_DIR.match(run_dir.name) else run_dir.name


def load_run(run_dir: Path) -> Run:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    config_path = run_dir / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return Run(
        run_dir=run_dir,
        dataset=str(summary.get("dataset", config.get("dataset", "?"))),
        group=group_name(run_dir),
        seed=int(summary.get("seed", config.get("seed", 0))),
        summary=summary,
        config=config,
        records=read_metrics(run_dir / METRICS_FILE),
    )


@dataclass
class RootContents:
    """The runs under a root: finished ones loaded, failed and unfinished ones as paths."""

    finished: list[Run]
    failed: list[Path]
    unfinished: list[Path]


def load_root(root: Path) -> RootContents:
    """Load every finished run under ``root`` and list the failed and unfinished ones.

    Raises:
        NoFinishedRunsError: no ``summary.json`` exists under ``root``.
    """
    if not root.is_dir():
        raise NoFinishedRunsError(f"root {root} is not a directory")
    finished = [load_run(path.parent) for path in sorted(root.rglob(SUMMARY_FILE))]
    done = {run.run_dir for run in finished}
    failed = sorted(p.parent for p in root.rglob(ERROR_FILE) if p.parent not in done)
    settled = done | set(failed)
    unfinished = sorted(p.parent for p in root.rglob(CONFIG_FILE) if p.parent not in settled)
    if not finished:
        raise NoFinishedRunsError(
            f"no finished runs under {root}: no {SUMMARY_FILE} found "
            f"({len(failed)} failed, {len(unfinished)} unfinished)"
        )
    return RootContents(finished, failed, unfinished)


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Group runs by (data set, method or row), ordered like the paper's Table 1.

    Data sets follow ``distprop_fast.data.DATASETS``; rows follow
    ``distprop_fast.train.METHODS`` by their method, then by name.
    """
    from distprop_fast.data import DATASETS

    methods = list(training_module().METHODS)

    def order(key: tuple[str, str], method: str) -> tuple:
        dataset, group = key
        dataset_rank = DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS)
        method_rank = methods.index(method) if method in methods else len(methods)
        return (dataset_rank, dataset, method_rank, group)

    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.group), []).append(run)
    keys = sorted(groups, key=lambda k: order(k, str(groups[k][0].summary.get("method", k[1]))))
    return {key: sorted(groups[key], key=lambda run: run.seed) for key in keys}


def sample_std(values: list[float]) -> float:
    """Return the sample standard deviation (n - 1), or 0 for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def format_steps(steps: list[int]) -> str:
    low, high = min(steps), max(steps)
    return f"{low}" if low == high else f"{low}-{high}"


def format_optional(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table1_markdown(groups: dict[tuple[str, str], list[Run]], contents: RootContents) -> str:
    """Return the Markdown table of all groups, with notes on failed and unfinished runs."""
    lines = [
        (
            "| data set | method | test accuracy (mean ± std) | seeds | final mean abs defect "
            "(mean) | wall time (s, mean) | steps | paper accuracy | paper defect |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, group), runs in groups.items():
        accuracies = [float(run.summary.get("test_accuracy", math.nan)) for run in runs]
        defects = [float(run.summary.get("final_mean_abs_defect", 0.0)) for run in runs]
        wall_times = [float(run.summary.get("wall_time_s", math.nan)) for run in runs]
        steps = [int(run.summary.get("steps", 0)) for run in runs]
        paper_accuracy, paper_defect = PAPER_TABLE1.get((dataset, group), (None, None))
        lines.append(
            f"| {dataset} | {group} "
            f"| {np.mean(accuracies):.4f} ± {sample_std(accuracies):.4f} | {len(runs)} "
            f"| {np.mean(defects):.3g} | {np.mean(wall_times):.1f} | {format_steps(steps)} "
            f"| {format_optional(paper_accuracy, '.4f')} | {format_optional(paper_defect, '.2g')} |"
        )
    lines += [
        "",
        (
            "Standard deviations are sample standard deviations (n - 1) over seeds; "
            "0 for a single seed. Paper columns: Table 1 of the DistProp paper."
        ),
    ]
    for label, paths in (("Failed", contents.failed), ("Unfinished", contents.unfinished)):
        if paths:
            lines += ["", f"{label} runs (not in the table): {len(paths)}", ""]
            lines += [f"- {path}" for path in paths]
    return "\n".join(lines) + "\n"


def curve_band(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (steps, mean, std) over runs at every step that at least one run recorded.

    The standard deviation is the sample one (n - 1) and 0 where one run recorded
    the step, so runs of different lengths share the steps they have in common.
    """
    steps = sorted(set().union(*curves)) if curves else []
    means, stds = [], []
    for step in steps:
        values = [curve[step] for curve in curves if step in curve]
        means.append(float(np.mean(values)))
        stds.append(sample_std(values))
    return np.array(steps), np.array(means), np.array(stds)


CSV_QUANTITIES = ("mean_abs_defect", "test_accuracy", "test_loss")


def write_curves_csv(path: Path, runs: list[Run]) -> None:
    """Write dataset, method, seed, step, quantity, value for every plotted curve and cut."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "method", "seed", "step", "quantity", "value"])
        for run in runs:
            cuts = sorted({k for r in run.records for k in r if k.startswith(DEFECT_PREFIX)})
            for quantity in (*CSV_QUANTITIES, *cuts):
                for step, value in run.curve(quantity).items():
                    writer.writerow([run.dataset, run.group, run.seed, step, quantity, value])


def pyplot():
    """Import matplotlib's pyplot on the file-only Agg backend.

    Raises:
        ImportError: matplotlib is missing, with the install command.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the report needs matplotlib: pip install 'distprop_fast[report]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_band(axis, curves: list[dict[int, float]], label: str, positive_only: bool) -> bool:
    """Draw a mean line and a +-1 std band; return False when nothing could be drawn."""
    steps, mean, std = curve_band(curves)
    if positive_only:
        # A log axis cannot show zero, e.g. backprop's defect.
        keep = mean > 0
        steps, mean, std = steps[keep], mean[keep], std[keep]
    if steps.size == 0:
        return False
    # Markers keep curves with a few evaluation points (or one) visible.
    marker = "o" if steps.size <= 50 else None
    (line,) = axis.plot(
        steps,
        mean,
        label=f"{label} (n={len(curves)})",
        linewidth=1.2,
        marker=marker,
        markersize=3,
    )
    low = mean - std
    if positive_only:
        low = np.maximum(low, mean * 1e-3)
    axis.fill_between(steps, low, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return True


def datasets_of(groups: dict[tuple[str, str], list[Run]]) -> list[str]:
    return list(dict.fromkeys(dataset for dataset, _ in groups))


def plot_defect(groups: dict[tuple[str, str], list[Run]], path: Path) -> None:
    """Plot the mean absolute defect against steps, one panel per data set, log y axis."""
    plt = pyplot()
    datasets = datasets_of(groups)
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        drawn = False
        for (group_dataset, group), runs in groups.items():
            if group_dataset == dataset:
                curves = [run.curve("mean_abs_defect") for run in runs]
                drawn |= plot_band(axis, curves, group, positive_only=True)
        axis.set_yscale("log" if drawn else "linear")
        axis.set_title(f"{dataset}: mean absolute defect (mean ± 1 std over runs)")
        axis.set_xlabel("step")
        axis.set_ylabel("mean absolute defect")
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(
                0.5, 0.5, "no positive defect recorded", ha="center", transform=axis.transAxes
            )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_test_curves(groups: dict[tuple[str, str], list[Run]], path: Path) -> None:
    """Plot test loss and test error against steps, one row of two panels per data set."""
    plt = pyplot()
    datasets = datasets_of(groups)
    figure, axes = plt.subplots(len(datasets), 2, figsize=(12, 4.2 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        for axis, quantity, title in (
            (row[0], "test_loss", "test loss"),
            (row[1], "test_error", "test error"),
        ):
            for (group_dataset, group), runs in groups.items():
                if group_dataset == dataset:
                    plot_band(axis, [run.curve(quantity) for run in runs], group, False)
            axis.set_title(f"{dataset}: {title} (mean ± 1 std over seeds)")
            axis.set_xlabel("step")
            axis.set_ylabel(title)
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(root: Path, out: Path) -> list[Path]:
    """Write table.md, defect.png, test_curves.png and curves.csv for the runs under ``root``.

    Returns the written paths.

    Raises:
        NoFinishedRunsError: ``root`` contains no finished run.
        ImportError: matplotlib is missing.
    """
    contents = load_root(root)
    groups = group_runs(contents.finished)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table.md", out / "defect.png", out / "test_curves.png", out / "curves.csv"]
    paths[0].write_text(table1_markdown(groups, contents))
    plot_defect(groups, paths[1])
    plot_test_curves(groups, paths[2])
    write_curves_csv(paths[3], contents.finished)
    return paths
