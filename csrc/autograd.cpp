// C++ autograd functions of the differentiable ops, registered at the Autograd
// dispatch key. Forward redispatches below autograd to the CPU / CUDA kernel;
// backward calls other moeflux ops through the dispatcher, so fake tensors,
// torch.compile and profiling see them like any ATen op.
#include "csrc/autograd_function.h"
#include "csrc/ops.h"
#include "csrc/profiling/comm_stats.h"

namespace moeflux {
namespace {

// The ops' signatures as the dispatcher calls them (the Autograd kernels have the same ones).
using RouteOp = decltype(route_autograd);
using PermuteOp = decltype(permute_autograd);
using UnpermuteOp = decltype(unpermute_autograd);
using RouteBackwardOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                   c10::string_view, double);
using UnpermuteBackwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const std::optional<at::Tensor>&);

class RouteFunction : public torch::autograd::Function<RouteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, bool renormalize,
                               c10::string_view scoring, const std::optional<at::Tensor>& expert_bias,
                               int64_t num_groups, int64_t top_groups, double scale, int64_t group_score_top) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<RouteOp>("moeflux::route");
    auto [weights, expert_ids] = op.call(logits, k, renormalize, scoring, expert_bias, num_groups, top_groups, scale,
                                               group_score_top);
    ctx->save_for_backward({logits, weights, expert_ids});
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scoring"] = std::string(scoring);
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({expert_ids});
    return {weights, expert_ids};
  }

  // The expert bias and the group limit only steer the choice: no gradient flows through them.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<RouteBackwardOp>("moeflux::route_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (grads[0].defined()) {
      grad_logits = op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["renormalize"].toBool(),
                            ctx->saved_data["scoring"].toStringRef(), ctx->saved_data["scale"].toDouble());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& expert_ids,
                               int64_t num_experts, std::optional<int64_t> capacity) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<PermuteOp>("moeflux::permute");
    auto [permuted, tokens_per_expert, row_map] = op.call(tokens, expert_ids, num_experts, capacity);
    ctx->save_for_backward({row_map});
    ctx->mark_non_differentiable({tokens_per_expert, row_map});
    return {permuted, tokens_per_expert, row_map};
  }

  // d tokens[t] = sum_j d permuted[row_map[t, j]]: an unweighted unpermute.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<UnpermuteOp>("moeflux::unpermute");
    at::Tensor grad_tokens;
    if (grads[0].defined()) grad_tokens = op.call(grads[0], ctx->get_saved_variables()[0], std::nullopt);
    return {grad_tokens, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class UnpermuteFunction : public torch::autograd::Function<UnpermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rows, const at::Tensor& row_map,
                               const std::optional<at::Tensor>& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<UnpermuteOp>("moeflux::unpermute");
    at::Tensor out = op.call(rows, row_map, weights);
    const bool weighted = weights.has_value() && weights->defined();
    ctx->save_for_backward({rows, row_map, weighted ? *weights : at::Tensor()});
    return {out};
  }

  // d rows[row_map[t, j]] = w[t, j] * d out[t]; d w[t, j] = <d out[t], rows[row_map[t, j]]>.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<UnpermuteBackwardOp>("moeflux::unpermute_backward");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> weights = saved[2].defined() ? std::optional(saved[2]) : std::nullopt;
    auto [grad_rows, grad_weights] = op.call(grads[0], saved[0], saved[1], weights);
    return {grad_rows, at::Tensor(), weights ? grad_weights : at::Tensor()};
  }
};

class AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::IntArrayRef output_split_sizes,
                               at::IntArrayRef input_split_sizes, const std::string& group_name, bool agree_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<decltype(all_to_all)>("moeflux::all_to_all");
    ctx->saved_data["output_split_sizes"] = output_split_sizes.vec();
    ctx->saved_data["input_split_sizes"] = input_split_sizes.vec();
    ctx->saved_data["group_name"] = group_name;
    return {op.call(input, output_split_sizes, input_split_sizes, group_name, agree_first)};
  }

  // The gradient travels back the same way: the all-to-all with the splits swapped (which forward's agreement,
  // or the caller, already checked: no agreement again).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<decltype(all_to_all)>("moeflux::all_to_all");
    const auto out_splits = ctx->saved_data["output_split_sizes"].toIntVector();
    const auto in_splits = ctx->saved_data["input_split_sizes"].toIntVector();
    const std::string group = ctx->saved_data["group_name"].toStringRef();
    return {op.call(grads[0], in_splits, out_splits, group, false), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class DispatchFunction : public torch::autograd::Function<DispatchFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& expert_ids,
                               int64_t num_experts, std::optional<int64_t> capacity, const std::string& group_name,
                               const std::optional<at::Tensor>& routing_counts, bool agree_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<decltype(dispatch)>("moeflux::dispatch");
    auto [rows, tokens_per_local_expert, row_map, regroup_map, send_splits, recv_splits] =
        op.call(tokens, expert_ids, num_experts, capacity, group_name, routing_counts, agree_first);
    ctx->save_for_backward({row_map, regroup_map, send_splits, recv_splits});
    ctx->saved_data["group_name"] = group_name;
    ctx->saved_data["layer"] = comm_stats::current_layer();
    ctx->mark_non_differentiable({tokens_per_local_expert, row_map, regroup_map, send_splits, recv_splits});
    return {rows, tokens_per_local_expert, row_map, regroup_map, send_splits, recv_splits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<decltype(dispatch_backward)>("moeflux::dispatch_backward");
    const auto saved = ctx->get_saved_variables();
    const comm_stats::LayerScope layer(ctx->saved_data["layer"].toStringRef());
    // Gradients are materialised (zeros for unused outputs), so every rank takes part in the all-to-all.
    const at::Tensor grad_tokens =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["group_name"].toStringRef());
    return {grad_tokens, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// FasterMoE's shadows: the owners' expert rows on every rank; the gradient of every rank's copy is summed
// onto the owner (reduce_expert_rows), so shadowed experts learn exactly what they would have unshadowed.
class BroadcastExpertRowsFunction : public torch::autograd::Function<BroadcastExpertRowsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& local, at::IntArrayRef positions,
                               const std::string& group_name, bool agree_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<decltype(broadcast_expert_rows)>("moeflux::broadcast_expert_rows");
    ctx->saved_data["positions"] = positions.vec();
    ctx->saved_data["local_experts"] = local.size(0);
    ctx->saved_data["group_name"] = group_name;
    ctx->saved_data["layer"] = comm_stats::current_layer();
    return {op.call(local, positions, group_name, agree_first)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<decltype(reduce_expert_rows)>("moeflux::reduce_expert_rows");
    const comm_stats::LayerScope layer(ctx->saved_data["layer"].toStringRef());
    const auto positions = ctx->saved_data["positions"].toIntVector();
    return {op.call(grads[0].contiguous(), positions, ctx->saved_data["local_experts"].toInt(),
                    ctx->saved_data["group_name"].toStringRef()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class CombineFunction : public torch::autograd::Function<CombineFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& expert_out, const at::Tensor& row_map,
                               const at::Tensor& regroup_map, const at::Tensor& send_splits,
                               const at::Tensor& recv_splits, const std::optional<at::Tensor>& weights,
                               const std::string& group_name) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<decltype(combine)>("moeflux::combine");
    auto [output, returned] = op.call(expert_out, row_map, regroup_map, send_splits, recv_splits, weights, group_name);
    const bool weighted = weights.has_value() && weights->defined();
    ctx->save_for_backward({returned, row_map, regroup_map, send_splits, recv_splits,
                            weighted ? *weights : at::Tensor()});
    ctx->saved_data["group_name"] = group_name;
    ctx->saved_data["layer"] = comm_stats::current_layer();
    ctx->mark_non_differentiable({returned});
    return {output, returned};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<decltype(combine_backward)>("moeflux::combine_backward");
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> weights = saved[5].defined() ? std::optional(saved[5]) : std::nullopt;
    const comm_stats::LayerScope layer(ctx->saved_data["layer"].toStringRef());
    auto [grad_expert_out, grad_weights] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                                   weights, ctx->saved_data["group_name"].toStringRef());
    return {grad_expert_out, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            weights ? grad_weights : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor broadcast_expert_rows_autograd(const at::Tensor& local, at::IntArrayRef positions,
                                          const std::string& group_name, bool agree_first) {
  return BroadcastExpertRowsFunction::apply(local, positions, group_name, agree_first)[0];
}

at::Tensor all_to_all_autograd(const at::Tensor& input, at::IntArrayRef output_split_sizes,
                               at::IntArrayRef input_split_sizes, const std::string& group_name, bool agree_first) {
  return AllToAllFunction::apply(input, output_split_sizes, input_split_sizes, group_name, agree_first)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_autograd(
    const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts, std::optional<int64_t> capacity,
    const std::string& group_name, const std::optional<at::Tensor>& routing_counts, bool agree_first) {
  auto out = DispatchFunction::apply(tokens, expert_ids, num_experts, capacity, group_name, routing_counts,
                                     agree_first);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

std::tuple<at::Tensor, at::Tensor> combine_autograd(const at::Tensor& expert_out, const at::Tensor& row_map,
                                                    const at::Tensor& regroup_map, const at::Tensor& send_splits,
                                                    const at::Tensor& recv_splits,
                                                    const std::optional<at::Tensor>& weights,
                                                    const std::string& group_name) {
  auto out = CombineFunction::apply(expert_out, row_map, regroup_map, send_splits, recv_splits, weights, group_name);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> route_autograd(const at::Tensor& logits, int64_t k, bool renormalize,
                                                  c10::string_view scoring,
                                                  const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
                                                  int64_t top_groups, double scale, int64_t group_score_top) {
  auto out = RouteFunction::apply(logits, k, renormalize, scoring, expert_bias, num_groups, top_groups, scale,
                                  group_score_top);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_autograd(const at::Tensor& tokens,
                                                                const at::Tensor& expert_ids, int64_t num_experts,
                                                                std::optional<int64_t> capacity) {
  auto out = PermuteFunction::apply(tokens, expert_ids, num_experts, capacity);
  return {out[0], out[1], out[2]};
}

at::Tensor unpermute_autograd(const at::Tensor& rows, const at::Tensor& row_map,
                              const std::optional<at::Tensor>& weights) {
  return UnpermuteFunction::apply(rows, row_map, weights)[0];
}

}  // namespace moeflux
