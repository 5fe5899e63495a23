"""Build clipmoe_kernels._C: the C++ CPU ops always, the CUDA ops when torch is a CUDA build and nvcc is found.

Install torch first, then ``pip install -e . --no-build-isolation``. Environment:
  TORCH_CUDA_ARCH_LIST      CUDA archs to build (default "8.0;9.0": A100 and H100/H200); no GPU is queried.
  CLIPMOE_SKIP_CUDA_BUILD=1 build only the CPU ops.
  CLIPMOE_SKIP_EXT_BUILD=1  build no extension at all (the package then runs on its torch fallbacks).
  MAX_JOBS                  parallel compile jobs (read by torch's ninja build).
  CUDA_HOME                 toolkit root; defaults to /usr/local/cuda when that exists, because torch's guess from
                            `which nvcc` picks the wrong root when nvcc on PATH is a wrapper script.
"""
import glob
import os
import warnings

from setuptools import setup

DEFAULT_CUDA_ROOT = "/usr/local/cuda"
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir(DEFAULT_CUDA_ROOT):
    os.environ["CUDA_HOME"] = DEFAULT_CUDA_ROOT
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (CUDA_HOME must be set before torch.utils.cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _extensions():
    if _flag("CLIPMOE_SKIP_EXT_BUILD"):
        return []
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    # -g0: Python's default flags add debug info (an 11 MB .so instead of 0.3 MB).
    cxx_flags = ["-O3", "-g0"]
    nvcc_ok = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc_ok and not _flag("CLIPMOE_SKIP_CUDA_BUILD"):
        print(f"clipmoe: building CPU and CUDA ops (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        return [CUDAExtension(
            "clipmoe_kernels._C", cpp_sources + cuda_sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )]
    reason = ("CLIPMOE_SKIP_CUDA_BUILD=1" if _flag("CLIPMOE_SKIP_CUDA_BUILD")
              else "torch is a CPU build" if not torch.version.cuda else "nvcc not found (set CUDA_HOME)")
    warnings.warn(f"clipmoe: building the CPU ops only ({reason})", stacklevel=2)
    return [CppExtension("clipmoe_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension})
