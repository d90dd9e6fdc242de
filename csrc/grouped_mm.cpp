// grouped_mm: out[rows of expert e] = input[rows of expert e] @ weight[e], over
// the contiguous per-expert segments that permute produces. Rows past the last
// segment are zero on the per-expert path and left unwritten by
// torch._grouped_mm: callers must not read them. Built from ATen ops (CompositeImplicitAutograd), so its
// gradient is ATen's: torch._grouped_mm where the hardware has it, else one
// matmul per expert.
#include <vector>

#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#ifdef MOEFLUX_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

#include "csrc/checks.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

// torch._grouped_mm runs on Hopper and newer, in bfloat16, with 16-byte aligned rows.
bool can_use_grouped_mm_kernel(const at::Tensor& input, const at::Tensor& weight) {
#ifdef MOEFLUX_WITH_CUDA
  if (!input.is_cuda() || input.scalar_type() != at::kBFloat16) return false;
  if (input.size(1) % 8 != 0 || weight.size(2) % 8 != 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, input.device().index()));
  return major >= 9;
#else
  return false;
#endif
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert) {
  const char* op = "grouped_mm";
  check_dim(input, 2, op, "input", "[num_rows, in_features]");
  check_float(input, op, "input");
  check_dim(weight, 3, op, "weight", "[num_experts, in_features, out_features]");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "moeflux.grouped_mm: weight must have the dtype of input (",
              input.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(weight, input, op, "weight", "input");
  check_size(weight, 1, input.size(1), op, "weight", "input.size(1)");
  check_dim(tokens_per_expert, 1, op, "tokens_per_expert", "[num_experts]");
  check_dtype(tokens_per_expert, at::kInt, op, "tokens_per_expert");
  check_same_device(tokens_per_expert, input, op, "tokens_per_expert", "input");
  check_size(tokens_per_expert, 0, weight.size(0), op, "tokens_per_expert", "weight.size(0)");

  const int64_t num_rows = input.size(0), out_features = weight.size(2);
  if (can_use_grouped_mm_kernel(input, weight)) {
    const at::Tensor offsets = at::cumsum(tokens_per_expert, 0, at::kInt);
    return at::_grouped_mm(input, weight, offsets);
  }

  // One matmul per expert; the segment sizes must be known on the host. Experts
  // without rows still get their (empty) matmul, so the output depends on
  // every weight and on the input: their gradients are zeros rather than
  // missing, and backward always reaches the ops upstream (under expert
  // parallelism every rank must take part in the backward all-to-alls).
  const at::Tensor counts = tokens_per_expert.to(at::kCPU, at::kLong);
  const int64_t* count = counts.const_data_ptr<int64_t>();
  std::vector<at::Tensor> pieces;
  int64_t start = 0;
  for (int64_t e = 0; e < weight.size(0); ++e) {
    TORCH_CHECK(count[e] >= 0 && start + count[e] <= num_rows, "moeflux.grouped_mm: tokens_per_expert must be >= 0 ",
                "and sum to at most input.size(0) = ", num_rows, ", got ", count[e], " rows for expert ", e,
                " after ", start);
    pieces.push_back(at::mm(input.narrow(0, start, count[e]), weight.select(0, e)));
    start += count[e];
  }
  if (start < num_rows) pieces.push_back(at::zeros({num_rows - start, out_features}, input.options()));
  return pieces.size() == 1 ? pieces.front() : at::cat(pieces);
}

}  // namespace moeflux
