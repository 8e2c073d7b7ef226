"""Prompts: chat messages -> text (the model's own chat template, or the plain fallback) -> token ids, and back.

The model's own template (`tokenizer.chat_template`, e.g. ChatML for SmolLM2) is used when it has one,
rendered with `add_generation_prompt=True` and tokenized without adding special tokens (the template
writes them), as `transformers`' `apply_chat_template(tokenize=True)` does.

Models without a template (stories260K, llama2.c checkpoints) get the **plain fallback**, tokenized with
the tokenizer's BOS:

    {system}\n\n                one per system (or developer) message
    User: {content}\n           one per user message
    Assistant:{content}\n       one per assistant message (content verbatim: generated answers start
                                with the space the model wrote after "Assistant:")
    Assistant:                  the generation prompt

`IncrementalDecoder` turns generated ids into text pieces exactly as they read after the prompt (a
piece is held back while it ends inside a UTF-8 character); `StopMatcher` cuts the text at the first
stop string and holds back a tail that could start one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import APIError, bad_request

FALLBACK_ROLES = {"system": "{}\n\n", "developer": "{}\n\n", "user": "User: {}\n", "assistant": "Assistant:{}\n"}
FALLBACK_GENERATION_PROMPT = "Assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text of `messages` ({"role", "content": str}), ending with the generation prompt."""
    if not has_chat_template(tokenizer):
        return "".join(FALLBACK_ROLES[m["role"]].format(m["content"]) for m in messages) + FALLBACK_GENERATION_PROMPT
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError (e.g. "roles must alternate"), ValueError, ...
        raise bad_request(f"the model's chat template refused these messages: {e}", "messages") from None
    if not isinstance(text, str):
        raise APIError(500, "the chat template did not render text", "server_error", None, "internal_error")
    return text


@dataclass
class Prompt:
    """A prompt as text (None when given as token ids) and its ids. `boundary()` finds where a text prefix ends
    among the tokens, from character offsets computed on first use (a fast tokenizer's offset mapping; only a
    session look-up by text needs them)."""

    text: str | None
    ids: list[int]
    offsets: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    _spans: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def boundary(self, chars: int) -> int | None:
        """Index of the first token of `text[chars:]` when a token boundary lies exactly at `chars`, else None."""
        if self.offsets is None:
            return None
        if self._spans is None:
            self._spans = self.offsets()
        starts, ends = self._spans
        if len(starts) != len(self.ids):
            return None
        j = int(np.searchsorted(starts, chars, side="left"))
        # tokens before j must end at or before `chars` (none straddles the boundary), and j must start there
        if j >= len(self.ids) or starts[j] != chars:
            return None
        if j > 0 and int(ends[:j].max()) > chars:
            return None
        return j


def encode(tokenizer, text: str, add_special_tokens: bool) -> Prompt:
    """Tokenize `text`; with a fast tokenizer, each token's character offsets are available on demand."""
    ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if not getattr(tokenizer, "is_fast", False):
        return Prompt(text, ids)

    def offsets() -> tuple[np.ndarray, np.ndarray]:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        # special tokens added by the tokenizer (BOS) have empty offsets at 0: keep the starts non-decreasing
        return np.maximum.accumulate(spans[:, 0]), spans[:, 1].copy()

    return Prompt(text, ids, offsets)


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token spells (its longest vocabulary entry), at least 1."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except Exception:
        return 64


def chat_prompt(tokenizer, messages: list[dict], check: Callable[[str], None] | None = None) -> Prompt:
    """Render and tokenize chat messages the way the server does (`check(text)` may refuse the text first)."""
    text = render_chat(tokenizer, messages)
    if check is not None:
        check(text)
    return encode(tokenizer, text, add_special_tokens=not has_chat_template(tokenizer))


def completion_prompt(tokenizer, prompt: str | list[int], check: Callable[[str], None] | None = None) -> Prompt:
    """A /v1/completions prompt: text with the tokenizer's special tokens (BOS), or token ids as given."""
    if isinstance(prompt, list):
        return Prompt(None, list(prompt))
    if check is not None:
        check(prompt)
    prompt_ = encode(tokenizer, prompt, add_special_tokens=True)
    if not prompt_.ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise bad_request("empty prompt, and the tokenizer has no BOS token to start from", "prompt")
        prompt_ = Prompt(prompt, [bos])
    return prompt_


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDecoder:
    """Text of generated ids as it reads after `context` (the prompt's last ids), one piece per token.

    Decodes a short sliding window (as vLLM does), so each token costs O(1); a piece that ends inside a
    multi-byte character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context[-6:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""  # every piece returned so far

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = _decode(self.tokenizer, self.ids[self.prefix_offset : self.read_offset])
        full = _decode(self.tokenizer, self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        piece = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += piece
        return piece


class StopMatcher:
    """Cuts streamed text at the first of the `stops` strings; holds back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
