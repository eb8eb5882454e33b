"""Triton launchers against the pure-PyTorch reference, forward and backward.

On a CUDA machine the kernels are compiled and run on CUDA tensors. Without
CUDA they run on CPU tensors under the Triton interpreter, which must be
switched on before ``triton`` is first imported::

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py

This module sets ``TRITON_INTERPRET=1`` itself when no CUDA device exists and no
earlier test module has imported ``triton``. If one has, the tests skip and
name the command above. The interpreter is slow, so the shapes are small.

The oracle is the reference evaluated in float64 on the same stored values,
compared with the tolerance of the storage dtype (``tests/compare.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from distprop_fast.ops import reference
from distprop_fast.ops._triton.sample_classes import (
    _sample_classes_fwd_kernel,
    sample_classes_bwd,
    sample_classes_fwd,
)
from distprop_fast.ops._triton.sparse_extra_adagrad import sparse_extra_adagrad_
from distprop_fast.ops._triton.zscore_constraint import (
    zscore_constraint_bwd,
    zscore_constraint_fwd,
)
from tests.compare import assert_close

RUN_COMMAND = "TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py"


def _pick_device() -> tuple[str | None, str]:
    """Return the device the kernels can run on, or ``None`` and the reason they cannot."""
    # Triton's own helpers (tl.zeros, ...) are decorated when triton is imported,
    # and ours when their module is imported: both must be in the same mode.
    library_interpreted = isinstance(triton.language.zeros, InterpretedFunction)
    kernels_interpreted = isinstance(_sample_classes_fwd_kernel, InterpretedFunction)
    if library_interpreted and kernels_interpreted:
        return "cpu", ""
    if not library_interpreted and not kernels_interpreted and torch.cuda.is_available():
        return "cuda", ""
    if library_interpreted != kernels_interpreted:
        return None, (
            "TRITON_INTERPRET changed between importing triton and distprop_fast.ops._triton; "
            f"run `{RUN_COMMAND}`"
        )
    return None, (
        "no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set; "
        f"run `{RUN_COMMAND}`"
    )


DEVICE, SKIP_REASON = _pick_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)

STORAGE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


def strided(tensor: torch.Tensor) -> torch.Tensor:
    """Return a non-contiguous view with the values of ``tensor`` (every other column)."""
    wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype, device=DEVICE)
    wide[..., ::2] = tensor
    view = wide[..., ::2]
    assert tensor.numel() <= 1 or not view.is_contiguous()
    return view


def assert_sum_close(actual, expected, magnitude, dtype, what):
    """Compare a sum whose terms may cancel, with the tolerance relative to ``magnitude``.

    A float32 sum is accurate relative to the sum of its terms' magnitudes, not to
    its result, which can cancel to near zero. Shifting both sides by
    ``magnitude`` (the sum of absolute terms) keeps the error and makes
    ``assert_close`` scale its relative tolerance by that magnitude.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}"
    shift = magnitude.detach().double().cpu()
    error = actual.detach().double().cpu() - expected.detach().double().cpu()
    assert_close(shift + error, shift, dtype, what)


def float64_leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().double().cpu().requires_grad_(True)


# ---------------------------------------------------------------------------
# sample_classes
# ---------------------------------------------------------------------------

# (N, M, d)
SAMPLE_SHAPES = [
    (1, 1, 1),  # single element
    (3, 4, 5),  # non-power-of-two d
    (6, 3, 37),  # N not a multiple of the 4 samples per forward program
    (5, 2, 515),  # M * d = 1030 spans two forward blocks of 1024
]


