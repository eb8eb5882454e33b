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
// sums run over the rows of each class in batch order, so they are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../distprop_math.h"
#include "softplus_scales.h"

namespace {

constexpr int64_t kGrainElements = 32768;
// Features per task of the backward pass: classes are split into column tiles so
// that a few classes (M = 1, say) still spread over the threads.
constexpr int64_t kFeatureTile = 256;

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
  // (M, d)
  const at::Tensor sigma_tensor = distprop::softplus_scales(w_sigma);
  const opmath_t* sigma = sigma_tensor.const_data_ptr<opmath_t>();
  const opmath_t eps = static_cast<opmath_t>(margin);

  // One partial sum per row, added up serially afterwards: the term is then the
  // same for every thread count.
  std::vector<double> row_terms(lambda != nullptr ? batch : 0, 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, d));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* a_row = a_ptr + b * d;
      const scalar_t* mu_row = mu + y[b] * d;
      const opmath_t* sigma_row = sigma + y[b] * d;
      scalar_t* g_row = g_ptr + b * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const opmath_t z =
            (static_cast<opmath_t>(a_row[j]) - static_cast<opmath_t>(mu_row[j])) / sigma_row[j];
        g_row[j] = static_cast<scalar_t>(distprop::shrink(z, eps));
      }
      if (lambda != nullptr) {
        // The stored (rounded) defect enters the term, as in the reference.
        const mult_t* lambda_row = lambda + b * d;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < d; ++j) {
          sum += static_cast<double>(static_cast<opmath_t>(g_row[j])) *
                 static_cast<double>(static_cast<opmath_t>(lambda_row[j]));
        }
        row_terms[b] = sum;
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

// Backward of one row tile: writes da (and dlambda) and adds the row's terms to the
// class sums. A separate function, so that its loops vectorise for each case.
template <bool kHasLambda, typename scalar_t, typename mult_t, typename opmath_t>
inline void constraint_bwd_row(const scalar_t* __restrict__ a_row,
                               const scalar_t* __restrict__ gd_row,
                               const mult_t* __restrict__ lambda_row,
                               const scalar_t* __restrict__ mu_c,
                               const opmath_t* __restrict__ sigma_c, opmath_t eps, opmath_t gt,
                               int64_t width, scalar_t* __restrict__ ga_row,
                               mult_t* __restrict__ gl_row, double* __restrict__ sum_mu,
                               double* __restrict__ sum_sigma) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const opmath_t z =
        (static_cast<opmath_t>(a_row[j]) - static_cast<opmath_t>(mu_c[j])) / sigma_c[j];
    opmath_t upstream = static_cast<opmath_t>(gd_row[j]);
    if constexpr (kHasLambda) {
      upstream += gt * static_cast<opmath_t>(lambda_row[j]);
    }
    const opmath_t quotient = upstream / sigma_c[j];
    const opmath_t grad_z = distprop::shrink_passes(z, eps) ? quotient : opmath_t(0);
    ga_row[j] = static_cast<scalar_t>(grad_z);
    sum_mu[j] -= static_cast<double>(grad_z);
    sum_sigma[j] -= static_cast<double>(grad_z * z);
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

