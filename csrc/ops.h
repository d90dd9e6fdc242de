// The ops of torch.ops.moeflux, as C++ functions. Schemas and dispatch keys
// are in registration.cpp; the contracts are in docs/design.md. The ops with
// per-device kernels take the device's kernel table first; registration.cpp
// binds one table per dispatch key.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "csrc/kernels.h"

namespace moeflux {

// ---- gate
std::tuple<at::Tensor, at::Tensor> route(const DeviceKernels& kernels, const at::Tensor& logits, int64_t k,
                                         bool renormalize, c10::string_view scoring,
                                         const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
                                         int64_t top_groups, double scale, int64_t group_score_top = 2);
at::Tensor route_backward(const DeviceKernels& kernels, const at::Tensor& grad_weights, const at::Tensor& logits,
                          const at::Tensor& weights, const at::Tensor& expert_ids, bool renormalize,
                          c10::string_view scoring, double scale);
std::tuple<at::Tensor, at::Tensor> router_aux_loss(const at::Tensor& logits, const at::Tensor& expert_ids);
at::Tensor apply_capacity(const at::Tensor& expert_ids, const at::Tensor& weights, int64_t num_experts,
                          int64_t capacity, bool drop_by_probability);

// ---- scatter / gather
// permute's argument checks (no data read), named after `op`: dispatch runs them before it agrees.
void check_permute_args(const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts,
                        std::optional<int64_t> capacity, const char* op);
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const DeviceKernels& kernels, const at::Tensor& tokens,
                                                       const at::Tensor& expert_ids, int64_t num_experts,
                                                       std::optional<int64_t> capacity);
at::Tensor unpermute(const DeviceKernels& kernels, const at::Tensor& rows, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights);
std::tuple<at::Tensor, at::Tensor> unpermute_backward(const DeviceKernels& kernels, const at::Tensor& grad_output,
                                                      const at::Tensor& rows, const at::Tensor& row_map,
                                                      const std::optional<at::Tensor>& weights);

// Row movement without argument checks, for ops built on permute / unpermute.
// scatter: out[row_map[t, j]] = x[t], other rows zero; gather: out[t] = sum_j w[t, j] rows[row_map[t, j]]
// (weights may be undefined: factor 1, else in the rows' accumulation type).
at::Tensor scatter_rows(const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& row_map,
                        int64_t num_rows);
at::Tensor gather_rows(const DeviceKernels& kernels, const at::Tensor& rows, const at::Tensor& row_map,
                       const at::Tensor& weights);

// ---- expert parallelism (csrc/distributed/)
at::Tensor all_to_all(const at::Tensor& input, at::IntArrayRef output_split_sizes, at::IntArrayRef input_split_sizes,
                      const std::string& group_name, bool agree_first);
// routing_counts: [P, E] int64 on the host, what a dropless dispatch of these expert_ids would exchange; given,
// dispatch skips its own count exchange.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch(
    const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts, std::optional<int64_t> capacity,
    const std::string& group_name, const std::optional<at::Tensor>& routing_counts, bool agree_first);
at::Tensor dispatch_backward(const at::Tensor& grad_expert_rows, const at::Tensor& row_map,
                             const at::Tensor& regroup_map, const at::Tensor& send_splits,
                             const at::Tensor& recv_splits, const std::string& group_name);
std::tuple<at::Tensor, at::Tensor> combine(const at::Tensor& expert_out, const at::Tensor& row_map,
                                           const at::Tensor& regroup_map, const at::Tensor& send_splits,
                                           const at::Tensor& recv_splits, const std::optional<at::Tensor>& weights,
                                           const std::string& group_name);
std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_output, const at::Tensor& returned_rows,
                                                    const at::Tensor& row_map, const at::Tensor& regroup_map,
                                                    const at::Tensor& send_splits, const at::Tensor& recv_splits,
                                                    const std::optional<at::Tensor>& weights,
                                                    const std::string& group_name);

// The one count/header exchange (dispatch.cpp): sends rank r the row counts counts[r] ([P, m], any m), with this
// rank's hidden size, dtype and num_experts, which every rank checks. -> (sent, received): [P, m] int64 on the
// host, read in the one host synchronisation. dispatch and pipelined_moe run it themselves; the hierarchical
// transport sends its rail copies' counts through it.
std::tuple<at::Tensor, at::Tensor> count_exchange(const at::Tensor& tokens, const at::Tensor& counts,
                                                  int64_t num_experts, const std::string& group_name);

// Load balancing (expert_rows.cpp): [P, E] routed rows per position on every rank; owners' expert rows to
// every rank and their gradients back; expert rows into a new placement.
// agree_first: the agreement on the arguments first (one more small collective); false where the caller knows
// the ranks agree (a layer whose configuration was agreed at construction, positions chosen from shared counts).
at::Tensor routing_counts(const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts,
                          const std::string& group_name, bool agree_first);
at::Tensor broadcast_expert_rows(const at::Tensor& local, at::IntArrayRef positions, const std::string& group_name,
                                 bool agree_first);
at::Tensor reduce_expert_rows(const at::Tensor& grad_rows, at::IntArrayRef positions, int64_t local_experts,
                              const std::string& group_name);
at::Tensor move_expert_rows(const at::Tensor& local, at::IntArrayRef old_expert_at, at::IntArrayRef new_expert_at,
                            const std::string& group_name);

