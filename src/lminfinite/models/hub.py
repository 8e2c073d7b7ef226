"""Is the HuggingFace hub reachable? Asked once per process, answered in at most ~3 s.

Without this, an unknown hub name on a machine without network spends 20-40 s in
huggingface_hub's retries before failing. `offline_reason()` returns None when the hub can be
reached, else one phrase saying why not (HF_HUB_OFFLINE is set, or no TCP connection to the hub's
host -- or to the HTTPS proxy -- within the timeout). Loaders then use only locally cached files;
`offline_unless_reachable()` switches `huggingface_hub` and `datasets` to offline mode for a block.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

CONNECT_TIMEOUT = 2.0  # seconds for one TCP connection (DNS lookup included, bounded by a thread)
_TRUTHY = {"1", "true", "yes", "on"}
_answer: dict[str, str | None] = {}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_reason(timeout: float = CONNECT_TIMEOUT) -> str | None:
    """None when the hub looks reachable; else why not, e.g. 'offline: cannot connect to huggingface.co:443'."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY:
        return "offline: HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    if endpoint not in _answer:
        _answer[endpoint] = _probe(endpoint, timeout)
    return _answer[endpoint]


def _probe(endpoint: str, timeout: float) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if url.scheme == "https" and proxy:
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        target, via = (p.hostname or "", p.port or 80), f" (through the proxy {p.hostname}:{p.port or 80})"
    else:
        target, via = (host, port), ""
    result: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection(target, timeout=timeout).close()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - any failure means "not reachable"
            result.append(e)

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout + 1.0)
    if result and result[0] is None:
        return None
    why = f"{type(result[0]).__name__}: {result[0]}" if result else f"no answer within {timeout + 1.0:.0f} s"
    return f"offline: cannot connect to {host}:{port}{via} ({why})"


def reset() -> None:
    """Forget the cached answer (tests; a network that came back)."""
    _answer.clear()


@contextmanager
def offline_unless_reachable(name: str | None = None) -> Iterator[str | None]:
    """For the block: when the hub cannot be reached, `huggingface_hub` and `datasets` run in offline
    mode (locally cached files only, no retries); yields the reason (None when online, or when `name`
    is an existing local path, which needs no hub)."""
    if name is not None and os.path.exists(os.path.expanduser(name)):
        yield None
        return
    reason = offline_reason()
    if reason is None:
        yield None
        return
    patched = []
    for module_name in ("huggingface_hub.constants", "datasets.config"):
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        if hasattr(module, "HF_HUB_OFFLINE"):
            patched.append((module, module.HF_HUB_OFFLINE))
            module.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        for module, value in patched:
            module.HF_HUB_OFFLINE = value
