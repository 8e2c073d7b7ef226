"""`lminfinite serve`: a real uvicorn server on 127.0.0.1 (free port), driven with the official openai client.

stories260K with a small window (G=4, L=64), so that conversations pass the window within a few turns.
Reference answers come from a separate copy of the model (the server's model belongs to its worker
thread): `model.generate` for the same rendered messages, and fresh recomputations of whole histories.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import lminfinite
from lminfinite.models.assets import asset
from lminfinite.serve.metrics import parse_metrics
from lminfinite.serve.runner import ServerThread, load
from lminfinite.serve.templates import chat_prompt, render_chat

pytestmark = pytest.mark.skipif(
    not asset("models", "stories260K", "stories260K.bin").exists(), reason="stories260K asset not found"
)

G, L = 4, 64
KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"
MODEL = "stories260K"
BASE = dict(n_global=G, n_local=L, max_tokens_cap=256, max_prompt_tokens=2048, max_body_mb=0.05)
USER_LINES = [
    "Tell me a story about a cat.",
    "What did the cat find in the garden?",
    "Was the dog happy?",
    "Why did Lily cry?",
    "Where is the red ball?",
    "Then the sun came out and they played.",
    "What did mom say?",
    "Say something nice to Tom.",
]


def start(**config) -> ServerThread:
    app, _, _ = load(MODEL, **{**BASE, **config})
    return ServerThread(app).start()


@pytest.fixture(scope="module")
def server():
    srv = start(api_keys=(KEY_A, KEY_B))
    yield srv
    srv.stop()
    assert not srv.thread.is_alive()


@pytest.fixture(scope="module")
def ref():
    """(model, tokenizer): a second enabled stories260K for reference answers."""
    model, tok = lminfinite.load_model(MODEL)
    lminfinite.enable(model, n_global=G, n_local=L)
    return model, tok


def client(srv: ServerThread, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


def metrics(srv: ServerThread) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{srv.url}/metrics").text)


def lookups(m: dict, result: str) -> float:
    return m[f'lminfinite_session_lookups_total{{result="{result}"}}']


def after_prompt(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of `new_ids` as it reads after the prompt (special tokens dropped)."""
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tok.decode(prompt_ids + new_ids, **kw)[len(tok.decode(prompt_ids, **kw)) :]


def reference(ref, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy new tokens of `model.generate` (a fresh LambdaCache, the whole prompt in one forward)."""
    model, _ = ref
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def chat(c: openai.OpenAI, messages: list[dict], max_tokens: int, stream: bool = False, **kw):
    """(content, finish_reason, usage) of a greedy chat completion, streamed or not."""
    if not stream:
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    parts, finish, usage, roles = [], None, None, []
    for chunk in c.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            delta = chunk.choices[0].delta
            roles += [delta.role] if delta.role else []
            parts.append(delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"]
    return "".join(parts), finish, usage


# ------------------------------------------------------------------------------------------------ basics


def test_models_health_and_fallback_template(server, ref):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["n_local"] == L and health["n_global"] == G
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " Hello!"},
        {"role": "user", "content": "more"},
    ]
    _, tok = ref
    assert render_chat(tok, messages) == "Be kind.\n\nUser: hi\nAssistant: Hello!\nUser: more\nAssistant:"
    assert chat_prompt(tok, messages).ids[0] == tok.bos_token_id


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answers_equal_generate(server, ref, stream):
    """Short and longer-than-the-window prompts: the answer, finish reason and usage equal generate()'s."""
    _, tok = ref
    story = open(asset("corpora", "tinystories_train_head.txt"), encoding="utf-8").read()[:700]
    cases = [
        [{"role": "user", "content": "Tell me a story."}],
        [{"role": "system", "content": story}, {"role": "user", "content": "What did Lily find?"}],
    ]
    c = client(server)
    for messages in cases:
        ids = chat_prompt(tok, messages).ids
        new = reference(ref, ids, 24)
        text, finish, usage = chat(c, messages, 24, stream=stream)
        assert text == after_prompt(tok, ids, new)
        assert finish == ("stop" if new[-1] == tok.eos_token_id else "length")
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(new))
        assert usage.total_tokens == len(ids) + len(new)
    assert len(chat_prompt(tok, cases[1]).ids) > 2 * L  # the window was exceeded


