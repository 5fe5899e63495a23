"""pytest plugin: run the tests as on the bare GPU machine, where open_clip, ftfy and webdataset are not installed.

    python -m pytest -p bench.without_extras tests -m gpu

Importing a blocked package raises ImportError (sys.modules holds None for it), so a test file that needs one must
guard it (pytest.importorskip) to collect there. bench/gpu_check.sh runs the `gpu` tests with this plugin, on the
GPU machine and in the dry run, so that an unguarded import is found on the CPU before a GPU is there.
"""
import sys

BLOCKED = ("open_clip", "open_clip_train", "ftfy", "webdataset")


# Blocked when pytest imports this plugin (-p), before any test module or conftest: in xdist workers too, which
# load the same -p plugins.
for _name in BLOCKED:
    if sys.modules.get(_name) is not None:
        raise RuntimeError(f"bench.without_extras: {_name} was imported before the plugin could block it")
    sys.modules[_name] = None
