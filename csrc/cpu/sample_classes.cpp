// Per-class re-parameterised sampling, CPU kernels, and the schemas of both ops.
//
//   forward:  S[n, c] = W_mu[c] + E[n, c] * softplus(W_sigma[c])
//   backward: dW_mu[c] = sum_n dS[n, c]
//             dW_sigma[c] = sigmoid(W_sigma[c]) * sum_n dS[n, c] * E[n, c]
//
// Tensors are stored as float64, float32, float16 or bfloat16. Arithmetic is
// float32, or float64 for float64 storage.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_clones.h"
#include "softplus_scales.h"

namespace {

// Minimum number of elements per parallel chunk, so that small inputs stay on one thread.
constexpr int64_t kGrainElements = 32768;
// Elements of one block of class sums in the backward: two float32 blocks of this
// size (64 KiB) stay in the L2 cache while the N samples stream past.
constexpr int64_t kClassBlockElements = 8192;

void check_sample_inputs(const char* op, const at::Tensor& w_mu, const at::Tensor& w_sigma,
                         const at::Tensor& noise) {
  TORCH_CHECK(w_mu.dim() == 2, op, ": w_mu must have shape (M, d), got ", w_mu.sizes());
  TORCH_CHECK(w_sigma.sizes() == w_mu.sizes(), op, ": w_sigma must have the shape of w_mu ",
              w_mu.sizes(), ", got ", w_sigma.sizes());
  TORCH_CHECK(noise.dim() == 3 && noise.size(1) == w_mu.size(0) && noise.size(2) == w_mu.size(1),
              op, ": noise must have shape (N, ", w_mu.size(0), ", ", w_mu.size(1), "), got ",
              noise.sizes());
  TORCH_CHECK(w_sigma.scalar_type() == w_mu.scalar_type() &&
                  noise.scalar_type() == w_mu.scalar_type(),
              op, ": w_mu, w_sigma and noise must share one dtype, got ", w_mu.scalar_type(), ", ",
              w_sigma.scalar_type(), " and ", noise.scalar_type());
  for (const at::Tensor* t : {&w_mu, &w_sigma, &noise}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": expected contiguous tensors, got strides ",
                t->strides(), " for shape ", t->sizes());
  }
}

// One sample row: out = mu + eps * sigma.
template <typename scalar_t, typename opmath_t>
DISTPROP_ALWAYS_INLINE void sample_fwd_row(const scalar_t* __restrict__ mu_c,
                                           const opmath_t* __restrict__ sigma_c,
                                           const scalar_t* __restrict__ eps_row, int64_t d,
                                           scalar_t* __restrict__ out_row) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    const opmath_t value =
        static_cast<opmath_t>(mu_c[j]) + static_cast<opmath_t>(eps_row[j]) * sigma_c[j];
    out_row[j] = static_cast<scalar_t>(value);
  }
}

// Adds a run of one sample's output gradient (one or more class rows, `count`
// elements) to the class sums.
template <typename scalar_t, typename opmath_t>
DISTPROP_ALWAYS_INLINE void sample_bwd_row(const scalar_t* __restrict__ dS_run,
                                           const scalar_t* __restrict__ eps_run, int64_t count,
                                           opmath_t* __restrict__ sum_grad,
                                           opmath_t* __restrict__ sum_grad_noise) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const opmath_t g = static_cast<opmath_t>(dS_run[i]);
    sum_grad[i] += g;
    sum_grad_noise[i] += g * static_cast<opmath_t>(eps_run[i]);
  }
}

}  // namespace

// float32 instances of the row functions, compiled once per ISA (see simd_clones.h).
// They have external linkage because target_clones needs it.
namespace distprop::cpu {

DISTPROP_SIMD_CLONES
void sample_classes_fwd_row_f32(const float* mu_c, const float* sigma_c, const float* eps_row,
                                int64_t d, float* out_row) {
  sample_fwd_row<float, float>(mu_c, sigma_c, eps_row, d, out_row);
}

DISTPROP_SIMD_CLONES
void sample_classes_bwd_row_f32(const float* dS_run, const float* eps_run, int64_t count,
                                float* sum_grad, float* sum_grad_noise) {
  sample_bwd_row<float, float>(dS_run, eps_run, count, sum_grad, sum_grad_noise);
}

}  // namespace distprop::cpu

namespace {

template <typename scalar_t>
void sample_fwd_kernel(const at::Tensor& w_mu, const at::Tensor& w_sigma, const at::Tensor& noise,
                       at::Tensor& samples) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n_rows = noise.size(0) * noise.size(1);
  const int64_t n_classes = w_mu.size(0);
  const int64_t d = w_mu.size(1);
  const scalar_t* mu = w_mu.const_data_ptr<scalar_t>();
  const scalar_t* eps = noise.const_data_ptr<scalar_t>();
  scalar_t* out = samples.mutable_data_ptr<scalar_t>();
  // (M, d), reused by the N samples of each class.
  const at::Tensor sigma_tensor = distprop::softplus_scales(w_sigma);
  const opmath_t* sigma = sigma_tensor.const_data_ptr<opmath_t>();

  // One task per sample row (n, c), a contiguous run of d features.
  const int64_t grain = std::max<int64_t>(1, kGrainElements / d);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % n_classes;
      if constexpr (std::is_same_v<scalar_t, float>) {
        distprop::cpu::sample_classes_fwd_row_f32(mu + c * d, sigma + c * d, eps + row * d, d,
                                                  out + row * d);
      } else {
        sample_fwd_row(mu + c * d, sigma + c * d, eps + row * d, d, out + row * d);
      }
    }
  });
}

