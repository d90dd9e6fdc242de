// Every op of torch.ops.moeflux: one block of schemas, then the kernels of
// each dispatch key. Contracts: docs/design.md.
#include <utility>

#include <torch/library.h>

#include "csrc/ops.h"

namespace moeflux {
namespace {

// Binds an op front-end to one device's kernel table:
// OnDevice<&route, cpu::kernels>::call(logits, ...) == route(cpu::kernels, logits, ...).
template <auto FrontEnd, const DeviceKernels& kernels>
struct OnDevice;

template <typename Result, typename... Args, Result (*FrontEnd)(const DeviceKernels&, Args...),
          const DeviceKernels& kernels>
struct OnDevice<FrontEnd, kernels> {
  static Result call(Args... args) { return FrontEnd(kernels, std::forward<Args>(args)...); }
};

// The ops with per-device kernels: one front-end (argument checks, allocation) bound to a device's table.
template <const DeviceKernels& kernels>
void register_device_ops(torch::Library& m) {
  m.impl("route", TORCH_FN((OnDevice<&route, kernels>::call)));
  m.impl("route_backward", TORCH_FN((OnDevice<&route_backward, kernels>::call)));
  m.impl("permute", TORCH_FN((OnDevice<&permute, kernels>::call)));
  m.impl("unpermute", TORCH_FN((OnDevice<&unpermute, kernels>::call)));
  m.impl("unpermute_backward", TORCH_FN((OnDevice<&unpermute_backward, kernels>::call)));
  // The grouped GEMMs pick torch._grouped_mm or their per-segment loop by device and dtype themselves.
  m.impl("grouped_mm", &grouped_mm);
  m.impl("grouped_mm_backward", &grouped_mm_backward);
  m.impl("expert_ffn_forward", &expert_ffn_forward);
  m.impl("expert_ffn_backward", &expert_ffn_backward);
}

}  // namespace
}  // namespace moeflux

TORCH_LIBRARY(moeflux, m) {
  // gate
  m.def("route(Tensor logits, int k, bool renormalize=False, str scoring=\"softmax\", Tensor? expert_bias=None, "
        "int num_groups=1, int top_groups=1, float scale=1.0, int group_score_top=2) -> (Tensor weights, Tensor expert_ids)");
  m.def("route_backward(Tensor grad_weights, Tensor logits, Tensor weights, Tensor expert_ids, bool renormalize, "
        "str scoring, float scale) -> Tensor");
  m.def("router_aux_loss(Tensor logits, Tensor expert_ids) -> (Tensor load_balancing_loss, Tensor z_loss)");
  m.def("apply_capacity(Tensor expert_ids, Tensor weights, int num_experts, int capacity, "
        "bool drop_by_probability=False) -> Tensor");
  // scatter / gather
  m.def("permute(Tensor tokens, Tensor expert_ids, int num_experts, int? capacity=None) "
        "-> (Tensor permuted, Tensor tokens_per_expert, Tensor row_map)");
  m.def("unpermute(Tensor rows, Tensor row_map, Tensor? weights=None) -> Tensor");
  m.def("unpermute_backward(Tensor grad_output, Tensor rows, Tensor row_map, Tensor? weights) "
        "-> (Tensor grad_rows, Tensor grad_weights)");
  // expert parallelism: collectives over a c10d process group named by group_name
  m.def("all_to_all(Tensor input, int[] output_split_sizes, int[] input_split_sizes, str group_name, "
        "bool agree_first=True) -> Tensor");
  m.def("dispatch(Tensor tokens, Tensor expert_ids, int num_experts, int? capacity, str group_name, "
        "Tensor? routing_counts=None, bool agree_first=True) "
        "-> (Tensor expert_rows, Tensor tokens_per_local_expert, Tensor row_map, Tensor regroup_map, "
        "Tensor send_splits, Tensor recv_splits)");
  m.def("dispatch_backward(Tensor grad_expert_rows, Tensor row_map, Tensor regroup_map, Tensor send_splits, "
        "Tensor recv_splits, str group_name) -> Tensor");
  m.def("combine(Tensor expert_out, Tensor row_map, Tensor regroup_map, Tensor send_splits, Tensor recv_splits, "
        "Tensor? weights, str group_name) -> (Tensor output, Tensor returned_rows)");
  m.def("combine_backward(Tensor grad_output, Tensor returned_rows, Tensor row_map, Tensor regroup_map, "
        "Tensor send_splits, Tensor recv_splits, Tensor? weights, str group_name) "
        "-> (Tensor grad_expert_out, Tensor grad_weights)");
  m.def("pipelined_moe(Tensor tokens, Tensor expert_ids, Tensor? weights, Tensor w_in, Tensor w_out, "
        "str activation, int num_experts, int? capacity, str group_name, str schedule, int chunks, int group_size, "
        "Tensor? b_in=None, Tensor? b_out=None, Tensor? routing_counts=None) "
        "-> (Tensor output, Tensor tokens_per_local_expert)");
  m.def("count_exchange(Tensor tokens, Tensor counts, int num_experts, str group_name) "
        "-> (Tensor sent, Tensor received)");
  // load balancing: collectives on expert rows (csrc/distributed/expert_rows.cpp)
  m.def("routing_counts(Tensor tokens, Tensor expert_ids, int num_experts, str group_name, bool agree_first=True) "
        "-> Tensor");
  m.def("broadcast_expert_rows(Tensor local, int[] positions, str group_name, bool agree_first=True) -> Tensor");
  m.def("reduce_expert_rows(Tensor grad_rows, int[] positions, int local_experts, str group_name) -> Tensor");
  m.def("move_expert_rows(Tensor local, int[] old_expert_at, int[] new_expert_at, str group_name) -> Tensor");
  // experts
  m.def("grouped_mm(Tensor input, Tensor weight, Tensor tokens_per_expert) -> Tensor");
  m.def("grouped_mm_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor tokens_per_expert, "
        "bool[2] output_mask) -> (Tensor grad_input, Tensor grad_weight)");
  m.def("expert_ffn(Tensor rows, Tensor w_in, Tensor w_out, Tensor tokens_per_expert, str activation, "
        "int? capacity=None, Tensor? b_in=None, Tensor? b_out=None) -> Tensor");
  m.def("expert_ffn_forward(Tensor rows, Tensor w_in, Tensor w_out, Tensor tokens_per_expert, str activation, "
        "int? capacity, Tensor? b_in=None, Tensor? b_out=None) "
        "-> (Tensor output, Tensor pre_activation, Tensor activated)");
  m.def("expert_ffn_backward(Tensor grad_output, Tensor rows, Tensor w_in, Tensor w_out, Tensor tokens_per_expert, "
        "Tensor pre_activation, Tensor activated, str activation, int? capacity, bool biased=False) "
        "-> (Tensor grad_rows, Tensor grad_w_in, Tensor grad_w_out, Tensor grad_b_in, Tensor grad_b_out)");
}

