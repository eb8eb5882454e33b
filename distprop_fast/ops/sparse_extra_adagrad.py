"""ExtraAdagrad half-step on sparse rows of a ``(|D|, d)`` table, in place.

Under ``torch.compile`` and other tracers the fused backends (``cpu``, ``cuda``,
``triton``) run behind the custom op ``distprop_fast::sparse_extra_adagrad_``,
which declares that it mutates the table, the accumulator and the saved rows.
Eager mode calls the kernels directly. Their work and temporary memory are ``O(B * d)``: nothing
proportional to ``|D|`` is read, written or allocated.
"""

from __future__ import annotations

import math

import torch

from distprop_fast.ops import reference
from distprop_fast.ops._backend import extension_has, kernel_module, resolve_backend, tracing
from distprop_fast.ops._checks import (
    as_index,
    check_finite_cpu,
    check_float,
    check_same_device,
    check_shape,
)

KERNEL = "sparse_extra_adagrad"

# Ask the dispatcher now, outside any torch.compile trace.
for _key in ("CPU", "CUDA"):
    extension_has("sparse_extra_adagrad_", _key)


@torch.library.custom_op(
    "distprop_fast::sparse_extra_adagrad_", mutates_args=("table", "accum", "saved")
)
def _sparse_extra_adagrad_fused(
    table: torch.Tensor,
    accum: torch.Tensor,
    index: torch.Tensor,
    grad: torch.Tensor,
    saved: torch.Tensor,
    lr: float,
    eps: float,
    update_phase: bool,
    maximize: bool,
    backend: str,
) -> None:
    kernel_module(backend, KERNEL).sparse_extra_adagrad_(
        table, accum, index, grad, saved, lr, eps, update_phase, maximize
    )


@_sparse_extra_adagrad_fused.register_fake
def _(table, accum, index, grad, saved, lr, eps, update_phase, maximize, backend):
    return None


def _check_number(name: str, value: float) -> None:
    # Same limits as torch.optim.Adagrad.
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_inputs(table, accum, index, grad, lr, eps, phase, saved) -> torch.Tensor:
    """Check the inputs and return ``index`` as contiguous int64."""
    if phase not in reference.PHASES:
        raise ValueError(f"phase must be one of {reference.PHASES}, got {phase!r}")
    check_float("table", table, "(|D|, d)", 2)
    check_float("accum", accum, "(|D|, d)", 2)
    check_shape("accum", accum, tuple(table.shape), "(|D|, d)")
    check_float("grad", grad, "(B, d)", 2)
    n_rows, d = table.shape
    index = as_index("index", index, n_rows, "|D|")
    batch = index.shape[0]
    check_shape("grad", grad, (batch, d), "(B, d)")
    if phase == "update":
        if saved is None:
            raise ValueError(
                "phase='update' needs saved, the rows returned by the phase='extrapolate' call"
            )
        check_float("saved", saved, "(B, d)", 2)
        check_shape("saved", saved, (batch, d), "(B, d)")
    _check_number("lr", lr)
    _check_number("eps", eps)
    check_same_device(table=table, accum=accum, index=index, grad=grad, saved=saved)
    check_finite_cpu("grad", grad)
    return index


def _check_writable_layout(table: torch.Tensor, accum: torch.Tensor) -> None:
    # The fused kernels write rows in place, so they cannot work on a copy. Any row
    # stride works, but the features of a row must be adjacent.
    for name, tensor in (("table", table), ("accum", accum)):
        if tensor.shape[1] > 1 and tensor.stride(1) != 1:
            raise ValueError(
                f"{name} has strides {tensor.stride()}, but the fused backends update rows in "
                f"place and need unit stride along d. Keep a .contiguous() copy as the "
                f"{name}, or pass backend='reference'"
            )


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
    backend: str = "auto",
) -> torch.Tensor:
    """Apply one ExtraAdagrad half-step to rows ``index`` of ``table``, in place.

    The gradients of duplicate indices are summed first, in batch order, so the
    result equals a dense Adagrad step whose gradient is zero outside the batch
    rows. The accumulator is updated at both half-steps and never restored.

    .. math::
        G_r \\mathrel{+}= g_r^2, \\qquad
        \\Lambda_r \\mathrel{-}= \\mathrm{lr}\\, g_r / (\\sqrt{G_r} + \\mathrm{eps})

    Args:
        table: parameter table, shape ``(|D|, d)``; changed in place.
        accum: squared-gradient accumulator, shape ``(|D|, d)``; changed in place.
        index: row indices, integer tensor of shape ``(B,)`` in ``[0, |D|)``; duplicates allowed.
        grad: row gradients aligned with ``index``, shape ``(B, d)``.
        lr: step size, ``>= 0``.
        eps: added to ``sqrt(accum)`` in the denominator, ``>= 0``.
        phase: ``"extrapolate"`` saves the rows and steps; ``"update"`` first writes
            ``saved`` back (the last copy for a duplicate index), then steps with the
            look-ahead gradient.
        saved: rows returned by the extrapolation, shape ``(B, d)``; required for
            ``"update"`` and ignored for ``"extrapolate"``.
        maximize: ascend instead of descend (multipliers).
        backend: one of ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.

    Returns:
        For ``"extrapolate"``, the original rows ``table[index]``, shape ``(B, d)``, in
        the dtype of ``table``; for ``"update"``, ``saved`` unchanged.

    Raises:
        TypeError: a tensor has the wrong kind of dtype.
        ValueError: an invalid phase, shape, device, ``lr`` or ``eps``, an index outside
            ``[0, |D|)`` or a NaN or Inf gradient (both checked on CPU tensors only),
            a missing ``saved`` for ``"update"``,
            or a table without unit stride along ``d`` on a fused backend.
        BackendUnavailableError: the requested backend cannot run here.
    """
    index = _check_inputs(table, accum, index, grad, lr, eps, phase, saved)
    chosen = resolve_backend(backend, table.device, "sparse_extra_adagrad_", grad.numel())

    # An optimiser step is not part of the graph, also when table is a leaf that
    # requires grad.
    with torch.no_grad():
        if chosen == "reference":
            return reference.sparse_extra_adagrad_(
                table, accum, index, grad, lr, eps, phase, saved, maximize
            )

        _check_writable_layout(table, accum)
        update_phase = phase == "update"
        if update_phase:
            rows = saved.to(table.dtype).contiguous()
        else:
            rows = table.new_empty((index.shape[0], table.shape[1]))
        args = (
            table,
            accum,
            index,
            grad.contiguous(),
            rows,
            float(lr),
            float(eps),
            update_phase,
            bool(maximize),
        )
        if tracing():
            _sparse_extra_adagrad_fused(*args, chosen)
        else:
            # Eager mode skips the custom op's dispatch, so it bumps the version
            # counters of the written tensors itself, as the custom op would.
            kernel_module(chosen, KERNEL).sparse_extra_adagrad_(*args)
            torch.autograd.graph.increment_version((table, accum, rows))
    return saved if update_phase else rows
