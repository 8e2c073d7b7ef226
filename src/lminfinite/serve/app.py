"""The FastAPI application: OpenAI-compatible routes over one model worker.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or server-sent events),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text). Every
error, unknown routes included, is an OpenAI-style `{"error": {...}}` body with its status.

Request path: API key (constant-time compare; one Authorization header; 401) -> body read with a size
cap (413) and a deadline (408) -> JSON and field validation (400: only the documented shapes, valid
Unicode, bounded nesting) -> admission (429 beyond `max_concurrency`, 503 while shutting down) ->
prompt rendering and tokenization in a thread, bounded by the prompt limit (400 when too long, found
after tokenizing about that many tokens at most) -> a `Job` for the model worker -> its events become
the JSON answer or the SSE stream.

A client that goes away cancels its job at the worker's next step: a stream's generator is cancelled
by Starlette; a non-streaming request has a task that waits for the disconnect message. A client that
goes away while sending its body is one info line in the log (answered 499 in the metrics), not an
error. Any other exception is logged once and answered as a 500 (`MetricsMiddleware`).

`/health` and `/metrics` need no key (they show no text); bind to 127.0.0.1 (the default) or put
the server behind a proxy to keep them private. There is no `/openapi.json` and no `/docs`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__, config_of
from . import errors
from .config import ServeConfig
from .errors import APIError
from .metrics import Metrics
from .protocol import (
    Limits,
    chat_chunk,
    chat_completion,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    text_completion,
    usage_chunk,
)
from .scheduler import Engine, Event, Job, Scheduler
from .sessions import SessionStore
from .templates import (
    chat_prompt,
    check_prompt_chars,
    check_prompt_size,
    check_token_budget,
    completion_prompt,
    longest_token_chars,
)

log = logging.getLogger("lminfinite.serve")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # the status recorded for a request whose client went away (nginx's convention)
LONG_BODY_MIN = 64 * 1024  # a body larger than this and than --max-prompt-tokens / 4 bytes is a long prompt's
LONG_PROMPT_NICE = 10  # how much lower the CPU priority of the threads preparing long prompts is (Linux)


def _parse(parse, body: bytes):
    return parse(parse_json(body))


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: a thread is a schedulable task of its own); elsewhere nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LONG_PROMPT_NICE)
    except (AttributeError, OSError):
        pass


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class ClientGone(Exception):
    """The client closed its connection before its request was answered."""


class MetricsMiddleware:
    """Counts every answered request by route and status, and times it to its last byte (pure ASGI).

    Also the last resort for errors: an exception no handler took is logged once (with its traceback) and
    answered as a 500, and not raised further (Starlette's outer middleware would log it a second time)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    @staticmethod
    def route(path: str) -> str:
        if path in ROUTES:
            return path
        return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope["path"][:200])
            if status[0] == 500:  # nothing sent yet
                await error_response(errors.server_error())(scope, receive, send_status)
        finally:
            route = self.route(scope["path"])
            self.metrics.requests.inc(route=route, status=str(status[0]))
            self.metrics.latency.observe(time.perf_counter() - start, route=route)


