// The kernels each device implements (csrc/cpu/, cuda/), declared once as
// function types. The op front-ends (route.cpp, permute.cpp) check arguments,
// allocate outputs and call one device's kernels; registration.cpp registers
// a front-end per dispatch key with that device's table. Kernels take
// contiguous tensors, write into the given outputs, and read an undefined
// tensor as "absent".
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace moeflux {

// How route turns logits into weights (see route() in ops.h).
struct RouteOptions {
  bool renormalize = false;  // divide the k weights by their sum
  bool sigmoid = false;      // scores: sigmoid(logits) instead of softmax(logits)
  double scale = 1.0;        // multiplies the final weights (DeepSeek's routed_scaling_factor)
};

// Added to the sum of sigmoid weights before renormalising, as DeepSeek-V3 does.
constexpr double kSigmoidNormEps = 1e-20;

// The CUDA route and permute kernels keep per-expert state in registers / shared memory.
constexpr int64_t kMaxCudaExperts = 1024;

// expert_ids[t, :] = the k experts with the largest choice value (k = weights.size(1)),
// largest first, ties to the lower index; choice = logit, or score + bias[e] when a
// bias is given; experts with allowed[t, e] == false (when given) are never chosen.
// weights = scale * score of each chosen expert, score = softmax(logits[t]) or
// sigmoid(logits[t]); with renormalize divided by the sum over the k (for softmax
// that is the softmax over the chosen logits: Mixtral's top-k-then-softmax).
using RouteForwardKernel = void(const at::Tensor& logits, const RouteOptions& options, const at::Tensor& bias,
                                const at::Tensor& allowed, at::Tensor& weights, at::Tensor& expert_ids);

// grad_logits = d(weights)/d(logits)^T grad_weights.
using RouteBackwardKernel = void(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                                 const at::Tensor& expert_ids, const RouteOptions& options, at::Tensor& grad_logits);

// Stable counting sort of the assignments (t, j), in token order, by expert.
// row_map[t, j] is the destination row, or -1 when dropped (expert id -1, or
// past the capacity). capacity < 0: dropless, rows packed expert after expert;
// capacity >= 0: expert e owns rows [e * capacity, (e + 1) * capacity).
// tokens_per_expert[e] counts the rows expert e received.
using BuildRowMapKernel = void(const at::Tensor& expert_ids, int64_t num_experts, int64_t capacity,
                               at::Tensor& row_map, at::Tensor& tokens_per_expert);

// out[row_map[t, j]] = x[t] * weights[t, j] (weights may be absent: factor 1);
// rows that no (t, j) maps to are zeroed. When dot_rows is given, also
// dot[t, j] = <x[t], dot_rows[row_map[t, j]]>, 0 for dropped slots.
using ScatterRowsKernel = void(const at::Tensor& x, const at::Tensor& row_map, const at::Tensor& weights,
                               at::Tensor& out, const at::Tensor& dot_rows, at::Tensor& dot);

// out[t] = sum_j weights[t, j] * rows[row_map[t, j]] over the slots that are not
// dropped, accumulated in float (double for float64 rows).
using GatherRowsKernel = void(const at::Tensor& rows, const at::Tensor& row_map, const at::Tensor& weights,
                              at::Tensor& out);

// One device's kernels.
struct DeviceKernels {
  RouteForwardKernel* route_forward;
  RouteBackwardKernel* route_backward;
  BuildRowMapKernel* build_row_map;
  ScatterRowsKernel* scatter_rows;
  GatherRowsKernel* gather_rows;
};

namespace cpu {
extern const DeviceKernels kernels;  // csrc/cpu/kernels.cpp
}
#ifdef MOEFLUX_WITH_CUDA
namespace cuda {
extern const DeviceKernels kernels;  // cuda/kernels.cu
}
#endif

// The kernels of t's device, for the device-generic collective ops (dispatch,
// combine) that move rows wherever the tokens are; the per-device ops get
// theirs from the dispatcher instead (registration.cpp).
const DeviceKernels& kernels_for(const at::Tensor& t);

}  // namespace moeflux
