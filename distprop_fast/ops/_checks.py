"""Input checks shared by the public op functions.

Each check raises with the received shape, dtype, device or value and the fix.
Value checks on index tensors read the data, so they run on CPU tensors outside
``torch.compile`` only. On CUDA the fused kernels assert the range on the device.
"""

from __future__ import annotations

import torch


def check_float(name: str, tensor: torch.Tensor, shape_text: str, ndim: int) -> None:
    """Raise unless ``tensor`` is a floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(tensor)}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {tensor.dtype}; "
            f"convert it with .float()"
        )
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(tensor.shape)}")


def check_shape(
    name: str, tensor: torch.Tensor, expected: tuple[int, ...], shape_text: str
) -> None:
    """Raise unless ``tensor`` has shape ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {shape_text} = {tuple(expected)}, got {tuple(tensor.shape)}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Return the device of the given tensors, which must all be on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first_device = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first_device:
            raise ValueError(
                f"{name} is on {device} but {first_name} is on {first_device}; "
                f"move all inputs to one device with .to({str(first_device)!r})"
            )
    return first_device


def as_index(name: str, tensor: torch.Tensor, size: int, bound_text: str) -> torch.Tensor:
    """Return ``tensor`` as a contiguous int64 vector after checking its values lie in ``[0, size)``.

    Args:
        name: argument name used in messages.
        tensor: integer tensor of shape ``(B,)``.
        size: exclusive upper bound of the values.
        bound_text: what ``size`` is, for messages (``"M"``, ``"|D|"``).

    Raises:
        TypeError: the tensor is not of an integer dtype.
        ValueError: the tensor is not 1-D, or a value is negative or ``>= size``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape (B,), got {type(tensor)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor (int64), got dtype {tensor.dtype}; "
            f"convert it with .long()"
        )
    if tensor.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(tensor.shape)}")
    tensor = tensor.to(torch.int64).contiguous()
    if tensor.numel() == 0 or tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return tensor

    low, high = (int(value) for value in torch.aminmax(tensor))
    if low < 0:
        position = int(torch.argmin(tensor))
        raise ValueError(
            f"{name}[{position}] = {low} is negative; {name} must lie in [0, {bound_text}) "
            f"= [0, {size})"
        )
    if high >= size:
        position = int(torch.argmax(tensor))
        raise ValueError(
            f"{name}[{position}] = {high} is outside [0, {bound_text}) = [0, {size}); "
            f"check that {bound_text} matches the data"
        )
    return tensor


def as_dtype_contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``tensor`` in ``dtype`` and contiguous, copying only when it is neither."""
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def common_float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Return the dtype that PyTorch type promotion gives for ``tensors``."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_finite_cpu(name: str, tensor: torch.Tensor) -> None:
    """Raise if a CPU tensor holds NaN or Inf, before an in-place op writes it into a table.

    NOTE: CUDA tensors are not checked, because the check would wait for the
    device on every call; ``SaddlePointStep`` checks the Lagrangian instead.
    """
    if tensor.device.type == "cpu" and tensor.numel() and not torch.isfinite(tensor).all():
        raise ValueError(
            f"{name} holds NaN or Inf values; the table was left unchanged. Check the loss "
            "for divergence before the step, or lower the step sizes"
        )
