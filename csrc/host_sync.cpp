#include "csrc/host_sync.h"

#include <atomic>

namespace moeflux {
namespace {
std::atomic<int64_t> reads{0};
}  // namespace

at::Tensor counts_to_host(const at::Tensor& counts) {
  ++reads;
  return counts.to(at::kCPU);
}

int64_t host_count_reads() { return reads.load(); }
void reset_host_count_reads() { reads = 0; }

}  // namespace moeflux
