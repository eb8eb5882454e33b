"""Benchmark of per-class re-parameterised sampling, forward and backward.

``pytest benchmarks/bench_sampling.py`` times each backend with pytest-benchmark.
``benchmarks/compare.py`` imports the cases and builders below and times the
backends side by side, with ratios. Every case first checks the fused output and
gradients against :mod:`distprop_fast.ops.reference`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from distprop_fast.ops import reference, sample_classes

FLOAT32_BYTES = 4
# The op whose registered kernels decide which fused backends run (see conftest.py).
OP_NAME = "sample_classes_fwd"


@dataclass(frozen=True)
class SamplingCase:
    """Shapes of one sampling call: ``M`` classes, ``d`` features, ``N`` samples per class."""

    classes: int
    features: int
    samples: int

    @property
    def name(self) -> str:
        return f"M={self.classes} d={self.features} N={self.samples}"

    @property
    def id(self) -> str:
        return f"M{self.classes}-d{self.features}-N{self.samples}"

    def traffic_bytes(self) -> int:
        """Bytes that forward and backward must read and write at least, in float32.

        Forward reads ``W_mu``, ``W_sigma`` ``(M, d)`` and ``E`` ``(N, M, d)`` and writes
        ``S`` ``(N, M, d)``. Backward reads ``dS``, ``E`` and ``W_sigma`` and writes the two
        ``(M, d)`` gradients.
        """
        per_class = self.classes * self.features
        return FLOAT32_BYTES * (4 * self.samples * per_class + 5 * per_class)

    def working_set_bytes(self) -> int:
        """Estimate of the reference's peak memory: about five ``(N, M, d)`` tensors alive.

        They are ``E``, ``S``, ``dS``, the product ``E * sigma`` and a gradient
        temporary before the sum over ``N``.
        """
        return FLOAT32_BYTES * 5 * self.samples * self.classes * self.features


# B does not enter sampling; the shapes follow the targets: M in {10, 1000},
# d in {128, 1024, 21632}, N in {1, 32}.
CASES = [
    SamplingCase(classes, features, samples)
    for classes, features, samples in itertools.product((10, 1000), (128, 1024, 21632), (1, 32))
]


def make_inputs(case: SamplingCase, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Build leaves ``w_mu``, ``w_sigma`` that require grad, fixed noise and an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    m, d, n = case.classes, case.features, case.samples
    return {
        "w_mu": torch.randn(m, d, generator=generator).to(device).requires_grad_(True),
        "w_sigma": torch.randn(m, d, generator=generator).to(device).requires_grad_(True),
        # The noise is a fixed buffer in training, so it takes no gradient.
        "noise": torch.randn(n, m, d, generator=generator).to(device),
        "grad_samples": torch.randn(n, m, d, generator=generator).to(device),
    }


def clear_grads(inputs: dict) -> None:
    inputs["w_mu"].grad = None
    inputs["w_sigma"].grad = None


def forward(inputs: dict, backend: str) -> torch.Tensor:
    return sample_classes(inputs["w_mu"], inputs["w_sigma"], inputs["noise"], backend=backend)


def backward(inputs: dict, samples: torch.Tensor) -> None:
    samples.backward(inputs["grad_samples"])


def check_against_reference(inputs: dict, backend: str) -> None:
    """Raise AssertionError when ``backend`` differs from the reference, forward or backward."""
    clear_grads(inputs)
    expected = reference.sample_classes(inputs["w_mu"], inputs["w_sigma"], inputs["noise"])
    expected.backward(inputs["grad_samples"])
    expected_grads = (inputs["w_mu"].grad, inputs["w_sigma"].grad)

    clear_grads(inputs)
    samples = forward(inputs, backend)
    backward(inputs, samples)
    actual_grads = (inputs["w_mu"].grad, inputs["w_sigma"].grad)
    clear_grads(inputs)

    torch.testing.assert_close(samples, expected, msg=lambda m: f"samples ({backend}): {m}")
    for name, actual, want in zip(("grad w_mu", "grad w_sigma"), actual_grads, expected_grads):
        torch.testing.assert_close(
            actual, want, msg=lambda m, name=name: f"{name} ({backend}): {m}"
        )


# -- pytest-benchmark ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_sample_classes_forward_backward(benchmark, case, bench_device, backend, max_bytes):
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
        if inputs["w_mu"].is_cuda:
            torch.cuda.synchronize()

    benchmark.group = f"sample_classes {case.name}"
    benchmark.extra_info["traffic_bytes"] = case.traffic_bytes()
    benchmark(run)
