"""Tests of the sparse-row ExtraAdagrad step: fused backends against the reference."""

from __future__ import annotations

import os
import resource

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distprop_fast.ops import reference, sparse_extra_adagrad_
from distprop_fast.ops._backend import extension_has
from tests.compare import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MiB = 2**20

needs_cpu_kernels = pytest.mark.skipif(
    not extension_has("sparse_extra_adagrad_", "CPU"),
    reason="distprop_fast._C is not built; run `pip install --no-build-isolation -e .`",
)


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """A fused C++ backend with its device; CUDA is probed only when a test runs."""
    name = request.param
    if name == "cpu" and not extension_has("sparse_extra_adagrad_", "CPU"):
        pytest.skip("distprop_fast._C is not built with CPU kernels")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not extension_has("sparse_extra_adagrad_", "CUDA"):
            pytest.skip("distprop_fast._C is not built with CUDA kernels")
    return name


def make_state(n_rows, d, dtype, accum_dtype=None, device="cpu", seed=0):
    """Return ``(table, accum)`` with random rows and a positive accumulator."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(n_rows, d, generator=generator)
    accum = torch.rand(n_rows, d, generator=generator)
    return table.to(device, dtype), accum.to(device, accum_dtype or dtype)


def make_batch(n_rows, batch, d, device="cpu", seed=1):
    """Return ``(index, grad, grad2)``. The index contains duplicates when B > 2."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n_rows, (batch,), generator=generator)
    if batch > 2:
        index[-1] = index[0]
        index[-2] = index[0]
    grad = torch.randn(batch, d, generator=generator)
    grad2 = torch.randn(batch, d, generator=generator)
    return index.to(device), grad.to(device), grad2.to(device)


def run_both_phases(table, accum, index, grad, grad2, backend, maximize, lr=0.1, eps=1e-6):
    """Run an extrapolation, then an update. Return the saved rows and the state after each."""
    saved = sparse_extra_adagrad_(
        table, accum, index, grad, lr, eps, "extrapolate", maximize=maximize, backend=backend
    )
    after_extrapolation = (table.clone(), accum.clone())
    returned = sparse_extra_adagrad_(
        table, accum, index, grad2, lr, eps, "update", saved, maximize=maximize, backend=backend
    )
    assert returned is saved
    return saved, after_extrapolation, (table, accum)


def reference_both_phases(table, accum, index, grad, grad2, maximize, lr=0.1, eps=1e-6):
    """The reference on float32 copies of the stored state, rounded back to the storage dtypes."""
    table32 = table.to(torch.float32, copy=True)
    accum32 = accum.to(torch.float32, copy=True)
    saved = reference.sparse_extra_adagrad_(
        table32, accum32, index, grad.float(), lr, eps, "extrapolate", maximize=maximize
    )
    after_extrapolation = (
        table32.to(table.dtype, copy=True),
        accum32.to(accum.dtype, copy=True),
    )
    # The update continues from the stored (rounded) state, as the fused path does.
    table32, accum32 = (t.to(torch.float32, copy=True) for t in after_extrapolation)
    saved = saved.to(table.dtype)
    reference.sparse_extra_adagrad_(
        table32, accum32, index, grad2.float(), lr, eps, "update", saved.float(), maximize=maximize
    )
    return saved, after_extrapolation, (table32.to(table.dtype), accum32.to(accum.dtype))


