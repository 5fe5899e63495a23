"""Shared plumbing of the Triton kernels: guarded import, device/interpreter checks, tile sizes and configs.

Importing this module never imports a kernel, never touches a GPU and works without triton installed
(`HAS_TRITON` is then False and `TRITON_IMPORT_ERROR` says why).

Compiled and interpreted kernels in one process: `triton.jit` decides at decoration time whether a function is
compiled or interpreted, from TRITON_INTERPRET as it was when the function (and triton's own @jit library functions
such as tl.sum or tl.zeros) was decorated. The package must run CUDA tensors compiled and, in the same process, CPU
tensors interpreted (tests set TRITON_INTERPRET=1 after triton was imported), so `launch` runs a kernel for CPU
tensors through an InterpretedFunction of its source and, for the duration of that launch, makes @jit functions
called from it (our helpers and triton's library) interpret as well, restoring everything afterwards.

Environment variables read here (at call time, not import time):
  CLIPMOE_TRITON_CONFIG  pins one tile config for every grouped-GEMM kernel instead of autotuning it, e.g.
                         "BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3" (keys: BLOCK_N, BLOCK_K, num_warps,
                         num_stages; omitted keys keep the default of the fixed config below). Useful to skip the
                         one-time autotune (minutes on a cold cache), to reproduce a result, or when autotune
                         benchmarking runs out of memory. Under the interpreter it replaces INTERPRET_CONFIG.
  CLIPMOE_TRITON_TMA     how the row-tile GEMMs load their weight tiles (see `uses_weight_descriptor`): "auto"
                         (default) TMA tensor descriptors on sm_90+ for 128-row tiles, pointer loads elsewhere;
                         "1" descriptors wherever they are valid (also under the interpreter: tests), "0" pointer
                         loads always. 64-row tiles on a GPU (batch 1) keep pointer loads either way.
  TRITON_INTERPRET       (Triton's own) =1 runs the kernels on CPU tensors through the Triton interpreter; it is the
                         only way CPU tensors reach these kernels (tests).
"""
import contextlib
import functools
import operator
from typing import NamedTuple

import torch

from clipmoe_kernels import tuned_configs
from clipmoe_kernels._hotpath import device_type, env_value, env_values

try:
    import triton  # noqa: F401  (importing triton does not initialise CUDA)
    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # triton is optional: the torch backends work without it
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = exc
try:  # host-side tensor descriptors: the same class in triton 3.6 and 3.8 (docs/kernels.md, "Weight tiles by TMA")
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

ENV_TRITON_CONFIG = "CLIPMOE_TRITON_CONFIG"
ENV_TRITON_TMA = "CLIPMOE_TRITON_TMA"

# Rows per tile of the grouped GEMMs. It is also the block_m of the moe_align tile table, so it is never autotuned
# (a tile table built for one BLOCK_M is wrong for another): `block_m_for` picks it from the shapes alone (the
# bucket of rows per expert, the same value that keys autotuning), and the table and every kernel use that rule.
# On a GPU: 64 up to 4096 rows per expert (at most E partial tiles wasted; inference and small batches), 128 beyond
# (CLIP training batches: tens of thousands of rows per expert, where 128-row tiles halve the weight reads per output
# and feed two wgmma m64 warpgroups). Every config autotune can pick at either size compiles for sm_90 without
# register spills and with a pipelined wgmma loop (tests/test_triton_compile.py). In the interpreter 16 and 32
# (beyond 16 rows per expert), so that tiny test shapes cover both tile tables, with several tiles per expert and
# partial tiles.
BLOCK_M_GPU = 64
BLOCK_M_GPU_LARGE = 128
LARGE_SEGMENT_BUCKET_GPU = 8192  # 128-row tiles beyond 4096 rows per expert
BLOCK_M_INTERPRET = 16
BLOCK_M_INTERPRET_LARGE = 32
LARGE_SEGMENT_BUCKET_INTERPRET = 32


class TileConfig(NamedTuple):
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3