template <typename scalar_t>
void sample_bwd_kernel(const at::Tensor& grad_samples, const at::Tensor& w_sigma,
                       const at::Tensor& noise, at::Tensor& grad_mu, at::Tensor& grad_sigma) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n_samples = noise.size(0);
  const int64_t n_classes = w_sigma.size(0);
  const int64_t d = w_sigma.size(1);
  const scalar_t* dS = grad_samples.const_data_ptr<scalar_t>();
  const scalar_t* eps = noise.const_data_ptr<scalar_t>();
  const at::Tensor dsoftplus_tensor = distprop::softplus_scale_grads(w_sigma);
  const opmath_t* dsoftplus = dsoftplus_tensor.const_data_ptr<opmath_t>();
  scalar_t* g_mu = grad_mu.mutable_data_ptr<scalar_t>();
  scalar_t* g_sigma = grad_sigma.mutable_data_ptr<scalar_t>();

  // One task per block of adjacent classes [c0, c1). It sums the block's rows of
  // sample n = 0, 1, ..., N-1 in that order, so the result does not depend on the
  // thread count, and each sample's block is one contiguous run of memory.
  const int64_t block = std::max<int64_t>(1, kClassBlockElements / std::max<int64_t>(1, d));
  const int64_t n_blocks = (n_classes + block - 1) / block;
  const int64_t grain = std::max<int64_t>(
      1, kGrainElements / std::max<int64_t>(1, block * d * std::max<int64_t>(1, n_samples)));
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    // (block, d) sums of dS and of dS * E.
    std::vector<opmath_t> sum_grad(block * d);
    std::vector<opmath_t> sum_grad_noise(block * d);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * block;
      const int64_t width = (std::min(n_classes, c0 + block) - c0) * d;
      std::fill(sum_grad.begin(), sum_grad.end(), opmath_t(0));
      std::fill(sum_grad_noise.begin(), sum_grad_noise.end(), opmath_t(0));
      for (int64_t n = 0; n < n_samples; ++n) {
        const scalar_t* dS_run = dS + (n * n_classes + c0) * d;
        const scalar_t* eps_run = eps + (n * n_classes + c0) * d;
        if constexpr (std::is_same_v<scalar_t, float>) {
          distprop::cpu::sample_classes_bwd_row_f32(dS_run, eps_run, width, sum_grad.data(),
                                                    sum_grad_noise.data());
        } else {
          sample_bwd_row(dS_run, eps_run, width, sum_grad.data(), sum_grad_noise.data());
        }
      }
      const int64_t offset = c0 * d;
      for (int64_t i = 0; i < width; ++i) {
        g_mu[offset + i] = static_cast<scalar_t>(sum_grad[i]);
        g_sigma[offset + i] = static_cast<scalar_t>(sum_grad_noise[i] * dsoftplus[offset + i]);
      }
    }
  });
}

at::Tensor sample_classes_fwd_cpu(const at::Tensor& w_mu, const at::Tensor& w_sigma,
                                  const at::Tensor& noise) {
  check_sample_inputs("sample_classes_fwd", w_mu, w_sigma, noise);
  // (N, M, d)
  at::Tensor samples = at::empty_like(noise);
  if (samples.numel() == 0) {
    return samples;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(),
                                  "sample_classes_fwd", [&] {
                                    sample_fwd_kernel<scalar_t>(w_mu, w_sigma, noise, samples);
                                  });
  return samples;
}

std::tuple<at::Tensor, at::Tensor> sample_classes_bwd_cpu(const at::Tensor& grad_samples,
                                                          const at::Tensor& w_sigma,
                                                          const at::Tensor& noise) {
  // The backward has no w_mu, so w_sigma is checked in its place (same shape and dtype).
  check_sample_inputs("sample_classes_bwd", w_sigma, w_sigma, noise);
  TORCH_CHECK(grad_samples.sizes() == noise.sizes(),
              "sample_classes_bwd: grad_samples must have the shape of noise ", noise.sizes(),
              ", got ", grad_samples.sizes());
  TORCH_CHECK(grad_samples.scalar_type() == noise.scalar_type(),
              "sample_classes_bwd: grad_samples must have dtype ", noise.scalar_type(), ", got ",
              grad_samples.scalar_type());
  TORCH_CHECK(grad_samples.device().is_cpu() && grad_samples.is_contiguous(),
              "sample_classes_bwd: grad_samples must be a contiguous CPU tensor, got device ",
              grad_samples.device(), " and strides ", grad_samples.strides());
  // (M, d) each
  at::Tensor grad_mu = at::empty_like(w_sigma);
  at::Tensor grad_sigma = at::empty_like(w_sigma);
  if (grad_mu.numel() == 0) {
    return {grad_mu, grad_sigma};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, noise.scalar_type(), "sample_classes_bwd", [&] {
        sample_bwd_kernel<scalar_t>(grad_samples, w_sigma, noise, grad_mu, grad_sigma);
      });
  return {grad_mu, grad_sigma};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distprop_fast_C, m) {
  m.def("sample_classes_fwd(Tensor w_mu, Tensor w_sigma, Tensor noise) -> Tensor");
  m.def(
      "sample_classes_bwd(Tensor grad_samples, Tensor w_sigma, Tensor noise) "
      "-> (Tensor grad_mu, Tensor grad_sigma)");
}

TORCH_LIBRARY_IMPL(distprop_fast_C, CPU, m) {
  m.impl("sample_classes_fwd", &sample_classes_fwd_cpu);
  m.impl("sample_classes_bwd", &sample_classes_bwd_cpu);
}
