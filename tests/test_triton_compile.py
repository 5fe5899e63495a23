"""Ahead-of-time compile of every Triton kernel for sm_90 (H100/H200), on CPU without a GPU.

The interpreter runs the kernels' Python, not the compiler: constructs it accepts can still fail to compile (early
returns, loop-carried values in branches, dtype mismatches, tl.dot shapes). Compiling to a cubin through triton's
bundled ptxas catches those on every CPU run, and the PTX / ptxas report show what a GPU would run: whether the GEMMs
use Hopper's wgmma, whether their wgmma loop is pipelined (a `wgmma.wait_group` with a non-zero count: the next
group is issued before the previous one retires), and whether registers spill. About 1-3 s per variant on the
2-core dev machine.
"""
import functools
import re
import subprocess
import tempfile
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from clipmoe_kernels import grouped_down, grouped_gemm, grouped_up, router  # noqa: E402
from clipmoe_kernels._triton_utils import (  # noqa: E402
    BLOCK_M_GPU,
    BLOCK_M_GPU_LARGE,
    block_m_for,
    set_weight_block,
    uses_weight_descriptor,
)

META = {"sorted_to_flat_ptr": "i32", "expert_offsets_ptr": "i32", "tile_expert_ptr": "i32",
        "tile_row_start_ptr": "i32", "seed_ptr": "i64"}
FLOAT_SCALARS = {"DROPOUT_SCALE"}
# Integer arguments a CLIP shape makes multiples of 16 (D, F in {768, 1024, 3072, 4096} and the row strides), which
# Triton specialises on at launch; marking them here compiles what those launches compile.
ALIGNED = {"D", "F", "N", "K", "stride_xt", "stride_w1e", "stride_w1f", "stride_am", "stride_hm", "stride_dhm",
           "stride_w2e", "stride_w2d", "stride_w2f", "stride_om", "stride_dyt", "stride_gom",
           "stride_inm", "stride_dwe", "stride_we", "stride_wk", "stride_wn", "stride_be", "stride_dsn", "stride_dwn",
           "stride_b1e", "stride_b2e", "stride_dbe", "stride_ot",
           "stride_bn"}  # stride_bn: 0 without a bias (up_bwd_dx)
# Strides that are neither: the router logits' row stride is E (4, 8, ...).
GENERIC_STRIDES = {"stride_lt"}


