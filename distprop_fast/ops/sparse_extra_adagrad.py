"""ExtraAdagrad half-step on sparse rows of a ``(|D|, d)`` table, in place."""

from __future__ import annotations

import torch

from distprop_fast.ops import reference
from distprop_fast.ops._backend import resolve_backend


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
    """Step rows ``index`` in place; see :func:`reference.sparse_extra_adagrad_`."""
    chosen = resolve_backend(backend, table.device, "sparse_extra_adagrad")
    if chosen == "reference":
        return reference.sparse_extra_adagrad_(
            table, accum, index, grad, lr, eps, phase, saved, maximize
        )
    raise NotImplementedError(f"backend {chosen!r} for sparse_extra_adagrad_ is not implemented")
