import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail at once instead of retrying for ~46 s

try:  # a core dependency, absent only on the bare GPU machine: there the end-to-end files are not collected
    import open_clip  # noqa: F401
except ImportError:
    collect_ignore = ["test_bad_input_cli.py", "test_cluster.py", "test_contrastive.py", "test_demo.py",
                      "test_encode.py", "test_evaluate.py", "test_hf_model.py", "test_multinode.py",
                      "test_pipeline.py", "test_shift.py"]


@pytest.fixture(autouse=True, scope="session")
def _session_autotune_cache(tmp_path_factory):
    """Autotune choices that tests make (the gpu tests) go to a file of this session, not the user's autotune
    cache (clipmoe_kernels/tuned_configs.py), and no choice from an earlier run changes what a test launches."""
    old = os.environ.get("CLIPMOE_TUNED_CACHE")
    os.environ["CLIPMOE_TUNED_CACHE"] = str(tmp_path_factory.mktemp("autotune") / "tuned_configs.json")
    yield
    if old is None:
        os.environ.pop("CLIPMOE_TUNED_CACHE")
    else:
        os.environ["CLIPMOE_TUNED_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    # fp32 references must be real fp32 GEMMs, not TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@functools.cache
def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels here, or None. Triton 3.6's interpreter turns a loop
    bound that is a runtime integer into a 1-element array and calls int() on it, which NumPy 2.4+ refuses: every
    kernel with such a loop fails with one cryptic TypeError (each of ~140 tests). Probed, not version-matched; only
    that known failure is a reason to skip, anything else the probe meets raises (so no test skips by accident)."""
    import numpy
    import triton
    import triton.language as tl

    from clipmoe_kernels._triton_utils import launch

    @triton.jit
    def loop_over_a_runtime_bound(out_ptr, n):
        total = 0
        for i in range(0, n, 1):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")
        try:
            launch(loop_over_a_runtime_bound, (1,), out.device, out, 4)
        except Exception as exc:
            if "only 0-dimensional arrays can be converted to Python scalars" not in repr(exc):
                raise
            return (f"the interpreter of Triton {triton.__version__} cannot run a loop over a runtime bound with NumPy "
                    f"{numpy.__version__} ({exc!r}); use a newer Triton (3.8 works) or an older NumPy")
    assert int(out) == 6, f"the Triton interpreter's probe loop summed 0..3 to {int(out)}"
    return None


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the Triton kernels on CPU tensors through the interpreter, with the default (unpinned) tile config and
    backend choice. Test modules of the kernels use it with `pytestmark = pytest.mark.usefixtures(...)`. Skips, with
    the reason, where the installed Triton's interpreter cannot run the kernels at all (interpreter_problem)."""
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CLIPMOE_TRITON_CONFIG", raising=False)
    monkeypatch.delenv("CLIPMOE_BACKEND", raising=False)


class WeightLoads:
    """How the row-tile GEMMs of a kernel test load their weight tiles (fixture `weight_loads`): path "pointer",
    "tma" (TensorDescriptor loads wherever valid) or "auto" (the default choice, for shapes where it picks TMA), and
    the (layout, weight shape) of every descriptor launch of the test so far."""

    def __init__(self, path: str):
        self.path = path
        self.launches: set[tuple[str, tuple[int, ...]]] = set()

    def expect(self, *weights_and_layouts):
        """Assert that the launches so far used descriptors of exactly these (weight, layouts) when the path is "tma",
        for the weights that meet TMA's alignment (16-byte base and strides, last dimension contiguous), and none
        otherwise."""
        want = set()
        for w, layouts in weights_and_layouts:
            aligned = (w.data_ptr() % 16 == 0 and w.stride(-1) == 1
                       and all(s * w.element_size() % 16 == 0 for s in w.stride()[:-1]))
            if self.path != "pointer" and aligned:
                want |= {(layout, tuple(w.shape)) for layout in layouts}
        assert self.launches == want, f"{self.path} path: descriptor launches {self.launches}, expected {want}"


@pytest.fixture(params=["pointer", "tma"])
def weight_loads(request, monkeypatch):
    """Run a kernel test with the weight tiles loaded by pointers and by TMA tensor descriptors (CLIPMOE_TRITON_TMA
    0 / 1; under the interpreter 1 takes the descriptor path wherever the weights are aligned for it). Parametrise
    it indirectly with "auto" for the default choice (the variable unset)."""
    from clipmoe_kernels import _triton_utils
    if request.param == "auto":
        monkeypatch.delenv(_triton_utils.ENV_TRITON_TMA, raising=False)
    else:
        monkeypatch.setenv(_triton_utils.ENV_TRITON_TMA, "1" if request.param == "tma" else "0")
    loads = WeightLoads(request.param)
    set_block = _triton_utils.set_weight_block

    def recording(desc, layout, block_n, block_k):
        loads.launches.add((layout, tuple(desc.base.shape)))
        set_block(desc, layout, block_n, block_k)
    monkeypatch.setattr(_triton_utils, "set_weight_block", recording)
    return loads


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import clipmoe
    return f"clipmoe ops: {clipmoe.available_ops()}"
