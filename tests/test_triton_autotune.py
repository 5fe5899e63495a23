"""Autotuning: its choices are cached across processes (tuned_configs.py), and it must not leak state between
candidates. triton.autotune runs every candidate config on the same
buffers before the chosen one. Emulated under the interpreter: every TunedKernel launch runs all candidates in turn,
narrow to wide, on the same arguments, so buffers sized for the narrowest BLOCK_N keep the earlier runs' contents
unless the kernels write them fully."""
import json
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("triton")

from clipmoe_kernels import _triton_utils, grouped_down, grouped_gemm, grouped_up, tuned_configs  # noqa: E402
from clipmoe_kernels._triton_utils import GEMM_CONFIGS, INTERPRET_CONFIG, TileConfig, TunedKernel, launch, rows_bucket  # noqa: E402
from clipmoe_kernels.expert_ffn import expert_ffn_torch  # noqa: E402
from clipmoe_kernels.expert_ffn_triton import expert_ffn_triton  # noqa: E402
from tests.moe_cases import GRAD_NAMES, expert_weights, routing, run_with_grads  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# Narrowest first, the "winner" last (the widest), as when autotune picks a wide tile after benchmarking narrow ones.
CANDIDATES = [TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1), TileConfig(64, 32, 4, 1)]


def run_every_candidate(self, grid, device, args, meta):
    for cfg in CANDIDATES:
        launch(self.kernel, grid(cfg.BLOCK_N, cfg.BLOCK_K), device, *args, **meta, BLOCK_N=cfg.BLOCK_N,
               BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@pytest.fixture
def emulated_autotune(monkeypatch):
    monkeypatch.setattr(TunedKernel, "__call__", run_every_candidate)
    # buffers sized for these candidates (what candidate_configs returns on CUDA when autotuning)
    monkeypatch.setattr(grouped_gemm, "candidate_configs", lambda device, wgrad=False: CANDIDATES)
    monkeypatch.setattr(_triton_utils, "candidate_configs", lambda device, wgrad=False: CANDIDATES)


@pytest.mark.parametrize("k", [1, 2])
def test_every_gradient_is_right_after_all_candidates_ran(emulated_autotune, k):
    T, D, F, E = 23, 24, 80, 3  # F = 80: 5 N-tiles at BLOCK_N 16, 2 at 64
    ids, w = routing(T, E, k)
    x = torch.randn(T, D)
    params = expert_weights(D, F, E)
    g = torch.randn(T, D)
    y, grads = run_with_grads(expert_ffn_triton, x, ids, w, params, "gelu", g)
    y_ref, grads_ref = run_with_grads(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params],
                                      "gelu", g.double())
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close(got, want, torch.float32, f"d{name}")


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CONFIGS, str(path))
    tuned_configs.forget_tuned_configs()
    yield path
    tuned_configs.forget_tuned_configs()


def _launched_configs(monkeypatch):
    seen = {}
    original = _triton_utils.launch

    def spy(kernel, grid, device, *args, **kwargs):
        seen[kernel.fn.__name__] = (kwargs.get("BLOCK_N"), kwargs.get("BLOCK_K"))
        return original(kernel, grid, device, *args, **kwargs)
    monkeypatch.setattr(_triton_utils, "launch", spy)
    return seen


def test_a_cached_config_is_launched_instead_of_the_default(tuned_file, monkeypatch):
    """An entry of the tuned-config JSON for this device, kernel and autotune key (widths and rows bucket) is what the
    launch uses; other kernels keep the default; the result is unchanged."""
    T, D, F, E, k = 19, 16, 40, 3, 2
    key = tuned_configs.key_string(["D", "F", "ROWS_BUCKET"], [D, F, rows_bucket(T * k, E)], torch.float32)
    cached = GEMM_CONFIGS[1]
    tuned_file.write_text(json.dumps({"cpu-interpreter": {"_grouped_up_fwd_kernel": {key: cached._asdict()}}}))
    seen = _launched_configs(monkeypatch)
    ids, w = routing(T, E, k)
    x, params = torch.randn(T, D), expert_weights(D, F, E)
    y = expert_ffn_triton(x, ids, w, *params)
    assert seen["_grouped_up_fwd_kernel"] == (cached.BLOCK_N, cached.BLOCK_K)
    assert seen["_rows_to_slots_kernel"] == (INTERPRET_CONFIG.BLOCK_N, INTERPRET_CONFIG.BLOCK_K)
    assert_close(y, expert_ffn_torch(x.double(), ids, w.double(), *[p.double() for p in params]), torch.float32)


