"""Per-class re-parameterised sampling ``S = W_mu[c] + E * softplus(W_sigma[c])``.

The reference backend runs as plain PyTorch operations, so autograd and
``torch.compile`` see through it. Under ``torch.compile`` and other tracers the
fused backends (``cpu``, ``cuda``, ``triton``) run behind the custom op
``distprop_fast::sample_classes``, whose fake kernel lets ``torch.compile`` trace
it without a graph break and whose backward is the custom op
``distprop_fast::sample_classes_bwd``. In eager mode an autograd function calls
the same kernels and backward directly, which saves the custom op's dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distprop_fast.ops import reference
from distprop_fast.ops._backend import extension_has, kernel_module, resolve_backend, tracing
from distprop_fast.ops._checks import (
    as_dtype_contiguous,
    check_float,
    check_same_device,
    check_shape,
    common_float_dtype,
)

KERNEL = "sample_classes"

# Ask the dispatcher now, outside any torch.compile trace.
for _key in ("CPU", "CUDA"):
    extension_has("sample_classes_fwd", _key)


@torch.library.custom_op("distprop_fast::sample_classes", mutates_args=())
def _sample_classes_fused(
    w_mu: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor, backend: str
) -> torch.Tensor:
    return kernel_module(backend, KERNEL).sample_classes_fwd(w_mu, w_sigma, noise)


@_sample_classes_fused.register_fake
def _(w_mu, w_sigma, noise, backend):
    return torch.empty_like(noise)


@torch.library.custom_op("distprop_fast::sample_classes_bwd", mutates_args=())
def _sample_classes_bwd_fused(
    grad_samples: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_mu, grad_w_sigma = kernel_module(backend, KERNEL).sample_classes_bwd(
        grad_samples, w_sigma, noise
    )
    return grad_mu, grad_w_sigma


@_sample_classes_bwd_fused.register_fake
def _(grad_samples, w_sigma, noise, backend):
    return torch.empty_like(w_sigma), torch.empty_like(w_sigma)


def _setup_context(ctx, inputs, output):
    _, w_sigma, noise, backend = inputs
    ctx.save_for_backward(w_sigma, noise)
    ctx.backend = backend


def _backward_with(bwd, ctx, grad_samples):
    """Compute the input gradients with ``bwd``, the backward op or its kernel."""
    w_sigma, noise = ctx.saved_tensors
    grad_mu, grad_w_sigma = bwd(grad_samples.contiguous(), w_sigma, noise)
    # The noise is usually a fixed buffer, so its gradient dS * sigma[c] is computed
    # only on request.
    grad_noise = None
    if ctx.needs_input_grad[2]:
        grad_noise = grad_samples * F.softplus(w_sigma)
    return grad_mu, grad_w_sigma, grad_noise, None


def _backward(ctx, grad_samples):
    def bwd(*args):
        return _sample_classes_bwd_fused(*args, ctx.backend)

    return _backward_with(bwd, ctx, grad_samples)


_sample_classes_fused.register_autograd(_backward, setup_context=_setup_context)


class _SampleClassesFunction(torch.autograd.Function):
    """The fused op for eager mode: the custom op's kernels and backward, called
    without the custom op's dispatch."""

    @staticmethod
    def forward(w_mu, w_sigma, noise, backend):
        return kernel_module(backend, KERNEL).sample_classes_fwd(w_mu, w_sigma, noise)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_samples):
        bwd = kernel_module(ctx.backend, KERNEL).sample_classes_bwd
        return _backward_with(bwd, ctx, grad_samples)


def _check_inputs(w_mu: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor) -> None:
    check_float("w_mu", w_mu, "(M, d)", 2)
    check_float("w_sigma", w_sigma, "(M, d)", 2)
    check_float("noise", noise, "(N, M, d)", 3)
    n_classes, d = w_mu.shape
    check_shape("w_sigma", w_sigma, (n_classes, d), "(M, d)")
    check_shape("noise", noise, (noise.shape[0], n_classes, d), "(N, M, d)")
    check_same_device(w_mu=w_mu, w_sigma=w_sigma, noise=noise)


def sample_classes(
    w_mu: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Draw re-parameterised per-class samples.

    .. math::
        S[n, c] = W_\\mu[c] + E[n, c] \\odot \\mathrm{softplus}(W_\\sigma[c])

    Args:
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        noise: standard normal noise ``E``, shape ``(N, M, d)``.
        backend: one of ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.

    Returns:
        Samples of shape ``(N, M, d)`` in the promoted dtype of the inputs. Sample
        ``[n, c]`` belongs to class ``c``. Differentiable with respect to all inputs
        (once; the fused backends have no double backward).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: shapes do not match or tensors are on different devices.
        BackendUnavailableError: the requested backend cannot run here.
    """
    _check_inputs(w_mu, w_sigma, noise)
    chosen = resolve_backend(backend, w_mu.device, "sample_classes_fwd", w_mu.numel())
    if chosen == "reference":
        return reference.sample_classes(w_mu, w_sigma, noise)

    # The kernels read one storage dtype, so mixed inputs are promoted as the
    # reference would promote them.
    dtype = common_float_dtype(w_mu, w_sigma, noise)
    args = (
        as_dtype_contiguous(w_mu, dtype),
        as_dtype_contiguous(w_sigma, dtype),
        as_dtype_contiguous(noise, dtype),
        chosen,
    )
    # Tracers need the custom op, which has a fake kernel; eager mode skips it.
    if tracing():
        return _sample_classes_fused(*args)
    return _SampleClassesFunction.apply(*args)
