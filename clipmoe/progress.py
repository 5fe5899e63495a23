"""The package's one progress-bar policy: a tqdm bar only when stderr is a terminal and the `clipmoe` logger shows
info messages (the CLI's -q raises it to warnings). Logs and captured output then hold no bar lines."""
import logging
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("clipmoe")


def progress_enabled() -> bool:
    return sys.stderr.isatty() and logger.getEffectiveLevel() <= logging.INFO


def progress_bar(iterable=None, *, enabled=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) under the policy; `enabled` True/False overrides it (e.g. rank > 0: False)."""
    show = progress_enabled() if enabled is None else enabled
    return tqdm(iterable, disable=not show, dynamic_ncols=True, **kwargs)
