// all_to_all op: ProcessGroup::alltoall_base with uneven splits, resolved by
// group name (the public registry), never by casting to a backend class.
#include "csrc/distributed/all_to_all.h"

#include <atomic>
#include <numeric>

#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "csrc/checks.h"
#include "csrc/distributed/agreement.h"
#include "csrc/cpu/huge_pages.h"
#include "csrc/distributed/comm_scheduler.h"
#include "csrc/ops.h"
#include "csrc/profiling/comm_stats.h"

namespace moeflux {
namespace {

std::atomic<int64_t> token_all_to_alls{0};
std::atomic<int64_t> count_exchanges{0};

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

void check_splits(const std::vector<int64_t>& splits, int64_t world, const char* op, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(splits.size()) == world, "moeflux.", op, ": ", name,
              " must have one entry per rank of the group (", world, "), got ", splits.size());
  for (size_t r = 0; r < splits.size(); ++r) {
    TORCH_CHECK(splits[r] >= 0, "moeflux.", op, ": ", name, " must be >= 0, got ", splits[r], " for rank ", r);
  }
}

void check_exchange_args(const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
                         const std::vector<int64_t>& input_split_sizes, int64_t world, const char* op) {
  check_splits(output_split_sizes, world, op, "output_split_sizes");
  check_splits(input_split_sizes, world, op, "input_split_sizes");
  TORCH_CHECK(input.dim() >= 1 && sum(input_split_sizes) == input.size(0), "moeflux.", op,
              ": input_split_sizes must sum to input.size(0) = ", input.dim() >= 1 ? input.size(0) : 0, ", got ",
              sum(input_split_sizes));
}

}  // namespace

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name, const char* op) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "moeflux.", op, ": no process group is registered under group_name '", group_name,
                "' (pass group.group_name of a torch.distributed group): ", e.what_without_backtrace());
  }
}

int64_t group_timeout_ms(const std::string& group_name) {
  const auto group = resolve_group(group_name, "group_timeout");
  return group->getDefaultBackend()->getBackendOptions()->timeout.count();
}

PendingExchange start_exchange(const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
                               const std::vector<int64_t>& input_split_sizes, c10d::ProcessGroup& group,
                               const char* op, const char* phase) {
  check_exchange_args(input, output_split_sizes, input_split_sizes, group.getSize(), op);
  std::vector<int64_t> shape = input.sizes().vec();
  shape[0] = sum(output_split_sizes);
  at::Tensor output = at::empty(shape, input.options());
  cpu::advise_huge_pages(output);
  at::Tensor in = input.contiguous();
  std::vector<int64_t> out_splits = output_split_sizes, in_splits = input_split_sizes;
  phase = phase != nullptr ? phase : op;
  RECORD_FUNCTION(std::string("moeflux::") + phase, std::vector<c10::IValue>());
  std::vector<int64_t> bytes_to_rank;
  if (comm_stats::enabled()) {
    const int64_t row_bytes = input.numel() == 0 ? 0 : input.nbytes() / input.size(0);
    for (const int64_t rows : input_split_sizes) bytes_to_rank.push_back(rows * row_bytes);
  }
  PendingExchange pending{output, in, nullptr,
                          std::make_unique<comm_stats::CollectiveTimer>(phase, group.getGroupName(), group.getRank(),
                                                                        input, std::move(bytes_to_rank))};
  // alltoall_base is the all-to-all that every supported torch has (2.14 adds
  // all_to_all_single and deprecates this name).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  // Registered with the communication scheduler from before it is queued until
  // it is done, so that no gradient all-reduce micro-op starts meanwhile (on a
  // device: until the device has run it, which the host wait does not tell).
  comm_scheduler::AllToAllInFlight in_flight;
  pending.work = group.alltoall_base(output, in, out_splits, in_splits);
#pragma GCC diagnostic pop
  in_flight.until_done(pending.work);
  pending.timer->enqueued();
  return pending;
}

