// expert_ffn: the experts' two-layer FFN over rows grouped by expert (GroupedExperts' math), as one op with
// its own backward: two grouped GEMMs around the activation forward, and in backward the four GEMMs and the
// activation's gradient, each output written once (no per-expert zero fill, no chunk/cat copies).
//   forward:  h = x @ w_in[e];  a = act(h);  y = a @ w_out[e]          (per segment e)
//   backward: da = dy @ w_out[e]^T;  dw_out[e] = a^T dy;  dh = act'(h, da);
//             dx = dh @ w_in[e]^T;  dw_in[e] = x^T dh
// h and a are outputs of the forward op so that the autograd function can save them.
#include <ATen/ATen.h>

#include "csrc/checks.h"
#include "csrc/experts/activation.h"
#include "csrc/experts/grouped_gemm.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

void check_expert_ffn_args(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                           const at::Tensor& tokens_per_expert, bool swiglu, std::optional<int64_t> capacity,
                           const char* op) {
  check_dim(rows, 2, op, "rows", "[num_rows, hidden]");
  check_float(rows, op, "rows");
  check_dim(w_in, 3, op, "w_in", "[num_experts, hidden, ffn_in]");
  check_dim(w_out, 3, op, "w_out", "[num_experts, ffn, hidden]");
  for (const auto& [w, name] : {std::pair{&w_in, "w_in"}, std::pair{&w_out, "w_out"}}) {
    TORCH_CHECK(w->scalar_type() == rows.scalar_type(), "moeflux.", op, ": ", name, " must have the dtype of rows (",
                rows.scalar_type(), "), got ", w->scalar_type());
    check_same_device(*w, rows, op, name, "rows");
  }
  const int64_t experts = w_in.size(0), hidden = rows.size(1), ffn = w_out.size(1);
  check_size(w_in, 1, hidden, op, "w_in", "rows.size(1)");
  check_size(w_out, 0, experts, op, "w_out", "w_in.size(0)");
  check_size(w_out, 2, hidden, op, "w_out", "rows.size(1)");
  check_size(w_in, 2, swiglu ? 2 * ffn : ffn, op, "w_in", swiglu ? "2 * w_out.size(1) (swiglu)" : "w_out.size(1)");
  check_dim(tokens_per_expert, 1, op, "tokens_per_expert", "[num_experts]");
  check_dtype(tokens_per_expert, at::kInt, op, "tokens_per_expert");
  TORCH_CHECK(tokens_per_expert.device() == rows.device() || tokens_per_expert.is_cpu(), "moeflux.", op,
              ": tokens_per_expert must be on rows' device (", rows.device(), ") or on the CPU, got ",
              tokens_per_expert.device());
  check_size(tokens_per_expert, 0, experts, op, "tokens_per_expert", "w_in.size(0)");
  if (capacity) {
    TORCH_CHECK(*capacity >= 0 && rows.size(0) == experts * *capacity, "moeflux.", op, ": with capacity ", *capacity,
                " rows must hold num_experts * capacity = ", experts * *capacity, " rows, got ", rows.size(0));
  }
}

Segments ffn_segments(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                      const at::Tensor& tokens_per_expert, std::optional<int64_t> capacity, const char* op) {
  if (capacity) return capacity_segments(tokens_per_expert, *capacity, op);
  return plan_segments(tokens_per_expert, rows, aten_grouped_mm_usable(rows, w_in, w_out), op);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_forward(const at::Tensor& rows, const at::Tensor& w_in,
                                                                  const at::Tensor& w_out,
                                                                  const at::Tensor& tokens_per_expert,
                                                                  c10::string_view activation,
                                                                  std::optional<int64_t> capacity) {
  const char* op = "expert_ffn";
  const bool swiglu = is_swiglu(activation, op);
  check_expert_ffn_args(rows, w_in, w_out, tokens_per_expert, swiglu, capacity, op);
  const Segments seg = ffn_segments(rows, w_in, w_out, tokens_per_expert, capacity, op);
  at::Tensor h = segment_mm(rows, w_in, seg);
  at::Tensor a = activation_forward(h, swiglu);
  return {segment_mm(a, w_out, seg), h, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward(
    const at::Tensor& grad_output, const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
    const at::Tensor& tokens_per_expert, const at::Tensor& pre_activation, const at::Tensor& activated,
    c10::string_view activation, std::optional<int64_t> capacity) {
  const char* op = "expert_ffn_backward";
  const bool swiglu = is_swiglu(activation, op);
  check_expert_ffn_args(rows, w_in, w_out, tokens_per_expert, swiglu, capacity, op);
  TORCH_CHECK(grad_output.sizes() == rows.sizes(), "moeflux.expert_ffn_backward: grad_output must have the shape ",
              "of rows ", rows.sizes(), ", got ", grad_output.sizes());
  const Segments seg = ffn_segments(rows, w_in, w_out, tokens_per_expert, capacity, op);
  const at::Tensor grad = grad_output.contiguous();  // an expanded gradient (of a sum) has stride 0
  const at::Tensor grad_w_out = segment_weight_grad(activated, grad, seg);
  const at::Tensor grad_h = activation_backward(segment_mm(grad, w_out.transpose(1, 2), seg), pre_activation, swiglu);
  const at::Tensor grad_w_in = segment_weight_grad(rows, grad_h, seg);
  return {segment_mm(grad_h, w_in.transpose(1, 2), seg), grad_w_in, grad_w_out};
}

}  // namespace moeflux