def check_against_reference(table, accum, index, grad, grad2, backend, maximize=False):
    expected = reference_both_phases(table, accum, index, grad, grad2, maximize)
    actual = run_both_phases(table.clone(), accum.clone(), index, grad, grad2, backend, maximize)
    assert_close(actual[0], expected[0], table.dtype, "saved rows")
    for phase, got, want in (
        ("extrapolation", actual[1], expected[1]),
        ("update", actual[2], expected[2]),
    ):
        assert_close(got[0], want[0], table.dtype, f"table after {phase}")
        assert_close(got[1], want[1], accum.dtype, f"accum after {phase}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("maximize", [False, True])
def test_step_matches_reference(backend, dtype, maximize):
    table, accum = make_state(50, 37, dtype, device=backend)
    index, grad, grad2 = make_batch(50, 16, 37, device=backend)
    check_against_reference(table, accum, index, grad, grad2, backend, maximize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_half_table_float_accumulator(backend, dtype):
    table, accum = make_state(20, 8, dtype, accum_dtype=torch.float32, device=backend)
    index, grad, grad2 = make_batch(20, 6, 8, device=backend)
    check_against_reference(table, accum, index, grad, grad2, backend, maximize=True)


@needs_cpu_kernels
def test_step_float64_table():
    # The reference steps in float32 whatever the storage, but the kernel steps
    # float64 tables in float64, so the two agree to float32 precision only.
    table, accum = make_state(10, 3, torch.float64)
    index, grad, grad2 = make_batch(10, 5, 3)
    expected = reference_both_phases(table, accum, index, grad, grad2, False)
    actual = run_both_phases(table.clone(), accum.clone(), index, grad, grad2, "cpu", False)
    assert_close(actual[2][0], expected[2][0], torch.float32, "table after update")


def test_step_leaves_other_rows_bitwise(backend):
    table, accum = make_state(40, 5, torch.float32, device=backend)
    index, grad, grad2 = make_batch(40, 8, 5, device=backend)
    original_table, original_accum = table.clone(), accum.clone()
    run_both_phases(table, accum, index, grad, grad2, backend, maximize=False)

    untouched = torch.ones(40, dtype=torch.bool, device=backend)
    untouched[index] = False
    assert untouched.any()
    assert torch.equal(table[untouched], original_table[untouched])
    assert torch.equal(accum[untouched], original_accum[untouched])
    assert not torch.equal(table[~untouched], original_table[~untouched])


def test_step_duplicates_equal_dense_adagrad(backend):
    # torch.optim.Adagrad on the whole table, with a gradient that is the batch
    # gradient scattered and summed over duplicate rows, is the dense oracle.
    n_rows, d, lr, eps, start = 12, 4, 0.05, 1e-8, 0.3
    table, _ = make_state(n_rows, d, torch.float32, device=backend)
    accum = torch.full((n_rows, d), start, device=backend)
    index = torch.tensor([3, 7, 3, 3, 0, 7], device=backend)
    grad = torch.randn(6, d, generator=torch.Generator().manual_seed(5)).to(backend)

    dense = torch.nn.Parameter(table.clone())
    optimizer = torch.optim.Adagrad([dense], lr=lr, eps=eps, initial_accumulator_value=start)
    dense.grad = torch.zeros_like(table).index_add_(0, index, grad)
    optimizer.step()

    sparse_extra_adagrad_(table, accum, index, grad, lr, eps, "extrapolate", backend=backend)
    assert_close(table, dense.detach(), torch.float32, "table")
    assert_close(accum, optimizer.state[dense]["sum"], torch.float32, "accum")


def test_step_update_restores_saved_rows(backend):
    # With a zero look-ahead gradient the update writes the saved rows back exactly.
    table, accum = make_state(30, 6, torch.float32, device=backend)
    index, grad, _ = make_batch(30, 9, 6, device=backend)
    original = table.clone()
    saved = sparse_extra_adagrad_(
        table, accum, index, grad, 0.1, 1e-6, "extrapolate", backend=backend
    )
    assert torch.equal(saved, original[index])
    assert not torch.equal(table, original)
    zero = torch.zeros_like(grad)
    sparse_extra_adagrad_(table, accum, index, zero, 0.1, 1e-6, "update", saved, backend=backend)
    assert torch.equal(table, original)


@needs_cpu_kernels
def test_step_row_strided_table():
    # A table that is a column slice of a wider buffer: rows are strided, features adjacent.
    buffer, accum_buffer = make_state(25, 10, torch.float32)
    table, accum = buffer[:, 2:7], accum_buffer[:, 2:7]
    assert not table.is_contiguous()
    index, grad, grad2 = make_batch(25, 7, 5)
    expected = reference_both_phases(table.clone(), accum.clone(), index, grad, grad2, False)
    run_both_phases(table, accum, index, grad, grad2, "cpu", False)
    assert_close(table, expected[2][0], torch.float32, "table after update")
    assert_close(accum, expected[2][1], torch.float32, "accum after update")
    assert torch.equal(buffer[:, :2], make_state(25, 10, torch.float32)[0][:, :2])


@needs_cpu_kernels
def test_step_rejects_column_strided_table():
    table, accum = make_state(6, 4, torch.float32)
    index, grad, _ = make_batch(6, 3, 4)
    with pytest.raises(ValueError, match=r"table has strides \(1, 6\).*\.contiguous\(\)"):
        sparse_extra_adagrad_(
            table.t().contiguous().t(), accum, index, grad, 0.1, 1e-6, "extrapolate", backend="cpu"
        )


@needs_cpu_kernels
@settings(max_examples=30, deadline=None)
@given(
    n_rows=st.integers(1, 30),
    batch=st.integers(1, 40),
    d=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    maximize=st.booleans(),
    transposed_grad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_step_random_shapes(n_rows, batch, d, dtype, maximize, transposed_grad, seed):
    # n_rows < batch forces duplicates.
    table, accum = make_state(n_rows, d, dtype, seed=seed)
    index, grad, grad2 = make_batch(n_rows, batch, d, seed=seed + 1)
    if transposed_grad:
        # Same values, non-contiguous layout.
        grad = grad.t().contiguous().t()
    check_against_reference(table, accum, index, grad, grad2, "cpu", maximize)


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 1), (7, 1, 1), (3, 9, 130)])
def test_step_edge_shapes(shape):
    # (|D|, B, d); |D| < B makes every row a duplicate.
    n_rows, batch, d = shape
    table, accum = make_state(n_rows, d, torch.float32)
    index, grad, grad2 = make_batch(n_rows, batch, d)
    check_against_reference(table, accum, index, grad, grad2, "cpu", maximize=False)


