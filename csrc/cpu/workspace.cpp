#include "csrc/cpu/workspace.h"

#include <cstdlib>
#include <map>
#include <mutex>

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moeflux::cpu {
namespace {

constexpr size_t kBlock = size_t{2} << 20;              // 2 MiB: one transparent huge page
constexpr size_t kMinPooled = 4 * kBlock;               // smaller buffers: the default allocator
constexpr size_t kMaxCachedBytes = size_t{4} << 30;     // free bytes the pool may keep

class Pool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest free block that fits, if it does not waste more than half of itself.
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        void* p = it->second;
        cached_ -= it->first;
        sizes_[p] = it->first;
        free_.erase(it);
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kBlock, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[p] = bytes;
    return p;
  }

  void give_back(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t bytes = sizes_.at(p);
    sizes_.erase(p);
    if (cached_ + bytes > kMaxCachedBytes) {
      std::free(p);
      return;
    }
    free_.emplace(bytes, p);
    cached_ += bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, p] : free_) std::free(p);
    free_.clear();
    cached_ = 0;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // by size
  std::map<void*, size_t> sizes_;      // blocks in use
  size_t cached_ = 0;
};

// Never destroyed: tensors may still return blocks while the process exits.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinPooled) return at::empty(sizes, options);
  const size_t rounded = (bytes + kBlock - 1) / kBlock * kBlock;
  void* p = pool().take(rounded);
  if (p == nullptr) return at::empty(sizes, options);
  return at::from_blob(p, sizes, [](void* q) { pool().give_back(q); }, options);
}

int64_t workspace_cached_bytes() { return pool().cached(); }
void workspace_release() { pool().release(); }

}  // namespace moeflux::cpu
