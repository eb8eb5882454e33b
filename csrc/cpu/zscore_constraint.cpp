// z-score hard-shrink constraint fused with the multiplier term, CPU kernels, and
// the schemas of both ops.
//
//   z = (a - W_mu[y]) / sigma[y],  sigma = softplus(W_sigma),  g = hardshrink(z, margin)
//   term = sum(lambda * g)
//
// Backward, with G = grad_defect + grad_term * lambda and m = 1[|z| > margin]:
//   da = G * m / sigma[y]
//   dW_mu[c] = -sum_{b : y_b = c} G * m / sigma[c]
//   dW_sigma[c] = -sum_{b : y_b = c} G * m * z / sigma[c] * sigmoid(W_sigma[c])
//   dlambda = grad_term * g
//
// A margin of 0 (or less) means no shrinkage, so m = 1 everywhere. The per-class
// sums run over the rows of each class in batch order, in the arithmetic dtype, so
// they are deterministic. grad_defect may be absent when only the term has a
// gradient. The scales softplus(W_sigma) and their derivative are computed for the
// classes in the batch only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../distprop_math.h"
#include "simd_clones.h"
#include "softplus_scales.h"

namespace {

constexpr int64_t kGrainElements = 32768;
// Features per task of the backward pass: classes are split into column tiles so
// that a few classes (M = 1, say) still spread over the threads. A tile of a row is
// one 4 KiB run of memory in float32.
constexpr int64_t kFeatureTile = 1024;

#define DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

void check_cpu_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes());
}

void check_constraint_inputs(const char* op, const at::Tensor& a, const at::Tensor& labels,
                             const at::Tensor& w_mu, const at::Tensor& w_sigma,
                             const std::optional<at::Tensor>& multipliers) {
  TORCH_CHECK(a.dim() == 2, op, ": a must have shape (B, d), got ", a.sizes());
  TORCH_CHECK(w_mu.dim() == 2 && w_mu.size(1) == a.size(1), op, ": w_mu must have shape (M, ",
              a.size(1), "), got ", w_mu.sizes());
  TORCH_CHECK(w_sigma.sizes() == w_mu.sizes(), op, ": w_sigma must have the shape of w_mu ",
              w_mu.sizes(), ", got ", w_sigma.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == a.size(0), op,
              ": labels must have shape (", a.size(0), "), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(w_mu.scalar_type() == a.scalar_type() && w_sigma.scalar_type() == a.scalar_type(),
              op, ": a, w_mu and w_sigma must share one dtype, got ", a.scalar_type(), ", ",
              w_mu.scalar_type(), " and ", w_sigma.scalar_type());
  check_cpu_contiguous(op, "a", a);
  check_cpu_contiguous(op, "labels", labels);
  check_cpu_contiguous(op, "w_mu", w_mu);
  check_cpu_contiguous(op, "w_sigma", w_sigma);
  if (multipliers.has_value()) {
    TORCH_CHECK(multipliers->sizes() == a.sizes(), op, ": multipliers must have the shape of a ",
                a.sizes(), ", got ", multipliers->sizes());
    TORCH_CHECK(at::isFloatingType(multipliers->scalar_type()), op,
                ": multipliers must be a floating-point tensor, got ", multipliers->scalar_type());
    check_cpu_contiguous(op, "multipliers", *multipliers);
  }

  // O(B) and serial, before any parallel region, so that the error names the row.
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const int64_t n_classes = w_mu.size(0);
  for (int64_t b = 0; b < labels.size(0); ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < n_classes, op, ": labels[", b, "] = ", y[b],
                " is outside [0, ", n_classes, ")");
  }
}

// One row of the forward: writes the defect and returns sum(lambda * g) over the row in
// double, or 0 without multipliers.
template <typename scalar_t, typename mult_t, typename opmath_t>
DISTPROP_ALWAYS_INLINE double constraint_fwd_row(const scalar_t* __restrict__ a_row,
                                                 const scalar_t* __restrict__ mu_row,
                                                 const opmath_t* __restrict__ sigma_row,
                                                 const mult_t* __restrict__ lambda_row,
                                                 opmath_t eps, int64_t d,
                                                 scalar_t* __restrict__ g_row) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    const opmath_t z =
        (static_cast<opmath_t>(a_row[j]) - static_cast<opmath_t>(mu_row[j])) / sigma_row[j];
    g_row[j] = static_cast<scalar_t>(distprop::shrink(z, eps));
  }
  if (lambda_row == nullptr) {
    return 0.0;
  }
  // The stored (rounded) defect enters the term, as in the reference.
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) {
    sum += static_cast<double>(static_cast<opmath_t>(g_row[j])) *
           static_cast<double>(static_cast<opmath_t>(lambda_row[j]));
  }
  return sum;
}

