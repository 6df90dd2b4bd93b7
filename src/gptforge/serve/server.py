"""The `gptforge serve` process: its options, loading the model into an engine, and uvicorn serving the app.

It owns what is the process's rather than a request's: the address and the socket, how long a connection may
take to send a request and stay idle, the API key's default ($GPTFORGE_API_KEY), torch's threads, and the
shutdown, where a signal drains the requests in flight. The routes are app.py's; `serve_in_thread` runs an
app for tests and notebooks, without signals.
"""

import contextlib
import dataclasses
import functools
import ipaddress
import os
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from gptforge.errors import GptforgeError
from gptforge.generate import decoding_model
from gptforge.options import option
from gptforge.serve.app import create_app
from gptforge.serve.engine import Engine
from gptforge.serve.guards import GuardedH11Protocol
from gptforge.source import DraftOptions
from gptforge.speculative import DRAFT_TOKENS

# a request, headers and body, must arrive within this many seconds: ample for a 1 MiB body over a slow
# link (35 kB/s), short enough that a client that stalls half-way (slowloris) does not hold its socket long
REQUEST_TIMEOUT = 30.0
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open: uvicorn's default


@dataclass
class ServeOptions(DraftOptions):
    host: str = option("127.0.0.1", "the address to listen on; 0.0.0.0: every interface")
    port: int = option(8000, "the port to listen on (0: any free one)")
    max_batch: int = option(16, "samples decoded together in one forward (KV cache slots)")
    max_queue: int = option(64, "prompts that may wait for a slot; beyond, 429")
    max_tokens_limit: int | None = option(
        None, "the largest max_tokens a request may ask (None: the model's block_size)"
    )
    max_request_bytes: int = option(1 << 20, "the largest request body; beyond, 413")
    request_timeout: float = option(
        REQUEST_TIMEOUT, "seconds a connection has to send a request's headers and body; beyond, it is closed"
    )
    api_key: str | None = option(
        None, "require Authorization: Bearer KEY on /v1 (default: $GPTFORGE_API_KEY)"
    )
    batch_invariant: bool = option(
        True, "a sample's numbers never depend on the others in its batch (False: faster with few requests)"
    )
    threads: int | None = option(None, "torch's CPU threads (None: torch's default)")
    shutdown_timeout: float = option(
        30.0, "seconds a SIGTERM waits for requests in flight before cutting them off"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise GptforgeError(f"--port={self.port} must be in 0..65535")
        for name in ("max_batch", "max_queue", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise GptforgeError(f"--{name}={getattr(self, name)} must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise GptforgeError(f"--threads={self.threads} must be at least 1, or None")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise GptforgeError(f"--max_tokens_limit={self.max_tokens_limit} must be at least 1, or None")
        if self.api_key == "":
            raise GptforgeError("--api_key is empty; give a key, or leave the option out")
        if self.shutdown_timeout < 0:
            raise GptforgeError(f"--shutdown_timeout={self.shutdown_timeout} must be >= 0")
        if not self.request_timeout > 0:
            raise GptforgeError(f"--request_timeout={self.request_timeout} must be > 0")


class Server(uvicorn.Server):
    """uvicorn's server, telling the app when a signal starts the shutdown: new requests then get 503 while
    those in flight run to their end (for up to `shutdown_timeout` seconds)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def uvicorn_config(
    app: FastAPI, host: str, port: int, request_timeout: float, **options: Any
) -> uvicorn.Config:
    """uvicorn's configuration for `app`: h11 with a deadline for each request (guards.GuardedH11Protocol),
    idle connections closed after KEEP_ALIVE seconds."""
    http = functools.partial(GuardedH11Protocol, request_timeout=request_timeout)
    return uvicorn.Config(app, host=host, port=port, http=http, timeout_keep_alive=KEEP_ALIVE, **options)


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, request_timeout: float = REQUEST_TIMEOUT
) -> Iterator[str]:
    """Serve `app` from a background thread for the duration of the block, yielding its base URL: for tests
    and notebooks (no signal handling; `serve` is the command's way)."""
    config = uvicorn_config(app, host, port, request_timeout, log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gptforge-uvicorn",
                              daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_name(init_from: str, out_dir: str) -> str:
    """The id clients see in /v1/models: the hub name, or the run's or directory's own name."""
    name = out_dir if init_from == "resume" else init_from
    return Path(name).resolve().name if Path(name).exists() else name


def serve(opts: ServeOptions) -> None:
    """Load the model, start the engine and serve until SIGINT or SIGTERM."""
    opts = dataclasses.replace(opts, api_key=opts.api_key or os.environ.get("GPTFORGE_API_KEY") or None)
    if not is_loopback(opts.host) and opts.api_key is None:
        warnings.warn(f"listening on {opts.host} without an API key: anyone who can reach it can use it",
                      stacklevel=1)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    device, dtype = opts.placement()  # first: a device this machine lacks fails before the model loads
    source = opts.load()
    model = decoding_model(source.model, device, dtype, opts.quantize)
    draft, draft_tokens = opts.load_draft(source), opts.draft_tokens or DRAFT_TOKENS
    engine = Engine(model, source.tokenizer, opts.max_batch, opts.max_queue, opts.batch_invariant,
                    None if draft is None else decoding_model(draft.model, device, dtype, opts.quantize),
                    draft_tokens)
    model_id = model_name(opts.init_from, opts.out_dir)
    app = create_app(engine, model_id, opts, source.chat_template)
    config = uvicorn_config(app, opts.host, opts.port, opts.request_timeout,
                            timeout_graceful_shutdown=opts.shutdown_timeout, log_level="info")
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged why (in use, not allowed) and exits: say it the command's way
        raise GptforgeError(f"cannot listen on {opts.host}:{opts.port}") from None
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    # the dtype as torch names it, "torch.float32", as the banner always said
    drafting = "" if draft is None else f", draft {draft.name} ({draft_tokens} tokens)"
    weights = "" if opts.quantize == "none" else f", {opts.quantize} weights"
    print(f"gptforge serve: {model_id} on {device} ({getattr(torch, dtype)}{weights}), {opts.max_batch} slots"
          f"{drafting}: http://{host}:{sock.getsockname()[1]}/", flush=True)
    Server(config, app).run(sockets=[sock])
