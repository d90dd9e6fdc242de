// Argument checks shared by every op. Each failure names the op, the
// argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>

namespace moeflux {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "moeflux.", op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == expected, "moeflux.", op, ": ", name, " must be ", expected, ", got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "moeflux.", op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
              t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "moeflux.", op, ": ", name, ".size(", dim, ") must equal ", what, " = ",
              expected, ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

// Far above any model (PEER's million experts), low enough that buffers of num_experts entries can be
// allocated: a mistaken num_experts gets this message rather than the allocator's.
constexpr int64_t kMaxExperts = int64_t{1} << 24;

inline void check_num_experts(int64_t num_experts, const char* op) {
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "moeflux.", op, ": num_experts must be in [1, ",
              kMaxExperts, "], got ", num_experts);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "moeflux.", op, ": ", name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_device_supported(const at::Tensor& t, const char* op, const char* name) {
#ifdef MOEFLUX_WITH_CUDA
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "moeflux.", op, ": ", name,
              " must be a CPU or CUDA tensor, got ", t.device());
#else
  TORCH_CHECK(t.device().is_cpu(), "moeflux.", op, ": ", name,
              " must be a CPU tensor (this build of moeflux has no CUDA kernels), got ", t.device());
#endif
}

// Expert ids on the CPU in [-1, num_experts) (-1: a dropped slot), in one pass. On CUDA the check would cost
// a host synchronisation: the kernels treat ids out of range as dropped instead, so callers skip it there.
inline void check_ids_in_range(const at::Tensor& expert_ids, int64_t num_experts, const char* op) {
  if (!expert_ids.is_cpu() || expert_ids.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(expert_ids);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < num_experts, "moeflux.", op, ": expert_ids must be in [0, num_experts = ",
              num_experts, ") or -1 (dropped), got values in [", lo, ", ", hi, "]");
}

// Row indices are int32: every row count must fit.
inline void check_fits_int32(int64_t n, const char* op, const char* what) {
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "moeflux.", op, ": ", what, " = ", n,
              " exceeds the int32 row-index range");
}

}  // namespace moeflux
