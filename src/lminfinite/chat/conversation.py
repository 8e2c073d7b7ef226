"""`Chat`: a conversation with a model for as long as you like, in one LambdaCache.

A tool built on the public API (`enable`, `config_of`, `LambdaCache`, `prefill`, the model's forward) and
the library's decoding (`lminfinite.decoding`: the sampler, the incremental detokenizer, the end-of-turn
tokens); the library core never imports it.

```python
from lminfinite.chat import Chat
from lminfinite.models import load_model

chat = Chat(*load_model("smollm2"), n_local=8192, system="You are a concise assistant.")
for piece in chat.send("What is the capital of France?"):
    print(piece, end="", flush=True)
chat.stats()   # {'turns': 1, 'tokens_seen': ..., 'cache_columns': ..., 'cache_bytes': ..., ...}
```

How a turn works. The chat template renders the conversation; each `send()` prefills only the new
text (the rendering of the new user message and the generation prompt, plus whatever the template
puts after the previous answer, e.g. ChatML's newline after `<|im_end|>`), computed as the
difference between the rendering with the new message and the text already in the cache. The
answer's tokens -- the end-of-turn token included (`<|im_end|>` for ChatML) -- go into the cache
(the last one with the next message's prefill, or at `flush()`), so the next turn continues it. The
cache keeps the first `n_global` tokens and the last `n_local`, so memory is constant however long the
conversation (only the first and the previous exchanges are kept as text, to render the next turn).
Non-finite logits raise `lminfinite.streaming.NonFiniteError`.

Models without a chat template (stories260K): the conversation is one plain text. The first message
starts it (with the tokenizer's BOS), each later message is appended after a newline, and each
answer continues the text until EOS or `max_new_tokens`.

Stopping. Breaking out of the loop over `send()`'s pieces, closing it, or a KeyboardInterrupt
(Ctrl-C) keeps the conversation: the tokens generated so far stay in the cache, and the next turn
closes the cut answer as the template does. A Ctrl-C that arrives during a model forward is held
until that forward has finished (in the main thread), so the cache is never left half-updated;
during the prefill of a message it takes effect once the message is in. Any other error inside a
forward leaves the cache unusable: the next `send()` says so, and `reset()` starts over.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..api import config_of, enable
from ..cache import LambdaCache
from ..decoding import END_OF_TURN, IncrementalDecoder, Sampler, Sampling, stop_token_ids
from ..memory import BlockMemory
from ..scoring import prefill
from ..streaming import check_finite


class ChatError(RuntimeError):
    """The conversation cannot continue (its cache was left inconsistent): call `reset()`."""


@contextmanager
def _held_interrupt():
    """Hold Ctrl-C (SIGINT) while the block runs; raise KeyboardInterrupt after it if one came.

    Only the main thread receives SIGINT; elsewhere (or under a foreign handler) this does nothing."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _cache_bytes(cache: LambdaCache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _cache_columns(cache: LambdaCache) -> int:
    keys = getattr(cache.layers[0], "keys", None) if cache.layers else None
    return int(keys.shape[-2]) if isinstance(keys, torch.Tensor) else 0