// One row tile of the backward: writes da (and dlambda) and adds the row's terms to
// the class sums, which have the arithmetic dtype.
template <bool kHasGradDefect, bool kHasLambda, typename scalar_t, typename mult_t,
          typename opmath_t>
DISTPROP_ALWAYS_INLINE void constraint_bwd_row(
    const scalar_t* __restrict__ a_row, const scalar_t* __restrict__ gd_row,
    const mult_t* __restrict__ lambda_row, const scalar_t* __restrict__ mu_c,
    const opmath_t* __restrict__ sigma_c, opmath_t eps, opmath_t gt, int64_t width,
    scalar_t* __restrict__ ga_row, mult_t* __restrict__ gl_row, opmath_t* __restrict__ sum_mu,
    opmath_t* __restrict__ sum_sigma) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const opmath_t z =
        (static_cast<opmath_t>(a_row[j]) - static_cast<opmath_t>(mu_c[j])) / sigma_c[j];
    opmath_t upstream;
    if constexpr (kHasGradDefect && kHasLambda) {
      upstream = static_cast<opmath_t>(gd_row[j]) + gt * static_cast<opmath_t>(lambda_row[j]);
    } else if constexpr (kHasGradDefect) {
      upstream = static_cast<opmath_t>(gd_row[j]);
    } else {
      upstream = gt * static_cast<opmath_t>(lambda_row[j]);
    }
    const opmath_t quotient = upstream / sigma_c[j];
    const opmath_t grad_z = distprop::shrink_passes(z, eps) ? quotient : opmath_t(0);
    ga_row[j] = static_cast<scalar_t>(grad_z);
    sum_mu[j] -= grad_z;
    sum_sigma[j] -= grad_z * z;
  }
  if constexpr (kHasLambda) {
    // A second pass, because GCC 12 does not vectorise the first with this store in it.
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const opmath_t z =
          (static_cast<opmath_t>(a_row[j]) - static_cast<opmath_t>(mu_c[j])) / sigma_c[j];
      // Round like the stored defect, which has the dtype of a.
      const scalar_t stored = static_cast<scalar_t>(distprop::shrink(z, eps));
      gl_row[j] = static_cast<mult_t>(gt * static_cast<opmath_t>(stored));
    }
  }
}

template <typename scalar_t, typename mult_t, typename opmath_t>
DISTPROP_ALWAYS_INLINE void constraint_bwd_row_any(
    const scalar_t* a_row, const scalar_t* gd_row, const mult_t* lambda_row,
    const scalar_t* mu_c, const opmath_t* sigma_c, opmath_t eps, opmath_t gt, int64_t width,
    scalar_t* ga_row, mult_t* gl_row, opmath_t* sum_mu, opmath_t* sum_sigma) {
  // The caller passes a defect gradient, multipliers, or both.
  if (gd_row != nullptr && lambda_row != nullptr) {
    constraint_bwd_row<true, true>(a_row, gd_row, lambda_row, mu_c, sigma_c, eps, gt, width,
                                   ga_row, gl_row, sum_mu, sum_sigma);
  } else if (gd_row != nullptr) {
    constraint_bwd_row<true, false>(a_row, gd_row, lambda_row, mu_c, sigma_c, eps, gt, width,
                                    ga_row, gl_row, sum_mu, sum_sigma);
  } else {
    constraint_bwd_row<false, true>(a_row, gd_row, lambda_row, mu_c, sigma_c, eps, gt, width,
                                    ga_row, gl_row, sum_mu, sum_sigma);
  }
}

}  // namespace

// float32 instances of the row functions, compiled once per ISA (see simd_clones.h).
// They have external linkage because target_clones needs it.
namespace distprop::cpu {

DISTPROP_SIMD_CLONES
double zscore_constraint_fwd_row_f32(const float* a_row, const float* mu_row,
                                     const float* sigma_row, const float* lambda_row, float eps,
                                     int64_t d, float* g_row) {
  return constraint_fwd_row<float, float, float>(a_row, mu_row, sigma_row, lambda_row, eps, d,
                                                 g_row);
}

DISTPROP_SIMD_CLONES
void zscore_constraint_bwd_row_f32(const float* a_row, const float* gd_row,
                                   const float* lambda_row, const float* mu_c,
                                   const float* sigma_c, float eps, float gt, int64_t width,
                                   float* ga_row, float* gl_row, float* sum_mu,
                                   float* sum_sigma) {
  constraint_bwd_row_any<float, float, float>(a_row, gd_row, lambda_row, mu_c, sigma_c, eps, gt,
                                              width, ga_row, gl_row, sum_mu, sum_sigma);
}

}  // namespace distprop::cpu

