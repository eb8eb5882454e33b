// Function multiversioning for the CPU hot loops.
//
// The extension is built without -march flags so that one wheel runs on any x86-64
// CPU, which limits ordinary code to SSE2. A function marked DISTPROP_SIMD_CLONES is
// compiled three times, for AVX-512F, AVX2 and baseline x86-64, and the dynamic
// loader picks the best clone for the running CPU once, through an ifunc (GCC
// target_clones). Mark only non-template functions with external linkage, and keep
// their loops free of calls that cannot be inlined, so that each clone vectorises.
//
// Results are bitwise reproducible for one CPU and any thread count. Clones may
// round differently from each other, because a vectorised reduction adds its lanes
// in an order that depends on the vector width.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DISTPROP_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
// NOTE: other compilers and architectures build the baseline version only.
#define DISTPROP_SIMD_CLONES
#endif

#if defined(__GNUC__)
#define DISTPROP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DISTPROP_ALWAYS_INLINE inline
#endif
