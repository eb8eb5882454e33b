"""Benchmark of the in-place ExtraAdagrad step on sparse rows: extrapolation, then update.

Three implementations are timed on one ``(|D|, d)`` table: the fused backends,
the reference, and ``torch.optim.Adagrad`` fed the sparse gradient that
``nn.Embedding(sparse=True)`` produces (``torch-adagrad``). The Adagrad
baseline saves the batch rows before its first step and writes them back
before its second, which is what ExtraAdagrad adds to two plain Adagrad steps.

``pytest benchmarks/bench_sparse_extra_adagrad.py`` times them with
pytest-benchmark; ``benchmarks/compare.py`` imports the cases and builders below
and times them side by side, with ratios and peak memory. Every implementation
is first checked against :mod:`distprop_fast.ops.reference` on the batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distprop_fast.ops import sparse_extra_adagrad_

FLOAT32_BYTES = 4
INT64_BYTES = 8
LR = 1e-2
EPS = 1e-10
# Multipliers ascend the Lagrangian.
MAXIMIZE = True
IMAGENET_TRAIN_SIZE = 1_281_167
# The op whose registered kernels decide which fused backends run (see conftest.py).
OP_NAME = "sparse_extra_adagrad_"
# Timed besides the reference and the fused backends.
EXTRA_BACKENDS = ("torch-adagrad",)


@dataclass(frozen=True)
class SparseCase:
    """Shapes of one ExtraAdagrad step: ``|D|`` table rows, ``d`` features, batch ``B``."""

    rows: int
    features: int
    batch: int = 256

    @property
    def name(self) -> str:
        return f"|D|={self.rows:,} d={self.features} B={self.batch}"

    @property
    def id(self) -> str:
        return f"D{self.rows}-d{self.features}-B{self.batch}"

    def traffic_bytes(self) -> int:
        """Bytes that the extrapolation and the update must read and write at least, in float32.

        Extrapolation: read the batch rows of table, accumulator and gradient,
        write the saved rows, the accumulator and the table rows (6 row sets).
        Update: read the saved rows, the gradient and the accumulator, write the
        accumulator and the table rows (5 row sets). Both read the index.
        """
        row_set = self.batch * self.features * FLOAT32_BYTES
        return 11 * row_set + 2 * INT64_BYTES * self.batch

    def table_bytes(self) -> int:
        """Memory of the table and its accumulator together."""
        return 2 * self.rows * self.features * FLOAT32_BYTES


# The target case is an ImageNet-sized multiplier table with d=128 (about 650 MB
# each for the table and the accumulator); d=1024 keeps the same table size.
CASES = [
    SparseCase(IMAGENET_TRAIN_SIZE, 128),
    SparseCase(IMAGENET_TRAIN_SIZE // 8, 1024),
]


def make_state(case: SparseCase, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Build the table, a zero accumulator (Adagrad's default start), an index and two gradients.

    The index is drawn uniformly, so with ``B << |D|`` the batch rows are
    scattered over the table as in a shuffled epoch.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.empty(case.rows, case.features, device=device)
    # Filled in slices so that no second full-size temporary exists on the host.
    step = max(1, 2**24 // case.features)
    for start in range(0, case.rows, step):
        stop = min(case.rows, start + step)
        table[start:stop] = torch.randn(stop - start, case.features, generator=generator)
    shape = (case.batch, case.features)
    return {
        "table": table,
        "accum": torch.zeros(case.rows, case.features, device=device),
        "index": torch.randint(0, case.rows, (case.batch,), generator=generator).to(device),
        "grad": torch.randn(shape, generator=generator).to(device),
        "grad_lookahead": torch.randn(shape, generator=generator).to(device),
    }


class TorchAdagradStep:
    """ExtraAdagrad built from ``torch.optim.Adagrad`` and sparse COO gradients.

    The optimizer works on the state's table and accumulator in place: the
    parameter shares the table's storage and the optimizer's ``sum`` state is
    replaced by the shared accumulator.
    """

    def __init__(self, state: dict):
        self.param = torch.nn.Parameter(state["table"])
        self.optimizer = torch.optim.Adagrad([self.param], lr=LR, eps=EPS, maximize=MAXIMIZE)
        # Adagrad allocated its own zero accumulator; use the shared one instead.
        self.optimizer.state[self.param]["sum"] = state["accum"]
        index = state["index"].unsqueeze(0)
        size = tuple(state["table"].shape)
        # Uncoalesced, duplicates included, as nn.Embedding(sparse=True) emits them.
        self.grad = torch.sparse_coo_tensor(index, state["grad"], size, check_invariants=True)
        self.grad_lookahead = torch.sparse_coo_tensor(
            index, state["grad_lookahead"], size, check_invariants=True
        )
        self.index = state["index"]

    @torch.no_grad()
    def extrapolate(self) -> torch.Tensor:
        saved = self.param[self.index].clone()
        self.param.grad = self.grad
        self.optimizer.step()
        return saved

    @torch.no_grad()
    def update(self, saved: torch.Tensor) -> None:
        self.param[self.index] = saved
        self.param.grad = self.grad_lookahead
        self.optimizer.step()


def extrapolate(state: dict, backend: str, adagrad: TorchAdagradStep | None = None):
    if backend == "torch-adagrad":
        return adagrad.extrapolate()
    return sparse_extra_adagrad_(
        state["table"],
        state["accum"],
        state["index"],
        state["grad"],
        LR,
        EPS,
        "extrapolate",
        maximize=MAXIMIZE,
        backend=backend,
    )


def update(state: dict, backend: str, saved, adagrad: TorchAdagradStep | None = None) -> None:
    if backend == "torch-adagrad":
        adagrad.update(saved)
        return
    sparse_extra_adagrad_(
        state["table"],
        state["accum"],
        state["index"],
        state["grad_lookahead"],
        LR,
        EPS,
        "update",
        saved,
        maximize=MAXIMIZE,
        backend=backend,
    )


def _run_on_batch_rows(state: dict, backend: str, adagrad) -> tuple[torch.Tensor, ...]:
    """Run both half-steps, return the batch rows they produced, and restore those rows."""
    rows = state["index"].unique()
    table_before = state["table"][rows].clone()
    accum_before = state["accum"][rows].clone()

    saved = extrapolate(state, backend, adagrad)
    saved_rows = saved.clone()
    update(state, backend, saved, adagrad)
    result = (state["table"][rows].clone(), state["accum"][rows].clone(), saved_rows)

    state["table"][rows] = table_before
    state["accum"][rows] = accum_before
    return result


def check_against_reference(state: dict, backend: str, adagrad=None) -> None:
    """Raise AssertionError when ``backend`` leaves other batch rows than the reference.

    Only the batch rows are compared and then restored, so the check needs no
    copy of the table.
    """
    expected = _run_on_batch_rows(state, "reference", None)
    actual = _run_on_batch_rows(state, backend, adagrad)
    for name, got, want in zip(("table rows", "accumulator rows", "saved rows"), actual, expected):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name} ({backend}): {m}")


# -- pytest-benchmark ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.id)
def case_state(request):
    """Build one table per case for all backends: 1.3 GB per test would dominate the run."""
    case = request.param
    device = request.config.getoption("--bench-device")
    max_bytes = int(request.config.getoption("--bench-max-gib") * 2**30)
    if case.table_bytes() > max_bytes:
        pytest.skip(
            f"{case.name} needs {case.table_bytes() / 2**30:.1f} GiB for table and "
            f"accumulator, more than --bench-max-gib={max_bytes / 2**30:g}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but torch sees no CUDA device")
    return case, make_state(case, device)


def test_sparse_extra_adagrad_both_phases(benchmark, case_state, backend):
    case, state = case_state
    adagrad = TorchAdagradStep(state) if backend == "torch-adagrad" else None
    if backend != "reference":
        check_against_reference(state, backend, adagrad)

    def run():
        saved = extrapolate(state, backend, adagrad)
        update(state, backend, saved, adagrad)
        if state["table"].is_cuda:
            torch.cuda.synchronize()

    benchmark.group = f"sparse_extra_adagrad_ {case.name}"
    benchmark.extra_info["traffic_bytes"] = case.traffic_bytes()
    benchmark(run)
