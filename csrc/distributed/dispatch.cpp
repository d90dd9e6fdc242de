// dispatch and combine: the token traffic of expert parallelism.
//
// Ranks of the expert-parallel group own contiguous blocks of experts (rank r:
// experts [r * E_local, (r + 1) * E_local)), so after permute the rows bound
// for each rank are one contiguous block.
//
//   dispatch = permute
//            + count exchange (dropless only: one all-to-all of [E_local counts, header] per rank pair,
//              then the one host synchronisation, to learn the split sizes)
//            + all-to-all of the rows
//            + regroup: rows arrive ordered (source rank, local expert); experts want (local expert, source)
//   combine  = regroup back + all-to-all of the expert outputs (splits swapped) + weighted unpermute
//
// Their backward passes run the same steps in reverse with the forward's
// split sizes, so one training step moves token data through exactly four
// all-to-alls. Capacity mode has fixed splits (E_local * capacity rows per
// rank pair): no count exchange and no host synchronisation.
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/repeat_interleave.h>

#include "csrc/checks.h"
#include "csrc/distributed/agreement.h"
#include "csrc/distributed/all_to_all.h"
#include "csrc/distributed/counts.h"
#include "csrc/host_sync.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

constexpr int64_t kHeader = 3;  // hidden size, dtype, num_experts: what every rank must agree on

std::vector<int64_t> to_vector(const at::Tensor& cpu_int64) {
  const int64_t* p = cpu_int64.const_data_ptr<int64_t>();
  return {p, p + cpu_int64.numel()};
}

at::Tensor exclusive_cumsum(const at::Tensor& x) { return at::cumsum(x, 0) - x; }

void check_splits_tensor(const at::Tensor& t, int64_t world, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == world, "moeflux.",
              op, ": ", name, " must be a CPU int64 tensor with one entry per rank (", world, "), got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// Rows of the received block, ordered (source, local expert), into (local expert, source) order:
// regroup_map[m] = the received row that becomes row m.
at::Tensor regroup_map_dropless(const at::Tensor& recv_counts /* [P, E_local] int64 */, int64_t num_rows) {
  const at::Tensor by_expert = recv_counts.t().reshape({-1});                            // [E_local * P]
  const at::Tensor src_start = exclusive_cumsum(recv_counts.reshape({-1})).view(recv_counts.sizes());
  const at::Tensor shift = src_start.t().reshape({-1}) - exclusive_cumsum(by_expert);  // source - destination
  const at::Tensor map = at::arange(num_rows, recv_counts.options()) +
                         at::repeat_interleave(shift, by_expert, /*dim=*/0, /*output_size=*/num_rows);
  return map.to(at::kInt).view({num_rows, 1});
}

at::Tensor regroup_map_capacity(int64_t world, int64_t local_experts, int64_t capacity, const at::TensorOptions& o) {
  const int64_t rows = world * local_experts * capacity;
  return at::arange(rows, o.dtype(at::kInt)).view({world, local_experts, capacity}).transpose(0, 1).reshape({rows, 1});
}

}  // namespace

ExchangedCounts exchange_counts(const at::Tensor& tokens, const at::Tensor& counts, int64_t num_experts,
                                c10d::ProcessGroup& group, const char* op, const char* site) {
  const int64_t world = group.getSize();
  const at::Tensor per_rank = counts.to(at::kLong).view({world, -1});  // [P, m]: what rank r is told
  const int64_t m = per_rank.size(1);
  const auto cpu_long = at::TensorOptions().dtype(at::kLong);
  at::Tensor header = at::empty({kHeader}, cpu_long);
  int64_t* fields = header.mutable_data_ptr<int64_t>();
  fields[0] = tokens.dim() == 2 ? tokens.size(1) : -1;
  fields[1] = static_cast<int64_t>(tokens.scalar_type());
  fields[2] = num_experts;
  header = header.to(tokens.device());
  const at::Tensor send_msg = at::cat({per_rank, header.view({1, kHeader}).expand({world, kHeader})}, 1);
  const std::vector<int64_t> ones(world, 1);
  count_count_exchange();
  const at::Tensor recv_msg = exchange_rows(send_msg, ones, ones, group, op, "count_exchange");
  const at::Tensor both = to_host(at::cat({send_msg, recv_msg}), site);  // the one host synchronisation
  const auto* h = both.const_data_ptr<int64_t>();
  const int64_t width = m + kHeader;
  for (int64_t src = 0; src < world; ++src) {
    const int64_t* theirs = h + (world + src) * width + m;
    TORCH_CHECK(theirs[0] == fields[0] && theirs[1] == static_cast<int64_t>(tokens.scalar_type()) &&
                    theirs[2] == num_experts,
                "moeflux.", op, ": ranks of the expert-parallel group disagree: rank ", src, " sends tokens with ",
                "hidden size ", theirs[0], ", dtype ", static_cast<at::ScalarType>(theirs[1]), " and num_experts ",
                theirs[2], "; rank ", group.getRank(), " has hidden size ", fields[0], ", dtype ",
                tokens.scalar_type(), " and num_experts ", num_experts);
  }
  return {both.narrow(0, 0, world).narrow(1, 0, m).contiguous(),
          both.narrow(0, world, world).narrow(1, 0, m).contiguous(), recv_msg.narrow(1, 0, m)};
}

