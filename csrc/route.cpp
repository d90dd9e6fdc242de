// Front-end of the route op: argument checks, allocation, device dispatch.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "csrc/checks.h"
#include "csrc/kernels.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

void check_logits(const at::Tensor& logits, const char* op) {
  check_dim(logits, 2, op, "logits", "[num_tokens, num_experts]");
  check_float(logits, op, "logits");
  check_device_supported(logits, op, "logits");
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

std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t k, bool renormalize) {
  check_logits(logits, "route");
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= num_experts, "moeflux.route: k must be in [1, num_experts = ", num_experts, "], got ",
              k);
  const at::Tensor x = logits.contiguous();
  at::Tensor weights = at::empty({x.size(0), k}, x.options().dtype(accumulate_type(x.scalar_type())));
  at::Tensor expert_ids = at::empty({x.size(0), k}, x.options().dtype(at::kInt));
  if (x.size(0) > 0) {
    MOEFLUX_ON_DEVICE(x, route_forward, x, renormalize, weights, expert_ids);
  }
  return {weights, expert_ids};
}

at::Tensor route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                          const at::Tensor& expert_ids, bool renormalize) {
  check_logits(logits, "route_backward");
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
    MOEFLUX_ON_DEVICE(x, route_backward, grad_weights.to(acc).contiguous(), x, weights.contiguous(),
                      expert_ids.contiguous(), renormalize, grad_logits);
  }
  return grad_logits;
}

}  // namespace moeflux