class Chat:
    """A multi-turn conversation with an lminfinite-enabled model, in one bounded `LambdaCache`.

    `n_global`, `n_local`: LM-Infinite's settings (None: the model's current ones if it is enabled, else
    10 and the pretraining length); `memory`: block memory (`lminfinite.BlockMemory`, None: the model's
    current setting), so a fact far back in the conversation can still be found; the model is enabled in
    place. `system`: a system message (needs a
    chat template). `max_new_tokens`: the longest answer (None: until end of turn). Greedy unless
    `do_sample`; then `temperature`, `top_k`, `top_p` (the sampling ones) and `seed` apply.
    `record=True` keeps every token fed to the cache in `self.tokens` (tests; it grows with the chat).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        n_global: int | None = None,
        n_local: int | None = None,
        memory: BlockMemory | None = None,
        system: str | None = None,
        max_new_tokens: int | None = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        chunk_size: int = 2048,
        record: bool = False,
    ):
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be None or an int >= 1, got {max_new_tokens!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        sampling = Sampling(do_sample, temperature, top_k, top_p) if do_sample else Sampling()  # ValueError if bad
        self.model, self.tokenizer = model, tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        if system is not None and not self.templated:
            raise ValueError("a system message needs a chat template; this tokenizer has none")
        current = config_of(model)
        if n_global is not None or n_local is not None or memory is not None or current is None:
            enable(
                model,
                n_global=n_global if n_global is not None else (current.n_global if current else 10),
                n_local=n_local if n_local is not None else (current.n_local if current else None),
                memory=memory if memory is not None else (current.memory if current else None),
            )
        config = config_of(model)
        assert config is not None  # enabled just above
        self.n_global, self.n_local = config.n_global, config.n_local
        self.system, self.max_new_tokens, self.chunk_size = system, max_new_tokens, chunk_size
        self.sampling = sampling
        self.sampler = Sampler(sampling, torch.Generator().manual_seed(seed) if seed is not None else None)
        self.device = next(model.parameters()).device
        self.stop_ids = self._stop_ids()
        self.record = record
        self._active: Iterator[str] | None = None
        self.reset()

    # ----------------------------------------------------------------------------------------- public

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer as text pieces (consume it to get the answer)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("send() needs a non-empty message")
        self._close_active()
        if self._broken:
            raise ChatError(f"the conversation's cache is unusable ({self._broken}); call reset() to start over")
        ids = self._turn_ids(text)
        self._active = self._answer(text, ids)
        return self._active

    def flush(self) -> None:
        """Feed the last answer's final token (its end-of-turn token) into the cache now, rather than with
        the next message: afterwards the cache holds the whole conversation."""
        self._close_active()
        if self._broken:
            raise ChatError(f"the conversation's cache is unusable ({self._broken}); call reset() to start over")
        if self._unfed is not None:
            self._forward([self._unfed])

    def reset(self) -> None:
        """Forget the conversation: an empty cache, no history."""
        self._close_active()
        self.cache = LambdaCache.for_model(self.model)
        self.head: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.last: list[dict] = []  # the previous exchange when it is not part of `head`
        self.answer_text = ""  # what was fed after the last prompt: the answer's text and its end token
        self.answer = ""  # the last answer (special tokens included)
        self._answer_ended = False
        self._unfed: int | None = None  # a chosen token not yet in the cache
        self.turns = self.tokens_seen = 0
        self.last_turn: dict = {}
        self.tokens: list[int] = []
        self._broken: str | None = None

    def stats(self) -> dict:
        """Turns, tokens seen, the cache's size (columns per layer, bytes) and the last turn's figures.

        An answer still being streamed is stopped first (as by Ctrl-C). `tokens_seen` counts the tokens
        fed to the cache; the last answer's final token (its end-of-turn token) is fed with the next
        message, or by `flush()`."""
        self._close_active()
        return {
            "turns": self.turns,
            "tokens_seen": self.tokens_seen,
            "cache_columns": _cache_columns(self.cache),
            "cache_bytes": _cache_bytes(self.cache),
            "store_bytes": self.cache.store_bytes(),
            "n_global": self.n_global,
            "n_local": self.n_local,
            **{f"last_{k}": v for k, v in self.last_turn.items()},
        }

    # --------------------------------------------------------------------------------------- rendering

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _turn_ids(self, text: str) -> list[int]:
        """The token ids of the new text to prefill for user message `text`.

        With a template: the rendering of (first exchange, previous exchange, new message) with the
        generation prompt, minus the text already fed since the previous user message's rendering (that
        rendering plus the answer and its end token). Only the first and the previous exchanges are kept
        as text: ChatML and the like render each message on its own, and the tests check the tokens fed
        over many turns against the rendering of the whole conversation."""
        if not self.templated:
            if self.turns == 0:
                return self.tokenizer.encode(text, add_special_tokens=True)
            return self.tokenizer.encode("\n" + text, add_special_tokens=False)
        context = self.head + self.last
        full = self._render(context + [{"role": "user", "content": text}], True)
        if self.turns == 0:
            return self.tokenizer.encode(full, add_special_tokens=False)
        fed = self._render(context[:-1], True) + self.answer_text
        if full.startswith(fed):
            new = full[len(fed) :]
        else:
            # The template rewrote the history (e.g. it strips the answer): append the new turn as the
            # template renders it after the history, closing a cut answer with the end-of-turn token.
            after = self._render(context, False)
            if not full.startswith(after):
                raise ChatError("the chat template renders earlier turns differently once a message is added")
            new = ("" if self._answer_ended else self.end_text) + full[len(after) :]
        return self.tokenizer.encode(new, add_special_tokens=False)

    def _stop_ids(self) -> set[int]:
        """The library's end-of-turn ids (`decoding.stop_token_ids`) and the token the template closes an
        assistant message with."""
        ids = stop_token_ids(self.model, self.tokenizer)
        self.end_text = ""  # the token the template closes an assistant message with (ChatML: <|im_end|>)
        if self.templated:
            vocab = self.tokenizer.get_vocab()
            probe = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False)
            tail = probe[probe.rindex("y") + 1 :]
            self.end_text = next((t for t in END_OF_TURN if tail.startswith(t)), "")
            if self.end_text:
                ids.add(vocab[self.end_text])
        return ids

    # ---------------------------------------------------------------------------------------- decoding

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` into the cache (in chunks, Ctrl-C held until all are in); the last position's logits."""
        with _held_interrupt():
            try:
                if len(ids) > 1:
                    prefill(self.model, torch.tensor([ids[:-1]]), chunk_size=self.chunk_size, cache=self.cache)
                with torch.no_grad():
                    x = torch.tensor([ids[-1:]], dtype=torch.long, device=self.device)
                    logits = self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=1).logits
            except BaseException as e:
                self._broken = f"{type(e).__name__} during a forward"
                raise
            self._unfed = None
            self.tokens_seen += len(ids)
            if self.record:
                self.tokens.extend(ids)
        return logits[0, -1]

    def _answer(self, text: str, ids: list[int]) -> Iterator[str]:
        start = time.perf_counter()
        answer: list[int] = []
        text_of = IncrementalDecoder(self.tokenizer, [])  # the answer's text on its own
        first_token = None
        stop: int | None = None
        started = False
        if self._unfed is not None:  # the previous answer's last token (its end-of-turn token) goes in first
            ids = [self._unfed, *ids]
        try:
            with _held_interrupt():  # the prompt goes in whole, and the conversation's text with it
                logits = self._forward(ids)
                if self.templated:
                    user = {"role": "user", "content": text}
                    if not self.head or self.head[-1]["role"] != "assistant":
                        self.head.append(user)
                    else:
                        self.last = [user]
                self.answer_text, self._answer_ended = "", False
                self.turns += 1
                started = True
            while True:
                check_finite(logits, self.tokens_seen - 1)
                token = int(self.sampler(logits))
                first_token = first_token or time.perf_counter()
                self._unfed = token  # fed by the next step, or with the next message
                if token in self.stop_ids:
                    stop = token
                    break
                answer.append(token)
                piece = text_of.add(token)  # an incomplete UTF-8 character waits for its last byte
                if piece:
                    yield piece
                if self.max_new_tokens is not None and len(answer) >= self.max_new_tokens:
                    break
                logits = self._forward([token])
            rest = text_of.flush()
            if rest:
                yield rest
        finally:
            # No model forward here (this may run when the generator is garbage-collected): the token chosen
            # last is fed at the start of the next turn, or by flush().
            if started:
                self._finish_turn(answer, stop, start, first_token, len(ids))

    def _finish_turn(self, answer: list[int], stop: int | None, start: float, first: float | None, prompt: int) -> None:
        self.answer = self.tokenizer.decode(answer, skip_special_tokens=False)
        self._answer_ended = stop is not None
        if self.templated:
            end = self.tokenizer.convert_ids_to_tokens(stop) if stop is not None else ""
            self.answer_text = self.answer + end
            reply = {"role": "assistant", "content": self.answer}
            if self.head and self.head[-1]["role"] == "user" and not self.last:
                self.head.append(reply)
            else:
                self.last = self.last[:1] + [reply]
        decode_s = (time.perf_counter() - first) if first else 0.0
        self.last_turn = {
            "prompt_tokens": prompt,
            "answer_tokens": len(answer) + int(stop is not None),
            "seconds": round(time.perf_counter() - start, 3),
            "tokens_per_s": round(len(answer) / decode_s, 2) if decode_s > 0 and answer else 0.0,
            "ended": stop is not None,
        }

    def _close_active(self) -> None:
        active, self._active = self._active, None
        if active is not None:
            active.close()
