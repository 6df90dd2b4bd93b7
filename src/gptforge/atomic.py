"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one; and the
check, before any work, that a command's output can be written at all.

Files are written with the permissions the umask gives (0644 under the usual umask), as `open` would make
them. This module knows paths and bytes, nothing of what is in them.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from gptforge.errors import GptforgeError


def check_writable(path: str | os.PathLike, option: str, directory: bool = True) -> None:
    """Fail now, naming `option`, if `path` (a directory, or a file when `directory` is False) cannot be
    written: it or an ancestor is a file where a directory is needed, or the first ancestor that exists is not
    writable. Nothing is created."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != directory:
            raise GptforgeError(f"{option}={path} is a {'file' if directory else 'directory'}; name a "
                                f"{'directory' if directory else 'file'}")
        target = path if directory else path.parent  # a file is replaced by a rename in its directory
    else:
        target = path.parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise GptforgeError(f"{option}={path} cannot be created: {target} is a file")
    if not os.access(target, os.W_OK | os.X_OK):
        raise GptforgeError(f"{option}={path} cannot be written: {target} is not writable (permissions or a "
                            "read-only file system); choose another path")


def _file_mode() -> int:
    """0666 less the process's umask: the mode `open` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # read once: setting the umask to read it is not thread-safe


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), FILE_MODE)  # some writers (safetensors) create their files 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