# Autotune candidates on CUDA (BLOCK_M fixed above). Small on purpose: each config costs a compile per dtype and
# activation (about 1 s each, measured for sm_90 on the 2-core dev machine) and a benchmark per autotune key. Picked
# for Hopper with 16-bit inputs, not yet measured on a GPU: 64x128 / 64x256 output tiles for wide D and F, the 64x64
# entry for narrow ones and for fp32 inputs (in fp32 one candidate exceeds a block's shared memory, the down-
# projection's 128x256 TMA tile, and autotune scores it inf; tests/test_triton_compile.py), and 64x32 tiles as the
# small-M path: at inference sizes (ViT-B/16 batch 1: 8 row tiles) the down-projection has 96 programs of 64 columns
# for 132 SMs; 32 columns double the programs and halve the work of each.
GEMM_CONFIGS = [
    TileConfig(64, 32, 4, 4),
    TileConfig(128, 32, 4, 4),
    TileConfig(128, 64, 8, 3),
    TileConfig(256, 64, 8, 3),
    TileConfig(32, 64, 4, 4),
]
# 128-row tiles (large segments): 128x64, 128x128 and 128x256 outputs at 8 warps (two warpgroups).
GEMM_CONFIGS_LARGE = [
    TileConfig(128, 64, 8, 3),
    TileConfig(256, 64, 8, 3),
    TileConfig(128, 32, 8, 4),
    TileConfig(64, 64, 8, 3),
]
# Weight-gradient kernels own a [BLOCK_N, BLOCK_K] tile of dW[e] and loop over the expert's rows; square-ish tiles
# balance the reuse of both operands.
WGRAD_CONFIGS = [
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 64, 8, 3),
    TileConfig(64, 128, 8, 3),
    TileConfig(128, 128, 8, 3),
]
# Under the interpreter each program is a numpy call sequence, so time scales with the number of programs and loop
# trips, not with the tile size: a 128^3 fp32 matmul took 0.80 s with 16^3 tiles and 0.03 s with 64^3 tiles.
INTERPRET_CONFIG = TileConfig(64, 64, 4, 1)


def is_interpreter() -> bool:
    return env_value("TRITON_INTERPRET", "0") == "1"


def missing_triton(name: str):
    """Stand-in for a public Triton entry point when triton failed to import: raises a clear ImportError."""
    def unavailable(*args, **kwargs):
        require_triton(name)
    unavailable.__name__ = name
    return unavailable


def require_triton(where: str):
    if not HAS_TRITON:
        raise ImportError(f"{where} needs triton, which failed to import: {TRITON_IMPORT_ERROR}")


def check_triton_device(where: str, tensor: torch.Tensor):
    """CUDA tensors run compiled kernels; CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    require_triton(where)
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu":
        if is_interpreter():
            return
        raise ValueError(f"{where}: the Triton kernels got CPU tensors but TRITON_INTERPRET is not '1'; run on CUDA "
                         f"tensors, set TRITON_INTERPRET=1 (slow, for tests), or use the 'torch' backend")
    raise ValueError(f"{where}: the Triton kernels support CUDA tensors (and CPU under TRITON_INTERPRET=1), "
                     f"got a tensor on {tensor.device}")


def uses_interpreter(device: torch.device) -> bool:
    return device_type(device) == "cpu"


def eager_cache(maxsize=None):
    """functools.lru_cache for eager calls (shape helpers that run at every launch); while torch.compile traces, the
    plain function, which Dynamo would trace anyway, warning about the cache wrapper it ignores."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)
        return call
    return wrap


def block_m_for(device: torch.device, rows: int, num_experts: int) -> int:
    """BLOCK_M of the grouped GEMMs (and of the tile table they read) for `rows` routed rows over `num_experts`
    experts on `device` (see BLOCK_M_GPU)."""
    return _block_m(uses_interpreter(device), rows, num_experts)


@eager_cache(maxsize=256)  # called by every launcher of every forward
def _block_m(interpreter: bool, rows: int, num_experts: int) -> int:
    bucket = rows_bucket(rows, num_experts)
    if interpreter:
        return BLOCK_M_INTERPRET_LARGE if bucket >= LARGE_SEGMENT_BUCKET_INTERPRET else BLOCK_M_INTERPRET
    large = LARGE_SEGMENT_BUCKET_GPU is not None and bucket >= LARGE_SEGMENT_BUCKET_GPU
    return BLOCK_M_GPU_LARGE if large else BLOCK_M_GPU


