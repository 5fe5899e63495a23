"""Atomic file writes (checkpoints and results are never left half-written under their final name) and reading
text files as UTF-8 with an error that names the file."""
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

TEXT_ENCODING = "utf-8"
_UTF16_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


def _temporary_name(path: Path) -> Path:
    # Host and pid in the name let a later write tell the leftovers of a killed writer from a live one's file.
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        return True
    return True


def remove_stale_temporaries(path) -> list:
    """Delete the temporary files that killed `atomic_write`s of `path` left in its folder (those written on this
    host by a process that no longer runs); returns the removed paths."""
    path = Path(path)
    removed = []
    if os.name != "posix":  # the liveness probe os.kill(pid, 0) would terminate the process on Windows
        return removed
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue  # another host's or a live writer's (or a name this module does not write)
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary file in `path`'s folder, then rename it to `path`: a crash never leaves a partial
    file under the final name, and the temporaries a killed earlier write left are removed first. The file gets
    the usual umask permissions (0666 & ~umask), whatever mode `write` creates it with (tempfile.mkstemp and
    safetensors make private 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def decode_text(data: bytes, where: str) -> str:
    """`data` decoded as UTF-8; a leading UTF-8 byte-order mark is accepted and dropped (Excel writes one).
    Raises ValueError naming `where`, the line and the byte for anything else (UTF-16, Latin-1, ...)."""
    for bom, name in _UTF16_BOMS.items():
        if data.startswith(bom):
            raise ValueError(f"{where}: the file is {name} (it starts with a {name} byte-order mark); clipmoe reads "
                             f"text files as {TEXT_ENCODING} (a UTF-8 byte-order mark is accepted): convert it, e.g. "
                             f"`iconv -f UTF-16 -t UTF-8`")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{where}: not {TEXT_ENCODING} text: byte 0x{data[exc.start]:02x} at line {line}, column "
                         f"{column} (byte offset {exc.start}) is invalid; clipmoe reads text files as "
                         f"{TEXT_ENCODING} (a UTF-8 byte-order mark is accepted): convert it, e.g. "
                         f"`iconv -f LATIN1 -t UTF-8`") from None


def read_text(path, what: str = "file") -> str:
    """The text of a UTF-8 file (see `decode_text`); errors name `what` and the path."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return decode_text(f.read(), f"{what} {path}" if what else path)
