// Scalar helpers shared by the CPU and CUDA kernels. They follow
// torch.nn.functional.softplus with beta=1 and threshold=20: above the
// threshold softplus(x) is x and its derivative is exactly 1.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DISTPROP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DISTPROP_HOST_DEVICE inline
#endif

namespace distprop {

constexpr double kSoftplusThreshold = 20.0;

// Overloads that pick the float or double libm function on host and device alike.
DISTPROP_HOST_DEVICE float exp_of(float x) { return expf(x); }
DISTPROP_HOST_DEVICE double exp_of(double x) { return exp(x); }
DISTPROP_HOST_DEVICE float log1p_of(float x) { return log1pf(x); }
DISTPROP_HOST_DEVICE double log1p_of(double x) { return log1p(x); }

template <typename T>
DISTPROP_HOST_DEVICE T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : log1p_of(exp_of(x));
}

// d softplus / dx = sigmoid(x), written as e / (e + 1) like PyTorch's softplus backward.
template <typename T>
DISTPROP_HOST_DEVICE T softplus_grad(T x) {
  if (x > T(kSoftplusThreshold)) {
    return T(1);
  }
  const T e = exp_of(x);
  return e / (e + T(1));
}

// 1 where the defect passes the gradient through, that is |z| > margin, and
// always when margin <= 0. NaN passes, as in torch.nn.functional.hardshrink. The
// bitwise operators keep the test branch-free, so loops over it vectorise.
template <typename T>
DISTPROP_HOST_DEVICE bool shrink_passes(T z, T margin) {
  const bool inside = (z >= -margin) & (z <= margin);
  return !inside | (margin <= T(0));
}

// hardshrink(z, margin), where a margin of 0 or less means no shrinkage.
template <typename T>
DISTPROP_HOST_DEVICE T shrink(T z, T margin) {
  return shrink_passes(z, margin) ? z : T(0);
}

}  // namespace distprop