# Weight tiles by TMA (docs/kernels.md, "Weight tiles by TMA"). The row-tile GEMMs read their weight operand either
# by pointer loads (WEIGHT_DESC "") or through a host-side TensorDescriptor over the [E, K, N] ("kn") or [E, N, K]
# ("nk") view of the weights, whichever has the contiguous dimension last; the gathered activation rows are pointer
# loads either way. TMA's constraints (checked by TensorDescriptor too): base 16-byte aligned, every stride but the
# last a multiple of 16 bytes, the last dimension contiguous, at most 256 elements per box dimension (our tiles are
# at most 256 x 64).
_TMA_MODES = ("auto", "1", "0")


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def uses_weight_descriptor(weight: torch.Tensor, stride_k: int, stride_n: int, block_m: int,
                           capability: tuple[int, int] | None = None) -> bool:
    """Whether a row-tile GEMM with BLOCK_M `block_m` loads its tiles of `weight` [E, ·, ·] (B[kk, n] of expert e at
    e·stride(0) + kk·stride_k + n·stride_n) through a TMA tensor descriptor instead of pointer loads.

    Valid: triton has TensorDescriptor; a GPU of compute capability >= 9 (Hopper's TMA unit), or the interpreter
    when forced; one of stride_k, stride_n is 1 and the other strides and the base are 16-byte aligned. Pays
    (CLIPMOE_TRITON_TMA "auto", the default): only with 128-row tiles (BLOCK_M_GPU_LARGE, training-size batches),
    where each weight tile feeds two warpgroups. 64-row tiles on a GPU (inference, batch 1, where the host time
    around the launches sets the layer time) always keep the pointer path, decided before anything else is read:
    their launch builds no descriptor and reads no environment variable. "1" uses a descriptor wherever it is valid
    otherwise (128-row tiles, and every tile size under the interpreter: tests), "0" never.
    capability: that of the GPU holding `weight` (None: ask torch; a CPU tensor has none), so tests can ask about a
    GPU that is not there."""
    if block_m == BLOCK_M_GPU:  # 64-row tiles on a GPU, the latency-bound path: nothing else is looked at
        return False
    mode = env_value(ENV_TRITON_TMA) or "auto"
    if mode == "auto":
        if block_m != BLOCK_M_GPU_LARGE:
            return False
    elif mode not in _TMA_MODES:
        raise ValueError(f"{ENV_TRITON_TMA}={mode!r}: expected one of {_TMA_MODES}")
    if mode == "0" or TensorDescriptor is None:
        return False
    if capability is None:
        if weight.device.type == "cuda":
            capability = _cuda_capability(weight.device.index if weight.device.index is not None
                                          else torch.cuda.current_device())
        elif not (mode == "1" and uses_interpreter(weight.device)):
            return False
    if capability is not None and capability[0] < 9:
        return False
    if 1 not in (stride_k, stride_n):
        return False
    size = weight.element_size()
    other = stride_n if stride_k == 1 else stride_k
    return weight.data_ptr() % 16 == 0 and weight.stride(0) * size % 16 == 0 and other * size % 16 == 0


def weight_operand(weight: torch.Tensor, k: int, n: int, stride_k: int, stride_n: int, block_m: int):
    """(kernel argument, WEIGHT_DESC) for the weight of a row-tile GEMM over K = k, N = n: (weight, "") for pointer
    loads, or a TensorDescriptor over the [E, k, n] ("kn") or [E, n, k] ("nk") view when `uses_weight_descriptor`.
    The descriptor's block shape is set per config by TunedKernel (`set_weight_block`)."""
    if not uses_weight_descriptor(weight, stride_k, stride_n, block_m):
        return weight, ""
    if stride_n == 1:
        return TensorDescriptor(weight, [weight.shape[0], k, n], [weight.stride(0), stride_k, 1], [1, 16, 16]), "kn"
    return TensorDescriptor(weight, [weight.shape[0], n, k], [weight.stride(0), stride_n, 1], [1, 16, 16]), "nk"


