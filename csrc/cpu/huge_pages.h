// Large CPU outputs are written once, right after allocation. glibc serves
// them with fresh mmaps, so every 4 KiB page faults on first touch, which costs
// more than the kernel's own work. Asking for transparent huge pages first
// (what PyTorch does under THP_MEM_ALLOC_ENABLE=1) cuts the faults 512-fold.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moeflux::cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (!t.is_cpu() || bytes < 4 * kHugePage) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
}

}  // namespace moeflux::cpu
