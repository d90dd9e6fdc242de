// CUDA kernels of permute / unpermute.
//
// build_row_map is a stable counting sort of the T*k assignments by expert,
// with no host synchronisation: (1) a per-chunk histogram, (2) one CUB
// exclusive scan over the [expert][chunk] counts, which gives every chunk its
// first row for every expert, (3) ranks within a chunk from warp matches.
// scatter_rows / gather_rows move rows with 16-byte accesses, one block per
// token; weighted sums accumulate in float, in a fixed order (no atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <cub/device/device_scan.cuh>

#include "csrc/kernels.h"
#include "cuda/cuda_utils.cuh"

namespace moeflux::cuda {
namespace {

constexpr int kSortThreads = 256;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kChunk = 4 * kSortThreads;  // assignments per block of the counting sort

// Bin of an expert id: the id, or num_experts for dropped (-1) and invalid ids.
__device__ __forceinline__ int bin_of(int32_t e, int num_experts) {
  return e >= 0 && e < num_experts ? e : num_experts;
}

__global__ void chunk_histogram_kernel(const int32_t* __restrict__ ids, int64_t n, int num_experts,
                                       int32_t* __restrict__ counts, int num_chunks) {
  extern __shared__ int32_t hist[];
  const int bins = num_experts + 1, c = blockIdx.x;
  for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const int64_t end = min(n, static_cast<int64_t>(c + 1) * kChunk);
  for (int64_t i = static_cast<int64_t>(c) * kChunk + threadIdx.x; i < end; i += blockDim.x) {
    atomicAdd(&hist[bin_of(ids[i], num_experts)], 1);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) counts[static_cast<int64_t>(b) * num_chunks + c] = hist[b];
}

// first_row[e * num_chunks + c]: the dropless row of chunk c's first assignment to expert e.
__global__ void chunk_rank_kernel(const int32_t* __restrict__ ids, int64_t n, int num_experts, int64_t capacity,
                                  const int32_t* __restrict__ first_row, int num_chunks,
                                  int32_t* __restrict__ row_map) {
  extern __shared__ int32_t shared[];
  const int bins = num_experts + 1, c = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t* seen = shared;                // [bins]: assignments of earlier sub-tiles, per expert
  int32_t* warp_counts = shared + bins;  // [kSortWarps][bins]: this sub-tile, per warp
  for (int b = threadIdx.x; b < bins; b += blockDim.x) seen[b] = 0;

  for (int sub = 0; sub < kChunk / kSortThreads; ++sub) {
    for (int b = threadIdx.x; b < kSortWarps * bins; b += blockDim.x) warp_counts[b] = 0;
    __syncthreads();
    const int64_t i = static_cast<int64_t>(c) * kChunk + sub * kSortThreads + threadIdx.x;
    const bool valid = i < n;
    const int e = valid ? bin_of(ids[i], num_experts) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank_in_warp = __popc(peers & ((1u << lane) - 1));
    if (valid && rank_in_warp == 0) warp_counts[warp * bins + e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int64_t rank = seen[e] + rank_in_warp;
      for (int w = 0; w < warp; ++w) rank += warp_counts[w * bins + e];
      const int64_t row = first_row[static_cast<int64_t>(e) * num_chunks + c] + rank;
      int32_t out = -1;
      if (e < num_experts) {
        if (capacity < 0) {
          out = static_cast<int32_t>(row);
        } else {
          const int64_t rank_in_expert = row - first_row[static_cast<int64_t>(e) * num_chunks];
          if (rank_in_expert < capacity) out = static_cast<int32_t>(e * capacity + rank_in_expert);
        }
      }
      row_map[i] = out;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
      for (int w = 0; w < kSortWarps; ++w) seen[b] += warp_counts[w * bins + b];
    }
    __syncthreads();
  }
}

__global__ void tokens_per_expert_kernel(const int32_t* __restrict__ first_row, int num_chunks, int num_experts,
                                         int64_t capacity, int32_t* __restrict__ tokens_per_expert) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  const int64_t total = first_row[static_cast<int64_t>(e + 1) * num_chunks] -
                        first_row[static_cast<int64_t>(e) * num_chunks];
  tokens_per_expert[e] = static_cast<int32_t>(capacity < 0 ? total : min(total, capacity));
}

// out[row_map[t, j]] = w[t, j] * x[t]; optionally dot[t, j] = <x[t], other[row_map[t, j]]>.
template <typename scalar_t, int VEC, bool WEIGHTED, bool DOT>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ row_map,
                                    const at::opmath_type<scalar_t>* __restrict__ weights,
                                    scalar_t* __restrict__ out, const scalar_t* __restrict__ other,
                                    at::opmath_type<scalar_t>* __restrict__ dot, uint8_t* __restrict__ covered,
                                    int64_t num_rows, int64_t hidden, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t packs = hidden / VEC;
  const scalar_t* src = x + t * hidden;
  for (int j = 0; j < k; ++j) {
    const int64_t slot = t * k + j;
    const int64_t r = row_map[slot];
    if (r < 0 || r >= num_rows) {  // dropped (on CUDA an invalid row is dropped too)
      if (DOT && threadIdx.x == 0) dot[slot] = 0;
      continue;
    }
    if (threadIdx.x == 0) covered[r] = 1;
    const acc_t w = WEIGHTED ? weights[slot] : acc_t(1);
    scalar_t* dst = out + r * hidden;
    acc_t partial = 0;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      auto v = load_pack<scalar_t, VEC>(src + p * VEC);
      if constexpr (DOT) {
        const auto o = load_pack<scalar_t, VEC>(other + r * hidden + p * VEC);
#pragma unroll
        for (int q = 0; q < VEC; ++q) partial += static_cast<acc_t>(v.v[q]) * static_cast<acc_t>(o.v[q]);
      }
      if constexpr (WEIGHTED) {
#pragma unroll
        for (int q = 0; q < VEC; ++q) v.v[q] = static_cast<scalar_t>(w * static_cast<acc_t>(v.v[q]));
      }
      store_pack<scalar_t, VEC>(dst + p * VEC, v);
    }
    if constexpr (DOT) {
      const acc_t total = block_sum(partial);
      if (threadIdx.x == 0) dot[slot] = total;
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void zero_uncovered_rows_kernel(scalar_t* __restrict__ out, const uint8_t* __restrict__ covered,
                                           int64_t num_rows, int64_t hidden) {
  const int64_t packs = hidden / VEC;
  Pack<scalar_t, VEC> zero;
#pragma unroll
  for (int q = 0; q < VEC; ++q) zero.v[q] = scalar_t(0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_rows * packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs;
    if (!covered[r]) store_pack<scalar_t, VEC>(out + r * hidden + (i % packs) * VEC, zero);
  }
}

// out[t] = sum_j w[t, j] * rows[row_map[t, j]]
template <typename scalar_t, int VEC, bool WEIGHTED>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ rows, const int32_t* __restrict__ row_map,
                                   const at::opmath_type<scalar_t>* __restrict__ weights,
                                   scalar_t* __restrict__ out, int64_t num_rows, int64_t hidden, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t packs = hidden / VEC;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    acc_t acc[VEC] = {};
    for (int j = 0; j < k; ++j) {
      const int64_t r = row_map[t * k + j];
      if (r < 0 || r >= num_rows) continue;
      const acc_t w = WEIGHTED ? weights[t * k + j] : acc_t(1);
      const auto v = load_pack<scalar_t, VEC>(rows + r * hidden + p * VEC);
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += w * static_cast<acc_t>(v.v[q]);
    }
    Pack<scalar_t, VEC> result;
#pragma unroll
    for (int q = 0; q < VEC; ++q) result.v[q] = static_cast<scalar_t>(acc[q]);
    store_pack<scalar_t, VEC>(out + t * hidden + p * VEC, result);
  }
}