def test_completions_equal_generate(server, ref):
    _, tok = ref
    c = client(server)
    ids = tok.encode("Once upon a time")
    new = reference(ref, ids, 12)
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.choices[0].text == after_prompt(tok, ids, new)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True)
        if ch.choices
    ]
    assert "".join(pieces) == r.choices[0].text  # a token-id prompt gives the same answer


def test_stop_strings_and_seeded_sampling(server, ref):
    c = client(server)
    messages = [{"role": "user", "content": "Tell me a story."}]
    full, _, _ = chat(c, messages, 24)
    cut = full.index(" ", 3)
    stop = full[cut : cut + 3]
    text, finish, _ = chat(c, messages, 24, stop=[stop])
    assert (text, finish) == (full[: full.index(stop)], "stop")
    text, finish, _ = chat(c, messages, 24, stream=True, stop=stop)
    assert (text, finish) == (full[: full.index(stop)], "stop")
    kw = dict(model=MODEL, messages=messages, max_tokens=16, temperature=1.0, top_p=0.9)
    a = [c.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in range(2)]
    b = c.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a[0] == a[1] and a[0] != b


# ----------------------------------------------------------------------------------------------- sessions


@pytest.mark.slow
def test_long_conversation_prefills_only_new_tokens(server, ref):
    """Turns past 10x n_local: each turn after the first prefills only its new tokens (metrics and usage),
    the kept cache stays at G + L - 1 columns, RSS stays flat, and every answer equals generate() over the
    whole history with a fresh cache."""
    import psutil

    _, tok = ref
    c = client(server)
    proc = psutil.Process()
    history: list[dict] = []
    consumed = None  # what the session holds after the previous turn: prompt + answer minus its last token
    rss, cache_bytes, prefilled_per_turn, turn = [], [], [], 0
    while consumed is None or consumed < 10 * L:
        history.append({"role": "user", "content": USER_LINES[turn % len(USER_LINES)]})
        before = metrics(server)
        ids = chat_prompt(tok, history).ids
        text, finish, usage = chat(c, history, 12, stream=turn % 2 == 1)
        after = metrics(server)
        new = reference(ref, ids, 12)
        assert text == after_prompt(tok, ids, new), f"turn {turn}"
        assert usage.prompt_tokens == len(ids)
        prefilled = after["lminfinite_prefilled_tokens_total"] - before["lminfinite_prefilled_tokens_total"]
        if consumed is None:
            assert prefilled == len(ids)
        else:
            assert usage.prompt_tokens_details.cached_tokens == consumed
            assert prefilled == len(ids) - consumed  # only the new tokens
            assert lookups(after, "token_prefix") == lookups(before, "token_prefix") + 1
            prefilled_per_turn.append(prefilled)
        consumed = usage.prompt_tokens + usage.completion_tokens - 1
        history.append({"role": "assistant", "content": text})
        rss.append(proc.memory_info().rss)
        cache_bytes.append(after["lminfinite_cache_bytes"])
        turn += 1
    assert max(prefilled_per_turn) < 40  # the new user message + the template, whatever the history length
    # the conversation's cache stopped growing once the window was full (other tests' sessions are idle)
    assert len(set(cache_bytes[-3:])) == 1
    assert rss[-1] - rss[2] < 40 * 2**20, f"RSS grew by {(rss[-1] - rss[2]) / 2**20:.1f} MiB"


def test_sessions_are_isolated_per_api_key(server, ref):
    messages = [{"role": "user", "content": "Where is the red ball?"}]
    a, b = client(server, KEY_A), client(server, KEY_B)
    text, _, _ = chat(a, messages, 8)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    _, _, usage_b = chat(b, messages, 8)
    _, _, usage_a = chat(a, messages, 8)
    assert usage_b.prompt_tokens_details.cached_tokens == 0  # key B cannot see key A's conversation
    assert usage_a.prompt_tokens_details.cached_tokens > 0


