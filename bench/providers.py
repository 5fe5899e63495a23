"""The MoE FFN layer's providers side by side on one shape, and the dense-GEMM bound they are judged against.

Providers (same inputs, same function y[t] = Σ_j w[t,j]·FFN_{e[t,j]}(x[t]) with QuickGELU and biases):
  naive       clipmoe_kernels.expert_ffn_naive, the official per-expert loop (torch.where per expert: syncs).
  torch       clipmoe_kernels.expert_ffn_torch, sorted segments (reads the expert offsets on the host: syncs).
  triton      clipmoe_kernels.expert_ffn_triton, the fused grouped GEMMs (no host synchronisation).
  grouped_mm  the same layer written with torch's grouped GEMM (torch.nn.functional.grouped_mm, or
              torch._grouped_mm on versions that only have that): sort, gather, grouped_mm, bias, activation,
              grouped_mm, weight, sum, each a separate torch op; backward by autograd.
  bound       not a MoE: the same GEMMs as plain dense matmuls of the routed row count TK = T·k (forward: the
              up and down projection, 2 GEMMs; forward+backward: those and the 4 gradient GEMMs, 6 in all), no
              activation, bias or routing, into preallocated outputs. No MoE layer can beat it; triton / bound
              is the share of cuBLAS speed the kernels reach.
"""
import torch
import torch.nn.functional as F

import clipmoe_kernels

PROVIDERS = ("triton", "torch", "naive", "grouped_mm", "bound")
ACTIVATION = "quick_gelu"
# Providers that read routing results on the host (torch.where, .tolist()): they cannot be captured in a CUDA graph.
HOST_SYNCING = {"naive": "torch.where per expert (data-dependent shapes)",
                "torch": "expert offsets read on the host (.tolist())"}
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# Relative error (norm) a provider may show against the reference, by dtype.
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make_routing(case, generator):
    """topk_ids [T, k] of case.routing (see bench/configs.py), k distinct experts per token, on the generator's
    device."""
    T, E, k, device = case.tokens, case.num_experts, case.top_k, generator.device
    if case.routing == "uniform":
        return torch.rand(T, E, generator=generator, device=device).argsort(dim=1)[:, :k]
    if case.routing == "skewed":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float, device=device) ** 1.5
        return torch.multinomial(p.expand(T, E), k, replacement=False, generator=generator)
    if case.routing == "all_to_one":
        return torch.arange(k, device=device).expand(T, k).clone()
    raise ValueError(f"routing must be one of uniform, skewed, all_to_one; got {case.routing!r}")


