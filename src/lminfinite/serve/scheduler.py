"""The model worker: one thread owns the model and interleaves the admitted requests round-robin.

Each pass over the active requests gives every one of them one step: one forward of at most
`step_tokens` new prompt tokens (prefill) or of one generated token (decode). So a long prompt never
stalls the others' decoding for more than one chunk, and N concurrent requests each get about 1/N of
the model.

Requests are NOT batched together: every conversation has its own LambdaCache (starting tokens +
window at its own positions), and the library has no operation that stacks separate caches into one
left-padded batch and splits them again, so one forward serves one request. (Batching them would be the
next speed-up, above all on a GPU.)

Admission (`try_admit`) bounds the requests in flight (admitted: being tokenized, queued or running) by
`max_concurrency`; the HTTP layer asks for a slot before it tokenizes a prompt and answers 429 beyond it.
A request stops `--request-timeout` seconds after it arrived or when its `cancel` event is set (the client
went away), at its next step; its slot is freed as soon as the worker retires it. `drain(seconds)` (a
shutdown) refuses new requests and ends those still running after `seconds` with a 503 error event.
Events go back to the request's asyncio queue through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding import IncrementalDecoder, Sampler, Sampling, stop_token_ids
from . import errors
from .metrics import Metrics
from .protocol import GenParams
from .sessions import Session, SessionStore
from .templates import Prompt, StopMatcher

log = logging.getLogger("lminfinite.serve")


@dataclass
class Event:
    """What the worker sends to a request: a text `delta`, then `done` (or `error`)."""

    kind: str  # "delta", "done", "error" (and "gone": the client went away, sent by the HTTP layer itself)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: errors.APIError | None = None


@dataclass
class Job:
    rid: str
    namespace: str
    prompt: Prompt
    params: GenParams
    send: Callable[[Event], None]
    timeout_s: float  # from arrival to the end
    arrival: float = field(default_factory=time.perf_counter)  # when the request came in (perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    events: Any = None  # the request's asyncio.Queue of Events (the HTTP layer's)
    # worker state
    phase: str = "new"  # new, prefill, decode, done
    session: Session | None = None
    to_feed: list[int] = field(default_factory=list)  # prompt tokens to feed; to_feed[fed:] are still due
    fed: int = 0
    prompt_tokens: int = 0
    reused: int = 0
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    last_token: int | None = None
    decoder: IncrementalDecoder | None = None
    stopper: StopMatcher | None = None
    content: str = ""
    sampler: Sampler | None = None
    t_prefill: float = 0.0
    t_first: float | None = None
    t_last: float | None = None
    outcome: str = ""  # stop, length, cancelled, timeout, error


class Engine:
    """The model and tokenizer of the server: fresh caches, one forward, sampling. Worker thread only."""

    def __init__(self, model, tokenizer):
        import lminfinite

        if not lminfinite.is_enabled(model):
            raise ValueError("serve needs an lminfinite-enabled model: call lminfinite.enable(model, ...) first")
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self._cache_type = lminfinite.LambdaCache
        self.stop_ids = frozenset(stop_token_ids(model, tokenizer))

    @staticmethod
    def sampler(params: GenParams, generator: torch.Generator) -> Sampler:
        """The library's sampler for a request's settings (temperature 0: greedy)."""
        return Sampler(Sampling.from_temperature(params.temperature, params.top_p), generator)

    def new_cache(self):
        return self._cache_type.for_model(self.model)

    def forward(self, ids: list[int], cache) -> torch.Tensor:
        """Feed `ids` after what `cache` holds; the (vocab,) float32 logits of the last position."""
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            out = self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            return out.logits[0, -1].float()


class Scheduler:
    """Admission, the worker thread, and the per-request state machine."""

    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        metrics: Metrics,
        max_concurrency: int,
        step_tokens: int,
        session_reuse: bool = True,
    ):
        self.engine, self.store, self.metrics = engine, store, metrics
        self.max_concurrency, self.step_tokens = max_concurrency, step_tokens
        self.session_reuse = session_reuse
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._active: list[Job] = []
        self._slots = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drain_at: float | None = None  # perf_counter time after which running requests end (shutdown)
        self._thread = threading.Thread(target=self._run, name="lminfinite-model-worker", daemon=True)

    # ---------------------------------------------------------------------------------- other threads

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def in_flight(self) -> int:
        return self._slots

    @property
    def draining(self) -> bool:
        return self._drain_at is not None

    def drain(self, seconds: float) -> None:
        """A shutdown begins: admit nothing more; requests still running `seconds` from now end with a 503."""
        with self._lock:
            self._drain_at = time.perf_counter() + seconds

    def try_admit(self) -> bool:
        with self._lock:
            if self._slots >= self.max_concurrency or self._drain_at is not None:
                return False
            self._slots += 1
            return True

    def release_slot(self) -> None:
        with self._lock:
            self._slots -= 1

    def submit(self, job: Job) -> None:
        """Queue an admitted job (its slot is released when the worker retires it)."""
        self._inbox.put(job)

    # ---------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._take_new(block=not self._active)
                for job in list(self._active):
                    self._step(job)
                self._active = [j for j in self._active if j.phase != "done"]
            except Exception:  # never let the worker die: fail the active jobs, keep serving
                log.exception("model worker error")
                for job in self._active:
                    self._fail(job, errors.server_error())
                self._active = []
        for job in self._active + self._drain():
            self._fail(job, errors.shutting_down())

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _take_new(self, block: bool) -> None:
        if block:
            try:
                self._active.append(self._inbox.get(timeout=0.2))
            except queue.Empty:
                return
        self._active.extend(self._drain())

    def _step(self, job: Job) -> None:
        if job.cancel.is_set():
            self.metrics.disconnects.inc()
            return self._retire(job, "cancelled")
        now = time.perf_counter()
        if now - job.arrival > job.timeout_s:
            self.metrics.timeouts.inc()
            self._retire(job, "timeout")
            return self._send(job, Event("error", error=errors.timeout(job.timeout_s)))
        if self._drain_at is not None and now > self._drain_at:
            return self._fail(job, errors.shutting_down())
        try:
            if job.phase == "new":
                self._begin(job)
            if job.phase == "prefill":
                self._prefill_step(job)
            elif job.phase == "decode":
                logits = self.engine.forward([job.last_token], job.session.cache)
                job.session.consume([job.last_token])
                self._emit_token(job, logits)
        except Exception as e:
            log.exception("request %s failed", job.rid)
            self._fail(job, errors.server_error(f"generation failed: {type(e).__name__}"))
        if job.session is not None and job.phase != "done":
            self.store.update_bytes(job.session)

    def _begin(self, job: Job) -> None:
        match = None
        if not self.session_reuse:
            kind = "disabled"
        else:
            match = self.store.find(job.namespace, job.prompt)
            kind = match.kind if match else ("miss" if self.store.has_idle(job.namespace) else "new")
        self.metrics.lookups.inc(result=kind)
        if match is not None:
            job.session, job.to_feed = match.session, match.new_ids
            job.reused = match.session.n_consumed
        else:
            job.session = self.store.create(job.namespace, self.engine.new_cache())
            job.to_feed = list(job.prompt.ids)
        job.prompt_tokens = job.reused + len(job.to_feed)
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        self.metrics.reused_tokens.inc(job.reused)
        seed = job.params.seed if job.params.seed is not None else secrets.randbits(63)
        job.sampler = self.engine.sampler(job.params, torch.Generator().manual_seed(seed % 2**63))
        job.decoder = IncrementalDecoder(self.engine.tokenizer, job.prompt.ids[-6:])
        job.stopper = StopMatcher(job.params.stop)
        job.phase = "prefill"
        job.t_prefill = time.perf_counter()

    def _prefill_step(self, job: Job) -> None:
        chunk = job.to_feed[job.fed : job.fed + self.step_tokens]
        logits = self.engine.forward(chunk, job.session.cache)
        job.session.consume(chunk)
        job.fed += len(chunk)
        job.prefilled += len(chunk)
        self.metrics.prefilled_tokens.inc(len(chunk))
        if job.fed < len(job.to_feed):
            return
        self.metrics.prefill_time.observe(time.perf_counter() - job.t_prefill)
        job.phase = "decode"
        self._emit_token(job, logits)

    def _emit_token(self, job: Job, logits: torch.Tensor) -> None:
        token = int(job.sampler(logits))
        now = time.perf_counter()
        if job.t_first is None:
            job.t_first = now
            self.metrics.ttft.observe(now - job.arrival)
        else:
            self.metrics.tpot.observe(now - job.t_last)
        job.t_last = now
        job.generated.append(token)
        job.last_token = token
        self.metrics.completion_tokens.inc()
        end_of_turn = token in self.engine.stop_ids and not job.params.ignore_eos
        last = end_of_turn or len(job.generated) >= job.params.max_tokens
        piece = "" if end_of_turn else job.decoder.add(token)
        if last:
            piece += job.decoder.flush()  # a character still incomplete goes out as U+FFFD
        text, stopped = job.stopper.feed(piece)
        if last and not stopped:
            text += job.stopper.flush()  # text held back for a stop string that never came
        if text:
            job.content += text
            self._send(job, Event("delta", text))
        if stopped:  # a stop string: the answer ends before it
            self._finish(job, "stop", pending=(token,))
        elif end_of_turn:  # the end-of-turn token is not fed: the next prompt's rendering supplies it
            self._finish(job, "stop", pending=())
        elif last:
            self._finish(job, "length", pending=(token,))

    def _usage(self, job: Job) -> dict:
        from .protocol import usage

        return usage(job.prompt_tokens, len(job.generated), job.reused)

    def _finish(self, job: Job, reason: str, pending: tuple[int, ...]) -> None:
        """A normal end: the session keeps the consumed ids; its text is the prompt text + the whole answer.
        The slot is freed before the client hears of the end, so its next request is admitted."""
        self._retire(job, reason, pending)
        self._send(job, Event("done", finish_reason=reason, usage=self._usage(job)))

    def _fail(self, job: Job, error: errors.APIError) -> None:
        if job.session is not None:
            self.store.drop(job.session)
            job.session = None
        self._retire(job, "error")
        self._send(job, Event("error", error=error))

    def _retire(self, job: Job, outcome: str, pending: tuple[int, ...] | None = None) -> None:
        if job.phase == "done":
            return
        job.outcome, job.phase = outcome, "done"
        s = job.session
        if s is not None:
            # once a token was generated, the session's text is the prompt's plus the whole answer (a session cut
            # during its prefill keeps only its token fingerprint)
            if job.generated:
                if pending is None:  # cancelled or timed out while decoding: the last token was not consumed
                    pending = (job.last_token,)
                answer = job.decoder.text + job.decoder.flush()
                text = None if job.prompt.text is None else job.prompt.text + answer
                s.set_text(text, pending)
            self.store.release(s, keep=self.session_reuse)
        self.release_slot()
        log.info(
            "request %s %s: prompt %d tokens (reused %d, prefilled %d), generated %d, %.3f s",
            job.rid,
            outcome,
            job.prompt_tokens,
            job.reused,
            job.prefilled,
            len(job.generated),
            time.perf_counter() - job.arrival,
        )

    @staticmethod
    def _send(job: Job, event: Event) -> None:
        try:
            job.send(event)
        except RuntimeError:  # the event loop is gone (shutting down): nobody to tell
            job.cancel.set()
