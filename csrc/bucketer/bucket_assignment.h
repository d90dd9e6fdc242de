// Which gradients share a bucket: pure bookkeeping, no autograd or
// communication, so it is unit-tested on its own (tests/cpp/test_bucketer.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace moeflux {

struct ParamSpec {
  int64_t bytes;
  c10::ScalarType dtype;
  c10::Device device;
  int64_t group;  // which process group reduces it (dense, expert, ...)
};

// Buckets of parameter indices. Parameters are taken in `order` (the order
// their gradients are expected to become ready); a bucket holds one dtype, one
// device and one group, and closes once it reaches `first_bucket_bytes` (the
// first bucket of each kind, so communication starts early) or `bucket_bytes`.
// Buckets are returned in the order their first parameter appears in `order`,
// which is the order they are launched in, identical on every rank.
std::vector<std::vector<int64_t>> assign_buckets(const std::vector<ParamSpec>& params,
                                                 const std::vector<int64_t>& order, int64_t first_bucket_bytes,
                                                 int64_t bucket_bytes);

// Reverse registration order: backward produces the last layers' gradients first.
std::vector<int64_t> reverse_order(int64_t num_params);

}  // namespace moeflux
