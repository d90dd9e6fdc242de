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
constexpr int kMaxValuesPerLane = 32;  // the largest VALUES_PER_LANE launched below: a warp holds 32 * 32 logits
static_assert(32 * kMaxValuesPerLane >= kMaxCudaExperts, "a warp must hold every expert of a token");

// Does candidate (v, e) rank before (best, best_e)? e == num_experts means "none".
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, int e, acc_t best, int best_e, int num_experts) {
  if (e >= num_experts) return false;
  if (best_e >= num_experts) return true;
  return v > best || (v == best && e < best_e);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

struct RouteArgs {
  int64_t num_tokens;
  int num_experts, k;
  bool renormalize, sigmoid;
  double scale;
};

template <typename scalar_t, int VALUES_PER_LANE>
__global__ void route_forward_kernel(const scalar_t* __restrict__ logits, const at::opmath_type<scalar_t>* __restrict__ bias,
                                     const bool* __restrict__ allowed, RouteArgs args,
                                     at::opmath_type<scalar_t>* __restrict__ weights,
                                     int32_t* __restrict__ expert_ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32, num_experts = args.num_experts, k = args.k;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= args.num_tokens) return;
  const scalar_t* row = logits + t * num_experts;

  acc_t logit[VALUES_PER_LANE], choice[VALUES_PER_LANE];
  acc_t max = -INFINITY;
#pragma unroll
  for (int i = 0; i < VALUES_PER_LANE; ++i) {
    const int e = lane + 32 * i;
    logit[i] = e < num_experts ? static_cast<acc_t>(row[e]) : -INFINITY;
    max = ::max(max, logit[i]);
  }
  max = warp_max(max);
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < VALUES_PER_LANE; ++i) {
    if (lane + 32 * i < num_experts) sum += exp(logit[i] - max);
  }
  sum = warp_sum(sum);

  // Experts that cannot be chosen (past the end, or outside the allowed groups) start out taken.
  uint32_t taken = 0;
#pragma unroll
  for (int i = 0; i < VALUES_PER_LANE; ++i) {
    const int e = lane + 32 * i;
    if (e >= num_experts || (allowed != nullptr && !allowed[t * num_experts + e])) taken |= 1u << i;
    const acc_t score = args.sigmoid ? sigmoid(logit[i]) : exp(logit[i] - max) / sum;
    choice[i] = (bias != nullptr && e < num_experts) ? score + bias[e] : logit[i];
  }

  // k rounds of arg-max over the experts not yet taken; ties go to the lower index.
  acc_t selected_sum = 0;
  for (int j = 0; j < k; ++j) {
    acc_t best = -INFINITY;
    int best_e = num_experts;  // none yet
#pragma unroll
    for (int i = 0; i < VALUES_PER_LANE; ++i) {
      const int e = lane + 32 * i;
      if (!(taken >> i & 1u) && beats(choice[i], e, best, best_e, num_experts)) {
        best = choice[i];
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
    // The winner's logit, from the lane that holds it.
    acc_t mine = 0;
#pragma unroll
    for (int i = 0; i < VALUES_PER_LANE; ++i) {
      if (i == best_e / 32) mine = logit[i];
    }
    const acc_t best_logit = __shfl_sync(kFullMask, mine, best_e % 32);
    if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
    const acc_t p = args.sigmoid ? sigmoid(best_logit) : exp(best_logit - max);
    selected_sum += p;
    if (lane == 0) {
      weights[t * k + j] = p;
      expert_ids[t * k + j] = best_e;
    }
  }
  acc_t denom = 1;
  if (args.sigmoid) {
    denom = args.renormalize ? selected_sum + static_cast<acc_t>(kSigmoidNormEps) : acc_t(1);
  } else {
    denom = args.renormalize ? selected_sum : sum;
  }
  const acc_t factor = static_cast<acc_t>(args.scale) / denom;
  __syncwarp();
  for (int j = lane; j < k; j += 32) weights[t * k + j] *= factor;
}

// g = incoming gradient * scale, v = weights / scale, s = sum_j g_j v_j:
//   softmax: dl_e = -p_e s everywhere (0 with renormalize), then dl_{id_j} = v_j (g_j - s);
//   sigmoid: dl_{id_j} = g_j sig (1 - sig), or (g_j - s) / S sig (1 - sig) renormalized.
template <typename scalar_t>
__global__ void route_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_weights,
                                      const scalar_t* __restrict__ logits,
                                      const at::opmath_type<scalar_t>* __restrict__ weights,
                                      const int32_t* __restrict__ expert_ids, RouteArgs args,
                                      scalar_t* __restrict__ grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32, num_experts = args.num_experts, k = args.k;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= args.num_tokens) return;
  const scalar_t* row = logits + t * num_experts;
  scalar_t* grad_row = grad_logits + t * num_experts;
  const acc_t scale = static_cast<acc_t>(args.scale);

  acc_t s = 0, norm = 0;
  for (int j = lane; j < k; j += 32) {
    s += grad_weights[t * k + j] * scale * (weights[t * k + j] / scale);
    if (args.sigmoid) norm += sigmoid(static_cast<acc_t>(row[expert_ids[t * k + j]]));
  }
  s = warp_sum(s);
  norm = warp_sum(norm) + static_cast<acc_t>(kSigmoidNormEps);

  if (args.sigmoid || args.renormalize) {
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
    const int e = expert_ids[t * k + j];
    const acc_t g = grad_weights[t * k + j] * scale, v = weights[t * k + j] / scale;
    acc_t d;
    if (args.sigmoid) {
      const acc_t sig = sigmoid(static_cast<acc_t>(row[e]));
      d = (args.renormalize ? (g - s) / norm : g) * sig * (1 - sig);
    } else {
      d = v * (g - s);
    }
    grad_row[e] = static_cast<scalar_t>(d);
  }
}

