// Per-class scales sigma = softplus(W_sigma) and their derivative for the CPU kernels.
// Both are O(M * d) and come from ATen's vectorised kernels, which the reference
// also calls, so sigma here is bitwise the reference's sigma.
#pragma once

#include <ATen/ATen.h>

namespace distprop {

// Arithmetic dtype of a storage dtype: float64 stays, everything else computes in float32.
inline at::ScalarType opmath_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// softplus(W_sigma) in the arithmetic dtype, contiguous, shape (M, d).
inline at::Tensor softplus_scales(const at::Tensor& w_sigma) {
  return at::softplus(w_sigma.to(opmath_dtype(w_sigma.scalar_type()))).contiguous();
}

// d softplus / d W_sigma in the arithmetic dtype, computed as PyTorch's softplus
// backward does (beta 1, threshold 20), contiguous, shape (M, d).
inline at::Tensor softplus_scale_grads(const at::Tensor& w_sigma) {
  const at::Tensor w = w_sigma.to(opmath_dtype(w_sigma.scalar_type()));
  return at::softplus_backward(at::ones_like(w), w, 1, 20).contiguous();
}

}  // namespace distprop
