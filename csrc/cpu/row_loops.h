// Inner loops over one row of `hidden` elements, written so that the compiler
// vectorises them (reduced-precision types convert to float on the fly).
#pragma once

#include <cstdint>

namespace moeflux::cpu {

// acc += w * x
template <typename T, typename A>
inline void accumulate_row(A* __restrict acc, const T* __restrict x, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(x[i]);
}

// out = acc, rounded to T
template <typename T, typename A>
inline void store_row(T* __restrict out, const A* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

// out = w * x, computed in A and rounded to T
template <typename T, typename A>
inline void scale_row(T* __restrict out, const T* __restrict x, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w * static_cast<A>(x[i]));
}

// <a, b> in A, with eight partial sums so the loop vectorises without
// reassociating floating-point sums (the order is fixed: deterministic).
template <typename T, typename A>
inline A dot_row(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int kLanes = 8;
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<A>(a[i + l]) * static_cast<A>(b[i + l]);
  }
  for (; i < n; ++i) part[0] += static_cast<A>(a[i]) * static_cast<A>(b[i]);
  A sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

}  // namespace moeflux::cpu
