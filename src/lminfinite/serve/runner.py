"""Running the server: `load(...)` (model + LM-Infinite + app), `make_server(app)` (uvicorn with the
connection guard and a graceful drain), `ServerThread` (that server in a thread).

`make_server` is what `lminfinite serve` runs; `ServerThread` is what the tests and the benchmarks use: a
real uvicorn server on 127.0.0.1 and a free port, started and stopped in-process.

Shutdown (SIGTERM, Ctrl-C, `ServerThread.stop()`): uvicorn stops accepting connections and waits up to
`shutdown_grace` seconds for the open requests; `Server.shutdown` first tells the model worker to drain,
so that every request still running shortly before that grace period ends is finished with a 503 error
(a stream gets an error event and `[DONE]`) instead of being cut off.
"""

from __future__ import annotations

import threading
import time

from .config import ServeConfig


def load(
    model: str = "stories260K",
    device: str = "cpu",
    dtype: str = "float32",
    n_global: int = 10,
    n_local: int | None = None,
    seed: int = 0,
    memory=None,
    **config,
):
    """(app, model, tokenizer): the model loaded by `lminfinite.models.load_model`, enabled with (G, L) and
    block memory `memory` (a `lminfinite.BlockMemory`, None: off)."""
    import torch

    import lminfinite
    from lminfinite.models import load_model

    from .app import create_app

    torch.manual_seed(seed)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    lminfinite.enable(lm, n_global=n_global, n_local=n_local, memory=memory)
    config.setdefault("model_name", served_name(model))
    return create_app(lm, tokenizer, ServeConfig(**config)), lm, tokenizer


def served_name(model: str) -> str:
    """The id /v1/models shows: the name as given, or a file's stem (e.g. 'stories260K' for .../stories260K.bin)."""
    from pathlib import Path

    path = Path(model).expanduser()
    return path.stem if path.suffix in (".bin", ".gguf") or path.is_dir() else model


def drain_seconds(grace: float) -> float:
    """How long open requests run on after a shutdown begins: most of the grace period, leaving the rest (at
    least 1 s when the grace allows 2) to send their final events."""
    return max(0.5 * grace, grace - 2.0)


def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **uvicorn_options):
    """A uvicorn server for an app of `create_app`: its limits (`app.state.config`: read timeout, open
    connections, shutdown grace) applied, and the model worker drained when a shutdown begins."""
    import uvicorn

    from .connections import guarded_protocol

    config, metrics = app.state.config, app.state.metrics
    protocol = guarded_protocol(
        config.read_timeout, config.max_connections, metrics.read_timeouts.inc, metrics.refused_connections.inc
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.scheduler.drain(drain_seconds(config.shutdown_grace))
            await super().shutdown(sockets)

    return Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            http=protocol,
            timeout_graceful_shutdown=config.shutdown_grace,  # seconds (uvicorn's type says int; a float works)
            **uvicorn_options,
        )
    )


class ServerThread:
    """uvicorn serving `app` on `host`:`port` (0: a free port) in a daemon thread (`make_server`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.server = make_server(app, host, port, log_level)
        self.thread = threading.Thread(target=self.server.run, name="lminfinite-uvicorn", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
