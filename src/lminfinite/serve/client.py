"""RemoteChat: the terminal chat's backend for a remote `lminfinite serve` (or any OpenAI-compatible server).

Same interface as the local `lminfinite.chat.Chat`: `send(text)` streams the answer as text pieces,
`reset()` forgets the conversation, `stats()` reports it. The client keeps the message history and
sends it whole with every turn, as OpenAI clients do; an lminfinite server recognises the
conversation it already holds and prefills only the new message (`stats()['last_cached_tokens']`).

Answers are stored verbatim (not stripped), so the history the server renders next time spells
exactly the text it generated. Stopping a stream early (closing the iterator, Ctrl-C) closes the
HTTP stream, which stops the generation on the server; the partial answer stays in the history.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class RemoteChatError(ConnectionError):
    """The server could not be reached, or refused the request (its message is included)."""


@contextmanager
def _server_errors(url: str):
    import openai

    try:
        yield
    except openai.APIConnectionError as e:
        raise RemoteChatError(f"cannot reach the server at {url} ({e})") from e
    except openai.APIStatusError as e:
        message = e.body.get("message") if isinstance(e.body, dict) else None
        raise RemoteChatError(f"the server at {url} answered {e.status_code}: {message or e.message}") from e
    except openai.APIError as e:  # an error event inside a stream
        raise RemoteChatError(f"the server at {url} failed: {e.message}") from e


class RemoteChat:
    """A conversation held by a chat server at `url` (e.g. http://127.0.0.1:8000 or .../v1)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        *,
        system: str | None = None,
        max_tokens: int | None = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        timeout: float = 600.0,
    ):
        from openai import OpenAI

        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
        if not base.endswith("/v1"):
            base += "/v1"
        self.url = base
        self.client = OpenAI(base_url=base, api_key=api_key or "none", timeout=timeout, max_retries=2)
        with _server_errors(base):
            self.model = self._check_model(model)
        self.system, self.max_tokens = system, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.reset()

    def _check_model(self, model: str | None) -> str:
        """`model` if the server serves it; None: the server's only model."""
        names = [m.id for m in self.client.models.list().data]
        if model is not None and model not in names:
            raise ValueError(f"the server does not serve {model!r}; it serves {', '.join(names) or 'nothing'}")
        if model is None and len(names) != 1:
            raise ValueError(f"the server serves {len(names)} models ({', '.join(names)}): pass model=")
        return model or names[0]

    def reset(self) -> None:
        """Forget the conversation (the server evicts its cache in time)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = 0
        self.last_turn: dict = {}

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer as text pieces."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("send() needs a non-empty message")
        return self._answer(text)

    def _answer(self, text: str) -> Iterator[str]:
        messages = self.messages + [{"role": "user", "content": text}]
        start = time.perf_counter()
        with _server_errors(self.url):
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
            )
        parts: list[str] = []
        usage, first = None, None
        try:
            with _server_errors(self.url):
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.choices and chunk.choices[0].delta.content:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(chunk.choices[0].delta.content)
                        yield chunk.choices[0].delta.content
        finally:
            stream.close()  # stops the server's generation when we stop early
            self.messages = messages + [{"role": "assistant", "content": "".join(parts)}]
            self.turns += 1
            self._record(usage, start, first, len(parts))

    def _record(self, usage, start: float, first: float | None, pieces: int) -> None:
        seconds = time.perf_counter() - start
        turn = {"seconds": round(seconds, 3), "time_to_first_token_s": round(first - start, 3) if first else None}
        if usage is not None:
            cached = (
                getattr(usage.prompt_tokens_details, "cached_tokens", None) if usage.prompt_tokens_details else None
            )
            turn.update(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=cached,
                tokens_per_s=round(usage.completion_tokens / seconds, 1) if seconds > 0 else None,
            )
        else:
            turn["pieces"] = pieces  # stopped early: the server sent no usage
        self.last_turn = turn

    def stats(self) -> dict:
        """Turns, the conversation's size in tokens (as the server counted the last turn), the last turn's figures."""
        seen = self.last_turn.get("prompt_tokens", 0) + self.last_turn.get("completion_tokens", 0)
        return {
            "server": self.url,
            "model": self.model,
            "turns": self.turns,
            "tokens_seen": seen,
            **{f"last_{k}": v for k, v in self.last_turn.items()},
        }
