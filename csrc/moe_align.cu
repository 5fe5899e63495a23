// Routing metadata on CUDA, without host synchronisation (CUDA-graph capturable).
//   1. _chunk_histogram: block c counts the ids of rows [c*CHUNK, (c+1)*CHUNK) per expert (shared-memory atomics
//      on integer counts: order-independent, so deterministic).
//   2. _scan_and_tiles: one block turns the chunk histograms into each chunk's first row per expert, the expert
//      counts and offsets, and fills the tile table by a binary search over the per-expert tile ends.
//   3. _stable_scatter: each row's place = expert offset + chunk base + rank among equal ids earlier in its chunk.
// Math only; input checks live in bindings.cpp. An out-of-range id (not checked on the host, which would need a
// sync) prints the offending value and index and traps, so the launch fails with a message rather than writing
// out of bounds.
#include "moe_align.h"

#include <cstdio>

namespace clipmoe {
namespace {

constexpr int kChunk = static_cast<int>(kAlignChunk);
constexpr int kScanThreads = 256;

template <typename index_t>
__device__ __forceinline__ int32_t load_checked_id(const index_t* topk_ids, int64_t i, int64_t num_experts) {
  const int64_t e = static_cast<int64_t>(topk_ids[i]);
  if (e < 0 || e >= num_experts) {
    printf("clipmoe::moe_align: topk_ids holds %lld at flat index %lld, expected a value in [0, num_experts=%lld)\n",
           static_cast<long long>(e), static_cast<long long>(i), static_cast<long long>(num_experts));
    __trap();
  }
  return static_cast<int32_t>(e);
}

template <typename index_t>
__global__ void _chunk_histogram(const index_t* __restrict__ topk_ids, int64_t tk, int64_t num_experts,
                                 int32_t* __restrict__ chunk_counts /* [num_chunks, E] */) {
  extern __shared__ int32_t s_counts[];  // [E]
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) s_counts[e] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (i < tk) atomicAdd(&s_counts[load_checked_id(topk_ids, i, num_experts)], 1);
  __syncthreads();
  int32_t* row = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) row[e] = s_counts[e];
}

__global__ void _scan_and_tiles(int32_t* __restrict__ chunk_counts /* [num_chunks, E], in: counts, out: bases */,
                                int64_t num_chunks, int64_t num_experts, int64_t block_m, int64_t num_tiles,
                                AlignOutputs out) {
  extern __shared__ int32_t s_mem[];
  int32_t* s_offsets = s_mem;                    // [E+1] exclusive scan of the expert counts
  int32_t* s_tile_ends = s_mem + num_experts + 1;  // [E] inclusive scan of tiles per expert

  // Each thread owns experts e = tid, tid + blockDim, ...: an exclusive scan over chunks, in chunk order.
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t running = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int32_t n = chunk_counts[c * num_experts + e];
      chunk_counts[c * num_experts + e] = running;
      running += n;
    }
    out.expert_counts[e] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E is small (experts, not tokens): a serial scan is the simple choice
    int32_t rows = 0, tiles = 0;
    s_offsets[0] = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int32_t n = out.expert_counts[e];
      rows += n;
      tiles += static_cast<int32_t>((n + block_m - 1) / block_m);
      s_offsets[e + 1] = rows;
      s_tile_ends[e] = tiles;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e <= num_experts; e += blockDim.x) out.expert_offsets[e] = s_offsets[e];
  for (int64_t s = threadIdx.x; s < num_tiles; s += blockDim.x) {
    int64_t lo = 0, hi = num_experts;  // first expert whose tile end exceeds s
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (s_tile_ends[mid] > s) hi = mid; else lo = mid + 1;
    }
    if (lo == num_experts) {
      out.tile_expert[s] = -1;
      out.tile_row_start[s] = -1;
    } else {
      const int64_t first_tile = lo == 0 ? 0 : s_tile_ends[lo - 1];
      out.tile_expert[s] = static_cast<int32_t>(lo);
      out.tile_row_start[s] = static_cast<int32_t>(s_offsets[lo] + (s - first_tile) * block_m);
    }
  }
}

template <typename index_t>
__global__ void _stable_scatter(const index_t* __restrict__ topk_ids, int64_t tk, int64_t num_experts,
                                const int32_t* __restrict__ chunk_bases /* [num_chunks, E] */, AlignOutputs out) {
  __shared__ int32_t s_ids[kChunk];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  const int32_t e = i < tk ? static_cast<int32_t>(topk_ids[i]) : -1;  // range was checked by _chunk_histogram
  s_ids[threadIdx.x] = e;
  __syncthreads();
  if (i >= tk) return;
  int32_t rank = 0;
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += s_ids[j] == e;
  const int32_t row = out.expert_offsets[e] + chunk_bases[static_cast<int64_t>(blockIdx.x) * num_experts + e] + rank;
  out.sorted_to_flat[row] = static_cast<int32_t>(i);
  out.flat_to_sorted[i] = row;
}

}  // namespace

template <typename index_t>
cudaError_t moe_align_cuda(const index_t* topk_ids, int64_t tk, int64_t num_experts, int64_t block_m,
                           int64_t num_tiles, int32_t* workspace, AlignOutputs out, cudaStream_t stream) {
  const int64_t num_chunks = (tk + kChunk - 1) / kChunk;
  const size_t hist_smem = sizeof(int32_t) * num_experts;
  if (num_chunks > 0) {
    _chunk_histogram<index_t><<<num_chunks, kChunk, hist_smem, stream>>>(topk_ids, tk, num_experts, workspace);
  }
  const size_t scan_smem = sizeof(int32_t) * (2 * num_experts + 1);
  _scan_and_tiles<<<1, kScanThreads, scan_smem, stream>>>(workspace, num_chunks, num_experts, block_m, num_tiles,
                                                          out);
  if (num_chunks > 0) {
    _stable_scatter<index_t><<<num_chunks, kChunk, 0, stream>>>(topk_ids, tk, num_experts, workspace, out);
  }
  return cudaGetLastError();
}

template cudaError_t moe_align_cuda<int32_t>(const int32_t*, int64_t, int64_t, int64_t, int64_t, int32_t*,
                                             AlignOutputs, cudaStream_t);
template cudaError_t moe_align_cuda<int64_t>(const int64_t*, int64_t, int64_t, int64_t, int64_t, int32_t*,
                                             AlignOutputs, cudaStream_t);

}  // namespace clipmoe
