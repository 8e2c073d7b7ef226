"""Kept conversations: each one's LambdaCache and a fingerprint of the tokens it consumed, per API key.

A session does not store its tokens (that would grow with the conversation): it keeps their count, a
BLAKE2b digest, the first and last few ids (a cheap pre-check), and a digest of the text those tokens
spell (the rendered prompt plus the generated answer), so memory per session is the cache's
`n_global + n_local` columns plus a few hundred bytes, however long the conversation.

Look-up for a prompt (ids `P`, text `T`), among the idle sessions of the same key, longest first:

1. **token prefix**: the session consumed exactly `P[:n]` (n < len(P)): feed only `P[n:]`.
2. **text splice**: `P` does not start with the session's ids (the client's copy of the last answer
   re-tokenizes differently, e.g. a sampled answer in non-canonical pieces), but `T` starts with the
   session's text and a token of `P` starts exactly where that text ends: feed the session's pending
   token (its last generated token, which the cache has not consumed) and `P`'s tokens from there. The
   conversation continues with the model's own tokens for the past, which is what the cache holds.
3. otherwise a new session and a fresh chunked prefill.

All of this runs on the model worker thread only (no locks). A session in use is `busy` and is never
matched or evicted. Limits: each key (namespace) may keep at most `key_sessions` sessions and
`key_cache_bytes` of caches; past them its own idle sessions go, least recently used first, so one key
cannot push out another's. Then the totals (`max_sessions`, `max_cache_bytes`): idle sessions go least
recently used first, whatever their key (with the per-key limits at the totals shared evenly, the
default, the totals only bind when sessions are busy).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .templates import Prompt

EDGE = 16  # ids kept from each end of the consumed tokens for a quick pre-check


def token_digest(ids) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=20).digest()


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=20).digest()


@dataclass
class Session:
    id: int
    namespace: str
    cache: object  # a LambdaCache
    n_consumed: int = 0
    _hasher: object = field(default_factory=lambda: hashlib.blake2b(digest_size=20))
    head: tuple[int, ...] = ()
    last: tuple[int, ...] = ()
    pending: tuple[int, ...] = ()  # generated but not yet consumed (part of `text`)
    text_len: int | None = None  # characters of the text that consumed + pending spell; None: unknown
    text_hash: bytes | None = None
    last_used: float = field(default_factory=time.monotonic)
    bytes: int = 0
    busy: bool = False

    def consume(self, ids: list[int]) -> None:
        """Record ids the cache has just consumed (the text fingerprint is set again at the end of a turn)."""
        if not ids:
            return
        self._hasher.update(np.asarray(ids, dtype=np.int64).tobytes())
        if len(self.head) < EDGE:
            self.head = (self.head + tuple(ids))[:EDGE]
        self.last = (self.last + tuple(ids))[-EDGE:]
        self.n_consumed += len(ids)
        self.text_len = self.text_hash = None
        self.pending = ()

    @property
    def digest(self) -> bytes:
        return self._hasher.digest()

    def set_text(self, text: str | None, pending: tuple[int, ...]) -> None:
        """The text that the consumed ids plus `pending` spell (None when unknown)."""
        self.pending = tuple(pending)
        if text is None:
            self.text_len = self.text_hash = None
        else:
            self.text_len, self.text_hash = len(text), text_digest(text)


@dataclass
class Match:
    session: Session
    new_ids: list[int]  # what must be fed (the prompt is the session's consumed ids + these)
    kind: str  # token_prefix, text_splice, new


class SessionStore:
    """Sessions per namespace (a hash of the API key), LRU order, count and memory limits per namespace and in
    all (`key_sessions`, `key_cache_bytes`: None for no per-namespace limit)."""

    def __init__(
        self,
        max_sessions: int,
        max_cache_bytes: int,
        on_evict=None,
        key_sessions: int | None = None,
        key_cache_bytes: int | None = None,
    ):
        self.max_sessions, self.max_cache_bytes = max_sessions, max_cache_bytes
        self.key_sessions, self.key_cache_bytes = key_sessions, key_cache_bytes
        self._sessions: OrderedDict[int, Session] = OrderedDict()  # least recently used first
        self._ids = itertools.count(1)
        self.on_evict = on_evict or (lambda reason: None)

    def __len__(self) -> int:
        return len(self._sessions)

    def cache_bytes(self, namespace: str | None = None) -> int:
        return sum(s.bytes for s in self.sessions(namespace))

    def store_bytes(self) -> int:
        """Bytes of the block-memory stores of all live sessions (0 without block memory; part of `cache_bytes`)."""
        return sum(getattr(s.cache, "store_bytes", lambda: 0)() for s in self.sessions())

    def sessions(self, namespace: str | None = None) -> list[Session]:
        return [s for s in list(self._sessions.values()) if namespace is None or s.namespace == namespace]

    # ------------------------------------------------------------------------------------------ look-up

    def find(self, namespace: str, prompt: Prompt) -> Match | None:
        """The idle session of `namespace` that `prompt` continues (longest first), marked busy; else None."""
        P = prompt.ids
        idle = [s for s in self._sessions.values() if s.namespace == namespace and not s.busy]
        arr = None
        for s in sorted(idle, key=lambda s: s.n_consumed, reverse=True):
            n = s.n_consumed
            if not 0 < n < len(P) or tuple(P[: len(s.head)]) != s.head or tuple(P[n - len(s.last) : n]) != s.last:
                continue
            if arr is None:
                arr = np.asarray(P, dtype=np.int64)
            if token_digest(arr[:n]) == s.digest:
                return self._take(s, list(P[n:]), "token_prefix")
        T = prompt.text
        if T is None:
            return None
        for s in sorted(idle, key=lambda s: s.text_len or 0, reverse=True):
            k = s.text_len
            if k is None or k >= len(T) or text_digest(T[:k]) != s.text_hash:
                continue
            j = prompt.boundary(k)
            if j is None:
                continue
            return self._take(s, list(s.pending) + list(P[j:]), "text_splice")
        return None

    def has_idle(self, namespace: str) -> bool:
        return any(s.namespace == namespace and not s.busy for s in self._sessions.values())

    def _take(self, s: Session, new_ids: list[int], kind: str) -> Match:
        s.busy = True
        self._sessions.move_to_end(s.id)
        return Match(s, new_ids, kind)

    def create(self, namespace: str, cache) -> Session:
        s = Session(next(self._ids), namespace, cache, busy=True, bytes=int(cache.memory_bytes()))
        self._sessions[s.id] = s
        self.evict(namespace)
        return s

    # -------------------------------------------------------------------------------------------- release

    def release(self, s: Session, keep: bool = True) -> None:
        """End a turn: the session becomes idle (most recently used), or is dropped (`keep=False`)."""
        s.busy = False
        s.last_used = time.monotonic()
        s.bytes = int(s.cache.memory_bytes())
        if not keep:
            self._sessions.pop(s.id, None)
            return
        if s.id in self._sessions:
            self._sessions.move_to_end(s.id)
        self.evict(s.namespace)

    def drop(self, s: Session, reason: str = "error") -> None:
        if self._sessions.pop(s.id, None) is not None:
            self.on_evict(reason)

    def evict(self, namespace: str | None = None) -> None:
        """Drop idle sessions, least recently used first (busy ones stay): `namespace`'s own until it is within
        its limits, then any until the totals hold."""
        count, size = self.key_sessions, self.key_cache_bytes
        if namespace is not None and (count is not None or size is not None):
            self._evict_while(
                lambda: count is not None and len(self.sessions(namespace)) > count,
                lambda: size is not None and self.cache_bytes(namespace) > size,
                "key_sessions",
                "key_memory",
                namespace,
            )
        self._evict_while(
            lambda: len(self._sessions) > self.max_sessions,
            lambda: self.cache_bytes() > self.max_cache_bytes,
            "max_sessions",
            "memory",
        )

    def _evict_while(self, over_count, over_memory, count_reason: str, memory_reason: str, namespace=None) -> None:
        for s in list(self._sessions.values()):
            by_count, by_memory = over_count(), over_memory()
            if not (by_count or by_memory):
                return
            if not s.busy and (namespace is None or s.namespace == namespace):
                del self._sessions[s.id]
                self.on_evict(count_reason if by_count else memory_reason)

    def update_bytes(self, s: Session) -> None:
        s.bytes = int(s.cache.memory_bytes())
