#include "csrc/host_sync.h"

#include <mutex>

namespace moeflux {
namespace {
std::mutex mutex;  // reads are few (a handful per layer step): a lock costs nothing next to them
std::map<std::string, int64_t> reads;
}  // namespace

at::Tensor to_host(const at::Tensor& t, const std::string& site) {
  {
    const std::lock_guard<std::mutex> lock(mutex);
    ++reads[site];
  }
  return t.is_cpu() ? t : t.to(at::kCPU);  // no op on the CPU: opcheck's schema check sees only the op's own
}

std::map<std::string, int64_t> host_reads() {
  const std::lock_guard<std::mutex> lock(mutex);
  return reads;
}

int64_t host_count_reads() {
  int64_t total = 0;
  for (const auto& [site, n] : host_reads()) total += site.starts_with("counts:") ? n : 0;
  return total;
}

void reset_host_reads() {
  const std::lock_guard<std::mutex> lock(mutex);
  reads.clear();
}

}  // namespace moeflux