TORCH_LIBRARY_IMPL(moeflux, CPU, m) { moeflux::register_device_ops<moeflux::cpu::kernels>(m); }
#ifdef MOEFLUX_WITH_CUDA
TORCH_LIBRARY_IMPL(moeflux, CUDA, m) { moeflux::register_device_ops<moeflux::cuda::kernels>(m); }
#endif

TORCH_LIBRARY_IMPL(moeflux, Autograd, m) {
  m.impl("route", &moeflux::route_autograd);
  m.impl("permute", &moeflux::permute_autograd);
  m.impl("unpermute", &moeflux::unpermute_autograd);
  m.impl("all_to_all", &moeflux::all_to_all_autograd);
  m.impl("dispatch", &moeflux::dispatch_autograd);
  m.impl("combine", &moeflux::combine_autograd);
  m.impl("pipelined_moe", &moeflux::pipelined_moe_autograd);
  m.impl("broadcast_expert_rows", &moeflux::broadcast_expert_rows_autograd);
  m.impl("grouped_mm", &moeflux::grouped_mm_autograd);
  m.impl("expert_ffn", &moeflux::expert_ffn_autograd);
}

// Inside torch.autocast the expert GEMMs run in autocast's dtype (csrc/autocast.cpp).
TORCH_LIBRARY_IMPL(moeflux, AutocastCPU, m) {
  m.impl("grouped_mm", &moeflux::grouped_mm_autocast<c10::DeviceType::CPU>);
  m.impl("expert_ffn", &moeflux::expert_ffn_autocast<c10::DeviceType::CPU>);
  m.impl("pipelined_moe", &moeflux::pipelined_moe_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(moeflux, AutocastCUDA, m) {
  m.impl("grouped_mm", &moeflux::grouped_mm_autocast<c10::DeviceType::CUDA>);
  m.impl("expert_ffn", &moeflux::expert_ffn_autocast<c10::DeviceType::CUDA>);
  m.impl("pipelined_moe", &moeflux::pipelined_moe_autocast<c10::DeviceType::CUDA>);
}

// Device-generic: index bookkeeping from ATen ops (apply_capacity), and the collectives, which run on any
// device their process group serves and move rows with the kernels of the tokens' device.
TORCH_LIBRARY_IMPL(moeflux, CompositeExplicitAutograd, m) {
  m.impl("apply_capacity", &moeflux::apply_capacity);
  m.impl("all_to_all", &moeflux::all_to_all);
  m.impl("dispatch", &moeflux::dispatch);
  m.impl("dispatch_backward", &moeflux::dispatch_backward);
  m.impl("combine", &moeflux::combine);
  m.impl("combine_backward", &moeflux::combine_backward);
  m.impl("pipelined_moe", &moeflux::pipelined_moe);
  m.impl("routing_counts", &moeflux::routing_counts);
  m.impl("count_exchange", &moeflux::count_exchange);
  m.impl("broadcast_expert_rows", &moeflux::broadcast_expert_rows);
  m.impl("reduce_expert_rows", &moeflux::reduce_expert_rows);
  m.impl("move_expert_rows", &moeflux::move_expert_rows);
  m.impl("expert_ffn", &moeflux::expert_ffn);  // below autograd: expert_ffn_forward's output
}

// Built from differentiable ATen ops: autograd derives their backward.
TORCH_LIBRARY_IMPL(moeflux, CompositeImplicitAutograd, m) {
  m.impl("router_aux_loss", &moeflux::router_aux_loss);
}