namespace {

template <typename scalar_t, typename mult_t>
constexpr bool kIsFloat32 = std::is_same_v<scalar_t, float> && std::is_same_v<mult_t, float>;

// Forward for one (storage, multiplier storage) dtype pair. Returns sum(lambda * g) in double.
template <typename scalar_t, typename mult_t>
double constraint_fwd_kernel(const at::Tensor& a, const at::Tensor& labels,
                             const at::Tensor& w_mu, const at::Tensor& w_sigma, double margin,
                             const mult_t* lambda, at::Tensor& defect) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = a.size(0);
  const int64_t d = a.size(1);
  const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
  const scalar_t* mu = w_mu.const_data_ptr<scalar_t>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  scalar_t* g_ptr = defect.mutable_data_ptr<scalar_t>();
  // Scales of the classes in the batch only, (P, d) with P <= min(B, M).
  const distprop::PresentClasses present = distprop::find_present_classes(y, batch, w_mu.size(0));
  const at::Tensor sigma_tensor =
      distprop::softplus_scales(distprop::present_rows(w_sigma, present));
  const opmath_t* sigma = sigma_tensor.const_data_ptr<opmath_t>();
  const int64_t* slot = present.slot.data();
  const opmath_t eps = static_cast<opmath_t>(margin);

  // One partial sum per row, added up serially afterwards: the term is then the
  // same for every thread count.
  std::vector<double> row_terms(batch, 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, d));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* a_row = a_ptr + b * d;
      const scalar_t* mu_row = mu + y[b] * d;
      const opmath_t* sigma_row = sigma + slot[y[b]] * d;
      const mult_t* lambda_row = lambda != nullptr ? lambda + b * d : nullptr;
      scalar_t* g_row = g_ptr + b * d;
      if constexpr (kIsFloat32<scalar_t, mult_t>) {
        row_terms[b] = distprop::cpu::zscore_constraint_fwd_row_f32(a_row, mu_row, sigma_row,
                                                                    lambda_row, eps, d, g_row);
      } else {
        row_terms[b] = constraint_fwd_row(a_row, mu_row, sigma_row, lambda_row, eps, d, g_row);
      }
    }
  });

  double term = 0.0;
  for (double row_term : row_terms) {
    term += row_term;
  }
  return term;
}

std::tuple<at::Tensor, at::Tensor> zscore_constraint_fwd_cpu(
    const at::Tensor& a, const at::Tensor& labels, const at::Tensor& w_mu,
    const at::Tensor& w_sigma, double margin, const std::optional<at::Tensor>& multipliers) {
  check_constraint_inputs("zscore_constraint_fwd", a, labels, w_mu, w_sigma, multipliers);
  // (B, d)
  at::Tensor defect = at::empty_like(a);
  const at::ScalarType term_type =
      multipliers.has_value() ? at::promote_types(a.scalar_type(), multipliers->scalar_type())
                              : a.scalar_type();
  const at::ScalarType mult_type =
      multipliers.has_value() ? multipliers->scalar_type() : a.scalar_type();

  double term = 0.0;
  DISPATCH_FLOAT_TYPES(a.scalar_type(), "zscore_constraint_fwd", [&] {
    using storage_t = scalar_t;
    DISPATCH_FLOAT_TYPES(mult_type, "zscore_constraint_fwd_multipliers", [&] {
      const scalar_t* lambda =
          multipliers.has_value() ? multipliers->const_data_ptr<scalar_t>() : nullptr;
      term = constraint_fwd_kernel<storage_t, scalar_t>(a, labels, w_mu, w_sigma, margin, lambda,
                                                        defect);
    });
  });
  at::Tensor term_tensor = at::scalar_tensor(term, a.options().dtype(term_type));
  return {defect, term_tensor};
}

// Row numbers of each class in batch order: rows[offsets[c] : offsets[c + 1]] have label c.
// Counting sort, O(B + M).
void group_rows_by_class(const int64_t* y, int64_t batch, int64_t n_classes,
                         std::vector<int64_t>& offsets, std::vector<int64_t>& rows) {
  offsets.assign(n_classes + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    ++offsets[y[b] + 1];
  }
  for (int64_t c = 0; c < n_classes; ++c) {
    offsets[c + 1] += offsets[c];
  }
  rows.resize(batch);
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t b = 0; b < batch; ++b) {
    rows[next[y[b]]++] = b;
  }
}

