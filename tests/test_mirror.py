"""Tests for gptforge.mirror: the mirror first,
then a sha256-checked atomic download (from a local HTTP server).

.venv/bin/python -m pytest tests/test_mirror.py
"""

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptforge.errors import GptforgeError
from gptforge.mirror import Remote, fetch, mirror_dir

BODY = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
SHA = hashlib.sha256(BODY).hexdigest()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    """An HTTP server on localhost serving tmp_path/www; yields its base URL."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "input.txt").write_bytes(BODY)
    handler = functools.partial(_Quiet, directory=str(tmp_path / "www"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.shutdown()


def test_mirror_dir_from_option_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(tmp_path))
    assert mirror_dir() == tmp_path
    assert mirror_dir(tmp_path / ".") == tmp_path
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", "")
    assert mirror_dir() is None
    with pytest.raises(GptforgeError, match=r"--mirror=.*nope is not a directory"):
        mirror_dir(tmp_path / "nope")
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(tmp_path / "nope"))
    with pytest.raises(GptforgeError, match=r"GPTFORGE_DATA_MIRROR=.*nope is not a directory"):
        mirror_dir()


def test_the_mirror_copy_is_used_first(tmp_path):
    (tmp_path / "m" / "corpus").mkdir(parents=True)
    (tmp_path / "m" / "corpus" / "input.txt").write_bytes(BODY)
    remote = Remote("http://127.0.0.1:9/unreachable", "corpus/input.txt", SHA)
    assert (
        fetch(remote, tmp_path / "m", tmp_path / "out" / "input.txt")
        == tmp_path / "m" / "corpus" / "input.txt"
    )
    assert not (tmp_path / "out").exists()  # nothing copied out of the mirror
    (tmp_path / "m" / "corpus" / "input.txt").write_bytes(BODY + b"!")
    with pytest.raises(GptforgeError, match=r"input.txt has sha256 .* replace it with the original file"):
        fetch(remote, tmp_path / "m", tmp_path / "out" / "input.txt")


def test_download_once_then_reuse(server, tmp_path):
    dest = tmp_path / "data" / "input.txt"
    remote = Remote(f"{server}/input.txt", "corpus/input.txt", SHA)
    assert fetch(remote, None, dest) == dest and dest.read_bytes() == BODY
    (tmp_path / "www" / "input.txt").unlink()  # a second fetch must not need the server
    assert fetch(remote, None, dest).read_bytes() == BODY


def test_a_download_with_the_wrong_sha256_leaves_nothing(server, tmp_path):
    dest = tmp_path / "data" / "input.txt"
    with pytest.raises(GptforgeError, match=r"input.txt downloaded with sha256 .*, not 000000000000"):
        fetch(Remote(f"{server}/input.txt", "corpus/input.txt", "0" * 64), None, dest)
    assert list(Path(dest.parent).iterdir()) == []


def test_offline_names_the_url_and_the_mirror_option(server, tmp_path):
    remote = Remote(f"{server}/missing.txt", "corpus/missing.txt", SHA)
    with pytest.raises(GptforgeError) as error:
        fetch(remote, None, tmp_path / "missing.txt")
    message = str(error.value)
    assert f"cannot download {server}/missing.txt" in message
    assert "pass --mirror=DIR or set GPTFORGE_DATA_MIRROR=DIR with corpus/missing.txt inside it" in message
