"""lminfinite.chat on fast models: the plain-text fallback (stories260K), cached turns past the window
against a naive recomputation, Ctrl-C (raised in the caller's loop, and a real SIGINT during a
forward), errors, sampling settings, the terminal loop and the `chat` command in-process.
SmolLM2 (chat template) is tested in test_smollm2.py."""

from __future__ import annotations

import io
import os
import signal

import pytest
import torch

import lminfinite
from lminfinite.chat import Chat, ChatError, format_stats, repl
from lminfinite.models import load_model
from lminfinite.models.assets import asset

STORIES = asset("models", "stories260K", "stories260K.bin")
pytestmark = pytest.mark.skipif(not STORIES.is_file(), reason=f"stories260K not found at {STORIES}")


@pytest.fixture
def fresh_stories():
    """A fresh stories260K per test (0.1 s): Chat enables it in place."""
    return load_model("stories260K")


def naive_argmax(model, tokens: list[int], n_global: int, n_local: int) -> torch.Tensor:
    """Greedy choices at every position, by the naive kernel recomputing the whole history without a cache."""
    lminfinite.enable(model, n_global=n_global, n_local=n_local, backend="naive")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    lminfinite.enable(model, n_global=n_global, n_local=n_local)
    return logits.argmax(-1)


def test_plain_text_fallback_equals_generate(fresh_stories):
    model, tokenizer = fresh_stories
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=True)
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False)[0, len(prompt) :]
    chat = Chat(model, tokenizer, n_global=4, n_local=512, max_new_tokens=25, record=True)
    assert not chat.templated
    answer = "".join(chat.send("Once upon a time"))
    assert answer == tokenizer.decode(reference, skip_special_tokens=True)
    assert answer.startswith(", there was a little girl named Lily")
    stats = chat.stats()
    # the 25th token is fed with the next message (or by flush())
    assert stats["turns"] == 1 and stats["tokens_seen"] == len(prompt) + 24 == len(chat.tokens)
    assert stats["cache_columns"] == stats["tokens_seen"] and stats["last_answer_tokens"] == 25
    layer0 = chat.cache.layers[0].keys
    assert stats["cache_bytes"] == 2 * 5 * layer0.numel() * layer0.element_size()  # keys + values, 5 layers


@pytest.mark.slow
def test_turns_past_the_window_equal_naive_recomputation(fresh_stories):
    """Four turns, 4x past L: every answer token chosen through the bounded cache is the one the naive
    kernel picks from the whole history; the cache never holds more than G + L columns."""
    model, tokenizer = fresh_stories
    G, L = 3, 24
    chat = Chat(model, tokenizer, n_global=G, n_local=L, max_new_tokens=20, record=True)
    spans = []
    for text in ["Once upon a time", "Tom had a ball.", "The sun", "Mom said"]:
        start = len(chat.tokens)
        list(chat.send(text))
        assert chat.stats()["cache_columns"] <= G + L
        prompt_len = chat.last_turn["prompt_tokens"]
        spans.append((start + prompt_len, len(chat.tokens)))
    assert chat.tokens_seen == len(chat.tokens) > 4 * L
    picks = naive_argmax(model, chat.tokens, G, L)
    for a, b in spans:
        assert b - a >= 1
        assert torch.equal(picks[a - 1 : b - 1], torch.tensor(chat.tokens[a:b]))


def test_interrupt_in_the_callers_loop_keeps_the_conversation(fresh_stories):
    model, tokenizer = fresh_stories
    G, L = 4, 40
    chat = Chat(model, tokenizer, n_global=G, n_local=L, max_new_tokens=30, record=True)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(chat.send("Once upon a time")):
            if i == 5:
                raise KeyboardInterrupt
    stats = chat.stats()  # settles the stopped answer
    assert stats["last_answer_tokens"] == 6 and not stats["last_ended"]
    chat.flush()  # every token chosen is in the cache, the last one included
    assert chat.tokens_seen == len(chat.tokens) == chat.cache.get_seq_length() == stats["last_prompt_tokens"] + 6
    answer = "".join(chat.send("The cat"))
    assert answer
    chat.flush()
    picks = naive_argmax(model, chat.tokens, G, L)
    a = len(chat.tokens) - chat.last_turn["answer_tokens"]
    assert torch.equal(picks[a - 1 : -1], torch.tensor(chat.tokens[a:]))


