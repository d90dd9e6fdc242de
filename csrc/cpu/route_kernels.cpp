// CPU kernels of the route op: one token per iteration, tokens in parallel.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "csrc/kernels.h"

namespace moeflux::cpu {
namespace {

// Grain: tokens per task; a token costs O(E) work.
int64_t token_grain(int64_t num_experts) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(num_experts, 1)); }

// Max and sum(exp(x - max)) of one row of logits.
template <typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> softmax_stats(const scalar_t* row, int64_t n) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < n; ++e) max = std::max(max, static_cast<acc_t>(row[e]));
  acc_t sum = 0;
  for (int64_t e = 0; e < n; ++e) sum += std::exp(static_cast<acc_t>(row[e]) - max);
  return {max, sum};
}

}  // namespace

void route_forward(const at::Tensor& logits, bool renormalize, at::Tensor& weights, at::Tensor& expert_ids) {
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = weights.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    acc_t* w_out = weights.mutable_data_ptr<acc_t>();
    int32_t* id_out = expert_ids.mutable_data_ptr<int32_t>();
    at::parallel_for(0, num_tokens, token_grain(num_experts), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> order(num_experts);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = in + t * num_experts;
        std::iota(order.begin(), order.end(), 0);
        // Largest logit first; ties go to the lower expert index, as on CUDA.
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
          const acc_t va = static_cast<acc_t>(row[a]), vb = static_cast<acc_t>(row[b]);
          return va > vb || (va == vb && a < b);
        });
        const acc_t max = static_cast<acc_t>(row[order[0]]);
        acc_t denom = 0;
        if (renormalize) {
          for (int64_t j = 0; j < k; ++j) denom += std::exp(static_cast<acc_t>(row[order[j]]) - max);
        } else {
          denom = softmax_stats<scalar_t, acc_t>(row, num_experts).second;
        }
        for (int64_t j = 0; j < k; ++j) {
          w_out[t * k + j] = std::exp(static_cast<acc_t>(row[order[j]]) - max) / denom;
          id_out[t * k + j] = order[j];
        }
      }
    });
  });
}

// With s = sum_j g_j w_j over the selected experts:
//   softmax over all experts:   dl_e = p_e * (G_e - s), G_e = g_j if e = id_j else 0
//   renormalized over the top k: dl_e = w_j * (g_j - s) if e = id_j else 0
void route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                    const at::Tensor& expert_ids, bool renormalize, at::Tensor& grad_logits) {
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = weights.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    const acc_t* g = grad_weights.const_data_ptr<acc_t>();
    const acc_t* w = weights.const_data_ptr<acc_t>();
    const int32_t* ids = expert_ids.const_data_ptr<int32_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, token_grain(num_experts), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = in + t * num_experts;
        scalar_t* drow = out + t * num_experts;
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += g[t * k + j] * w[t * k + j];
        if (renormalize) {
          std::fill(drow, drow + num_experts, scalar_t(0));
        } else {
          const auto [max, sum] = softmax_stats<scalar_t, acc_t>(row, num_experts);
          for (int64_t e = 0; e < num_experts; ++e) {
            drow[e] = static_cast<scalar_t>(-std::exp(static_cast<acc_t>(row[e]) - max) / sum * s);
          }
        }
        // For a selected expert p_e = w_j (without renormalisation), so both cases read the same.
        for (int64_t j = 0; j < k; ++j) {
          drow[ids[t * k + j]] = static_cast<scalar_t>(w[t * k + j] * (g[t * k + j] - s));
        }
      }
    });
  });
}

}  // namespace moeflux::cpu
