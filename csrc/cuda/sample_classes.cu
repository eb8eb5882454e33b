// Per-class re-parameterised sampling, CUDA kernels. The schemas are defined in
// csrc/cpu/sample_classes.cpp, which also states the maths.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../distprop_math.h"

namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size with at most this many blocks.
constexpr int64_t kMaxBlocks = 65535;

int64_t blocks_for(int64_t count) {
  return std::min(kMaxBlocks, std::max<int64_t>(1, (count + kThreads - 1) / kThreads));
}

template <typename scalar_t>
__global__ void sample_fwd_kernel(const scalar_t* __restrict__ mu,
                                  const scalar_t* __restrict__ w_sigma,
                                  const scalar_t* __restrict__ noise, scalar_t* __restrict__ out,
                                  int64_t total, int64_t class_block) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    // Element (n, c, j) reads parameter element (c, j) = i mod (M * d).
    const int64_t cj = i % class_block;
    const opmath_t sigma = distprop::softplus(static_cast<opmath_t>(w_sigma[cj]));
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(mu[cj]) +
                                   static_cast<opmath_t>(noise[i]) * sigma);
  }
}

// One thread per (c, j) sums over n = 0..N-1 in order: deterministic, no atomics.
template <typename scalar_t>
__global__ void sample_bwd_kernel(const scalar_t* __restrict__ grad_samples,
                                  const scalar_t* __restrict__ w_sigma,
                                  const scalar_t* __restrict__ noise,
                                  scalar_t* __restrict__ grad_mu,
                                  scalar_t* __restrict__ grad_w_sigma, int64_t n_samples,
                                  int64_t class_block) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t cj = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       cj < class_block; cj += stride) {
    opmath_t sum_grad = 0;
    opmath_t sum_grad_noise = 0;
    for (int64_t n = 0; n < n_samples; ++n) {
      const opmath_t g = static_cast<opmath_t>(grad_samples[n * class_block + cj]);
      sum_grad += g;
      sum_grad_noise += g * static_cast<opmath_t>(noise[n * class_block + cj]);
    }
    const opmath_t dsoftplus = distprop::softplus_grad(static_cast<opmath_t>(w_sigma[cj]));
    grad_mu[cj] = static_cast<scalar_t>(sum_grad);
    grad_w_sigma[cj] = static_cast<scalar_t>(sum_grad_noise * dsoftplus);
  }
}

void check_cuda_inputs(const char* op, const at::Tensor& params, const at::Tensor& w_sigma,
                       const at::Tensor& noise) {
  TORCH_CHECK(params.dim() == 2, op, ": parameters must have shape (M, d), got ", params.sizes());
  TORCH_CHECK(w_sigma.sizes() == params.sizes(), op, ": w_sigma must have shape ",
              params.sizes(), ", got ", w_sigma.sizes());
  TORCH_CHECK(noise.dim() == 3 && noise.size(1) == params.size(0) &&
                  noise.size(2) == params.size(1),
              op, ": noise must have shape (N, ", params.size(0), ", ", params.size(1), "), got ",
              noise.sizes());
  for (const at::Tensor* t : {&params, &w_sigma, &noise}) {
    TORCH_CHECK(t->is_cuda() && t->device() == noise.device(), op,
                ": expected CUDA tensors on ", noise.device(), ", got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": expected contiguous tensors, got strides ",
                t->strides(), " for shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == noise.scalar_type(), op,
                ": expected one dtype for all inputs, got ", t->scalar_type(), " and ",
                noise.scalar_type());
  }
}

at::Tensor sample_classes_fwd_cuda(const at::Tensor& w_mu, const at::Tensor& w_sigma,
                                   const at::Tensor& noise) {
  check_cuda_inputs("sample_classes_fwd", w_mu, w_sigma, noise);
  const c10::cuda::CUDAGuard device_guard(noise.device());
  // (N, M, d)
  at::Tensor samples = at::empty_like(noise);
  const int64_t total = noise.numel();
  if (total == 0) {
    return samples;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(),
                                  "sample_classes_fwd_cuda", [&] {
    sample_fwd_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        w_mu.const_data_ptr<scalar_t>(), w_sigma.const_data_ptr<scalar_t>(),
        noise.const_data_ptr<scalar_t>(), samples.mutable_data_ptr<scalar_t>(), total,
        w_mu.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return samples;
}

std::tuple<at::Tensor, at::Tensor> sample_classes_bwd_cuda(const at::Tensor& grad_samples,
                                                           const at::Tensor& w_sigma,
                                                           const at::Tensor& noise) {
  check_cuda_inputs("sample_classes_bwd", w_sigma, w_sigma, noise);
  TORCH_CHECK(grad_samples.sizes() == noise.sizes() &&
                  grad_samples.scalar_type() == noise.scalar_type() &&
                  grad_samples.device() == noise.device() && grad_samples.is_contiguous(),
              "sample_classes_bwd: grad_samples must be a contiguous tensor like noise (shape ",
              noise.sizes(), ", dtype ", noise.scalar_type(), ", device ", noise.device(),
              "), got shape ", grad_samples.sizes(), ", dtype ", grad_samples.scalar_type(),
              ", device ", grad_samples.device());
  const c10::cuda::CUDAGuard device_guard(noise.device());
  // (M, d) each
  at::Tensor grad_mu = at::empty_like(w_sigma);
  at::Tensor grad_w_sigma = at::empty_like(w_sigma);
  const int64_t class_block = w_sigma.numel();
  if (class_block == 0) {
    return {grad_mu, grad_w_sigma};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(),
                                  "sample_classes_bwd_cuda", [&] {
    sample_bwd_kernel<scalar_t><<<blocks_for(class_block), kThreads, 0, stream>>>(
        grad_samples.const_data_ptr<scalar_t>(), w_sigma.const_data_ptr<scalar_t>(),
        noise.const_data_ptr<scalar_t>(), grad_mu.mutable_data_ptr<scalar_t>(),
        grad_w_sigma.mutable_data_ptr<scalar_t>(), noise.size(0), class_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_mu, grad_w_sigma};
}

}  // namespace

TORCH_LIBRARY_IMPL(distprop_fast_C, CUDA, m) {
  m.impl("sample_classes_fwd", &sample_classes_fwd_cuda);
  m.impl("sample_classes_bwd", &sample_classes_bwd_cuda);
}
