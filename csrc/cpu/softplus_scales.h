// Per-class scales sigma = softplus(W_sigma) and their derivative for the CPU kernels.
// Both come from ATen's vectorised kernels, which the reference also calls. An entry
// can still differ from the reference's sigma in the last bits, because ATen takes a
// scalar path for the elements after the last full vector, and the kernels may pass
// fewer rows than the reference does.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace distprop {

// Arithmetic dtype of a storage dtype: float64 stays, everything else computes in float32.
inline at::ScalarType opmath_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// softplus(W_sigma) in the arithmetic dtype, contiguous, with the shape of w_sigma.
inline at::Tensor softplus_scales(const at::Tensor& w_sigma) {
  return at::softplus(w_sigma.to(opmath_dtype(w_sigma.scalar_type()))).contiguous();
}

// d softplus / d W_sigma in the arithmetic dtype, computed as PyTorch's softplus
// backward does (beta 1, threshold 20), contiguous, with the shape of w_sigma.
inline at::Tensor softplus_scale_grads(const at::Tensor& w_sigma) {
  const at::Tensor w = w_sigma.to(opmath_dtype(w_sigma.scalar_type()));
  // A broadcast one in place of a (M, d) tensor of ones.
  const at::Tensor ones = at::ones({}, w.options()).expand(w.sizes());
  return at::softplus_backward(ones, w, 1, 20).contiguous();
}

// The classes that occur in a batch of labels. A batch of B rows names at most
// min(B, M) classes, so the scales of the others need not be computed.
struct PresentClasses {
  // (M,): row of class c in `classes`, or -1 when c does not occur.
  std::vector<int64_t> slot;
  // (P,) int64: the classes that occur, in increasing order.
  at::Tensor classes;
  bool all_present = false;
};

// Finds the classes of labels y[0..batch), which must lie in [0, n_classes). O(B + M).
inline PresentClasses find_present_classes(const int64_t* y, int64_t batch, int64_t n_classes) {
  PresentClasses present;
  present.slot.assign(n_classes, -1);
  for (int64_t b = 0; b < batch; ++b) {
    present.slot[y[b]] = 0;
  }
  int64_t count = 0;
  for (int64_t c = 0; c < n_classes; ++c) {
    if (present.slot[c] == 0) {
      present.slot[c] = count++;
    }
  }
  present.all_present = count == n_classes;
  present.classes = at::empty({count}, at::TensorOptions().dtype(at::kLong));
  int64_t* classes = present.classes.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < n_classes; ++c) {
    if (present.slot[c] >= 0) {
      classes[present.slot[c]] = c;
    }
  }
  return present;
}

// Rows W_sigma[classes] of shape (P, d), or w_sigma itself when every class occurs.
inline at::Tensor present_rows(const at::Tensor& w_sigma, const PresentClasses& present) {
  return present.all_present ? w_sigma : w_sigma.index_select(0, present.classes);
}

}  // namespace distprop
