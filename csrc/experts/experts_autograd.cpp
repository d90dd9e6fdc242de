// C++ autograd functions of grouped_mm and expert_ffn (registered at the Autograd key). Forward and backward
// call the ops through the dispatcher, so fake tensors and torch.compile see them like any ATen op.
//
// The counts: when the GEMMs must run per segment and the counts live on the rows' device, forward reads them
// on the host once (to_host, counted on the CPU too, where a GPU would synchronise) and passes the host copy to
// the op and, saved, to its backward, so backward never reads them again. Host counts with device rows are
// used as they are; where torch._grouped_mm does the work nothing is read on the host.
#include "csrc/autograd_function.h"
#include "csrc/experts/grouped_gemm.h"
#include "csrc/host_sync.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

using GroupedMmOp = decltype(grouped_mm);
using GroupedMmBackwardOp = decltype(grouped_mm_backward);
using ExpertFfnForwardOp = decltype(expert_ffn_forward);
using ExpertFfnBackwardOp = decltype(expert_ffn_backward);

at::Tensor counts_for_gemms(const at::Tensor& tokens_per_expert, const at::Tensor& rows, bool use_aten) {
  if (use_aten || tokens_per_expert.device() != rows.device()) return tokens_per_expert;
  return to_host(tokens_per_expert, "counts:expert_gemms");  // its dtype as given: the op checks it is Int
}

at::Tensor zeros_if_undefined(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

class GroupedMmFunction : public torch::autograd::Function<GroupedMmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& tokens_per_expert) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<GroupedMmOp>("moeflux::grouped_mm");
    const bool use_aten = input.dim() == 2 && weight.dim() == 3 &&
                          aten_grouped_mm_usable(input, weight.size(1), weight.size(2));
    const at::Tensor counts = counts_for_gemms(tokens_per_expert, input, use_aten);
    at::Tensor out = op.call(input, weight, counts);
    ctx->save_for_backward({input, weight, counts});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GroupedMmBackwardOp>("moeflux::grouped_mm_backward");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const at::Tensor grad = grads[0].defined()
                                ? grads[0]
                                : at::zeros({saved[0].size(0), saved[1].size(2)}, saved[0].options());
    auto [grad_input, grad_weight] = op.call(grad, saved[0], saved[1], saved[2], mask);
    return {grad_input, grad_weight, at::Tensor()};
  }
};

class ExpertFfnFunction : public torch::autograd::Function<ExpertFfnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rows, const at::Tensor& w_in,
                               const at::Tensor& w_out, const at::Tensor& tokens_per_expert,
                               c10::string_view activation, std::optional<int64_t> capacity,
                               const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<ExpertFfnForwardOp>("moeflux::expert_ffn_forward");
    const bool use_aten = capacity.has_value() || (rows.dim() == 2 && w_in.dim() == 3 && w_out.dim() == 3 &&
                                                   aten_grouped_mm_usable(rows, w_in, w_out));
    const at::Tensor counts = counts_for_gemms(tokens_per_expert, rows, use_aten);
    auto [out, pre_activation, activated] = op.call(rows, w_in, w_out, counts, activation, capacity, b_in, b_out);
    ctx->save_for_backward({rows, w_in, w_out, counts, pre_activation, activated});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["capacity"] = capacity;
    ctx->saved_data["has_b_in"] = b_in.has_value() && b_in->defined();
    ctx->saved_data["has_b_out"] = b_out.has_value() && b_out->defined();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<ExpertFfnBackwardOp>("moeflux::expert_ffn_backward");
    const auto s = ctx->get_saved_variables();
    const at::Tensor grad = zeros_if_undefined(grads[0], s[0]);
    const bool has_b_in = ctx->saved_data["has_b_in"].toBool(), has_b_out = ctx->saved_data["has_b_out"].toBool();
    auto [grad_rows, grad_w_in, grad_w_out, grad_b_in, grad_b_out] =
        op.call(grad, s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["activation"].toStringRef(),
                ctx->saved_data["capacity"].toOptional<int64_t>(), has_b_in || has_b_out);
    return {grad_rows, grad_w_in, grad_w_out, at::Tensor(), at::Tensor(), at::Tensor(),
            has_b_in ? grad_b_in : at::Tensor(), has_b_out ? grad_b_out : at::Tensor()};
  }
};

}  // namespace

at::Tensor grouped_mm_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert) {
  return GroupedMmFunction::apply(input, weight, tokens_per_expert)[0];
}

at::Tensor expert_ffn_autograd(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                               const at::Tensor& tokens_per_expert, c10::string_view activation,
                               std::optional<int64_t> capacity, const std::optional<at::Tensor>& b_in,
                               const std::optional<at::Tensor>& b_out) {
  return ExpertFfnFunction::apply(rows, w_in, w_out, tokens_per_expert, activation, capacity, b_in, b_out)[0];
}

// Below autograd (inference, or inside another function's backward): the forward op's output alone.
at::Tensor expert_ffn(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                      const at::Tensor& tokens_per_expert, c10::string_view activation,
                      std::optional<int64_t> capacity, const std::optional<at::Tensor>& b_in,
                      const std::optional<at::Tensor>& b_out) {
  static const auto op = find_op<ExpertFfnForwardOp>("moeflux::expert_ffn_forward");
  return std::get<0>(op.call(rows, w_in, w_out, tokens_per_expert, activation, capacity, b_in, b_out));
}

}  // namespace moeflux