def set_weight_block(desc, layout: str, block_n: int, block_k: int):
    """Give a weight descriptor of `weight_operand` the box of one [BLOCK_K, BLOCK_N] tile of one expert."""
    desc.block_shape = [1, block_k, block_n] if layout == "kn" else [1, block_n, block_k]


_CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def pinned_config():
    """The TileConfig of CLIPMOE_TRITON_CONFIG, or None when it is unset or empty."""
    raw = env_value(ENV_TRITON_CONFIG)
    return _parse_pinned_config(raw.strip(), is_interpreter()) if raw else None


@functools.lru_cache(maxsize=16)  # read at every launch: parse each value once
def _parse_pinned_config(raw: str, interpreter: bool):
    if not raw:
        return None
    values: dict[str, int] = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _CONFIG_KEYS:
            raise ValueError(f"{ENV_TRITON_CONFIG}={raw!r}: expected comma-separated KEY=INT with KEY in "
                             f"{_CONFIG_KEYS}, e.g. 'BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3'")
        try:
            values[key] = int(value)
        except ValueError:
            raise ValueError(f"{ENV_TRITON_CONFIG}={raw!r}: {key} must be an integer, got {value!r}") from None
    for key in ("BLOCK_N", "BLOCK_K"):
        v = values.get(key)
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{ENV_TRITON_CONFIG}={raw!r}: {key} must be a power of two >= 16 (tl.dot), got {v}")
    base = INTERPRET_CONFIG if interpreter else GEMM_CONFIGS[0]
    return base._replace(**values)


def candidate_configs(device: torch.device, wgrad: bool = False) -> list[TileConfig]:
    """Every config a launch on `device` may use (sizes buffers whose shape depends on BLOCK_N): the pinned one, or
    the autotune candidates (which a cached choice is one of) and INTERPRET_CONFIG."""
    pinned = pinned_config()
    if pinned is not None:
        return [pinned]
    return (WGRAD_CONFIGS if wgrad else GEMM_CONFIGS + GEMM_CONFIGS_LARGE) + [INTERPRET_CONFIG]


def autotune_configs(configs, pre_hook=None):
    import triton
    return [triton.Config({"BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K}, num_warps=c.num_warps,
                          num_stages=c.num_stages, pre_hook=pre_hook) for c in configs]


_INTERPRETED = {}


def _interpreted(kernel):
    """InterpretedFunction of a @triton.jit function (cached; itself when triton already made it one)."""
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _INTERPRETED:
        _INTERPRETED[kernel.fn] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel.fn]


@contextlib.contextmanager
def _interpret_jit_calls():
    """While an interpreted kernel runs, calls to compiled-mode JITFunctions (helpers, tl.sum, ...) interpret their
    source, the way InterpretedFunction.__call__ does, but undo their language patches on return."""
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        scope = _patch_lang(self.fn)
        try:
            return _interpreted(self).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    original = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """Launch a @triton.jit kernel with fixed meta-parameters: interpreted for CPU tensors, compiled otherwise, on
    the GPU that holds the tensors (`device`)."""
    if uses_interpreter(device):
        with _interpret_jit_calls():
            _interpreted(kernel)[grid](*args, **kwargs)
    elif _is_other_gpu(device):
        with torch.cuda.device(device.index):
            kernel.run(*args, grid=grid, warmup=False, **kwargs)
    else:  # what kernel[grid](...) calls, without the lambda it builds per launch (and no context per launch)
        kernel.run(*args, grid=grid, warmup=False, **kwargs)


def _is_other_gpu(device: torch.device) -> bool:
    """Whether `device` is a CUDA device other than the current one. Triton launches on the current device and its
    stream: tensors on another GPU (a model on cuda:1 in a process whose current device is cuda:0) would be read by
    a kernel on the wrong GPU, unordered with their own stream."""
    return device_type(device) == "cuda" and device.index is not None and device.index != torch.cuda.current_device()


