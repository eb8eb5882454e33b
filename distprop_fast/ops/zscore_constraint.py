"""z-score hard-shrink constraint fused with the multiplier term ``sum(lambda * g)``.

The reference backend runs as plain PyTorch operations. Under ``torch.compile`` and
other tracers the fused backends (``cpu``, ``cuda``, ``triton``) run behind the custom op
``distprop_fast::zscore_constraint`` with a fake kernel and the custom op
``distprop_fast::zscore_constraint_bwd`` as its backward. In eager mode an
autograd function calls the same kernels and backward directly, which saves the
custom op's dispatch on every call.
"""

from __future__ import annotations

import math

import torch

from distprop_fast.ops import reference
from distprop_fast.ops._backend import extension_has, kernel_module, resolve_backend, tracing
from distprop_fast.ops._checks import (
    as_dtype_contiguous,
    as_index,
    check_float,
    check_same_device,
    check_shape,
    common_float_dtype,
)

KERNEL = "zscore_constraint"

# Ask the dispatcher now, outside any torch.compile trace.
for _key in ("CPU", "CUDA"):
    extension_has("zscore_constraint_fwd", _key)


def _term_dtype(a: torch.Tensor, multipliers: torch.Tensor | None) -> torch.dtype:
    if multipliers is None:
        return a.dtype
    return torch.promote_types(a.dtype, multipliers.dtype)


