// Shared helpers of the Catch2 tests.
#pragma once

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

namespace moeflux::test {

// Devices the kernels can be run on here: the CPU, and CUDA when built and present.
inline std::vector<at::Device> devices() {
  std::vector<at::Device> out{at::kCPU};
#ifdef MOEFLUX_WITH_CUDA
  if (at::hasCUDA()) out.emplace_back(at::kCUDA);
#endif
  return out;
}

// k distinct random experts per token.
inline at::Tensor random_expert_ids(int64_t num_tokens, int64_t num_experts, int64_t k, at::Generator gen) {
  at::Tensor ids = at::empty({num_tokens, k}, at::kInt);
  for (int64_t t = 0; t < num_tokens; ++t) {
    ids[t].copy_(at::randperm(num_experts, gen, at::kLong).narrow(0, 0, k));
  }
  return ids;
}

inline at::Generator seeded(uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return gen;
}

}  // namespace moeflux::test