def on_device(device: torch.device):
    """A context in which `device` is the current CUDA device (a no-op context for the current one or a CPU
    device); see _is_other_gpu."""
    return torch.cuda.device(device.index) if _is_other_gpu(device) else contextlib.nullcontext()


class LaunchPlan(NamedTuple):
    """One launch with everything but its tensors decided: replaying it costs the launch alone, where building it
    (shapes, strides, tile config, constexprs) cost several times that on the host at batch 1. A launcher keeps its
    plans in a PlanCache under a key of every input its build reads besides the tensors' data (shapes, strides,
    dtypes, device, flags, launch_settings()), and replays one with that call's tensors."""
    kernel: object
    grid: tuple
    device: torch.device
    scalars: tuple     # the kernel's arguments after the tensors
    kwargs: dict       # constexprs, tile config, warps, stages
    interpreted: bool  # uses_interpreter(device), decided once

    @classmethod
    def build(cls, kernel, grid: tuple, device: torch.device, scalars: tuple, kwargs: dict) -> "LaunchPlan":
        return cls(kernel, grid, device, scalars, kwargs, uses_interpreter(device))

    def __call__(self, *tensors):
        if self.interpreted or _is_other_gpu(self.device):
            launch(self.kernel, self.grid, self.device, *tensors, *self.scalars, **self.kwargs)
        else:  # launch's last branch, without its calls (two of the four launches' host cost at batch 1)
            self.kernel.run(*tensors, *self.scalars, grid=self.grid, warmup=False, **self.kwargs)


class PlanCache(dict):
    """A launcher's LaunchPlans by key; emptied when full (a key per batch shape: a long run with varying shapes
    rebuilds plans instead of growing)."""
    MAX_PLANS = 256

    def remember(self, key, plan: LaunchPlan) -> LaunchPlan:
        if len(self) >= self.MAX_PLANS:
            self.clear()
        self[key] = plan
        return plan


_SETTINGS_ENV = (ENV_TRITON_CONFIG, tuned_configs.ENV_TUNED_CONFIGS, tuned_configs.ENV_TUNED_CACHE, ENV_TRITON_TMA,
                 "TRITON_INTERPRET")


def launch_settings() -> tuple:
    """What, besides its inputs, decides a launch's build: the environment variables read on the launch path (raw)
    and the tuned-config table's generation (new autotune choices). Part of every plan key with the inputs (for
    GEMMs dot_precision too), so that a change to any of them rebuilds the plans."""
    return env_values(_SETTINGS_ENV), tuned_configs.generation()


def custom_op(name: str):
    """torch.library.custom_op (no mutated arguments) whose Python implementation runs directly in eager mode on plain
    tensors: the dispatcher's Python layers around a custom op cost about 25 µs per call on the dev machine, as much
    as the launcher itself at batch 1. Under torch.compile / export, and for tensor subclasses (FakeTensor), the call
    goes through the registered op, so tracing sees one opaque op with its fake implementation. Called only inside
    the autograd.Functions (grad mode off), so the op's missing autograd formula is never needed."""
    def wrap(fn):
        op = torch.library.custom_op(name, fn, mutates_args=())

        @functools.wraps(fn)
        def call(*args):
            if type(args[0]) is torch.Tensor and not torch.compiler.is_compiling():
                return fn(*args)
            return op(*args)
        call.op = op
        call.register_fake = op.register_fake
        return call
    return wrap


