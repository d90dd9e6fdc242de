// The all-to-all of the c10d ProcessGroup, for tensors of any device, with
// the group passed by name (group.group_name in Python).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "csrc/profiling/comm_stats.h"

namespace moeflux {

// The process group registered under `group_name`, or a clear error.
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name, const char* op);

// The timeout the group's collectives run under (its default backend's), in milliseconds: groups made from
// it inherit it, where torch's new_group would give its 30-minute default.
int64_t group_timeout_ms(const std::string& group_name);

// Rows [sum(input_split_sizes), ...] of `input` go out, split_sizes[r] rows to
// rank r; rows [sum(output_split_sizes), ...] come back. Waits for the result.
// `op` names the op in errors; `phase` (default: op) names the collective in
// torch.profiler ("moeflux::<phase>") and in moeflux.comm_stats records.
at::Tensor exchange_rows(const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
                         const std::vector<int64_t>& input_split_sizes, c10d::ProcessGroup& group, const char* op,
                         const char* phase = nullptr);

// The same all-to-all, split in two so that work can run while it is on the
// wire: start_exchange issues it, finish() waits for it (once) and returns the
// rows. Every rank must start its exchanges of a group in the same order. It
// counts as in flight for the communication scheduler until it is done.
struct PendingExchange {
  at::Tensor output;
  at::Tensor input;  // kept alive until the collective is done
  c10::intrusive_ptr<c10d::Work> work;
  std::unique_ptr<comm_stats::CollectiveTimer> timer;
  at::Tensor finish();
};
PendingExchange start_exchange(const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
                               const std::vector<int64_t>& input_split_sizes, c10d::ProcessGroup& group,
                               const char* op, const char* phase = nullptr);

// How many collectives the ops have issued, for tests and profiling.
struct CollectiveCounts {
  int64_t token_all_to_alls;  // all_to_all calls and the token exchanges of dispatch / combine
  int64_t count_exchanges;    // dispatch's exchanges of tokens-per-expert (dropless mode)
};
CollectiveCounts collective_counts();
void reset_collective_counts();
void count_token_all_to_all();
void count_count_exchange();

}  // namespace moeflux