def check_sample_classes(w_mu, w_sigma, noise, grad_samples, dtype):
    samples = sample_classes_fwd(w_mu, w_sigma, noise)
    grad_mu, grad_sigma = sample_classes_bwd(grad_samples, w_sigma, noise)

    mu64, sigma64 = float64_leaf(w_mu), float64_leaf(w_sigma)
    expected = reference.sample_classes(mu64, sigma64, noise.double().cpu())
    expected.backward(grad_samples.double().cpu())

    assert samples.dtype == dtype
    assert grad_mu.dtype == w_sigma.dtype
    assert grad_sigma.dtype == w_sigma.dtype
    assert_close(samples, expected, dtype, "samples")
    # sums over the N samples
    grad64, noise64 = grad_samples.double().cpu(), noise.double().cpu()
    grad_mu_magnitude = grad64.abs().sum(0)
    grad_sigma_magnitude = (grad64 * noise64).abs().sum(0) * torch.sigmoid(sigma64.detach())
    assert_sum_close(grad_mu, mu64.grad, grad_mu_magnitude, dtype, "grad_mu")
    assert_sum_close(grad_sigma, sigma64.grad, grad_sigma_magnitude, dtype, "grad_sigma")


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("shape", SAMPLE_SHAPES)
def test_sample_classes_matches_reference(shape, dtype):
    torch.manual_seed(0)
    n, m, d = shape
    # w_sigma spans both sides of softplus's linear threshold at 20
    w_mu, w_sigma = randn(m, d, dtype=dtype), randn(m, d, dtype=dtype, scale=12.0)
    noise, grad_samples = randn(n, m, d, dtype=dtype), randn(n, m, d, dtype=dtype)
    check_sample_classes(w_mu, w_sigma, noise, grad_samples, dtype)


def test_sample_classes_non_contiguous():
    torch.manual_seed(1)
    w_mu = randn(7, 3).t()
    w_sigma = strided(randn(3, 7))
    noise = strided(randn(4, 3, 7))
    grad_samples = randn(4, 7, 3).transpose(1, 2)
    assert not w_mu.is_contiguous()
    assert not grad_samples.is_contiguous()
    check_sample_classes(w_mu, w_sigma, noise, grad_samples, torch.float32)


def test_sample_classes_extreme_scales():
    # softplus of -30 is about 1e-13: the log1p form must keep its relative precision
    w_sigma = torch.tensor([[-30.0, -17.0, 0.0, 19.9, 20.1, 60.0]], device=DEVICE)
    w_mu = torch.zeros_like(w_sigma)
    noise = torch.ones(1, *w_sigma.shape, device=DEVICE)
    check_sample_classes(w_mu, w_sigma, noise, torch.ones_like(noise), torch.float32)


def test_sample_classes_no_samples():
    w_mu, w_sigma = randn(3, 4), randn(3, 4)
    noise = randn(0, 3, 4)

    samples = sample_classes_fwd(w_mu, w_sigma, noise)
    grad_mu, grad_sigma = sample_classes_bwd(noise, w_sigma, noise)

    assert samples.shape == (0, 3, 4)
    assert torch.equal(grad_mu, torch.zeros_like(grad_mu))
    assert torch.equal(grad_sigma, torch.zeros_like(grad_sigma))


def test_sample_classes_rejects_bad_input():
    w = randn(3, 4)
    with pytest.raises(ValueError, match=r"noise must have shape \(N, M, d\)"):
        sample_classes_fwd(w, w, randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"w_sigma must have shape \(3, 4\)"):
        sample_classes_fwd(w, randn(3, 5), randn(2, 3, 4))
    with pytest.raises(TypeError, match="float64"):
        sample_classes_fwd(w.double(), w, randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"grad_samples must have shape \(2, 3, 4\)"):
        sample_classes_bwd(randn(1, 3, 4), w, randn(2, 3, 4))


# ---------------------------------------------------------------------------
# zscore_constraint
# ---------------------------------------------------------------------------

# (B, M, d, margin); zscore_inputs draws labels from the even classes only.
ZSCORE_CASES = [
    (1, 1, 1, 0.5),  # single element
    (7, 3, 5, 0.0),  # margin 0: no shrink
    (40, 2, 300, 0.8),  # several column blocks, 40 rows of one class span 3 row tiles
    (9, 6, 13, 0.3),  # classes 1, 3 and 5 absent from the batch
    (150, 2, 3, 0.5),  # narrow rows: 150 rows of one class span 2 row tiles of 128
]


