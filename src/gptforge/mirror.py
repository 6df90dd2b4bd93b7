"""Public files the data pipeline needs (corpora, tokenizer files): a local mirror first,
then the canonical URL.

A mirror is a directory laid out like `../shared/data` (`tinyshakespeare/input.txt`, `gpt2/encoder.json`,
...), named by `--mirror=DIR` or the `GPTFORGE_DATA_MIRROR` environment variable. Every file is checked
against its pinned sha256, and downloads are written atomically. This module knows nothing about tokens or
datasets.
"""

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gptforge.atomic import atomic_path
from gptforge.errors import GptforgeError

MIRROR_ENV = "GPTFORGE_DATA_MIRROR"
HOW_TO_MIRROR = f"pass --mirror=DIR or set {MIRROR_ENV}=DIR"


@dataclass(frozen=True)
class Remote:
    """A public file: where it lives online, where it sits inside a mirror, and its sha256."""

    url: str
    mirror_path: str
    sha256: str


def mirror_dir(option: str | os.PathLike | None = None) -> Path | None:
    """The mirror named by `option`, else by $GPTFORGE_DATA_MIRROR, else None (an empty value means none)."""
    value = os.fspath(option) if option is not None else os.environ.get(MIRROR_ENV, "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--mirror" if option is not None else MIRROR_ENV
        raise GptforgeError(f"{source}={value} is not a directory; point it at a mirror like ../shared/data")
    return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in blocks (constant memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def in_mirror(remote: Remote, mirror: Path | None) -> Path | None:
    """The mirror's copy of `remote` if the mirror has one; a copy with the wrong sha256 is an error."""
    if mirror is None or not (mirror / remote.mirror_path).is_file():
        return None
    path = mirror / remote.mirror_path
    actual = file_sha256(path)
    if actual != remote.sha256:
        raise GptforgeError(
            f"{path} has sha256 {actual[:12]}…, not {remote.sha256[:12]}… ({remote.url}); "
            f"replace it with the original file or use another mirror"
        )
    return path


def fetch(remote: Remote, mirror: Path | None, dest: Path) -> Path:
    """The mirror's copy of `remote`, else `dest` (downloaded there once, atomically, sha256-checked)."""
    local = in_mirror(remote, mirror)
    if local is not None:
        return local
    if dest.is_file() and file_sha256(dest) == remote.sha256:
        return dest
    try:
        with atomic_path(dest) as tmp:
            _download(remote, tmp)
    except (urllib.error.URLError, OSError) as e:
        raise GptforgeError(
            f"cannot download {remote.url} ({getattr(e, 'reason', e)}); offline? "
            f"{HOW_TO_MIRROR} with {remote.mirror_path} inside it"
        ) from e
    return dest


def _download(remote: Remote, tmp: Path) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(remote.url, timeout=60) as response, open(tmp, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"download {Path(remote.mirror_path).name}"
        ) as bar:
            while block := response.read(1 << 20):
                f.write(block)
                digest.update(block)
                bar.update(len(block))
    if digest.hexdigest() != remote.sha256:
        raise GptforgeError(
            f"{remote.url} downloaded with sha256 {digest.hexdigest()[:12]}…, not {remote.sha256[:12]}…"
        )
