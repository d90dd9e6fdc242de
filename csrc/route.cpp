// Front-end of the route op: argument checks, allocation, then one device's kernels.
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>

#include "csrc/checks.h"
#include "csrc/kernels.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

void check_logits(const at::Tensor& logits, const char* op) {
  check_dim(logits, 2, op, "logits", "[num_tokens, num_experts]");
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.size(1) >= 1, "moeflux.", op, ": logits must have at least one expert column, got shape ",
              logits.sizes());
}

void check_routing(const at::Tensor& t, const at::Tensor& logits, int64_t k, const char* op, const char* name) {
  check_dim(t, 2, op, name, "[num_tokens, k]");
  check_same_device(t, logits, op, name, "logits");
  check_size(t, 0, logits.size(0), op, name, "logits.size(0)");
  check_size(t, 1, k, op, name, "k");
}

}  // namespace

namespace {

RouteOptions route_options(bool renormalize, c10::string_view scoring, double scale, const char* op) {
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid", "moeflux.", op,
              ": scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring), "'");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "moeflux.", op, ": scale must be a positive number, got ", scale);
  return RouteOptions{renormalize, scoring == "sigmoid", scale};
}

// DeepSeek's group-limited choice: experts are split into num_groups groups; a
// group's score is the sum of its group_score_top best scores (+ bias; all of
// them where a group has fewer): two in DeepSeek-V3, one (the maximum) in
// DeepSeek-V2. Only the experts of the top_groups best groups may be chosen.
// Returns allowed [T, E] (bool).
// Written with ATen ops: it is O(T * E) and only used when num_groups > 1.
at::Tensor allowed_experts(const at::Tensor& logits, const RouteOptions& options, const at::Tensor& bias,
                           int64_t num_groups, int64_t top_groups, int64_t group_score_top) {
  const at::Tensor x = logits.to(accumulate_type(logits.scalar_type()));
  at::Tensor choice = options.sigmoid ? x.sigmoid() : x.softmax(1);
  if (bias.defined()) choice = choice + bias;
  const int64_t per_group = x.size(1) / num_groups;
  const at::Tensor grouped = choice.view({x.size(0), num_groups, per_group});
  const at::Tensor group_score = std::get<0>(grouped.topk(std::min(group_score_top, per_group), -1)).sum(-1);
  // Ties go to the lower group (a stable sort), as they go to the lower expert in the top-k.
  const at::Tensor best = std::get<1>(group_score.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true))
                              .narrow(1, 0, top_groups);
  const at::Tensor mask = at::zeros_like(group_score, group_score.options().dtype(at::kBool))
                              .scatter_(1, best, true);
  return mask.unsqueeze(-1).expand({x.size(0), num_groups, per_group}).reshape({x.size(0), x.size(1)}).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> route(const DeviceKernels& kernels, const at::Tensor& logits, int64_t k,
                                         bool renormalize,
                                         c10::string_view scoring, const std::optional<at::Tensor>& expert_bias,
                                         int64_t num_groups, int64_t top_groups, double scale,
                                         int64_t group_score_top) {
  check_logits(logits, "route");
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= num_experts, "moeflux.route: k must be in [1, num_experts = ", num_experts, "], got ",
              k);
  const RouteOptions options = route_options(renormalize, scoring, scale, "route");
  const at::ScalarType acc = accumulate_type(logits.scalar_type());
  at::Tensor bias;
  if (expert_bias.has_value() && expert_bias->defined()) {
    check_float(*expert_bias, "route", "expert_bias");
    check_same_device(*expert_bias, logits, "route", "expert_bias", "logits");
    TORCH_CHECK(expert_bias->dim() == 1 && expert_bias->size(0) == num_experts, "moeflux.route: expert_bias must ",
                "have shape [num_experts = ", num_experts, "], got ", expert_bias->sizes());
    bias = expert_bias->to(acc).contiguous();
  }
  TORCH_CHECK(num_groups >= 1 && num_experts % num_groups == 0, "moeflux.route: num_groups must divide num_experts = ",
              num_experts, ", got ", num_groups);
  TORCH_CHECK(top_groups >= 1 && top_groups <= num_groups, "moeflux.route: top_groups must be in [1, num_groups = ",
              num_groups, "], got ", top_groups);
  TORCH_CHECK(k <= top_groups * (num_experts / num_groups), "moeflux.route: k = ", k, " exceeds the ",
              top_groups * (num_experts / num_groups), " experts of the top_groups = ", top_groups, " groups");
  TORCH_CHECK(group_score_top >= 1, "moeflux.route: group_score_top must be >= 1, got ", group_score_top);
  const at::Tensor x = logits.contiguous();
  at::Tensor weights = at::empty({x.size(0), k}, x.options().dtype(acc));
  at::Tensor expert_ids = at::empty({x.size(0), k}, x.options().dtype(at::kInt));
  if (x.size(0) > 0) {
    const at::Tensor allowed =
        num_groups > 1 ? allowed_experts(x, options, bias, num_groups, top_groups, group_score_top) : at::Tensor();
    kernels.route_forward(x, options, bias, allowed, weights, expert_ids);
  }
  return {weights, expert_ids};
}

at::Tensor route_backward(const DeviceKernels& kernels, const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                          const at::Tensor& expert_ids, bool renormalize, c10::string_view scoring, double scale) {
  check_logits(logits, "route_backward");
  const RouteOptions options = route_options(renormalize, scoring, scale, "route_backward");
  const int64_t k = expert_ids.dim() == 2 ? expert_ids.size(1) : -1;
  check_routing(expert_ids, logits, k, "route_backward", "expert_ids");
  check_dtype(expert_ids, at::kInt, "route_backward", "expert_ids");
  check_routing(weights, logits, k, "route_backward", "weights");
  check_routing(grad_weights, logits, k, "route_backward", "grad_weights");
  const at::ScalarType acc = accumulate_type(logits.scalar_type());
  check_dtype(weights, acc, "route_backward", "weights");
  const at::Tensor x = logits.contiguous();
  at::Tensor grad_logits = at::empty_like(x);
  if (x.size(0) > 0) {
    kernels.route_backward(grad_weights.to(acc).contiguous(), x, weights.contiguous(), expert_ids.contiguous(),
                           options, grad_logits);
  }
  return grad_logits;
}

}  // namespace moeflux
