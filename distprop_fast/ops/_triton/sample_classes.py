"""Triton kernels for per-class re-parameterised sampling.

.. math::
    S[n, c] = W_\\mu[c] + E[n, c] \\odot \\mathrm{softplus}(W_\\sigma[c])

Shapes: class parameters ``(M, d)``, noise and samples ``(N, M, d)``. The
kernels treat the class parameters as one flat vector of ``M * d`` elements,
so sample ``n`` is the same vector shifted by ``n * M * d``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distprop_fast.ops._triton import (
    check_device,
    check_float,
    check_shape,
    softplus,
    softplus_grad,
)

# CUDA limits the second grid dimension to 65535 programs.
MAX_GRID_Y = 65535
FWD_BLOCK = 1024
BWD_BLOCK = 256
# Samples written per forward program: each program then loads W_mu and W_sigma
# and evaluates softplus once for this many samples.
FWD_SAMPLES_PER_PROGRAM = 4


@triton.jit
def _sample_classes_fwd_kernel(
    mu_ptr,
    sigma_ptr,
    noise_ptr,
    out_ptr,
    class_numel,
    num_samples,
    SAMPLES_PER_PROGRAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (i, j) covers elements [i * BLOCK, (i + 1) * BLOCK) of the flat
    # (M * d) class parameters for samples [j * SAMPLES_PER_PROGRAM, ...).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < class_numel
    mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sigma = softplus(tl.load(sigma_ptr + offsets, mask=mask, other=0.0).to(tl.float32))

    first = tl.program_id(1).to(tl.int64) * SAMPLES_PER_PROGRAM
    noise_ptrs = noise_ptr + first * class_numel + offsets
    out_ptrs = out_ptr + first * class_numel + offsets
    for n in range(SAMPLES_PER_PROGRAM):
        valid = mask & (first + n < num_samples)
        noise = tl.load(noise_ptrs, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (mu + noise * sigma).to(out_ptr.dtype.element_ty), mask=valid)
        # Advancing the pointers keeps 64-bit addresses without a 32-bit n * M * d product.
        noise_ptrs += class_numel
        out_ptrs += class_numel


@triton.jit
def _sample_classes_bwd_kernel(
    grad_ptr,
    sigma_ptr,
    noise_ptr,
    grad_mu_ptr,
    grad_sigma_ptr,
    class_numel,
    num_samples,
    BLOCK: tl.constexpr,
):
    # Each program sums its BLOCK elements over all N samples in order n = 0, 1, ...,
    # so the result does not depend on scheduling.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < class_numel
    grad_ptrs = grad_ptr + offsets
    noise_ptrs = noise_ptr + offsets
    sum_grad = tl.zeros([BLOCK], dtype=tl.float32)
    sum_grad_noise = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(num_samples):
        grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
        noise = tl.load(noise_ptrs, mask=mask, other=0.0).to(tl.float32)
        sum_grad += grad
        sum_grad_noise += grad * noise
        grad_ptrs += class_numel
        noise_ptrs += class_numel

    w_sigma = tl.load(sigma_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_sigma = sum_grad_noise * softplus_grad(w_sigma)
    tl.store(grad_mu_ptr + offsets, sum_grad.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_sigma_ptr + offsets, grad_sigma.to(grad_sigma_ptr.dtype.element_ty), mask=mask)


def _check_noise(w_sigma: torch.Tensor, noise: torch.Tensor, name: str) -> None:
    check_float(name, noise, 3)
    if tuple(noise.shape[1:]) != tuple(w_sigma.shape):
        raise ValueError(
            f"{name} must have shape (N, M, d) = (N, {w_sigma.shape[0]}, {w_sigma.shape[1]}) "
            f"to match w_sigma, got {tuple(noise.shape)}"
        )


def sample_classes_fwd(
    w_mu: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Draw the per-class samples ``S = W_mu[c] + E * softplus(W_sigma[c])``.

    Args:
        w_mu: class means, shape ``(M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        noise: standard normal noise ``E``, shape ``(N, M, d)``.

    Returns:
        Samples of shape ``(N, M, d)`` in the promoted dtype of the three inputs.

    Raises:
        TypeError: an input is not float32, float16 or bfloat16.
        ValueError: the shapes disagree or the tensors are on different devices.
    """
    check_float("w_mu", w_mu, 2)
    check_float("w_sigma", w_sigma, 2)
    check_shape("w_sigma", w_sigma, tuple(w_mu.shape))
    _check_noise(w_sigma, noise, "noise")
    check_device(_sample_classes_fwd_kernel, w_mu=w_mu, w_sigma=w_sigma, noise=noise)

    dtype = torch.promote_types(torch.promote_types(w_mu.dtype, w_sigma.dtype), noise.dtype)
    samples = torch.empty(noise.shape, dtype=dtype, device=noise.device)
    num_samples = noise.shape[0]
    class_numel = w_mu.numel()
    if samples.numel() == 0:
        return samples

    w_mu, w_sigma, noise = w_mu.contiguous(), w_sigma.contiguous(), noise.contiguous()
    samples_per_program = max(FWD_SAMPLES_PER_PROGRAM, triton.cdiv(num_samples, MAX_GRID_Y))
    grid = (triton.cdiv(class_numel, FWD_BLOCK), triton.cdiv(num_samples, samples_per_program))
    _sample_classes_fwd_kernel[grid](
        w_mu,
        w_sigma,
        noise,
        samples,
        class_numel,
        num_samples,
        SAMPLES_PER_PROGRAM=samples_per_program,
        BLOCK=FWD_BLOCK,
        num_warps=4,
    )
    return samples