def check_zscore(a, labels, w_mu, w_sigma, margin, multipliers, grad_defect, grad_term, dtype):
    defect, term = zscore_constraint_fwd(a, labels, w_mu, w_sigma, margin, multipliers)
    grads = zscore_constraint_bwd(
        grad_defect, grad_term, a, labels, w_mu, w_sigma, margin, multipliers
    )
    grad_a, grad_mu, grad_sigma, grad_multipliers = grads

    leaves = [float64_leaf(t) for t in (a, w_mu, w_sigma, multipliers)]
    a64, mu64, sigma64, lambda64 = leaves
    expected, expected_term = reference.zscore_constraint(
        a64, labels.long().cpu(), mu64, sigma64, margin, lambda64
    )
    objective = expected_term * (0.0 if grad_term is None else grad_term.double().cpu())
    if grad_defect is not None:
        objective = objective + (expected * grad_defect.double().cpu()).sum()
    objective.backward()

    assert defect.dtype == dtype
    assert term.dtype == torch.float32
    assert term.shape == ()
    assert_close(defect, expected, dtype, "defect")
    # the term is one float32 sum over B * d products
    term_magnitude = expected_term.abs()
    if multipliers is not None:
        term_magnitude = (expected * lambda64).abs().sum()
    assert_sum_close(term, expected_term, term_magnitude, torch.float32, "term")
    assert grad_a.dtype == a.dtype
    assert grad_mu.dtype == w_mu.dtype
    assert grad_sigma.dtype == w_sigma.dtype
    assert_close(grad_a, a64.grad, dtype, "grad_a")
    # grad_mu and grad_sigma sum the rows of each class
    with torch.no_grad():
        labels64 = labels.long().cpu()
        z64 = (a64 - mu64[labels64]) / torch.nn.functional.softplus(sigma64)[labels64]
        grad_mu_terms = a64.grad.abs()
        grad_sigma_terms = (a64.grad * z64).abs()
        grad_mu_magnitude = torch.zeros_like(mu64).index_add_(0, labels64, grad_mu_terms)
        grad_sigma_magnitude = torch.zeros_like(sigma64).index_add_(0, labels64, grad_sigma_terms)
        grad_sigma_magnitude *= torch.sigmoid(sigma64)
    assert_sum_close(grad_mu, mu64.grad, grad_mu_magnitude, dtype, "grad_mu")
    assert_sum_close(grad_sigma, sigma64.grad, grad_sigma_magnitude, dtype, "grad_sigma")
    if multipliers is None:
        assert grad_multipliers is None
    else:
        assert grad_multipliers.dtype == multipliers.dtype
        assert_close(grad_multipliers, lambda64.grad, dtype, "grad_multipliers")


