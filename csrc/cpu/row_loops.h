// Inner loops over one row of `hidden` elements, written so that the compiler
// vectorises them (reduced-precision types convert to float on the fly).
#pragma once

#include <cstdint>

// Each loop is compiled for AVX-512, AVX2 and baseline x86-64, and the best one
// the CPU supports is picked at load time (GCC/Clang function multiversioning).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define MOEFLUX_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOEFLUX_MULTIVERSION
#endif

namespace moeflux::cpu {

// acc += w * x
template <typename T, typename A>
MOEFLUX_MULTIVERSION void accumulate_row(A* __restrict acc, const T* __restrict x, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(x[i]);
}

// out = x (a plain loop: glibc's memcpy picks `rep movsb` for rows of a few
// KiB, which is slow on some AMD cores)
template <typename T>
MOEFLUX_MULTIVERSION void copy_row(T* __restrict out, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i];
}

// out = acc, rounded to T
template <typename T, typename A>
MOEFLUX_MULTIVERSION void store_row(T* __restrict out, const A* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

// out = w * x, computed in A and rounded to T
template <typename T, typename A>
MOEFLUX_MULTIVERSION void scale_row(T* __restrict out, const T* __restrict x, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w * static_cast<A>(x[i]));
}

// out = w * x, and returns <x, other> in one pass over x. Eight partial sums
// let the loop vectorise without reassociating floating-point sums: the order
// is fixed, so the result is deterministic.
template <typename T, typename A>
MOEFLUX_MULTIVERSION A scale_row_and_dot(T* __restrict out, const T* __restrict x, A w, const T* __restrict other,
                                         int64_t n) {
  constexpr int kLanes = 8;
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A v = static_cast<A>(x[i + l]);
      out[i + l] = static_cast<T>(w * v);
      part[l] += v * static_cast<A>(other[i + l]);
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<T>(w * static_cast<A>(x[i]));
    part[0] += static_cast<A>(x[i]) * static_cast<A>(other[i]);
  }
  A sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

}  // namespace moeflux::cpu
