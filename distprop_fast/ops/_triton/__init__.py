"""Triton kernels of the three fused operations, with launchers that take plain tensors.

Each module contains private ``@triton.jit`` kernels followed by launchers that
check their inputs, make them contiguous, allocate the outputs and launch:

* :mod:`.sample_classes`: ``sample_classes_fwd``, ``sample_classes_bwd``;
* :mod:`.zscore_constraint`: ``zscore_constraint_fwd``, ``zscore_constraint_bwd``;
* :mod:`.sparse_extra_adagrad`: ``sparse_extra_adagrad_``.

All arithmetic is float32; tensors may be stored as float32, float16 or
bfloat16. The kernels target CUDA tensors. On CPU tensors they run only under
the Triton interpreter, which is chosen when each kernel is decorated, so
``TRITON_INTERPRET=1`` must be set before these modules are first imported.

This module also contains the pieces the three share: input checks, block-size
choice and the softplus used by the sampling and constraint kernels.

NOTE: block sizes and warp counts follow fixed rules (tiles of about 2048
elements, 4 warps) and have not been timed or autotuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# torch.nn.functional.softplus (beta=1) returns x unchanged above this threshold.
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def softplus(x):
    """Return ``log(1 + exp(x))`` in float32, linear above 20 as in PyTorch."""
    # Zeroing x above the threshold keeps exp finite in the discarded branch, and
    # unlike tl.minimum it lets a NaN through to the result as PyTorch does.
    t = tl.exp(tl.where(x > SOFTPLUS_THRESHOLD, 0.0, x))
    u = 1.0 + t
    # log1p without libdevice (which the interpreter lacks): the factor t / (u - 1)
    # cancels the rounding error of 1 + t, so small t keeps full relative precision.
    rounded = tl.where(u == 1.0, 1.0, u - 1.0)
    log1p = tl.where(u == 1.0, t, tl.log(u) * (t / rounded))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def softplus_grad(x):
    """Return d softplus / dx, which is ``sigmoid(x)`` and exactly 1 above 20 as in PyTorch."""
    return tl.where(x > SOFTPLUS_THRESHOLD, 1.0, tl.sigmoid(x))


def check_float(name: str, tensor: torch.Tensor, ndim: int) -> None:
    """Raise unless ``tensor`` is a float32/float16/bfloat16 tensor with ``ndim`` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}; "
            "convert it with .float()"
        )
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def check_index(name: str, tensor: torch.Tensor, length: int) -> None:
    """Raise unless ``tensor`` is an int32/int64 vector of ``length`` elements."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {tensor.dtype}")
    if tensor.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(tensor.shape)}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise unless ``tensor`` has exactly ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_device(kernel, **tensors: torch.Tensor | None) -> torch.device:
    """Return the common device of the tensors (``None`` skipped) once ``kernel`` can run there.

    Raises:
        ValueError: the tensors are on different devices, or on a device other
            than CUDA, or on the CPU while ``kernel`` was compiled for the GPU.
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) != 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    device = devices.pop()
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"Triton kernels run on CUDA tensors, got tensors on {device}")
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise ValueError(
            "Triton kernels run on CPU tensors only under the interpreter: set "
            "TRITON_INTERPRET=1 before distprop_fast.ops._triton is first imported, "
            "or move the tensors to a CUDA device"
        )
    return device


def check_index_range(name: str, low: torch.Tensor, high: torch.Tensor, upper: int) -> None:
    """Raise unless the 0-dim ``low`` and ``high`` (min and max of ``name``) lie in ``[0, upper)``.

    The kernels read and write rows at these indices without bounds checks. On a
    CUDA device the check is asynchronous, so it does not wait for the GPU, and a
    violation surfaces as a device-side assertion at the next synchronisation.
    """
    if low.device.type == "cpu":
        if int(low) < 0 or int(high) >= upper:
            raise IndexError(
                f"{name} values must lie in [0, {upper}), got min {int(low)} and max {int(high)}"
            )
        return
    torch._assert_async((low >= 0) & (high < upper), f"{name} values must lie in [0, {upper})")


def row_block(d: int, max_block: int) -> int:
    """Return the power-of-two block width for ``d`` columns, clamped to ``[16, max_block]``."""
    return max(16, min(triton.next_power_of_2(d), max_block))
