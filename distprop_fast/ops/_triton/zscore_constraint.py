"""Triton kernels for the z-score hard-shrink constraint and its multiplier term.

.. math::
    z = (a - \\mu[y]) / \\sigma[y], \\quad \\sigma = \\mathrm{softplus}(W_\\sigma), \\quad
    g = \\mathrm{hardshrink}(z, \\varepsilon), \\quad t = \\sum \\lambda \\odot g

Shapes: block outputs, defect and multipliers ``(B, d)``, labels ``(B,)``,
class parameters ``(M, d)``. A margin ``<= 0`` means no shrink (``g = z``), as in
:func:`distprop_fast.ops.reference.zscore_constraint`.

The backward pass reduces over the rows of each class without atomics: the
launcher sorts the rows by label (stably), and one program per (class, column
block) walks that class's rows in batch order. The gradients are therefore
deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from distprop_fast.ops._triton import (
    check_device,
    check_float,
    check_index,
    check_index_range,
    check_shape,
    row_block,
    softplus,
    softplus_grad,
)

# Elements per (rows x columns) tile: 2048 float32 values per loaded tensor.
TILE_NUMEL = 2048
FWD_MAX_BLOCK_D = 256
BWD_MAX_BLOCK_D = 128


@triton.jit
def _zscore_constraint_fwd_kernel(
    a_ptr,
    labels_ptr,
    mu_ptr,
    sigma_ptr,
    multipliers_ptr,
    defect_ptr,
    partial_ptr,
    batch,
    d,
    margin,
    HAS_MULTIPLIERS: tl.constexpr,
    SHRINK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < batch
    mask = row_mask[:, None] & (cols < d)[None, :]
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0).to(tl.int64)

    # (BLOCK_B, BLOCK_D) tiles of the batch rows and of their classes' rows
    row_offsets = rows[:, None] * d + cols[None, :]
    class_offsets = labels[:, None] * d + cols[None, :]
    a = tl.load(a_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + class_offsets, mask=mask, other=0.0).to(tl.float32)
    w_sigma = tl.load(sigma_ptr + class_offsets, mask=mask, other=0.0).to(tl.float32)
    z = tl.div_rn(a - mu, softplus(w_sigma))
    if SHRINK:
        z = tl.where(tl.abs(z) > margin, z, 0.0)
    tl.store(defect_ptr + row_offsets, z.to(defect_ptr.dtype.element_ty), mask=mask)

    if HAS_MULTIPLIERS:
        # One partial sum per program; the launcher adds them in a fixed order.
        multipliers = tl.load(multipliers_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
        partial = tl.sum(tl.sum(tl.where(mask, multipliers * z, 0.0), axis=1), axis=0)
        tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), partial)


@triton.jit
def _zscore_constraint_bwd_kernel(
    grad_defect_ptr,
    grad_term_ptr,
    a_ptr,
    order_ptr,
    class_start_ptr,
    mu_ptr,
    sigma_ptr,
    multipliers_ptr,
    grad_a_ptr,
    grad_mu_ptr,
    grad_sigma_ptr,
    grad_multipliers_ptr,
    d,
    margin,
    HAS_GRAD_DEFECT: tl.constexpr,
    HAS_MULTIPLIERS: tl.constexpr,
    SHRINK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (c, j) owns columns [j * BLOCK_D, (j + 1) * BLOCK_D) of class c: it
    # writes those columns of every row labelled c and of grad_mu[c], grad_sigma[c].
    label = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    mu = tl.load(mu_ptr + label * d + cols, mask=col_mask, other=0.0).to(tl.float32)
    w_sigma = tl.load(sigma_ptr + label * d + cols, mask=col_mask, other=0.0).to(tl.float32)
    sigma = softplus(w_sigma)
    if HAS_MULTIPLIERS:
        grad_term = tl.load(grad_term_ptr).to(tl.float32)

    sum_grad_mu = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_grad_sigma = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = tl.load(class_start_ptr + label)
    end = tl.load(class_start_ptr + label + 1)
    for first in range(start, end, BLOCK_B):
        # order[start:end] lists the batch rows labelled c in increasing row order.
        positions = first + tl.arange(0, BLOCK_B)
        row_mask = positions < end
        rows = tl.load(order_ptr + positions, mask=row_mask, other=0).to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None] * d + cols[None, :]

        a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = tl.div_rn(a - mu[None, :], sigma[None, :])
        if HAS_GRAD_DEFECT:
            grad = tl.load(grad_defect_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            grad = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        if SHRINK:
            active = tl.abs(z) > margin
            defect = tl.where(active, z, 0.0)
        else:
            defect = z
        if HAS_MULTIPLIERS:
            multipliers = tl.load(multipliers_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad += grad_term * multipliers
            grad_multipliers = grad_term * defect
            tl.store(
                grad_multipliers_ptr + offsets,
                grad_multipliers.to(grad_multipliers_ptr.dtype.element_ty),
                mask=mask,
            )
        if SHRINK:
            grad = tl.where(active, grad, 0.0)

        # d z / d a = 1 / sigma, d z / d mu = -1 / sigma, d z / d sigma = -z / sigma
        grad_a = tl.where(mask, tl.div_rn(grad, sigma[None, :]), 0.0)
        tl.store(grad_a_ptr + offsets, grad_a.to(grad_a_ptr.dtype.element_ty), mask=mask)
        sum_grad_mu += tl.sum(grad_a, axis=0)
        sum_grad_sigma += tl.sum(grad_a * z, axis=0)

    grad_mu = -sum_grad_mu
    grad_sigma = -sum_grad_sigma * softplus_grad(w_sigma)
    tl.store(
        grad_mu_ptr + label * d + cols, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=col_mask
    )
    tl.store(
        grad_sigma_ptr + label * d + cols,
        grad_sigma.to(grad_sigma_ptr.dtype.element_ty),
        mask=col_mask,
    )


def _check_inputs(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    multipliers: torch.Tensor | None,
) -> None:
    check_float("a", a, 2)
    check_index("labels", labels, a.shape[0])
    check_float("w_mu", w_mu, 2)
    check_float("w_sigma", w_sigma, 2)
    check_shape("w_sigma", w_sigma, tuple(w_mu.shape))
    if w_mu.shape[1] != a.shape[1]:
        raise ValueError(
            f"w_mu must have d = {a.shape[1]} columns like a, got shape {tuple(w_mu.shape)}"
        )
    if multipliers is not None:
        check_float("multipliers", multipliers, 2)
        check_shape("multipliers", multipliers, tuple(a.shape))


def _check_margin(margin: float) -> float:
    margin = float(margin)
    if math.isnan(margin):
        raise ValueError("margin must be a number, got NaN")
    return margin


def zscore_constraint_fwd(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the z-score hard-shrink defect and, fused, the multiplier term.

    Args:
        a: block outputs, shape ``(B, d)``.
        labels: class of each row, int64 or int32 of shape ``(B,)`` with values in ``[0, M)``.
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        margin: the margin ``eps``; ``|z| <= eps`` gives a zero defect. ``<= 0`` disables it.
        multipliers: multiplier rows ``lambda``, shape ``(B, d)``, or ``None``.

    Returns:
        ``(defect, term)``: the defect of shape ``(B, d)`` in the promoted dtype of
        ``a``, ``w_mu`` and ``w_sigma``, and the 0-dim float32 ``sum(lambda * defect)``,
        which is zero when ``multipliers`` is ``None``.

    Raises:
        TypeError: a tensor has an unsupported dtype.
        ValueError: the shapes or devices disagree, or ``margin`` is NaN.
        IndexError: a label lies outside ``[0, M)`` (on CUDA, an asynchronous
            device-side assertion instead).
    """
    _check_inputs(a, labels, w_mu, w_sigma, multipliers)
    device = check_device(
        _zscore_constraint_fwd_kernel,
        a=a,
        labels=labels,
        w_mu=w_mu,
        w_sigma=w_sigma,
        multipliers=multipliers,
    )
    margin = _check_margin(margin)
    batch, d = a.shape
    dtype = torch.promote_types(torch.promote_types(a.dtype, w_mu.dtype), w_sigma.dtype)
    defect = torch.empty((batch, d), dtype=dtype, device=device)
    if defect.numel() == 0:
        return defect, torch.zeros((), dtype=torch.float32, device=device)
    low, high = torch.aminmax(labels)
    check_index_range("labels", low, high, w_mu.shape[0])

    a, labels = a.contiguous(), labels.contiguous()
    w_mu, w_sigma = w_mu.contiguous(), w_sigma.contiguous()
    block_d = row_block(d, FWD_MAX_BLOCK_D)
    block_b = min(TILE_NUMEL // block_d, triton.next_power_of_2(batch))
    grid = (triton.cdiv(batch, block_b), triton.cdiv(d, block_d))
    partials = None
    if multipliers is not None:
        multipliers = multipliers.contiguous()
        # float32 partial sums of the term, one per program
        partials = torch.empty(grid, dtype=torch.float32, device=device)
    _zscore_constraint_fwd_kernel[grid](
        a,
        labels,
        w_mu,
        w_sigma,
        a if multipliers is None else multipliers,
        defect,
        defect if partials is None else partials,
        batch,
        d,
        margin,
        HAS_MULTIPLIERS=multipliers is not None,
        SHRINK=margin > 0,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=4,
    )
    if partials is None:
        return defect, torch.zeros((), dtype=torch.float32, device=device)
    return defect, partials.sum()


def zscore_constraint_bwd(
    grad_defect: torch.Tensor | None,
    grad_term: torch.Tensor | None,
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Compute the gradients of :func:`zscore_constraint_fwd`'s inputs.

    With ``G = grad_defect + grad_term * multipliers`` and ``m = 1[|z| > margin]``
    (``m = 1`` when ``margin <= 0``):

    .. math::
        \\partial a = G m / \\sigma[y], \\quad
        \\partial W_\\mu[c] = -\\sum_{b: y_b = c} G m / \\sigma[c], \\quad
        \\partial W_\\sigma[c] = -\\mathrm{sigmoid}(W_\\sigma[c])
            \\sum_{b: y_b = c} G m z / \\sigma[c], \\quad
        \\partial \\lambda = \\partial t \\cdot g

    The per-class sums run over the rows in batch order, so repeated calls
    return the same bits.

    Args:
        grad_defect: gradient of the defect, shape ``(B, d)``, or ``None`` for zero.
        grad_term: gradient of the term, a 0-dim tensor, or ``None`` for zero.
        a, labels, w_mu, w_sigma, margin, multipliers: the forward inputs.

    Returns:
        ``(grad_a, grad_mu, grad_sigma, grad_multipliers)`` in the dtypes and shapes
        of ``a``, ``w_mu``, ``w_sigma`` and ``multipliers``. ``grad_sigma`` is the
        gradient with respect to the pre-softplus ``w_sigma``. ``grad_multipliers``
        is ``None`` when ``multipliers`` is ``None``.

    Raises:
        TypeError: a tensor has an unsupported dtype.
        ValueError: the shapes or devices disagree, or ``margin`` is NaN.
        IndexError: a label lies outside ``[0, M)`` (on CUDA, an asynchronous
            device-side assertion instead).
    """
    _check_inputs(a, labels, w_mu, w_sigma, multipliers)
    if grad_defect is not None:
        check_float("grad_defect", grad_defect, 2)
        check_shape("grad_defect", grad_defect, tuple(a.shape))
    if grad_term is not None and grad_term.numel() != 1:
        raise ValueError(f"grad_term must hold one value, got shape {tuple(grad_term.shape)}")
    device = check_device(
        _zscore_constraint_bwd_kernel,
        grad_defect=grad_defect,
        grad_term=grad_term,
        a=a,
        labels=labels,
        w_mu=w_mu,
        w_sigma=w_sigma,
        multipliers=multipliers,
    )
    margin = _check_margin(margin)
    batch, d = a.shape
    num_classes = w_mu.shape[0]

    grad_a = torch.empty((batch, d), dtype=a.dtype, device=device)
    grad_mu = torch.empty((num_classes, d), dtype=w_mu.dtype, device=device)
    grad_sigma = torch.empty((num_classes, d), dtype=w_sigma.dtype, device=device)
    grad_multipliers = None
    if multipliers is not None:
        grad_multipliers = torch.empty((batch, d), dtype=multipliers.dtype, device=device)
        multipliers = multipliers.contiguous()
        if grad_term is None:
            grad_term = torch.zeros((), dtype=torch.float32, device=device)
    if grad_mu.numel() == 0:
        # No columns or no classes; with no classes, labels must be empty too.
        if batch > 0 and num_classes == 0:
            raise IndexError(f"labels values must lie in [0, 0), got {batch} labels")
        return grad_a, grad_mu, grad_sigma, grad_multipliers

    # Rows grouped by class, batch order kept inside each class: class c owns
    # order[class_start[c]:class_start[c + 1]].
    sorted_labels, order = torch.sort(labels, stable=True)
    if batch > 0:
        check_index_range("labels", sorted_labels[0], sorted_labels[-1], num_classes)
    class_ids = torch.arange(num_classes + 1, dtype=sorted_labels.dtype, device=device)
    class_start = torch.searchsorted(sorted_labels, class_ids)

    a, w_mu, w_sigma = a.contiguous(), w_mu.contiguous(), w_sigma.contiguous()
    if grad_defect is not None:
        grad_defect = grad_defect.contiguous()
    block_d = row_block(d, BWD_MAX_BLOCK_D)
    block_b = TILE_NUMEL // block_d
    grid = (num_classes, triton.cdiv(d, block_d))
    _zscore_constraint_bwd_kernel[grid](
        a if grad_defect is None else grad_defect,
        a if grad_term is None else grad_term,
        a,
        order,
        class_start,
        w_mu,
        w_sigma,
        a if multipliers is None else multipliers,
        grad_a,
        grad_mu,
        grad_sigma,
        a if grad_multipliers is None else grad_multipliers,
        d,
        margin,
        HAS_GRAD_DEFECT=grad_defect is not None,
        HAS_MULTIPLIERS=multipliers is not None,
        SHRINK=margin > 0,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return grad_a, grad_mu, grad_sigma, grad_multipliers
