"""The server's parts without HTTP: continuing a kept cache is exact, session matching (token prefix, text
splice, isolation, LRU), the scheduler on a spliced session, incremental decoding, stop strings, metrics text."""

from __future__ import annotations

import queue

import pytest
import torch

import lminfinite
from lminfinite.decoding import IncrementalDecoder
from lminfinite.models.assets import asset
from lminfinite.serve.metrics import Counter, Histogram, Metrics, parse_metrics
from lminfinite.serve.protocol import GenParams
from lminfinite.serve.scheduler import Engine, Job, Scheduler
from lminfinite.serve.sessions import SessionStore
from lminfinite.serve.templates import Prompt, StopMatcher, encode

G, L = 4, 64
needs_stories = pytest.mark.skipif(
    not asset("models", "stories260K", "stories260K.bin").exists(), reason="stories260K asset not found"
)


@pytest.fixture(scope="module")
def small_window():
    """stories260K enabled with G=4, L=64 for this module (its own copy: conftest's shared `stories` is disabled
    after every test that uses it)."""
    model, tok = lminfinite.load_model("stories260K")
    lminfinite.enable(model, n_global=G, n_local=L)
    return model, tok


@pytest.fixture(scope="module")
def story_ids(small_window):
    _, tok = small_window
    text = open(asset("corpora", "tinystories_train_head.txt"), encoding="utf-8").read()[:8000]
    ids = tok.encode(text)
    assert len(ids) > 12 * L
    return ids[: 12 * L]


# ------------------------------------------------------------------------------------ exactness of reuse


@needs_stories
def test_continuing_a_kept_cache_equals_a_fresh_prefill(small_window, story_ids):
    """Fed as a conversation (chunks, single tokens, chunks ...) past 10x n_local, the cache gives the same next-token
    logits as a fresh chunked prefill of the same ids: what it holds depends on the tokens only."""
    model, tok = small_window
    engine = Engine(model, tok)
    kept, pos = engine.new_cache(), 0
    pieces = [150, 1, 1, 37, 1, 200, 1, 250]
    while pos < len(story_ids) - 1:
        for size in pieces:
            size = min(size, len(story_ids) - 1 - pos)
            if size == 0:
                break
            engine.forward(story_ids[pos : pos + size], kept)
            pos += size
    continued = engine.forward(story_ids[-1:], kept)
    fresh_cache = engine.new_cache()
    lminfinite.prefill(model, torch.tensor([story_ids[:-1]]), cache=fresh_cache, chunk_size=256)
    fresh = engine.forward(story_ids[-1:], fresh_cache)
    torch.testing.assert_close(continued, fresh, atol=2e-4, rtol=1e-4)
    assert kept.memory_bytes() == fresh_cache.memory_bytes()  # bounded: G + L - 1 columns each
    assert kept.get_seq_length() == fresh_cache.get_seq_length() == len(story_ids)
    # and the window matters: a cache of only the last L tokens predicts differently
    short = engine.new_cache()
    lminfinite.prefill(model, torch.tensor([story_ids[-L:-1]]), cache=short)
    assert (engine.forward(story_ids[-1:], short) - fresh).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------- session store


class FakeCache:
    def __init__(self, size: int = 100):
        self.size = size

    def memory_bytes(self) -> int:
        return self.size


def consumed(store: SessionStore, ns: str, ids: list[int], size: int = 100):
    s = store.create(ns, FakeCache(size))
    s.consume(ids)
    store.release(s)
    return s


def test_store_matches_token_prefixes_per_namespace():
    store = SessionStore(max_sessions=8, max_cache_bytes=10**9)
    a = consumed(store, "A", list(range(1, 50)))
    b = consumed(store, "A", list(range(1, 30)))
    consumed(store, "B", list(range(1, 80)))
    m = store.find("A", Prompt(None, list(range(1, 60))))
    assert m.session is a and m.kind == "token_prefix" and m.new_ids == list(range(50, 60))  # the longest
    assert store.find("A", Prompt(None, list(range(1, 60)))).session is b  # a is busy now
    assert store.find("A", Prompt(None, list(range(1, 60)))) is None
    store.release(a)
    assert store.find("A", Prompt(None, list(range(1, 50)))) is None  # equal, not longer: nothing to feed
    assert store.find("A", Prompt(None, [1, 2, 3, 99] + list(range(5, 60)))) is None  # differs inside
    assert store.find("C", Prompt(None, list(range(1, 60)))) is None  # other namespace
    assert store.find("B", Prompt(None, list(range(1, 90)))).new_ids == list(range(80, 90))