// The layer in stages (csrc/exchange/staged_engine.cpp): dispatch -> experts (expert_ffn, with the optional per-expert biases
// b_in, b_out) -> combine with each stage's all-to-alls overlapping another stage's experts, forward and
// backward. -> (output [T, H], tokens_per_local_expert [E_local]).
std::tuple<at::Tensor, at::Tensor> pipelined_moe(const at::Tensor& tokens, const at::Tensor& expert_ids,
                                                 const std::optional<at::Tensor>& weights, const at::Tensor& w_in,
                                                 const at::Tensor& w_out, c10::string_view activation,
                                                 int64_t num_experts, std::optional<int64_t> capacity,
                                                 const std::string& group_name, c10::string_view schedule,
                                                 int64_t chunks, int64_t group_size,
                                                 const std::optional<at::Tensor>& b_in,
                                                 const std::optional<at::Tensor>& b_out,
                                                 const std::optional<at::Tensor>& routing_counts);

// ---- experts (experts/): grouped GEMMs over per-expert row segments
at::Tensor grouped_mm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert);
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& tokens_per_expert,
                                                       std::array<bool, 2> output_mask);
// b_in [E, F_in], b_out [E, H]: optional per-expert biases added after each GEMM (GPT-OSS).
at::Tensor expert_ffn(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                      const at::Tensor& tokens_per_expert, c10::string_view activation,
                      std::optional<int64_t> capacity, const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out);
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_forward(const at::Tensor& rows, const at::Tensor& w_in,
                                                                  const at::Tensor& w_out,
                                                                  const at::Tensor& tokens_per_expert,
                                                                  c10::string_view activation,
                                                                  std::optional<int64_t> capacity,
                                                                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out);
// -> grad rows, grad w_in, grad w_out, grad b_in, grad b_out (the last two empty [0] unless `biased`).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward(
    const at::Tensor& grad_output, const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
    const at::Tensor& tokens_per_expert, const at::Tensor& pre_activation, const at::Tensor& activated,
    c10::string_view activation, std::optional<int64_t> capacity, bool biased);

// ---- Autocast-key kernels (autocast.cpp): the expert GEMMs in autocast's dtype, then redispatched.
template <c10::DeviceType device>
at::Tensor grouped_mm_autocast(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert);
template <c10::DeviceType device>
at::Tensor expert_ffn_autocast(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                               const at::Tensor& tokens_per_expert, c10::string_view activation,
                               std::optional<int64_t> capacity, const std::optional<at::Tensor>& b_in,
                               const std::optional<at::Tensor>& b_out);
template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> pipelined_moe_autocast(
    const at::Tensor& tokens, const at::Tensor& expert_ids, const std::optional<at::Tensor>& weights,
    const at::Tensor& w_in, const at::Tensor& w_out, c10::string_view activation, int64_t num_experts,
    std::optional<int64_t> capacity, const std::string& group_name, c10::string_view schedule, int64_t chunks,
    int64_t group_size, const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
    const std::optional<at::Tensor>& routing_counts);

// ---- Autograd-key kernels (autograd.cpp, exchange/): C++ autograd functions around the ops above.
std::tuple<at::Tensor, at::Tensor> pipelined_moe_autograd(const at::Tensor& tokens, const at::Tensor& expert_ids,
                                                          const std::optional<at::Tensor>& weights,
                                                          const at::Tensor& w_in, const at::Tensor& w_out,
                                                          c10::string_view activation, int64_t num_experts,
                                                          std::optional<int64_t> capacity,
                                                          const std::string& group_name, c10::string_view schedule,
                                                          int64_t chunks, int64_t group_size,
                                                          const std::optional<at::Tensor>& b_in,
                                                          const std::optional<at::Tensor>& b_out,
                                                          const std::optional<at::Tensor>& routing_counts);
at::Tensor grouped_mm_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert);
at::Tensor expert_ffn_autograd(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                               const at::Tensor& tokens_per_expert, c10::string_view activation,
                               std::optional<int64_t> capacity, const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out);
std::tuple<at::Tensor, at::Tensor> route_autograd(const at::Tensor& logits, int64_t k, bool renormalize,
                                                  c10::string_view scoring,
                                                  const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
                                                  int64_t top_groups, double scale, int64_t group_score_top = 2);
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_autograd(const at::Tensor& tokens,
                                                                const at::Tensor& expert_ids, int64_t num_experts,
                                                                std::optional<int64_t> capacity);
at::Tensor unpermute_autograd(const at::Tensor& rows, const at::Tensor& row_map,
                              const std::optional<at::Tensor>& weights);
at::Tensor all_to_all_autograd(const at::Tensor& input, at::IntArrayRef output_split_sizes,
                               at::IntArrayRef input_split_sizes, const std::string& group_name, bool agree_first);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_autograd(
    const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts, std::optional<int64_t> capacity,
    const std::string& group_name, const std::optional<at::Tensor>& routing_counts, bool agree_first);
at::Tensor broadcast_expert_rows_autograd(const at::Tensor& local, at::IntArrayRef positions,
                                          const std::string& group_name, bool agree_first);
std::tuple<at::Tensor, at::Tensor> combine_autograd(const at::Tensor& expert_out, const at::Tensor& row_map,
                                                    const at::Tensor& regroup_map, const at::Tensor& send_splits,
                                                    const at::Tensor& recv_splits,
                                                    const std::optional<at::Tensor>& weights,
                                                    const std::string& group_name);

// The float type kernels accumulate in: double for float64, float otherwise.
inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace moeflux
