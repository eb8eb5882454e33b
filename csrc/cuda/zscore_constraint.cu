// z-score hard-shrink constraint fused with the multiplier term, CUDA kernels. The
// schemas are defined in csrc/cpu/zscore_constraint.cpp, which also states the maths.
//
// Both reductions are deterministic and use no floating-point atomics. The term is
// reduced per block in a fixed tree, then over the blocks in order. Each class
// gradient element is summed by one thread over the class's rows in batch order,
// found by a stable sort of the labels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../distprop_math.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

#define DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

int64_t blocks_for(int64_t count, int64_t max_blocks) {
  return std::min(max_blocks, std::max<int64_t>(1, (count + kThreads - 1) / kThreads));
}

// Sum of one value per thread over the block, in a fixed tree order. Thread 0 gets the result.
__device__ double block_sum(double value, double* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      shared[threadIdx.x] += shared[threadIdx.x + half];
    }
    __syncthreads();
  }
  return shared[0];
}

template <typename scalar_t, typename mult_t>
__global__ void constraint_fwd_kernel(const scalar_t* __restrict__ a,
                                      const int64_t* __restrict__ labels,
                                      const scalar_t* __restrict__ mu,
                                      const scalar_t* __restrict__ w_sigma,
                                      const mult_t* __restrict__ lambda,
                                      scalar_t* __restrict__ defect,
                                      double* __restrict__ block_terms, int64_t total, int64_t d,
                                      int64_t n_classes, double margin) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ double shared[kThreads];
  const opmath_t eps = static_cast<opmath_t>(margin);
  double term = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t b = i / d;
    const int64_t j = i - b * d;
    const int64_t y = labels[b];
    CUDA_KERNEL_ASSERT(y >= 0 && y < n_classes && "labels must lie in [0, M)");
    const opmath_t sigma = distprop::softplus(static_cast<opmath_t>(w_sigma[y * d + j]));
    const opmath_t z =
        (static_cast<opmath_t>(a[i]) - static_cast<opmath_t>(mu[y * d + j])) / sigma;
    const scalar_t g = static_cast<scalar_t>(distprop::shrink(z, eps));
    defect[i] = g;
    if (lambda != nullptr) {
      // The stored (rounded) defect enters the term, as in the reference.
      term += static_cast<double>(static_cast<opmath_t>(g)) *
              static_cast<double>(static_cast<opmath_t>(lambda[i]));
    }
  }
  if (lambda != nullptr) {
    const double block_term = block_sum(term, shared);
    if (threadIdx.x == 0) {
      block_terms[blockIdx.x] = block_term;
    }
  }
}

// One block adds the per-block terms: strided per thread, then a fixed tree.
__global__ void sum_blocks_kernel(const double* __restrict__ block_terms, int64_t count,
                                  double* __restrict__ out) {
  __shared__ double shared[kThreads];
  double sum = 0.0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    sum += block_terms[k];
  }
  const double total = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    *out = total;
  }
}

template <typename scalar_t, typename mult_t>
__global__ void constraint_bwd_kernel(
    const scalar_t* __restrict__ grad_defect, const double* __restrict__ grad_term,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ mu,
    const scalar_t* __restrict__ w_sigma, const mult_t* __restrict__ lambda,
    const int64_t* __restrict__ rows, const int64_t* __restrict__ offsets,
    scalar_t* __restrict__ grad_a, scalar_t* __restrict__ grad_mu,
    scalar_t* __restrict__ grad_w_sigma, mult_t* __restrict__ grad_lambda, int64_t batch,
    int64_t d, int64_t n_classes, double margin) {
  using opmath_t = at::opmath_type<scalar_t>;
  // A label outside [0, M) falls outside every class run.
  CUDA_KERNEL_ASSERT(offsets[0] == 0 && offsets[n_classes] == batch &&
                     "labels must lie in [0, M)");
  const opmath_t eps = static_cast<opmath_t>(margin);
  const opmath_t gt = lambda != nullptr ? static_cast<opmath_t>(*grad_term) : opmath_t(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t cj = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       cj < n_classes * d; cj += stride) {
    const int64_t c = cj / d;
    const int64_t j = cj - c * d;
    const opmath_t sigma = distprop::softplus(static_cast<opmath_t>(w_sigma[cj]));
    const opmath_t mu_cj = static_cast<opmath_t>(mu[cj]);
    double sum_mu = 0.0;
    double sum_sigma = 0.0;
    for (int64_t k = offsets[c]; k < offsets[c + 1]; ++k) {
      const int64_t i = rows[k] * d + j;
      const opmath_t z = (static_cast<opmath_t>(a[i]) - mu_cj) / sigma;
      opmath_t upstream = static_cast<opmath_t>(grad_defect[i]);
      if (lambda != nullptr) {
        upstream += gt * static_cast<opmath_t>(lambda[i]);
        const opmath_t g = static_cast<opmath_t>(static_cast<scalar_t>(distprop::shrink(z, eps)));
        grad_lambda[i] = static_cast<mult_t>(gt * g);
      }
      const opmath_t grad_z = distprop::shrink_passes(z, eps) ? upstream / sigma : opmath_t(0);
      grad_a[i] = static_cast<scalar_t>(grad_z);
      sum_mu -= static_cast<double>(grad_z);
      sum_sigma -= static_cast<double>(grad_z * z);
    }
    const opmath_t dsoftplus = distprop::softplus_grad(static_cast<opmath_t>(w_sigma[cj]));
    grad_mu[cj] = static_cast<scalar_t>(sum_mu);
    grad_w_sigma[cj] = static_cast<scalar_t>(sum_sigma * static_cast<double>(dsoftplus));
  }
}

