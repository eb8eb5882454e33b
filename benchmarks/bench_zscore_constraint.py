"""Benchmark of the z-score hard-shrink constraint with its multiplier term, forward and backward.

``pytest benchmarks/bench_zscore_constraint.py`` times each backend with
pytest-benchmark, including ``compiled``: ``torch.compile`` of the reference.
``benchmarks/compare.py`` imports the cases and builders below and times the
backends side by side, with ratios. Every case first checks the output and
gradients against :mod:`distprop_fast.ops.reference`.

The backward pass starts from the multiplier term alone, as in a training step,
where the defect only feeds statistics.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import pytest
import torch

from distprop_fast.ops import reference, zscore_constraint

FLOAT32_BYTES = 4
INT64_BYTES = 8
# The margin of the authors' tuned MNIST DistProp runs; about a third of the
# standard-normal z-scores fall inside it.
MARGIN = 0.3967
# The op whose registered kernels decide which fused backends run (see conftest.py).
OP_NAME = "zscore_constraint_fwd"
# Timed besides the reference and the fused backends: torch.compile of the reference.
EXTRA_BACKENDS = ("compiled",)


@dataclass(frozen=True)
class ZscoreCase:
    """Shapes of one constraint call: batch ``B``, ``M`` classes, ``d`` features."""

    batch: int
    classes: int
    features: int

    @property
    def name(self) -> str:
        return f"B={self.batch} M={self.classes} d={self.features}"

    @property
    def id(self) -> str:
        return f"B{self.batch}-M{self.classes}-d{self.features}"

    def traffic_bytes(self) -> int:
        """Bytes that forward and backward must read and write at least, in float32.

        Forward reads ``a`` and ``lambda`` ``(B, d)``, the labels and the
        ``min(B, M)`` class rows of ``W_mu`` and ``W_sigma`` that a batch can name,
        and writes ``g`` ``(B, d)``. Backward reads the defect gradient, ``a``,
        ``lambda`` and the same class rows, and writes ``da`` and ``dlambda``
        ``(B, d)`` and the two dense ``(M, d)`` gradients.
        """
        batch_rows = self.batch * self.features
        class_rows = min(self.batch, self.classes) * self.features
        all_classes = self.classes * self.features
        forward_elements = 3 * batch_rows + 2 * class_rows
        backward_elements = 5 * batch_rows + 2 * class_rows + 2 * all_classes
        labels = 2 * INT64_BYTES * self.batch
        return FLOAT32_BYTES * (forward_elements + backward_elements) + labels

    def working_set_bytes(self) -> int:
        """Estimate of the reference's peak memory: about eight ``(B, d)`` and six ``(M, d)``."""
        return FLOAT32_BYTES * (8 * self.batch * self.features + 6 * self.classes * self.features)


# N does not enter the first cut's constraint, whose batch is B=256 real examples.
CASES = [
    ZscoreCase(256, classes, features)
    for classes, features in itertools.product((10, 1000), (128, 1024, 21632))
]


def make_inputs(case: ZscoreCase, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Build labels and the leaves ``a``, ``w_mu``, ``w_sigma``, ``multipliers`` that require grad."""
    generator = torch.Generator().manual_seed(seed)
    b, m, d = case.batch, case.classes, case.features

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).to(device).requires_grad_(True)

    return {
        "a": leaf(b, d),
        "labels": torch.randint(0, m, (b,), generator=generator).to(device),
        "w_mu": leaf(m, d),
        "w_sigma": leaf(m, d),
        "multipliers": leaf(b, d),
    }


GRAD_NAMES = ("a", "w_mu", "w_sigma", "multipliers")


def clear_grads(inputs: dict) -> None:
    for name in GRAD_NAMES:
        inputs[name].grad = None


@functools.cache
def compiled_reference():
    """Return ``torch.compile`` of the reference with default options, compiled on first call.

    With the default ``dynamic=None``, the first shape compiles static kernels and
    a second shape recompiles once with dynamic shapes.
    """
    return torch.compile(reference.zscore_constraint)


def forward(inputs: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = (inputs["a"], inputs["labels"], inputs["w_mu"], inputs["w_sigma"], MARGIN)
    if backend == "compiled":
        return compiled_reference()(*args, inputs["multipliers"])
    return zscore_constraint(*args, inputs["multipliers"], backend=backend)


def backward(inputs: dict, outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, term = outputs
    term.backward()


def check_against_reference(inputs: dict, backend: str) -> None:
    """Raise AssertionError when ``backend`` differs from the reference, forward or backward."""
    clear_grads(inputs)
    expected = forward(inputs, "reference")
    backward(inputs, expected)
    expected_grads = [inputs[name].grad for name in GRAD_NAMES]

    clear_grads(inputs)
    actual = forward(inputs, backend)
    backward(inputs, actual)
    actual_grads = [inputs[name].grad for name in GRAD_NAMES]
    clear_grads(inputs)

    torch.testing.assert_close(actual[0], expected[0], msg=lambda m: f"defect ({backend}): {m}")
    # The term sums B * d products, so its rounding error grows with the sum of
    # their magnitudes, not with the (cancelling) result.
    magnitude = (inputs["multipliers"] * expected[0]).abs().sum().item()
    term_error = abs(actual[1].item() - expected[1].item())
    assert term_error <= 1e-5 * magnitude, (
        f"term ({backend}): {actual[1].item()} differs from the reference {expected[1].item()} "
        f"by {term_error:.3e}, more than 1e-5 of the sum of |lambda * g| = {magnitude:.3e}"
    )
    for name, got, want in zip(GRAD_NAMES, actual_grads, expected_grads):
        tolerance = {}
        if name in ("w_mu", "w_sigma"):
            # Per-class sums over the batch rows: their rounding depends on the
            # summation order, which torch.compile and the fused kernels choose
            # differently, so the error is relative to the largest entry.
            tolerance = {"rtol": 1e-5, "atol": 1e-5 * max(1.0, want.abs().max().item())}
        torch.testing.assert_close(
            got, want, **tolerance, msg=lambda m, name=name: f"grad {name} ({backend}): {m}"
        )


# -- pytest-benchmark ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_zscore_constraint_forward_backward(benchmark, case, bench_device, backend, max_bytes):
    if case.working_set_bytes() > max_bytes:
        pytest.skip(
            f"{case.name} needs about {case.working_set_bytes() / 2**30:.1f} GiB, more than "
            f"--bench-max-gib={max_bytes / 2**30:g}"
        )
    inputs = make_inputs(case, bench_device)
    if backend != "reference":
        check_against_reference(inputs, backend)

    def run():
        clear_grads(inputs)
        backward(inputs, forward(inputs, backend))
        if inputs["a"].is_cuda:
            torch.cuda.synchronize()

    benchmark.group = f"zscore_constraint {case.name}"
    benchmark.extra_info["traffic_bytes"] = case.traffic_bytes()
    benchmark(run)
