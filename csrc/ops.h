// The ops of torch.ops.moeflux, as C++ functions. Schemas and dispatch keys
// are in registration.cpp; the contracts are in docs/design.md.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace moeflux {

// ---- gate
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t k, bool renormalize);
at::Tensor route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                          const at::Tensor& expert_ids, bool renormalize);
std::tuple<at::Tensor, at::Tensor> router_aux_loss(const at::Tensor& logits, const at::Tensor& expert_ids);
at::Tensor apply_capacity(const at::Tensor& expert_ids, const at::Tensor& weights, int64_t num_experts,
                          int64_t capacity, bool drop_by_probability);

// ---- scatter / gather
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& tokens, const at::Tensor& expert_ids,
                                                       int64_t num_experts, std::optional<int64_t> capacity);
at::Tensor unpermute(const at::Tensor& rows, const at::Tensor& row_map, const std::optional<at::Tensor>& weights);
std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_output, const at::Tensor& rows,
                                                      const at::Tensor& row_map,
                                                      const std::optional<at::Tensor>& weights);

// ---- experts
at::Tensor grouped_mm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert);

// ---- Autograd-key kernels (autograd.cpp): C++ autograd functions around the ops above.
std::tuple<at::Tensor, at::Tensor> route_autograd(const at::Tensor& logits, int64_t k, bool renormalize);
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_autograd(const at::Tensor& tokens,
                                                                const at::Tensor& expert_ids, int64_t num_experts,
                                                                std::optional<int64_t> capacity);
at::Tensor unpermute_autograd(const at::Tensor& rows, const at::Tensor& row_map,
                              const std::optional<at::Tensor>& weights);

// The float type kernels accumulate in: double for float64, float otherwise.
inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace moeflux