class TunedKernel:
    """A @triton.jit grouped-GEMM kernel with tunable BLOCK_N/BLOCK_K/num_warps/num_stages. Config, in order: the
    pinned one (CLIPMOE_TRITON_CONFIG); the cached one for this device, kernel and autotune key (tuned_configs.py:
    an earlier autotune in this process or on this machine, or the shipped JSON); INTERPRET_CONFIG for CPU
    tensors; else @triton.autotune over `configs` keyed on `key` (built on first use, so nothing is set up at
    import), whose choice is then kept for the process and added to the user's autotune cache. A launch whose meta
    has a WEIGHT_DESC layout (`weight_operand`) gets its weight descriptor's block shape set for the config (by a
    pre_hook when autotuning) and is tuned and cached under its own key (the descriptor path is a different kernel
    variant)."""

    def __init__(self, kernel, configs, key, large_configs=None, max_outputs_per_thread=None, weight_arg=None,
                 name=None):
        """large_configs: the candidates for 128-row tiles (BLOCK_M_GPU_LARGE), when they differ.
        max_outputs_per_thread: drop the configs whose BLOCK_M x BLOCK_N output tile gives a thread more elements
        than this (kernels whose epilogue holds several fp32 tiles of that size spill registers beyond it).
        weight_arg: the kernel parameter that takes `weight_operand`'s argument (kernels with WEIGHT_DESC).
        name: the tuned-config table's name of this use of the kernel (default its function name); one kernel that
        serves two GEMMs of the same widths but other operand layouts needs one TunedKernel, with its own autotune
        state and name, per GEMM, or both would run the first one's choice."""
        self.kernel, self.key = kernel, key
        self.weight_arg = weight_arg
        self._weight_index = None if weight_arg is None else kernel.arg_names.index(weight_arg)
        self.configs = configs
        self._configs = {BLOCK_M_GPU_LARGE: large_configs or configs, BLOCK_M_INTERPRET_LARGE: large_configs or configs}
        self.max_outputs_per_thread = max_outputs_per_thread
        self._candidates = {}  # per BLOCK_M
        self.name = name or kernel.fn.__name__
        self._key_index = [kernel.arg_names.index(k) for k in key]
        self._key_values = lambda args: tuple(args[i] for i in self._key_index)
        if len(key) > 1:  # itemgetter returns the tuple itself, several times faster than a generator
            self._key_values = operator.itemgetter(*self._key_index)
        self._tuned = {}
        self._memo = {}  # cached_config's

    def candidates(self, block_m: int) -> list[TileConfig]:
        """The configs autotune may pick for tiles of `block_m` rows (checked at every launch of a cached config)."""
        if block_m not in self._candidates:
            configs = self._configs.get(block_m, self.configs)
            limit = self.max_outputs_per_thread
            self._candidates[block_m] = [c for c in configs
                                         if limit is None or block_m * c.BLOCK_N <= limit * 32 * c.num_warps]
        return self._candidates[block_m]

    def _layout(self, meta):
        """The launch's weight layout: None for kernels without WEIGHT_DESC, "" on the pointer path."""
        return meta.get("WEIGHT_DESC") if self._weight_index is not None else None

    def resolve(self, device: torch.device, args, meta) -> TileConfig | None:
        """The config of a launch that needs no autotuning: the pinned one, the cached one, or INTERPRET_CONFIG on
        the interpreter; None when autotune has to choose."""
        cfg = pinned_config()
        if cfg is None:
            cfg = self.cached_config(device, args, meta["BLOCK_M"], self._layout(meta))
            if cfg is None and (uses_interpreter(device) or is_interpreter()):
                cfg = INTERPRET_CONFIG
        return cfg

    def __call__(self, grid, device: torch.device, args, meta):
        """`grid(BLOCK_N, BLOCK_K)` -> launch grid; `meta`: constexpr arguments other than the tunables."""
        cfg = self.resolve(device, args, meta)
        layout = self._layout(meta)
        if cfg is not None:
            if layout:
                set_weight_block(args[self._weight_index], layout, cfg.BLOCK_N, cfg.BLOCK_K)
            launch(self.kernel, grid(cfg.BLOCK_N, cfg.BLOCK_K), device, *args, **meta, BLOCK_N=cfg.BLOCK_N,
                   BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        tuned = self.autotuner(meta["BLOCK_M"], layout)
        with on_device(device):  # the benchmark runs and the launch, as in launch()
            tuned[lambda m: grid(m["BLOCK_N"], m["BLOCK_K"])](*args, **meta)
        best = tuned.best_config
        tuned_configs.record(device, self.name, self.table_key(self._key_values(args), args[0].dtype, layout),
                             dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages), cache=True)

    def launch_plan(self, grid, device: torch.device, args, meta, num_tensors: int):
        """This launch as a LaunchPlan (the first `num_tensors` arguments are the ones each replay passes), or None
        when it cannot be replayed: autotune has to choose first, or the weight is a TMA descriptor (built per
        call, at training sizes only)."""
        if meta.get("WEIGHT_DESC"):
            return None
        cfg = self.resolve(device, args, meta)
        if cfg is None:
            return None
        return LaunchPlan.build(self.kernel, grid(cfg.BLOCK_N, cfg.BLOCK_K), device, tuple(args[num_tensors:]),
                                dict(meta, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages))

    def table_key(self, values, dtype: torch.dtype, layout) -> str:
        """The tuned-config table's key of a launch: the autotune key's values, the inputs' dtype (that of the
        kernel's first argument, its row operand), and the weight layout on the descriptor path (a different kernel
        variant, tuned apart)."""
        key = tuned_configs.key_string(self.key, values, dtype)
        return f"{key},WEIGHT_DESC={layout}" if layout else key

    def cached_config(self, device: torch.device, args, block_m: int, layout=None) -> TileConfig | None:
        """The cached choice (tuned_configs) for this launch, checked against the candidates; None when there is
        none. Memoised per (device, key values, dtype, BLOCK_M, layout, table, table generation): it runs at every
        launch, and building the key string, naming the device and finding the table cost several µs."""
        values, dtype = self._key_values(args), args[0].dtype
        memo_key = (device, values, dtype, block_m, layout, tuned_configs.table_env(), tuned_configs.generation())
        cfg = self._memo.get(memo_key)
        if cfg is not None:
            return cfg
        key = self.table_key(values, dtype, layout)
        candidates = self.candidates(block_m)
        cached = tuned_configs.lookup(device, self.name, key, accept=lambda c: TileConfig(**c) in candidates)
        if cached is None:
            return None
        cfg = TileConfig(**cached)
        if cfg not in candidates:  # buffers are sized for the candidates (candidate_configs)
            raise ValueError(f"{tuned_configs.table_path()}: the config {cached} of {self.name} ({key}) is "
                             f"not one of its autotune candidates {[c._asdict() for c in candidates]}")
        self._memo[memo_key] = cfg
        return cfg

    def autotuner(self, block_m: int, layout=None):
        """The triton.autotune of this kernel over its candidates at `block_m` (built once per BLOCK_M and weight
        layout). On the descriptor path (layout "kn" / "nk") every config's pre_hook gives the weight descriptor
        that config's box before the config runs, as Triton's own TMA tutorials do."""
        variant = (block_m, layout or None)
        if variant not in self._tuned:
            import triton
            hook = self._set_weight_block if layout else None
            self._tuned[variant] = triton.autotune(autotune_configs(self.candidates(block_m), hook), key=self.key)(
                self.kernel)
        return self._tuned[variant]

    def _set_weight_block(self, nargs):
        """Autotune pre_hook: the weight descriptor's block shape for the config about to run."""
        set_weight_block(nargs[self.weight_arg], nargs["WEIGHT_DESC"], nargs["BLOCK_N"], nargs["BLOCK_K"])


@eager_cache(maxsize=256)  # pure, and called by every launcher of every forward
def rows_bucket(total_rows: int, num_experts: int) -> int:
    """Autotune key part: rows per expert if balanced, rounded up to a power of two and capped, so that a new batch
    size re-tunes only when it changes the regime (tens vs thousands of rows per expert), not on every value. The
    kernels take it as an unused argument marked do_not_specialize (and the token count T likewise where passed), so
    that batch-size changes do not trigger recompiles through Triton's integer specialisation."""
    per_expert = max(1, -(-total_rows // num_experts))
    return min(1 << (per_expert - 1).bit_length(), 1 << 16)


# What reading torch.backends.cuda.matmul.allow_tf32 returns, without the failed attribute lookup and the module
# __getattr__ that the read goes through (7.9k instructions against 1.6k, twice per fp32 forward; callgrind).
_cublas_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or \
    (lambda: torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 inputs follow torch.backends.cuda.matmul.allow_tf32 (the tests turn it off, so
    fp32 results are real fp32 GEMMs); 16-bit inputs are exact products either way."""
    if dtype == torch.float32 and not _cublas_allow_tf32():
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