def test_store_evicts_least_recently_used_idle_sessions():
    evicted = []
    store = SessionStore(max_sessions=2, max_cache_bytes=250, on_evict=evicted.append)
    s1 = consumed(store, "A", [1, 2])
    s2 = consumed(store, "A", [3, 4])
    assert store.find("A", Prompt(None, [1, 2, 5])).session is s1  # s1 becomes the most recently used
    store.release(s1)
    consumed(store, "A", [6, 7])
    assert evicted == ["max_sessions"] and s2 not in store.sessions() and len(store) == 2
    busy = store.create("A", FakeCache(200))  # over the memory budget: idle ones go, the busy one stays
    assert evicted == ["max_sessions", "max_sessions", "memory"] and store.sessions() == [busy]
    store.release(busy, keep=False)
    assert len(store) == 0


def test_per_key_limits_evict_only_the_keys_own_sessions():
    """Issue 21 item 8: 2 sessions and 250 bytes per key (4 and 1000 in all): key B's many sessions push out only
    B's own least recently used ones; A's are kept."""
    evicted = []
    store = SessionStore(4, 1000, evicted.append, key_sessions=2, key_cache_bytes=250)
    a1, a2 = consumed(store, "A", [1, 2]), consumed(store, "A", [3, 4])
    b = [consumed(store, "B", [10 + i, 20 + i]) for i in range(6)]
    assert store.sessions("A") == [a1, a2] and store.sessions("B") == b[-2:]
    assert evicted == ["key_sessions"] * 4
    big = consumed(store, "B", [99], size=200)  # over B's bytes: B's older one goes, not A's
    assert store.sessions("A") == [a1, a2] and store.sessions("B") == [big]
    assert evicted[-1] == "key_memory"
    from lminfinite.serve.config import ServeConfig

    three = ServeConfig("m", api_keys=("k1", "k2", "k3"), max_sessions=64, max_cache_mb=30)
    assert (three.key_sessions, three.key_cache_bytes) == (21, 10 * 2**20)
    assert ServeConfig("m", api_keys=("k1",)).key_sessions is None  # one key: the totals are its limits
    assert ServeConfig("m", api_keys=("k1", "k2"), max_sessions_per_key=5).key_sessions == 5


@needs_stories
def test_text_splice_continues_a_non_canonical_session(small_window):
    """The session's ids spell S but are not how the tokenizer writes S (as a sampled answer can be); a prompt whose
    text extends S continues with the session's ids plus the prompt's tokens after S."""
    _, tok = small_window
    S = "User: hi\nAssistant: Once upon a time"
    canonical = tok.encode(S)
    once = canonical.index(tok.convert_tokens_to_ids("▁Once"))
    spelled = tok.convert_tokens_to_ids(["▁", "O", "n", "c", "e"])
    ids = canonical[:once] + spelled + canonical[once + 1 :]
    assert tok.decode(ids, skip_special_tokens=True) == S and ids != canonical
    store = SessionStore(8, 10**9)
    s = store.create("", FakeCache())
    s.consume(ids[:-1])
    s.set_text(S, pending=(ids[-1],))  # the last answer token was generated, not yet consumed
    store.release(s)
    T = S + "\nUser: more\nAssistant:"
    prompt = encode(tok, T, add_special_tokens=True)
    assert prompt.ids[: len(ids) - 1] != ids[:-1]  # no token prefix
    match = store.find("", prompt)
    assert match.kind == "text_splice" and match.new_ids[0] == ids[-1]
    assert tok.decode(ids + match.new_ids[1:], skip_special_tokens=True) == T
    assert store.find("", encode(tok, "User: hi\nAssistant: Twice", True)) is None


# ------------------------------------------------------------------------------------------ the scheduler


def run_job(scheduler: Scheduler, prompt: Prompt, max_tokens: int, ns: str = "") -> tuple[str, list, Job]:
    events: queue.Queue = queue.Queue()
    job = Job("r", ns, prompt, GenParams(max_tokens=max_tokens, temperature=0.0), events.put, 60.0)
    assert scheduler.try_admit()
    scheduler.submit(job)
    out = []
    while True:
        event = events.get(timeout=60)
        out.append(event)
        if event.kind != "delta":
            return "".join(e.text for e in out if e.kind == "delta"), out, job


def non_canonical(tok, text: str) -> list[int]:
    """`text` tokenized with its first "▁Once" spelled letter by letter (a valid, non-canonical tokenization)."""
    canonical = tok.encode(text)
    once = canonical.index(tok.convert_tokens_to_ids("▁Once"))
    return canonical[:once] + tok.convert_tokens_to_ids(["▁", "O", "n", "c", "e"]) + canonical[once + 1 :]