template <typename scalar_t, typename mult_t>
void constraint_bwd_kernel(const at::Tensor& grad_defect, double grad_term, const at::Tensor& a,
                           const at::Tensor& labels, const at::Tensor& w_mu,
                           const at::Tensor& w_sigma, double margin, const mult_t* lambda,
                           at::Tensor& grad_a, at::Tensor& grad_mu, at::Tensor& grad_w_sigma,
                           mult_t* grad_lambda) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = a.size(0);
  const int64_t d = a.size(1);
  const int64_t n_classes = w_mu.size(0);
  const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
  const scalar_t* gd_ptr = grad_defect.const_data_ptr<scalar_t>();
  const scalar_t* mu = w_mu.const_data_ptr<scalar_t>();
  scalar_t* ga_ptr = grad_a.mutable_data_ptr<scalar_t>();
  scalar_t* gmu_ptr = grad_mu.mutable_data_ptr<scalar_t>();
  scalar_t* gws_ptr = grad_w_sigma.mutable_data_ptr<scalar_t>();
  // (M, d) each
  const at::Tensor sigma_tensor = distprop::softplus_scales(w_sigma);
  const at::Tensor dsoftplus_tensor = distprop::softplus_scale_grads(w_sigma);
  const opmath_t* sigma = sigma_tensor.const_data_ptr<opmath_t>();
  const opmath_t* dsoftplus = dsoftplus_tensor.const_data_ptr<opmath_t>();
  const opmath_t eps = static_cast<opmath_t>(margin);
  const opmath_t gt = static_cast<opmath_t>(grad_term);

  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
  group_rows_by_class(labels.const_data_ptr<int64_t>(), batch, n_classes, offsets, rows);

  // Each task owns one (class, feature tile): it writes da and dlambda of the class's
  // rows in that tile and the class's two gradient rows, so no two tasks write the
  // same element.
  const int64_t n_tiles = (d + kFeatureTile - 1) / kFeatureTile;
  at::parallel_for(0, n_classes * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum_mu(kFeatureTile);
    std::vector<double> sum_sigma(kFeatureTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / n_tiles;
      const int64_t j0 = (task % n_tiles) * kFeatureTile;
      const int64_t width = std::min(kFeatureTile, d - j0);
      const scalar_t* mu_c = mu + c * d + j0;
      const opmath_t* sigma_c = sigma + c * d + j0;
      std::fill(sum_mu.begin(), sum_mu.end(), 0.0);
      std::fill(sum_sigma.begin(), sum_sigma.end(), 0.0);

      for (int64_t k = offsets[c]; k < offsets[c + 1]; ++k) {
        const int64_t offset = rows[k] * d + j0;
        if (lambda != nullptr) {
          constraint_bwd_row<true>(a_ptr + offset, gd_ptr + offset, lambda + offset, mu_c,
                                   sigma_c, eps, gt, width, ga_ptr + offset,
                                   grad_lambda + offset, sum_mu.data(), sum_sigma.data());
        } else {
          constraint_bwd_row<false>(a_ptr + offset, gd_ptr + offset, lambda, mu_c, sigma_c, eps,
                                    gt, width, ga_ptr + offset, grad_lambda, sum_mu.data(),
                                    sum_sigma.data());
        }
      }

      for (int64_t j = 0; j < width; ++j) {
        const int64_t cj = c * d + j0 + j;
        gmu_ptr[cj] = static_cast<scalar_t>(sum_mu[j]);
        gws_ptr[cj] = static_cast<scalar_t>(sum_sigma[j] * dsoftplus[cj]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> zscore_constraint_bwd_cpu(
    const at::Tensor& grad_defect, const at::Tensor& grad_term, const at::Tensor& a,
    const at::Tensor& labels, const at::Tensor& w_mu, const at::Tensor& w_sigma, double margin,
    const std::optional<at::Tensor>& multipliers) {
  const char* op = "zscore_constraint_bwd";
  check_constraint_inputs(op, a, labels, w_mu, w_sigma, multipliers);
  TORCH_CHECK(grad_defect.sizes() == a.sizes() && grad_defect.scalar_type() == a.scalar_type(),
              op, ": grad_defect must match a (shape ", a.sizes(), ", dtype ", a.scalar_type(),
              "), got shape ", grad_defect.sizes(), " and dtype ", grad_defect.scalar_type());
  check_cpu_contiguous(op, "grad_defect", grad_defect);
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

  DISPATCH_FLOAT_TYPES(a.scalar_type(), "zscore_constraint_bwd", [&] {
    using storage_t = scalar_t;
    DISPATCH_FLOAT_TYPES(mult_type, "zscore_constraint_bwd_multipliers", [&] {
      const scalar_t* lambda =
          multipliers.has_value() ? multipliers->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* grad_lambda =
          multipliers.has_value() ? grad_multipliers.mutable_data_ptr<scalar_t>() : nullptr;
      constraint_bwd_kernel<storage_t, scalar_t>(grad_defect, gt, a, labels, w_mu, w_sigma,
                                                 margin, lambda, grad_a, grad_mu, grad_w_sigma,
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
      "zscore_constraint_bwd(Tensor grad_defect, Tensor grad_term, Tensor a, Tensor labels, "
      "Tensor w_mu, Tensor w_sigma, float margin, Tensor? multipliers) "
      "-> (Tensor grad_a, Tensor grad_mu, Tensor grad_sigma, Tensor grad_multipliers)");
}

TORCH_LIBRARY_IMPL(distprop_fast_C, CPU, m) {
  m.impl("zscore_constraint_fwd", &zscore_constraint_fwd_cpu);
  m.impl("zscore_constraint_bwd", &zscore_constraint_bwd_cpu);
}
