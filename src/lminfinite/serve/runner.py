"""Running the server: `load(...)` (model + LM-Infinite + app), `ServerThread` (uvicorn in a thread).

`ServerThread` is what the tests and `benchmarks/serve_load.py` use: a real uvicorn server on
127.0.0.1 and a free port, started and stopped in-process.
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
    **config,
):
    """(app, model, tokenizer): the model loaded by `lminfinite.models.load_model`, enabled with (G, L)."""
    import torch

    import lminfinite
    from lminfinite.models import load_model

    from .app import create_app

    torch.manual_seed(seed)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    lminfinite.enable(lm, n_global=n_global, n_local=n_local)
    config.setdefault("model_name", served_name(model))
    return create_app(lm, tokenizer, ServeConfig(**config)), lm, tokenizer


def served_name(model: str) -> str:
    """The id /v1/models shows: the name as given, or a file's stem (e.g. 'stories260K' for .../stories260K.bin)."""
    from pathlib import Path

    path = Path(model).expanduser()
    return path.stem if path.suffix in (".bin", ".gguf") or path.is_dir() else model


class ServerThread:
    """uvicorn serving `app` on `host`:`port` (0: a free port) in a daemon thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
        )
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