@needs_stories
def test_scheduler_continues_by_token_prefix_and_text_splice(small_window):
    """Through the model worker: a canonical follow-up continues by token prefix, a follow-up of a non-canonically
    tokenized conversation by text splice; both answers equal generate() over the ids the session holds."""
    model, tok = small_window
    engine, metrics = Engine(model, tok), Metrics()
    store = SessionStore(8, 10**9)
    scheduler = Scheduler(engine, store, metrics, max_concurrency=4, step_tokens=16)
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def expected(ids: list[int], n: int) -> str:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()
        return tok.decode(out, **kw)[len(tok.decode(ids, **kw)) :]

    scheduler.start()
    try:
        for spelling, kind in [("canonical", "token_prefix"), ("non-canonical", "text_splice")]:
            S = "User: Once there was a cat.\nAssistant:"
            first = encode(tok, S, True) if spelling == "canonical" else Prompt(S, non_canonical(tok, S))
            answer, events, job = run_job(scheduler, first, 10, ns=spelling)
            assert events[-1].kind == "done" and events[-1].usage["completion_tokens"] == 10
            [s] = store.sessions(spelling)
            assert s.n_consumed == len(first.ids) + 9 and s.pending == (job.generated[-1],)
            follow = encode(tok, S + answer + "\nUser: And then?\nAssistant:", True)
            before = metrics.prefilled_tokens.value()
            answer2, events, _ = run_job(scheduler, follow, 8, ns=spelling)
            assert metrics.lookups.value(result=kind) == 1
            usage = events[-1].usage
            assert usage["prompt_tokens_details"]["cached_tokens"] == len(first.ids) + 9
            if kind == "token_prefix":
                ids = follow.ids
                assert ids[: len(first.ids) + 10] == first.ids + job.generated
            else:  # the session's own ids for the past, then the follow-up's tokens after its text
                ids = first.ids + job.generated + follow.ids[follow.boundary(len(S + answer)) :]
                assert tok.decode(ids, **kw) == follow.text and ids[: len(first.ids)] != follow.ids[: len(first.ids)]
            assert usage["prompt_tokens"] == len(ids)
            assert metrics.prefilled_tokens.value() - before == len(ids) - (len(first.ids) + 9)
            assert answer2 == expected(ids, 8)
    finally:
        scheduler.stop()


@needs_stories
def test_round_robin_interleaves_a_long_prefill_with_decoding(small_window, story_ids):
    """A 600-token prompt is fed in forwards of step_tokens; a short request admitted with it decodes between those
    chunks (one forward each per pass), so it finishes long before the long prompt is in."""
    model, tok = small_window
    log: list[tuple[str, int]] = []

    class Recording(Engine):
        def forward(self, ids, cache):
            log.append((names[id(cache)], len(ids)))
            return super().forward(ids, cache)

    engine, store = Recording(model, tok), SessionStore(8, 10**9)
    names: dict[int, str] = {}
    original = engine.new_cache

    def new_cache():
        cache = original()
        names[id(cache)] = "long" if not names else "short"
        return cache

    engine.new_cache = new_cache
    scheduler = Scheduler(engine, store, Metrics(), max_concurrency=4, step_tokens=64)
    sent: list[tuple[str, str]] = []
    params = GenParams(max_tokens=4, temperature=0.0)
    jobs = [
        Job(name, name, Prompt(None, ids), params, lambda e, n=name: sent.append((n, e.kind)), 60.0)
        for name, ids in (("long", story_ids[:600]), ("short", story_ids[:5]))
    ]
    for job in jobs:  # both queued before the worker starts: admitted in the same pass
        assert scheduler.try_admit()
        scheduler.submit(job)
    scheduler.start()
    try:
        assert wait(lambda: sum(kind == "done" for _, kind in sent) == 2)
    finally:
        scheduler.stop()
    assert [size for name, size in log if name == "long"][:10] == [64] * 9 + [24]
    assert log[:6] == [("long", 64), ("short", 5), ("long", 64), ("short", 1), ("long", 64), ("short", 1)]
    assert sent.index(("short", "done")) < sent.index(("long", "delta"))
    assert scheduler.in_flight == 0


