"""pytest plugin: run the tests as on the bare GPU machine, where open_clip, ftfy and webdataset are not installed.

    python -m pytest -p bench.without_extras tests -m gpu

Importing a blocked package raises ImportError (sys.modules holds None for it), so a test file that needs one must
guard it (pytest.importorskip) to collect there. bench/gpu_check.sh runs the `gpu` tests with this plugin, on the
GPU machine and in the dry run, so that an unguarded import is found on the CPU before a GPU is there.
"""
import sys

BLOCKED = ("open_clip", "open_clip_train", "ftfy", "webdataset")


def pytest_load_initial_conftests(early_config, parser, args):
    for name in BLOCKED:
        if name in sys.modules and sys.modules[name] is not None:
            raise RuntimeError(f"bench.without_extras: {name} was imported before the plugin could block it")
        sys.modules[name] = None
