"""Per-class re-parameterised sampling ``S = W_mu[c] + E * softplus(W_sigma[c])``."""

from __future__ import annotations

import torch

from distprop_fast.ops import reference
from distprop_fast.ops._backend import resolve_backend


def sample_classes(
    w_mu: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Draw per-class samples; see :func:`distprop_fast.ops.reference.sample_classes`."""
    chosen = resolve_backend(backend, w_mu.device, "sample_classes_fwd")
    if chosen == "reference":
        return reference.sample_classes(w_mu, w_sigma, noise)
    raise NotImplementedError(f"backend {chosen!r} for sample_classes is not implemented yet")
