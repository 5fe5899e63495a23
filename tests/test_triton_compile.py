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
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from clipmoe_kernels import grouped_down, grouped_gemm, grouped_up, router  # noqa: E402
from clipmoe_kernels._triton_utils import (  # noqa: E402
    BLOCK_M_GPU,
    BLOCK_M_GPU_LARGE,
    GEMM_CONFIGS,
    GEMM_CONFIGS_LARGE,
    WGRAD_CONFIGS,
)

META = {"sorted_to_flat_ptr": "i32", "expert_offsets_ptr": "i32", "tile_expert_ptr": "i32",
        "tile_row_start_ptr": "i32", "seed_ptr": "i64"}
FLOAT_SCALARS = {"DROPOUT_SCALE"}
# Integer arguments a CLIP shape makes multiples of 16 (D, F in {768, 1024, 3072, 4096} and the row strides), which
# Triton specialises on at launch; marking them here compiles what those launches compile.
ALIGNED = {"D", "F", "N", "K", "stride_xt", "stride_w1e", "stride_w1f", "stride_am", "stride_hm", "stride_dhm",
           "stride_w2e", "stride_w2d", "stride_om", "stride_dyt", "stride_gom", "stride_inm", "stride_dwe",
           "stride_dwn", "stride_b1e", "stride_b2e", "stride_dbe"}


