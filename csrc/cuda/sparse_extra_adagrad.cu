// ExtraAdagrad half-step on sparse rows of a (|D|, d) table, in place: CUDA kernel.
// The schema is defined in csrc/cpu/sparse_extra_adagrad.cpp, which also states the maths.
//
// Duplicates: a stable sort of the indices puts equal rows next to each other in
// batch order. For each feature j, the thread at the first position of a run owns
// that row's element j: it sums the run's gradients in order, so the result is
// deterministic and no atomics are needed. Memory is O(B): the sort and its permutation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

#define DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename table_t, typename accum_t>
__global__ void step_kernel(table_t* __restrict__ table, accum_t* __restrict__ accum,
                            const int64_t* __restrict__ sorted_index,
                            const int64_t* __restrict__ order,
                            const at::opmath_type<table_t>* __restrict__ grad,
                            table_t* __restrict__ saved, int64_t batch, int64_t d,
                            int64_t n_rows, int64_t table_stride, int64_t accum_stride,
                            at::opmath_type<table_t> signed_lr, at::opmath_type<table_t> eps,
                            bool update_phase) {
  using opmath_t = at::opmath_type<table_t>;
  const int64_t total = batch * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t first = i / d;
    const int64_t j = i - first * d;
    const int64_t r = sorted_index[first];
    if (first > 0 && sorted_index[first - 1] == r) {
      continue;  // not the first position of its run
    }
    CUDA_KERNEL_ASSERT(r >= 0 && r < n_rows && "index must lie in [0, |D|)");
    table_t* element = table + r * table_stride + j;
    accum_t* acc_element = accum + r * accum_stride + j;

    opmath_t g = 0;
    int64_t last_b = order[first];
    for (int64_t k = first; k < batch && sorted_index[k] == r; ++k) {
      const int64_t b = order[k];
      if (!update_phase) {
        saved[b * d + j] = *element;
      }
      g += grad[b * d + j];
      last_b = b;
    }
    // Duplicates carry copies of one original row. The last one is used, as on the CPU.
    const table_t start = update_phase ? saved[last_b * d + j] : *element;

    const opmath_t acc = static_cast<opmath_t>(*acc_element) + g * g;
    *acc_element = static_cast<accum_t>(acc);
    const opmath_t step = signed_lr * g / (sqrt(acc) + eps);
    *element = static_cast<table_t>(static_cast<opmath_t>(start) + step);
  }
}

void sparse_extra_adagrad_cuda(const at::Tensor& table, const at::Tensor& accum,
                               const at::Tensor& index, const at::Tensor& grad,
                               const at::Tensor& saved, double lr, double eps, bool update_phase,
                               bool maximize) {
  const char* op = "sparse_extra_adagrad_";
  TORCH_CHECK(table.dim() == 2, op, ": table must have shape (|D|, d), got ", table.sizes());
  TORCH_CHECK(accum.sizes() == table.sizes(), op, ": accum must have the shape of table ",
              table.sizes(), ", got ", accum.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op,
              ": index must be an int64 tensor of shape (B,), got dtype ", index.scalar_type(),
              " and shape ", index.sizes());
  const int64_t batch = index.size(0);
  const int64_t d = table.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == batch && grad.size(1) == d, op,
              ": grad must have shape (", batch, ", ", d, "), got ", grad.sizes());
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == batch && saved.size(1) == d &&
                  saved.scalar_type() == table.scalar_type() && saved.is_contiguous(),
              op, ": saved must be contiguous with shape (", batch, ", ", d, ") and dtype ",
              table.scalar_type(), ", got shape ", saved.sizes(), " and dtype ",
              saved.scalar_type());
  for (const at::Tensor* t : {&table, &accum, &index, &grad, &saved}) {
    TORCH_CHECK(t->is_cuda() && t->device() == table.device(), op,
                ": expected CUDA tensors on ", table.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(d <= 1 || (table.stride(1) == 1 && accum.stride(1) == 1), op,
              ": table and accum need unit column stride, got strides ", table.strides(), " and ",
              accum.strides());
  if (batch == 0 || d == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(table.device());

  const auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_index = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::ScalarType opmath_type = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Gradients enter the arithmetic type once: a copy of (B, d), never of the table.
  const at::Tensor grad_op = grad.to(opmath_type).contiguous();
  const int64_t n_blocks =
      std::min(kMaxBlocks, std::max<int64_t>(1, (batch * d + kThreads - 1) / kThreads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  DISPATCH_FLOAT_TYPES(table.scalar_type(), "sparse_extra_adagrad_cuda", [&] {
    using table_t = scalar_t;
    using opmath_t = at::opmath_type<table_t>;
    DISPATCH_FLOAT_TYPES(accum.scalar_type(), "sparse_extra_adagrad_cuda_accum", [&] {
      step_kernel<table_t, scalar_t><<<n_blocks, kThreads, 0, stream>>>(
          table.mutable_data_ptr<table_t>(), accum.mutable_data_ptr<scalar_t>(),
          sorted_index.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
          grad_op.const_data_ptr<opmath_t>(), saved.mutable_data_ptr<table_t>(), batch, d,
          table.size(0), table.stride(0), accum.stride(0),
          static_cast<opmath_t>(maximize ? lr : -lr), static_cast<opmath_t>(eps), update_phase);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(distprop_fast_C, CUDA, m) {
  m.impl("sparse_extra_adagrad_", &sparse_extra_adagrad_cuda);
}