def test_real_sigint_during_a_forward_is_held_until_it_is_done(fresh_stories):
    """A SIGINT delivered inside a model forward: the forward finishes, then KeyboardInterrupt; the cache
    is consistent and the conversation continues."""
    model, tokenizer = fresh_stories
    chat = Chat(model, tokenizer, n_global=4, n_local=40, max_new_tokens=20, record=True)
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == 8:  # the 8th forward: a decoding step
            os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler, as in a terminal (a process started in the background of a script inherits
    # SIGINT ignored, and Python then installs none)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    handle = model.register_forward_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in chat.send("Once upon a time"):
                pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        handle.remove()
        signal.signal(signal.SIGINT, inherited)
    assert chat._broken is None
    assert chat.tokens_seen == len(chat.tokens) == chat.cache.get_seq_length()
    assert 1 <= chat.stats()["last_answer_tokens"] < 20
    assert "".join(chat.send("Then"))
    chat.flush()
    picks = naive_argmax(model, chat.tokens, 4, 40)
    a = len(chat.tokens) - chat.last_turn["answer_tokens"]
    assert torch.equal(picks[a - 1 : -1], torch.tensor(chat.tokens[a:]))


def test_error_inside_a_forward_breaks_the_conversation_until_reset(fresh_stories):
    model, tokenizer = fresh_stories
    chat = Chat(model, tokenizer, n_global=4, n_local=40, max_new_tokens=5)

    def hook(module, args, output):
        raise RuntimeError("boom")

    layer = model.model.layers[2]
    handle = layer.register_forward_hook(hook)
    with pytest.raises(RuntimeError, match="boom"):
        list(chat.send("Once upon a time"))
    handle.remove()
    with pytest.raises(ChatError, match="reset"):
        chat.send("Again")
    chat.reset()
    assert chat.stats()["tokens_seen"] == 0 and chat.stats()["cache_columns"] == 0
    assert "".join(chat.send("Once upon a time"))


def test_abandoned_answer_is_closed_by_the_next_turn(fresh_stories):
    model, tokenizer = fresh_stories
    chat = Chat(model, tokenizer, n_global=4, n_local=64, max_new_tokens=10, record=True)
    pieces = chat.send("Once upon a time")
    next(pieces)
    next(pieces)  # the caller walks away without closing it
    list(chat.send("The end."))
    chat.flush()
    assert chat.turns == 2 and chat.tokens_seen == len(chat.tokens) == chat.cache.get_seq_length()
    # prompt 1 (5 tokens), the 2 tokens streamed before the caller walked away, then prompt 2
    second = tokenizer.encode("\nThe end.", add_special_tokens=False)
    assert chat.tokens[:5] == tokenizer.encode("Once upon a time")
    assert chat.tokens[7 : 7 + len(second)] == second
    assert chat.last_turn["prompt_tokens"] == len(second) + 1  # with the first answer's last token


def test_sampling_is_seeded_and_validated(fresh_stories):
    model, tokenizer = fresh_stories
    answers = []
    for _ in range(2):
        chat = Chat(model, tokenizer, n_local=64, max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=3)
        answers.append("".join(chat.send("Once upon a time")))
    assert answers[0] == answers[1] and answers[0]
    greedy = "".join(Chat(model, tokenizer, n_local=64, max_new_tokens=12).send("Once upon a time"))
    other = "".join(
        Chat(model, tokenizer, n_local=64, max_new_tokens=12, do_sample=True, temperature=1.5, seed=4).send(
            "Once upon a time"
        )
    )
    assert other != greedy
    for bad in [
        {"temperature": float("nan")},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
    ]:
        with pytest.raises(ValueError):
            Chat(model, tokenizer, do_sample=True, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Chat(model, tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="chat template"):
        Chat(model, tokenizer, system="Be brief.")
    with pytest.raises(ValueError, match="non-empty"):
        Chat(model, tokenizer).send("   ")


def test_chat_keeps_or_sets_the_models_settings(fresh_stories):
    model, tokenizer = fresh_stories
    chat = Chat(model, tokenizer)
    assert (chat.n_global, chat.n_local) == (10, 512)  # defaults: 10 and the pretraining length
    lminfinite.enable(model, n_global=2, n_local=100)
    assert (Chat(model, tokenizer).n_global, Chat(model, tokenizer).n_local) == (2, 100)
    assert Chat(model, tokenizer, n_local=64).n_local == 64 and lminfinite.config_of(model).n_global == 2


class FakeBackend:
    """A backend for the terminal loop alone: answers by echoing, can be told to be interrupted."""

    def __init__(self):
        self.sent, self.resets, self.closed = [], 0, 0
        self.interrupt_after = None

    def send(self, text):
        self.sent.append(text)
        return self._answer(text)

    def _answer(self, text):
        try:
            for i, word in enumerate(["echo:", *text.split()]):
                if self.interrupt_after is not None and i == self.interrupt_after:
                    raise KeyboardInterrupt
                yield word + " "
        finally:
            self.closed += 1

    def reset(self):
        self.resets += 1

    def stats(self):
        return {"turns": len(self.sent), "tokens_seen": 7, "cache_columns": 5, "cache_bytes": 3 * 2**20}


def test_repl_with_piped_input():
    backend = FakeBackend()
    stdin = io.StringIO("hello there\n\n/stats\n/nope\n/reset\nsecond one\n/exit\nnever sent\n")
    out, err = io.StringIO(), io.StringIO()
    assert repl(backend, stdin=stdin, stdout=out, stderr=err) == 0
    assert backend.sent == ["hello there", "second one"] and backend.resets == 1
    lines = out.getvalue().splitlines()
    assert lines == ["echo: hello there ", "turns 1, tokens seen 7, cache 5 columns, 3.0 MiB", "echo: second one "]
    assert "unknown command /nope" in err.getvalue() and "(conversation reset)" in err.getvalue()


def test_repl_ctrl_c_stops_the_answer_and_goes_on():
    backend = FakeBackend()
    backend.interrupt_after = 2
    out = io.StringIO()
    repl(backend, stdin=io.StringIO("a b c d\nx\n"), stdout=out, stderr=io.StringIO())
    assert out.getvalue().splitlines() == ["echo: a  [stopped]", "echo: x "]
    assert backend.sent == ["a b c d", "x"] and backend.closed == 2


def test_format_stats():
    line = format_stats({"turns": 2, "tokens_seen": 90, "cache_columns": 50, "cache_bytes": 2**21, "n_global": 4})
    assert line == "turns 2, tokens seen 90, cache 50 columns, 2.0 MiB"


def test_chat_command_in_process(monkeypatch, capsys):
    from lminfinite.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n/stats\n"))
    code = main(["chat", "--model", "stories260K", "--max-new-tokens", "12", "--n-local", "64", "--n-global", "4"])
    out = capsys.readouterr()
    assert code == 0
    lines = out.out.splitlines()
    assert lines[0].startswith(", there was a little girl")
    assert lines[1].startswith("turns 1, tokens seen ") and "G=4 L=64" in lines[1]
    assert "stories260K: G=4 L=64, no chat template" in out.err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "0"], "temperature"),
        (["--top-p", "2"], "top-p"),
        (["--sample-top-k", "-1"], "integer >= 0"),
        (["--system", "Be brief."], "no chat template"),
        (["--max-new-tokens", "-1"], "max-new-tokens"),
    ],
)
def test_chat_command_bad_options(argv, message, monkeypatch, capsys):
    from lminfinite.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--model", "stories260K", *argv]) == 2
    assert message in capsys.readouterr().err


def test_non_finite_logits_are_reported(fresh_stories):
    from lminfinite.streaming import NonFiniteError

    model, tokenizer = fresh_stories
    chat = Chat(model, tokenizer, n_global=4, n_local=40, max_new_tokens=5)
    handle = model.model.norm.register_forward_hook(lambda module, args, output: output * float("nan"))
    try:
        with pytest.raises(NonFiniteError, match="not finite"):
            list(chat.send("Once upon a time"))
    finally:
        handle.remove()
    assert "".join(chat.send("Then"))  # the forward itself completed: the conversation goes on
