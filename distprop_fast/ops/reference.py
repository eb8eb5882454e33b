"""Pure-PyTorch reference of the three fused operations.

This module is the correctness oracle: every fused kernel (C++, CUDA, Triton) is
tested against these functions, forward and backward, and the trainer falls back
to them when no fused backend is available. Keep them short and literal.

Shapes: ``B`` batch, ``d`` features at a cut, ``M`` classes, ``N`` samples per
class, ``|D|`` training-set size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distprop_fast.ops._checks import check_finite_cpu

PHASES = ("extrapolate", "update")


def sample_classes(w_mu: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw re-parameterised per-class samples ``S = W_mu[c] + E * softplus(W_sigma[c])``.

    Args:
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        noise: standard normal noise ``E``, shape ``(N, M, d)``.

    Returns:
        Samples of shape ``(N, M, d)``; sample ``[n, c]`` belongs to class ``c``.
    """
    return w_mu.unsqueeze(0) + noise * F.softplus(w_sigma).unsqueeze(0)


def zscore_constraint(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the z-score hard-shrink defect and its multiplier term.

    .. math::
        z = (a - \\mu[y]) / \\sigma[y], \\quad g = \\mathrm{hardshrink}(z, \\varepsilon),
        \\quad t = \\sum \\lambda \\odot g

    Args:
        a: block outputs, shape ``(B, d)``.
        labels: class of each row, int64 of shape ``(B,)`` with values in ``[0, M)``.
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        margin: the margin ``eps``; defects with ``|z| <= eps`` count as satisfied.
        multipliers: multiplier rows ``lambda``, shape ``(B, d)``, or ``None``.

    Returns:
        ``(defect, term)``: the defect ``g`` of shape ``(B, d)`` and the scalar
        ``sum(lambda * g)`` (zero when ``multipliers`` is ``None``).
    """
    sigma = F.softplus(w_sigma)
    z = (a - w_mu[labels]) / sigma[labels]
    defect = F.hardshrink(z, margin) if margin > 0 else z
    if multipliers is None:
        return defect, defect.new_zeros(())
    return defect, (multipliers * defect).sum()


def zscore_l1_constraint(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the per-example constraint on the L1 norm of the z-scores and its term.

    .. math::
        z = (a - \\mu[y]) / \\sigma[y], \\quad
        g = \\mathrm{ReLU}(\\lVert z \\rVert_1 - \\varepsilon), \\quad
        t = \\sum_i \\lambda_i g_i

    Args:
        a: block outputs, shape ``(B, d)``.
        labels: class of each row, int64 of shape ``(B,)`` with values in ``[0, M)``.
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        margin: the margin ``eps`` on the L1 norm, summed over the ``d`` features.
        multipliers: one multiplier per row, shape ``(B, 1)``, or ``None``.

    Returns:
        ``(defect, term)``: the defect ``g`` of shape ``(B, 1)`` and the scalar
        ``sum(lambda * g)`` (zero when ``multipliers`` is ``None``).
    """
    sigma = F.softplus(w_sigma)
    z = (a - w_mu[labels]) / sigma[labels]
    defect = F.relu(z.abs().sum(dim=1, keepdim=True) - margin)
    if multipliers is None:
        return defect, defect.new_zeros(())
    return defect, (multipliers * defect).sum()


def sparse_extra_adagrad_(
    table: torch.Tensor,
    accum: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float,
    phase: str,
    saved: torch.Tensor | None = None,
    maximize: bool = False,
) -> torch.Tensor:
    """Apply one ExtraAdagrad half-step to rows ``index`` of ``table``, in place.

    The gradients of duplicate indices are summed first, so the result equals a
    dense Adagrad step whose gradient is zero outside the batch rows. The
    accumulator is updated at both half-steps and never restored.

    Args:
        table: parameter table, shape ``(|D|, d)``; changed in place.
        accum: squared-gradient accumulator, shape ``(|D|, d)``; changed in place.
        index: row indices, int64 of shape ``(B,)``; duplicates allowed.
        grad: row gradients aligned with ``index``, shape ``(B, d)``.
        lr: step size.
        eps: added to ``sqrt(accum)`` in the denominator.
        phase: ``"extrapolate"`` saves the rows and steps; ``"update"`` first
            writes ``saved`` back, then steps with the look-ahead gradient.
        saved: rows returned by the extrapolation; required for ``"update"``.
        maximize: ascend instead of descend (multipliers).

    Returns:
        For ``"extrapolate"``, the original rows ``table[index]``, shape ``(B, d)``;
        for ``"update"``, ``saved`` unchanged.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    check_finite_cpu("grad", grad)
    if phase == "extrapolate":
        saved = table[index].clone()
    else:
        if saved is None:
            raise ValueError("phase='update' needs the rows saved by phase='extrapolate'")
        table[index] = saved

    unique, inverse = torch.unique(index, return_inverse=True)
    summed = torch.zeros(unique.numel(), grad.shape[1], dtype=torch.float32, device=grad.device)
    summed.index_add_(0, inverse, grad.float())

    acc_rows = accum[unique].float() + summed * summed
    accum[unique] = acc_rows.to(accum.dtype)
    step = lr * summed / (acc_rows.sqrt() + eps)
    rows = table[unique].float()
    rows = rows + step if maximize else rows - step
    table[unique] = rows.to(table.dtype)
    return saved


def sparse_sgd_(
    table: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    phase: str,
    saved: torch.Tensor | None = None,
    maximize: bool = False,
) -> torch.Tensor:
    """Apply one ExtraSGD half-step to rows ``index`` of ``table``, in place.

    Same contract as :func:`sparse_extra_adagrad_` without an accumulator: duplicate
    indices are summed, and the step is computed in float32 whatever the storage.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    check_finite_cpu("grad", grad)
    if phase == "extrapolate":
        saved = table[index].clone()
    else:
        if saved is None:
            raise ValueError("phase='update' needs the rows saved by phase='extrapolate'")
        table[index] = saved

    # Compute in float32 and round once when storing. Rounding the product to
    # float16 first, as a float16 step would, can lose an increment just over half
    # an ulp of the row.
    unique, inverse = torch.unique(index, return_inverse=True)
    summed = torch.zeros(unique.numel(), grad.shape[1], dtype=torch.float32, device=grad.device)
    summed.index_add_(0, inverse, grad.float())
    rows = table[unique].float() + summed * (lr if maximize else -lr)
    table[unique] = rows.to(table.dtype)
    return saved
