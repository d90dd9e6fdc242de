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

  // Sizes are read as tensors or SymInts, never as ints, so the op traces with
  // dynamic shapes (torch.compile); empty batches divide by 1 instead of 0.
  const at::Tensor x = logits.to(accumulate_type(logits.scalar_type()));
  const c10::SymInt num_experts = x.sym_size(1);
  const at::Tensor lse = at::logsumexp(x, {1});
  const at::Tensor num_tokens = at::ones_like(lse).sum().clamp_min(1);
  const at::Tensor z_loss = lse.square().sum() / num_tokens;

  const at::Tensor mean_prob = at::softmax(x, 1).sum(0) / num_tokens;
  const at::Tensor ids = expert_ids.reshape({-1}).to(at::kLong);
  const at::Tensor valid = (ids >= 0) & (ids < c10::Scalar(num_experts));  // dropped ids (-1) do not count
  const at::Tensor counts = at::zeros_symint({num_experts}, x.options())
                                .scatter_add_(0, at::where(valid, ids, 0), valid.to(x.scalar_type()));
  const at::Tensor num_slots = at::ones_like(ids, x.options()).sum().clamp_min(1);
  const at::Tensor load_balancing_loss = (counts / num_slots * mean_prob).sum() * at::ones_like(mean_prob).sum();
  return {load_balancing_loss, z_loss};
}

}  // namespace moeflux
