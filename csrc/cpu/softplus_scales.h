// Per-class scales sigma = softplus(W_sigma) and their derivative for the CPU kernels.
// float32 goes through the vectorised loops of softplus_scales.cpp, which agree with
// PyTorch's softplus to within a few ulps. Other dtypes use ATen's kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace distprop::cpu {

// Writes softplus(w[i]), or its derivative sigmoid(w[i]) when `derivative`, for
// i < count, with beta 1 and threshold 20 as in torch.nn.functional.softplus.
void softplus_f32(const float* w, int64_t count, float* out, bool derivative);

}  // namespace distprop::cpu

namespace distprop {

// Arithmetic dtype of a storage dtype: float64 stays, everything else computes in float32.
inline at::ScalarType opmath_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor softplus_f32_tensor(const at::Tensor& w_sigma, bool derivative) {
  const at::Tensor w = w_sigma.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(w);
  cpu::softplus_f32(w.const_data_ptr<float>(), w.numel(), out.mutable_data_ptr<float>(),
                    derivative);
  return out;
}

// softplus(W_sigma) in the arithmetic dtype, contiguous, with the shape of w_sigma.
inline at::Tensor softplus_scales(const at::Tensor& w_sigma) {
  if (opmath_dtype(w_sigma.scalar_type()) == at::kFloat) {
    return softplus_f32_tensor(w_sigma, /*derivative=*/false);
  }
  return at::softplus(w_sigma.to(opmath_dtype(w_sigma.scalar_type()))).contiguous();
}

// d softplus / d W_sigma in the arithmetic dtype, contiguous, with the shape of
// w_sigma: sigmoid(W_sigma), and exactly 1 above the threshold 20.
inline at::Tensor softplus_scale_grads(const at::Tensor& w_sigma) {
  if (opmath_dtype(w_sigma.scalar_type()) == at::kFloat) {
    return softplus_f32_tensor(w_sigma, /*derivative=*/true);
  }
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
