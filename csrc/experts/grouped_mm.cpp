// grouped_mm: out[rows of expert e] = input[rows of expert e] @ weight[e] over the contiguous per-expert
// segments of permute's output, and its backward (grouped_gemm.h says how the segments are run).
#include <array>

#include <ATen/ATen.h>

#include "csrc/checks.h"
#include "csrc/experts/grouped_gemm.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

void check_grouped_mm_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert,
                           const char* op) {
  check_dim(input, 2, op, "input", "[num_rows, in_features]");
  check_float(input, op, "input");
  check_dim(weight, 3, op, "weight", "[num_experts, in_features, out_features]");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "moeflux.", op, ": weight must have the dtype of input (",
              input.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(weight, input, op, "weight", "input");
  check_size(weight, 1, input.size(1), op, "weight", "input.size(1)");
  check_dim(tokens_per_expert, 1, op, "tokens_per_expert", "[num_experts]");
  check_dtype(tokens_per_expert, at::kInt, op, "tokens_per_expert");
  TORCH_CHECK(tokens_per_expert.device() == input.device() || tokens_per_expert.is_cpu(), "moeflux.", op,
              ": tokens_per_expert must be on input's device (", input.device(), ") or on the CPU, got ",
              tokens_per_expert.device());
  check_size(tokens_per_expert, 0, weight.size(0), op, "tokens_per_expert", "weight.size(0)");
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert) {
  check_grouped_mm_args(input, weight, tokens_per_expert, "grouped_mm");
  const bool use_aten = aten_grouped_mm_usable(input, weight.size(1), weight.size(2));
  return segment_mm(input, weight, plan_segments(tokens_per_expert, input, use_aten, "grouped_mm"));
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& tokens_per_expert,
                                                       std::array<bool, 2> output_mask) {
  const char* op = "grouped_mm_backward";
  check_grouped_mm_args(input, weight, tokens_per_expert, op);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == input.size(0) && grad_output.size(1) == weight.size(2),
              "moeflux.grouped_mm_backward: grad_output must be [", input.size(0), ", ", weight.size(2), "], got ",
              grad_output.sizes());
  const bool use_aten = aten_grouped_mm_usable(input, weight.size(1), weight.size(2));
  const Segments seg = plan_segments(tokens_per_expert, input, use_aten, op);
  const at::Tensor grad = grad_output.contiguous();  // an expanded gradient (of a sum) has stride 0
  at::Tensor grad_input, grad_weight;
  if (output_mask[0]) grad_input = segment_mm(grad, weight.transpose(1, 2), seg);
  if (output_mask[1]) grad_weight = segment_weight_grad(input, grad, seg);
  return {grad_input, grad_weight};
}

}  // namespace moeflux