def wait(predicate, timeout: float = 60.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


class Scripted(Engine):
    """A real tokenizer and end-of-turn ids, but every forward 'predicts' the next token of a fixed script."""

    def __init__(self, model, tokenizer, script: list[int]):
        super().__init__(model, tokenizer)
        self.script, self.calls = script, 0

    def forward(self, ids, cache):
        logits = torch.zeros(512)
        logits[self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


@needs_stories
@pytest.mark.parametrize(
    "answer, eos, max_tokens, content, finish",
    [
        (" Hello E", True, 50, " Hello E", "stop"),  # held back for "END", released at the end of turn
        (" Hello END more", False, 50, " Hello ", "stop"),  # cut before the stop string
        (" Hello E", False, None, " Hello E", "length"),  # released at max_tokens
        (" Hello ñ", False, None, " Hello ñ", "length"),  # a two-byte character, never split
    ],
)
def test_stop_strings_and_the_end_of_an_answer(small_window, answer, eos, max_tokens, content, finish):
    model, tok = small_window
    script = tok.encode(answer, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])
    engine = Scripted(model, tok, script)
    scheduler = Scheduler(engine, SessionStore(8, 10**9), Metrics(), max_concurrency=2, step_tokens=64)
    events: queue.Queue = queue.Queue()
    params = GenParams(max_tokens=max_tokens or len(script), temperature=0.0, stop=("END",))
    job = Job("r", "", encode(tok, "User: hi\nAssistant:", True), params, events.put, 60.0)
    assert scheduler.try_admit()
    scheduler.submit(job)
    scheduler.start()
    try:
        out = [events.get(timeout=30)]
        while out[-1].kind == "delta":
            out.append(events.get(timeout=30))
    finally:
        scheduler.stop()
    assert "".join(e.text for e in out[:-1]) == content and "\ufffd" not in content
    assert (out[-1].kind, out[-1].finish_reason) == ("done", finish)


# ------------------------------------------------------------------------------------ decoding and stops


@needs_stories
def test_incremental_decoder_matches_full_decoding(small_window):
    _, tok = small_window
    context = tok.encode("Assistant:")
    for text in [" héllo wörld 😀 ok", " Once upon a time, there was a cat.", "\n\n  x"]:
        new = tok.encode(text, add_special_tokens=False)
        decoder = IncrementalDecoder(tok, context)
        pieces = [decoder.add(t) for t in new] + [decoder.flush()]
        assert not any("\ufffd" in p for p in pieces)  # never half a character
        kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(pieces) == tok.decode(context + new, **kw)[len(tok.decode(context, **kw)) :]
        assert "".join(pieces) == decoder.text


def test_stop_matcher_holds_back_and_cuts():
    m = StopMatcher(("END", "\n\n"))
    out = []
    for piece in ["Hello E", "N", "ough. A", "nd E", "NDless"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello ENough. And " and stopped
    m = StopMatcher(("xyz",))
    assert m.feed("abcx") == ("abc", False) and m.feed("y") == ("", False) and m.flush() == "xy"
    assert StopMatcher(()).feed("abc") == ("abc", False)


def test_stop_matcher_equals_a_full_search_on_random_streams():
    """500 seeded random streams over a 3-letter alphabet, cut into random pieces, with 1-3 random stops: the
    emitted text is the stream up to the first stop that is complete (the earliest one in the text up to where
    it ends), all of it with none; what is held back is never more than the longest stop minus one."""
    import random

    rng = random.Random(0)
    for _ in range(500):
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        stream = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        ends = [e for e in range(len(stream) + 1) if any(s in stream[:e] for s in stops)]
        hits = [i for i in (stream[: ends[0]].find(s) for s in stops) if i >= 0] if ends else []
        expected = stream[: min(hits)] if hits else stream
        m, out, stopped, at = StopMatcher(stops), [], False, 0
        while at < len(stream) and not stopped:
            piece = stream[at : at + rng.randint(1, 4)]
            at += len(piece)
            text, stopped = m.feed(piece)
            out.append(text)
            assert len(m.pending) < max(map(len, stops))
        if not stopped:
            out.append(m.flush())
        assert ("".join(out), stopped) == (expected, bool(hits)), (stops, stream)


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_text_format():
    c = Counter("x_total", "help", ("route",))
    c.inc(route='a"b')
    c.inc(2, route='a"b')
    h = Histogram("t_seconds", "help", (0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = "\n".join(c.lines() + h.lines())
    values = parse_metrics(text)
    assert values['x_total{route="a\\"b"}'] == 3
    assert [values[f't_seconds_bucket{{le="{b}"}}'] for b in ("0.1", "1", "+Inf")] == [1, 2, 3]
    assert values["t_seconds_count"] == 3 and values["t_seconds_sum"] == pytest.approx(5.55)
    assert "# TYPE t_seconds histogram" in text
    with pytest.raises(ValueError):
        c.inc(-1, route="a")
    rendered = parse_metrics(Metrics().render())
    assert rendered["lminfinite_process_resident_memory_bytes"] > 0
    assert rendered['lminfinite_session_lookups_total{result="text_splice"}'] == 0
