// The count/header exchange of dropless expert parallelism, written once: dispatch, the staged engine and (as the
// count_exchange op) the hierarchical transport all run it.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace moeflux {

struct ExchangedCounts {
  at::Tensor sent;                // [P, m] (dispatch: [P, E_local]) int64, host: rows this rank sends to each rank's experts
  at::Tensor received;            // [P, E_local] int64, host: rows each rank sends to this rank's experts
  at::Tensor received_on_device;  // the same, on the tokens' device
};

// One all-to-all of [counts for that rank, hidden size, dtype, num_experts] per rank pair and the one host
// synchronisation of a dropless step; raises the same error on every rank when they disagree on the header.
// counts: [P * m] or [P, m] (dispatch: tokens_per_expert [E], m = E_local); sent / received are [P, m].
// A failed rank joins with a header its peers reject (moeflux.exchange.failed_probe), so they raise too.
// site: what moeflux.ops.host_reads() counts the read as.
ExchangedCounts exchange_counts(const at::Tensor& tokens, const at::Tensor& counts, int64_t num_experts,
                                c10d::ProcessGroup& group, const char* op, const char* site = "counts:dispatch");

// The same from routing_counts' [P, E] matrix (already on the host): no collective, no synchronisation.
ExchangedCounts counts_from_routing(const at::Tensor& routing_counts, int64_t rank, int64_t world,
                                    const at::Device& device, const char* op);

}  // namespace moeflux
