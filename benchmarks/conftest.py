"""Options and fixtures of the pytest-benchmark files.

Run ``pytest benchmarks/ [--bench-device cuda] [--bench-max-gib 4]``. Each test
is parametrized over ``backend``: the reference plus the fused backends of the
device (``cpu`` on a CPU; ``cuda`` and ``triton`` on a GPU), and any
``EXTRA_BACKENDS`` a benchmark module declares. A backend that cannot run
here is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from distprop_fast.ops import BackendUnavailableError, resolve_backend

FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def pytest_addoption(parser):
    group = parser.getgroup("distprop_fast benchmarks")
    group.addoption(
        "--bench-device",
        choices=sorted(FUSED_BACKENDS),
        default="cpu",
        help="device the benchmarks run on (default: cpu)",
    )
    group.addoption(
        "--bench-max-gib",
        type=float,
        default=4.0,
        help="skip cases whose estimated peak memory exceeds this many GiB (default: 4)",
    )


def pytest_collect_file(file_path, parent):
    # pytest collects only test_*.py by default; the benchmark files are named bench_*.py.
    # A file named on the command line is collected by pytest itself.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _unavailable_reason(backend: str, device: str, op_name: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "--bench-device cuda, but torch sees no CUDA device"
    if backend not in ("cpu", "cuda", "triton"):
        # The reference and the extra backends of a module run wherever torch runs.
        return None
    try:
        resolve_backend(backend, torch.device(device), op_name)
    except BackendUnavailableError as err:
        return str(err)
    return None


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device")
    op_name = metafunc.module.OP_NAME
    names = ["reference", *getattr(metafunc.module, "EXTRA_BACKENDS", ()), *FUSED_BACKENDS[device]]
    params = []
    for name in names:
        reason = _unavailable_reason(name, device, op_name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    metafunc.parametrize("backend", params)


@pytest.fixture
def bench_device(request) -> str:
    return request.config.getoption("--bench-device")


@pytest.fixture
def max_bytes(request) -> int:
    return int(request.config.getoption("--bench-max-gib") * 2**30)