@torch.library.custom_op("distprop_fast::zscore_constraint", mutates_args=())
def _zscore_constraint_fused(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = kernel_module(backend, KERNEL)
    defect, term = kernels.zscore_constraint_fwd(a, labels, w_mu, w_sigma, margin, multipliers)
    return defect, term


@_zscore_constraint_fused.register_fake
def _(a, labels, w_mu, w_sigma, margin, multipliers, backend):
    term = a.new_empty((), dtype=_term_dtype(a, multipliers))
    return torch.empty_like(a), term


@torch.library.custom_op("distprop_fast::zscore_constraint_bwd", mutates_args=())
def _zscore_constraint_bwd_fused(
    grad_defect: torch.Tensor | None,
    grad_term: torch.Tensor,
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = kernel_module(backend, KERNEL)
    grads = kernels.zscore_constraint_bwd(
        grad_defect, grad_term, a, labels, w_mu, w_sigma, margin, multipliers
    )
    grad_a, grad_mu, grad_w_sigma, grad_multipliers = grads
    return grad_a, grad_mu, grad_w_sigma, grad_multipliers


@_zscore_constraint_bwd_fused.register_fake
def _(grad_defect, grad_term, a, labels, w_mu, w_sigma, margin, multipliers, backend):
    # Without multipliers the kernels return an empty (0,) tensor in their place.
    if multipliers is None:
        grad_multipliers = a.new_empty((0,))
    else:
        grad_multipliers = torch.empty_like(multipliers)
    return torch.empty_like(a), torch.empty_like(w_mu), torch.empty_like(w_sigma), grad_multipliers


def _setup_context(ctx, inputs, output):
    a, labels, w_mu, w_sigma, margin, multipliers, backend = inputs
    ctx.save_for_backward(a, labels, w_mu, w_sigma, multipliers)
    ctx.margin = margin
    ctx.backend = backend
    # A training step differentiates the term alone. The unused defect then reaches the
    # backward as None, not as a (B, d) tensor of zeros that the kernel would read.
    ctx.set_materialize_grads(False)


def _backward_with(bwd, ctx, grad_defect, grad_term):
    """Compute the input gradients with ``bwd``, the backward op or its kernel."""
    a, labels, w_mu, w_sigma, multipliers = ctx.saved_tensors
    if grad_defect is not None:
        grad_defect = grad_defect.contiguous()
    if grad_term is None:
        grad_term = a.new_zeros(())
    grads = bwd(grad_defect, grad_term, a, labels, w_mu, w_sigma, ctx.margin, multipliers)
    grad_a, grad_mu, grad_w_sigma, grad_multipliers = grads
    if multipliers is None:
        grad_multipliers = None
    return grad_a, None, grad_mu, grad_w_sigma, None, grad_multipliers, None


def _backward(ctx, grad_defect, grad_term):
    def bwd(*args):
        return _zscore_constraint_bwd_fused(*args, ctx.backend)

    return _backward_with(bwd, ctx, grad_defect, grad_term)


_zscore_constraint_fused.register_autograd(_backward, setup_context=_setup_context)


class _ZscoreConstraintFunction(torch.autograd.Function):
    """The fused op for eager mode: the custom op's kernels and backward, called
    without the custom op's dispatch."""

    @staticmethod
    def forward(a, labels, w_mu, w_sigma, margin, multipliers, backend):
        kernels = kernel_module(backend, KERNEL)
        return kernels.zscore_constraint_fwd(a, labels, w_mu, w_sigma, margin, multipliers)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_defect, grad_term):
        bwd = kernel_module(ctx.backend, KERNEL).zscore_constraint_bwd
        return _backward_with(bwd, ctx, grad_defect, grad_term)


def _check_inputs(a, labels, w_mu, w_sigma, margin, multipliers) -> torch.Tensor:
    """Check the inputs and return ``labels`` as contiguous int64."""
    check_float("a", a, "(B, d)", 2)
    check_float("w_mu", w_mu, "(M, d)", 2)
    check_float("w_sigma", w_sigma, "(M, d)", 2)
    batch, d = a.shape
    n_classes = w_mu.shape[0]
    check_shape("w_mu", w_mu, (n_classes, d), "(M, d)")
    check_shape("w_sigma", w_sigma, (n_classes, d), "(M, d)")
    if multipliers is not None:
        check_float("multipliers", multipliers, "(B, d)", 2)
        check_shape("multipliers", multipliers, (batch, d), "(B, d)")
    if not isinstance(margin, (int, float)) or math.isnan(margin) or margin < 0:
        raise ValueError(f"margin must be a number >= 0 (0 means no shrinkage), got {margin!r}")
    check_same_device(a=a, labels=labels, w_mu=w_mu, w_sigma=w_sigma, multipliers=multipliers)
    labels = as_index("labels", labels, n_classes, "M")
    check_shape("labels", labels, (batch,), "(B,)")
    return labels


def zscore_constraint(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the z-score hard-shrink defect and, fused, its multiplier term.

    .. math::
        z = (a - \\mu[y]) / \\sigma[y], \\quad \\sigma = \\mathrm{softplus}(W_\\sigma),
        \\quad g = \\mathrm{hardshrink}(z, \\varepsilon), \\quad t = \\sum \\lambda \\odot g

    Args:
        a: block outputs, shape ``(B, d)``.
        labels: class of each row, integer tensor of shape ``(B,)`` with values in ``[0, M)``.
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        margin: the margin ``eps >= 0``; defects with ``|z| <= eps`` count as satisfied,
            and 0 means no shrinkage.
        multipliers: multiplier rows ``lambda``, shape ``(B, d)``, or ``None``. Their
            dtype may differ from ``a`` (float16 storage, say).
        backend: one of ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.

    Returns:
        ``(defect, term)``: the defect ``g`` of shape ``(B, d)`` in the promoted dtype
        of ``a``, ``w_mu`` and ``w_sigma``, and the scalar ``sum(lambda * g)`` (zero when
        ``multipliers`` is ``None``). Both are differentiable once.

    Raises:
        TypeError: a tensor has the wrong kind of dtype (float expected, or integer labels).
        ValueError: shapes do not match, tensors are on different devices, the margin
            is negative, or a label lies outside ``[0, M)`` (checked on CPU tensors).
        BackendUnavailableError: the requested backend cannot run here.
    """
    labels = _check_inputs(a, labels, w_mu, w_sigma, margin, multipliers)
    chosen = resolve_backend(backend, a.device, "zscore_constraint_fwd", a.numel())
    if chosen == "reference":
        return reference.zscore_constraint(a, labels, w_mu, w_sigma, margin, multipliers)

    dtype = common_float_dtype(a, w_mu, w_sigma)
    if multipliers is not None:
        multipliers = multipliers.contiguous()
    args = (
        as_dtype_contiguous(a, dtype),
        labels,
        as_dtype_contiguous(w_mu, dtype),
        as_dtype_contiguous(w_sigma, dtype),
        float(margin),
        multipliers,
        chosen,
    )
    # Tracers need the custom op, which has a fake kernel; eager mode skips it.
    if tracing():
        return _zscore_constraint_fused(*args)
    return _ZscoreConstraintFunction.apply(*args)
