#include "csrc/experts/grouped_gemm.h"

#include <algorithm>

#include <ATen/ATen.h>

#ifdef MOEFLUX_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

#include "csrc/host_sync.h"

namespace moeflux {
namespace {

// A matmul operand torch._grouped_mm takes as it is: row- or column-major in its last two dimensions, 16-byte
// aligned (its CUDA kernel needs that); anything else (an expanded gradient, a strided view) is copied.
at::Tensor gemm_operand(const at::Tensor& t) {
  const int64_t d = t.dim();
  const bool row_major = t.stride(d - 1) == 1 && t.stride(d - 2) >= std::max<int64_t>(t.size(d - 1), 1);
  const bool col_major = t.stride(d - 2) == 1 && t.stride(d - 1) >= std::max<int64_t>(t.size(d - 2), 1);
  const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return (row_major || col_major) && aligned ? t : t.contiguous();
}

// Counts on the host -> segment ends on `device` (pinned + non-blocking: no host synchronisation).
at::Tensor offsets_on(const at::Tensor& host_counts, const at::Device& device) {
  at::Tensor ends = at::cumsum(host_counts, 0, at::kInt);
  if (device.is_cpu()) return ends;
  return ends.pin_memory().to(device, /*non_blocking=*/true);
}

void check_host_counts(const at::Tensor& host_counts, int64_t num_rows, const char* op) {
  const int64_t* count = host_counts.const_data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < host_counts.numel(); ++e) {
    TORCH_CHECK(count[e] >= 0 && start + count[e] <= num_rows, "moeflux.", op, ": tokens_per_expert must be >= 0 ",
                "and sum to at most input.size(0) = ", num_rows, ", got ", count[e], " rows for expert ", e,
                " after ", start);
    start += count[e];
  }
}

void zero_rows_past(at::Tensor& out, const Segments& seg) {
  const std::optional<int64_t> used = seg.total_rows();
  if (used && *used < out.size(0)) out.narrow(0, *used, out.size(0) - *used).zero_();
}

}  // namespace

std::optional<int64_t> Segments::total_rows() const {
  if (capacity) return num_experts * *capacity;
  if (host_counts.defined()) return host_counts.sum().item<int64_t>();  // host tensor: no synchronisation
  return std::nullopt;
}

bool aten_grouped_mm_usable(const at::Tensor& rows, int64_t k_dim, int64_t n_dim) {
  const at::ScalarType t = rows.scalar_type();
  // Its row strides must be multiples of 16 bytes, on every device.
  const int64_t bytes = static_cast<int64_t>(c10::elementSize(t));
  if ((k_dim * bytes) % 16 != 0 || (n_dim * bytes) % 16 != 0) return false;
  if (rows.is_cpu()) return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
#ifdef MOEFLUX_WITH_CUDA
  if (!rows.is_cuda() || t != at::kBFloat16) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, rows.device().index()));
  return major == 9 || major == 10;  // the CUTLASS kernels ATen ships; elsewhere it reads offsets on the host
#else
  return false;
#endif
}

bool aten_grouped_mm_usable(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out) {
  return aten_grouped_mm_usable(rows, w_in.size(1), w_in.size(2)) &&
         aten_grouped_mm_usable(rows, w_out.size(1), w_out.size(2));
}

Segments plan_segments(const at::Tensor& tokens_per_expert, const at::Tensor& rows, bool use_aten, const char* op) {
  Segments seg;
  seg.num_experts = tokens_per_expert.size(0);
  const bool on_host = tokens_per_expert.is_cpu();
  if (on_host) seg.host_counts = tokens_per_expert.to(at::kLong);
  if (use_aten) {
    seg.offsets = on_host ? offsets_on(seg.host_counts, rows.device()) : at::cumsum(tokens_per_expert, 0, at::kInt);
  } else if (!on_host) {
    seg.host_counts = counts_to_host(tokens_per_expert).to(at::kLong);
  }
  if (seg.host_counts.defined()) check_host_counts(seg.host_counts, rows.size(0), op);
  return seg;
}

Segments uniform_segments(int64_t num_experts, int64_t capacity) {
  Segments seg;
  seg.num_experts = num_experts;
  seg.capacity = capacity;
  return seg;
}

at::Tensor segment_mm(const at::Tensor& x, const at::Tensor& w, const Segments& seg) {
  const int64_t n = x.size(0), k = x.size(1), m = w.size(2);
  if (n == 0) return at::empty({0, m}, x.options());
  if (seg.capacity) {
    const int64_t c = *seg.capacity;
    return at::bmm(x.view({seg.num_experts, c, k}), w).view({n, m});
  }
  at::Tensor out;
  if (seg.offsets.defined()) {
    out = at::_grouped_mm(gemm_operand(x), gemm_operand(w), seg.offsets);
  } else {
    out = at::empty({n, m}, x.options());
    const int64_t* count = seg.host_counts.const_data_ptr<int64_t>();
    int64_t start = 0;
    for (int64_t e = 0; e < seg.num_experts; ++e) {
      if (count[e] > 0) {
        at::Tensor part = out.narrow(0, start, count[e]);
        at::mm_out(part, x.narrow(0, start, count[e]), w.select(0, e));
      }
      start += count[e];
    }
  }
  zero_rows_past(out, seg);
  return out;
}

at::Tensor segment_weight_grad(const at::Tensor& x, const at::Tensor& grad, const Segments& seg) {
  const int64_t k = x.size(1), m = grad.size(1);
  if (x.size(0) == 0) return at::zeros({seg.num_experts, k, m}, x.options());
  if (seg.capacity) {
    const int64_t c = *seg.capacity;
    return at::bmm(x.view({seg.num_experts, c, k}).transpose(1, 2), grad.view({seg.num_experts, c, m}));
  }
  if (seg.offsets.defined()) return at::_grouped_mm(gemm_operand(x.t()), gemm_operand(grad), seg.offsets);
  // Each expert's slice is written once: a product over zero rows writes zeros.
  at::Tensor out = at::empty({seg.num_experts, k, m}, x.options());
  const int64_t* count = seg.host_counts.const_data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < seg.num_experts; ++e) {
    at::Tensor slice = out.select(0, e);
    at::mm_out(slice, x.narrow(0, start, count[e]).t(), grad.narrow(0, start, count[e]));
    start += count[e];
  }
  return out;
}

}  // namespace moeflux