template <typename scalar_t, int VALUES_PER_LANE>
void launch_route_forward(const at::Tensor& logits, const RouteArgs& args, const at::Tensor& bias,
                          const at::Tensor& allowed, at::Tensor& weights, at::Tensor& expert_ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  route_forward_kernel<scalar_t, VALUES_PER_LANE>
      <<<ceil_div(args.num_tokens, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
          allowed.defined() ? allowed.const_data_ptr<bool>() : nullptr, args,
          weights.mutable_data_ptr<acc_t>(), expert_ids.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

RouteArgs route_args(const at::Tensor& logits, int64_t k, const RouteOptions& options) {
  return {logits.size(0), static_cast<int>(logits.size(1)), static_cast<int>(k), options.renormalize,
          options.sigmoid, options.scale};
}

}  // namespace

void route_forward(const at::Tensor& logits, const RouteOptions& options, const at::Tensor& bias,
                   const at::Tensor& allowed, at::Tensor& weights, at::Tensor& expert_ids) {
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts <= kMaxCudaExperts, "moeflux.route: CUDA supports up to ", kMaxCudaExperts,
              " experts, got num_experts = ", num_experts);
  const c10::cuda::CUDAGuard guard(logits.device());
  const RouteArgs args = route_args(logits, weights.size(1), options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_cuda", [&] {
    if (num_experts <= 32) {
      launch_route_forward<scalar_t, 1>(logits, args, bias, allowed, weights, expert_ids);
    } else if (num_experts <= 64) {
      launch_route_forward<scalar_t, 2>(logits, args, bias, allowed, weights, expert_ids);
    } else if (num_experts <= 128) {
      launch_route_forward<scalar_t, 4>(logits, args, bias, allowed, weights, expert_ids);
    } else if (num_experts <= 256) {
      launch_route_forward<scalar_t, 8>(logits, args, bias, allowed, weights, expert_ids);
    } else if (num_experts <= 512) {
      launch_route_forward<scalar_t, 16>(logits, args, bias, allowed, weights, expert_ids);
    } else {
      launch_route_forward<scalar_t, 32>(logits, args, bias, allowed, weights, expert_ids);
    }
  });
}

void route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                    const at::Tensor& expert_ids, const RouteOptions& options, at::Tensor& grad_logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RouteArgs args = route_args(logits, weights.size(1), options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_backward_kernel<scalar_t><<<ceil_div(args.num_tokens, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        grad_weights.const_data_ptr<acc_t>(), logits.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(),
        expert_ids.const_data_ptr<int32_t>(), args, grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moeflux::cuda
