// CPU kernels of permute / unpermute: a parallel counting sort for the row map,
// and row scatter / gather loops that the compiler vectorises.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "csrc/cpu/huge_pages.h"
#include "csrc/cpu/row_loops.h"
#include "csrc/kernels.h"

namespace moeflux::cpu {
namespace {

constexpr int64_t kMinChunk = 4096;  // assignments per task of the counting sort

// Tokens per task for loops that touch `bytes_per_token` bytes each.
int64_t token_grain(int64_t bytes_per_token) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(bytes_per_token, 1));
}

// Checks that every row index is -1 or in [0, num_rows); with `unique`, also
// that no row is named twice, and returns which rows are named.
std::vector<uint8_t> check_row_map(const at::Tensor& row_map, int64_t num_rows, bool unique, const char* op) {
  std::vector<uint8_t> covered(unique ? num_rows : 0, 0);
  const int32_t* rows = row_map.const_data_ptr<int32_t>();
  const int64_t k = row_map.size(1);
  for (int64_t i = 0; i < row_map.numel(); ++i) {
    const int32_t r = rows[i];
    TORCH_CHECK(r >= -1 && r < num_rows, "moeflux.", op, ": row_map must hold -1 or a row in [0, ", num_rows,
                "), got ", r, " at [", i / k, ", ", i % k, "]");
    if (unique && r >= 0) {
      TORCH_CHECK(!covered[r], "moeflux.", op, ": row_map names row ", r, " twice (at [", i / k, ", ", i % k,
                  "]); each row may receive one token");
      covered[r] = 1;
    }
  }
  return covered;
}

}  // namespace

void build_row_map(const at::Tensor& expert_ids, int64_t num_experts, int64_t capacity, at::Tensor& row_map,
                   at::Tensor& tokens_per_expert) {
  const int64_t n = expert_ids.numel(), k = expert_ids.dim() == 2 ? expert_ids.size(1) : 1;
  const int64_t bins = num_experts + 1;  // the last bin collects dropped assignments (id -1)
  const int64_t chunk = std::max(kMinChunk, (n + at::get_num_threads() - 1) / at::get_num_threads());
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  const int32_t* ids = expert_ids.const_data_ptr<int32_t>();
  int32_t* out = row_map.mutable_data_ptr<int32_t>();

  // 1. histogram of each chunk; remember the first invalid id.
  std::vector<int64_t> next_row(num_chunks * bins, 0);
  std::vector<int64_t> first_bad(num_chunks, -1);
  auto bin_of = [&](int32_t e) -> int64_t { return e == -1 ? num_experts : e; };
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* count = next_row.data() + c * bins;
      for (int64_t i = c * chunk, end = std::min(n, i + chunk); i < end; ++i) {
        const int32_t e = ids[i];
        if (e < -1 || e >= num_experts) {
          if (first_bad[c] < 0) first_bad[c] = i;
          continue;
        }
        ++count[bin_of(e)];
      }
    }
  });
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t i = first_bad[c];
    TORCH_CHECK(i < 0, "moeflux.permute: expert_ids must be in [0, num_experts = ", num_experts,
                ") or -1 (dropped), got ", ids[i], " at [", i / k, ", ", i % k, "]");
  }

  // 2. exclusive scan, expert-major: chunk c's first row for expert e.
  std::vector<int64_t> expert_start(bins + 1);
  int64_t running = 0;
  for (int64_t e = 0; e < bins; ++e) {
    expert_start[e] = running;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = next_row[c * bins + e];
      next_row[c * bins + e] = running;
      running += count;
    }
  }
  expert_start[bins] = running;
  int32_t* counts = tokens_per_expert.mutable_data_ptr<int32_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t total = expert_start[e + 1] - expert_start[e];
    counts[e] = static_cast<int32_t>(capacity < 0 ? total : std::min(total, capacity));
  }

  // 3. rows, in token order within each expert.
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* row = next_row.data() + c * bins;
      for (int64_t i = c * chunk, end = std::min(n, i + chunk); i < end; ++i) {
        const int64_t e = bin_of(ids[i]);
        const int64_t r = row[e]++;
        if (e == num_experts) {
          out[i] = -1;
        } else if (capacity < 0) {
          out[i] = static_cast<int32_t>(r);
        } else {
          const int64_t rank = r - expert_start[e];
          out[i] = rank < capacity ? static_cast<int32_t>(e * capacity + rank) : -1;
        }
      }
    }
  });
}

void scatter_rows(const at::Tensor& x, const at::Tensor& row_map, const at::Tensor& weights, at::Tensor& out,
                  const at::Tensor& dot_rows, at::Tensor& dot) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), k = row_map.size(1), num_rows = out.size(0);
  const std::vector<uint8_t> covered = check_row_map(row_map, num_rows, /*unique=*/true, "scatter");
  advise_huge_pages(out);
  const int32_t* rows = row_map.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moeflux_scatter_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* other = dot_rows.defined() ? dot_rows.const_data_ptr<scalar_t>() : nullptr;
    acc_t* dot_out = dot_rows.defined() ? dot.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, num_tokens, token_grain(k * hidden * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* token = src + t * hidden;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = t * k + j, r = rows[slot];
          if (r < 0) {
            if (dot_out) dot_out[slot] = 0;
            continue;
          }
          if (dot_out) {
            dot_out[slot] = scale_row_and_dot(dst + r * hidden, token, w[slot], other + r * hidden, hidden);
          } else if (w) {
            scale_row(dst + r * hidden, token, w[slot], hidden);
          } else {
            copy_row(dst + r * hidden, token, hidden);
          }
        }
      }
    });
    at::parallel_for(0, num_rows, token_grain(hidden * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (!covered[r]) std::memset(dst + r * hidden, 0, hidden * sizeof(scalar_t));
      }
    });
  });
}

void gather_rows(const at::Tensor& rows, const at::Tensor& row_map, const at::Tensor& weights, at::Tensor& out) {
  const int64_t num_tokens = out.size(0), hidden = out.size(1), k = row_map.size(1);
  check_row_map(row_map, rows.size(0), /*unique=*/false, "unpermute");
  advise_huge_pages(out);
  const int32_t* map = row_map.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "moeflux_gather_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, num_tokens, token_grain(k * hidden * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      if (k == 1 && !w) {  // a plain row gather (regrouping rows): no accumulator
        for (int64_t t = begin; t < end; ++t) {
          if (map[t] >= 0) {
            copy_row(dst + t * hidden, src + map[t] * hidden, hidden);
          } else {
            std::memset(dst + t * hidden, 0, hidden * sizeof(scalar_t));
          }
        }
        return;
      }
      std::vector<acc_t> acc(hidden);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = t * k + j, r = map[slot];
          if (r >= 0) accumulate_row(acc.data(), src + r * hidden, w ? w[slot] : acc_t(1), hidden);
        }
        store_row(dst + t * hidden, acc.data(), hidden);
      }
    });
  });
}

}  // namespace moeflux::cpu