std::tuple<at::Tensor, at::Tensor> count_exchange(const at::Tensor& tokens, const at::Tensor& counts,
                                                  int64_t num_experts, const std::string& group_name) {
  const char* op = "count_exchange";
  const auto group = resolve_group(group_name, op);
  const int64_t world = group->getSize();
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == world && !counts.is_floating_point() &&
                  counts.device() == tokens.device(),
              "moeflux.count_exchange: counts must be an integer [P = ", world, ", m] tensor on the tokens' device (",
              tokens.device(), "), got ", counts.scalar_type(), " ", counts.sizes(), " on ", counts.device());
  check_device_supported(tokens, op, "tokens");
  ExchangedCounts exchanged = exchange_counts(tokens, counts, num_experts, *group, op, "counts:count_exchange");
  return {exchanged.sent, exchanged.received};
}

ExchangedCounts counts_from_routing(const at::Tensor& routing_counts, int64_t rank, int64_t world,
                                    const at::Device& device, const char* op) {
  TORCH_CHECK(routing_counts.device().is_cpu() && routing_counts.scalar_type() == at::kLong &&
                  routing_counts.dim() == 2 && routing_counts.size(0) == world && routing_counts.size(1) % world == 0,
              "moeflux.", op, ": routing_counts must be a CPU int64 [P = ", world, ", E] tensor (routing_counts' ",
              "result), got ", routing_counts.scalar_type(), " ", routing_counts.sizes(), " on ",
              routing_counts.device());
  const int64_t local_experts = routing_counts.size(1) / world;
  const at::Tensor received = routing_counts.narrow(1, rank * local_experts, local_experts).contiguous();
  return {routing_counts.select(0, rank).view({world, local_experts}).contiguous(), received, received.to(device)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch(
    const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts, std::optional<int64_t> capacity,
    const std::string& group_name, const std::optional<at::Tensor>& routing_counts, bool agree_first) {
  const char* op = "dispatch";
  const auto group = resolve_group(group_name, op);
  const int64_t world = group->getSize();
  auto check_experts = [&] {
    check_num_experts(num_experts, op);
    TORCH_CHECK(num_experts % world == 0, "moeflux.dispatch: num_experts must be a positive ",
                "multiple of the expert-parallel group size ", world, ", got ", num_experts);
  };
  if (agree_first) {
    // Every rank runs the checks permute would (and, on the CPU, the ids' range its kernel checks: a rank
    // failing there after the agreement would leave the others waiting), then the ranks compare what the
    // exchanges are sized by, in one fixed-size message: a bad or disagreeing rank makes every rank raise.
    const std::string error = local_error([&] {
      check_experts();
      check_device_supported(tokens, op, "tokens");
      check_permute_args(tokens, expert_ids, num_experts, capacity, op);
      check_ids_in_range(expert_ids, num_experts, op);
    });
    agree(*group, {num_experts, tokens.dim() == 2 ? tokens.size(1) : -1,
                   static_cast<int64_t>(tokens.scalar_type()), capacity.value_or(-1)},
          op, {"num_experts", "hidden size", "dtype", "capacity (-1: dropless)"}, exchange_device(tokens.device()),
          error);
  } else {
    check_experts();  // permute checks the rest
    check_device_supported(tokens, op, "tokens");
  }
  const int64_t local_experts = num_experts / world;

  const DeviceKernels& kernels = kernels_for(tokens);
  auto [permuted, tokens_per_expert, row_map] = permute(kernels, tokens, expert_ids, num_experts, capacity);
  const auto cpu_long = at::TensorOptions().dtype(at::kLong);
  at::Tensor send_splits, recv_splits, regroup_map, tokens_per_local_expert;
  if (capacity.has_value()) {
    send_splits = at::full({world}, local_experts * *capacity, cpu_long);
    recv_splits = send_splits.clone();
    regroup_map = regroup_map_capacity(world, local_experts, *capacity, tokens.options());
    tokens_per_local_expert = at::full({local_experts}, world * *capacity, tokens.options().dtype(at::kInt));
  } else {
    const ExchangedCounts counts =
        routing_counts.has_value()
            ? counts_from_routing(*routing_counts, group->getRank(), world, tokens.device(), op)
            : exchange_counts(tokens, tokens_per_expert, num_experts, *group, op);
    send_splits = counts.sent.sum(1);
    recv_splits = counts.received.sum(1);
    regroup_map = regroup_map_dropless(counts.received_on_device, recv_splits.sum().item<int64_t>());
    tokens_per_local_expert = counts.received_on_device.sum(0).to(at::kInt);
  }

  count_token_all_to_all();
  const at::Tensor sent = permuted.narrow(0, 0, send_splits.sum().item<int64_t>());  // dropped rows stay home
  const at::Tensor received = exchange_rows(sent, to_vector(recv_splits), to_vector(send_splits), *group, op);
  at::Tensor expert_rows = gather_rows(kernels, received, regroup_map, at::Tensor());
  return {expert_rows, tokens_per_local_expert, row_map, regroup_map, send_splits, recv_splits};
}

at::Tensor dispatch_backward(const at::Tensor& grad_expert_rows, const at::Tensor& row_map,
                             const at::Tensor& regroup_map, const at::Tensor& send_splits,
                             const at::Tensor& recv_splits, const std::string& group_name) {
  const auto group = resolve_group(group_name, "dispatch_backward");
  check_splits_tensor(send_splits, group->getSize(), "dispatch_backward", "send_splits");
  check_splits_tensor(recv_splits, group->getSize(), "dispatch_backward", "recv_splits");
  check_device_supported(grad_expert_rows, "dispatch_backward", "grad_expert_rows");
  const DeviceKernels& kernels = kernels_for(grad_expert_rows);
  const at::Tensor by_source = scatter_rows(kernels, grad_expert_rows, regroup_map, regroup_map.size(0));
  count_token_all_to_all();
  const at::Tensor grad_sent =
      exchange_rows(by_source, to_vector(send_splits), to_vector(recv_splits), *group, "dispatch_backward");
  return gather_rows(kernels, grad_sent, row_map, at::Tensor());  // d tokens[t] = sum_j d rows[row_map[t, j]]
}

std::tuple<at::Tensor, at::Tensor> combine(const at::Tensor& expert_out, const at::Tensor& row_map,
                                           const at::Tensor& regroup_map, const at::Tensor& send_splits,
                                           const at::Tensor& recv_splits, const std::optional<at::Tensor>& weights,
                                           const std::string& group_name) {
  const char* op = "combine";
  const auto group = resolve_group(group_name, op);
  check_splits_tensor(send_splits, group->getSize(), op, "send_splits");
  check_splits_tensor(recv_splits, group->getSize(), op, "recv_splits");
  check_dim(expert_out, 2, op, "expert_out", "[rows, hidden]");
  check_size(expert_out, 0, regroup_map.size(0), op, "expert_out", "the number of rows dispatch returned");
  check_device_supported(expert_out, op, "expert_out");
  const DeviceKernels& kernels = kernels_for(expert_out);
  const at::Tensor by_source = scatter_rows(kernels, expert_out, regroup_map, regroup_map.size(0));
  count_token_all_to_all();
  at::Tensor returned = exchange_rows(by_source, to_vector(send_splits), to_vector(recv_splits), *group, op);
  at::Tensor output = unpermute(kernels, returned, row_map, weights);
  return {output, returned};
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_output, const at::Tensor& returned_rows,
                                                    const at::Tensor& row_map, const at::Tensor& regroup_map,
                                                    const at::Tensor& send_splits, const at::Tensor& recv_splits,
                                                    const std::optional<at::Tensor>& weights,
                                                    const std::string& group_name) {
  const char* op = "combine_backward";
  const auto group = resolve_group(group_name, op);
  check_splits_tensor(send_splits, group->getSize(), op, "send_splits");
  check_splits_tensor(recv_splits, group->getSize(), op, "recv_splits");
  check_device_supported(grad_output, op, "grad_output");
  const DeviceKernels& kernels = kernels_for(grad_output);
  auto [grad_returned, grad_weights] = unpermute_backward(kernels, grad_output, returned_rows, row_map, weights);
  count_token_all_to_all();
  const at::Tensor grad_by_source =
      exchange_rows(grad_returned, to_vector(recv_splits), to_vector(send_splits), *group, op);
  return {gather_rows(kernels, grad_by_source, regroup_map, at::Tensor()), grad_weights};
}

}  // namespace moeflux
