"""How MoEFFN(backend="triton") dispatches, checked on CPU: what torch.compile traces on the CUDA path (fake CUDA
tensors), how many kernels a forward launches, and the aux losses taken from the router kernel's statistics."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")

from clipmoe import MoEFFN, collect_aux_losses  # noqa: E402
from clipmoe_kernels import has_ext_op  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")
needs_extension = pytest.mark.skipif(not has_ext_op("cpu"), reason="needs the compiled extension (clipmoe::moe_align)")


def _moe(backend="triton", device=None, **kwargs):
    moe = MoEFFN(16, 32, num_experts=4, top_k=2, activation="gelu", backend=backend, device=device, **kwargs)
    with torch.no_grad():
        moe.router.weight.mul_(4)  # well-separated probabilities: no routing near-ties
    return moe


@needs_extension
@pytest.mark.parametrize("training", [True, False])
# the launch path's memoised shape helpers must not show Dynamo a cache wrapper (a warning to every compiling user)
@pytest.mark.filterwarnings("error:Dynamo detected a call to a:UserWarning")
def test_compile_fullgraph_traces_the_cuda_dispatch(training):
    """The CUDA branch of every device-dependent choice (moe_align's CUDA op, BLOCK_M, no interpreter) is traced by
    dynamo with fullgraph=True, aux losses included, on fake CUDA tensors: nothing at trace time may call into a
    pybind function or read a value from the device."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with FakeTensorMode():
        moe = _moe(device="cuda").train(training)
        x = torch.randn(5, 3, 16, device="cuda", requires_grad=training)

        def step(x):
            y = moe(x)
            losses = collect_aux_losses(moe)
            return y, losses.balance, losses.z_loss

        y, balance, z = torch.compile(step, backend=capture, fullgraph=True)(x)
    assert y.device.type == "cuda" and y.shape == x.shape and balance.shape == z.shape == ()
    (graph,) = graphs
    code = "".join(m.code for m in graph.modules() if isinstance(m, torch.fx.GraphModule))  # + autograd.Function bodies
    for op in ("clipmoe.route_topk", "clipmoe.moe_align", "clipmoe.grouped_up", "clipmoe.grouped_down"):
        assert op in code, f"{op} missing from the traced graph"


# ops that launch no kernel: views, allocations, dtype casts that are no-ops
_NO_KERNEL = {"aten::view", "aten::view_as", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
              "aten::transpose", "aten::t", "aten::resolve_conj", "aten::resolve_neg", "aten::empty",
              "aten::empty_strided", "aten::new_empty", "aten::to", "aten::expand", "aten::select", "aten::slice",
              "aten::detach", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::contiguous",
              "aten::lift_fresh", "aten::unbind", "aten::set_"}
_LAUNCH = "triton kernel launch"


def _kernels_of(events):
    """Names of the events that launch a kernel: ops outside the Triton launches that are not in _NO_KERNEL and
    have no such op (or Triton launch) below them (so aten::linear counts as its aten::mm)."""
    def under_launch(e):
        while e is not None:
            if e.name == _LAUNCH:
                return True
            e = e.cpu_parent
        return False

    def launches_inside(e):
        return any(c.name == _LAUNCH or is_kernel(c) or launches_inside(c) for c in e.cpu_children)

    def is_kernel(e):
        return "::" in e.name and e.name not in _NO_KERNEL and not launches_inside(e)
    return sorted(e.name for e in events if not under_launch(e) and is_kernel(e))


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels launched (each launch wrapped in a profiler range named _LAUNCH)."""
    from triton.runtime.interpreter import InterpretedFunction
    launched, original = [], InterpretedFunction.run

    def run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        with torch.profiler.record_function(_LAUNCH):
            return original(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launched


@needs_extension
@pytest.mark.parametrize("mode", ["training", "inference", "training_with_dropout"])
def test_a_forward_launches_four_triton_kernels_plus_the_router_gemm_and_the_permutation(triton_launches, mode):
    """Router kernel, up-projection, down-projection, slot combine; besides them only the router GEMM and moe_align
    (and, with dropout, the one-element draw of the Philox seed). No aux-loss op runs in any mode: the losses are
    computed when asked for."""
    moe = _moe(dropout=0.1 if mode == "training_with_dropout" else 0.0).train(mode != "inference")
    x = torch.randn(20, 16, requires_grad=mode != "inference")
    moe(x)  # warm-up: first-call caches
    triton_launches.clear()
    with torch.set_grad_enabled(mode != "inference"), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        moe(x)
    assert triton_launches == ["_router_fwd_kernel", "_grouped_up_fwd_kernel", "_rows_to_slots_kernel",
                               "_slot_combine_kernel"]
    seed = ["aten::random_"] if mode == "training_with_dropout" else []
    assert _kernels_of(prof.events()) == sorted(["aten::mm", "clipmoe::moe_align"] + seed)


def test_aux_losses_from_router_statistics_match_the_torch_backend():
    """balance (both forms) and z-loss from the kernel's counts, probability sums and logsumexp: the values and the
    router-weight gradients of the torch backend's losses (computed from probabilities, ids and logits)."""
    moe = _moe()
    x = torch.randn(37, 16)
    results = {}
    for backend in ("triton", "torch"):
        moe.backend = backend
        moe(x)
        aux = moe.aux
        assert (aux.router_stats is not None) == (backend == "triton")
        losses = [aux.balance_loss, aux.balance_loss_topk, aux.z_loss]
        grads = [torch.autograd.grad(loss, moe.router.weight, retain_graph=True)[0] for loss in losses]
        results[backend] = losses, grads
    names = ("balance", "balance_topk", "z")
    for name, got, want in zip(names, *[results[b][0] for b in ("triton", "torch")], strict=True):
        assert_close(got, want, torch.float32, name)
    for name, got, want in zip(names, *[results[b][1] for b in ("triton", "torch")], strict=True):
        assert_close(got, want, torch.float32, f"d router via {name}")


def test_aux_losses_are_computed_once_and_only_when_asked():
    moe = _moe()
    moe(torch.randn(9, 16))
    first = moe.aux.balance_loss
    assert moe.aux.balance_loss is first


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_aux_losses_without_gradient_come_from_probabilities(backend):
    """Under no_grad the fused router computes no statistics (router_stats None); the losses asked for then come
    from the probabilities, ids and logits, and equal those of a forward with gradient."""
    moe = _moe(backend=backend)
    x = torch.randn(37, 16)
    moe(x)
    with_grad = [moe.aux.balance_loss, moe.aux.balance_loss_topk, moe.aux.z_loss]
    with torch.no_grad():
        moe(x)
    assert moe.aux.router_stats is None
    for name, got, want in zip(("balance", "balance_topk", "z"),
                               [moe.aux.balance_loss, moe.aux.balance_loss_topk, moe.aux.z_loss], with_grad,
                               strict=True):
        assert_close(got, want.detach(), torch.float32, name)


@pytest.mark.parametrize("replace,err,words", [
    (lambda m: setattr(m.w2, "data", torch.randn(4, 16, 33)), ValueError, r"MoEFFN weights must be w1 \(4, 32, 16\)"),
    (lambda m: setattr(m.b1, "data", m.b1.data.double()), TypeError, "one dtype and device"),
    (lambda m: setattr(m, "b2", torch.nn.Parameter(m.b2.data.to("meta"))), TypeError, "one dtype and device"),
    (lambda m: setattr(m, "top_k", 5), ValueError, r"top_k must be an int in \[1, num_experts=4\]"),
])
def test_replaced_weights_are_refused_before_the_kernels(replace, err, words):
    """MoEFFN(backend="triton") skips the kernels' argument checks, so it checks its own weights: a parameter whose
    shape, dtype or device no longer matches the module is refused with a message, never read out of bounds."""
    moe = _moe()
    replace(moe)
    with pytest.raises(err, match=words):
        moe(torch.randn(5, 16))


def test_triton_backend_refuses_devices_it_cannot_run_on():
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
        _moe(device="meta")(torch.randn(5, 16, device="meta"))
