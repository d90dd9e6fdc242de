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
template <typename acc_t>
std::pair<acc_t, acc_t> softmax_stats(const acc_t* row, int64_t n) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < n; ++e) max = std::max(max, row[e]);
  acc_t sum = 0;
  for (int64_t e = 0; e < n; ++e) sum += std::exp(row[e] - max);
  return {max, sum};
}

template <typename acc_t>
acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

}  // namespace

void route_forward(const at::Tensor& logits, const RouteOptions& options, const at::Tensor& bias,
                   const at::Tensor& allowed, at::Tensor& weights, at::Tensor& expert_ids) {
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = weights.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    const bool* ok = allowed.defined() ? allowed.const_data_ptr<bool>() : nullptr;
    acc_t* w_out = weights.mutable_data_ptr<acc_t>();
    int32_t* id_out = expert_ids.mutable_data_ptr<int32_t>();
    at::parallel_for(0, num_tokens, token_grain(num_experts), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> logit(num_experts), score(num_experts), choice(num_experts);
      std::vector<int32_t> order;
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t e = 0; e < num_experts; ++e) logit[e] = static_cast<acc_t>(in[t * num_experts + e]);
        if (options.sigmoid) {
          for (int64_t e = 0; e < num_experts; ++e) score[e] = sigmoid(logit[e]);
        } else {
          const auto [max, sum] = softmax_stats(logit.data(), num_experts);
          for (int64_t e = 0; e < num_experts; ++e) score[e] = std::exp(logit[e] - max) / sum;
        }
        for (int64_t e = 0; e < num_experts; ++e) choice[e] = b ? score[e] + b[e] : logit[e];
        order.clear();
        for (int32_t e = 0; e < num_experts; ++e) {
          if (!ok || ok[t * num_experts + e]) order.push_back(e);
        }
        // Largest choice first; ties go to the lower expert index, as on CUDA.
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t c) {
          return choice[a] > choice[c] || (choice[a] == choice[c] && a < c);
        });
        acc_t* w = w_out + t * k;
        if (options.renormalize && !options.sigmoid) {  // softmax over the chosen logits
          acc_t top = -std::numeric_limits<acc_t>::infinity(), denom = 0;
          for (int64_t j = 0; j < k; ++j) top = std::max(top, logit[order[j]]);
          for (int64_t j = 0; j < k; ++j) denom += std::exp(logit[order[j]] - top);
          for (int64_t j = 0; j < k; ++j) w[j] = std::exp(logit[order[j]] - top) / denom;
        } else {
          acc_t denom = 0;
          for (int64_t j = 0; j < k; ++j) denom += score[order[j]];
          denom = options.renormalize ? denom + static_cast<acc_t>(kSigmoidNormEps) : acc_t(1);
          for (int64_t j = 0; j < k; ++j) w[j] = score[order[j]] / denom;
        }
        for (int64_t j = 0; j < k; ++j) {
          w[j] *= static_cast<acc_t>(options.scale);
          id_out[t * k + j] = order[j];
        }
      }
    });
  });
}

// With g the incoming gradient times scale and v = weights / scale:
//   softmax:                 dl_e = p_e * (G_e - s), s = sum_j g_j v_j, G_e = g_j if e = id_j else 0
//   softmax, renormalized:   dl_e = v_j * (g_j - s) if e = id_j else 0
//   sigmoid:                 dl_e = g_j * sig_e (1 - sig_e) if e = id_j else 0
//   sigmoid, renormalized:   dl_e = (g_j - sum_i g_i v_i) / S * sig_e (1 - sig_e), S = sum_j sig_j + eps
void route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                    const at::Tensor& expert_ids, const RouteOptions& options, at::Tensor& grad_logits) {
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = weights.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moeflux_route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    const acc_t* g_in = grad_weights.const_data_ptr<acc_t>();
    const acc_t* w_in = weights.const_data_ptr<acc_t>();
    const int32_t* ids = expert_ids.const_data_ptr<int32_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(options.scale);
    at::parallel_for(0, num_tokens, token_grain(num_experts), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(num_experts);
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* drow = out + t * num_experts;
        auto g = [&](int64_t j) { return g_in[t * k + j] * scale; };
        auto v = [&](int64_t j) { return w_in[t * k + j] / scale; };
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += g(j) * v(j);
        for (int64_t e = 0; e < num_experts; ++e) row[e] = static_cast<acc_t>(in[t * num_experts + e]);
        if (options.sigmoid) {
          std::fill(drow, drow + num_experts, scalar_t(0));
          acc_t norm = 0;
          for (int64_t j = 0; j < k; ++j) norm += sigmoid(row[ids[t * k + j]]);
          norm += static_cast<acc_t>(kSigmoidNormEps);
          for (int64_t j = 0; j < k; ++j) {
            const acc_t sig = sigmoid(row[ids[t * k + j]]);
            const acc_t d_score = options.renormalize ? (g(j) - s) / norm : g(j);
            drow[ids[t * k + j]] = static_cast<scalar_t>(d_score * sig * (1 - sig));
          }
          continue;
        }
        if (options.renormalize) {
          std::fill(drow, drow + num_experts, scalar_t(0));
        } else {
          const auto [max, sum] = softmax_stats(row.data(), num_experts);
          for (int64_t e = 0; e < num_experts; ++e) drow[e] = static_cast<scalar_t>(-std::exp(row[e] - max) / sum * s);
        }
        // For a selected expert p_e = v_j (without renormalisation), so both cases read the same.
        for (int64_t j = 0; j < k; ++j) drow[ids[t * k + j]] = static_cast<scalar_t>(v(j) * (g(j) - s));
      }
    });
  });
}

}  // namespace moeflux::cpu