def make_inputs(case, device, dtype, seed=0):
    """Random layer inputs of `case` (never zeros: they hide unwritten outputs), the same for every provider on
    one device; drawn on the device (a CPU draw of a training shape's 100M numbers takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    T, D, F_, E = case.tokens, case.d_model, case.hidden, case.num_experts

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    inputs = {"x": randn(T, D), "w1": randn(E, F_, D, scale=D**-0.5), "b1": randn(E, F_, scale=0.02),
              "w2": randn(E, D, F_, scale=F_**-0.5), "b2": randn(E, D, scale=0.02)}
    inputs["topk_ids"] = make_routing(case, g)
    inputs["topk_weights"] = torch.softmax(torch.randn(T, case.top_k, generator=g, device=device), -1)
    return inputs


def expert_ffn_grouped_mm(x, topk_ids, topk_weights, w1, b1, w2, b2, activation=ACTIVATION):
    """The expert FFN with torch's grouped GEMM; shapes and result as clipmoe_kernels.expert_ffn_torch."""
    if GROUPED_MM is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor "
                           f"torch._grouped_mm")
    act = clipmoe_kernels.get_activation(activation)
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # Group ends, counted on the device (torch.bincount reads the largest id on the host: no graph capture).
    counts = torch.zeros(w1.shape[0], dtype=torch.int32, device=x.device)
    offsets = counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
    expert = flat.index_select(0, order)
    h = GROUPED_MM(x.index_select(0, order // k), w1.transpose(-2, -1), offs=offsets) + b1.index_select(0, expert)
    z = GROUPED_MM(act(h), w2.transpose(-2, -1), offs=offsets) + b2.index_select(0, expert)
    acc = torch.promote_types(x.dtype, torch.float32)  # combine in fp32 (fp64 stays fp64), like expert_ffn_torch
    z = z.to(acc) * topk_weights.reshape(-1).to(acc).index_select(0, order)[:, None]
    y = torch.empty_like(z).index_copy_(0, order, z)  # back to (token, slot) order, then the sum over slots
    return y.view(T, k, -1).sum(dim=1).to(x.dtype)


def layer_function(provider):
    if provider == "grouped_mm":
        return expert_ffn_grouped_mm
    return getattr(clipmoe_kernels, f"expert_ffn_{provider}")


def reference_output(case, device):
    """The naive loop on the same inputs in fp32 on CUDA (TF32 off), fp64 on CPU."""
    dtype = torch.float32 if device == "cuda" else torch.float64
    inputs = make_inputs(case, device, dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            return layer_call(clipmoe_kernels.expert_ffn_naive, inputs)()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def layer_call(fn, inputs):
    i = inputs
    return lambda: fn(i["x"], i["topk_ids"], i["topk_weights"], i["w1"], i["b1"], i["w2"], i["b2"], ACTIVATION)


def relative_error(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


class Prepared:
    """One provider on one case and mode, ready to time: `run()` does one forward (or forward+backward);
    `leaves` are the tensors whose .grad a timing loop should reset; `check_err` the forward's relative error
    against the reference (None for the bound, which computes no MoE)."""

    def __init__(self, run, leaves=(), check_err=None):
        self.run, self.leaves, self.check_err = run, list(leaves), check_err


def prepare(provider, case, device, dtype, reference=None):
    """A Prepared run of `provider`; raises (with the reason) when the provider cannot run or fails its check."""
    if provider == "bound":
        return prepare_bound(case, device, dtype)
    fn = layer_function(provider)
    inputs = make_inputs(case, device, dtype)
    check_err = None
    if reference is not None:
        with torch.no_grad():
            check_err = relative_error(layer_call(fn, inputs)(), reference)
        if not check_err <= CHECK_RTOL[dtype]:
            raise AssertionError(f"{provider} failed its check on {case.id}: relative error {check_err:.2e} > "
                                 f"{CHECK_RTOL[dtype]:.0e} against the naive loop in higher precision")
    if case.mode == "forward":
        call = layer_call(fn, inputs)

        def run_forward():
            with torch.no_grad():
                call()
        return Prepared(run_forward, check_err=check_err)
    leaves = [inputs[name].requires_grad_() for name in ("x", "w1", "b1", "w2", "b2", "topk_weights")]
    call = layer_call(fn, inputs)
    grad_out = torch.randn(case.tokens, case.d_model, device=device, dtype=dtype)

    def run_forward_backward():
        call().backward(grad_out)
    return Prepared(run_forward_backward, leaves, check_err)


def prepare_bound(case, device, dtype):
    """The bound's GEMMs on random operands into preallocated outputs (shapes: TK = T·k rows)."""
    g = torch.Generator(device=device).manual_seed(1)
    TK, D, F_ = case.tokens * case.top_k, case.d_model, case.hidden

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)
    x, w1, w2, dy = rand(TK, D), rand(F_, D), rand(D, F_), rand(TK, D)
    h, y, dh, dx = rand(TK, F_), rand(TK, D), rand(TK, F_), rand(TK, D)
    dw1, dw2 = rand(F_, D), rand(D, F_)

    def forward():
        torch.mm(x, w1.t(), out=h)     # up projection    [TK, D] x [D, F]
        torch.mm(h, w2.t(), out=y)     # down projection  [TK, F] x [F, D]

    def forward_backward():
        forward()
        torch.mm(dy, w2, out=dh)       # d(activation)    [TK, D] x [D, F]
        torch.mm(dy.t(), h, out=dw2)   # dW2              [D, TK] x [TK, F]
        torch.mm(dh, w1, out=dx)       # dx               [TK, F] x [F, D]
        torch.mm(dh.t(), x, out=dw1)   # dW1              [F, TK] x [TK, D]
    return Prepared(forward if case.mode == "forward" else forward_backward)