def compile_for_sm90(kernel, pointer_types, constexprs, num_warps=4, num_stages=3, unit_strides=()):
    """What a launch compiles: pointers 16-byte aligned, the ALIGNED integers multiples of 16, and the strides in
    `unit_strides` equal to 1 (a launch makes an integer argument equal to 1 a constant, so the contiguous
    dimension's loads vectorise and go through asynchronous copies into shared memory)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs = dict(constexprs, **{name: 1 for name in unit_strides})
    signature, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr or p.name in unit_strides:
            signature[p.name] = "constexpr"
        elif pointer_types.get(p.name, "").startswith("tensordesc"):  # a host TensorDescriptor
            signature[p.name] = pointer_types[p.name]
        elif p.name in pointer_types:
            signature[p.name] = "*" + pointer_types[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32" if p.name in FLOAT_SCALARS else "i32"
            if p.name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def weight_argument(dt, layout, block_n, block_k):
    """(signature type, WEIGHT_DESC) of a row-tile GEMM's weight: a pointer (layout None) or the TensorDescriptor a
    launch passes, with the box `set_weight_block` gives it."""
    if layout is None:
        return dt, ""
    desc = types.SimpleNamespace()
    set_weight_block(desc, layout, block_n, block_k)
    return f"tensordesc<{dt}[{', '.join(map(str, desc.block_shape))}]>", layout


# The layout of each row-tile GEMM's weight view on the descriptor path (_triton_utils.weight_operand):
# W1 [E, F, D] and W2 [E, D, F] are contiguous in their last dimension.
WEIGHT_LAYOUTS = {"up_fwd": "nk", "up_bwd_dx": "kn", "down_fwd": "nk", "down_bwd": "kn"}


def _gemm_cases(dt, block_m, block_n, block_k, dropout=False, weight_desc=False):
    """The GEMM kernels' compile arguments; weight_desc: the row-tile GEMMs take their weight as a descriptor."""
    prec = "ieee" if dt == "fp32" else "tf32"
    gemm = {"INPUT_PRECISION": prec, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    row = dict(gemm, GROUP_M=grouped_gemm.GROUP_M)
    wt = {name: weight_argument(dt, layout if weight_desc else None, block_n, block_k)
          for name, layout in WEIGHT_LAYOUTS.items()}
    wgrad_ptrs = dict(sorted_to_flat_ptr="i32", expert_offsets_ptr="i32", go_ptr=dt, in_ptr=dt,
                      topk_weights_ptr="fp32", dw_ptr=dt, db_ptr=dt)
    # what a launch with contiguous operands makes constant 1 (see compile_for_sm90)
    wgrad_units = {"stride_gon", "stride_ink", "stride_dwk", "stride_dbn"}
    return {
        "up_fwd": (grouped_up._grouped_up_fwd_kernel,
                   dict(META, x_ptr=dt, w1=wt["up_fwd"][0], b1_ptr=dt, a_ptr=dt, h_ptr=dt),
                   dict(row, TOP_K=2, ACTIVATION="quick_gelu", STORE_H=True, DROPOUT=dropout,
                        WEIGHT_DESC=wt["up_fwd"][1]),
                   {"stride_xd", "stride_w1d", "stride_b1f"}),
        "up_bwd_dx": (grouped_gemm._rows_to_slots_kernel,  # dh W1[e] into fp32 slots
                      dict(META, a_ptr=dt, w=wt["up_bwd_dx"][0], b_ptr=dt, topk_weights_ptr=dt, out_ptr="fp32"),
                      dict(row, BIAS_AND_WEIGHT=False, WEIGHT_DESC=wt["up_bwd_dx"][1]),
                      {"stride_ak", "stride_wn", "stride_on"}),
        "down_fwd": (grouped_gemm._rows_to_slots_kernel,  # s·(a W2[e]ᵀ + b2[e]), k = 1: y directly
                     dict(META, a_ptr=dt, w=wt["down_fwd"][0], b_ptr=dt, topk_weights_ptr="fp32", out_ptr=dt),
                     dict(row, BIAS_AND_WEIGHT=True, WEIGHT_DESC=wt["down_fwd"][1]),
                     {"stride_ak", "stride_wk", "stride_bn", "stride_on"}),
        "down_bwd": (grouped_down._grouped_down_bwd_kernel,
                     dict(META, dy_ptr=dt, h_ptr=dt, w2=wt["down_bwd"][0], b2_ptr=dt, topk_weights_ptr="fp32",
                          dh_ptr=dt, u_ptr=dt, ds_ptr="fp32"),
                     dict(row, TOP_K=2, ACTIVATION="quick_gelu", COMPUTE_DH=True, COMPUTE_DS=True, STORE_U=True,
                          DROPOUT=dropout, WEIGHT_DESC=wt["down_bwd"][1]),
                     {"stride_dyd", "stride_w2f", "stride_b2d"}),
        "wgrad_down": (grouped_gemm._grouped_wgrad_kernel, wgrad_ptrs,  # dW2 = Σ dyᵀ u, db2 = Σ s·dy
                       dict(gemm, TOP_K=2, GATHER_GO=True, SCALE_DB=True, GATHER_IN=False), wgrad_units),
        "wgrad_up": (grouped_gemm._grouped_wgrad_kernel, wgrad_ptrs,  # dW1 = Σ dhᵀ x, db1 = Σ dh
                     dict(gemm, TOP_K=2, GATHER_GO=False, SCALE_DB=False, GATHER_IN=True), wgrad_units),
    }


def _cases(dt):
    cases = _gemm_cases(dt, 64, 128, 64, dropout=True)
    tma = _gemm_cases(dt, 128, 128, 64, dropout=True, weight_desc=True)  # the TMA path (128-row tiles)
    cases.update({f"{name}_tma": tma[name] for name in WEIGHT_LAYOUTS})
    cases.update({
        "combine": (grouped_gemm._slot_combine_kernel, dict(slots_ptr="fp32", out_ptr=dt),
                    dict(TOP_K=2, BLOCK_T=32, BLOCK_D=128), {"stride_od"}),
        **{name: (router._router_fwd_kernel,
                  dict(logits_ptr=dt, probs_ptr="fp32", weights_ptr="fp32", ids_ptr="i32", lse_ptr="fp32",
                       counts_ptr="i32", topk_counts_ptr="i32", psums_ptr="fp32"),
                  dict(TOP_K=2, RENORMALIZE=True, STATS=stats, BLOCK_T=64, BLOCK_E=8, BLOCK_K=2), {"stride_le"})
           for name, stats in (("router", True), ("router_without_stats", False))},
        "program_order": (grouped_gemm._program_order_kernel, dict(out_ptr="i32"),
                          dict(GROUP_M=8, WGRAD=False, BLOCK=1024), set()),
    })
    return cases


def test_compiles_specialise_every_stride_as_a_launch_does():
    """A launch makes an integer argument equal to 1 a constant and marks multiples of 16 (triton's own rule, checked
    here); every stride of every kernel compiled below is one or the other for contiguous CLIP operands, so each must
    be listed (a stride compiled as a generic i32 makes the loads scalar and the wgmma loop synchronous)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    assert native_specialize_impl(BaseBackend, 1, False, True, True)[0] == "constexpr"
    assert native_specialize_impl(BaseBackend, 4096, False, True, True)[1] == "D"
    for name, (kernel, _, _, unit_strides) in _cases("bf16").items():
        strides = {p.name for p in kernel.params if p.name.startswith("stride_")}
        assert unit_strides <= strides, f"{name}: unit strides {unit_strides - strides} are not parameters"
        unlisted = strides - unit_strides - ALIGNED - GENERIC_STRIDES
        assert not unlisted, f"{name}: strides {sorted(unlisted)} are neither unit (1) nor ALIGNED (multiple of 16)"


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", list(_cases("bf16")))
def test_kernel_compiles_for_sm90(name, dtype):
    kernel, pointer_types, constexprs, unit_strides = _cases(dtype)[name]
    compiled = compile_for_sm90(kernel, pointer_types, constexprs, unit_strides=unit_strides)
    assert compiled.asm.get("cubin"), f"{name} produced no cubin"


def ptxas_report(ptx: str) -> str:
    """ptxas -v of the kernel's PTX for sm_90a (its resource report: registers, spill stores/loads)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(src), "-o",
                                 str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    return result.stderr


# Each GEMM's autotuned launcher (its candidates are what autotune can pick).
GEMMS = {"up_fwd": grouped_up._grouped_up_fwd, "up_bwd_dx": grouped_gemm._rows_to_slots_dx,
         "down_fwd": grouped_gemm._rows_to_slots, "down_bwd": grouped_down._grouped_down_bwd,
         "wgrad_up": grouped_gemm._grouped_wgrad, "wgrad_down": grouped_gemm._grouped_wgrad}


def _autotune_space():
    """Every (kernel, BLOCK_M, config, weight descriptor) autotune can pick on CUDA (the launcher's `candidates`) at
    64-row tiles (ViT-B/16 batch 1: D 768, F 3072, 197 tokens, 99 rows per expert) and at 128-row tiles (ViT-L/14
    training: D 1024, F 4096, 65,792 tokens, 32,896 rows per expert); at 128-row tiles the row-tile GEMMs also on
    the TMA path, which `uses_weight_descriptor` picks there on sm_90. Both shapes specialise D, F and the strides as
    multiples of 16 (and the unit strides as 1); the token count is a runtime value."""
    for name, tuned in GEMMS.items():
        for block_m in (BLOCK_M_GPU, BLOCK_M_GPU_LARGE):
            for cfg in tuned.candidates(block_m):
                yield name, block_m, cfg, False
                if block_m == BLOCK_M_GPU_LARGE and name in WEIGHT_LAYOUTS:
                    yield name, block_m, cfg, True


def test_autotune_space_covers_both_tile_tables():
    """The rule that picks BLOCK_M sends both shapes above to the tiles compiled here, and the TMA rule picks the
    descriptor path for the training shape's weights on sm_90 and the pointer path at batch 1."""
    cuda = torch.device("cuda")  # block_m_for reads only the device type
    assert block_m_for(cuda, 197 * 2, 4) == BLOCK_M_GPU
    assert block_m_for(cuda, 65_792 * 2, 4) == BLOCK_M_GPU_LARGE
    assert all(any(c[0] == name and c[1] == bm for c in _autotune_space())
               for name in GEMMS for bm in (BLOCK_M_GPU, BLOCK_M_GPU_LARGE))
    w1 = torch.empty(4, 4096, 1024, dtype=torch.bfloat16)
    assert uses_weight_descriptor(w1, w1.stride(2), w1.stride(1), BLOCK_M_GPU_LARGE, capability=(9, 0))
    assert not uses_weight_descriptor(w1, w1.stride(2), w1.stride(1), BLOCK_M_GPU, capability=(9, 0))


# sm_90's largest dynamic shared memory per block (227 KiB, cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200).
SHARED_PER_BLOCK_SM90 = 232_448


def _id(name, block_m, cfg, weight_desc):
    tma = "-tma" if weight_desc else ""
    return f"{name}-M{block_m}-N{cfg.BLOCK_N}-K{cfg.BLOCK_K}-w{cfg.num_warps}-s{cfg.num_stages}{tma}"


@functools.cache
def compiled_gemm(name, block_m, cfg, weight_desc, dtype="bf16"):
    """(PTX, ptxas -v report, shared memory bytes) of a GEMM kernel at a tile config (one compile shared by the tests
    below)."""
    kernel, pointer_types, constexprs, unit_strides = _gemm_cases(dtype, block_m, cfg.BLOCK_N, cfg.BLOCK_K,
                                                                  weight_desc=weight_desc)[name]
    compiled = compile_for_sm90(kernel, pointer_types, constexprs, cfg.num_warps, cfg.num_stages, unit_strides)
    ptx = compiled.asm["ptx"]
    return ptx, ptxas_report(ptx), compiled.metadata.shared


AUTOTUNE_SPACE = [pytest.param(*case, id=_id(*case)) for case in _autotune_space()]
CASE = "name,block_m,cfg,weight_desc"


@pytest.mark.parametrize(CASE, AUTOTUNE_SPACE)
def test_autotune_configs_use_wgmma(name, block_m, cfg, weight_desc):
    ptx, _, _ = compiled_gemm(name, block_m, cfg, weight_desc)
    assert "wgmma.mma_async" in ptx, f"{name}: no wgmma (the GEMM would run on the pre-Hopper mma path)"


@pytest.mark.parametrize(CASE, AUTOTUNE_SPACE)
def test_autotune_configs_do_not_spill(name, block_m, cfg, weight_desc):
    _, report, _ = compiled_gemm(name, block_m, cfg, weight_desc)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and not any(spills), f"{name}: register spills {spills}"


@pytest.mark.parametrize(CASE, AUTOTUNE_SPACE)
def test_autotune_configs_fit_shared_memory(name, block_m, cfg, weight_desc):
    """In bf16, every candidate fits the shared memory of one block: one that did not could never launch (autotune
    would score it inf every time, and a tuned table naming it would fail at launch)."""
    _, _, shared = compiled_gemm(name, block_m, cfg, weight_desc)
    assert shared <= SHARED_PER_BLOCK_SM90, f"{name}: {shared} bytes of shared memory, over {SHARED_PER_BLOCK_SM90}"


def test_a_bf16_choice_can_be_too_big_for_fp32():
    """Why the tuned-config keys carry the dtype (tuned_configs.key_string): the down-projection's widest 128-row
    tile on the TMA path fits a block in bf16 but not in fp32, so a bf16 layer's choice launched for an fp32 layer
    of the same widths would fail on the GPU."""
    cfg = next(c for c in grouped_gemm._rows_to_slots.candidates(BLOCK_M_GPU_LARGE) if c.BLOCK_N == 256)
    assert compiled_gemm("down_fwd", BLOCK_M_GPU_LARGE, cfg, True)[2] <= SHARED_PER_BLOCK_SM90
    assert compiled_gemm("down_fwd", BLOCK_M_GPU_LARGE, cfg, True, "fp32")[2] > SHARED_PER_BLOCK_SM90


@pytest.mark.parametrize(CASE, AUTOTUNE_SPACE)
def test_autotune_configs_pipeline_wgmma(name, block_m, cfg, weight_desc):
    ptx, _, _ = compiled_gemm(name, block_m, cfg, weight_desc)
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    assert any(w > 0 for w in waits), f"{name}: every wgmma waits synchronously (wait_group counts {waits})"


@pytest.mark.parametrize(CASE, [p for p in AUTOTUNE_SPACE if p.values[0] in WEIGHT_LAYOUTS])
def test_weight_tiles_load_by_tma_on_the_descriptor_path(name, block_m, cfg, weight_desc):
    """The descriptor path loads the weight tiles with Hopper's TMA unit (a 3-D bulk tensor copy: one expert's
    [BLOCK_K, BLOCK_N] box of the [E, ·, ·] weights); the pointer path has no bulk tensor copy at all."""
    ptx, _, _ = compiled_gemm(name, block_m, cfg, weight_desc)
    tma = re.findall(r"cp\.async\.bulk\.tensor\.(\d)d", ptx)
    if weight_desc:
        assert tma and set(tma) == {"3"}, f"{name}: no 3-D TMA load of the weight tiles (bulk tensor copies {tma})"
    else:
        assert not tma, f"{name}: TMA copies {tma} on the pointer path"