def sample_classes_bwd(
    grad_samples: torch.Tensor, w_sigma: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the gradients of the class parameters from the gradient of the samples.

    .. math::
        \\partial W_\\mu[c] = \\sum_n \\partial S[n, c], \\quad
        \\partial W_\\sigma[c] = \\mathrm{sigmoid}(W_\\sigma[c]) \\odot
            \\sum_n \\partial S[n, c] \\odot E[n, c]

    The sums over ``n`` run in a fixed order, so repeated calls return the same bits.

    Args:
        grad_samples: gradient ``dS`` of the samples, shape ``(N, M, d)``.
        w_sigma: pre-softplus scales, shape ``(M, d)``.
        noise: the noise ``E`` used in the forward pass, shape ``(N, M, d)``.

    Returns:
        ``(grad_mu, grad_sigma)``, both of shape ``(M, d)`` and dtype ``w_sigma.dtype``
        (``W_mu`` is not an input; autograd casts a gradient to its input's dtype).

    Raises:
        TypeError: an input is not float32, float16 or bfloat16.
        ValueError: the shapes disagree or the tensors are on different devices.
    """
    check_float("w_sigma", w_sigma, 2)
    _check_noise(w_sigma, noise, "noise")
    _check_noise(w_sigma, grad_samples, "grad_samples")
    check_shape("grad_samples", grad_samples, tuple(noise.shape))
    check_device(
        _sample_classes_bwd_kernel, grad_samples=grad_samples, w_sigma=w_sigma, noise=noise
    )

    num_samples = noise.shape[0]
    class_numel = w_sigma.numel()
    grad_mu = torch.empty_like(w_sigma, memory_format=torch.contiguous_format)
    grad_sigma = torch.empty_like(w_sigma, memory_format=torch.contiguous_format)
    if class_numel == 0:
        return grad_mu, grad_sigma

    grad_samples = grad_samples.contiguous()
    w_sigma, noise = w_sigma.contiguous(), noise.contiguous()
    grid = (triton.cdiv(class_numel, BWD_BLOCK),)
    _sample_classes_bwd_kernel[grid](
        grad_samples,
        w_sigma,
        noise,
        grad_mu,
        grad_sigma,
        class_numel,
        num_samples,
        BLOCK=BWD_BLOCK,
        num_warps=4,
    )
    return grad_mu, grad_sigma
