"""Tests of the z-score hard-shrink constraint: fused backends against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distprop_fast.ops import reference, zscore_constraint
from distprop_fast.ops._backend import extension_has
from tests.compare import TOLERANCES, assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MARGINS = (0.0, 0.5)

needs_cpu_kernels = pytest.mark.skipif(
    not extension_has("zscore_constraint_fwd", "CPU"),
    reason="distprop_fast._C is not built; run `pip install --no-build-isolation -e .`",
)


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """A fused C++ backend with its device; CUDA is probed only when a test runs."""
    name = request.param
    if name == "cpu" and not extension_has("zscore_constraint_fwd", "CPU"):
        pytest.skip("distprop_fast._C is not built with CPU kernels")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not extension_has("zscore_constraint_fwd", "CUDA"):
            pytest.skip("distprop_fast._C is not built with CUDA kernels")
    return name


def make_inputs(batch, n_classes, d, dtype, device="cpu", seed=0, mult_dtype=None):
    """Return ``(a, labels, w_mu, w_sigma, multipliers)``. Every class appears when B >= M."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, generator=generator) * 2
    labels = torch.randint(0, n_classes, (batch,), generator=generator)
    labels[: min(batch, n_classes)] = torch.arange(min(batch, n_classes))
    w_mu = torch.randn(n_classes, d, generator=generator)
    w_sigma = torch.randn(n_classes, d, generator=generator)
    multipliers = torch.randn(batch, d, generator=generator)
    floats = [t.to(device=device, dtype=dtype) for t in (a, w_mu, w_sigma)]
    multipliers = multipliers.to(device=device, dtype=mult_dtype or dtype)
    return floats[0], labels.to(device), floats[1], floats[2], multipliers