@pytest.mark.slow
def test_lru_and_memory_eviction():
    srv = start(max_sessions=2)
    try:
        c = client(srv, "unused")
        convs = [[{"role": "user", "content": line}] for line in USER_LINES[:3]]
        for conv in convs:
            text, _, _ = chat(c, conv, 6)
            conv += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
        m = metrics(srv)
        assert m['lminfinite_sessions_evicted_total{reason="max_sessions"}'] == 1 and m["lminfinite_sessions"] == 2
        assert chat(c, convs[0], 6)[2].prompt_tokens_details.cached_tokens == 0  # the oldest was evicted
        assert chat(c, convs[2], 6)[2].prompt_tokens_details.cached_tokens > 0
        one_session = metrics(srv)["lminfinite_cache_bytes"] / 2
    finally:
        srv.stop()
    srv = start(max_cache_mb=1.5 * one_session / 2**20)
    try:
        c = client(srv, "unused")
        for conv in convs:
            chat(c, conv, 6)
        m = metrics(srv)
        assert m['lminfinite_sessions_evicted_total{reason="memory"}'] >= 1
        assert m["lminfinite_cache_bytes"] <= 1.5 * one_session
    finally:
        srv.stop()


def test_no_session_reuse_prefills_every_prompt():
    srv = start(session_reuse=False)
    try:
        c = client(srv, "unused")
        history = [{"role": "user", "content": "Tell me a story."}]
        text, _, first = chat(c, history, 6)
        history += [{"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
        _, _, second = chat(c, history, 6)
        m = metrics(srv)
        assert second.prompt_tokens_details.cached_tokens == 0
        assert m["lminfinite_prefilled_tokens_total"] == first.prompt_tokens + second.prompt_tokens
        assert lookups(m, "disabled") == 2 and m["lminfinite_sessions"] == 0 and m["lminfinite_cache_bytes"] == 0
    finally:
        srv.stop()


# -------------------------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_concurrent_clients_equal_sequential(server):
    """8 clients x 5 requests at once: all succeed, each answer equal to the same request run alone."""
    requests = [
        ([{"role": "user", "content": f"{USER_LINES[i % 8]} Number {i}."}], KEY_A if i % 2 else KEY_B)
        for i in range(40)
    ]
    sequential = [chat(client(server, key), msgs, 6)[0] for msgs, key in requests]

    def run(worker: int) -> list[tuple[int, str]]:
        out = []
        for i in range(worker, 40, 8):
            msgs, key = requests[i]
            out.append((i, chat(client(server, key), msgs, 6, stream=i % 3 == 0)[0]))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = dict(pair for chunk in pool.map(run, range(8)) for pair in chunk)
    assert [results[i] for i in range(40)] == sequential
    assert httpx.get(f"{server.url}/health").json()["in_flight"] == 0


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnected_stream_stops_generating(server):
    """The openai client closes a stream after 3 chunks: the worker retires the request (its disconnect counted,
    its slot freed), and it generates nothing more: a later 2-token request is the only one generating."""
    before = metrics(server)
    stream = client(server).completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=256,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    disconnects, tokens = "lminfinite_client_disconnects_total", "lminfinite_completion_tokens_total"
    assert wait_for(lambda: metrics(server)[disconnects] == before[disconnects] + 1)
    retired = metrics(server)
    assert retired["lminfinite_active_requests"] == 0  # the slot is free: the request is retired
    assert retired[tokens] - before[tokens] < 256
    # a fence: a request run after the retirement is the only source of new tokens (the worker serves all
    # active requests round-robin, so a request still generating would add tokens meanwhile)
    assert client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert metrics(server)[tokens] == retired[tokens] + 2


@pytest.mark.slow
def test_concurrency_limit_and_timeout():
    """--max-concurrency 1: a second request gets 429 while one runs; --request-timeout stops a long one."""
    srv = start(max_concurrency=1, request_timeout=2.0, max_tokens_cap=100000)
    try:
        c = client(srv, "unused")
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # warm-up: a first forward can be slow
        before = metrics(srv)
        long = dict(model=MODEL, prompt="Once upon a time", max_tokens=100000, extra_body={"ignore_eos": True})
        stream = c.completions.create(stream=True, **long)
        next(iter(stream))
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.APIError, match="timeout"):  # the stream ends with an error event
            for _ in stream:
                pass
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(**long)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        m = metrics(srv)
        assert m["lminfinite_request_timeouts_total"] - before["lminfinite_request_timeouts_total"] == 2
        assert m["lminfinite_rejected_total"] == 1
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------- bad input

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_MSG = [{"role": "user", "content": "hi"}]


def body(**fields) -> dict:
    return {"model": MODEL, "messages": OK_MSG, **fields}


def post(payload, path: str = CHAT, headers: dict | None = None) -> tuple:
    return ("POST", path, headers, payload)


def get(path: str, headers: dict | None = None) -> tuple:
    return ("GET", path, headers, None)


def user(content) -> dict:
    return body(messages=[{"role": "user", "content": content}])


NO_KEY = {"Authorization": ""}
BAD_INPUTS = [
    # (name, (method, path, headers, body: dict | bytes | None), status, error code, error param)
    ("malformed json", post(b'{"model": "stories260K",'), 400, "invalid_json", None),
    ("not utf-8", post(b'{"model": "\xff\xfe"}'), 400, "invalid_encoding", None),
    ("empty body", post(b""), 400, "invalid_json", None),
    ("not an object", post(b"[1, 2]"), 400, "invalid_json", None),
    ("NaN", post(b'{"model": "stories260K", "temperature": NaN}'), 400, "invalid_json", None),
    ("missing model", post({"messages": OK_MSG}), 400, "missing_required_parameter", "model"),
    ("model not a string", post(body(model=3)), 400, "invalid_type", "model"),
    ("unknown model", post(body(model="gpt-5")), 404, "model_not_found", "model"),
    ("missing messages", post({"model": MODEL}), 400, "missing_required_parameter", "messages"),
    ("messages not a list", post(body(messages="hi")), 400, "invalid_type", "messages"),
    ("empty messages", post(body(messages=[])), 400, "invalid_value", "messages"),
    ("content wrong type", post(user(5)), 400, "invalid_type", "messages[0].content"),
    ("unknown role", post(body(messages=[{"role": "wizard", "content": "x"}])), 400, "invalid_value",
     "messages[0].role"),
    ("tool role", post(body(messages=[{"role": "tool", "content": "x"}])), 400, "unsupported_parameter",
     "messages[0].role"),
    ("max_tokens 0", post(body(max_tokens=0)), 400, "invalid_value", "max_tokens"),
    ("max_tokens negative", post(body(max_tokens=-5)), 400, "invalid_value", "max_tokens"),
    ("max_tokens above cap", post(body(max_tokens=257)), 400, "invalid_value", "max_tokens"),
    ("max_completion_tokens 0", post(body(max_completion_tokens=0)), 400, "invalid_value", "max_completion_tokens"),
    ("max_tokens string", post(body(max_tokens="10")), 400, "invalid_type", "max_tokens"),
    ("max_tokens bool", post(body(max_tokens=True)), 400, "invalid_type", "max_tokens"),
    ("temperature range", post(body(temperature=5)), 400, "invalid_value", "temperature"),
    ("temperature type", post(body(temperature="hot")), 400, "invalid_type", "temperature"),
    ("top_p range", post(body(top_p=1.5)), 400, "invalid_value", "top_p"),
    ("seed type", post(body(seed=1.5)), 400, "invalid_type", "seed"),
    ("five stops", post(body(stop=["a", "b", "c", "d", "e"])), 400, "invalid_value", "stop"),
    ("stop type", post(body(stop=3)), 400, "invalid_type", "stop"),
    ("n = 2", post(body(n=2)), 400, "unsupported_parameter", "n"),
    ("stream type", post(body(stream="yes")), 400, "invalid_type", "stream"),
    ("stream_options without stream", post(body(stream_options={})), 400, "invalid_value", "stream_options"),
    ("prompt too long", post(user("ab " * 3000)), 400, "prompt_too_long", "messages"),
    ("prompt too long to tokenize", post(user("y" * 40000)), 400, "prompt_too_long", "messages"),
    ("body too large", post(user("x" * 60000)), 413, "request_too_large", None),
    ("completion without prompt", post({"model": MODEL}, COMPLETIONS), 400, "missing_required_parameter", "prompt"),
    ("token id outside vocab", post({"model": MODEL, "prompt": [1, 512]}, COMPLETIONS), 400, "invalid_value",
     "prompt"),
    ("batch of prompts", post({"model": MODEL, "prompt": ["a", "b"]}, COMPLETIONS), 400, "unsupported_parameter",
     "prompt"),
    ("no api key", post(body(), headers=NO_KEY), 401, "invalid_api_key", None),
    ("wrong api key", post(body(), headers={"Authorization": "Bearer key-a-0123456780"}), 401, "invalid_api_key",
     None),
    ("wrong scheme", post(body(), headers={"Authorization": f"Basic {KEY_A}"}), 401, "invalid_api_key", None),
    ("models without key", get("/v1/models", NO_KEY), 401, "invalid_api_key", None),
    ("unknown route", get("/v1/nothing"), 404, "unknown_url", None),
    ("wrong method", get(CHAT), 405, "method_not_allowed", None),
    ("unknown model id", get("/v1/models/gpt-5"), 404, "model_not_found", "model"),
]  # fmt: skip


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server):
    seen = []
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
        for name, (method, path, headers, payload), *_ in BAD_INPUTS:
            kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload} if payload else {}
            r = http.request(method, path, headers=headers, **kw)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            seen.append((name, r.status_code, error["code"], error["param"]))
            assert error["message"], name
        assert seen == [(name, status, code, param) for name, _, status, code, param in BAD_INPUTS]
        assert http.get("/health").json()["status"] == "ok"
    assert server.thread.is_alive()
    # the openai client maps the statuses to its exceptions
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-5", messages=OK_MSG)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=MODEL, messages=OK_MSG, max_tokens=0)
    assert chat(client(server), OK_MSG, 4)[2].completion_tokens == 4  # still serving
    m = metrics(server)
    assert m['lminfinite_requests_total{route="other",status="404"}'] >= 1
    assert not any(k.startswith("lminfinite_requests_total") and 'status="500"' in k for k in m)