def create_app(model, tokenizer, config: ServeConfig) -> FastAPI:
    """The server for an lminfinite-enabled `model`; the model worker starts with the app (lifespan)."""
    engine = Engine(model, tokenizer)
    store = SessionStore(
        config.max_sessions,
        config.max_cache_bytes,
        lambda reason: metrics.evictions.inc(reason=reason),
        key_sessions=config.key_sessions,
        key_cache_bytes=config.key_cache_bytes,
    )
    metrics = Metrics(
        sessions=lambda: len(store),
        cache_bytes=store.cache_bytes,
        active=lambda: scheduler.in_flight,
        store_bytes=store.store_bytes,
    )
    scheduler = Scheduler(engine, store, metrics, config.max_concurrency, config.step_tokens, config.session_reuse)
    limits = Limits(max_tokens_cap=config.max_tokens_cap, vocab_size=int(model.config.vocab_size))
    keys = tuple(k.encode() for k in config.api_keys)
    lam = config_of(model)  # enabled: Engine refused the model otherwise
    assert lam is not None
    fingerprint = f"lminfinite-{__version__}-G{lam.n_global}-L{lam.n_local}"
    created = int(time.time())
    longest = longest_token_chars(tokenizer)

    def prompt_check(param: str):
        """The checks a prompt's text passes before it is tokenized whole: characters, then a bounded count."""

        def check(text: str) -> None:
            check_prompt_chars(text, config.max_prompt_tokens, longest, param)
            check_token_budget(tokenizer, text, config.max_prompt_tokens, param)

        return check

    # Large bodies (long prompts) are parsed and tokenized here, at a lower CPU priority than the model worker.
    long_body = max(LONG_BODY_MIN, config.max_prompt_tokens // 4)
    long_prompts = [0]  # requests with a large body being parsed and tokenized now (event loop only: no lock)
    long_pool = ThreadPoolExecutor(
        config.max_long_prompts, thread_name_prefix="lminfinite-long-prompt", initializer=_lower_priority
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("serving %s (%s) with G=%s L=%s", config.model_name, type(model).__name__, lam.n_global, lam.n_local)
        try:
            yield
        finally:
            scheduler.stop()
            long_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="lminfinite",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # no schema without a key (and nothing a client of this API needs)
        redirect_slashes=False,  # /v1/chat/completions/ is an unknown URL (404), not an empty 307
    )
    app.state.scheduler, app.state.store, app.state.metrics, app.state.config = scheduler, store, metrics, config
    app.state.engine = engine
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        log.info("client went away before its %s %s was answered", request.method, request.url.path[:200])
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics record it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path[: errors.ECHO_CHARS]
        if exc.status_code == 404:
            error = APIError(404, f"Unknown request URL: {request.method} {path}", code="unknown_url")
        elif exc.status_code == 405:
            error = APIError(405, f"Method {request.method} is not allowed on {path}", code="method_not_allowed")
        else:
            error = APIError(exc.status_code, str(exc.detail), code=None)
        return error_response(error)

    # -------------------------------------------------------------------------------------------- helpers

    def authenticate(request: Request) -> str:
        """The caller's session namespace: a hash of its API key ("" without authentication)."""
        if not keys:
            return ""
        headers = request.headers.getlist("authorization")
        if not headers:
            raise errors.unauthorized(provided=False)
        if len(headers) > 1:
            raise errors.unauthorized(True, "Send one Authorization header, not several.")
        scheme, _, token = headers[0].partition(" ")
        given = token.strip().encode()
        ok = False
        for key in keys:  # compare with every key, in constant time for each
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise errors.unauthorized(provided=True)
        return hashlib.sha256(given).hexdigest()[:32]

    async def read_body(request: Request) -> bytes:
        """The body, at most `max_body_bytes` (413), within `read_timeout` seconds (408)."""
        cap = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise errors.too_large(cap)
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                if len(body) + len(chunk) > cap:
                    raise errors.too_large(cap)
                body.extend(chunk)

        try:
            await asyncio.wait_for(read(), config.read_timeout)
        except asyncio.TimeoutError:
            metrics.read_timeouts.inc()
            raise errors.read_timeout(config.read_timeout) from None
        except ClientDisconnect:
            raise ClientGone from None
        return bytes(body)

    async def admitted(namespace: str, rid: str, arrival: float, make_prompt, params, work) -> Job:
        """Admission (429, or 503 while shutting down), then the prompt (`work(make_prompt)`: tokenized in a
        thread), then the job for the worker; the slot goes back if anything fails before the job is queued."""
        if not scheduler.alive or scheduler.draining:
            raise (
                errors.shutting_down() if scheduler.draining else errors.unavailable("the model worker is not running")
            )
        if not scheduler.try_admit():
            metrics.rejected.inc()
            raise errors.overloaded(config.max_concurrency)
        queued = False
        try:
            prompt = await work(make_prompt)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            job = Job(
                rid=rid,
                namespace=namespace,
                prompt=prompt,
                params=params,
                send=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                timeout_s=config.request_timeout,
                arrival=arrival,
            )
            job.events = events
            scheduler.submit(job)
            queued = True
            return job
        finally:
            if not queued:
                scheduler.release_slot()

    async def wait_for_disconnect(request: Request, job: Job) -> None:
        """Cancel `job` as soon as its client goes away (the body is read, so the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()
        job.events.put_nowait(Event("gone"))

    async def collect(request: Request, job: Job) -> tuple[str, Event]:
        """Wait for the whole answer; a client that disconnects meanwhile cancels the job (ClientGone)."""
        parts = []
        watcher = asyncio.create_task(wait_for_disconnect(request, job))
        try:
            while True:
                event = await job.events.get()
                if event.kind == "delta":
                    parts.append(event.text)
                elif event.kind == "done":
                    return "".join(parts), event
                elif event.kind == "gone":
                    raise ClientGone
                else:
                    raise event.error
        finally:
            watcher.cancel()
            job.cancel.set()  # no effect on a finished job; stops one whose request was cancelled

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(job: Job, chat: bool, model_name: str, include_usage: bool):
        created_at = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        events = job.events

        def piece(text: str, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = (
                    ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None else {}
                )
                return chat_chunk(job.rid, model_name, created_at, delta, finish, fingerprint)
            body = text_completion(job.rid, model_name, text, finish, None, fingerprint)
            body["created"] = created_at
            return body

        try:
            if chat:
                yield sse(piece("", None, first=True))
            pending = None
            while True:
                event, pending = pending or await events.get(), None
                if event.kind == "delta":
                    # pieces that queued up while this stream waited for the event loop go out as one chunk
                    text = event.text
                    while not events.empty():
                        pending = events.get_nowait()
                        if pending.kind != "delta":
                            break
                        text, pending = text + pending.text, None
                    if text:
                        yield sse(piece(text, None))
                elif event.kind == "done":
                    yield sse(piece("", event.finish_reason))
                    if include_usage:
                        yield sse(usage_chunk(job.rid, model_name, created_at, obj, event.usage, fingerprint))
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error (timeout, shutdown, failure): an error object, then the end of the stream
                    yield sse(event.error.body())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel.set()

    def log_prompt(rid: str, what) -> None:
        if config.log_prompts:
            log.info("request %s prompt: %r", rid, what)

    def long_place_free() -> bool:
        if long_prompts[0] < config.max_long_prompts:
            return True
        metrics.rejected.inc()
        return False

    def no_long_place() -> APIError:
        return errors.overloaded(config.max_long_prompts, "long prompts being prepared (--max-long-prompts)")

    async def discard_body(request: Request) -> None:
        """Read a body to its end without keeping it (so that a refusal reaches the client and its connection
        stays usable), within the body's size cap and read deadline."""
        cap, total = config.max_body_bytes, 0
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise errors.too_large(cap)

        async def read() -> None:
            nonlocal total
            async for chunk in request.stream():
                total += len(chunk)
                if total > cap:
                    raise errors.too_large(cap)

        try:
            await asyncio.wait_for(read(), config.read_timeout)
        except asyncio.TimeoutError:
            metrics.read_timeouts.inc()
            raise errors.read_timeout(config.read_timeout) from None
        except ClientDisconnect:
            raise ClientGone from None

    async def run(request: Request, chat: bool, parse, make_prompt):
        """One completion request: key, body, parsing, admission and prompt, then the answer. A large body (more
        than `long_body` bytes: a prompt that may need the bounded count, up to about --max-prompt-tokens
        tokens' worth of tokenizing even to be refused) takes one of --max-long-prompts places (429 beyond), and
        is parsed and tokenized in `long_pool`, whose threads run at a lower CPU priority than the model
        worker: long prompts cost only what the worker leaves, beside any number of short ones."""
        arrival = time.perf_counter()
        namespace = authenticate(request)
        rid = new_id("chatcmpl" if chat else "cmpl")
        length = request.headers.get("content-length", "")
        long = length.isdigit() and int(length) > long_body
        if long and not long_place_free():  # refused before its body is parsed: only read, not kept
            await discard_body(request)
            raise no_long_place()
        long_prompts[0] += long
        try:
            body = await read_body(request)
            if not long and len(body) > long_body:  # a large body sent without a length
                if not long_place_free():
                    raise no_long_place()
                long_prompts[0] += 1
                long = True
            if long:
                loop = asyncio.get_running_loop()

                def work(fn):
                    return loop.run_in_executor(long_pool, fn)

                req = await work(partial(_parse, parse, body))
            else:
                work = run_in_threadpool
                req = _parse(parse, body)
            del body  # not kept while the answer is generated
            log_prompt(rid, req.messages if chat else req.prompt)
            job = await admitted(namespace, rid, arrival, lambda: make_prompt(req), req.params, work)
        finally:
            long_prompts[0] -= long
        if req.stream:
            return StreamingResponse(
                stream(job, chat, req.model, req.include_usage), media_type="text/event-stream", headers=SSE_HEADERS
            )
        text, done = await collect(request, job)
        if chat:
            return JSONResponse(chat_completion(rid, req.model, text, done.finish_reason, done.usage, fingerprint))
        return JSONResponse(text_completion(rid, req.model, text, done.finish_reason, done.usage, fingerprint))

    # --------------------------------------------------------------------------------------------- routes

    def chat_request(body: dict):
        return parse_chat(body, config.served_names, limits)

    def chat_request_prompt(req):
        prompt = chat_prompt(tokenizer, req.messages, prompt_check("messages"))
        check_prompt_size(len(prompt.ids), config.max_prompt_tokens, "messages")
        return prompt

    def completion_request(body: dict):
        return parse_completion(body, config.served_names, limits)

    def completion_request_prompt(req):
        prompt = completion_prompt(tokenizer, req.prompt, prompt_check("prompt"))
        check_prompt_size(len(prompt.ids), config.max_prompt_tokens, "prompt")
        return prompt

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, True, chat_request, chat_request_prompt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, False, completion_request, completion_request_prompt)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "lminfinite"}

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(request)
        return {"object": "list", "data": [model_card(name) for name in config.served_names]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        authenticate(request)
        if name not in config.served_names:
            raise errors.model_not_found(name)
        return model_card(name)

    @app.get("/health")
    async def health():
        ok = scheduler.alive and not scheduler.draining
        body = {
            "status": "ok" if ok else "unavailable",
            "model": config.model_name,
            "n_global": lam.n_global,
            "n_local": lam.n_local,
            "in_flight": scheduler.in_flight,
            "sessions": len(store),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