def class_sums(values: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Sum the rows of ``values`` (B, d) per class into (M, d), in float64."""
    sums = torch.zeros(n_classes, values.shape[1], dtype=torch.float64, device=values.device)
    return sums.index_add_(0, labels, values.double())


def random_upstream(a, term_dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    grad_defect = torch.randn(a.shape, generator=generator).to(device=a.device, dtype=a.dtype)
    grad_term = torch.tensor(0.75, dtype=term_dtype, device=a.device)
    return grad_defect, grad_term


def reference_fwd_bwd(a, labels, w_mu, w_sigma, margin, multipliers, grad_defect, grad_term):
    """Reference outputs and gradients computed in float32 from the stored values, then
    stored in the input dtypes: the kernels compute in float32 and round once."""
    leaves = [t.detach().float().requires_grad_() for t in (a, w_mu, w_sigma)]
    lam = None if multipliers is None else multipliers.detach().float().requires_grad_()
    defect, term = reference.zscore_constraint(leaves[0], labels, leaves[1], leaves[2], margin, lam)
    if lam is None:
        # The reference returns a constant zero term, which has no graph.
        defect.backward(grad_defect.float())
    else:
        torch.autograd.backward([defect, term], [grad_defect.float(), grad_term.float()])
    grads = [leaf.grad.to(a.dtype) for leaf in leaves]
    grads.append(None if lam is None else lam.grad.to(multipliers.dtype))
    return defect.detach().to(a.dtype), term.detach(), grads


def fused_fwd_bwd(a, labels, w_mu, w_sigma, margin, multipliers, grad_defect, grad_term, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (a, w_mu, w_sigma)]
    lam = None if multipliers is None else multipliers.detach().clone().requires_grad_()
    defect, term = zscore_constraint(
        leaves[0], labels, leaves[1], leaves[2], margin, lam, backend=backend
    )
    torch.autograd.backward([defect, term], [grad_defect, grad_term])
    grads = [leaf.grad for leaf in leaves]
    grads.append(None if lam is None else lam.grad)
    return defect.detach(), term.detach(), grads


def check_against_reference(a, labels, w_mu, w_sigma, margin, multipliers, backend):
    dtype = a.dtype
    term_dtype = dtype if multipliers is None else torch.promote_types(dtype, multipliers.dtype)
    upstream = random_upstream(a, term_dtype)
    args = (a, labels, w_mu, w_sigma, margin, multipliers, *upstream)
    expected_defect, expected_term, expected_grads = reference_fwd_bwd(*args)
    defect, term, grads = fused_fwd_bwd(*args, backend)

    assert defect.dtype == dtype
    assert term.dtype == term_dtype
    assert_close(defect, expected_defect, dtype, "defect")
    # The term is a sum of B * d products, so its error scales with sum(|products|),
    # not with the possibly cancelling result.
    rtol, atol = TOLERANCES[term_dtype]
    products = expected_defect.float() * (0 if multipliers is None else multipliers.float())
    scale = float(products.abs().sum())
    error = abs(float(term) - float(expected_term))
    assert error <= atol + rtol * scale, (
        f"term {float(term)} != reference {float(expected_term)}: error {error:.3e} exceeds "
        f"{atol} + {rtol} * sum(|lambda * g|) = {atol + rtol * scale:.3e}"
    )
    assert_close(grads[0], expected_grads[0], dtype, "grad a")
    # The class gradients sum a column of grad a (times z) over the rows of a class.
    # Reference and kernel sum in different orders and precisions, and the sum may
    # cancel, so both are divided by 1 + sum of |contributions| before comparing.
    z = (a.double() - w_mu.double()[labels]) / F.softplus(w_sigma.double())[labels]
    contributions = expected_grads[0].double().abs()
    scale_mu = 1 + class_sums(contributions, labels, w_mu.shape[0])
    scale_sigma = 1 + class_sums(contributions * z.abs(), labels, w_mu.shape[0])
    assert_close(grads[1] / scale_mu, expected_grads[1] / scale_mu, dtype, "grad w_mu")
    assert_close(grads[2] / scale_sigma, expected_grads[2] / scale_sigma, dtype, "grad w_sigma")
    if multipliers is None:
        assert grads[3] is None
    else:
        assert_close(grads[3], expected_grads[3], multipliers.dtype, "grad multipliers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("with_multipliers", [True, False])
def test_constraint_matches_reference(backend, dtype, margin, with_multipliers):
    a, labels, w_mu, w_sigma, multipliers = make_inputs(24, 5, 37, dtype, device=backend)
    multipliers = multipliers if with_multipliers else None
    check_against_reference(a, labels, w_mu, w_sigma, margin, multipliers, backend)


@pytest.mark.parametrize("mult_dtype", [torch.float16, torch.bfloat16])
def test_constraint_half_multipliers(backend, mult_dtype):
    # Multipliers stored in half precision next to float32 block outputs.
    inputs = make_inputs(16, 4, 9, torch.float32, device=backend, mult_dtype=mult_dtype)
    check_against_reference(*inputs[:4], 0.25, inputs[4], backend)


@needs_cpu_kernels
def test_constraint_term_only_gradient():
    a, labels, w_mu, w_sigma, multipliers = make_inputs(8, 3, 5, torch.float32)
    a.requires_grad_()
    _, term = zscore_constraint(a, labels, w_mu, w_sigma, 0.2, multipliers, backend="cpu")
    (grad,) = torch.autograd.grad(term, a)
    a_ref = a.detach().clone().requires_grad_()
    _, term_ref = reference.zscore_constraint(a_ref, labels, w_mu, w_sigma, 0.2, multipliers)
    (grad_ref,) = torch.autograd.grad(term_ref, a_ref)
    assert_close(grad, grad_ref, torch.float32, "grad a from the term alone")


@needs_cpu_kernels
def test_constraint_defect_only_gradient():
    # The term takes no gradient, so the backward gets None in its place.
    a, labels, w_mu, w_sigma, multipliers = make_inputs(9, 4, 6, torch.float32)
    grad_defect, _ = random_upstream(a, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (a, w_mu, w_sigma)]
    a_leaf, mu_leaf, sigma_leaf = leaves
    defect, _ = zscore_constraint(
        a_leaf, labels, mu_leaf, sigma_leaf, 0.2, multipliers, backend="cpu"
    )
    grads = torch.autograd.grad(defect, leaves, grad_defect)

    ref_leaves = [t.clone().requires_grad_() for t in (a, w_mu, w_sigma)]
    a_ref, mu_ref, sigma_ref = ref_leaves
    expected, _ = reference.zscore_constraint(a_ref, labels, mu_ref, sigma_ref, 0.2, multipliers)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad_defect)
    for name, got, want in zip(("a", "w_mu", "w_sigma"), grads, expected_grads):
        assert_close(got, want, torch.float32, f"grad {name} from the defect alone")


@needs_cpu_kernels
@pytest.mark.parametrize("margin", MARGINS)
def test_constraint_gradcheck_float64(margin):
    a, labels, w_mu, w_sigma, multipliers = make_inputs(7, 3, 4, torch.float64)
    # Keep every |z| at least 0.05 away from the margin, where hardshrink jumps.
    z = (a - w_mu[labels]) / F.softplus(w_sigma)[labels]
    z = torch.where((z.abs() - margin).abs() < 0.05, z.sign() * (margin + 0.3), z)
    a = w_mu[labels] + z * F.softplus(w_sigma)[labels]
    inputs = [t.requires_grad_() for t in (a, w_mu, w_sigma, multipliers)]

    def constraint(a, w_mu, w_sigma, multipliers):
        return zscore_constraint(a, labels, w_mu, w_sigma, margin, multipliers, backend="cpu")

    assert torch.autograd.gradcheck(constraint, inputs)


@needs_cpu_kernels
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 40),
    n_classes=st.integers(1, 6),
    d=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    margin=st.sampled_from(MARGINS),
    with_multipliers=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_constraint_random_shapes(
    batch, n_classes, d, dtype, margin, with_multipliers, transposed, seed
):
    a, labels, w_mu, w_sigma, multipliers = make_inputs(batch, n_classes, d, dtype, seed=seed)
    if transposed:
        # Same values, non-contiguous layout.
        a = a.t().contiguous().t()
        multipliers = multipliers.t().contiguous().t()
        w_sigma = w_sigma.t().contiguous().t()
    multipliers = multipliers if with_multipliers else None
    check_against_reference(a, labels, w_mu, w_sigma, margin, multipliers, "cpu")


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 1), (5, 1, 1), (1, 1, 9), (3, 7, 257)])
@pytest.mark.parametrize("margin", MARGINS)
def test_constraint_edge_shapes(shape, margin):
    # (B, M, d); with B < M some classes have no rows, so their gradients are zero.
    a, labels, w_mu, w_sigma, multipliers = make_inputs(*shape, torch.float32)
    check_against_reference(a, labels, w_mu, w_sigma, margin, multipliers, "cpu")


@needs_cpu_kernels
def test_constraint_deterministic_across_threads():
    a, labels, w_mu, w_sigma, multipliers = make_inputs(512, 3, 70, torch.float32)
    upstream = random_upstream(a, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            args = (a, labels, w_mu, w_sigma, 0.1, multipliers, *upstream, "cpu")
            defect, term, grads = fused_fwd_bwd(*args)
            results.append([defect, term, *grads])
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@needs_cpu_kernels
def test_constraint_int32_labels():
    a, labels, w_mu, w_sigma, _ = make_inputs(6, 3, 4, torch.float32)
    defect, _ = zscore_constraint(a, labels.int(), w_mu, w_sigma, 0.0, backend="cpu")
    expected, _ = reference.zscore_constraint(a, labels, w_mu, w_sigma, 0.0)
    assert_close(defect, expected, torch.float32, "defect")


@needs_cpu_kernels
def test_constraint_opcheck():
    from distprop_fast.ops.zscore_constraint import _zscore_constraint_fused

    a, labels, w_mu, w_sigma, multipliers = make_inputs(6, 3, 4, torch.float32)
    for t in (a, w_mu, w_sigma, multipliers):
        t.requires_grad_()
    torch.library.opcheck(
        _zscore_constraint_fused, (a, labels, w_mu, w_sigma, 0.3, multipliers, "cpu")
    )
    torch.library.opcheck(_zscore_constraint_fused, (a, labels, w_mu, w_sigma, 0.0, None, "cpu"))


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_constraint_rejects_labels_out_of_range(backend_name):
    a, labels, w_mu, w_sigma, _ = make_inputs(5, 3, 4, torch.float32)
    labels[2] = 3
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is outside \[0, M\) = \[0, 3\)"):
        zscore_constraint(a, labels, w_mu, w_sigma, 0.0, backend=backend_name)
    labels[2] = -1
    with pytest.raises(ValueError, match=r"labels\[2\] = -1 is negative"):
        zscore_constraint(a, labels, w_mu, w_sigma, 0.0, backend=backend_name)


@needs_cpu_kernels
def test_constraint_cpu_op_rejects_labels_out_of_range():
    # The C++ op checks labels itself, for callers that skip the Python function.
    a, labels, w_mu, w_sigma, _ = make_inputs(5, 3, 4, torch.float32)
    labels[4] = 7
    with pytest.raises(RuntimeError, match=r"labels\[4\] = 7 is outside \[0, 3\)"):
        torch.ops.distprop_fast_C.zscore_constraint_fwd(a, labels, w_mu, w_sigma, 0.0, None)


def test_constraint_rejects_bad_inputs():
    a, labels, w_mu, w_sigma, multipliers = make_inputs(5, 3, 4, torch.float32)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        zscore_constraint(a, labels.float(), w_mu, w_sigma, 0.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(5,\), got \(4,\)"):
        zscore_constraint(a, labels[:4], w_mu, w_sigma, 0.0)
    with pytest.raises(ValueError, match=r"w_mu must have shape \(M, d\) = \(3, 4\), got \(3, 5\)"):
        zscore_constraint(a, labels, torch.zeros(3, 5), w_sigma, 0.0)
    with pytest.raises(ValueError, match=r"multipliers must have shape \(B, d\) = \(5, 4\)"):
        zscore_constraint(a, labels, w_mu, w_sigma, 0.0, multipliers[:2])
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        zscore_constraint(a, labels, w_mu, w_sigma, -0.1)
    with pytest.raises(ValueError, match="w_sigma is on meta but a is on cpu"):
        zscore_constraint(a, labels, w_mu, w_sigma.to("meta"), 0.0)