def test_down_forward_and_dx_keep_their_own_tuned_entries(tuned_file, monkeypatch):
    """The down-projection forward and the up-projection's dx run one kernel at equal widths (N = D, K = F) but read
    their weights along different dimensions: an entry for one must not be the other's choice."""
    T, D, F, E, k = 19, 16, 40, 3, 2
    key = tuned_configs.key_string(["N", "K", "ROWS_BUCKET"], [D, F, rows_bucket(T * k, E)], torch.float32)
    cached = GEMM_CONFIGS[1]
    tuned_file.write_text(json.dumps({"cpu-interpreter": {"_rows_to_slots_kernel": {key: cached._asdict()}}}))
    seen = {}
    original = _triton_utils.launch

    def spy(kernel, grid, device, *args, **kwargs):
        if kernel.fn.__name__ == "_rows_to_slots_kernel":
            role = "down_forward" if kwargs["BIAS_AND_WEIGHT"] else "dx"
            seen[role] = (kwargs["BLOCK_N"], kwargs["BLOCK_K"])
        return original(kernel, grid, device, *args, **kwargs)
    monkeypatch.setattr(_triton_utils, "launch", spy)
    ids, w = routing(T, E, k)
    x, params = torch.randn(T, D), expert_weights(D, F, E)
    run_with_grads(expert_ffn_triton, x, ids, w, params, "gelu", torch.randn(T, D))
    assert seen == {"down_forward": (cached.BLOCK_N, cached.BLOCK_K),
                    "dx": (INTERPRET_CONFIG.BLOCK_N, INTERPRET_CONFIG.BLOCK_K)}


def test_the_launch_path_memo_follows_the_table(tuned_file, tmp_path, monkeypatch):
    """The launch path memoises its lookups; a new autotune choice, another CLIPMOE_TUNED_CONFIGS file and
    forget_tuned_configs must still change what the next launch uses."""
    T, D, F, E, k = 19, 16, 40, 3, 2
    key = tuned_configs.key_string(["D", "F", "ROWS_BUCKET"], [D, F, rows_bucket(T * k, E)], torch.float32)
    seen = _launched_configs(monkeypatch)
    ids, w = routing(T, E, k)
    x, params = torch.randn(T, D), expert_weights(D, F, E)

    def launched_up():
        expert_ffn_triton(x, ids, w, *params)
        return seen["_grouped_up_fwd_kernel"]
    first, second = GEMM_CONFIGS[1], GEMM_CONFIGS[0]
    tuned_file.write_text(json.dumps({"cpu-interpreter": {"_grouped_up_fwd_kernel": {key: first._asdict()}}}))
    assert launched_up() == (first.BLOCK_N, first.BLOCK_K)
    tuned_configs.record(torch.device("cpu"), "_grouped_up_fwd_kernel", key, second._asdict())  # chosen in-process
    assert launched_up() == (second.BLOCK_N, second.BLOCK_K)
    tuned_configs.forget_tuned_configs()
    assert launched_up() == (first.BLOCK_N, first.BLOCK_K)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cpu-interpreter": {"_grouped_up_fwd_kernel": {key: second._asdict()}}}))
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CONFIGS, str(other))
    assert launched_up() == (second.BLOCK_N, second.BLOCK_K)


def test_autotune_choices_are_saved_and_read_back(tuned_file):
    device = torch.device("cpu")
    tuned_configs.record(device, "_rows_to_slots_kernel", "N=1024,K=4096,ROWS_BUCKET=32768",
                         dict(GEMM_CONFIGS[3]._asdict()))
    assert tuned_configs.save_tuned_configs() == tuned_file
    tuned_configs.forget_tuned_configs()
    assert tuned_configs.lookup(device, "_rows_to_slots_kernel", "N=1024,K=4096,ROWS_BUCKET=32768") == \
        GEMM_CONFIGS[3]._asdict()
    assert tuned_configs.lookup(device, "_rows_to_slots_kernel", "N=768,K=3072,ROWS_BUCKET=32768") is None


@pytest.mark.parametrize("content,words", [("[1, 2]", "JSON object"), ("{not json", "valid"),
                                           (None, "not one of its autotune candidates")])
def test_bad_tuned_config_files_are_named(tuned_file, content, words):
    T, D, F, E, k = 9, 16, 16, 2, 1
    if content is None:  # a config autotune could not have chosen (buffers are sized for the candidates)
        key = tuned_configs.key_string(["D", "F", "ROWS_BUCKET"], [D, F, rows_bucket(T * k, E)], torch.float32)
        bad = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
        content = json.dumps({"cpu-interpreter": {"_grouped_up_fwd_kernel": {key: bad}}})
    tuned_file.write_text(content)
    ids, w = routing(T, E, k)
    with pytest.raises(ValueError, match=words) as info:
        expert_ffn_triton(torch.randn(T, D), ids, w, *expert_weights(D, F, E))
    assert str(tuned_file) in str(info.value)


