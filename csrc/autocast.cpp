// Autocast-key kernels of the expert GEMM ops: inside torch.autocast the experts compute in autocast's dtype,
// as nn.Linear does, whatever dtype their weights are stored in (fp32 weights in a bf16 region, a router kept in
// fp32 next to bf16 experts). Weights go through autocast's cache, so a weight is cast once per region; the
// routing weights of pipelined_moe stay float32 (the combine accumulates in fp32).
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "csrc/autograd_function.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

template <c10::DeviceType device>
struct AutocastRegion {
  // Below the autocast key: the op redispatches to autograd and the kernels with the cast tensors.
  c10::impl::ExcludeDispatchKeyGuard no_autocast{at::autocast::get_autocast_dispatch_key_from_device_type(device)};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(device);

  at::Tensor cast(const at::Tensor& t) const { return at::autocast::cached_cast(dtype, t, device); }
  std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t) const {
    return at::autocast::cached_cast(dtype, t, device);
  }
};

}  // namespace

template <c10::DeviceType device>
at::Tensor grouped_mm_autocast(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& tokens_per_expert) {
  static auto op = find_op<decltype(grouped_mm)>("moeflux::grouped_mm");
  AutocastRegion<device> region;
  return op.call(region.cast(input), region.cast(weight), tokens_per_expert);
}

template <c10::DeviceType device>
at::Tensor expert_ffn_autocast(const at::Tensor& rows, const at::Tensor& w_in, const at::Tensor& w_out,
                               const at::Tensor& tokens_per_expert, c10::string_view activation,
                               std::optional<int64_t> capacity, const std::optional<at::Tensor>& b_in,
                               const std::optional<at::Tensor>& b_out) {
  static auto op = find_op<decltype(expert_ffn)>("moeflux::expert_ffn");
  AutocastRegion<device> region;
  return op.call(region.cast(rows), region.cast(w_in), region.cast(w_out), tokens_per_expert, activation, capacity,
                 region.cast(b_in), region.cast(b_out));
}

template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> pipelined_moe_autocast(
    const at::Tensor& tokens, const at::Tensor& expert_ids, const std::optional<at::Tensor>& weights,
    const at::Tensor& w_in, const at::Tensor& w_out, c10::string_view activation, int64_t num_experts,
    std::optional<int64_t> capacity, const std::string& group_name, c10::string_view schedule, int64_t chunks,
    int64_t group_size, const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
    const std::optional<at::Tensor>& routing_counts) {
  static auto op = find_op<decltype(pipelined_moe)>("moeflux::pipelined_moe");
  AutocastRegion<device> region;
  return op.call(region.cast(tokens), expert_ids, weights, region.cast(w_in), region.cast(w_out), activation,
                 num_experts, capacity, group_name, schedule, chunks, group_size, region.cast(b_in),
                 region.cast(b_out), routing_counts);
}

#define MOEFLUX_AUTOCAST_INSTANCES(device)                                                                        \
  template at::Tensor grouped_mm_autocast<device>(const at::Tensor&, const at::Tensor&, const at::Tensor&);        \
  template at::Tensor expert_ffn_autocast<device>(const at::Tensor&, const at::Tensor&, const at::Tensor&,         \
                                                  const at::Tensor&, c10::string_view, std::optional<int64_t>,     \
                                                  const std::optional<at::Tensor>&,                                \
                                                  const std::optional<at::Tensor>&);                               \
  template std::tuple<at::Tensor, at::Tensor> pipelined_moe_autocast<device>(                                     \
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, \
      c10::string_view, int64_t, std::optional<int64_t>, const std::string&, c10::string_view, int64_t, int64_t,   \
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
MOEFLUX_AUTOCAST_INSTANCES(c10::DeviceType::CPU)
MOEFLUX_AUTOCAST_INSTANCES(c10::DeviceType::CUDA)
#undef MOEFLUX_AUTOCAST_INSTANCES

}  // namespace moeflux
