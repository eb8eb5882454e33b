"""z-score hard-shrink constraint fused with the multiplier contraction."""

from __future__ import annotations

import torch

from distprop_fast.ops import reference
from distprop_fast.ops._backend import resolve_backend


def zscore_constraint(
    a: torch.Tensor,
    labels: torch.Tensor,
    w_mu: torch.Tensor,
    w_sigma: torch.Tensor,
    margin: float,
    multipliers: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(defect, sum(multipliers * defect))``; see the reference for the maths."""
    chosen = resolve_backend(backend, a.device, "zscore_constraint_fwd")
    if chosen == "reference":
        return reference.zscore_constraint(a, labels, w_mu, w_sigma, margin, multipliers)
    raise NotImplementedError(f"backend {chosen!r} for zscore_constraint is not implemented yet")
