#include <algorithm>
#include <numeric>

#include "csrc/ops.h"
#include "tests/cpp/test_helpers.h"

using namespace moeflux;

namespace {

// unpermute accumulates in fp32 (fp64 for fp64) and rounds once: a few units in the last place of `dtype`.
double rounding_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 1e-5;
    case at::kHalf: return 1e-3;  // 2^-11 per unit
    default: return 8e-3;  // bfloat16: 2^-8 per unit
  }
}

// Row of every flat assignment by std::stable_sort on the expert id; -1 stays -1.
std::vector<int32_t> reference_rows(const at::Tensor& ids, int64_t num_experts, int64_t capacity) {
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  const int32_t* e = flat.const_data_ptr<int32_t>();
  std::vector<int64_t> order(flat.numel());
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](int64_t i) { return e[i] < 0 ? num_experts : e[i]; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
  std::vector<int32_t> rows(order.size(), -1);
  std::vector<int64_t> seen(num_experts + 1, 0);
  for (size_t pos = 0; pos < order.size(); ++pos) {
    const int64_t i = order[pos], ex = key(i);
    const int64_t rank = seen[ex]++;
    if (ex == num_experts) continue;
    if (capacity < 0) {
      rows[i] = static_cast<int32_t>(pos);
    } else if (rank < capacity) {
      rows[i] = static_cast<int32_t>(ex * capacity + rank);
    }
  }
  return rows;
}

std::vector<int32_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.cpu().contiguous().reshape({-1});
  return {c.const_data_ptr<int32_t>(), c.const_data_ptr<int32_t>() + c.numel()};
}

}  // namespace

TEST_CASE("permute's row map is a stable counting sort, in one or many chunks", "[permute]") {
  auto gen = test::seeded(11);
  for (const at::Device device : test::devices()) {
    for (const int64_t num_tokens : {0, 1, 3000, 50000}) {
      for (const int64_t capacity : {-1, 0, 7, 1000}) {
        at::Tensor ids = at::randint(-1, 16, {num_tokens, 2}, gen, at::kInt);
        const at::Tensor tokens = at::randn({num_tokens, 3}, gen);
        const std::optional<int64_t> cap = capacity < 0 ? std::nullopt : std::optional<int64_t>(capacity);
        const auto [permuted, counts, row_map] = permute(kernels_for(tokens.to(device)), tokens.to(device), ids.to(device), 16, cap);
        INFO("device " << device << " tokens " << num_tokens << " capacity " << capacity);
        CHECK(to_vector(row_map) == reference_rows(ids, 16, capacity));
        // Every kept row holds its token; the others are zero.
        const at::Tensor expected = at::zeros_like(permuted, at::kCPU);
        const auto rows = to_vector(row_map);
        for (int64_t i = 0; i < static_cast<int64_t>(rows.size()); ++i) {
          if (rows[i] >= 0) expected[rows[i]].copy_(tokens[i / 2]);
        }
        CHECK(at::equal(permuted.cpu(), expected));
        CHECK(counts.sum().item<int64_t>() == std::count_if(rows.begin(), rows.end(), [](int32_t r) { return r >= 0; }));
      }
    }
  }
}

TEST_CASE("unpermute inverts permute, and weights scale each slot", "[unpermute]") {
  auto gen = test::seeded(5);
  for (const at::Device device : test::devices()) {
    for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
      const at::Tensor tokens = at::randn({100, 40}, gen, at::kDouble).to(dtype).to(device);  // all of fp64's bits
      const at::Tensor ids = test::random_expert_ids(100, 8, 3, gen).to(device);
      const auto [permuted, counts, row_map] = permute(kernels_for(tokens), tokens, ids, 8, std::nullopt);
      // Summing the k copies of each token gives k * token.
      const at::Tensor summed = unpermute(kernels_for(permuted), permuted, row_map, std::nullopt);
      const double tol = rounding_tolerance(dtype);
      CHECK(at::allclose(summed.cpu().to(at::kDouble), (tokens.cpu().to(at::kDouble) * 3), tol, tol));
      const at::Tensor w = at::rand({100, 3}, gen).to(device);
      const at::Tensor weighted = unpermute(kernels_for(permuted), permuted, row_map, w);
      const at::Tensor expected = tokens.cpu().to(at::kDouble) * w.cpu().to(at::kDouble).sum(1, true);
      INFO("device " << device << " dtype " << dtype);
      CHECK(at::allclose(weighted.cpu().to(at::kDouble), expected, tol, tol));
    }
  }
}

TEST_CASE("unpermute_backward scatters weighted gradients and dots for the weights", "[unpermute]") {
  auto gen = test::seeded(9);
  const at::Tensor ids = test::random_expert_ids(20, 4, 2, gen);
  const auto [rows0, counts, row_map] = permute(cpu::kernels, at::randn({20, 6}, gen, at::kDouble), ids, 4, 6);
  const at::Tensor rows = at::randn_like(rows0);
  const at::Tensor w = at::rand({20, 2}, gen, at::kDouble), grad = at::randn({20, 6}, gen, at::kDouble);
  const auto [grad_rows, grad_w] = unpermute_backward(cpu::kernels, grad, rows, row_map, w);
  at::Tensor expected_rows = at::zeros_like(rows), expected_w = at::zeros_like(w);
  const auto map = to_vector(row_map);
  for (int64_t i = 0; i < 40; ++i) {
    if (map[i] < 0) continue;
    expected_rows[map[i]].copy_(grad[i / 2] * w.view(-1)[i]);
    expected_w.view(-1)[i] = (grad[i / 2] * rows[map[i]]).sum();
  }
  CHECK(at::allclose(grad_rows, expected_rows));
  CHECK(at::allclose(grad_w, expected_w));
}

TEST_CASE("apply_capacity serves first choices before second choices", "[capacity]") {
  const at::Tensor ids = at::tensor({1, 0, 1, 0, 0, 1}, at::kInt).view({3, 2});
  const at::Tensor w = at::tensor({0.6f, 0.4f, 0.7f, 0.3f, 0.9f, 0.1f}).view({3, 2});
  CHECK(to_vector(apply_capacity(ids, w, 2, 2, false)) == std::vector<int32_t>{1, 0, 1, -1, 0, -1});
}

TEST_CASE("permute rejects bad expert ids with the argument's name", "[permute][errors]") {
  const at::Tensor tokens = at::zeros({2, 4});
  const at::Tensor ids = at::tensor({0, 5}, at::kInt).view({2, 1});
  CHECK_THROWS_WITH(permute(cpu::kernels, tokens, ids, 4, std::nullopt),
                    Catch::Contains("expert_ids must be in [0, num_experts = 4) or -1 (dropped), got 5 at [1, 0]"));
  CHECK_THROWS_WITH(permute(cpu::kernels, tokens, ids.to(at::kLong), 4, std::nullopt), Catch::Contains("expert_ids must be Int"));
  CHECK_THROWS_WITH(permute(cpu::kernels, tokens, ids, 4, -3), Catch::Contains("capacity must be >= 0"));
}