# ------------------------------------------------------------------------------------------------- client


def test_remote_chat(server):
    from lminfinite.serve.client import RemoteChat

    chat_ = RemoteChat(server.url, api_key=KEY_B, max_tokens=8)
    assert chat_.model == MODEL
    first = "".join(chat_.send("Tell me about the cat."))
    second = "".join(chat_.send("What happened next?"))
    stats = chat_.stats()
    assert first and second and stats["turns"] == 2
    assert stats["last_cached_tokens"] > 0 and stats["last_completion_tokens"] == 8
    assert chat_.messages[1] == {"role": "assistant", "content": first}
    pieces = chat_.send("And then?")
    next(pieces)
    pieces.close()  # stopped early: the partial answer stays in the history
    assert chat_.stats()["turns"] == 3 and chat_.messages[-1]["role"] == "assistant"
    chat_.reset()
    assert chat_.messages == [] and chat_.stats()["turns"] == 0
    with pytest.raises(ValueError):
        chat_.send("  ")


def test_server_shuts_down_cleanly():
    srv = start()
    worker = srv.app.state.scheduler._thread
    assert chat(client(srv, "x"), OK_MSG, 2)[2].completion_tokens == 2
    srv.stop()
    assert not srv.thread.is_alive() and not worker.is_alive()
    assert threading.active_count() < 50


