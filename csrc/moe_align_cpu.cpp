// Routing metadata on CPU: a stable counting sort of the flat expert ids, then the tile table.
// Math only; input checks (ids in range, sizes) are done by bindings.cpp before this runs.
#include "moe_align.h"

#include <vector>

namespace clipmoe {

template <typename index_t>
void moe_align_cpu(const index_t* topk_ids, int64_t tk, int64_t num_experts, int64_t block_m,
                   int64_t num_tiles, AlignOutputs out) {
  for (int64_t e = 0; e < num_experts; ++e) out.expert_counts[e] = 0;
  for (int64_t i = 0; i < tk; ++i) out.expert_counts[topk_ids[i]] += 1;

  out.expert_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e)
    out.expert_offsets[e + 1] = out.expert_offsets[e] + out.expert_counts[e];

  // Scatter in flat order so that equal ids keep their token order (stability).
  std::vector<int32_t> next(out.expert_offsets, out.expert_offsets + num_experts);
  for (int64_t i = 0; i < tk; ++i) {
    const int32_t row = next[topk_ids[i]]++;
    out.sorted_to_flat[row] = static_cast<int32_t>(i);
    out.flat_to_sorted[i] = row;
  }

  int64_t tile = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = out.expert_offsets[e]; r < out.expert_offsets[e + 1]; r += block_m) {
      out.tile_expert[tile] = static_cast<int32_t>(e);
      out.tile_row_start[tile] = static_cast<int32_t>(r);
      ++tile;
    }
  }
  for (; tile < num_tiles; ++tile) {
    out.tile_expert[tile] = -1;
    out.tile_row_start[tile] = -1;
  }
}

template void moe_align_cpu<int32_t>(const int32_t*, int64_t, int64_t, int64_t, int64_t, AlignOutputs);
template void moe_align_cpu<int64_t>(const int64_t*, int64_t, int64_t, int64_t, int64_t, AlignOutputs);

}  // namespace clipmoe