@needs_cpu_kernels
def test_step_deterministic_across_threads():
    index = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(3))
    grad = torch.randn(4096, 33, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            table, accum = make_state(64, 33, torch.float32)
            sparse_extra_adagrad_(
                table, accum, index, grad, 0.1, 1e-6, "extrapolate", backend="cpu"
            )
            results.append((table, accum))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_step_memory_independent_of_table_size(backend_name):
    """A step on a table of hundreds of MiB keeps the process's peak memory flat.

    ``torch.empty`` maps pages lazily, so rows that are never touched cost no
    resident memory. The table is sized so that touching all of it, or allocating
    any buffer of its size, would lift the peak resident memory of the process by
    more than 512 MiB. The check at the end shows that such a copy is detected.
    """
    if backend_name == "cpu" and not extension_has("sparse_extra_adagrad_", "CPU"):
        pytest.skip("distprop_fast._C is not built with CPU kernels")
    d, batch = 4, 256
    # Load the code paths once (the first custom-op call imports modules).
    small_table, small_accum = make_state(8, d, torch.float32)
    index, grad, _ = make_batch(8, 3, d)
    sparse_extra_adagrad_(
        small_table, small_accum, index, grad, 0.1, 1e-6, "extrapolate", backend=backend_name
    )

    headroom = max(_peak_resident_bytes() - _resident_bytes(), 0)
    n_rows = (headroom + 512 * MiB) // (d * 4)
    if n_rows * d * 4 > 4096 * MiB:
        pytest.skip(f"peak memory {_peak_resident_bytes() // MiB} MiB is too far above the current")
    table = torch.empty(n_rows, d)
    accum = torch.empty(n_rows, d)
    index = torch.randint(0, n_rows, (batch,), generator=torch.Generator().manual_seed(0))
    table[index] = torch.randn(batch, d)
    accum[index] = 0.0
    grad = torch.randn(batch, d)

    peak_before = _peak_resident_bytes()
    saved = sparse_extra_adagrad_(
        table, accum, index, grad, 0.1, 1e-6, "extrapolate", backend=backend_name
    )
    sparse_extra_adagrad_(
        table, accum, index, grad, 0.1, 1e-6, "update", saved, backend=backend_name
    )
    growth = _peak_resident_bytes() - peak_before
    assert growth < 64 * MiB, f"peak resident memory grew by {growth / MiB:.0f} MiB during the step"

    # The measurement can fail: one dense copy of the table lifts the peak.
    copy = table.clone()
    assert _peak_resident_bytes() - peak_before > 256 * MiB
    del copy


def test_step_rejects_bad_inputs():
    table, accum = make_state(10, 3, torch.float32)
    index, grad, _ = make_batch(10, 4, 3)
    step = sparse_extra_adagrad_
    with pytest.raises(ValueError, match=r"index\[1\] = 10 is outside \[0, \|D\|\) = \[0, 10\)"):
        step(table, accum, torch.tensor([0, 10, 2, 3]), grad, 0.1, 1e-6, "extrapolate")
    with pytest.raises(ValueError, match=r"index\[2\] = -4 is negative"):
        step(table, accum, torch.tensor([0, 1, -4, 3]), grad, 0.1, 1e-6, "extrapolate")
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        step(table, accum, index.float(), grad, 0.1, 1e-6, "extrapolate")
    with pytest.raises(ValueError, match=r"grad must have shape \(B, d\) = \(4, 3\), got \(4, 2\)"):
        step(table, accum, index, grad[:, :2], 0.1, 1e-6, "extrapolate")
    with pytest.raises(ValueError, match=r"accum must have shape \(\|D\|, d\) = \(10, 3\)"):
        step(table, accum[:5], index, grad, 0.1, 1e-6, "extrapolate")
    with pytest.raises(ValueError, match="phase='update' needs saved"):
        step(table, accum, index, grad, 0.1, 1e-6, "update")
    with pytest.raises(ValueError, match="phase must be one of"):
        step(table, accum, index, grad, 0.1, 1e-6, "extrapolation")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        step(table, accum, index, grad, -0.1, 1e-6, "extrapolate")
    with pytest.raises(ValueError, match="grad is on meta but table is on cpu"):
        step(table, accum, index, grad.to("meta"), 0.1, 1e-6, "extrapolate")


@needs_cpu_kernels
def test_step_cpu_op_rejects_index_out_of_range():
    # The C++ op checks the index itself, for callers that skip the Python function.
    table, accum = make_state(10, 3, torch.float32)
    grad = torch.zeros(2, 3)
    saved = torch.empty(2, 3)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 12 is outside \[0, 10\)"):
        torch.ops.distprop_fast_C.sparse_extra_adagrad_(
            table, accum, torch.tensor([1, 12]), grad, saved, 0.1, 1e-6, False, False
        )


@needs_cpu_kernels
def test_step_opcheck():
    from distprop_fast.ops.sparse_extra_adagrad import _sparse_extra_adagrad_fused

    table, accum = make_state(10, 3, torch.float32)
    index, grad, _ = make_batch(10, 4, 3)
    saved = torch.empty(4, 3)
    args = (table, accum, index, grad, saved, 0.1, 1e-6, False, True, "cpu")
    torch.library.opcheck(_sparse_extra_adagrad_fused, args)


@needs_cpu_kernels
def test_step_on_leaf_that_requires_grad():
    # Optimiser steps run without autograd, also on a Parameter table.
    table, accum = make_state(10, 3, torch.float32)
    table = torch.nn.Parameter(table)
    index, grad, _ = make_batch(10, 4, 3)
    sparse_extra_adagrad_(table, accum, index, grad, 0.1, 1e-6, "extrapolate", backend="cpu")
    assert table.grad is None
