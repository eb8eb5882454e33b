"""Choice of implementation for the fused operations.

Every op takes ``backend=`` with one of :data:`BACKENDS`. ``"auto"`` picks the
fastest implementation that can run on the tensor's device; the environment
variable ``DISTPROP_BACKEND`` replaces ``"auto"`` for a whole run. A request for
a backend that is not available raises :class:`BackendUnavailableError` naming
what is missing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ENV_VAR = "DISTPROP_BACKEND"

log = logging.getLogger("distprop_fast")


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run on this machine or this device."""


@functools.cache
def extension():
    """Return the compiled extension module ``distprop_fast._C``, or ``None``.

    A missing extension is logged once; the reference path then runs.
    """
    try:
        from distprop_fast import _C  # noqa: F401
    except ImportError as err:
        log.info("distprop_fast._C is not built (%s); fused C++/CUDA ops are off", err)
        return None
    return _C


# (op name, dispatch key) -> registered. torch.compile cannot trace the dispatcher query,
# but it can trace a lookup in this dict, so the op modules fill it when they are imported.
_kernel_table: dict[tuple[str, str], bool] = {}


def _query_extension(op_name: str, dispatch_key: str) -> bool:
    if extension() is None:
        return False
    qualified = f"distprop_fast_C::{op_name}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key)
    except RuntimeError:
        return False


def extension_has(op_name: str, dispatch_key: str) -> bool:
    """Return whether the extension registered ``op_name`` for ``dispatch_key``."""
    key = (op_name, dispatch_key)
    if key not in _kernel_table:
        _kernel_table[key] = _query_extension(op_name, dispatch_key)
    return _kernel_table[key]


def kernel_module(backend: str, kernel: str):
    """Return the namespace that contains the low-level ops of ``kernel`` for ``backend``.

    ``"cpu"`` and ``"cuda"`` give ``torch.ops.distprop_fast_C``. ``"triton"`` imports
    ``distprop_fast.ops._triton.<kernel>`` on first use; its launchers have the same
    names and arguments as the C++ ops.

    Raises:
        BackendUnavailableError: the Triton module or the triton package is missing.
        ValueError: ``backend`` names no fused backend.
    """
    if backend in ("cpu", "cuda"):
        return torch.ops.distprop_fast_C
    if backend != "triton":
        raise ValueError(f"no fused kernels for backend {backend!r}; expected cpu, cuda or triton")
    module_name = f"distprop_fast.ops._triton.{kernel}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only a missing Triton module or package means "unavailable"; any other
        # missing import is a bug inside that module and propagates.
        if err.name not in (module_name, "distprop_fast.ops._triton", "triton"):
            raise
        raise BackendUnavailableError(
            f"backend='triton' needs the module {module_name}, which failed to import "
            f"({err}); install triton or pick backend='reference'"
        ) from err


# Filled at import for the same reason as _kernel_table: torch.compile ignores
# functools.cache and would trace the import-system query.
_triton_found = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Return whether Triton imports; it runs on CPU tensors only under TRITON_INTERPRET=1."""
    return _triton_found


def triton_runs_on(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def tracing() -> bool:
    """Return whether torch.compile, export or a dispatch-mode tracer (make_fx, fake
    tensors) is running, which need the custom ops and their fake kernels.

    Eager calls of the fused ops skip the custom ops' dispatch and call the kernels
    through an autograd function instead.
    """
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


# Smallest call for which "auto" runs the C++ kernel of an op on the CPU, in
# elements of (M, d) for sampling and of (B, d) for the other two ops. Below it the
# reference runs, because its few ATen calls cost less than the fused op's fixed
# cost per call. Forward + backward at 1 thread on a 2-CPU AMD EPYC (AVX-512) with
# torch 2.14.1:
# - sampling: the kernel was 0.6-0.96x the reference up to M * d = 1,600 (any N up
#   to 32), and 1.3-3.8x from M * d = 10,240 on, because there the reference's
#   softplus dominates.
# - constraint: 0.8-1.0x below 16k elements of (B, d), 1.4x and more from 32k.
# - sparse step: the kernel was faster at every measured size.
# NOTE: measured with other jobs sharing the machine (load average about 5), so
# the crossovers are estimates to within a factor of about 2.
CPU_AUTO_MIN_ELEMENTS = {
    "sample_classes_fwd": 8_192,
    "zscore_constraint_fwd": 32_768,
    "sparse_extra_adagrad_": 0,
}


def resolve_backend(
    requested: str | None, device: torch.device, op_name: str, elements: int | None = None
) -> str:
    """Map a requested backend to the one that will run ``op_name`` on ``device``.

    Args:
        requested: one of :data:`BACKENDS`, or ``None`` for ``"auto"``.
        device: the device of the op's tensors.
        op_name: the C++ op whose registered kernels decide what is available.
        elements: size of the call as ``CPU_AUTO_MIN_ELEMENTS`` counts it. ``"auto"``
            runs the reference on the CPU below ``CPU_AUTO_MIN_ELEMENTS[op_name]``,
            and ``None`` skips that rule.

    Raises:
        ValueError: ``requested`` is not one of :data:`BACKENDS`.
        BackendUnavailableError: the backend is not built or cannot run on ``device``.
    """
    if requested is None or requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS}, got {requested!r} "
            f"(check the argument and the {ENV_VAR} environment variable)"
        )
    if requested == "reference":
        return "reference"
    if requested == "auto":
        if device.type == "cuda" and extension_has(op_name, "CUDA"):
            return "cuda"
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and extension_has(op_name, "CPU"):
            if elements is not None and elements < CPU_AUTO_MIN_ELEMENTS.get(op_name, 0):
                return "reference"
            return "cpu"
        return "reference"
    if requested == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='cpu' runs on CPU tensors, got a tensor on {device}; "
                "move the tensors to the CPU or pick backend='cuda'/'triton'"
            )
        if not extension_has(op_name, "CPU"):
            raise BackendUnavailableError(
                f"backend='cpu' needs the C++ extension with op {op_name!r}; rebuild with "
                "`pip install --no-build-isolation -e .` (and without DISTPROP_NO_EXTENSION=1)"
            )
        return "cpu"
    if requested == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"backend='cuda' runs on CUDA tensors, got a tensor on {device}; pass "
                "--device cuda (a CUDA device is required) or use backend='auto'"
            )
        if not extension_has(op_name, "CUDA"):
            raise BackendUnavailableError(
                f"backend='cuda' needs the extension built with nvcc and op {op_name!r}; "
                "set CUDA_HOME to the toolkit root and reinstall"
            )
        return "cuda"
    # requested == "triton"
    if not triton_available():
        raise BackendUnavailableError(
            "backend='triton' needs the triton package: pip install triton"
        )
    if not triton_runs_on(device):
        raise BackendUnavailableError(
            f"backend='triton' needs a CUDA tensor, got one on {device}; on CPU, set "
            "TRITON_INTERPRET=1 before triton is first imported to use the interpreter"
        )
    return "triton"
