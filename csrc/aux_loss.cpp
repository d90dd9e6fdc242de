// Router auxiliary losses, written with ATen ops so that autograd, every
// device and torch.compile come for free (the work is O(T * E), small next to
// the O(T * H) token traffic).
//
//   load_balancing_loss = E * sum_e f_e * P_e     (Switch Transformer, GShard)
//     f_e: fraction of the T*k assignments that chose expert e (no gradient),
//     P_e: mean over tokens of softmax(logits)[e];
//     1 when the load and the probabilities are uniform, larger when both concentrate.
//   z_loss = mean_t logsumexp(logits[t])^2       (ST-MoE router z-loss)
#include <ATen/TensorOperators.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include "csrc/checks.h"
#include "csrc/ops.h"

namespace moeflux {

std::tuple<at::Tensor, at::Tensor> router_aux_loss(const at::Tensor& logits, const at::Tensor& expert_ids) {
  const char* op = "router_aux_loss";
  check_dim(logits, 2, op, "logits", "[num_tokens, num_experts]");
  check_float(logits, op, "logits");
  check_dim(expert_ids, 2, op, "expert_ids", "[num_tokens, k]");
  check_dtype(expert_ids, at::kInt, op, "expert_ids");
  check_same_device(expert_ids, logits, op, "expert_ids", "logits");
  check_size(expert_ids, 0, logits.size(0), op, "expert_ids", "logits.size(0)");

  const at::Tensor x = logits.to(accumulate_type(logits.scalar_type()));
  const int64_t num_tokens = x.size(0), num_experts = x.size(1);
  const double token_norm = static_cast<double>(std::max<int64_t>(num_tokens, 1));
  const double slot_norm = static_cast<double>(std::max<int64_t>(expert_ids.numel(), 1));

  const at::Tensor z_loss = at::logsumexp(x, {1}).square().sum() / token_norm;

  const at::Tensor mean_prob = at::softmax(x, 1).sum(0) / token_norm;
  const at::Tensor ids = expert_ids.reshape({-1}).to(at::kLong);
  const at::Tensor bin = at::where((ids < 0) | (ids >= num_experts), num_experts, ids);  // dropped: extra bin
  const at::Tensor counts = at::zeros({num_experts + 1}, bin.options()).scatter_add_(0, bin, at::ones_like(bin));
  const at::Tensor fraction = counts.narrow(0, 0, num_experts).to(x.scalar_type()) / slot_norm;
  const at::Tensor load_balancing_loss = (fraction * mean_prob).sum() * static_cast<double>(num_experts);
  return {load_balancing_loss, z_loss};
}

}  // namespace moeflux