// Threads per token block: enough for one pass over the row's packs, at most 256.
int row_threads(int64_t packs) { return static_cast<int>(std::clamp<int64_t>((packs + 31) / 32 * 32, 32, 256)); }

// Calls fn.template operator()<VEC>() with the widest vector the data allows.
template <typename scalar_t, typename Fn>
void with_vector_width(int64_t hidden, std::initializer_list<const void*> pointers, Fn&& fn) {
  if (vector_width<scalar_t>(hidden, pointers) == 1) {
    fn.template operator()<1>();
  } else {
    fn.template operator()<16 / sizeof(scalar_t)>();
  }
}

}  // namespace

void build_row_map(const at::Tensor& expert_ids, int64_t num_experts, int64_t capacity, at::Tensor& row_map,
                   at::Tensor& tokens_per_expert) {
  TORCH_CHECK(num_experts <= kMaxCudaExperts, "moeflux.permute: CUDA supports up to ", kMaxCudaExperts,
              " experts, got num_experts = ", num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = expert_ids.numel();
  if (n == 0) {
    tokens_per_expert.zero_();
    return;
  }
  const int num_chunks = static_cast<int>(ceil_div(n, kChunk));
  const int bins = static_cast<int>(num_experts) + 1;
  const auto int_options = expert_ids.options().dtype(at::kInt);
  at::Tensor counts = at::empty({static_cast<int64_t>(bins) * num_chunks}, int_options);
  at::Tensor first_row = at::empty_like(counts);

  chunk_histogram_kernel<<<num_chunks, kSortThreads, bins * sizeof(int32_t), stream>>>(
      expert_ids.const_data_ptr<int32_t>(), n, bins - 1, counts.mutable_data_ptr<int32_t>(), num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  size_t temp_bytes = 0;
  const int num_items = static_cast<int>(counts.numel());
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, counts.const_data_ptr<int32_t>(),
                                               first_row.mutable_data_ptr<int32_t>(), num_items, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, expert_ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.mutable_data_ptr(), temp_bytes, counts.const_data_ptr<int32_t>(),
                                               first_row.mutable_data_ptr<int32_t>(), num_items, stream));

  chunk_rank_kernel<<<num_chunks, kSortThreads, (kSortWarps + 1) * bins * sizeof(int32_t), stream>>>(
      expert_ids.const_data_ptr<int32_t>(), n, bins - 1, capacity, first_row.const_data_ptr<int32_t>(), num_chunks,
      row_map.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  tokens_per_expert_kernel<<<ceil_div(num_experts, 256), 256, 0, stream>>>(
      first_row.const_data_ptr<int32_t>(), num_chunks, bins - 1, capacity,
      tokens_per_expert.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scatter_rows(const at::Tensor& x, const at::Tensor& row_map, const at::Tensor& weights, at::Tensor& out,
                  const at::Tensor& dot_rows, at::Tensor& dot) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_tokens = x.size(0), hidden = x.size(1), num_rows = out.size(0);
  const int k = static_cast<int>(row_map.size(1));
  if (num_rows == 0) {  // every slot is dropped
    if (dot_rows.defined()) dot.zero_();
    return;
  }
  at::Tensor covered = at::zeros({num_rows}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moeflux_scatter_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* other = dot_rows.defined() ? dot_rows.const_data_ptr<scalar_t>() : nullptr;
    with_vector_width<scalar_t>(hidden, {x.const_data_ptr(), out.const_data_ptr(), other}, [&]<int VEC>() {
      const int threads = row_threads(hidden / VEC);
      auto launch = [&](auto kernel) {
        if (num_tokens > 0) {
          kernel<<<num_tokens, threads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int32_t>(),
              weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
              other, dot_rows.defined() ? dot.mutable_data_ptr<acc_t>() : nullptr,
              covered.mutable_data_ptr<uint8_t>(), num_rows, hidden, k);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      };
      if (dot_rows.defined()) {
        TORCH_INTERNAL_ASSERT(weights.defined(), "scatter_rows: the dot product comes with weights");
        launch(scatter_rows_kernel<scalar_t, VEC, true, true>);
      } else if (weights.defined()) {
        launch(scatter_rows_kernel<scalar_t, VEC, true, false>);
      } else {
        launch(scatter_rows_kernel<scalar_t, VEC, false, false>);
      }
      const int64_t work = num_rows * (hidden / VEC);
      const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, 256), 65535));
      zero_uncovered_rows_kernel<scalar_t, VEC><<<blocks, 256, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), covered.const_data_ptr<uint8_t>(), num_rows, hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void gather_rows(const at::Tensor& rows, const at::Tensor& row_map, const at::Tensor& weights, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_tokens = out.size(0), hidden = out.size(1);
  const int k = static_cast<int>(row_map.size(1));
  if (num_tokens == 0 || hidden == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "moeflux_gather_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(hidden, {rows.const_data_ptr(), out.const_data_ptr()}, [&]<int VEC>() {
      auto launch = [&](auto kernel) {
        kernel<<<num_tokens, row_threads(hidden / VEC), 0, stream>>>(
            rows.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int32_t>(),
            weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
            rows.size(0), hidden, k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (weights.defined()) {
        launch(gather_rows_kernel<scalar_t, VEC, true>);
      } else {
        launch(gather_rows_kernel<scalar_t, VEC, false>);
      }
    });
  });
}

}  // namespace moeflux::cuda
