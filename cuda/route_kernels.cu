// CUDA kernels of the route op: one warp per token, the token's logits held in
// registers (VALUES_PER_LANE per lane), top-k by k rounds of warp arg-max.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "csrc/kernels.h"
#include "cuda/cuda_utils.cuh"

namespace moeflux::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxExperts = 32 * 32;

// Does candidate (v, e) rank before (best, best_e)? e == num_experts means "none".
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, int e, acc_t best, int best_e, int num_experts) {
  if (e >= num_experts) return false;
  if (best_e >= num_experts) return true;
  return v > best || (v == best && e < best_e);
}

template <typename scalar_t, int VALUES_PER_LANE>
__global__ void route_forward_kernel(const scalar_t* __restrict__ logits, int64_t num_tokens, int num_experts, int k,
                                     bool renormalize, at::opmath_type<scalar_t>* __restrict__ weights,
                                     int32_t* __restrict__ expert_ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= num_tokens) return;
  const scalar_t* row = logits + t * num_experts;

  acc_t value[VALUES_PER_LANE];
  acc_t max = -INFINITY;
#pragma unroll
  for (int i = 0; i < VALUES_PER_LANE; ++i) {
    const int e = lane + 32 * i;
    value[i] = e < num_experts ? static_cast<acc_t>(row[e]) : -INFINITY;
    max = ::max(max, value[i]);
  }
  max = warp_max(max);
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < VALUES_PER_LANE; ++i) {
    if (lane + 32 * i < num_experts) sum += exp(value[i] - max);
  }
  sum = warp_sum(sum);

  // k rounds of arg-max over the experts not yet taken; ties go to the lower index.
  uint32_t taken = 0;
  acc_t selected_sum = 0;
  for (int j = 0; j < k; ++j) {
    acc_t best = -INFINITY;
    int best_e = num_experts;  // none yet
#pragma unroll
    for (int i = 0; i < VALUES_PER_LANE; ++i) {
      const int e = lane + 32 * i;
      if (e < num_experts && !(taken >> i & 1u) && beats(value[i], e, best, best_e, num_experts)) {
        best = value[i];
        best_e = e;
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t other = __shfl_xor_sync(kFullMask, best, offset);
      const int other_e = __shfl_xor_sync(kFullMask, best_e, offset);
      if (beats(other, other_e, best, best_e, num_experts)) {
        best = other;
        best_e = other_e;
      }
    }
    if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
    const acc_t p = exp(best - max);
    selected_sum += p;
    if (lane == 0) {
      weights[t * k + j] = p;
      expert_ids[t * k + j] = best_e;
    }
  }
  const acc_t denom = renormalize ? selected_sum : sum;
  __syncwarp();
  for (int j = lane; j < k; j += 32) weights[t * k + j] /= denom;
}

// s = sum_j g_j w_j;  dl_e = -p_e s everywhere (0 with renormalize), then
// dl_{id_j} = w_j (g_j - s) for the selected experts.
template <typename scalar_t>
__global__ void route_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_weights,
                                      const scalar_t* __restrict__ logits,
                                      const at::opmath_type<scalar_t>* __restrict__ weights,
                                      const int32_t* __restrict__ expert_ids, int64_t num_tokens, int num_experts,
                                      int k, bool renormalize, scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= num_tokens) return;
  const scalar_t* row = logits + t * num_experts;
  scalar_t* grad_row = grad_logits + t * num_experts;

  acc_t s = 0;
  for (int j = lane; j < k; j += 32) s += grad_weights[t * k + j] * weights[t * k + j];
  s = warp_sum(s);

  if (renormalize) {
    for (int e = lane; e < num_experts; e += 32) grad_row[e] = scalar_t(0);
  } else {
    acc_t max = -INFINITY;
    for (int e = lane; e < num_experts; e += 32) max = ::max(max, static_cast<acc_t>(row[e]));
    max = warp_max(max);
    acc_t sum = 0;
    for (int e = lane; e < num_experts; e += 32) sum += exp(static_cast<acc_t>(row[e]) - max);
    sum = warp_sum(sum);
    for (int e = lane; e < num_experts; e += 32) {
      grad_row[e] = static_cast<scalar_t>(-exp(static_cast<acc_t>(row[e]) - max) / sum * s);
    }
  }
  __syncwarp();
  for (int j = lane; j < k; j += 32) {
    grad_row[expert_ids[t * k + j]] =
        static_cast<scalar_t>(weights[t * k + j] * (grad_weights[t * k + j] - s));
  }
}

template <typename scalar_t, int VALUES_PER_LANE>
void launch_route_forward(const at::Tensor& logits, bool renormalize, at::Tensor& weights, at::Tensor& expert_ids) {
  const int64_t num_tokens = logits.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  route_forward_kernel<scalar_t, VALUES_PER_LANE>
      <<<ceil_div(num_tokens, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), num_tokens, logits.size(1), weights.size(1), renormalize,
          weights.mutable_data_ptr<at::opmath_type<scalar_t>>(), expert_ids.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void route_forward(const at::Tensor& logits, bool renormalize, at::Tensor& weights, at::Tensor& expert_ids) {
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts <= kMaxExperts, "moeflux.route: CUDA supports up to ", kMaxExperts,
              " experts, got num_experts = ", num_experts);
  const c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_cuda", [&] {
    if (num_experts <= 32) {
      launch_route_forward<scalar_t, 1>(logits, renormalize, weights, expert_ids);
    } else if (num_experts <= 64) {
      launch_route_forward<scalar_t, 2>(logits, renormalize, weights, expert_ids);
    } else if (num_experts <= 128) {
      launch_route_forward<scalar_t, 4>(logits, renormalize, weights, expert_ids);
    } else if (num_experts <= 256) {
      launch_route_forward<scalar_t, 8>(logits, renormalize, weights, expert_ids);
    } else if (num_experts <= 512) {
      launch_route_forward<scalar_t, 16>(logits, renormalize, weights, expert_ids);
    } else {
      launch_route_forward<scalar_t, 32>(logits, renormalize, weights, expert_ids);
    }
  });
}

void route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                    const at::Tensor& expert_ids, bool renormalize, at::Tensor& grad_logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t num_tokens = logits.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_backward_kernel<scalar_t><<<ceil_div(num_tokens, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        grad_weights.const_data_ptr<acc_t>(), logits.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(),
        expert_ids.const_data_ptr<int32_t>(), num_tokens, logits.size(1), weights.size(1), renormalize,
        grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moeflux::cuda
