// clipmoe_kernels._C: op registration (TORCH_LIBRARY "clipmoe") and every input check. No math here.
#include <ATen/record_function.h>
#include <torch/extension.h>

#include "moe_align.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace clipmoe {
namespace {

// Bounded by the shared memory of the CUDA scan (2E+1 int32); CLIP-MoE uses 4 experts.
constexpr int64_t kMaxExperts = 4096;

using AlignResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AlignResult moe_align(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                   "moe_align: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK_VALUE(topk_ids.dim() == 2, "moe_align: topk_ids must be 2-D [T, k], got shape ", topk_ids.sizes());
  TORCH_CHECK_VALUE(topk_ids.is_cpu() || topk_ids.is_cuda(),
                    "moe_align: topk_ids must be a CPU or CUDA tensor, got device ", topk_ids.device());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts,
                    "moe_align: num_experts must be in [1, ", kMaxExperts, "], got ", num_experts);
  TORCH_CHECK_VALUE(block_m >= 1, "moe_align: block_m must be >= 1, got ", block_m);
  const int64_t tk = topk_ids.numel();
  TORCH_CHECK_VALUE(tk < (int64_t{1} << 31), "moe_align: topk_ids has ", tk,
                    " entries; the int32 permutation holds at most 2^31 - 1");

  const at::Tensor ids = topk_ids.contiguous();
  const int64_t num_tiles = (tk + block_m - 1) / block_m + num_experts;
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor expert_counts = at::empty({num_experts}, opts);
  at::Tensor expert_offsets = at::empty({num_experts + 1}, opts);
  at::Tensor sorted_to_flat = at::empty({tk}, opts);
  at::Tensor flat_to_sorted = at::empty({tk}, opts);
  at::Tensor tile_expert = at::empty({num_tiles}, opts);
  at::Tensor tile_row_start = at::empty({num_tiles}, opts);
  AlignOutputs out{expert_counts.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
                   sorted_to_flat.data_ptr<int32_t>(), flat_to_sorted.data_ptr<int32_t>(),
                   tile_expert.data_ptr<int32_t>(),   tile_row_start.data_ptr<int32_t>()};

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_align", [&] {
    const index_t* p = ids.data_ptr<index_t>();
    if (ids.is_cpu()) {
      for (int64_t i = 0; i < tk; ++i) {
        TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < num_experts, "moe_align: topk_ids holds ", p[i],
                          " at flat index ", i, ", expected a value in [0, num_experts=", num_experts, ")");
      }
      moe_align_cpu<index_t>(p, tk, num_experts, block_m, num_tiles, out);
    } else {
#ifdef WITH_CUDA
      const c10::cuda::CUDAGuard guard(ids.device());
      const int64_t num_chunks = (tk + kAlignChunk - 1) / kAlignChunk;
      at::Tensor workspace = at::empty({num_chunks * num_experts}, opts);
      C10_CUDA_CHECK(moe_align_cuda<index_t>(p, tk, num_experts, block_m, num_tiles, workspace.data_ptr<int32_t>(),
                                             out, c10::cuda::getCurrentCUDAStream()));
#else
      TORCH_CHECK(false, "moe_align: clipmoe_kernels._C was built without CUDA ops");
#endif
    }
  });
  return {expert_counts, expert_offsets, sorted_to_flat, flat_to_sorted, tile_expert, tile_row_start};
}

}  // namespace
}  // namespace clipmoe

TORCH_LIBRARY(clipmoe, m) {
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_m) -> (Tensor expert_counts, Tensor expert_offsets, "
      "Tensor sorted_to_flat, Tensor flat_to_sorted, Tensor tile_expert, Tensor tile_row_start)");
}

TORCH_LIBRARY_IMPL(clipmoe, CPU, m) { m.impl("moe_align", &clipmoe::moe_align); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(clipmoe, CUDA, m) { m.impl("moe_align", &clipmoe::moe_align); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clipmoe C++/CUDA ops; they register under torch.ops.clipmoe on import";
  // The same function without the dispatcher, for eager calls on plain tensors (clipmoe_kernels.routing.moe_align):
  // torch.ops' boxed call costs about 13k instructions per call at batch 1 (callgrind). torch.compile and tensor
  // subclasses go through torch.ops.clipmoe.moe_align. The profiler still sees the op under its own name.
  m.def(
      "moe_align",
      [](const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
        RECORD_FUNCTION("clipmoe::moe_align", std::vector<c10::IValue>({topk_ids}));
        return clipmoe::moe_align(topk_ids, num_experts, block_m);
      },
      "moe_align(topk_ids, num_experts, block_m) without the dispatcher", py::arg("topk_ids"),
      py::arg("num_experts"), py::arg("block_m"));
#ifdef WITH_CUDA
  m.def("built_with_cuda", [] { return true; }, "True when the CUDA ops were compiled into this extension");
#else
  m.def("built_with_cuda", [] { return false; }, "True when the CUDA ops were compiled into this extension");
#endif
}
