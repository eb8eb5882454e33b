"""Tests of per-class sampling: fused backends against the reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distprop_fast.ops import (
    BackendUnavailableError,
    reference,
    resolve_backend,
    sample_classes,
    zscore_constraint,
)
from distprop_fast.ops._backend import extension_has, kernel_module
from tests.compare import assert_close

HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, *HALF_DTYPES)

needs_cpu_kernels = pytest.mark.skipif(
    not extension_has("sample_classes_fwd", "CPU"),
    reason="distprop_fast._C is not built; run `pip install --no-build-isolation -e .`",
)


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """A fused C++ backend with its device; CUDA is probed only when a test runs."""
    name = request.param
    if name == "cpu" and not extension_has("sample_classes_fwd", "CPU"):
        pytest.skip("distprop_fast._C is not built with CPU kernels")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not extension_has("sample_classes_fwd", "CUDA"):
            pytest.skip("distprop_fast._C is not built with CUDA kernels")
    return name


def make_inputs(n_samples, n_classes, d, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    w_mu = torch.randn(n_classes, d, generator=generator)
    w_sigma = torch.randn(n_classes, d, generator=generator)
    noise = torch.randn(n_samples, n_classes, d, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (w_mu, w_sigma, noise)]


def reference_fwd_bwd(w_mu, w_sigma, noise, grad_samples):
    """Reference samples and gradients, computed in float32 from the stored values.

    The kernels compute in float32 and round once on storing, so for half-precision
    storage this is the exact result they approximate.
    """
    leaves = [t.detach().float().requires_grad_() for t in (w_mu, w_sigma, noise)]
    samples = reference.sample_classes(*leaves)
    samples.backward(grad_samples.float())
    dtype = w_mu.dtype
    return samples.detach().to(dtype), [leaf.grad.to(dtype) for leaf in leaves]


def fused_fwd_bwd(w_mu, w_sigma, noise, grad_samples, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (w_mu, w_sigma, noise)]
    samples = sample_classes(*leaves, backend=backend)
    samples.backward(grad_samples)
    return samples.detach(), [leaf.grad for leaf in leaves]


def check_against_reference(w_mu, w_sigma, noise, backend, dtype):
    grad_samples = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    grad_samples = grad_samples.to(device=noise.device, dtype=noise.dtype)
    expected, expected_grads = reference_fwd_bwd(w_mu, w_sigma, noise, grad_samples)
    actual, actual_grads = fused_fwd_bwd(w_mu, w_sigma, noise, grad_samples, backend)

    assert actual.dtype == dtype
    assert_close(actual, expected, dtype, "samples")
    for name, got, want in zip(("w_mu", "w_sigma", "noise"), actual_grads, expected_grads):
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_matches_reference(backend, dtype):
    inputs = make_inputs(3, 5, 37, dtype, device=backend)
    check_against_reference(*inputs, backend=backend, dtype=dtype)


@needs_cpu_kernels
def test_sampling_large_scale_parameters():
    # softplus is linear above 20 and its derivative is exactly 1 there.
    w_mu, w_sigma, noise = make_inputs(2, 3, 8, torch.float32)
    w_sigma = w_sigma * 15
    check_against_reference(w_mu, w_sigma, noise, "cpu", torch.float32)


@needs_cpu_kernels
def test_sampling_gradcheck_float64():
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 5, torch.float64)]
    assert torch.autograd.gradcheck(lambda *x: sample_classes(*x, backend="cpu"), inputs)


@needs_cpu_kernels
@settings(max_examples=30, deadline=None)
@given(
    n_samples=st.integers(1, 4),
    n_classes=st.integers(1, 6),
    d=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampling_random_shapes(n_samples, n_classes, d, dtype, transposed, seed):
    w_mu, w_sigma, noise = make_inputs(n_samples, n_classes, d, dtype, seed=seed)
    if transposed:
        # Same values, non-contiguous layout.
        w_mu = w_mu.t().contiguous().t()
        noise = noise.transpose(0, 2).contiguous().transpose(0, 2)
    check_against_reference(w_mu, w_sigma, noise, "cpu", dtype)


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 7), (3, 1, 1), (1, 4, 1), (2, 3, 129)])
def test_sampling_edge_shapes(shape):
    check_against_reference(*make_inputs(*shape, torch.float32), "cpu", torch.float32)


@needs_cpu_kernels
def test_sampling_mixed_dtypes_promote():
    w_mu, w_sigma, noise = make_inputs(2, 3, 4, torch.float32)
    samples = sample_classes(w_mu.bfloat16(), w_sigma, noise, backend="cpu")
    expected = reference.sample_classes(w_mu.bfloat16(), w_sigma, noise)
    assert samples.dtype == expected.dtype
    assert_close(samples, expected, torch.float32, "samples")


@needs_cpu_kernels
def test_sampling_opcheck():
    from distprop_fast.ops.sampling import _sample_classes_fused

    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 5, torch.float32)]
    torch.library.opcheck(_sample_classes_fused, (*inputs, "cpu"))


def test_sampling_reference_backend_is_reference():
    inputs = make_inputs(2, 3, 5, torch.float32)
    assert torch.equal(
        sample_classes(*inputs, backend="reference"), reference.sample_classes(*inputs)
    )


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_compile_fullgraph_sampling_and_constraint(backend_name):
    if backend_name == "cpu" and not extension_has("zscore_constraint_fwd", "CPU"):
        pytest.skip("distprop_fast._C is not built with CPU kernels")
    torch._dynamo.reset()
    w_mu, w_sigma, noise = [t.requires_grad_() for t in make_inputs(2, 3, 6, torch.float32)]
    a = torch.randn(4, 6)
    labels = torch.tensor([0, 2, 1, 2])
    multipliers = torch.randn(4, 6)

    def step(w_mu, w_sigma, noise, a, labels, multipliers):
        samples = sample_classes(w_mu, w_sigma, noise, backend=backend_name)
        defect, term = zscore_constraint(
            a, labels, w_mu, w_sigma, 0.1, multipliers, backend=backend_name
        )
        return samples.square().sum() + defect.abs().sum() + term

    args = (w_mu, w_sigma, noise, a, labels, multipliers)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, (w_mu, w_sigma))
    eager_loss = step(*args)
    eager_grads = torch.autograd.grad(eager_loss, (w_mu, w_sigma))

    assert_close(loss, eager_loss, torch.float32, "compiled loss")
    assert_close(grads[0], eager_grads[0], torch.float32, "compiled grad w_mu")
    assert_close(grads[1], eager_grads[1], torch.float32, "compiled grad w_sigma")


def test_sampling_rejects_wrong_shapes():
    w_mu, w_sigma, noise = make_inputs(2, 3, 4, torch.float32)
    with pytest.raises(
        ValueError, match=r"w_sigma must have shape \(M, d\) = \(3, 4\), got \(3, 5\)"
    ):
        sample_classes(w_mu, torch.zeros(3, 5), noise)
    with pytest.raises(ValueError, match=r"noise must have shape \(N, M, d\) = \(2, 3, 4\)"):
        sample_classes(w_mu, w_sigma, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"noise must have shape \(N, M, d\), got \(3, 4\)"):
        sample_classes(w_mu, w_sigma, torch.zeros(3, 4))


def test_sampling_rejects_integer_dtype():
    w_mu, w_sigma, noise = make_inputs(2, 3, 4, torch.float32)
    with pytest.raises(
        TypeError, match="w_mu must be a floating-point tensor, got dtype torch.int64"
    ):
        sample_classes(w_mu.long(), w_sigma, noise)


def test_sampling_rejects_mixed_devices():
    w_mu, w_sigma, noise = make_inputs(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="noise is on meta but w_mu is on cpu"):
        sample_classes(w_mu, w_sigma, noise.to("meta"))


def test_sampling_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        sample_classes(*make_inputs(1, 1, 1, torch.float32), backend="fortran")


def test_missing_triton_module_is_unavailable():
    pytest.importorskip("triton")
    with pytest.raises(BackendUnavailableError, match="distprop_fast.ops._triton.no_such_kernel"):
        kernel_module("triton", "no_such_kernel")


@needs_cpu_kernels
def test_auto_backend_size_threshold(monkeypatch):
    from distprop_fast.ops import _backend

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setitem(_backend.CPU_AUTO_MIN_ELEMENTS, "sample_classes_fwd", 100)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "sample_classes_fwd", 99) == "reference"
    assert resolve_backend("auto", cpu, "sample_classes_fwd", 100) == "cpu"
    assert resolve_backend("auto", cpu, "sample_classes_fwd") == "cpu"
    # An explicit request ignores the threshold.
    assert resolve_backend("cpu", cpu, "sample_classes_fwd", 1) == "cpu"


@needs_cpu_kernels
def test_auto_backend_below_threshold_matches_reference(monkeypatch):
    from distprop_fast.ops import _backend

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setitem(_backend.CPU_AUTO_MIN_ELEMENTS, "sample_classes_fwd", 10**9)
    inputs = make_inputs(2, 3, 5, torch.float32)
    assert torch.equal(sample_classes(*inputs), reference.sample_classes(*inputs))


@needs_cpu_kernels
def test_sampling_softplus_wide_range():
    # With W_mu = 0 and E = 1 the samples are softplus(W_sigma) itself, which the CPU
    # kernels compute without libm. Check it against float64 across its whole range.
    w_sigma = torch.linspace(-110.0, 40.0, 150_001).reshape(1, -1)
    w_mu = torch.zeros_like(w_sigma)
    noise = torch.ones(1, *w_sigma.shape)
    samples = sample_classes(w_mu, w_sigma, noise, backend="cpu")[0].double()
    expected = torch.nn.functional.softplus(w_sigma.double())

    normal = w_sigma >= -87
    relative = (samples[normal] - expected[normal]).abs() / expected[normal]
    assert relative.max() <= 1e-6, f"max relative error {relative.max():.3e}"
    assert (samples[~normal] - expected[~normal]).abs().max() <= 1e-37
    assert (samples > 0).all()
