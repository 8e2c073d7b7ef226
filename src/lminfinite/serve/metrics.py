"""Prometheus metrics of the server, written in the Prometheus text format (version 0.0.4) by hand.

No dependency: counters, gauges and histograms with optional labels, thread-safe (the model worker
thread and the event loop both update them). `Metrics` holds every series the server exports;
`Metrics.render()` is the body of `GET /metrics`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), initial: Iterable[dict] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}
        for labelset in initial or ([{}] if not self.label_names else []):
            self._values[self._key(labelset)] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge set by the code, or read from `fn()` at render time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self._value, self._fn = 0.0, fn

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def value(self) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._value

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Iterable[str] = ()):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts, sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, _, _ = series = self._series.setdefault(key, [[0] * len(self.buckets), 0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            series[1] += value
            series[2] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return 0 if series is None else series[2]

    def lines(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, (list(v[0]), v[1], v[2])) for k, v in self._series.items())
        for key, (counts, total, count) in items:
            for bound, c in zip(self.buckets, counts, strict=True):
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {c}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {count}")
        return out


def resident_memory_bytes() -> int:
    """This process's resident set size (Linux /proc, else psutil, else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


LOOKUP_RESULTS = ("token_prefix", "text_splice", "miss", "new", "disabled")


class Metrics:
    """Every series `GET /metrics` shows. Gauges that depend on live state read it through callbacks."""

    def __init__(
        self,
        sessions: Callable[[], float] = lambda: 0,
        cache_bytes: Callable[[], float] = lambda: 0,
        active: Callable[[], float] = lambda: 0,
        store_bytes: Callable[[], float] = lambda: 0,
    ):
        p = "lminfinite_"
        self.requests = Counter(
            p + "requests_total", "HTTP requests answered, by route and status code.", ("route", "status")
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens_total", "Prompt tokens of the requests that reached the model (tokens in)."
        )
        self.completion_tokens = Counter(p + "completion_tokens_total", "Tokens generated (tokens out).")
        self.prefilled_tokens = Counter(
            p + "prefilled_tokens_total", "Prompt tokens fed through the model (not served from a kept session)."
        )
        self.reused_tokens = Counter(
            p + "reused_tokens_total", "Prompt tokens served from a kept session's cache (not fed again)."
        )
        self.lookups = Counter(
            p + "session_lookups_total",
            "Session look-ups by result: token_prefix and text_splice reuse a kept session, miss found kept sessions "
            "of the key but none that the prompt extends, new found none, disabled means --no-session-reuse.",
            ("result",),
            initial=[{"result": r} for r in LOOKUP_RESULTS],
        )
        self.evictions = Counter(
            p + "sessions_evicted_total",
            "Kept sessions dropped, by reason: key_sessions and key_memory (the key's own limits), max_sessions and "
            "memory (the totals), error.",
            ("reason",),
            initial=[{"reason": r} for r in ("key_sessions", "key_memory", "max_sessions", "memory", "error")],
        )
        self.disconnects = Counter(p + "client_disconnects_total", "Requests whose client went away before the end.")
        self.timeouts = Counter(p + "request_timeouts_total", "Requests stopped by --request-timeout.")
        self.rejected = Counter(p + "rejected_total", "Requests refused with 429 beyond --max-concurrency.")
        self.read_timeouts = Counter(
            p + "read_timeouts_total", "Requests whose head or body did not arrive within --read-timeout (408)."
        )
        self.refused_connections = Counter(
            p + "refused_connections_total", "Connections refused with 503 beyond --max-connections."
        )
        self.sessions = Gauge(p + "sessions", "Live sessions (kept and in use).", sessions)
        self.cache_bytes = Gauge(p + "cache_bytes", "Bytes of the KV caches of all live sessions.", cache_bytes)
        self.store_bytes = Gauge(
            p + "store_bytes",
            "Bytes of the block-memory stores of all live sessions (serve --memory; counted in cache_bytes too).",
            store_bytes,
        )
        self.active = Gauge(p + "active_requests", "Requests admitted and not finished (queued or running).", active)
        self.rss = Gauge(
            p + "process_resident_memory_bytes", "Resident memory of the server process.", resident_memory_bytes
        )
        self.latency = Histogram(
            p + "request_duration_seconds", "Time from request to last byte, by route.", LATENCY_BUCKETS, ("route",)
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time from request to the first generated token.", LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds", "Time between generated tokens of one request.", TOKEN_LATENCY_BUCKETS
        )
        self.prefill_time = Histogram(
            p + "prefill_seconds", "Time spent feeding one request's new prompt tokens.", LATENCY_BUCKETS
        )

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        return "\n".join(line for metric in self.all() for line in metric.lines()) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """`{'name{labels}': value}` from Prometheus text (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
