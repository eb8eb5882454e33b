"""Benchmark of one DistProp training step (extragradient: two Lagrangian evaluations).

The step runs on random inputs of MNIST's shape (batch 256 of 1x28x28, ten
classes, 60,000 training examples), so it needs no data set on disk: the
step's cost does not depend on pixel values. The step uses the DistProp
MNIST defaults except for the multiplier step rule, which is Adagrad here so
that the sparse ExtraAdagrad op runs (the default, SGD, runs no fused op).

``pytest benchmarks/bench_step.py`` times a step per backend and network with
pytest-benchmark. ``benchmarks/compare.py`` imports the builders below to time
the backends side by side and to split the step time between the three ops.
Every benchmark first checks that the fused backend and the reference give the
same loss and gradients at the same point.
"""

from __future__ import annotations

import itertools

import bench_sampling
import bench_sparse_extra_adagrad
import bench_zscore_constraint
import pytest
import torch

from distprop_fast.data import IndexedDataset
from distprop_fast.train import TrainConfig, build

MNIST_TRAIN_SIZE = 60_000
MNIST_CLASSES = 10
BATCH_SIZE = 256
NETWORKS = ("mnist-every-layer", "mnist-two-block")
# The op whose registered kernels decide which fused backends run (see conftest.py).
OP_NAME = "zscore_constraint_fwd"


def placeholder_data(num_examples: int = MNIST_TRAIN_SIZE) -> IndexedDataset:
    """Return a data set with MNIST's size and shapes whose images take no memory.

    ``build`` reads only the size, the input shape and the number of classes.
    """
    x = torch.zeros(1, 1, 28, 28).expand(num_examples, 1, 28, 28)
    y = torch.zeros(num_examples, dtype=torch.int64)
    return IndexedDataset(x=x, y=y, num_classes=MNIST_CLASSES, name="mnist")


def make_config(network: str, backend: str, device: str = "cpu") -> TrainConfig:
    config = TrainConfig(
        method="distprop",
        dataset="mnist",
        network=network,
        backend=backend,
        device=device,
        batch_size=BATCH_SIZE,
        multiplier_rule="adagrad",
    )
    return config.resolved()


def build_step(network: str, backend: str, device: str = "cpu"):
    """Return ``(formulation, step)``; the same seed gives every backend the same start."""
    formulation, step, _ = build(make_config(network, backend, device), placeholder_data())
    return formulation, step


def random_batch(device: str | torch.device = "cpu", seed: int = 0):
    """Return ``(x, y, index)`` of MNIST's shapes drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH_SIZE, 1, 28, 28, generator=generator)
    y = torch.randint(0, MNIST_CLASSES, (BATCH_SIZE,), generator=generator)
    index = torch.randint(0, MNIST_TRAIN_SIZE, (BATCH_SIZE,), generator=generator)
    return x.to(device), y.to(device), index.to(device)


def check_backends_agree(network: str, backend: str, device: str = "cpu") -> None:
    """Raise AssertionError unless ``backend`` and the reference give the same loss and gradients.

    Both steps are built from the same seed and evaluate the Lagrangian once at
    the starting point, as the first half of a step does.
    """
    batch = random_batch(device)
    results = []
    for name in ("reference", backend):
        _, step = build_step(network, name, device)
        terms, _, dense_grads, row_grads = step._evaluate(*batch)
        results.append((terms.lagrangian.detach(), dense_grads, row_grads))
    (want_value, want_dense, want_rows), (got_value, got_dense, got_rows) = results

    torch.testing.assert_close(got_value, want_value, msg=lambda m: f"Lagrangian: {m}")
    for i, (got, want) in enumerate(zip(got_dense, want_dense)):
        if want is None:
            assert got is None, f"dense gradient {i}: the reference has none, {backend} has one"
            continue
        # Gradients reach the weights through convolutions that sum thousands of
        # terms, so their rounding error is relative to the largest entry.
        atol = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=atol, msg=lambda m, i=i: f"dense gradient {i}: {m}"
        )
    for i, (got, want) in enumerate(zip(got_rows, want_rows)):
        torch.testing.assert_close(got, want, msg=lambda m, i=i: f"row gradient {i}: {m}")


def op_calls_per_step(formulation, num_examples: int = MNIST_TRAIN_SIZE):
    """List ``(bench module, case, calls per step)`` for the fused ops of one DistProp step.

    Each of the two Lagrangian evaluations runs the constraint at every cut and
    samples every cut once, for the inputs of the later blocks and of the loss.
    The multiplier table of the first cut takes one extrapolation and one
    update, counted as one call.
    """
    classes = formulation.num_classes
    samples = formulation.samples_per_class
    sizes = formulation.network.cut_sizes
    evaluations = 2
    calls = [
        (
            bench_zscore_constraint,
            bench_zscore_constraint.ZscoreCase(BATCH_SIZE, classes, sizes[0]),
            evaluations,
        )
    ]
    for d_in, d_out in itertools.pairwise(sizes):
        calls.append(
            (bench_sampling, bench_sampling.SamplingCase(classes, d_in, samples), evaluations)
        )
        later = bench_zscore_constraint.ZscoreCase(samples * classes, classes, d_out)
        calls.append((bench_zscore_constraint, later, evaluations))
    calls.append(
        (bench_sampling, bench_sampling.SamplingCase(classes, sizes[-1], samples), evaluations)
    )
    table = bench_sparse_extra_adagrad.SparseCase(num_examples, sizes[0], BATCH_SIZE)
    calls.append((bench_sparse_extra_adagrad, table, 1))
    return calls


# -- pytest-benchmark ------------------------------------------------------------------------


@pytest.mark.parametrize("network", NETWORKS)
def test_distprop_step(benchmark, network, bench_device, backend):
    if backend != "reference":
        check_backends_agree(network, backend, bench_device)
    _, step = build_step(network, backend, bench_device)
    batch = random_batch(bench_device)

    def run():
        step(*batch)
        if batch[0].is_cuda:
            torch.cuda.synchronize()

    benchmark.group = f"DistProp step {network}"
    benchmark.pedantic(run, warmup_rounds=1, rounds=5)
