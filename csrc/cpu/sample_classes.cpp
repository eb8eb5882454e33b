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
#include <vector>

#include "softplus_scales.h"

namespace {

// Minimum number of elements per parallel chunk, so that small inputs stay on one thread.
constexpr int64_t kGrainElements = 32768;

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
      const scalar_t* mu_c = mu + c * d;
      const opmath_t* sigma_c = sigma + c * d;
      const scalar_t* eps_row = eps + row * d;
      scalar_t* out_row = out + row * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const opmath_t value =
            static_cast<opmath_t>(mu_c[j]) + static_cast<opmath_t>(eps_row[j]) * sigma_c[j];
        out_row[j] = static_cast<scalar_t>(value);
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

  // One task per class c, summing its N sample rows in order n = 0..N-1, so the
  // result does not depend on the thread count.
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / (d * std::max<int64_t>(1, n_samples)));
  at::parallel_for(0, n_classes, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> sum_grad(d);
    std::vector<opmath_t> sum_grad_noise(d);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(sum_grad.begin(), sum_grad.end(), opmath_t(0));
      std::fill(sum_grad_noise.begin(), sum_grad_noise.end(), opmath_t(0));
      for (int64_t n = 0; n < n_samples; ++n) {
        const scalar_t* dS_row = dS + (n * n_classes + c) * d;
        const scalar_t* eps_row = eps + (n * n_classes + c) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const opmath_t g = static_cast<opmath_t>(dS_row[j]);
          sum_grad[j] += g;
          sum_grad_noise[j] += g * static_cast<opmath_t>(eps_row[j]);
        }
      }
      for (int64_t j = 0; j < d; ++j) {
        g_mu[c * d + j] = static_cast<scalar_t>(sum_grad[j]);
        g_sigma[c * d + j] = static_cast<scalar_t>(sum_grad_noise[j] * dsoftplus[c * d + j]);
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
