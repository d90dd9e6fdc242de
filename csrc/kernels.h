// Per-device kernels behind the ops. The op front-ends (route.cpp,
// permute.cpp) check arguments, allocate outputs and call the kernels of the
// input's device. Kernels take contiguous tensors, write into the given
// outputs, and read an undefined tensor as "absent".
#pragma once

#include <ATen/core/Tensor.h>

namespace moeflux {

// How route turns logits into weights (see route() in ops.h).
struct RouteOptions {
  bool renormalize = false;  // divide the k weights by their sum
  bool sigmoid = false;      // scores: sigmoid(logits) instead of softmax(logits)
  double scale = 1.0;        // multiplies the final weights (DeepSeek's routed_scaling_factor)
};

namespace cpu {
#include "csrc/kernel_api.inc"
}
#ifdef MOEFLUX_WITH_CUDA
namespace cuda {
#include "csrc/kernel_api.inc"
}
#endif
}  // namespace moeflux

// Calls moeflux::<device>::fn for the device of tensor t.
#ifdef MOEFLUX_WITH_CUDA
#define MOEFLUX_ON_DEVICE(t, fn, ...) ((t).is_cuda() ? ::moeflux::cuda::fn(__VA_ARGS__) : ::moeflux::cpu::fn(__VA_ARGS__))
#else
#define MOEFLUX_ON_DEVICE(t, fn, ...) ::moeflux::cpu::fn(__VA_ARGS__)
#endif
