"""MoE FFN layer: providers side by side on the shapes of bench/configs.py (run: pytest bench/ --benchmark).

Providers: naive (the official per-expert loop), torch (sorted segments), triton (fused kernels, CUDA only) and
dense_equal_flops (one dense MLP of width k·F: the same FLOPs as the k experts, the bound the MoE layer can approach).
Each provider is checked against the reference (the naive loop in fp64 on CPU, fp32 on CUDA) before it is timed; a
provider that fails the check fails its test, so it shows in the report as failed instead of disappearing.
"""
import pytest
import torch
import torch.nn.functional as F

import clipmoe_kernels
from bench.providers import make_inputs
from bench.utils import relative_error, time_provider

PROVIDERS = ("naive", "torch", "triton", "dense_equal_flops")
ACTIVATION = "quick_gelu"
# Relative error (norm) a provider may show against the reference, by dtype.
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def moe_call(fn, inputs):
    i = inputs
    return lambda: fn(i["x"], i["topk_ids"], i["topk_weights"], i["w1"], i["b1"], i["w2"], i["b2"], ACTIVATION)


def dense_equal_flops_call(case, inputs):
    """A dense MLP D -> k·F -> D built from the first k experts' weights."""
    k = case.top_k
    w1 = inputs["w1"][:k].reshape(k * case.hidden, case.d_model)
    b1 = inputs["b1"][:k].reshape(-1)
    w2 = inputs["w2"][:k].permute(1, 0, 2).reshape(case.d_model, k * case.hidden)
    act = clipmoe_kernels.get_activation(ACTIVATION)
    leaves = {"x": inputs["x"], "w1": w1.detach().requires_grad_(w1.requires_grad), "b1": b1.detach(),
              "w2": w2.detach().requires_grad_(w2.requires_grad), "b2": inputs["b2"][0]}
    return lambda: F.linear(act(F.linear(leaves["x"], leaves["w1"], leaves["b1"])), leaves["w2"], leaves["b2"])


def provider_call(provider, case, inputs):
    if provider == "dense_equal_flops":
        return dense_equal_flops_call(case, inputs)
    fn = getattr(clipmoe_kernels, f"expert_ffn_{provider}", None)
    if fn is None:
        pytest.fail(f"provider {provider} is not available in this install of clipmoe_kernels")
    return moe_call(fn, inputs)


def check_provider(provider, case, device, dtype):
    """Output of the provider vs the reference on the same inputs (dense_equal_flops: vs itself in fp64/fp32)."""
    ref_device, ref_dtype = ("cpu", torch.float64) if device == "cpu" else (device, torch.float32)
    inputs = make_inputs(case, device, dtype)
    ref_inputs = make_inputs(case, ref_device, ref_dtype)
    with torch.no_grad():
        got = provider_call(provider, case, inputs)()
        if provider == "dense_equal_flops":
            want = dense_equal_flops_call(case, ref_inputs)()
        else:
            want = moe_call(clipmoe_kernels.expert_ffn_naive, ref_inputs)()
    err = relative_error(got, want)
    if not err <= CHECK_RTOL[dtype]:
        pytest.fail(f"provider {provider} failed its check on {case.id}: relative error {err:.2e} > "
                    f"{CHECK_RTOL[dtype]:.0e}")
    return err


@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_ffn(benchmark, case, provider):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if provider == "triton" and device != "cuda":
        pytest.skip("the triton provider runs on CUDA only (the interpreter is a correctness tool, not a speed one)")
    check_err = check_provider(provider, case, device, dtype)

    inputs = make_inputs(case, device, dtype)
    if case.mode == "forward":
        call = provider_call(provider, case, inputs)
        run = lambda: call()  # noqa: E731
        context = torch.no_grad
    else:
        for name in ("x", "w1", "b1", "w2", "b2", "topk_weights"):
            inputs[name].requires_grad_()
        call = provider_call(provider, case, inputs)
        grad_out = torch.randn_like(call())

        def run():
            call().backward(grad_out)
        context = torch.enable_grad
    benchmark.group = case.group
    benchmark.extra_info.update(kind="layer", provider=provider, case=case.id, tower=case.tower, batch=case.batch,
                                tokens=case.tokens, d_model=case.d_model, hidden=case.hidden,
                                num_experts=case.num_experts, top_k=case.top_k, routing=case.routing,
                                mode=case.mode, dtype=str(dtype).replace("torch.", ""), device=device,
                                flops=case.flops(), check_rel_err=check_err)
    with context():
        time_provider(benchmark, run, device, heavy=case.flops() > 2e10)