def test_the_shipped_table_is_valid():
    table = json.loads(tuned_configs.SHIPPED.read_text())
    assert isinstance(table, dict)
    for device, kernels in table.items():
        for kernel, keys in kernels.items():
            for key, config in keys.items():
                assert set(config) == {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}, (device, kernel, key)


# The user's autotune cache: a choice autotune makes is there for the next process.

def _cpu_clock_bench(fn, quantiles=None, **kwargs):
    """triton.autotune's benchmarker for CPU tensors: one interpreted run timed with a CPU clock (its own
    benchmarker needs a GPU driver)."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def _tuned_kernels():
    return [k for module in (grouped_gemm, grouped_up, grouped_down) for k in vars(module).values()
            if isinstance(k, TunedKernel)]


@pytest.fixture
def real_autotune(monkeypatch, tmp_path):
    """triton.autotune itself over CANDIDATES on CPU tensors: without INTERPRET_CONFIG a TunedKernel with no cached
    config autotunes, as on CUDA. Yields the autotune cache file (the shipped table is replaced by an empty one)."""
    import triton.runtime.autotuner as autotuner
    monkeypatch.setattr(_triton_utils, "INTERPRET_CONFIG", None)
    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(lambda self: _cpu_clock_bench))
    monkeypatch.setattr(TunedKernel, "candidates", lambda self, block_m: CANDIDATES)
    monkeypatch.setattr(grouped_gemm, "candidate_configs", lambda device, wgrad=False: CANDIDATES)
    monkeypatch.setattr(_triton_utils, "candidate_configs", lambda device, wgrad=False: CANDIDATES)
    for kernel in _tuned_kernels():  # autotuners and memos built for these candidates, over interpreted kernels
        monkeypatch.setattr(kernel, "_tuned", {})
        monkeypatch.setattr(kernel, "_memo", {})
        monkeypatch.setattr(kernel, "kernel", _triton_utils._interpreted(kernel.kernel))
    cache = tmp_path / "cache" / "tuned_configs.json"
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CACHE, str(cache))
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CONFIGS, str(tmp_path / "no-table.json"))
    tuned_configs.forget_tuned_configs()
    with _triton_utils._interpret_jit_calls():  # what launch() does around an interpreted kernel
        yield cache
    tuned_configs.forget_tuned_configs()


def _count_autotunes(monkeypatch):
    calls = []
    original = TunedKernel.autotuner

    def spy(self, block_m, layout=None):
        calls.append(self.name)
        return original(self, block_m, layout)
    monkeypatch.setattr(TunedKernel, "autotuner", spy)
    return calls


def _layer_with_grads(T=19, D=16, F=40, E=3, k=2):
    torch.manual_seed(1)
    ids, w = routing(T, E, k)
    x, params, g = torch.randn(T, D), expert_weights(D, F, E), torch.randn(T, D)
    got = run_with_grads(expert_ffn_triton, x, ids, w, params, "gelu", g)
    want = run_with_grads(expert_ffn_torch, x.double(), ids, w.double(), [p.double() for p in params], "gelu",
                          g.double())
    for name, a, b in zip(["y", *GRAD_NAMES], [got[0], *got[1]], [want[0], *want[1]], strict=True):
        assert_close(a, b, torch.float32, name)


KERNEL_NAMES = {"_grouped_up_fwd_kernel", "_rows_to_slots_kernel", "_rows_to_slots_kernel[dx]",
                "_grouped_down_bwd_kernel", "_grouped_wgrad_kernel"}


def test_autotune_choices_are_in_the_cache_for_the_next_process(real_autotune, monkeypatch):
    """Forward and backward autotune every kernel once and write each choice to the cache file; a process that
    starts afresh (this one after forget_tuned_configs) launches those choices without autotuning."""
    autotuned = _count_autotunes(monkeypatch)
    _layer_with_grads()
    assert set(autotuned) == KERNEL_NAMES
    written = json.loads(real_autotune.read_text())["cpu-interpreter"]
    assert {k: list(v.values()) for k, v in written.items()} == \
        {k: list(v.values()) for k, v in tuned_configs._chosen["cpu-interpreter"].items()}
    assert all(TileConfig(**c) in CANDIDATES for keys in written.values() for c in keys.values())
    tuned_configs.forget_tuned_configs()
    autotuned.clear()
    seen = _launched_configs(monkeypatch)
    _layer_with_grads()
    assert autotuned == []
    up = next(iter(written["_grouped_up_fwd_kernel"].values()))
    assert seen["_grouped_up_fwd_kernel"] == (up["BLOCK_N"], up["BLOCK_K"])


def test_a_choice_for_16_bit_inputs_is_not_launched_for_fp32_inputs(real_autotune, monkeypatch):
    """Autotune's choice depends on the input dtype: a tile that fits shared memory in bf16 may not in fp32 (the
    down-projection's 128x256 tile on the TMA path: 144 KiB in bf16, 256 KiB in fp32, over the 227 KiB of an H200
    block; test_triton_compile.py), so the cache keys carry the dtype, and an fp32 layer at the widths a 16-bit one
    tuned autotunes for itself instead of launching that choice (the user's cache keeps choices across processes)."""
    T, D, F, E, k = 19, 16, 40, 3, 2
    ids, w = routing(T, E, k)
    x, params = torch.randn(T, D), expert_weights(D, F, E)
    autotuned = _count_autotunes(monkeypatch)

    def forward(dtype):
        autotuned.clear()
        expert_ffn_triton(x.to(dtype), ids, w, *[p.to(dtype) for p in params])
        return set(autotuned)
    forward_kernels = {"_grouped_up_fwd_kernel", "_rows_to_slots_kernel"}
    assert forward(torch.float16) == forward_kernels
    assert forward(torch.float16) == set()  # cached
    assert forward(torch.float32) == forward_kernels
    assert forward(torch.float32) == set()
    written = json.loads(real_autotune.read_text())["cpu-interpreter"]["_grouped_up_fwd_kernel"]
    assert sorted(key.rpartition("dtype=")[2] for key in written) == ["float16", "float32"]


@pytest.mark.parametrize("problem", ["not a candidate", "not JSON", "fields missing", "not a table"])
def test_a_stale_or_broken_cache_is_tuned_again_and_rewritten(real_autotune, monkeypatch, problem):
    """A cache entry from another package version (not one of the candidates now), a file cut short and an entry
    without its fields are passed over: the kernels autotune, and the file then holds valid choices."""
    T, D, F, E, k = 19, 16, 40, 3, 2
    key = tuned_configs.key_string(["D", "F", "ROWS_BUCKET"], [D, F, rows_bucket(T * k, E)], torch.float32)
    content = {"not a candidate": {"cpu-interpreter": {"_grouped_up_fwd_kernel": {key: GEMM_CONFIGS[-1]._asdict()}}},
               "fields missing": {"cpu-interpreter": {"_grouped_up_fwd_kernel": {key: {"BLOCK_N": 32}}}},
               "not a table": {"cpu-interpreter": {"_grouped_up_fwd_kernel": [1, 2]}}}.get(problem)
    real_autotune.parent.mkdir()
    real_autotune.write_text("{not json" if content is None else json.dumps(content))
    autotuned = _count_autotunes(monkeypatch)
    if problem == "not JSON":
        with pytest.warns(UserWarning, match="ignoring the autotune cache"):
            _layer_with_grads(T, D, F, E, k)
    else:
        _layer_with_grads(T, D, F, E, k)
    assert "_grouped_up_fwd_kernel" in autotuned
    rewritten = json.loads(real_autotune.read_text())["cpu-interpreter"]["_grouped_up_fwd_kernel"][key]
    assert TileConfig(**rewritten) in CANDIDATES


def test_the_cache_can_be_switched_off(real_autotune, monkeypatch):
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CACHE, "off")
    _layer_with_grads()
    assert set(tuned_configs._chosen["cpu-interpreter"]) == KERNEL_NAMES  # kept for this process only
    assert not real_autotune.parent.exists()


