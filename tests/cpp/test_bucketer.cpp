#include <catch2/catch.hpp>

#include "csrc/bucketer/bucket_assignment.h"

using moeflux::assign_buckets;
using moeflux::ParamSpec;
using moeflux::reverse_order;

namespace {

ParamSpec spec(int64_t bytes, c10::ScalarType dtype = c10::kFloat, int64_t group = 0) {
  return {bytes, dtype, c10::Device(c10::kCPU), group};
}

using Buckets = std::vector<std::vector<int64_t>>;

}  // namespace

TEST_CASE("buckets fill in reverse registration order, the first one small", "[bucketer]") {
  // 6 parameters of 400 bytes; first bucket closes at 500 bytes, the others at 1000.
  const std::vector<ParamSpec> params(6, spec(400));
  const Buckets buckets = assign_buckets(params, reverse_order(6), 500, 1000);
  CHECK(buckets == Buckets{{5, 4}, {3, 2, 1}, {0}});
}

TEST_CASE("a bucket holds one dtype and one group", "[bucketer]") {
  const std::vector<ParamSpec> params = {spec(100), spec(100, c10::kDouble), spec(100), spec(100, c10::kFloat, 1),
                                         spec(100, c10::kFloat, 1)};
  const Buckets buckets = assign_buckets(params, reverse_order(5), 1 << 20, 1 << 20);
  // Every kind stays open until the end; buckets are ordered by their first parameter in the order.
  CHECK(buckets == Buckets{{4, 3}, {2, 0}, {1}});
}

TEST_CASE("a parameter larger than the cap gets a bucket of its own", "[bucketer]") {
  const std::vector<ParamSpec> params = {spec(10), spec(5000), spec(10)};
  CHECK(assign_buckets(params, reverse_order(3), 100, 100) == Buckets{{2, 1}, {0}});
}

TEST_CASE("rebuilding follows the order in which gradients became ready", "[bucketer]") {
  const std::vector<ParamSpec> params(4, spec(400));
  const std::vector<int64_t> ready = {1, 3, 0, 2};  // e.g. a layer used before its registration order says
  CHECK(assign_buckets(params, ready, 500, 800) == Buckets{{1, 3}, {0, 2}});
  // A ready order that misses or repeats a parameter is a bug, not a layout.
  CHECK_THROWS_WITH(assign_buckets(params, {1, 1, 0, 2}, 500, 800), Catch::Contains("every parameter once"));
  CHECK_THROWS_WITH(assign_buckets(params, {1, 0, 2}, 500, 800), Catch::Contains("names 3 parameters, expected 4"));
}

TEST_CASE("bucket sizes must be positive", "[bucketer]") {
  CHECK_THROWS_WITH(assign_buckets({spec(4)}, {0}, 0, 10), Catch::Contains("bucket sizes must be > 0"));
}
