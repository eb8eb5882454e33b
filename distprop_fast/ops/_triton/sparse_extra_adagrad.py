"""Triton kernel for the ExtraAdagrad half-step on sparse rows of a ``(|D|, d)`` table.

For each distinct row ``r`` of ``index``, with ``g`` the sum of the gradients of
all batch rows that point at ``r``:

.. math::
    G[r] \\mathrel{+}= g^2, \\quad
    \\Lambda[r] \\mathrel{-}= \\mathrm{lr} \\, g / (\\sqrt{G[r]} + \\mathrm{eps})

(``+=`` for ``maximize``). The extrapolation first copies ``Lambda[index]`` into
``saved``; the update first restores ``Lambda[index]`` from ``saved``.

The launcher sorts ``index`` stably, and the first program of each run of equal
indices owns that row: it sums the run's gradients in batch order and writes
the row, so duplicates need no atomics and the result is deterministic. Work
and extra memory are ``O(B * d)`` and ``O(B)``; the table is never copied.
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
)

MAX_BLOCK_D = 512


@triton.jit
def _sparse_extra_adagrad_kernel(
    table_ptr,
    accum_ptr,
    saved_ptr,
    grad_ptr,
    sorted_index_ptr,
    order_ptr,
    run_end_ptr,
    d,
    table_stride_row,
    table_stride_col,
    accum_stride_row,
    accum_stride_col,
    saved_stride_row,
    saved_stride_col,
    lr,
    eps,
    UPDATE_PHASE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (p, j) covers position p of the sorted index and columns
    # [j * BLOCK_D, (j + 1) * BLOCK_D). It does nothing unless p starts a run.
    position = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    row = tl.load(sorted_index_ptr + position).to(tl.int64)
    previous = tl.load(sorted_index_ptr + position - 1, mask=position > 0, other=-1)
    if (position == 0) | (previous != row):
        end = tl.load(run_end_ptr + position)
        table_ptrs = table_ptr + row * table_stride_row + cols * table_stride_col
        accum_ptrs = accum_ptr + row * accum_stride_row + cols * accum_stride_col

        if UPDATE_PHASE:
            # Restore the row. Duplicates saved the same row, so any of them would do;
            # the last one matches a sequential `table[index] = saved`.
            last = tl.load(order_ptr + end - 1).to(tl.int64)
            saved_ptrs = saved_ptr + last * saved_stride_row + cols * saved_stride_col
            original = tl.load(saved_ptrs, mask=mask, other=0.0).to(table_ptr.dtype.element_ty)
        else:
            original = tl.load(table_ptrs, mask=mask, other=0.0)

        grad_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(position, end):
            batch_row = tl.load(order_ptr + j).to(tl.int64)
            if not UPDATE_PHASE:
                saved_ptrs = saved_ptr + batch_row * saved_stride_row + cols * saved_stride_col
                tl.store(saved_ptrs, original.to(saved_ptr.dtype.element_ty), mask=mask)
            grad = tl.load(grad_ptr + batch_row * d + cols, mask=mask, other=0.0)
            grad_sum += grad.to(tl.float32)

        accum = tl.load(accum_ptrs, mask=mask, other=0.0).to(tl.float32) + grad_sum * grad_sum
        tl.store(accum_ptrs, accum.to(accum_ptr.dtype.element_ty), mask=mask)
        # Round-to-nearest sqrt and division, as in PyTorch, not the fast approximations.
        step = tl.div_rn(lr * grad_sum, tl.sqrt_rn(accum) + eps)
        if MAXIMIZE:
            updated = original.to(tl.float32) + step
        else:
            updated = original.to(tl.float32) - step
        tl.store(table_ptrs, updated.to(table_ptr.dtype.element_ty), mask=mask)


def _check_inputs(
    table: torch.Tensor,
    accum: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    saved: torch.Tensor,
    lr: float,
    eps: float,
) -> None:
    check_float("table", table, 2)
    check_float("accum", accum, 2)
    check_shape("accum", accum, tuple(table.shape))
    check_float("grad", grad, 2)
    check_index("index", index, grad.shape[0])
    if grad.shape[1] != table.shape[1]:
        raise ValueError(
            f"grad must have d = {table.shape[1]} columns like table, got {tuple(grad.shape)}"
        )
    check_float("saved", saved, 2)
    check_shape("saved", saved, tuple(grad.shape))
    for name, value in (("lr", lr), ("eps", eps)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def sparse_extra_adagrad_(
    table: torch.Tensor,
    accum: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    saved: torch.Tensor,
    lr: float,
    eps: float,
    update_phase: bool,
    maximize: bool,
) -> None:
    """Apply one ExtraAdagrad half-step to rows ``index`` of ``table``, in place.

    Equal to :func:`distprop_fast.ops.reference.sparse_extra_adagrad_` with
    ``phase="update" if update_phase else "extrapolate"``. Rows not in ``index``
    are neither read nor written. ``table``, ``accum`` and ``saved`` may be
    strided views; they are written through their strides, never copied.

    Args:
        table: parameter table, shape ``(|D|, d)``; changed in place.
        accum: squared-gradient accumulator, shape ``(|D|, d)``; changed in place.
        index: row indices, int64 or int32 of shape ``(B,)`` in ``[0, |D|)``;
            duplicates allowed, their gradients are summed in batch order.
        grad: row gradients aligned with ``index``, shape ``(B, d)``.
        saved: shape ``(B, d)``. The extrapolation writes ``table[index]`` into it;
            the update reads the rows back from it. With duplicate indices the
            update restores the last duplicate's saved row.
        lr: step size.
        eps: added to ``sqrt(accum)`` in the denominator.
        update_phase: ``False`` for the extrapolation, ``True`` for the update.
        maximize: ascend instead of descend (multipliers).

    Raises:
        TypeError: a tensor has an unsupported dtype.
        ValueError: the shapes or devices disagree, or ``lr`` or ``eps`` is not finite.
        IndexError: an index lies outside ``[0, |D|)`` (on CUDA, an asynchronous
            device-side assertion instead).
    """
    _check_inputs(table, accum, index, grad, saved, lr, eps)
    check_device(
        _sparse_extra_adagrad_kernel,
        table=table,
        accum=accum,
        index=index,
        grad=grad,
        saved=saved,
    )
    batch, d = grad.shape
    if batch == 0 or d == 0:
        return

    sorted_index, order = torch.sort(index, stable=True)
    check_index_range("index", sorted_index[0], sorted_index[-1], table.shape[0])
    # run_end[p]: one past the last sorted position holding sorted_index[p]
    run_end = torch.searchsorted(sorted_index, sorted_index, right=True)

    grad = grad.contiguous()
    block_d = row_block(d, MAX_BLOCK_D)
    grid = (batch, triton.cdiv(d, block_d))
    _sparse_extra_adagrad_kernel[grid](
        table,
        accum,
        saved,
        grad,
        sorted_index,
        order,
        run_end,
        d,
        table.stride(0),
        table.stride(1),
        accum.stride(0),
        accum.stride(1),
        saved.stride(0),
        saved.stride(1),
        float(lr),
        float(eps),
        UPDATE_PHASE=bool(update_phase),
        MAXIMIZE=bool(maximize),
        BLOCK_D=block_d,
        num_warps=4,
    )