def compile_for_sm90(kernel, pointer_types, constexprs, num_warps=4, num_stages=3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
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


def _gemm_cases(dt, block_m, block_n, block_k, dropout=False):
    prec = "ieee" if dt == "fp32" else "tf32"
    gemm = {"INPUT_PRECISION": prec, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    row = dict(gemm, GROUP_M=grouped_gemm.GROUP_M)
    wgrad_ptrs = dict(sorted_to_flat_ptr="i32", expert_offsets_ptr="i32", seed_ptr="i64", go_ptr=dt, in_ptr=dt,
                      topk_weights_ptr="fp32", dw_ptr=dt, db_ptr=dt)
    return {
        "up_fwd": (grouped_up._grouped_up_fwd_kernel,
                   dict(META, x_ptr=dt, w1_ptr=dt, b1_ptr=dt, a_ptr=dt, h_ptr=dt),
                   dict(row, TOP_K=2, ACTIVATION="quick_gelu", STORE_H=True, DROPOUT=dropout)),
        "up_bwd_dx": (grouped_gemm._rows_to_slots_kernel,  # dh W1[e] into fp32 slots
                      dict(META, a_ptr=dt, w_ptr=dt, b_ptr=dt, topk_weights_ptr=dt, out_ptr="fp32"),
                      dict(row, BIAS_AND_WEIGHT=False)),
        "down_fwd": (grouped_gemm._rows_to_slots_kernel,  # s·(a W2[e]ᵀ + b2[e]), k = 1: y directly
                     dict(META, a_ptr=dt, w_ptr=dt, b_ptr=dt, topk_weights_ptr="fp32", out_ptr=dt),
                     dict(row, BIAS_AND_WEIGHT=True)),
        "down_bwd": (grouped_down._grouped_down_bwd_kernel,
                     dict(META, dy_ptr=dt, h_ptr=dt, w2_ptr=dt, b2_ptr=dt, topk_weights_ptr="fp32", dh_ptr=dt,
                          ds_ptr="fp32"),
                     dict(row, TOP_K=2, ACTIVATION="quick_gelu", COMPUTE_DH=True, COMPUTE_DS=True, DROPOUT=dropout)),
        "wgrad_down": (grouped_gemm._grouped_wgrad_kernel, wgrad_ptrs,
                       dict(gemm, TOP_K=2, GATHER_GO=True, SCALE_GO=True, GATHER_IN=False, IN_ACTIVATION="quick_gelu",
                            DROPOUT=dropout)),
        "wgrad_up": (grouped_gemm._grouped_wgrad_kernel, wgrad_ptrs,
                     dict(gemm, TOP_K=2, GATHER_GO=False, SCALE_GO=False, GATHER_IN=True, IN_ACTIVATION="none",
                          DROPOUT=False)),
    }


def _cases(dt):
    cases = _gemm_cases(dt, 64, 128, 64, dropout=True)
    cases.update({
        "combine": (grouped_gemm._slot_combine_kernel, dict(slots_ptr="fp32", out_ptr=dt),
                    dict(TOP_K=2, BLOCK_T=32, BLOCK_D=128)),
        "router": (router._router_fwd_kernel,
                   dict(logits_ptr=dt, probs_ptr="fp32", weights_ptr="fp32", ids_ptr="i32", lse_ptr="fp32",
                        counts_ptr="i32", topk_counts_ptr="i32", psums_ptr="fp32"),
                   dict(TOP_K=2, RENORMALIZE=True, BLOCK_T=64, BLOCK_E=8, BLOCK_K=2)),
        "program_order": (grouped_gemm._program_order_kernel, dict(out_ptr="i32"),
                          dict(GROUP_M=8, WGRAD=False, BLOCK=1024)),
    })
    return cases


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", list(_cases("bf16")))
def test_kernel_compiles_for_sm90(name, dtype):
    kernel, pointer_types, constexprs = _cases(dtype)[name]
    compiled = compile_for_sm90(kernel, pointer_types, constexprs)
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


GEMMS = ["up_fwd", "up_bwd_dx", "down_fwd", "down_bwd", "wgrad_up", "wgrad_down"]


def _autotune_space():
    """Every (kernel, BLOCK_M, config) autotune can pick on CUDA: the row-tile GEMMs over GEMM_CONFIGS at 64-row tiles
    (ViT-B/16 batch 1: D 768, F 3072, 197 tokens, 99 rows per expert) and over GEMM_CONFIGS_LARGE at 128-row tiles
    (ViT-L/14 training: D 1024, F 4096, 65,792 tokens, 32,896 rows per expert), the weight-gradient kernels over
    WGRAD_CONFIGS at both. Both shapes specialise D, F and the strides as multiples of 16; the token count is a
    runtime value."""
    for name in GEMMS:
        for block_m in (BLOCK_M_GPU, BLOCK_M_GPU_LARGE):
            if name.startswith("wgrad"):
                configs = WGRAD_CONFIGS
            else:
                configs = GEMM_CONFIGS if block_m == BLOCK_M_GPU else GEMM_CONFIGS_LARGE
            for cfg in configs:
                yield name, block_m, cfg


def _id(name, block_m, cfg):
    return f"{name}-M{block_m}-N{cfg.BLOCK_N}-K{cfg.BLOCK_K}-w{cfg.num_warps}-s{cfg.num_stages}"


@functools.cache
def compiled_gemm(name, block_m, cfg):
    """(PTX, ptxas -v report) of a GEMM kernel in bf16 at a tile config (one compile shared by the tests below)."""
    kernel, pointer_types, constexprs = _gemm_cases("bf16", block_m, cfg.BLOCK_N, cfg.BLOCK_K)[name]
    ptx = compile_for_sm90(kernel, pointer_types, constexprs, cfg.num_warps, cfg.num_stages).asm["ptx"]
    return ptx, ptxas_report(ptx)


# What the compiler makes of the kernels today (issue 10, item 3, open): every wgmma loop waits for each group to
# retire (`wait_group 0`: the operands are gathered by pointer loads and, in dW2, transformed in registers), and
# several configs spill. The marks are strict: a test starts failing when a kernel improves, so its mark must go.
KNOWN_SYNC_ONLY = {_id(*case) for case in _autotune_space()}
# With the shared row-tile prologue (grouped_gemm.row_tile_program), the 64-row tiles spill only in down_bwd; the
# 128-row tiles still spill in most row-tile kernels (their gathered-row addresses and the fp32 accumulator do not
# fit 255 registers): _triton_utils keeps 64-row tiles on GPUs until they compile clean.
KNOWN_SPILLS = {
    "down_bwd-M128-N128-K32-w8-s4", "down_bwd-M128-N128-K64-w8-s3", "down_bwd-M128-N256-K64-w8-s3",
    "down_bwd-M64-N128-K32-w4-s4", "down_bwd-M64-N256-K64-w8-s3", "down_fwd-M128-N128-K32-w8-s4",
    "down_fwd-M128-N128-K64-w8-s3", "down_fwd-M128-N256-K64-w8-s3", "up_bwd_dx-M128-N128-K64-w8-s3",
    "up_bwd_dx-M128-N256-K64-w8-s3", "up_fwd-M128-N256-K64-w8-s3", "wgrad_down-M128-N128-K128-w8-s3",
    "wgrad_down-M128-N128-K64-w8-s3", "wgrad_up-M128-N128-K128-w8-s3"}


def _params(known, reason):
    return [pytest.param(*case, id=_id(*case),
                         marks=[pytest.mark.xfail(strict=True, reason=reason)] if _id(*case) in known else [])
            for case in _autotune_space()]


@pytest.mark.parametrize("name,block_m,cfg", _params(set(), ""))
def test_autotune_configs_use_wgmma(name, block_m, cfg):
    ptx, _ = compiled_gemm(name, block_m, cfg)
    assert "wgmma.mma_async" in ptx, f"{name}: no wgmma (the GEMM would run on the pre-Hopper mma path)"


@pytest.mark.parametrize("name,block_m,cfg", _params(KNOWN_SPILLS, "spills registers (issue 10, item 3)"))
def test_autotune_configs_do_not_spill(name, block_m, cfg):
    _, report = compiled_gemm(name, block_m, cfg)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and not any(spills), f"{name}: register spills {spills}"


@pytest.mark.parametrize("name,block_m,cfg", _params(KNOWN_SYNC_ONLY, "wgmma waits synchronously (issue 10, item 3)"))
def test_autotune_configs_pipeline_wgmma(name, block_m, cfg):
    ptx, _ = compiled_gemm(name, block_m, cfg)
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    assert any(w > 0 for w in waits), f"{name}: every wgmma waits synchronously (wait_group counts {waits})"
