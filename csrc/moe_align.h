// Routing metadata ("moe_align"): shared declarations of the CPU and CUDA implementations.
// Math only; every input check lives in bindings.cpp.
#pragma once
#include <cstdint>

namespace clipmoe {

// Outputs, all int32 (TK = T*k < 2^31 is checked by the binding):
//   expert_counts  [E]         rows routed to each expert
//   expert_offsets [E+1]       exclusive scan of expert_counts
//   sorted_to_flat [TK]        row r of the expert-sorted order -> flat index t*k+j (stable: ties keep token order)
//   flat_to_sorted [TK]        inverse permutation of sorted_to_flat
//   tile_expert    [num_tiles] expert of each BLOCK_M-row tile, -1 for unused slots
//   tile_row_start [num_tiles] first sorted row of each tile, -1 for unused slots
// num_tiles = ceil(TK / block_m) + E, a bound the host knows without reading the ids.
struct AlignOutputs {
  int32_t* expert_counts;
  int32_t* expert_offsets;
  int32_t* sorted_to_flat;
  int32_t* flat_to_sorted;
  int32_t* tile_expert;
  int32_t* tile_row_start;
};

template <typename index_t>
void moe_align_cpu(const index_t* topk_ids, int64_t tk, int64_t num_experts, int64_t block_m,
                   int64_t num_tiles, AlignOutputs out);

}  // namespace clipmoe

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>

namespace clipmoe {

// Rows handled by one block of the counting and scatter kernels; the binding sizes the workspace with it.
constexpr int64_t kAlignChunk = 256;

// Three launches on `stream`, no host synchronisation: per-chunk histograms, one-block scans (+ tile table),
// stable scatter. `workspace` holds ceil(tk / kAlignChunk) * num_experts int32.
template <typename index_t>
cudaError_t moe_align_cuda(const index_t* topk_ids, int64_t tk, int64_t num_experts, int64_t block_m,
                           int64_t num_tiles, int32_t* workspace, AlignOutputs out, cudaStream_t stream);

}  // namespace clipmoe
#endif
