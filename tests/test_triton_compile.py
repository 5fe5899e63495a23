"""Ahead-of-time compile of every Triton kernel for sm_90 (H100/H200), on CPU without a GPU.

The interpreter runs the kernels' Python, not the compiler: constructs it accepts can still fail to compile (early
returns, loop-carried values in branches, dtype mismatches, tl.dot shapes). Compiling to a cubin through triton's
bundled ptxas catches those on every CPU run. About 1 s per variant on the 2-core dev machine.
"""
import pytest

triton = pytest.importorskip("triton")

from clipmoe_kernels import grouped_down, grouped_gemm, grouped_up, router  # noqa: E402

META = {"sorted_to_flat_ptr": "i32", "expert_offsets_ptr": "i32", "tile_expert_ptr": "i32",
        "tile_row_start_ptr": "i32"}


def compile_for_sm90(kernel, pointer_types, constexprs, num_warps=4):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in pointer_types:
            signature[p.name] = "*" + pointer_types[p.name]
        else:
            signature[p.name] = "i32"
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})


def _cases(dt):
    prec = "ieee" if dt == "fp32" else "tf32"
    gemm = {"INPUT_PRECISION": prec, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    return {
        "up_fwd": (grouped_up._grouped_up_fwd_kernel,
                   dict(META, x_ptr=dt, w1_ptr=dt, b1_ptr=dt, a_ptr=dt, h_ptr=dt),
                   dict(gemm, TOP_K=2, ACTIVATION="gelu_tanh", STORE_H=True)),
        "up_bwd_dx": (grouped_up._grouped_up_bwd_dx_kernel, dict(META, dh_ptr=dt, w1_ptr=dt, out_ptr="fp32"), gemm),
        "down_fwd": (grouped_down._grouped_down_fwd_kernel,
                     dict(META, a_ptr=dt, w2_ptr=dt, b2_ptr=dt, topk_weights_ptr="fp32", out_ptr=dt), gemm),
        "down_bwd": (grouped_down._grouped_down_bwd_kernel,
                     dict(META, dy_ptr=dt, h_ptr=dt, w2_ptr=dt, b2_ptr=dt, topk_weights_ptr="fp32", dh_ptr=dt,
                          ds_ptr="fp32"),
                     dict(gemm, TOP_K=2, ACTIVATION="gelu", COMPUTE_DH=True, COMPUTE_DS=True)),
        "wgrad_down": (grouped_gemm._grouped_wgrad_kernel,
                       dict(sorted_to_flat_ptr="i32", expert_offsets_ptr="i32", go_ptr=dt, in_ptr=dt,
                            topk_weights_ptr="fp32", dw_ptr=dt, db_ptr=dt),
                       dict(gemm, TOP_K=2, GATHER_GO=True, SCALE_GO=True, GATHER_IN=False, IN_ACTIVATION="quick_gelu")),
        "wgrad_up": (grouped_gemm._grouped_wgrad_kernel,
                     dict(sorted_to_flat_ptr="i32", expert_offsets_ptr="i32", go_ptr=dt, in_ptr=dt,
                          topk_weights_ptr="fp32", dw_ptr=dt, db_ptr=dt),
                     dict(gemm, TOP_K=2, GATHER_GO=False, SCALE_GO=False, GATHER_IN=True, IN_ACTIVATION="none")),
        "combine": (grouped_gemm._slot_combine_kernel, dict(slots_ptr="fp32", out_ptr=dt),
                    dict(TOP_K=2, BLOCK_T=32, BLOCK_D=128)),
        "router": (router._router_fwd_kernel,
                   dict(logits_ptr=dt, probs_ptr="fp32", weights_ptr="fp32", ids_ptr="i32", lse_ptr="fp32",
                        counts_ptr="i32", topk_counts_ptr="i32", psums_ptr="fp32"),
                   dict(TOP_K=2, RENORMALIZE=True, BLOCK_T=64, BLOCK_E=8, BLOCK_K=2)),
    }


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", list(_cases("bf16")))
def test_kernel_compiles_for_sm90(name, dtype):
    kernel, pointer_types, constexprs = _cases(dtype)[name]
    compiled = compile_for_sm90(kernel, pointer_types, constexprs)
    assert compiled.asm.get("cubin"), f"{name} produced no cubin"
