"""MoEFFN and the expert FFN backends vs a per-token loop reference, forward and every gradient."""
import pytest
import torch

from clipmoe import MoEFFN, balance_loss, collect_aux_losses, router_z_loss
from clipmoe_kernels import expert_ffn_naive, expert_ffn_torch, select_backend, topk_routing_ref
from tests.moe_cases import expert_reference, per_token_reference
from tests.tolerances import assert_close, assert_close_lowp

EXPERT_FFNS = {"naive": expert_ffn_naive, "torch": expert_ffn_torch}
BACKENDS = list(EXPERT_FFNS)


MODULE_SHAPES = [
    # (T, D, F, E, k, activation)
    (1, 8, 16, 4, 2, "quick_gelu"),   # one token
    (19, 13, 7, 4, 2, "gelu"),        # odd D and F
    (24, 16, 32, 1, 1, "gelu_tanh"),  # E=1, k=1: a dense MLP
    (30, 12, 20, 7, 3, "quick_gelu"),  # prime E, k=3
    (17, 10, 6, 3, 3, "gelu"),        # k=E
]


def _module(D, F_, E, k, activation, backend, dtype):
    moe = MoEFFN(D, F_, num_experts=E, top_k=k, activation=activation, backend=backend, dtype=dtype)
    with torch.no_grad():  # larger router weights: well-separated probabilities, so no top-k near-ties
        moe.router.weight.mul_(4)
    return moe


def _module_grads(moe, x):
    y = moe(x)
    g = torch.randn_like(y)
    params = [moe.router.weight, moe.w1, moe.b1, moe.w2, moe.b2]
    grads = torch.autograd.grad(y, [x] + params, g)
    return y, g, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,D,F_,E,k,activation", MODULE_SHAPES)
def test_module_matches_per_token_reference(backend, dtype, T, D, F_, E, k, activation):
    moe = _module(D, F_, E, k, activation, backend, dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    y, g, grads = _module_grads(moe, x)

    ref_params = [p.detach().double().requires_grad_() for p in (moe.router.weight, moe.w1, moe.b1, moe.w2, moe.b2)]
    x_ref = x.detach().double().requires_grad_()
    y_ref = per_token_reference(x_ref, *ref_params, top_k=k, activation=activation)
    ref_grads = torch.autograd.grad(y_ref, [x_ref] + ref_params, g.double())
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(["x", "router", "w1", "b1", "w2", "b2"], grads, ref_grads, strict=True):
        assert_close(got, want, dtype, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_bf16(backend):
    """bf16 module, router included: max error vs fp64 <= 2x that of the per-token reference run in bf16 + floor."""
    T, D, F_, E, k = 20, 32, 48, 4, 2
    moe = _module(D, F_, E, k, "quick_gelu", backend, torch.bfloat16)
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    y, g, grads = _module_grads(moe, x)
    params = [moe.router.weight, moe.w1, moe.b1, moe.w2, moe.b2]

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in [x] + params]
        y_ref = per_token_reference(*leaves, top_k=k, activation="quick_gelu")
        return y_ref, torch.autograd.grad(y_ref, leaves, g.to(dtype))

    y_hi, grads_hi = reference(torch.float64)
    y_lo, grads_lo = reference(torch.bfloat16)
    hi_ids = torch.topk(x.detach().double() @ moe.router.weight.detach().double().T, k).indices
    assert torch.equal(moe.aux.topk_ids, hi_ids), "test data must route identically in bf16 and fp64"
    assert_close_lowp(y, y_hi, y_lo, "y")
    for name, got, hi, lo in zip(["x", "router", "w1", "b1", "w2", "b2"], grads, grads_hi, grads_lo, strict=True):
        assert_close_lowp(got, hi, lo, f"d{name}")


EXPERT_CASES = [
    # (T, D, F, E, k, routing)
    (23, 16, 24, 4, 2, "random"),
    (20, 16, 24, 4, 1, "all_to_one"),   # every token on expert 3
    (20, 16, 24, 5, 2, "empty"),        # only experts 0 and 2 used
    (9, 11, 5, 3, 3, "random"),         # k=E, odd sizes
]


def _expert_inputs(T, D, F_, E, k, routing, dtype):
    if routing == "random":
        topk_ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    elif routing == "all_to_one":
        topk_ids = torch.full((T, k), E - 1)
    else:
        topk_ids = torch.stack([torch.tensor([0, 2])[torch.randperm(2)[:k]] for _ in range(T)])
    topk_weights = torch.rand(T, k, dtype=torch.float64)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    tensors = [torch.randn(T, D), torch.randn(E, F_, D) / D**0.5, torch.randn(E, F_) * 0.1,
               torch.randn(E, D, F_) / F_**0.5, torch.randn(E, D) * 0.1]
    return topk_ids, topk_weights, [t.to(dtype) for t in tensors]


def _expert_run(fn, topk_ids, topk_weights, tensors, activation="quick_gelu"):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    w = topk_weights.detach().clone().requires_grad_()
    x, w1, b1, w2, b2 = leaves
    y = fn(x, topk_ids, w, w1, b1, w2, b2, activation)
    g = torch.ones_like(y) if y.numel() == 0 else torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, leaves + [w], g, allow_unused=True)
    return y, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves + [w], grads, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,D,F_,E,k,routing", EXPERT_CASES)
