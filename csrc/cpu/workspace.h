// Reused CPU memory for the experts' large buffers (activations, their
// gradients, weight gradients). glibc serves every large allocation with a
// fresh mmap, so each step page-faults and zeroes every page of every buffer
// again: on a CPU that is several percent of an MoE layer's step. Blocks freed
// here go back to a small pool and serve the next step's buffers of the same
// size without faults. Blocks are 2 MiB aligned and advised for transparent
// huge pages. Only CPU tensors; the pool keeps at most kMaxCachedBytes free.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace moeflux::cpu {

// An uninitialised contiguous CPU tensor; from the pool when it is large enough to be worth it.
at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes the pool holds free (not in use by any tensor), and freeing them.
int64_t workspace_cached_bytes();
void workspace_release();

}  // namespace moeflux::cpu
