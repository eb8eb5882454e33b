// ExtraAdagrad half-step on sparse rows of a (|D|, d) table, in place: CPU kernel and schema.
//
// For each distinct row r among index[0..B):
//   extrapolation: saved[b] = table[r] for every b with index[b] = r
//   update:        table[r] = saved[b] (the last such b) before the step
//   step:          g = sum of grad[b] over those b, in batch order
//                  accum[r] += g * g
//                  table[r] -= lr * g / (sqrt(accum[r]) + eps)   (+= when maximize)
//
// Work and temporary memory are O(B * d) and O(B): nothing is proportional to |D|.
// The table and accumulator may have any row stride but unit column stride.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "simd_clones.h"

namespace {

// Minimum number of row elements per parallel chunk, so that a small batch runs on the
// calling thread alone.
constexpr int64_t kGrainElements = 32768;
// Rows requested from memory ahead of the one being updated, and how much of each.
constexpr int64_t kPrefetchRuns = 8;
constexpr int64_t kPrefetchBytesPerRow = 1024;
constexpr int64_t kCacheLineBytes = 64;

#define DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

void check_step_inputs(const at::Tensor& table, const at::Tensor& accum, const at::Tensor& index,
                       const at::Tensor& grad, const at::Tensor& saved) {
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
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == batch && saved.size(1) == d, op,
              ": saved must have shape (", batch, ", ", d, "), got ", saved.sizes());
  TORCH_CHECK(saved.scalar_type() == table.scalar_type(), op,
              ": saved must have the dtype of table ", table.scalar_type(), ", got ",
              saved.scalar_type());
  TORCH_CHECK(at::isFloatingType(accum.scalar_type()) && at::isFloatingType(grad.scalar_type()),
              op, ": accum and grad must be floating-point, got ", accum.scalar_type(), " and ",
              grad.scalar_type());
  for (const at::Tensor* t : {&table, &accum, &index, &grad, &saved}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got one on ", t->device());
  }
  TORCH_CHECK(d <= 1 || (table.stride(1) == 1 && accum.stride(1) == 1), op,
              ": table and accum need unit column stride, got strides ", table.strides(), " and ",
              accum.strides(), ". Pass tables made with .contiguous()");
  TORCH_CHECK(index.is_contiguous() && grad.is_contiguous() && saved.is_contiguous(), op,
              ": index, grad and saved must be contiguous");

  const int64_t n_rows = table.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(idx[b] >= 0 && idx[b] < n_rows, op, ": index[", b, "] = ", idx[b],
                " is outside [0, ", n_rows, ")");
  }
}

// Batch positions ordered by row, ties kept in batch order, and the start of each
// run of equal rows. O(B log B) time and O(B) memory.
void group_duplicates(const int64_t* idx, int64_t batch, std::vector<int64_t>& order,
                      std::vector<int64_t>& run_starts) {
  order.resize(batch);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [idx](int64_t lhs, int64_t rhs) { return idx[lhs] < idx[rhs]; });
  run_starts.clear();
  for (int64_t k = 0; k < batch; ++k) {
    if (k == 0 || idx[order[k]] != idx[order[k - 1]]) {
      run_starts.push_back(k);
    }
  }
  run_starts.push_back(batch);
}

// Adagrad step of one table row with its summed gradient g (d,).
template <typename table_t, typename accum_t, typename opmath_t>
DISTPROP_ALWAYS_INLINE void step_row(const opmath_t* __restrict__ g, opmath_t signed_lr,
                                     opmath_t eps, int64_t d, table_t* __restrict__ row,
                                     accum_t* __restrict__ acc_row) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    const opmath_t acc = static_cast<opmath_t>(acc_row[j]) + g[j] * g[j];
    acc_row[j] = static_cast<accum_t>(acc);
    const opmath_t step = signed_lr * g[j] / (std::sqrt(acc) + eps);
    row[j] = static_cast<table_t>(static_cast<opmath_t>(row[j]) + step);
  }
}

// Requests the first bytes of a row that a later iteration reads and writes. The
// rows of a large table are scattered, so without this each row waits for its own
// memory miss. The hardware prefetcher streams the rest of a long row.
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* start = static_cast<const char*>(row);
  const int64_t limit = std::min<int64_t>(bytes, kPrefetchBytesPerRow);
  for (int64_t offset = 0; offset < limit; offset += kCacheLineBytes) {
    __builtin_prefetch(start + offset, /*rw=*/1, /*locality=*/3);
  }
}

}  // namespace

// float32 instance of step_row, compiled once per ISA (see simd_clones.h). It has
// external linkage because target_clones needs it.
namespace distprop::cpu {

DISTPROP_SIMD_CLONES
void sparse_extra_adagrad_row_f32(const float* g, float signed_lr, float eps, int64_t d,
                                  float* row, float* acc_row) {
  step_row<float, float, float>(g, signed_lr, eps, d, row, acc_row);
}

}  // namespace distprop::cpu

