// Reads of routing counts on the host. On a GPU each one is a host
// synchronisation (the copy waits for the kernels that produced the counts),
// so every such read in moeflux goes through counts_to_host, which counts it:
// tests check how many a layer's forward and backward make, on any device.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace moeflux {

// `counts` on the host (a copy; a synchronisation when it lives on a GPU). Counted.
at::Tensor counts_to_host(const at::Tensor& counts);

int64_t host_count_reads();
void reset_host_count_reads();

}  // namespace moeflux