// grad_defect may be null when only the term has a gradient; lambda and grad_lambda
// are null without multipliers. At least one of grad_defect and lambda is non-null.
template <typename scalar_t, typename mult_t>
void constraint_bwd_kernel(const scalar_t* gd_ptr, double grad_term, const at::Tensor& a,
                           const at::Tensor& labels, const at::Tensor& w_mu,
                           const at::Tensor& w_sigma, double margin, const mult_t* lambda,
                           at::Tensor& grad_a, at::Tensor& grad_mu, at::Tensor& grad_w_sigma,
                           mult_t* grad_lambda) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = a.size(0);
  const int64_t d = a.size(1);
  const int64_t n_classes = w_mu.size(0);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
  const scalar_t* mu = w_mu.const_data_ptr<scalar_t>();
  scalar_t* ga_ptr = grad_a.mutable_data_ptr<scalar_t>();
  scalar_t* gmu_ptr = grad_mu.mutable_data_ptr<scalar_t>();
  scalar_t* gws_ptr = grad_w_sigma.mutable_data_ptr<scalar_t>();
  // (P, d) each, for the P classes in the batch. Class c has row slot[c].
  const distprop::PresentClasses present = distprop::find_present_classes(y, batch, n_classes);
  const at::Tensor present_w_sigma = distprop::present_rows(w_sigma, present);
  const at::Tensor sigma_tensor = distprop::softplus_scales(present_w_sigma);
  const at::Tensor dsoftplus_tensor = distprop::softplus_scale_grads(present_w_sigma);
  const opmath_t* sigma = sigma_tensor.const_data_ptr<opmath_t>();
  const opmath_t* dsoftplus = dsoftplus_tensor.const_data_ptr<opmath_t>();
  const int64_t* slot = present.slot.data();
  const opmath_t eps = static_cast<opmath_t>(margin);
  const opmath_t gt = static_cast<opmath_t>(grad_term);

  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
  group_rows_by_class(y, batch, n_classes, offsets, rows);

  // Each task owns one (class, feature tile): it writes da and dlambda of the class's
  // rows in that tile and the class's two gradient rows, so no two tasks write the
  // same element. The class sums run over the rows in batch order, whatever the
  // thread count.
  const int64_t tile = std::max<int64_t>(1, std::min(kFeatureTile, d));
  const int64_t n_tiles = (d + tile - 1) / tile;
  const int64_t n_tasks = n_classes * n_tiles;
  // Tasks per chunk such that a chunk covers about kGrainElements of (B, d) on
  // average, so that a small call runs on the calling thread alone.
  const int64_t elements_per_task = std::max<int64_t>(1, batch * d / std::max<int64_t>(1, n_tasks));
  const int64_t grain = std::max<int64_t>(1, kGrainElements / elements_per_task);
  at::parallel_for(0, n_tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> sum_mu(tile);
    std::vector<opmath_t> sum_sigma(tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / n_tiles;
      const int64_t j0 = (task % n_tiles) * tile;
      const int64_t width = std::min(tile, d - j0);
      scalar_t* gmu_c = gmu_ptr + c * d + j0;
      scalar_t* gws_c = gws_ptr + c * d + j0;
      if (offsets[c] == offsets[c + 1]) {
        // The class has no rows in the batch.
        std::fill(gmu_c, gmu_c + width, scalar_t(0));
        std::fill(gws_c, gws_c + width, scalar_t(0));
        continue;
      }
      const scalar_t* mu_c = mu + c * d + j0;
      const opmath_t* sigma_c = sigma + slot[c] * d + j0;
      const opmath_t* dsoftplus_c = dsoftplus + slot[c] * d + j0;
      std::fill(sum_mu.begin(), sum_mu.end(), opmath_t(0));
      std::fill(sum_sigma.begin(), sum_sigma.end(), opmath_t(0));

      for (int64_t k = offsets[c]; k < offsets[c + 1]; ++k) {
        const int64_t offset = rows[k] * d + j0;
        const scalar_t* gd_row = gd_ptr != nullptr ? gd_ptr + offset : nullptr;
        const mult_t* lambda_row = lambda != nullptr ? lambda + offset : nullptr;
        mult_t* gl_row = grad_lambda != nullptr ? grad_lambda + offset : nullptr;
        if constexpr (kIsFloat32<scalar_t, mult_t>) {
          distprop::cpu::zscore_constraint_bwd_row_f32(a_ptr + offset, gd_row, lambda_row, mu_c,
                                                       sigma_c, eps, gt, width, ga_ptr + offset,
                                                       gl_row, sum_mu.data(), sum_sigma.data());
        } else {
          constraint_bwd_row_any(a_ptr + offset, gd_row, lambda_row, mu_c, sigma_c, eps, gt,
                                 width, ga_ptr + offset, gl_row, sum_mu.data(),
                                 sum_sigma.data());
        }
      }

      for (int64_t j = 0; j < width; ++j) {
        gmu_c[j] = static_cast<scalar_t>(sum_mu[j]);
        gws_c[j] = static_cast<scalar_t>(sum_sigma[j] * dsoftplus_c[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> zscore_constraint_bwd_cpu(
    const std::optional<at::Tensor>& grad_defect, const at::Tensor& grad_term,
    const at::Tensor& a, const at::Tensor& labels, const at::Tensor& w_mu,
    const at::Tensor& w_sigma, double margin, const std::optional<at::Tensor>& multipliers) {
  const char* op = "zscore_constraint_bwd";
  check_constraint_inputs(op, a, labels, w_mu, w_sigma, multipliers);
  if (grad_defect.has_value()) {
    TORCH_CHECK(
        grad_defect->sizes() == a.sizes() && grad_defect->scalar_type() == a.scalar_type(), op,
        ": grad_defect must match a (shape ", a.sizes(), ", dtype ", a.scalar_type(),
        "), got shape ", grad_defect->sizes(), " and dtype ", grad_defect->scalar_type());
    check_cpu_contiguous(op, "grad_defect", *grad_defect);
  }
  TORCH_CHECK(grad_term.numel() == 1 && grad_term.device().is_cpu(), op,
              ": grad_term must be a one-element CPU tensor, got shape ", grad_term.sizes(),
              " on ", grad_term.device());

  // (B, d), (M, d), (M, d), and (B, d) or (0,) without multipliers
  at::Tensor grad_a = at::empty_like(a);
  at::Tensor grad_mu = at::empty_like(w_mu);
  at::Tensor grad_w_sigma = at::empty_like(w_sigma);
  at::Tensor grad_multipliers = multipliers.has_value() ? at::empty_like(*multipliers)
                                                        : at::empty({0}, a.options());
  const double gt = grad_term.item<double>();
  const at::ScalarType mult_type =
      multipliers.has_value() ? multipliers->scalar_type() : a.scalar_type();
  // With neither a defect gradient nor multipliers every gradient is zero; the kernel
  // then runs on a zero defect gradient.
  const at::Tensor zero_grad_defect =
      grad_defect.has_value() || multipliers.has_value() ? at::Tensor() : at::zeros_like(a);
  const at::Tensor& gd = grad_defect.has_value() ? *grad_defect : zero_grad_defect;

  DISPATCH_FLOAT_TYPES(a.scalar_type(), "zscore_constraint_bwd", [&] {
    using storage_t = scalar_t;
    const storage_t* gd_ptr = gd.defined() ? gd.const_data_ptr<storage_t>() : nullptr;
    DISPATCH_FLOAT_TYPES(mult_type, "zscore_constraint_bwd_multipliers", [&] {
      const scalar_t* lambda =
          multipliers.has_value() ? multipliers->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* grad_lambda =
          multipliers.has_value() ? grad_multipliers.mutable_data_ptr<scalar_t>() : nullptr;
      constraint_bwd_kernel<storage_t, scalar_t>(gd_ptr, gt, a, labels, w_mu, w_sigma, margin,
                                                 lambda, grad_a, grad_mu, grad_w_sigma,
                                                 grad_lambda);
    });
  });
  return {grad_a, grad_mu, grad_w_sigma, grad_multipliers};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distprop_fast_C, m) {
  m.def(
      "zscore_constraint_fwd(Tensor a, Tensor labels, Tensor w_mu, Tensor w_sigma, float margin, "
      "Tensor? multipliers) -> (Tensor defect, Tensor term)");
  m.def(
      "zscore_constraint_bwd(Tensor? grad_defect, Tensor grad_term, Tensor a, Tensor labels, "
      "Tensor w_mu, Tensor w_sigma, float margin, Tensor? multipliers) "
      "-> (Tensor grad_a, Tensor grad_mu, Tensor grad_sigma, Tensor grad_multipliers)");
}

TORCH_LIBRARY_IMPL(distprop_fast_C, CPU, m) {
  m.impl("zscore_constraint_fwd", &zscore_constraint_fwd_cpu);
  m.impl("zscore_constraint_bwd", &zscore_constraint_bwd_cpu);
}
