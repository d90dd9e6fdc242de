#include <algorithm>
#include <numeric>

#include "csrc/ops.h"
#include "tests/cpp/test_helpers.h"

using namespace moeflux;

namespace {

// Brute force: sort every row, ties by index, softmax in double.
std::pair<at::Tensor, at::Tensor> reference_route(const at::Tensor& logits, int64_t k, bool renormalize) {
  const at::Tensor x = logits.to(at::kDouble).contiguous();
  const int64_t num_tokens = x.size(0), num_experts = x.size(1);
  at::Tensor weights = at::zeros({num_tokens, k}, at::kDouble), ids = at::zeros({num_tokens, k}, at::kInt);
  auto xa = x.accessor<double, 2>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<int64_t> order(num_experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return xa[t][a] > xa[t][b]; });
    double all = 0, top = 0;
    for (int64_t e = 0; e < num_experts; ++e) all += std::exp(xa[t][e]);
    for (int64_t j = 0; j < k; ++j) top += std::exp(xa[t][order[j]]);
    for (int64_t j = 0; j < k; ++j) {
      weights[t][j] = std::exp(xa[t][order[j]]) / (renormalize ? top : all);
      ids[t][j] = order[j];
    }
  }
  return {weights, ids};
}

// The Mixtral / Switch router: softmax scores, no bias, no groups, no scaling.
std::tuple<at::Tensor, at::Tensor> softmax_route(const at::Tensor& logits, int64_t k, bool renormalize) {
  return route(kernels_for(logits), logits, k, renormalize, "softmax", std::nullopt, 1, 1, 1.0);
}

}  // namespace

TEST_CASE("route matches a brute-force sort on random logits", "[route]") {
  auto gen = test::seeded(7);
  for (const at::Device device : test::devices()) {
    for (const int64_t num_experts : {1, 5, 64, 200}) {
      for (const int64_t k : {int64_t{1}, std::min<int64_t>(2, num_experts), num_experts}) {
        for (const bool renormalize : {false, true}) {
          const at::Tensor logits = at::randn({37, num_experts}, gen);
          const auto [weights, ids] = softmax_route(logits.to(device), k, renormalize);
          const auto [ref_w, ref_ids] = reference_route(logits, k, renormalize);
          INFO("device " << device << " E " << num_experts << " k " << k << " renormalize " << renormalize);
          CHECK(at::equal(ids.cpu(), ref_ids));
          CHECK(at::allclose(weights.cpu().to(at::kDouble), ref_w, 1e-6, 1e-6));
        }
      }
    }
  }
}

TEST_CASE("route breaks ties towards the lower expert index", "[route]") {
  for (const at::Device device : test::devices()) {
    const at::Tensor logits = at::tensor({0.5f, 2.0f, 2.0f, 2.0f}).view({1, 4}).to(device);
    const auto [weights, ids] = softmax_route(logits, 3, false);
    CHECK(at::equal(ids.cpu(), at::tensor({1, 2, 3}, at::kInt).view({1, 3})));
  }
}

TEST_CASE("route_backward is the transposed Jacobian", "[route]") {
  auto gen = test::seeded(3);
  for (const bool renormalize : {false, true}) {
    const at::Tensor logits = at::randn({6, 7}, gen, at::kDouble);
    const auto [weights, ids] = softmax_route(logits, 3, renormalize);
    const at::Tensor grad = at::randn({6, 3}, gen, at::kDouble);
    const at::Tensor grad_logits = route_backward(kernels_for(logits), grad, logits, weights, ids, renormalize, "softmax", 1.0);
    // Central differences of <grad, weights(logits)>.
    const double eps = 1e-6;
    at::Tensor numeric = at::zeros_like(logits);
    for (int64_t i = 0; i < logits.numel(); ++i) {
      at::Tensor plus = logits.clone(), minus = logits.clone();
      plus.view(-1)[i] += eps;
      minus.view(-1)[i] -= eps;
      const double f_plus = (std::get<0>(softmax_route(plus, 3, renormalize)) * grad).sum().item<double>();
      const double f_minus = (std::get<0>(softmax_route(minus, 3, renormalize)) * grad).sum().item<double>();
      numeric.view(-1)[i] = (f_plus - f_minus) / (2 * eps);
    }
    CHECK(at::allclose(grad_logits, numeric, 1e-6, 1e-7));
  }
}

TEST_CASE("route rejects k outside [1, E] with the argument's name", "[route][errors]") {
  const at::Tensor logits = at::zeros({2, 4});
  CHECK_THROWS_WITH(softmax_route(logits, 0, false), Catch::Contains("k must be in [1, num_experts = 4], got 0"));
  CHECK_THROWS_WITH(softmax_route(logits, 5, false), Catch::Contains("got 5"));
  CHECK_THROWS_WITH(softmax_route(logits.to(at::kInt), 1, false), Catch::Contains("logits must be float32"));
}