at::Tensor PendingExchange::finish() {
  if (work) {
    timer->waiting();
    work->wait();  // on a device: makes the current stream wait, no host synchronisation
    timer->done();
    work.reset();
    input = at::Tensor();
  }
  return output;
}

at::Tensor exchange_rows(const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
                         const std::vector<int64_t>& input_split_sizes, c10d::ProcessGroup& group, const char* op,
                         const char* phase) {
  return start_exchange(input, output_split_sizes, input_split_sizes, group, op, phase).finish();
}

namespace {

// Every rank sends its check result, its rows' shape and dtype and both of its split vectors to every rank, so
// that each rank checks every pair of ranks (what s sends to d against what d expects from s) on the same data:
// all reach the same verdict, with the same message, in one exchange sized by the group alone.
void agree_on_splits(const at::Tensor& input, const std::vector<int64_t>& out_splits,
                     const std::vector<int64_t>& in_splits, c10d::ProcessGroup& group, const std::string& error) {
  const int64_t world = group.getSize(), n = 3 + 2 * world;
  std::vector<int64_t> mine(n, 0);  // zeros from a rank whose checks failed: exchange_checked raises first
  if (error.empty()) {
    mine[0] = input.dim();
    mine[1] = c10::multiply_integers(input.sizes().slice(1));  // elements per row
    mine[2] = static_cast<int64_t>(input.scalar_type());
    std::copy(in_splits.begin(), in_splits.end(), mine.begin() + 3);
    std::copy(out_splits.begin(), out_splits.end(), mine.begin() + 3 + world);
  }
  const at::Tensor all = exchange_checked(group, mine, "all_to_all", exchange_device(input.device()), error);
  const int64_t* h = all.const_data_ptr<int64_t>();
  for (int64_t r = 1; r < world; ++r) {
    TORCH_CHECK(std::equal(h + r * n, h + r * n + 3, h), "moeflux.all_to_all: ranks of the process group ",
                "disagree on the rows: rank 0 sends ", h[0], "-D rows of ", h[1], " elements of dtype ",
                static_cast<at::ScalarType>(h[2]), ", rank ", r, " sends ", h[r * n], "-D rows of ",
                h[r * n + 1], " elements of dtype ", static_cast<at::ScalarType>(h[r * n + 2]));
  }
  for (int64_t src = 0; src < world; ++src) {
    for (int64_t dst = 0; dst < world; ++dst) {
      const int64_t sent = h[src * n + 3 + dst], expected = h[dst * n + 3 + world + src];
      TORCH_CHECK(sent == expected, "moeflux.all_to_all: rank ", src, " sends ", sent, " rows to rank ", dst,
                  ", which expects ", expected, " (rank ", src, "'s input_split_sizes[", dst, "] must equal rank ",
                  dst, "'s output_split_sizes[", src, "])");
    }
  }
}

}  // namespace

at::Tensor all_to_all(const at::Tensor& input, at::IntArrayRef output_split_sizes, at::IntArrayRef input_split_sizes,
                      const std::string& group_name, bool agree_first) {
  const auto group = resolve_group(group_name, "all_to_all");
  const std::vector<int64_t> out_splits = output_split_sizes.vec(), in_splits = input_split_sizes.vec();
  const auto local_checks = [&] {
    check_device_supported(input, "all_to_all", "input");
    check_exchange_args(input, out_splits, in_splits, group->getSize(), "all_to_all");
  };
  if (agree_first) {
    agree_on_splits(input, out_splits, in_splits, *group, local_error(local_checks));
  } else {
    local_checks();
  }
  count_token_all_to_all();
  return exchange_rows(input, out_splits, in_splits, *group, "all_to_all");
}

CollectiveCounts collective_counts() { return {token_all_to_alls.load(), count_exchanges.load()}; }

void reset_collective_counts() {
  token_all_to_alls = 0;
  count_exchanges = 0;
}

void count_token_all_to_all() { ++token_all_to_alls; }
void count_count_exchange() { ++count_exchanges; }

}  // namespace moeflux
