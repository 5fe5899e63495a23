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


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the Triton kernels on CPU tensors through the interpreter, with the default (unpinned) tile config and
    backend choice. Test modules of the kernels use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CLIPMOE_TRITON_CONFIG", raising=False)
    monkeypatch.delenv("CLIPMOE_BACKEND", raising=False)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import clipmoe
    return f"clipmoe ops: {clipmoe.available_ops()}"
