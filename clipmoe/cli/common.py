"""What every `clipmoe` command shares: argument types that validate, flags generated from the config dataclasses,
the error classes the entry point maps to exit codes, logging under the `clipmoe` logger, the progress-bar policy,
and the run folder: its `args.json`, the refusal to mix runs, --resume's check that nothing result-changing differs."""
import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from clipmoe.fileio import atomic_write
from clipmoe.progress import progress_enabled  # noqa: F401 (the CLI's name for the package's one policy)

logger = logging.getLogger("clipmoe")
RUN_RECORD = "args.json"


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


def logit_scale_arg(text: str):
    """'auto' (the model's own learned scale) or a finite number > 0."""
    if text == "auto":
        return text
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "'auto' or a finite number > 0")


def device_arg(text: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; a CUDA device only where torch sees one."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available to torch here (use cpu or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return text


class Parser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and usage errors as one line (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------ flags from the config dataclasses
@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """A flag that sets one field of a config dataclass; its default is the field's unless a command overrides it."""
    flag: str                 # e.g. "max-steps" (a command may add a prefix: "router-max-steps")
    field: str                # the dataclass field it sets, e.g. "max_steps"
    help: str
    kwargs: dict = dataclasses.field(default_factory=dict)  # type / choices / action for add_argument

    def dest(self, prefix: str = "") -> str:
        return f"{prefix}{self.flag}".replace("-", "_")


def add_config_flags(parser, config_class, flags: Sequence[ConfigFlag], *, prefix: str = "", defaults=None,
                     help_suffix: str = "") -> None:
    """Add `flags` to `parser`; a flag whose field `config_class` lacks is a bug caught when the parser is built."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    defaults = defaults or {}
    for flag in flags:
        if flag.field not in fields:
            raise TypeError(f"flag --{flag.flag}: {config_class.__name__} has no field {flag.field!r}")
        default = defaults.get(flag.field, fields[flag.field].default)
        parser.add_argument(f"--{prefix}{flag.flag}", dest=flag.dest(prefix), default=default,
                            help=flag.help + help_suffix, **flag.kwargs)


def config_from_args(config_class, flags: Sequence[ConfigFlag], args, *, prefix: str = "", **fields):
    """`config_class` from the parsed `flags` (with `prefix`) plus explicit `fields`."""
    values = {flag.field: getattr(args, flag.dest(prefix)) for flag in flags}
    return config_class(**{**values, **fields})


# ------------------------------------------------------------------------------------------------- logging, progress
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not the stream of the first call): a program
    that calls main() several times, or replaces sys.stderr, never logs into a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: info; -v: debug. Messages go to stderr under the `clipmoe` logger."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def write_args_json(out_dir, args: argparse.Namespace) -> Path:
    """The resolved arguments of a run, beside its outputs (atomic; non-JSON values as strings)."""
    text = json.dumps(run_record(args), indent=2) + "\n"
    return atomic_write(Path(out_dir) / RUN_RECORD, lambda tmp: tmp.write_text(text))


def run_record(args: argparse.Namespace) -> dict:
    """The arguments as args.json holds them (sorted; non-JSON values as strings; no `func`)."""
    resolved = {k: v for k, v in sorted(vars(args).items()) if k != "func"}
    return json.loads(json.dumps(resolved, default=str))


# ------------------------------------------------------------------------------------------------------ run folders
# Fields of args.json that --resume may change: they change what is shown or when checkpoints are written, not the
# result (sampling is seeded per draw, so the DataLoader worker count does not change the batches).
DISPLAY_ONLY = frozenset({"resume", "overwrite", "verbosity", "workers", "checkpoint_every", "output_dir",
                          "dist_timeout", "version"})
NOT_FLAGS = {"command": "the command", "world_size": "the world size (torchrun processes)",
             "data_fingerprint": "the training data (sample count and file hash)"}


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A run folder holds one run: a non-empty folder needs --resume (continue it) or --overwrite (replace it)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: is a file, expected a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not (resume or overwrite):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UsageError(f"--output-dir {out}: not empty (holds {shown}); add --resume to continue the run in it or "
                         f"--overwrite to replace it")
    if resume and not (out / RUN_RECORD).is_file():
        raise UsageError(f"--resume: {out} holds no {RUN_RECORD}, so it is not a clipmoe run folder (or one of an "
                         f"older clipmoe) and cannot be checked; --overwrite starts afresh")


def remove_outputs(out: Path, names: Sequence[str]) -> None:
    """--overwrite: delete what a run of this command writes in `out` (other files stay)."""
    for name in (*names, RUN_RECORD):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_resume(out: Path, record: dict) -> None:
    """Refuse --resume when a result-changing argument differs from the run recorded in out/args.json."""
    path = out / RUN_RECORD
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--resume: {path}: unreadable ({exc}); --overwrite starts afresh") from exc
    if not isinstance(old, dict):
        raise UsageError(f"--resume: {path}: not a record of arguments (a JSON object)")
    missing = "(not set)"
    diffs = [(key, old.get(key, missing), record.get(key, missing)) for key in sorted(set(old) | set(record))
             if key not in DISPLAY_ONLY and old.get(key, missing) != record.get(key, missing)]
    if diffs:
        named = "; ".join(f"{NOT_FLAGS.get(key, '--' + key.replace('_', '-'))}: {was!r} in the run, {now!r} now"
                          for key, was, now in diffs)
        raise UsageError(f"--resume: {out} holds a run with other settings that change results: {named}. Resume "
                         f"with the run's settings, or start a new run (--overwrite or another --output-dir)")