namespace {

template <typename table_t, typename accum_t>
void step_kernel(const at::Tensor& table, const at::Tensor& accum, const int64_t* idx,
                 const at::Tensor& grad, const at::Tensor& saved, double lr, double eps,
                 bool update_phase, bool maximize) {
  using opmath_t = at::opmath_type<table_t>;
  const int64_t batch = grad.size(0);
  const int64_t d = table.size(1);
  const int64_t table_stride = table.stride(0);
  const int64_t accum_stride = accum.stride(0);
  table_t* table_ptr = table.mutable_data_ptr<table_t>();
  accum_t* accum_ptr = accum.mutable_data_ptr<accum_t>();
  table_t* saved_ptr = saved.mutable_data_ptr<table_t>();
  const opmath_t* grad_ptr = grad.const_data_ptr<opmath_t>();
  const opmath_t signed_lr = static_cast<opmath_t>(maximize ? lr : -lr);
  const opmath_t eps_op = static_cast<opmath_t>(eps);

  std::vector<int64_t> order;
  std::vector<int64_t> run_starts;
  group_duplicates(idx, batch, order, run_starts);
  const int64_t n_runs = static_cast<int64_t>(run_starts.size()) - 1;

  // Each task owns whole runs, hence whole rows of table and accum: no two tasks
  // write the same element.
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, d));
  at::parallel_for(0, n_runs, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> summed(d);
    for (int64_t run = begin; run < std::min(end, begin + kPrefetchRuns); ++run) {
      const int64_t r = idx[order[run_starts[run]]];
      prefetch_row(table_ptr + r * table_stride, d * sizeof(table_t));
      prefetch_row(accum_ptr + r * accum_stride, d * sizeof(accum_t));
    }
    for (int64_t run = begin; run < end; ++run) {
      if (run + kPrefetchRuns < end) {
        const int64_t ahead = idx[order[run_starts[run + kPrefetchRuns]]];
        prefetch_row(table_ptr + ahead * table_stride, d * sizeof(table_t));
        prefetch_row(accum_ptr + ahead * accum_stride, d * sizeof(accum_t));
      }
      const int64_t first = run_starts[run];
      const int64_t last = run_starts[run + 1];
      const int64_t r = idx[order[first]];
      table_t* row = table_ptr + r * table_stride;
      accum_t* acc_row = accum_ptr + r * accum_stride;

      // The summed gradient of the run; a single row's gradient is used as it is.
      const opmath_t* g = grad_ptr + order[first] * d;
      if (last - first > 1) {
        std::fill(summed.begin(), summed.end(), opmath_t(0));
        for (int64_t k = first; k < last; ++k) {
          const opmath_t* grad_row = grad_ptr + order[k] * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            summed[j] += grad_row[j];
          }
        }
        g = summed.data();
      }
      if (update_phase) {
        // Duplicates carry copies of one original row. The last one is written,
        // as a sequential index_put_ would.
        std::copy(saved_ptr + order[last - 1] * d, saved_ptr + order[last - 1] * d + d, row);
      } else {
        for (int64_t k = first; k < last; ++k) {
          std::copy(row, row + d, saved_ptr + order[k] * d);
        }
      }

      if constexpr (std::is_same_v<table_t, float> && std::is_same_v<accum_t, float>) {
        distprop::cpu::sparse_extra_adagrad_row_f32(g, signed_lr, eps_op, d, row, acc_row);
      } else {
        step_row(g, signed_lr, eps_op, d, row, acc_row);
      }
    }
  });
}

void sparse_extra_adagrad_cpu(const at::Tensor& table, const at::Tensor& accum,
                              const at::Tensor& index, const at::Tensor& grad,
                              const at::Tensor& saved, double lr, double eps, bool update_phase,
                              bool maximize) {
  check_step_inputs(table, accum, index, grad, saved);
  if (index.numel() == 0 || table.size(1) == 0) {
    return;
  }
  // Gradients enter the arithmetic type once: a copy of (B, d), never of the table.
  const at::ScalarType opmath_type = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_op = grad.to(opmath_type).contiguous();

  DISPATCH_FLOAT_TYPES(table.scalar_type(), "sparse_extra_adagrad_", [&] {
    using table_t = scalar_t;
    DISPATCH_FLOAT_TYPES(accum.scalar_type(), "sparse_extra_adagrad_accum", [&] {
      step_kernel<table_t, scalar_t>(table, accum, index.const_data_ptr<int64_t>(), grad_op,
                                     saved, lr, eps, update_phase, maximize);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distprop_fast_C, m) {
  m.def(
      "sparse_extra_adagrad_(Tensor(a!) table, Tensor(b!) accum, Tensor index, Tensor grad, "
      "Tensor(c!) saved, float lr, float eps, bool update_phase, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(distprop_fast_C, CPU, m) {
  m.impl("sparse_extra_adagrad_", &sparse_extra_adagrad_cpu);
}
