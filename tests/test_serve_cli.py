"""Tests for the `gptforge serve` command: one-line errors for bad options and a missing extra, and a real
server process that drains its requests in flight on SIGTERM and then exits.

    .venv/bin/python -m pytest tests/test_serve_cli.py
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import torch
from mirror_data import needs_mirror
from test_serve import LONG, tiny_hf_dir

from gptforge.cli import main


@pytest.mark.parametrize(("option", "message"), [
    ("--port=70000", "--port=70000 must be in 0..65535"),
    ("--max_batch=0", "--max_batch=0 must be at least 1"),
    ("--max_tokens_limit=0", "--max_tokens_limit=0 must be at least 1, or None"),
    ("--api_key=", "--api_key is empty"),
    ("--request_timeout=0", "--request_timeout=0.0 must be > 0"),
    ("--request_timeout=-1", "--request_timeout=-1.0 must be > 0"),
    ("--dtype=int8", "--dtype='int8' is not one of auto"),
    ("--batch_size=4", "batch_size"),
])
def test_bad_options_are_one_line_errors(option, message, capsys):
    assert main(["serve", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge serve: error: ") and message in err and err.count("\n") == 1


def test_help_lists_the_options(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--host='127.0.0.1'", "--port=8000", "--max_batch=16", "--max_tokens_limit=None",
                   "--api_key=None"):
        assert option in out
    assert "--request_timeout=30.0" in out and "request's headers and body" in out


def test_without_the_serve_extra_the_error_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "gptforge.serve.server", raising=False)
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "gptforge serve: error: serving needs fastapi, which is not installed: "
        "pip install 'gptforge[serve]'\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_fails_before_the_model_loads(tmp_path, capsys):
    # the model does not exist: an error about it would mean it was looked for first
    assert main(["serve", "--device=cuda", f"--init_from={tmp_path / 'no-such-model'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge serve: error: --device=cuda: ") and err.count("\n") == 1
    assert "no-such-model" not in err


@needs_mirror
def test_a_max_tokens_limit_over_the_context_is_a_one_line_error(tmp_path, capsys):
    model_dir = tiny_hf_dir(tmp_path / "tiny-gpt2")
    assert main(["serve", f"--init_from={model_dir}", "--max_tokens_limit=129", "--port=0"]) == 2
    assert capsys.readouterr().err.endswith("\ngptforge serve: error: --max_tokens_limit=129 is over the "
                                            "model's context of 128 tokens (its block_size)\n")


@needs_mirror
def test_a_port_in_use_is_a_one_line_error(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", f"--init_from={tiny_hf_dir(tmp_path / 'tiny-gpt2')}", f"--port={port}"]) == 2
    assert capsys.readouterr().err.endswith(f"gptforge serve: error: cannot listen on 127.0.0.1:{port}\n")


@needs_mirror
@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    model_dir = tiny_hf_dir(tmp_path / "tiny-gpt2")
    process = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", f"--init_from={model_dir}", "--port=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)
        assert banner.startswith("gptforge serve: tiny-gpt2 on cpu (torch.float32), 16 slots: ")
        # 16 samples of 127 tokens: most of a second on this tiny model, long enough to be cut off
        with httpx.Client(base_url=url, timeout=60) as client, client.stream(
            "POST", "/v1/completions", json={**LONG, "n": 16, "max_tokens": 127}
        ) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
        assert sum(c["choices"][0]["finish_reason"] == "length" for c in chunks) == 16
        assert process.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
        log = process.stderr.read()
        assert "Waiting for connections to close" in log  # the request was still in flight at the signal
    finally:
        process.kill()
        process.wait()