def test_an_unwritable_cache_warns_and_training_goes_on(real_autotune, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "tuned_configs.json"  # its folder is a file: not creatable, whoever runs the test
    monkeypatch.setenv(tuned_configs.ENV_TUNED_CACHE, str(cache))
    with pytest.warns(UserWarning, match=f"could not write the autotune cache {cache}.*CLIPMOE_TUNED_CACHE"):
        _layer_with_grads()
    assert set(tuned_configs._chosen["cpu-interpreter"]) == KERNEL_NAMES


WRITER = """
import sys, torch
from clipmoe_kernels import tuned_configs
rank = int(sys.argv[1])
for i in range(40):
    tuned_configs.record(torch.device("cpu"), "kernel", f"RANK={rank},I={i}",
                         {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}, cache=True)
"""


def test_ranks_that_autotune_at_once_keep_every_choice(tmp_path):
    """The ranks of a torchrun job write the same cache file at once: each merges its choices under a lock, so
    none is lost, and the file is whole JSON throughout (replaced atomically)."""
    cache = tmp_path / "tuned_configs.json"
    env = {**_subprocess_env(), tuned_configs.ENV_TUNED_CACHE: str(cache)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank)], env=env) for rank in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    keys = json.loads(cache.read_text())["cpu-interpreter"]["kernel"]
    assert set(keys) == {f"RANK={r},I={i}" for r in range(3) for i in range(40)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned_configs.json", "tuned_configs.json.lock"]


def _subprocess_env():
    import os
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
