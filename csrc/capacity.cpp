// apply_capacity: drop the assignments that do not fit an expert's capacity.
// Works on index tensors of T*k entries, so it is written once for every
// device with ATen ops (stable sorts and scatters, no host synchronisation).
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/max.h>
#include <ATen/ops/min.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include "csrc/checks.h"
#include "csrc/ops.h"

namespace moeflux {

at::Tensor apply_capacity(const at::Tensor& expert_ids, const at::Tensor& weights, int64_t num_experts,
                          int64_t capacity, bool drop_by_probability) {
  const char* op = "apply_capacity";
  check_dim(expert_ids, 2, op, "expert_ids", "[num_tokens, k]");
  check_dtype(expert_ids, at::kInt, op, "expert_ids");
  check_float(weights, op, "weights");
  check_same_device(weights, expert_ids, op, "weights", "expert_ids");
  TORCH_CHECK(weights.sizes() == expert_ids.sizes(), "moeflux.apply_capacity: weights must have the shape of ",
              "expert_ids ", expert_ids.sizes(), ", got ", weights.sizes());
  check_num_experts(num_experts, "apply_capacity");
  TORCH_CHECK(capacity >= 0, "moeflux.apply_capacity: capacity must be >= 0, got ", capacity);
  if (expert_ids.numel() == 0) return expert_ids.clone();
  check_ids_in_range(expert_ids, num_experts, op);

  // Priority order of the assignments. By position (GShard): every token's
  // first choice before any second choice, tokens in order, i.e. slot-major.
  // By probability: highest weight first (ties by position).
  const at::Tensor ids = expert_ids.t().reshape({-1}).to(at::kLong);  // slot-major
  at::Tensor order = at::arange(ids.numel(), ids.options());
  if (drop_by_probability) {
    order = std::get<1>(at::sort(weights.t().reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  }
  // Stable sort of the priority order by expert: rank within an expert = its
  // position minus the expert's first position. Dropped ids (-1) sort last.
  const at::Tensor ordered_ids = ids.index_select(0, order);
  const at::Tensor key = at::where((ordered_ids < 0) | (ordered_ids >= num_experts), num_experts, ordered_ids);
  const auto [sorted_key, by_expert] = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor counts = at::zeros({num_experts + 1}, key.options()).scatter_add_(0, key, at::ones_like(key));
  const at::Tensor first = at::cumsum(counts, 0) - counts;
  const at::Tensor rank = at::arange(key.numel(), key.options()) - first.index_select(0, sorted_key);
  const at::Tensor kept_sorted = (rank < capacity) & (sorted_key < num_experts);

  // Back to slot-major order, then to [num_tokens, k].
  const at::Tensor slot = order.index_select(0, by_expert);
  at::Tensor kept = at::empty_like(slot).scatter_(0, slot, kept_sorted.to(at::kLong));
  kept = kept.view({expert_ids.size(1), expert_ids.size(0)}).t();
  return at::where(kept.to(at::kBool), expert_ids, -1).contiguous();
}

}  // namespace moeflux