def test_expert_ffn_edge_routings_fp32(backend, T, D, F_, E, k, routing):
    topk_ids, topk_weights, tensors = _expert_inputs(T, D, F_, E, k, routing, torch.float32)
    y, grads = _expert_run(EXPERT_FFNS[backend], topk_ids, topk_weights.float(), tensors)
    y_ref, ref_grads = _expert_run(expert_reference, topk_ids, topk_weights,
                                   [t.double() for t in tensors])
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(["x", "w1", "b1", "w2", "b2", "topk_weights"], grads, ref_grads, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")
    if routing != "random":  # experts without tokens get exactly zero weight gradients
        unused = torch.ones(E, dtype=torch.bool)
        unused[topk_ids.unique()] = False
        for g in grads[1:5]:
            assert torch.all(g[unused] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lowp", [torch.bfloat16, torch.float16])
def test_expert_ffn_low_precision(backend, lowp):
    """Low precision: error vs the fp64 reference at most 2x that of plain torch in the same dtype, plus a floor."""
    topk_ids, topk_weights, tensors = _expert_inputs(33, 32, 64, 4, 2, "random", torch.float64)
    y, grads = _expert_run(EXPERT_FFNS[backend], topk_ids, topk_weights.float(), [t.to(lowp) for t in tensors])
    y_hi, grads_hi = _expert_run(expert_reference, topk_ids, topk_weights, tensors)
    y_lo, grads_lo = _expert_run(expert_reference, topk_ids, topk_weights.to(lowp), [t.to(lowp) for t in tensors])
    assert y.dtype == lowp
    assert_close_lowp(y, y_hi, y_lo, "y")
    for name, got, hi, lo in zip(["x", "w1", "b1", "w2", "b2", "topk_weights"], grads, grads_hi, grads_lo, strict=True):
        assert_close_lowp(got.to(lowp), hi, lo, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_non_contiguous_input(backend):
    moe = _module(16, 32, 4, 2, "quick_gelu", backend, torch.float32).eval()
    x_lnd = torch.randn(5, 3, 16)  # (L, N, D), as in open_clip's sequence-first blocks
    x_nld = x_lnd.transpose(0, 1)  # (N, L, D), a non-contiguous view
    assert not x_nld.is_contiguous()
    y_lnd, y_nld = moe(x_lnd), moe(x_nld)
    assert y_lnd.shape == x_lnd.shape and y_nld.shape == x_nld.shape
    y_tokens = moe(x_lnd.reshape(-1, 16)).reshape(5, 3, 16)
    assert_close(y_lnd, y_tokens)
    assert_close(y_nld, y_tokens.transpose(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    moe = _module(8, 16, 4, 2, "gelu", backend, torch.float32)
    y = moe(torch.randn(0, 3, 8))
    assert y.shape == (0, 3, 8)


def test_backends_agree_and_env_override(monkeypatch):
    moe = _module(16, 24, 4, 2, "quick_gelu", "auto", torch.float32).eval()
    x = torch.randn(40, 16)
    outputs = {}
    for name in BACKENDS:
        monkeypatch.setenv("CLIPMOE_BACKEND", name)
        assert select_backend("auto", x.device) == name
        outputs[name] = moe(x)
    assert_close(outputs["naive"], outputs["torch"])
    monkeypatch.setenv("CLIPMOE_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="CLIPMOE_BACKEND"):
        moe(x)


def test_dropout_only_in_training():
    moe = MoEFFN(16, 64, num_experts=4, top_k=2, dropout=0.5)
    x = torch.randn(20, 16)
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.train()
    assert not torch.equal(moe(x), moe.eval()(x))
    moe_nodrop = MoEFFN(16, 64, num_experts=4, top_k=2, dropout=0.0)
    assert torch.equal(moe_nodrop.train()(x), moe_nodrop.eval()(x))


def test_renormalize_switch():
    moe = _module(8, 16, 4, 2, "gelu", "torch", torch.float64)
    moe.renormalize = False
    x = torch.randn(6, 8, dtype=torch.float64)
    params = (moe.router.weight, moe.w1, moe.b1, moe.w2, moe.b2)
    assert_close(moe(x), per_token_reference(x, *params, top_k=2, activation="gelu", renormalize=False))
    probs, weights, _ = topk_routing_ref(torch.randn(5, 4), 2, renormalize=False)
    assert torch.all(weights.sum(-1) < 1)


def test_aux_losses_forms():
    E, T = 4, 8
    balanced_ids = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    uniform = torch.full((T, E), 1.0 / E)
    assert balance_loss(uniform, balanced_ids, "paper").item() == pytest.approx(1.0)
    assert balance_loss(uniform, balanced_ids, "topk").item() == pytest.approx(2.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 1] = 1.0
    collapsed_ids = torch.tensor([[1, 0]] * T)
    assert balance_loss(collapsed, collapsed_ids, "paper").item() == pytest.approx(E)
    logits = torch.randn(T, E)
    assert router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item())
    with pytest.raises(ValueError, match="form"):
        balance_loss(uniform, balanced_ids, "switch")


def test_aux_exposed_without_changing_output_and_collected():
    model = torch.nn.Sequential(MoEFFN(8, 16, 4, 2), MoEFFN(8, 16, 4, 2))
    x = torch.randn(10, 8, requires_grad=True)
    y = model(x)
    manual = model[1](model[0](x))
    assert torch.equal(y, manual)
    aux = model[0].aux
    assert aux.router_probs.dtype == torch.float32 and aux.router_probs.shape == (10, 4)
    assert aux.topk_ids.shape == (10, 2)
    losses = collect_aux_losses(model)
    assert set(losses.per_layer) == {"0", "1"}
    expected = (model[0].aux.balance_loss + model[1].aux.balance_loss) / 2
    assert torch.allclose(losses.balance, expected)
    (y.sum() + 0.01 * losses.balance + 1e-3 * losses.z_loss).backward()
    assert model[0].router.weight.grad is not None and model[0].router.weight.grad.abs().sum() > 0
    assert collect_aux_losses(model, "topk").balance.item() >= 1.0
    with pytest.raises(ValueError, match="no MoEFFN"):
        collect_aux_losses(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_router_input(backend):
    """A token whose router logits are NaN gets a NaN output; the other tokens are exact and ids stay in range."""
    moe = _module(8, 16, 4, 2, "quick_gelu", backend, torch.float32).eval()
    x = torch.randn(6, 8)
    clean = moe(x)
    x[2, 3] = float("nan")
    out = moe(x)
    assert torch.all(out[2].isnan())
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert_close(out[keep], clean[keep])
    ids = moe.aux.topk_ids
    assert ids.min() >= 0 and ids.max() < 4


@pytest.mark.parametrize("kwargs,err,words", [
    (dict(d_model=8, hidden_dim=16, num_experts=2, top_k=3), ValueError, "top_k"),
    (dict(d_model=8, hidden_dim=16, num_experts=0), ValueError, "num_experts"),
    (dict(d_model=8, hidden_dim=16, activation="relu"), ValueError, "activation"),
    (dict(d_model=8, hidden_dim=16, backend="cuda"), ValueError, "backend"),
    (dict(d_model=8, hidden_dim=16, dropout=1.5), ValueError, "dropout"),
])
def test_bad_construction(kwargs, err, words):
    with pytest.raises(err, match=words):
        MoEFFN(**kwargs)


def test_bad_forward_input():
    moe = MoEFFN(8, 16)
    with pytest.raises(ValueError, match="x must have last dimension d_model=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        moe(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="x is on meta"):
        moe(torch.randn(3, 8, device="meta"))
    w1, b1, w2, b2 = moe.w1, moe.b1, moe.w2, moe.b2
    ids, weights = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(ValueError, match="topk_weights must have the shape"):
        expert_ffn_torch(torch.randn(3, 8), ids, weights[:, :1], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="b2 must have shape"):
        expert_ffn_naive(torch.randn(3, 8), ids, weights, w1, b1, w2, b2[:, :4])
    with pytest.raises(ValueError, match="topk_ids holds 9"):
        expert_ffn_torch(torch.randn(3, 8), torch.full((3, 2), 9), weights, w1, b1, w2, b2)


def test_autocast_bf16_cpu():
    moe = MoEFFN(16, 32, 4, 2)
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - moe(x)).abs().max() < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(backend):
    moe = _module(64, 128, 4, 2, "quick_gelu", backend, torch.float32)
    x = torch.randn(300, 64, requires_grad=True)
    y, g, grads = _module_grads(moe, x)
    moe_cuda = moe.cuda()
    x_cuda = x.detach().cuda().requires_grad_()
    y_cuda = moe_cuda(x_cuda)
    grads_cuda = torch.autograd.grad(y_cuda, [x_cuda, moe_cuda.router.weight, moe_cuda.w1, moe_cuda.b1,
                                              moe_cuda.w2, moe_cuda.b2], g.cuda())
    assert_close(y_cuda.cpu(), y)
    for got, want in zip(grads_cuda, grads, strict=True):
        assert_close(got.cpu(), want)
