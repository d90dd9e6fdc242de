// The schedule of the staged exchange engine: which part of every segment of rows each stage moves.
//
// After permute, a rank's rows form one segment per (destination rank, local expert). A schedule is a pure
// function from those segments (their sizes on every rank) to stages:
//   bulk     one stage moves every segment whole (the plain exchange);
//   chunked  (Lina's micro-ops): stage c moves part c of n of every segment;
//   pairwise (FasterMoE's smart schedule): ranks form groups of g; stage s sends to group (mine + s) mod n
//            and receives from (mine - s) mod n.
// Experts act row by row, so any split of the rows gives the layer's output exactly; only the weight
// gradients add up stage by stage (a re-ordered sum).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace moeflux {

struct Schedule {
  bool pairwise = false;
  int64_t stages = 1;
  int64_t group_size = 1;  // pairwise: ranks per group
};

// "bulk", "chunked" (chunks stages) or "pairwise" (world / group_size stages); raises on anything else.
Schedule parse_schedule(c10::string_view name, int64_t chunks, int64_t group_size, int64_t world, const char* op);

// One stage's rows: what this rank sends (rows of its permuted block, by destination rank then local
// expert), what it receives (by source rank then local expert), and which received row becomes each
// expert row (by local expert then source).
struct Stage {
  std::vector<int64_t> send_splits, recv_splits;
  at::Tensor send_index;   // int64 on the rows' device: the permuted rows this stage sends
  at::Tensor regroup;      // int64 on the rows' device: received row of each expert row
  at::Tensor expert_rows;  // int32 [local] on the host: expert_ffn's segments without a device read
};

// sent[r][j] / received[q][j] ([P, E_local] int64 on the host): rows of the segment (rank, local expert j)
// before staging; start[r * E_local + j]: where this rank's segment for (r, j) begins in its permuted block.
std::vector<Stage> plan_stages(const Schedule& schedule, int64_t rank, const at::Tensor& sent,
                               const at::Tensor& received, const std::vector<int64_t>& start,
                               const at::Device& device);

}  // namespace moeflux
