// Grouped GEMMs over per-expert segments of rows: the building blocks of
// grouped_mm and expert_ffn, forward and backward.
//
// Rows of expert e are the counts[e] rows after those of experts < e
// (permute's and dispatch's layout). Three ways to run them:
//   torch._grouped_mm  where ATen has a kernel for it (CUDA: bfloat16 on
//                      Hopper/Blackwell, rows a multiple of 16 bytes wide in
//                      every operand); takes device offsets, so it never reads
//                      the counts on the host;
//   per-segment mm     elsewhere (the CPU, where the counts are on the host
//                      anyway; float64; CUDA without the fast kernel) into
//                      workspace buffers;
//   bmm                with a capacity: every expert owns `capacity` rows.
// Outputs and weight gradients are written once; experts without rows get
// zero weight gradients without a zero fill of the whole weight.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace moeflux {

struct Segments {
  int64_t num_experts = 0;
  std::optional<int64_t> capacity;  // set: expert e owns rows [e * capacity, (e + 1) * capacity)
  at::Tensor offsets;               // int32 [E] segment ends on the rows' device: torch._grouped_mm does the work
  at::Tensor host_counts;           // int64 [E] on the host, when known there (always for the per-segment path)
  int64_t used_rows = -1;           // rows the segments span, when known on the host
};

// CPU only: run the GEMMs in torch._grouped_mm (true) or per segment into workspace buffers (false, the
// default: faster there; see grouped_gemm.cpp). For tests and benchmarks.
void set_cpu_grouped_mm_backend(bool aten);

// Whether torch._grouped_mm can multiply rows [N, k_dim] of `rows`' device and dtype by [E, k_dim, n_dim].
bool aten_grouped_mm_usable(const at::Tensor& rows, int64_t k_dim, int64_t n_dim);

// Whether the grouped GEMMs of an expert FFN (`rows` [N, H] -> [N, F_in], [N, F] -> [N, H]) can all run in
// torch._grouped_mm; when one cannot, all run per segment.
bool aten_grouped_mm_usable(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out);

// The segments of `tokens_per_expert` (int32 [E], on the rows' device or on the host) for GEMMs that
// torch._grouped_mm can (use_aten) or cannot do. Reads the counts on the host (to_host) only when they
// are on a device and it cannot. Checks them against rows.size(0) when they are on the host.
Segments plan_segments(const at::Tensor& tokens_per_expert, const at::Tensor& rows, bool use_aten, const char* op);
// With a capacity: counts on the host (the CPU) let the GEMMs skip each expert's padding; counts on a device
// are not read (batched matmuls over the padded rows, no host synchronisation).
Segments capacity_segments(const at::Tensor& tokens_per_expert, int64_t capacity, const char* op);

// An uninitialised contiguous buffer; on the CPU from the workspace pool (cpu/workspace.h).
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// out[segment e] = x[segment e] @ w[e]; x [N, K], w [E, K, M] (any strides). Padding and rows past the last
// segment are zero when the segments are known on the host, unspecified otherwise.
at::Tensor segment_mm(const at::Tensor& x, const at::Tensor& w, const Segments& seg);

// The weight gradient of segment_mm: grad_w[e] = x[segment e]^T @ grad[segment e], [E, K, M].
at::Tensor segment_weight_grad(const at::Tensor& x, const at::Tensor& grad, const Segments& seg);

}  // namespace moeflux
