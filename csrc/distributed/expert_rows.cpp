// Collectives on experts rather than tokens, for load balancing:
//
//   routing_counts        every rank's rows per expert position -> [P, E] on every rank (one small all-to-all
//                         and one host synchronisation; dispatch can then skip its own count exchange)
//   broadcast_expert_rows a few experts' weights from their owners to every rank (FasterMoE's shadows);
//   reduce_expert_rows    its backward: the shadows' gradients summed onto their owners
//   move_expert_rows      re-placement (SmartMoE): each rank's stacked per-expert rows into a new placement
//
// A position is rank * E_local + slot (moeflux.ExpertPlacement); the owner of position p is p / E_local.
// Each op (but the backward one) first makes every rank agree on its arguments: a small all-to-all of a
// fixed-size header (whether the rank's own checks passed, sizes, dtype, fingerprints of the lists), so that
// a rank with bad arguments, or ranks with different ones, make every rank raise instead of mismatching
// inside the collective or leaving the others waiting.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ops/ones_like.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>

#include "csrc/checks.h"
#include "csrc/distributed/agreement.h"
#include "csrc/distributed/all_to_all.h"
#include "csrc/host_sync.h"
#include "csrc/ops.h"
#include "csrc/profiling/comm_stats.h"

namespace moeflux {
namespace {

// FNV-1a over the values: a cheap fingerprint of a list every rank must pass equally.
int64_t fingerprint(const std::vector<int64_t>& values) {
  uint64_t h = 1469598103934665603ull;
  for (const int64_t v : values) {
    h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
  }
  return static_cast<int64_t>(h >> 1);
}

// Positions must be ascending, unique and in [0, P * E_local).
void check_positions(const std::vector<int64_t>& positions, int64_t num_positions, const char* op) {
  for (size_t i = 0; i < positions.size(); ++i) {
    TORCH_CHECK(positions[i] >= 0 && positions[i] < num_positions, "moeflux.", op, ": positions must be in [0, ",
                num_positions, "), got ", positions[i]);
    TORCH_CHECK(i == 0 || positions[i] > positions[i - 1], "moeflux.", op,
                ": positions must be strictly ascending, got ", c10::IntArrayRef(positions));
  }
}

// [begin, end) of the positions owned by `rank` in the ascending list.
std::pair<size_t, size_t> owned_range(const std::vector<int64_t>& positions, int64_t rank, int64_t local_experts) {
  const auto begin = std::lower_bound(positions.begin(), positions.end(), rank * local_experts);
  const auto end = std::lower_bound(positions.begin(), positions.end(), (rank + 1) * local_experts);
  return {static_cast<size_t>(begin - positions.begin()), static_cast<size_t>(end - positions.begin())};
}

at::Tensor slot_index(const std::vector<int64_t>& positions, size_t begin, size_t end, int64_t local_experts,
                      const at::Device& device) {
  at::Tensor index = at::empty({static_cast<int64_t>(end - begin)}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = index.mutable_data_ptr<int64_t>();
  for (size_t i = begin; i < end; ++i) p[i - begin] = positions[i] % local_experts;
  return index.to(device);
}

}  // namespace

at::Tensor routing_counts(const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts,
                          const std::string& group_name, bool agree_first) {
  const char* op = "routing_counts";
  const auto group = resolve_group(group_name, op);
  const int64_t world = group->getSize();
  std::vector<int64_t> fields(2, 0);  // hidden size, dtype
  const std::string error = local_error([&] {
    check_dim(tokens, 2, op, "tokens", "[tokens, hidden]");
    check_dim(expert_ids, 2, op, "expert_ids", "[tokens, k]");
    check_dtype(expert_ids, at::kInt, op, "expert_ids");
    check_size(expert_ids, 0, tokens.size(0), op, "expert_ids", "tokens.size(0)");
    check_same_device(expert_ids, tokens, op, "expert_ids", "tokens");
    check_device_supported(tokens, op, "tokens");
    check_num_experts(num_experts, op);
    TORCH_CHECK(num_experts % world == 0, "moeflux.", op, ": num_experts must be a positive ",
                "multiple of the group size ", world, ", got ", num_experts);
    fields = {tokens.size(1), static_cast<int64_t>(tokens.scalar_type())};
  });
  if (agree_first) {  // on num_experts, which sizes the count row; hidden size and dtype travel in the row
    agree(*group, {num_experts}, op, {"num_experts"}, exchange_device(tokens.device()), error);
  } else {
    TORCH_CHECK(error.empty(), error);  // the caller vouches that every rank passes valid arguments and E
  }
  // Bin 0: dropped (-1); bins 1..E: experts; bin E+1: ids out of range, counted and sent rather than raised
  // here, so that every rank joins the exchange before any of them raises. Then hidden size and dtype,
  // compared after the exchange.
  const at::Tensor ids = expert_ids.reshape({-1}).to(at::kLong);
  const at::Tensor bin = at::where((ids < -1).logical_or(ids >= num_experts), num_experts + 1, ids + 1);
  // index_add rather than bincount: on CUDA, bincount reads the maximum back to the host.
  const at::Tensor bins = at::zeros({num_experts + 2}, ids.options()).index_add_(0, bin, at::ones_like(bin));
  const int64_t width = num_experts + 3;
  at::Tensor header = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  header.mutable_data_ptr<int64_t>()[0] = fields[0];
  header.mutable_data_ptr<int64_t>()[1] = fields[1];
  const at::Tensor row = at::cat({bins.narrow(0, 1, num_experts + 1), header.to(bins.device())}).view({1, width});
  const std::vector<int64_t> ones(world, 1);
  const at::Tensor all = to_host(exchange_rows(row.expand({world, width}), ones, ones, *group, op, "count_exchange"),
                                 "counts:routing_counts");
  const int64_t* h = all.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < world; ++r) {
    const int64_t* theirs = h + r * width + num_experts;
    TORCH_CHECK(theirs[1] == fields[0] && theirs[2] == fields[1], "moeflux.", op,
                ": ranks of the expert-parallel group disagree: rank ", r, " has tokens with hidden size ", theirs[1],
                " and dtype ", static_cast<at::ScalarType>(theirs[2]), "; rank ", group->getRank(),
                " has hidden size ", fields[0], " and dtype ", static_cast<at::ScalarType>(fields[1]));
    TORCH_CHECK(theirs[0] == 0, "moeflux.", op, ": expert_ids of rank ", r, " hold ", theirs[0],
                " ids outside [-1, num_experts = ", num_experts, ")");
  }
  return all.narrow(1, 0, num_experts).contiguous();
}

at::Tensor broadcast_expert_rows(const at::Tensor& local, at::IntArrayRef positions_ref,
                                 const std::string& group_name, bool agree_first) {
  const char* op = "broadcast_expert_rows";
  const auto group = resolve_group(group_name, op);
  const int64_t world = group->getSize(), me = group->getRank();
  const std::vector<int64_t> positions = positions_ref.vec();
  std::vector<int64_t> fields(5, 0);
  const std::string error = local_error([&] {
    TORCH_CHECK(local.dim() >= 1 && local.size(0) >= 1, "moeflux.", op,
                ": local must be [E_local, ...] with E_local >= 1, got shape ", local.sizes());
    check_device_supported(local, op, "local");
    check_positions(positions, world * local.size(0), op);
    fields = {local.size(0), local.numel() / local.size(0), static_cast<int64_t>(local.scalar_type()),
              static_cast<int64_t>(positions.size()), fingerprint(positions)};
  });
  if (agree_first) {
    agree(*group, fields, op, {"E_local", "row numel", "dtype", "number of positions", "fingerprint of positions"},
          exchange_device(local.device()), error);
  } else {
    TORCH_CHECK(error.empty(), error);  // the caller vouches that every rank passes the same positions
  }
  const int64_t local_experts = local.size(0);
  std::vector<int64_t> shape = local.sizes().vec();
  RECORD_FUNCTION("moeflux::broadcast_expert_rows", std::vector<c10::IValue>());
  std::vector<at::Tensor> parts;
  for (int64_t owner = 0; owner < world; ++owner) {
    const auto [begin, end] = owned_range(positions, owner, local_experts);
    if (begin == end) continue;
    shape[0] = static_cast<int64_t>(end - begin);
    at::Tensor rows = owner == me ? local.index_select(0, slot_index(positions, begin, end, local_experts,
                                                                     local.device()))
                                  : at::empty(shape, local.options());
    std::vector<at::Tensor> buffer{rows};
    c10d::BroadcastOptions options;
    options.rootRank = owner;
    comm_stats::CollectiveTimer timer("shadow_broadcast", group->getGroupName(), me, rows,
                                      std::vector<int64_t>(world, owner == me ? rows.nbytes() : 0));
    group->broadcast(buffer, options)->wait();
    timer.done();
    parts.push_back(rows);
  }
  if (parts.empty()) {
    shape[0] = 0;
    return at::empty(shape, local.options());
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts);
}

at::Tensor reduce_expert_rows(const at::Tensor& grad_rows, at::IntArrayRef positions_ref, int64_t local_experts,
                              const std::string& group_name) {
  const char* op = "reduce_expert_rows";
  const auto group = resolve_group(group_name, op);
  const int64_t world = group->getSize(), me = group->getRank();
  const std::vector<int64_t> positions = positions_ref.vec();
  TORCH_CHECK(local_experts >= 1, "moeflux.", op, ": local_experts must be >= 1, got ", local_experts);
  TORCH_CHECK(grad_rows.dim() >= 1 && grad_rows.size(0) == static_cast<int64_t>(positions.size()), "moeflux.", op,
              ": grad_rows must have one row per position (", positions.size(), "), got shape ", grad_rows.sizes());
  check_positions(positions, world * local_experts, op);
  RECORD_FUNCTION("moeflux::reduce_expert_rows", std::vector<c10::IValue>());
  std::vector<int64_t> shape = grad_rows.sizes().vec();
  shape[0] = local_experts;
  at::Tensor out = at::zeros(shape, grad_rows.options());
  for (int64_t owner = 0; owner < world; ++owner) {
    const auto [begin, end] = owned_range(positions, owner, local_experts);
    if (begin == end) continue;
    // A copy: the reduce may overwrite the buffers of ranks other than the root.
    std::vector<at::Tensor> buffer{
        grad_rows.narrow(0, static_cast<int64_t>(begin), static_cast<int64_t>(end - begin)).clone()};
    c10d::ReduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.rootRank = owner;
    std::vector<int64_t> bytes_to_rank(world, 0);
    bytes_to_rank[owner] = owner == me ? 0 : buffer[0].nbytes();
    comm_stats::CollectiveTimer timer("shadow_reduce", group->getGroupName(), me, buffer[0], bytes_to_rank);
    group->reduce(buffer, options)->wait();
    timer.done();
    if (owner == me) {
      out.index_copy_(0, slot_index(positions, begin, end, local_experts, out.device()), buffer[0]);
    }
  }
  return out;
}

at::Tensor move_expert_rows(const at::Tensor& local, at::IntArrayRef old_expert_at_ref,
                            at::IntArrayRef new_expert_at_ref, const std::string& group_name) {
  const char* op = "move_expert_rows";
  const auto group = resolve_group(group_name, op);
  const int64_t world = group->getSize(), me = group->getRank();
  const std::vector<int64_t> old_at = old_expert_at_ref.vec(), new_at = new_expert_at_ref.vec();
  std::vector<int64_t> fields(5, 0);
  const std::string error = local_error([&] {
    TORCH_CHECK(local.dim() >= 1 && local.size(0) >= 1, "moeflux.", op,
                ": local must be [E_local, ...] with E_local >= 1, got shape ", local.sizes());
    check_device_supported(local, op, "local");
    const int64_t num_experts = world * local.size(0);
    for (const auto* table : {&old_at, &new_at}) {
      TORCH_CHECK(static_cast<int64_t>(table->size()) == num_experts, "moeflux.", op,
                  ": old_expert_at and new_expert_at must list world * E_local = ", num_experts, " experts, got ",
                  table->size());
      std::vector<bool> seen(num_experts, false);
      for (const int64_t e : *table) {
        TORCH_CHECK(e >= 0 && e < num_experts && !seen[e], "moeflux.", op,
                    ": expert tables must be permutations of range(", num_experts, "), got ",
                    c10::IntArrayRef(*table));
        seen[e] = true;
      }
    }
    fields = {local.size(0), local.numel() / local.size(0), static_cast<int64_t>(local.scalar_type()),
              fingerprint(old_at), fingerprint(new_at)};
  });
  agree(*group, fields, op,
        {"E_local", "row numel", "dtype", "fingerprint of old_expert_at", "fingerprint of new_expert_at"},
        exchange_device(local.device()), error);
  const int64_t local_experts = local.size(0), num_experts = world * local_experts;
  std::vector<int64_t> old_position(num_experts, -1);
  for (int64_t p = 0; p < num_experts; ++p) old_position[old_at[p]] = p;

  // Send, per destination rank in order, the rows it will hold that are here now (in its slot order);
  // receive, per source in order, the rows of this rank's new slots that are there now (in slot order).
  std::vector<int64_t> send_slots, send_splits(world, 0), recv_splits(world, 0);
  for (int64_t dst = 0; dst < world; ++dst) {
    for (int64_t s = 0; s < local_experts; ++s) {
      const int64_t from = old_position[new_at[dst * local_experts + s]];
      if (from / local_experts == me) {
        send_slots.push_back(from % local_experts);
        ++send_splits[dst];
      }
    }
  }
  std::vector<int64_t> slot_of_received;
  for (int64_t src = 0; src < world; ++src) {
    for (int64_t s = 0; s < local_experts; ++s) {
      if (old_position[new_at[me * local_experts + s]] / local_experts == src) {
        slot_of_received.push_back(s);
        ++recv_splits[src];
      }
    }
  }
  const at::Tensor flat = local.reshape({local_experts, -1});
  const auto long_on = [&](const std::vector<int64_t>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
    std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
    return t.to(local.device());
  };
  const at::Tensor received = exchange_rows(flat.index_select(0, long_on(send_slots)), recv_splits, send_splits,
                                            *group, op, "expert_move");
  at::Tensor out = at::empty_like(flat);
  out.index_copy_(0, long_on(slot_of_received), received);
  return out.view(local.sizes());
}

}  // namespace moeflux
