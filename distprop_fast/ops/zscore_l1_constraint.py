"""Per-example constraint on the L1 norm of the z-scores, with its multiplier term.

One scalar constraint per example, ``g_i = ReLU(||z_i||_1 - eps)``, where ``z`` is
the per-feature z-score of the fused z-score constraint. Its multipliers form a
``(|D|, 1)`` table, for data sets where the ``(|D|, d)`` table of the per-feature
constraint does not fit (ImageNet with AlexNet: 1,281,167 x 9,216).

NOTE: only the pure-PyTorch reference exists; autograd differentiates it. Its
cost is a few element-wise passes over ``(B, d)``, small next to the block that
produces ``a``.
"""

from __future__ import annotations

import math

import torch

from distprop_fast.ops import reference
from distprop_fast.ops._backend import BACKENDS, BackendUnavailableError
from distprop_fast.ops._checks import (
    as_index,
    check_float,
    check_same_device,
    check_shape,
)


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
        check_float("multipliers", multipliers, "(B, 1)", 2)
        check_shape("multipliers", multipliers, (batch, 1), "(B, 1)")
    if not isinstance(margin, (int, float)) or math.isnan(margin) or margin < 0:
        raise ValueError(f"margin must be a number >= 0, got {margin!r}")
    check_same_device(a=a, labels=labels, w_mu=w_mu, w_sigma=w_sigma, multipliers=multipliers)
    labels = as_index("labels", labels, n_classes, "M")
    check_shape("labels", labels, (batch,), "(B,)")
    return labels


def zscore_l1_constraint(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the per-example L1 z-score constraint and its multiplier term.

    .. math::
        z = (a - \\mu[y]) / \\sigma[y], \\quad \\sigma = \\mathrm{softplus}(W_\\sigma),
        \\quad g_i = \\mathrm{ReLU}(\\lVert z_i \\rVert_1 - \\varepsilon),
        \\quad t = \\sum_i \\lambda_i g_i

    Args:
        a: block outputs, shape ``(B, d)``.
        labels: class of each row, integer tensor of shape ``(B,)`` with values in ``[0, M)``.
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        margin: the margin ``eps >= 0`` on ``||z||_1``, in z-score units summed over
            the ``d`` features.
        multipliers: one multiplier per row, shape ``(B, 1)``, or ``None``. A float16
            or bfloat16 multiplier is promoted, so the term is computed in the dtype
            of ``a``.
        backend: ``"auto"`` or ``"reference"``; both run the reference.

    Returns:
        ``(defect, term)``: the defect ``g`` of shape ``(B, 1)`` and the scalar
        ``sum(lambda * g)`` (zero when ``multipliers`` is ``None``). Both are
        differentiable by autograd.

    Raises:
        TypeError: a tensor has the wrong kind of dtype (float expected, or integer labels).
        ValueError: shapes do not match, tensors are on different devices, the margin
            is negative, a label lies outside ``[0, M)`` (checked on CPU tensors), or
            ``backend`` is not a known name.
        BackendUnavailableError: ``backend`` names a fused backend, which this op lacks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in ("auto", "reference"):
        raise BackendUnavailableError(
            f"zscore_l1_constraint has no fused kernel for backend={backend!r}; pass "
            "backend='reference' (or 'auto')"
        )
    labels = _check_inputs(a, labels, w_mu, w_sigma, margin, multipliers)
    return reference.zscore_l1_constraint(a, labels, w_mu, w_sigma, margin, multipliers)
