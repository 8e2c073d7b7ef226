"""The HTTP connections' guard: a deadline for each request's head and a cap on open connections.

uvicorn bounds neither (its keep-alive timeout only starts once a response is complete), so a client that
opens connections and sends its headers a byte at a time could hold them forever. `guarded_protocol()`
returns uvicorn's h11 protocol with both:

- a connection that has not delivered a complete request head `head_timeout` seconds after it opened (or
  after its previous response ended) is closed: with `408 request_timeout` when it had sent part of a head,
  silently when it had sent nothing (an idle keep-alive connection gets no unsolicited answer that a client
  could take for the answer to its next request); the body's own deadline is the app's (`app.read_body`);
- a connection beyond `max_connections` open ones gets `503 service_unavailable` and is closed at once,
  before anything is read.

Both answers are OpenAI-style JSON bodies, written directly (no request reached the app).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(
    head_timeout: float,
    max_connections: int,
    on_head_timeout: Callable[[], None] = lambda: None,
    on_refused: Callable[[], None] = lambda: None,
) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a request-head deadline and a cap on open connections (pass it as
    `uvicorn.Config(http=...)`); the callbacks count each timeout and refusal."""
    late = _raw_response(
        408, "Request Timeout", f"the request head did not arrive within {head_timeout:g} s", "request_timeout"
    )
    full = _raw_response(
        503,
        "Service Unavailable",
        f"the server has {max_connections} open connections (--max-connections); retry shortly",
        "service_unavailable",
    )

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _awaiting: object = None
        _started = False  # bytes arrived since the deadline was set

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= max_connections:
                self.transport = transport  # connection_lost() closes it; this one was never counted
                on_refused()
                transport.write(full)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._awaiting = self.cycle  # a request head creates a new cycle: the deadline is then met
            self._started = False
            self._timer = self.loop.call_later(head_timeout, self._head_late)

        def data_received(self, data: bytes) -> None:
            self._started = True
            super().data_received(data)

        def _head_late(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self.cycle is not self._awaiting:
                return
            if self._started:  # part of a head: answer why the connection closes
                on_head_timeout()
                self.transport.write(late)
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head on this connection has its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

    return GuardedH11Protocol
