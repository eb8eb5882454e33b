"""Tolerances per dtype and a comparison whose failure message explains itself."""

from __future__ import annotations

import torch

# (rtol, atol) for fused kernels against the float64-free reference. Half
# types store values with 8 (bfloat16) or 11 (float16) mantissa bits, so one
# rounding of the stored result dominates their error.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """Compare two tensors with the tolerance of ``dtype`` and explain any mismatch.

    The message gives the number of differing elements, the first indices, the
    largest absolute error and any NaN/Inf disagreement.
    """
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = torch.isinf(a) != torch.isinf(e)
    both_finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(both_finite, (a - e).abs(), torch.zeros_like(a))
    bad = (err > atol + rtol * e.abs()) | nan_mismatch | inf_mismatch
    if not bad.any():
        return
    where = bad.nonzero()[:5].tolist()
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
        f"first at {where}; max abs error {err.max().item():.3e}; "
        f"NaN mismatches {int(nan_mismatch.sum())}, Inf mismatches {int(inf_mismatch.sum())}"
    )
