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

Generated ids become text through the library's `lminfinite.decoding.IncrementalDecoder` (the text as it
reads after the prompt); `StopMatcher` cuts that text at the first stop string and holds back a tail that
could start one.
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


PIECE_CHARS = 4096  # characters tokenized at a time when a long text is counted before it is tokenized whole
PIECE_SLACK = 8  # tokens a cut between two pieces may add (a SentencePiece dummy prefix) or save (a merge)


def check_token_budget(tokenizer, text: str, limit: int, param: str) -> None:
    """Refuse (400 `prompt_too_long`) a text that certainly has more than `limit` tokens, having tokenized only
    about `limit` tokens' worth of it: a long text is counted piece by piece (cut before a space where there is
    one) and refused as soon as the pieces' tokens, less `PIECE_SLACK` per cut, pass the limit. A text that
    passes is tokenized whole afterwards, at a cost bounded by about `limit` tokens; the exact count is checked
    on those ids. A text of at most `limit` UTF-8 bytes is not counted (no tokenizer makes more tokens than
    bytes, special tokens aside)."""
    if len(text) * 4 <= limit or len(text.encode("utf-8", "surrogatepass")) <= limit:
        return
    total = pieces = start = 0
    while start < len(text):
        end = min(len(text), start + PIECE_CHARS)
        if end < len(text):
            space = text.rfind(" ", max(start + 1, end - 256), end)
            end = space if space > start else end
        total += len(tokenizer.encode(text[start:end], add_special_tokens=False))
        pieces += 1
        start = end
        if total - PIECE_SLACK * pieces > limit:
            raise too_long(f"the prompt has more than {limit} tokens", limit, param)


def check_prompt_chars(text: str, limit: int, longest_token: int, param: str) -> None:
    """Refuse before tokenizing a text too long for `limit` tokens even if every token spelled `longest_token`
    characters (so an oversized prompt costs no tokenization)."""
    if len(text) > limit * longest_token:
        raise too_long(f"the prompt has {len(text)} characters, more than {limit} tokens can spell", limit, param)


def check_prompt_size(n_tokens: int, limit: int, param: str) -> None:
    if n_tokens > limit:
        raise too_long(f"the prompt has {n_tokens} tokens", limit, param)


def too_long(what: str, limit: int, param: str) -> APIError:
    message = f"{what}; this server accepts at most {limit} prompt tokens (--max-prompt-tokens)"
    return APIError(400, message, "invalid_request_error", param, "prompt_too_long")


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


def _failure(stop: str) -> list[int]:
    """KMP failure table: fail[i] is the length of the longest proper prefix of stop[: i + 1] that is also a
    suffix of it."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Cuts streamed text at the first of the `stops` strings; holds back a tail that may begin one.

    Each stop string has a KMP automaton over the stream, whose state is the longest prefix of the stop that
    the text ends with: what is held back is the longest such prefix, so every character costs O(1) per stop
    (amortized), whatever the stop strings' length."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        text, base = self.pending + piece, len(self.pending)
        for j, c in enumerate(piece):
            for i, stop in enumerate(self.stops):
                k, fail = self._state[i], self._fail[i]
                while k and stop[k] != c:
                    k = fail[k - 1]
                if stop[k] == c:
                    k += 1
                if k == len(stop):  # a stop ends here: the answer ends before the first stop in the text so far
                    head = text[: base + j + 1]
                    self.pending, self._state = "", [0] * len(self.stops)
                    return head[: min(p for p in (head.find(s) for s in self.stops) if p >= 0)], True
                self._state[i] = k
        hold = max(self._state)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        self._state = [0] * len(self.stops)
        return text