void check_constraint_inputs(const char* op, const at::Tensor& a, const at::Tensor& labels,
                             const at::Tensor& w_mu, const at::Tensor& w_sigma,
                             const std::optional<at::Tensor>& multipliers) {
  TORCH_CHECK(a.dim() == 2, op, ": a must have shape (B, d), got ", a.sizes());
  TORCH_CHECK(w_mu.dim() == 2 && w_mu.size(1) == a.size(1), op, ": w_mu must have shape (M, ",
              a.size(1), "), got ", w_mu.sizes());
  TORCH_CHECK(w_sigma.sizes() == w_mu.sizes(), op, ": w_sigma must have the shape of w_mu ",
              w_mu.sizes(), ", got ", w_sigma.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == a.size(0) &&
                  labels.scalar_type() == at::kLong,
              op, ": labels must be int64 of shape (", a.size(0), "), got ", labels.scalar_type(),
              " of shape ", labels.sizes());
  TORCH_CHECK(w_mu.scalar_type() == a.scalar_type() && w_sigma.scalar_type() == a.scalar_type(),
              op, ": a, w_mu and w_sigma must share one dtype, got ", a.scalar_type(), ", ",
              w_mu.scalar_type(), " and ", w_sigma.scalar_type());
  std::vector<const at::Tensor*> tensors = {&a, &labels, &w_mu, &w_sigma};
  if (multipliers.has_value()) {
    TORCH_CHECK(multipliers->sizes() == a.sizes(), op, ": multipliers must have the shape of a ",
                a.sizes(), ", got ", multipliers->sizes());
    tensors.push_back(&*multipliers);
  }
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == a.device(), op, ": expected CUDA tensors on ",
                a.device(), ", got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": expected contiguous tensors, got strides ",
                t->strides(), " for shape ", t->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> zscore_constraint_fwd_cuda(
    const at::Tensor& a, const at::Tensor& labels, const at::Tensor& w_mu,
    const at::Tensor& w_sigma, double margin, const std::optional<at::Tensor>& multipliers) {
  check_constraint_inputs("zscore_constraint_fwd", a, labels, w_mu, w_sigma, multipliers);
  const c10::cuda::CUDAGuard device_guard(a.device());
  const bool has_lambda = multipliers.has_value();
  const at::ScalarType term_type =
      has_lambda ? at::promote_types(a.scalar_type(), multipliers->scalar_type())
                 : a.scalar_type();
  // (B, d)
  at::Tensor defect = at::empty_like(a);
  const int64_t total = a.numel();
  if (total == 0) {
    return {defect, at::zeros({}, a.options().dtype(term_type))};
  }

  const int64_t n_blocks = blocks_for(total, kMaxBlocks);
  at::Tensor block_terms = at::empty({has_lambda ? n_blocks : 0}, a.options().dtype(at::kDouble));
  at::Tensor term = at::zeros({}, a.options().dtype(at::kDouble));
  const at::ScalarType mult_type = has_lambda ? multipliers->scalar_type() : a.scalar_type();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  DISPATCH_FLOAT_TYPES(a.scalar_type(), "zscore_constraint_fwd_cuda", [&] {
    using storage_t = scalar_t;
    DISPATCH_FLOAT_TYPES(mult_type, "zscore_constraint_fwd_cuda_multipliers", [&] {
      const scalar_t* lambda = has_lambda ? multipliers->const_data_ptr<scalar_t>() : nullptr;
      constraint_fwd_kernel<storage_t, scalar_t><<<n_blocks, kThreads, 0, stream>>>(
          a.const_data_ptr<storage_t>(), labels.const_data_ptr<int64_t>(),
          w_mu.const_data_ptr<storage_t>(), w_sigma.const_data_ptr<storage_t>(), lambda,
          defect.mutable_data_ptr<storage_t>(),
          has_lambda ? block_terms.mutable_data_ptr<double>() : nullptr, total, a.size(1),
          w_mu.size(0), margin);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (has_lambda) {
    sum_blocks_kernel<<<1, kThreads, 0, stream>>>(block_terms.const_data_ptr<double>(), n_blocks,
                                                   term.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {defect, term.to(term_type)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> zscore_constraint_bwd_cuda(
    const std::optional<at::Tensor>& grad_defect_or_none, const at::Tensor& grad_term,
    const at::Tensor& a, const at::Tensor& labels, const at::Tensor& w_mu,
    const at::Tensor& w_sigma, double margin, const std::optional<at::Tensor>& multipliers) {
  const char* op = "zscore_constraint_bwd";
  check_constraint_inputs(op, a, labels, w_mu, w_sigma, multipliers);
  // An absent defect gradient (only the term has one) is zero.
  // NOTE: unlike the CPU kernel, this materialises the zeros.
  const at::Tensor grad_defect =
      grad_defect_or_none.has_value() ? *grad_defect_or_none : at::zeros_like(a);
  TORCH_CHECK(grad_defect.sizes() == a.sizes() && grad_defect.scalar_type() == a.scalar_type() &&
                  grad_defect.device() == a.device() && grad_defect.is_contiguous(),
              op, ": grad_defect must be contiguous and match a (shape ", a.sizes(), ", dtype ",
              a.scalar_type(), "), got shape ", grad_defect.sizes(), " and dtype ",
              grad_defect.scalar_type());
  TORCH_CHECK(grad_term.numel() == 1 && grad_term.device() == a.device(), op,
              ": grad_term must be a one-element tensor on ", a.device(), ", got shape ",
              grad_term.sizes(), " on ", grad_term.device());
  const c10::cuda::CUDAGuard device_guard(a.device());
  const bool has_lambda = multipliers.has_value();
  const int64_t batch = a.size(0);
  const int64_t d = a.size(1);
  const int64_t n_classes = w_mu.size(0);

  // (B, d), (M, d), (M, d), and (B, d) or (0,) without multipliers
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_mu = at::empty_like(w_mu);
  at::Tensor grad_w_sigma = at::empty_like(w_sigma);
  at::Tensor grad_multipliers =
      has_lambda ? at::empty_like(*multipliers) : at::empty({0}, a.options());
  if (w_mu.numel() == 0) {
    return {grad_a, grad_mu, grad_w_sigma, grad_multipliers};
  }

  // Rows grouped by class, in batch order inside a class: rows[offsets[c] : offsets[c + 1]].
  const auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_labels = std::get<0>(sorted);
  const at::Tensor rows = std::get<1>(sorted).contiguous();
  const at::Tensor offsets =
      at::searchsorted(sorted_labels, at::arange(n_classes + 1, labels.options()));
  const at::Tensor grad_term_double = grad_term.reshape({}).to(at::kDouble);
  const at::ScalarType mult_type = has_lambda ? multipliers->scalar_type() : a.scalar_type();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_blocks = blocks_for(n_classes * d, 65535);

  DISPATCH_FLOAT_TYPES(a.scalar_type(), "zscore_constraint_bwd_cuda", [&] {
    using storage_t = scalar_t;
    DISPATCH_FLOAT_TYPES(mult_type, "zscore_constraint_bwd_cuda_multipliers", [&] {
      const scalar_t* lambda = has_lambda ? multipliers->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* grad_lambda =
          has_lambda ? grad_multipliers.mutable_data_ptr<scalar_t>() : nullptr;
      constraint_bwd_kernel<storage_t, scalar_t><<<n_blocks, kThreads, 0, stream>>>(
          grad_defect.const_data_ptr<storage_t>(), grad_term_double.const_data_ptr<double>(),
          a.const_data_ptr<storage_t>(), w_mu.const_data_ptr<storage_t>(),
          w_sigma.const_data_ptr<storage_t>(), lambda, rows.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), grad_a.mutable_data_ptr<storage_t>(),
          grad_mu.mutable_data_ptr<storage_t>(), grad_w_sigma.mutable_data_ptr<storage_t>(),
          grad_lambda, batch, d, n_classes, margin);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_a, grad_mu, grad_w_sigma, grad_multipliers};
}

}  // namespace

TORCH_LIBRARY_IMPL(distprop_fast_C, CUDA, m) {
  m.impl("zscore_constraint_fwd", &zscore_constraint_fwd_cuda);
  m.impl("zscore_constraint_bwd", &zscore_constraint_bwd_cuda);
}
