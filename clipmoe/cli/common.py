"""What every `clipmoe` command shares: argument types that validate, the error classes the entry point maps to
exit codes, logging under the `clipmoe` logger, the progress-bar policy and the run folder's `args.json`."""
import argparse
import json
import logging
import math
import sys
from pathlib import Path

from clipmoe.fileio import atomic_write

logger = logging.getLogger("clipmoe")


class UsageError(ValueError):
    """Bad input from the command line or a file it names: printed as one line, exit status 2."""


# -------------------------------------------------------------------------------------------------- argument types
def _number(kind, text: str, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    return _number(float, text, math.isfinite, "a finite number")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def probability(text: str) -> float:
    return _number(float, text, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")


# ------------------------------------------------------------------------------------------------- logging, progress
def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: info; -v: debug. Messages go to stderr under the `clipmoe` logger."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def progress_enabled() -> bool:
    """One progress-bar policy for every command: tqdm bars only when stderr is a terminal and -q was not given."""
    return sys.stderr.isatty() and logger.getEffectiveLevel() <= logging.INFO


def write_args_json(out_dir, args: argparse.Namespace) -> Path:
    """The resolved arguments of a run, beside its outputs (atomic; non-JSON values as strings)."""
    resolved = {k: v for k, v in sorted(vars(args).items()) if k != "func"}
    text = json.dumps(resolved, indent=2, default=str) + "\n"
    return atomic_write(Path(out_dir) / "args.json", lambda tmp: tmp.write_text(text))
