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
                           const at::Tensor& tokens_per_expert, const Activation& act,
                           std::optional<int64_t> capacity, const char* op) {
  const bool swiglu = act.gated();
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
  check_size(w_in, 2, swiglu ? 2 * ffn : ffn, op, "w_in", swiglu ? "2 * w_out.size(1) (gated)" : "w_out.size(1)");
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

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& w, const at::Tensor& rows, const char* op,
                const char* name) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == w.size(0) && bias->size(1) == w.size(2), "moeflux.", op, ": ",
              name, " must have shape [num_experts, out] = [", w.size(0), ", ", w.size(2), "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == rows.scalar_type(), "moeflux.", op, ": ", name, " must have the dtype of rows (",
              rows.scalar_type(), "), got ", bias->scalar_type());
  check_same_device(*bias, rows, op, name, "rows");
}

// The expert of each row (num_experts for rows past the last segment), from the counts on the rows' device:
// no host read. Host counts with device rows (the pipelined engine's) go up pinned and non-blocking: a
// pageable copy would wait for the stream.
at::Tensor row_experts(const at::Tensor& tokens_per_expert, const at::Tensor& rows, std::optional<int64_t> capacity) {
  const at::Tensor index = at::arange(rows.size(0), rows.options().dtype(at::kLong));
  if (capacity) return *capacity > 0 ? index.div(*capacity, "floor") : index;
  const bool upload = tokens_per_expert.is_cpu() && rows.is_cuda();
  const at::Tensor counts = upload ? tokens_per_expert.to(at::kLong).pin_memory() : tokens_per_expert;
  const at::Tensor ends = counts.to(rows.device(), at::kLong, /*non_blocking=*/upload).cumsum(0);
  return at::searchsorted(ends, index, /*out_int32=*/false, /*right=*/true);
}

// x[r] += bias[expert of r] (rows past the segments: nothing).
void add_expert_bias(at::Tensor& x, const at::Tensor& bias, const at::Tensor& experts) {
  const at::Tensor padded = at::cat({bias, at::zeros({1, bias.size(1)}, bias.options())});
  x.add_(padded.index_select(0, experts));
}

// The bias gradient: each expert's rows of `grad` summed, in float32 for half types (a bf16 running sum stops
// growing once its rounding step exceeds the addends).
at::Tensor expert_bias_grad(const at::Tensor& grad, const at::Tensor& experts, int64_t num_experts) {
  const bool half = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
  const at::Tensor g = half ? grad.to(at::kFloat) : grad;
  return at::zeros({num_experts + 1, grad.size(1)}, g.options())
      .index_add_(0, experts, g)
      .narrow(0, 0, num_experts)
      .to(grad.scalar_type());
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
                                                                  std::optional<int64_t> capacity,
                                                                  const std::optional<at::Tensor>& b_in,
                                                                  const std::optional<at::Tensor>& b_out) {
  const char* op = "expert_ffn";
  const Activation act = parse_activation(activation, op);
  check_expert_ffn_args(rows, w_in, w_out, tokens_per_expert, act, capacity, op);
  check_bias(b_in, w_in, rows, op, "b_in");
  check_bias(b_out, w_out, rows, op, "b_out");
  const Segments seg = ffn_segments(rows, w_in, w_out, tokens_per_expert, capacity, op);
  const bool biased = (b_in && b_in->defined()) || (b_out && b_out->defined());
  const at::Tensor experts = biased ? row_experts(tokens_per_expert, rows, capacity) : at::Tensor();
  at::Tensor h = segment_mm(rows, w_in, seg);
  if (b_in && b_in->defined()) add_expert_bias(h, *b_in, experts);
  at::Tensor a = activation_forward(h, act);
  at::Tensor y = segment_mm(a, w_out, seg);
  if (b_out && b_out->defined()) add_expert_bias(y, *b_out, experts);
  return {y, h, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward(
    const at::Tensor& grad_output, const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
    const at::Tensor& tokens_per_expert, const at::Tensor& pre_activation, const at::Tensor& activated,
    c10::string_view activation, std::optional<int64_t> capacity, bool biased) {
  const char* op = "expert_ffn_backward";
  const Activation act = parse_activation(activation, op);
  check_expert_ffn_args(rows, w_in, w_out, tokens_per_expert, act, capacity, op);
  TORCH_CHECK(grad_output.sizes() == rows.sizes(), "moeflux.expert_ffn_backward: grad_output must have the shape ",
              "of rows ", rows.sizes(), ", got ", grad_output.sizes());
  const Segments seg = ffn_segments(rows, w_in, w_out, tokens_per_expert, capacity, op);
  const at::Tensor grad = grad_output.contiguous();  // an expanded gradient (of a sum) has stride 0
  const at::Tensor grad_w_out = segment_weight_grad(activated, grad, seg);
  const at::Tensor grad_h = activation_backward(segment_mm(grad, w_out.transpose(1, 2), seg), pre_activation, act);
  const at::Tensor grad_w_in = segment_weight_grad(rows, grad_h, seg);
  at::Tensor grad_b_in = at::empty({0}, rows.options()), grad_b_out = at::empty({0}, rows.options());
  if (biased) {
    const at::Tensor experts = row_experts(tokens_per_expert, rows, capacity);
    grad_b_in = expert_bias_grad(grad_h, experts, w_in.size(0));
    grad_b_out = expert_bias_grad(grad, experts, w_in.size(0));
  }
  return {segment_mm(grad_h, w_in.transpose(1, 2), seg), grad_w_in, grad_w_out, grad_b_in, grad_b_out};
}

}  // namespace moeflux
