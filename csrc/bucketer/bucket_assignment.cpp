#include "csrc/bucketer/bucket_assignment.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <tuple>

#include <c10/util/Exception.h>

namespace moeflux {

std::vector<std::vector<int64_t>> assign_buckets(const std::vector<ParamSpec>& params,
                                                 const std::vector<int64_t>& order, int64_t first_bucket_bytes,
                                                 int64_t bucket_bytes) {
  TORCH_CHECK(first_bucket_bytes > 0 && bucket_bytes > 0, "moeflux bucketer: bucket sizes must be > 0, got ",
              first_bucket_bytes, " and ", bucket_bytes);
  TORCH_CHECK(order.size() == params.size(), "moeflux bucketer: the order names ", order.size(),
              " parameters, expected ", params.size());
  struct Open {
    std::vector<int64_t> members;
    int64_t bytes = 0;
    bool first = true;  // the first bucket of this kind uses the small limit
  };
  using Key = std::tuple<int, std::string, int64_t>;
  std::map<Key, Open> open;
  std::vector<std::vector<int64_t>> closed;
  std::vector<bool> seen(params.size(), false);
  for (const int64_t i : order) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(params.size()) && !seen[i],
                "moeflux bucketer: the order must name every parameter once, got ", i);
    seen[i] = true;
    const ParamSpec& p = params[i];
    Open& bucket = open[Key{static_cast<int>(p.dtype), p.device.str(), p.group}];
    bucket.members.push_back(i);
    bucket.bytes += p.bytes;
    if (bucket.bytes >= (bucket.first ? first_bucket_bytes : bucket_bytes)) {
      closed.push_back(std::move(bucket.members));
      bucket.members.clear();
      bucket.bytes = 0;
      bucket.first = false;
    }
  }
  for (auto& [key, bucket] : open) {
    if (!bucket.members.empty()) closed.push_back(std::move(bucket.members));
  }
  std::vector<int64_t> position(params.size());
  for (size_t pos = 0; pos < order.size(); ++pos) position[order[pos]] = static_cast<int64_t>(pos);
  std::stable_sort(closed.begin(), closed.end(), [&](const auto& a, const auto& b) {
    return position[a.front()] < position[b.front()];
  });
  return closed;
}

std::vector<int64_t> reverse_order(int64_t num_params) {
  std::vector<int64_t> order(num_params);
  std::iota(order.rbegin(), order.rend(), 0);
  return order;
}

}  // namespace moeflux
