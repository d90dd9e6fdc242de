// The count exchange of dropless expert parallelism, shared by dispatch and the pipelined layer.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace moeflux {

struct ExchangedCounts {
  at::Tensor sent;                // [P, E_local] int64, host: rows this rank sends to each rank's experts
  at::Tensor received;            // [P, E_local] int64, host: rows each rank sends to this rank's experts
  at::Tensor received_on_device;  // the same, on the tokens' device
};

// One all-to-all of [E_local counts, hidden size, dtype, num_experts] per rank pair and the one host
// synchronisation of a dropless step; raises the same error on every rank when they disagree on the header.
ExchangedCounts exchange_counts(const at::Tensor& tokens, const at::Tensor& tokens_per_expert, int64_t num_experts,
                                c10d::ProcessGroup& group, const char* op);

// The same from routing_counts' [P, E] matrix (already on the host): no collective, no synchronisation.
ExchangedCounts counts_from_routing(const at::Tensor& routing_counts, int64_t rank, int64_t world,
                                    const at::Device& device, const char* op);

}  // namespace moeflux