def zscore_inputs(batch, num_classes, d, dtype, seed=0):
    torch.manual_seed(seed)
    a = randn(batch, d, dtype=dtype, scale=2.0)
    # labels from the even classes only, so odd classes get zero gradients
    labels = (torch.randint(0, (num_classes + 1) // 2, (batch,)) * 2).to(DEVICE)
    w_mu = randn(num_classes, d, dtype=dtype)
    w_sigma = randn(num_classes, d, dtype=dtype)
    multipliers = randn(batch, d, dtype=dtype)
    grad_defect = randn(batch, d, dtype=dtype)
    grad_term = torch.tensor(0.7, device=DEVICE)
    return a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term


@pytest.mark.parametrize("with_multipliers", [True, False])
@pytest.mark.parametrize("case", ZSCORE_CASES)
def test_zscore_constraint_float32(case, with_multipliers):
    batch, num_classes, d, margin = case
    a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term = zscore_inputs(
        batch, num_classes, d, torch.float32
    )
    if not with_multipliers:
        multipliers = None
    check_zscore(
        a, labels, w_mu, w_sigma, margin, multipliers, grad_defect, grad_term, torch.float32
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zscore_constraint_half_storage(dtype):
    a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term = zscore_inputs(33, 4, 19, dtype)
    check_zscore(a, labels, w_mu, w_sigma, 0.5, multipliers, grad_defect, grad_term, dtype)


def test_zscore_constraint_float32_multipliers_half():
    # multipliers often live in a float16 table while the network runs in float32
    a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term = zscore_inputs(
        12, 3, 10, torch.float32
    )
    multipliers = multipliers.half()
    defect, term = zscore_constraint_fwd(a, labels, w_mu, w_sigma, 0.5, multipliers)
    expected, expected_term = reference.zscore_constraint(
        a.double(), labels, w_mu.double(), w_sigma.double(), 0.5, multipliers.double()
    )
    grads = zscore_constraint_bwd(
        grad_defect, grad_term, a, labels, w_mu, w_sigma, 0.5, multipliers
    )

    assert defect.dtype == torch.float32
    assert_close(defect, expected, torch.float32, "defect")
    assert_close(term, expected_term, torch.float32, "term")
    assert grads[3].dtype == torch.float16
    assert_close(grads[3], grad_term.double() * expected, torch.float16, "grad_multipliers")


def test_zscore_constraint_small_sigma():
    # softplus(-25) is about 1.4e-11 and softplus(-10) about 4.5e-5: a plain
    # log(1 + exp(x)) in float32 returns 0 or loses three digits there, and z with it.
    w_sigma = torch.tensor([[-25.0, -17.0, -10.0, -3.0, 0.0, 25.0]], device=DEVICE)
    sigma = torch.nn.functional.softplus(w_sigma.double())
    w_mu = randn(1, 6)
    steps = torch.tensor([[0.5, -2.0, 3.0, -0.25, 1.5, -1.0]], dtype=torch.float64)
    a = (w_mu.double().cpu() + steps * sigma.cpu()).float().to(DEVICE)
    labels = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    multipliers, grad_defect = randn(1, 6), randn(1, 6)
    grad_term = torch.tensor(0.5, device=DEVICE)
    check_zscore(a, labels, w_mu, w_sigma, 0.3, multipliers, grad_defect, grad_term, torch.float32)


def test_zscore_constraint_non_contiguous_int32_labels():
    a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term = zscore_inputs(
        10, 3, 6, torch.float32, seed=2
    )
    labels_view = strided(labels.int())
    assert not labels_view.is_contiguous()
    check_zscore(
        strided(a),
        labels_view,
        w_mu.t().contiguous().t(),
        strided(w_sigma),
        0.4,
        strided(multipliers),
        strided(grad_defect),
        grad_term,
        torch.float32,
    )


def test_zscore_constraint_missing_grads():
    a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term = zscore_inputs(
        8, 2, 5, torch.float32, seed=3
    )
    # no gradient for the term: only grad_defect flows
    check_zscore(a, labels, w_mu, w_sigma, 0.3, multipliers, grad_defect, None, torch.float32)
    # no gradient for the defect: only the term's gradient flows
    check_zscore(a, labels, w_mu, w_sigma, 0.3, multipliers, None, grad_term, torch.float32)


@settings(max_examples=20, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    num_classes=st.integers(1, 5),
    d=st.integers(1, 9),
    margin=st.sampled_from([0.0, 0.5]),
)
def test_zscore_constraint_random_labels(labels, num_classes, d, margin):
    torch.manual_seed(len(labels))
    labels = torch.tensor(labels, device=DEVICE) % num_classes
    batch = labels.numel()
    a, multipliers, grad_defect = randn(batch, d), randn(batch, d), randn(batch, d)
    w_mu, w_sigma = randn(num_classes, d), randn(num_classes, d)
    grad_term = torch.tensor(-1.3, device=DEVICE)
    check_zscore(
        a, labels, w_mu, w_sigma, margin, multipliers, grad_defect, grad_term, torch.float32
    )


def test_zscore_constraint_bwd_deterministic():
    inputs = zscore_inputs(64, 3, 20, torch.float32, seed=4)
    a, labels, w_mu, w_sigma, multipliers, grad_defect, grad_term = inputs

    first = zscore_constraint_bwd(
        grad_defect, grad_term, a, labels, w_mu, w_sigma, 0.2, multipliers
    )
    second = zscore_constraint_bwd(
        grad_defect, grad_term, a, labels, w_mu, w_sigma, 0.2, multipliers
    )

    for name, x, y in zip(("grad_a", "grad_mu", "grad_sigma", "grad_mult"), first, second):
        assert torch.equal(x, y), name


def test_zscore_constraint_empty_batch():
    w_mu, w_sigma = randn(3, 4), randn(3, 4)
    a, labels = randn(0, 4), torch.zeros(0, dtype=torch.int64, device=DEVICE)

    defect, term = zscore_constraint_fwd(a, labels, w_mu, w_sigma, 0.5, randn(0, 4))
    grads = zscore_constraint_bwd(randn(0, 4), term, a, labels, w_mu, w_sigma, 0.5, randn(0, 4))

    assert defect.shape == (0, 4)
    assert float(term) == 0.0
    assert grads[0].shape == (0, 4)
    assert torch.equal(grads[1], torch.zeros_like(w_mu))
    assert torch.equal(grads[2], torch.zeros_like(w_sigma))


def test_zscore_constraint_rejects_bad_input():
    a, labels, w_mu, w_sigma, multipliers, _, _ = zscore_inputs(4, 3, 5, torch.float32)
    out_of_range = torch.tensor([0, 1, 3, 2], device=DEVICE)
    with pytest.raises(
        IndexError, match=r"labels values must lie in \[0, 3\), got min 0 and max 3"
    ):
        zscore_constraint_fwd(a, out_of_range, w_mu, w_sigma, 0.5, None)
    with pytest.raises(IndexError, match=r"got min -1"):
        zscore_constraint_bwd(a, None, a, -out_of_range.clamp(max=1), w_mu, w_sigma, 0.5, None)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        zscore_constraint_fwd(a, labels[:3], w_mu, w_sigma, 0.5, None)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        zscore_constraint_fwd(a, labels.float(), w_mu, w_sigma, 0.5, None)
    with pytest.raises(ValueError, match=r"multipliers must have shape \(4, 5\)"):
        zscore_constraint_fwd(a, labels, w_mu, w_sigma, 0.5, multipliers[:, :4])
    with pytest.raises(ValueError, match="w_mu must have d = 5 columns"):
        zscore_constraint_fwd(a, labels, w_mu[:, :4], w_sigma[:, :4], 0.5, None)
    with pytest.raises(ValueError, match="margin must be a number, got NaN"):
        zscore_constraint_fwd(a, labels, w_mu, w_sigma, float("nan"), None)
    with pytest.raises(ValueError, match="grad_term must hold one value"):
        zscore_constraint_bwd(a, a, a, labels, w_mu, w_sigma, 0.5, multipliers)


# ---------------------------------------------------------------------------
# sparse_extra_adagrad_
# ---------------------------------------------------------------------------

# (|D|, B, d, index)
ADAGRAD_CASES = [
    (1, 1, 1, [0]),  # one row
    (10, 6, 5, [3, 7, 3, 0, 9, 3]),  # duplicates, the first and last batch rows among them
    (6, 4, 3, [2, 2, 2, 2]),  # every batch row on the same table row
    (12, 3, 515, [11, 0, 11]),  # d = 515 spans two column blocks of 512
]


def adagrad_state(rows, d, dtype, seed=0):
    torch.manual_seed(seed)
    table = randn(rows, d, dtype=dtype)
    accum = torch.rand(rows, d, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    return table, accum


def reference_adagrad(table, accum, index, grad, lr, eps, phase, saved, maximize):
    """Return the float64 reference's ``(table, accum, saved)`` after one half-step."""
    table64, accum64 = table.double().cpu(), accum.double().cpu()
    saved64 = None if saved is None else saved.double().cpu()
    saved64 = reference.sparse_extra_adagrad_(
        table64,
        accum64,
        index.long().cpu(),
        grad.double().cpu(),
        lr,
        eps,
        phase,
        saved64,
        maximize,
    )
    return table64, accum64, saved64


def assert_rows_unchanged(after, before, index, message):
    untouched = torch.ones(before.shape[0], dtype=torch.bool)
    untouched[index.long().cpu()] = False
    assert torch.equal(after.cpu()[untouched], before.cpu()[untouched]), message


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("update_phase", [False, True])
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
@pytest.mark.parametrize("case", ADAGRAD_CASES)
def test_sparse_extra_adagrad_half_step(case, dtype, update_phase, maximize):
    rows, batch, d, index = case
    table, accum = adagrad_state(rows, d, dtype)
    index = torch.tensor(index, device=DEVICE)
    grad = randn(batch, d, dtype=dtype)
    saved = randn(batch, d, dtype=dtype) if update_phase else torch.empty_like(grad)
    if update_phase:
        # the extrapolation saved identical rows for duplicate indices
        saved = saved[torch.unique(index, return_inverse=True)[1]]
    phase = "update" if update_phase else "extrapolate"
    expected = reference_adagrad(
        table, accum, index, grad, 0.1, 1e-8, phase, saved if update_phase else None, maximize
    )
    table_before, accum_before, saved_before = table.clone(), accum.clone(), saved.clone()

    sparse_extra_adagrad_(table, accum, index, grad, saved, 0.1, 1e-8, update_phase, maximize)

    expected_table, expected_accum, _ = expected
    assert_close(table, expected_table, dtype, "table")
    assert_close(accum, expected_accum, dtype, "accum")
    if update_phase:
        assert torch.equal(saved, saved_before), "saved changed in the update phase"
    else:
        assert torch.equal(saved.cpu(), table_before.cpu()[index.cpu()]), "saved"
    assert_rows_unchanged(table, table_before, index, "rows outside index changed in table")
    assert_rows_unchanged(accum, accum_before, index, "rows outside index changed in accum")


def test_sparse_extra_adagrad_update_restores_last_duplicate():
    # Duplicates normally saved equal rows. When they differ, the update restores
    # the last one, as a sequential `table[index] = saved` would.
    table, accum = adagrad_state(4, 3, torch.float32, seed=8)
    index = torch.tensor([2, 0, 2], device=DEVICE)
    saved = randn(3, 3)
    grad = torch.zeros(3, 3, device=DEVICE)

    sparse_extra_adagrad_(table, accum, index, grad, saved, 0.1, 1e-8, True, False)

    assert torch.equal(table[2], saved[2])
    assert torch.equal(table[0], saved[1])


def test_sparse_extra_adagrad_two_phases_float32():
    # A whole ExtraAdagrad step in float32 against the float32 reference: same
    # operations in the same order, so only sqrt/division rounding may differ.
    table, accum = adagrad_state(9, 7, torch.float32, seed=5)
    index = torch.tensor([4, 1, 4, 8, 1, 4], device=DEVICE)
    look_ahead_grad, grad = randn(6, 7), randn(6, 7)
    table_ref, accum_ref = table.cpu().clone(), accum.cpu().clone()
    saved = torch.empty(6, 7, device=DEVICE)

    sparse_extra_adagrad_(table, accum, index, look_ahead_grad, saved, 0.05, 1e-10, False, True)
    sparse_extra_adagrad_(table, accum, index, grad, saved, 0.05, 1e-10, True, True)
    saved_ref = reference.sparse_extra_adagrad_(
        table_ref,
        accum_ref,
        index.cpu(),
        look_ahead_grad.cpu(),
        0.05,
        1e-10,
        "extrapolate",
        maximize=True,
    )
    reference.sparse_extra_adagrad_(
        table_ref,
        accum_ref,
        index.cpu(),
        grad.cpu(),
        0.05,
        1e-10,
        "update",
        saved_ref,
        maximize=True,
    )

    assert torch.equal(saved.cpu(), saved_ref)
    assert_close(table, table_ref, torch.float32, "table")
    assert_close(accum, accum_ref, torch.float32, "accum")


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 8),
    d=st.integers(1, 20),
    index=st.lists(st.integers(0, 7), min_size=1, max_size=10),
    maximize=st.booleans(),
)
def test_sparse_extra_adagrad_random_duplicates(rows, d, index, maximize):
    table, accum = adagrad_state(rows, d, torch.float32, seed=len(index))
    index = torch.tensor(index, device=DEVICE) % rows
    batch = index.numel()
    look_ahead_grad, grad = randn(batch, d), randn(batch, d)
    table_ref, accum_ref = table.cpu().clone(), accum.cpu().clone()
    table_before = table.clone()
    saved = torch.empty(batch, d, device=DEVICE)

    sparse_extra_adagrad_(table, accum, index, look_ahead_grad, saved, 0.1, 1e-8, False, maximize)
    sparse_extra_adagrad_(table, accum, index, grad, saved, 0.1, 1e-8, True, maximize)
    saved_ref = reference.sparse_extra_adagrad_(
        table_ref,
        accum_ref,
        index.cpu(),
        look_ahead_grad.cpu(),
        0.1,
        1e-8,
        "extrapolate",
        maximize=maximize,
    )
    reference.sparse_extra_adagrad_(
        table_ref,
        accum_ref,
        index.cpu(),
        grad.cpu(),
        0.1,
        1e-8,
        "update",
        saved_ref,
        maximize=maximize,
    )

    assert torch.equal(saved.cpu(), saved_ref)
    assert_close(table, table_ref, torch.float32, "table")
    assert_close(accum, accum_ref, torch.float32, "accum")
    assert_rows_unchanged(table, table_before, index, "rows outside index changed in table")


def test_sparse_extra_adagrad_strided_in_place():
    # table, accum and saved are views into wider buffers: the kernel must write
    # through the views' strides and leave every other element of the buffers alone.
    table_buffer, accum_buffer = adagrad_state(8, 10, torch.float32, seed=6)
    accum_buffer = accum_buffer.t().contiguous().t()
    table, accum = table_buffer[:, 2:7], accum_buffer[:, 2:7]
    saved_buffer = torch.zeros(4, 10, device=DEVICE)
    saved = saved_buffer[:, ::2]
    index = torch.tensor([5, 0, 2, 0, 7, 0, 2, 0], device=DEVICE)[::2]
    grad = randn(5, 4).t()
    for name, view in (("table", table), ("accum", accum), ("saved", saved), ("grad", grad)):
        assert not view.is_contiguous(), name
    assert not index.is_contiguous()
    expected = reference_adagrad(table, accum, index, grad, 0.1, 1e-8, "extrapolate", None, False)
    table_buffer_before = table_buffer.clone()
    accum_buffer_before = accum_buffer.clone()

    sparse_extra_adagrad_(table, accum, index, grad, saved, 0.1, 1e-8, False, False)

    assert_close(table, expected[0], torch.float32, "table")
    assert_close(accum, expected[1], torch.float32, "accum")
    assert torch.equal(saved.cpu(), expected[2].float())
    outside = torch.ones(8, 10, dtype=torch.bool, device=DEVICE)
    outside[:, 2:7] = False
    assert torch.equal(table_buffer[outside], table_buffer_before[outside])
    assert torch.equal(accum_buffer[outside], accum_buffer_before[outside])
    assert torch.equal(saved_buffer[:, 1::2], torch.zeros(4, 5, device=DEVICE))


def test_sparse_extra_adagrad_int32_index_and_empty_batch():
    table, accum = adagrad_state(5, 3, torch.float32, seed=7)
    index = torch.tensor([4, 0, 4], dtype=torch.int32, device=DEVICE)
    grad = randn(3, 3)
    expected = reference_adagrad(table, accum, index, grad, 0.2, 1e-8, "extrapolate", None, False)
    saved = torch.empty(3, 3, device=DEVICE)

    sparse_extra_adagrad_(table, accum, index, grad, saved, 0.2, 1e-8, False, False)

    assert_close(table, expected[0], torch.float32, "table")
    assert_close(accum, expected[1], torch.float32, "accum")

    table_before, accum_before = table.clone(), accum.clone()
    empty_index = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    empty = torch.zeros(0, 3, device=DEVICE)
    sparse_extra_adagrad_(table, accum, empty_index, empty, empty, 0.2, 1e-8, False, False)
    assert torch.equal(table, table_before)
    assert torch.equal(accum, accum_before)


def test_sparse_extra_adagrad_rejects_bad_input():
    table, accum = adagrad_state(5, 3, torch.float32)
    index = torch.tensor([1, 5], device=DEVICE)
    grad, saved = randn(2, 3), randn(2, 3)
    table_before = table.clone()
    with pytest.raises(IndexError, match=r"index values must lie in \[0, 5\), got min 1 and max 5"):
        sparse_extra_adagrad_(table, accum, index, grad, saved, 0.1, 1e-8, False, False)
    assert torch.equal(table, table_before), "a rejected call changed the table"
    index = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"accum must have shape \(5, 3\)"):
        sparse_extra_adagrad_(table, accum[:4], index, grad, saved, 0.1, 1e-8, False, False)
    with pytest.raises(ValueError, match="grad must have d = 3 columns"):
        sparse_extra_adagrad_(table, accum, index, randn(2, 4), saved, 0.1, 1e-8, False, False)
    with pytest.raises(ValueError, match=r"saved must have shape \(2, 3\)"):
        sparse_extra_adagrad_(table, accum, index, grad, saved[:1], 0.1, 1e-8, False, False)
    with pytest.raises(ValueError, match="lr must be a finite number, got nan"):
        sparse_extra_adagrad_(table, accum, index, grad, saved, float("nan"), 1e-8, False, False)
    with pytest.raises(TypeError, match="index must be int64 or int32"):
        sparse_extra_adagrad_(table, accum, index.float(), grad, saved, 0.1, 1e-8, False, False)


# ---------------------------------------------------------------------------
# compilation for the GPU
# ---------------------------------------------------------------------------

# Compiles the kernels for sm_90 (H100/H200) with the ptxas that ships with
# triton. It needs no GPU, so it catches code the interpreter accepts but the
# compiler rejects. Exit code 77 means the toolchain is missing.
COMPILE_SCRIPT = """
import sys

import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    triton.knobs.nvidia.ptxas.path
except Exception as err:
    print(f"no offline NVIDIA toolchain in this triton: {err!r}")
    sys.exit(77)

from distprop_fast.ops._triton import sample_classes, sparse_extra_adagrad, zscore_constraint

INT64_POINTERS = {"labels_ptr", "order_ptr", "class_start_ptr", "sorted_index_ptr", "run_end_ptr"}
FLOAT32_POINTERS = {"partial_ptr", "grad_term_ptr"}
FLOATS = {"margin", "lr", "eps"}
FLAGS = {"HAS_MULTIPLIERS", "SHRINK", "HAS_GRAD_DEFECT", "UPDATE_PHASE", "MAXIMIZE"}
KERNELS = [
    (sample_classes._sample_classes_fwd_kernel, {"SAMPLES_PER_PROGRAM": 4, "BLOCK": 1024}),
    (sample_classes._sample_classes_bwd_kernel, {"BLOCK": 256}),
    (zscore_constraint._zscore_constraint_fwd_kernel, {"BLOCK_B": 8, "BLOCK_D": 256}),
    (zscore_constraint._zscore_constraint_bwd_kernel, {"BLOCK_B": 16, "BLOCK_D": 128}),
    (sparse_extra_adagrad._sparse_extra_adagrad_kernel, {"BLOCK_D": 512}),
]


def signature(kernel, constants, storage, integer):
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INT64_POINTERS:
            types[name] = "*i64"
        elif name in FLOAT32_POINTERS:
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*" + storage
        elif name in FLOATS:
            types[name] = "fp32"
        else:
            types[name] = integer
    return types


# float32 storage with 32-bit sizes and every flag on; bfloat16 storage with
# 64-bit sizes and every flag off
for storage, integer, flag in (("fp32", "i32", True), ("bf16", "i64", False)):
    for kernel, blocks in KERNELS:
        constants = dict(blocks)
        constants.update({name: flag for name in FLAGS if name in kernel.arg_names})
        source = ASTSource(kernel, signature(kernel, constants, storage, integer), constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm, kernel.__name__
        print("compiled", kernel.__name__, storage, integer, flag)
"""


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled") == 10, result.stdout
