// The schedule: see schedule.h.
#include "csrc/exchange/schedule.h"

#include <ATen/ATen.h>

namespace moeflux {
namespace {

// The rows [begin, end) of a segment of `rows` rows that `stage` moves between this rank and `peer`.
std::pair<int64_t, int64_t> stage_part(const Schedule& s, int64_t stage, int64_t rank, int64_t peer, int64_t rows,
                                       bool sending) {
  if (!s.pairwise) return {rows * stage / s.stages, rows * (stage + 1) / s.stages};
  const int64_t groups = s.stages, mine = rank / s.group_size, theirs = peer / s.group_size;
  const int64_t partner = sending ? (mine + stage) % groups : (mine - stage + groups) % groups;
  return theirs == partner ? std::pair<int64_t, int64_t>{0, rows} : std::pair<int64_t, int64_t>{0, 0};
}

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
  if (device.is_cpu()) return t;
  return t.pin_memory().to(device, /*non_blocking=*/true);  // no host synchronisation
}

}  // namespace

Schedule parse_schedule(c10::string_view name, int64_t chunks, int64_t group_size, int64_t world, const char* op) {
  TORCH_CHECK(name == "bulk" || name == "chunked" || name == "pairwise", "moeflux.", op, ": schedule must be ",
              "'bulk', 'chunked' or 'pairwise', got '", std::string(name), "'");
  if (name == "bulk") return {false, 1, 1};
  if (name == "chunked") {
    TORCH_CHECK(chunks >= 1, "moeflux.", op, ": chunks must be >= 1, got ", chunks);
    return {false, chunks, 1};
  }
  TORCH_CHECK(group_size >= 1 && world % group_size == 0, "moeflux.", op, ": group_size must divide the ",
              "expert-parallel group size ", world, ", got ", group_size);
  return {true, world / group_size, group_size};
}

// sent[r][j] / received[q][j]: rows of the segment of (rank, local expert j) before staging;
// start[r][j]: where this rank's segment for (r, j) begins in its permuted block.
std::vector<Stage> plan_stages(const Schedule& schedule, int64_t rank, const at::Tensor& sent,
                               const at::Tensor& received, const std::vector<int64_t>& start,
                               const at::Device& device) {
  const int64_t world = sent.size(0), local = sent.size(1);
  const int64_t* out = sent.const_data_ptr<int64_t>();
  const int64_t* in = received.const_data_ptr<int64_t>();
  std::vector<Stage> stages(schedule.stages);
  for (int64_t s = 0; s < schedule.stages; ++s) {
    Stage& st = stages[s];
    st.send_splits.assign(world, 0);
    st.recv_splits.assign(world, 0);
    std::vector<int32_t> expert_rows(local, 0);
    std::vector<int64_t> send_index, recv_offset(world * local), recv_rows(world * local);
    for (int64_t r = 0; r < world; ++r) {
      for (int64_t j = 0; j < local; ++j) {
        const auto [begin, end] = stage_part(schedule, s, rank, r, out[r * local + j], /*sending=*/true);
        for (int64_t i = begin; i < end; ++i) send_index.push_back(start[r * local + j] + i);
        st.send_splits[r] += end - begin;
      }
    }
    int64_t offset = 0;
    for (int64_t q = 0; q < world; ++q) {
      for (int64_t j = 0; j < local; ++j) {
        const auto [begin, end] = stage_part(schedule, s, rank, q, in[q * local + j], /*sending=*/false);
        recv_offset[q * local + j] = offset;
        recv_rows[q * local + j] = end - begin;
        offset += end - begin;
        st.recv_splits[q] += end - begin;
        expert_rows[j] += static_cast<int32_t>(end - begin);
      }
    }
    std::vector<int64_t> regroup;
    regroup.reserve(offset);
    for (int64_t j = 0; j < local; ++j) {
      for (int64_t q = 0; q < world; ++q) {
        for (int64_t i = 0; i < recv_rows[q * local + j]; ++i) regroup.push_back(recv_offset[q * local + j] + i);
      }
    }
    st.send_index = index_tensor(send_index, device);
    st.regroup = index_tensor(regroup, device);
    st.expert_rows = at::tensor(expert_rows, at::kInt);
  }
  return stages;
}

}  // namespace moeflux
