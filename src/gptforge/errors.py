"""Errors a user can fix: `GptforgeError`, the one exception type for them, and `explain`, which turns the
failures of the machine itself (a path that cannot be written, memory that runs out) into the same one-line
kind.

The CLI prints either on one line, no traceback. This module knows exceptions, nothing of what raised them.
"""

import errno
import re

# What to do about an OS error, by its errno: only these are the user's to fix; any other is a bug to report.
OS_FIXES = {
    errno.EACCES: "choose a path you may write, or change its permissions",
    errno.EPERM: "choose a path you may write, or change its permissions",
    errno.EROFS: "it is on a read-only file system; choose a path elsewhere",
    errno.ENOTDIR: "a file stands where a directory is needed; choose another path",
    errno.EEXIST: "a file stands where a directory is needed; choose another path",
    errno.EISDIR: "a directory stands where a file is needed; choose another path",
    errno.ENOSPC: "the disk is full; free some space or choose a path on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose a path on another disk",
    errno.ENAMETOOLONG: "choose a shorter path",
}
_ASKED = (r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", r"you tried to allocate (\d+) bytes")


class GptforgeError(Exception):
    """A problem with the user's input, files or environment; the message names the problem and the fix."""


def explain(e: BaseException, memory_knobs: str) -> str | None:
    """A one-line message for an OS error a user can fix or for running out of memory (`memory_knobs` names
    the options that shrink what the command holds); None for anything else."""
    if isinstance(e, OSError) and e.errno in OS_FIXES:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{(e.strerror or type(e).__name__).lower()}; {OS_FIXES[e.errno]}"
    text = str(e)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and ("out of memory" in text.lower()
                                                                      or "can't allocate memory" in text)):
        asked = asked_memory(e)
        where = "GPU" if "CUDA" in text or "MPS" in text else "main"
        size = f" (it asked for {asked} more)" if asked else ""
        return f"out of {where} memory{size}; make it smaller: {memory_knobs}"
    return None


def asked_memory(e: BaseException) -> str | None:
    """How much more an out-of-memory error says was asked for ("2.00 GiB"), if it says."""
    text = str(e)
    asked = next((m.group(1) for m in map(lambda p: re.search(p, text), _ASKED) if m), None)
    return f"{int(asked) / 2**30:.2f} GiB" if asked and asked.isdigit() else asked