@pytest.mark.slow
def test_chat_command_with_server(server, monkeypatch, capsys):
    """`lminfinite chat --server URL --api-key KEY` talks to the server; its second turn continues the session."""
    import io

    from lminfinite.cli import main

    expected = chat(client(server), [{"role": "user", "content": "Tell me a story."}], 6)[0]
    before = metrics(server)
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a story.\nWhat next?\n/stats\n"))
    code = main(["chat", "--server", server.url, "--api-key", KEY_A, "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith(expected + "\n")
    assert out.out.splitlines()[-1].startswith("turns 2, tokens seen ")
    assert f"{server.url}/v1: {MODEL} (remote)" in out.err
    after = metrics(server)
    assert lookups(after, "token_prefix") == lookups(before, "token_prefix") + 1
    for argv, message in [
        (["--server", "http://127.0.0.1:9", "--api-key", KEY_A], "cannot reach"),
        (["--server", server.url, "--api-key", "wrong"], "401"),
        (["--server", server.url, "--api-key", KEY_A, "--sample-top-k", "3", "--do-sample"], "top-k"),
        (["--server", "ftp://x"], "http://"),
    ]:
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
        assert main(["chat", *argv]) == 2
        err = capsys.readouterr().err
        assert "lminfinite: error: --s" in err and message in err, err
