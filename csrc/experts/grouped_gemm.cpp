#include "csrc/experts/grouped_gemm.h"

#include <algorithm>
#include <atomic>

#include <ATen/ATen.h>

#ifdef MOEFLUX_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

#include "csrc/cpu/workspace.h"
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

// Checks the counts against the rows; returns the rows they span.
int64_t check_host_counts(const at::Tensor& host_counts, int64_t num_rows, const char* op) {
  const int64_t* count = host_counts.const_data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < host_counts.numel(); ++e) {
    TORCH_CHECK(count[e] >= 0 && start + count[e] <= num_rows, "moeflux.", op, ": tokens_per_expert must be >= 0 ",
                "and sum to at most input.size(0) = ", num_rows, ", got ", count[e], " rows for expert ", e,
                " after ", start);
    start += count[e];
  }
  return start;
}

// On the CPU torch._grouped_mm is itself one mm per group, into an output it allocates afresh each call; the
// per-segment path runs the same GEMMs into workspace buffers, without the page faults (measured ~10% of a
// layer step, benchmarks/RESULTS.md), so it is the default there. Tests switch to cover both.
std::atomic<bool> cpu_uses_aten_grouped_mm{false};

}  // namespace

void set_cpu_grouped_mm_backend(bool aten) { cpu_uses_aten_grouped_mm = aten; }

at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::workspace_empty(sizes, options) : at::empty(sizes, options);
}

bool aten_grouped_mm_usable(const at::Tensor& rows, int64_t k_dim, int64_t n_dim) {
  const at::ScalarType t = rows.scalar_type();
  // Its row strides must be multiples of 16 bytes, on every device.
  const int64_t bytes = static_cast<int64_t>(c10::elementSize(t));
  if ((k_dim * bytes) % 16 != 0 || (n_dim * bytes) % 16 != 0) return false;
  if (rows.is_cpu()) return cpu_uses_aten_grouped_mm && (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf);
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
    seg.host_counts = to_host(tokens_per_expert, "counts:expert_gemms").to(at::kLong);
  }
  if (seg.host_counts.defined()) {
    seg.used_rows = check_host_counts(seg.host_counts, rows.size(0), op);
  }
  return seg;
}

Segments capacity_segments(const at::Tensor& tokens_per_expert, int64_t capacity, const char* op) {
  Segments seg;
  seg.num_experts = tokens_per_expert.size(0);
  seg.capacity = capacity;
  seg.used_rows = seg.num_experts * capacity;
  if (tokens_per_expert.is_cpu()) {
    seg.host_counts = tokens_per_expert.to(at::kLong);
    const int64_t* count = seg.host_counts.const_data_ptr<int64_t>();
    for (int64_t e = 0; e < seg.num_experts; ++e) {
      TORCH_CHECK(count[e] >= 0 && count[e] <= capacity, "moeflux.", op, ": with capacity ", capacity,
                  " tokens_per_expert must be in [0, ", capacity, "], got ", count[e], " for expert ", e);
    }
  }
  return seg;
}

namespace {

// f(e, first row, rows) for each segment that is known on the host: packed one after another, or with a
// capacity at e * capacity (rows past the count up to the capacity are padding).
template <typename F>
void for_each_segment(const Segments& seg, F&& f) {
  const int64_t* count = seg.host_counts.const_data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < seg.num_experts; ++e) {
    f(e, seg.capacity ? e * *seg.capacity : start, count[e]);
    start += count[e];
  }
}

}  // namespace

at::Tensor segment_mm(const at::Tensor& x, const at::Tensor& w, const Segments& seg) {
  const int64_t n = x.size(0), k = x.size(1), m = w.size(2);
  if (n == 0) return at::empty({0, m}, x.options());
  if (seg.capacity && !seg.host_counts.defined()) {
    return at::bmm(x.view({seg.num_experts, *seg.capacity, k}), w).view({n, m});
  }
  if (seg.offsets.defined()) {
    at::Tensor out = at::_grouped_mm(gemm_operand(x), gemm_operand(w), seg.offsets);
    if (seg.used_rows >= 0 && seg.used_rows < n) out.narrow(0, seg.used_rows, n - seg.used_rows).zero_();
    return out;
  }
  // Only the rows that hold tokens are multiplied; padding and rows past the last segment are zeroed.
  at::Tensor out = new_buffer({n, m}, x.options());
  int64_t covered = 0;
  for_each_segment(seg, [&](int64_t e, int64_t first, int64_t rows) {
    if (rows > 0) {
      at::Tensor part = out.narrow(0, first, rows);
      at::mm_out(part, x.narrow(0, first, rows), w.select(0, e));
    }
    const int64_t end = seg.capacity ? first + *seg.capacity : first + rows;
    if (end > first + rows) out.narrow(0, first + rows, end - first - rows).zero_();
    covered = end;
  });
  if (covered < n) out.narrow(0, covered, n - covered).zero_();
  return out;
}

at::Tensor segment_weight_grad(const at::Tensor& x, const at::Tensor& grad, const Segments& seg) {
  const int64_t k = x.size(1), m = grad.size(1);
  if (x.size(0) == 0) return at::zeros({seg.num_experts, k, m}, x.options());
  if (seg.capacity && !seg.host_counts.defined()) {
    const int64_t c = *seg.capacity;
    return at::bmm(x.view({seg.num_experts, c, k}).transpose(1, 2), grad.view({seg.num_experts, c, m}));
  }
  if (seg.offsets.defined()) return at::_grouped_mm(gemm_operand(x.t()), gemm_operand(grad), seg.offsets);
  // Each expert's slice is written once: a product over zero rows writes zeros.
  at::Tensor out = new_buffer({seg.num_experts, k, m}, x.options());
  for_each_segment(seg, [&](int64_t e, int64_t first, int64_t rows) {
    at::Tensor slice = out.select(0, e);
    at::mm_out(slice, x.narrow(0, first, rows).t(), grad.narrow(0, first, rows));
  });
  return out;
}

}  // namespace moeflux
