"""Endless generation: `stream()` yields text as it is generated and keeps its cache across calls.

The loop is plain: prefill the prompt in chunks, then one token per forward through the
LambdaCache, so memory and time per token stay constant for hours of output (not with the top-k
extension: its cache keeps every token). Passing the same
`cache` to the next call appends the next user turn to the same context (multi-turn chat).

Also here: `check_sampling()` (the sampling settings' rules, shared with the CLI) and
`NonFiniteError`, raised when the model's logits are NaN or infinite.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from .api import is_enabled
from .cache import LambdaCache
from .scoring import prefill

# Caches whose last stream() call stopped while a forward or the prompt's prefill was under way:
# their contents are incomplete or out of step, and stream() refuses them.
_UNUSABLE: weakref.WeakSet = weakref.WeakSet()


class Detokenizer:
    """Text pieces of tokens as they come: each piece is decoded after a few tokens of context, so that
    SentencePiece's leading spaces and characters split over several tokens come out right."""

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer, self.recent = tokenizer, list(context[-4:])

    def piece(self, token: int) -> str:
        window = self.recent[-7:]
        before = self.tokenizer.decode(window, skip_special_tokens=True)
        piece = self.tokenizer.decode(window + [token], skip_special_tokens=True)[len(before) :]
        self.recent = window + [token]
        return piece


class NonFiniteError(FloatingPointError):
    """The model's logits (or the NLL computed from them) are NaN or infinite.

    `position` is the index of the token whose output is not finite (counted from the first token
    of the sequence or conversation), `method` the evaluation method when known."""

    def __init__(self, message: str, position: int | None = None, method: str | None = None):
        super().__init__(message)
        self.position, self.method = position, method


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """ValueError unless `temperature` is a finite number > 0, `top_k` None or an int >= 0 (0 and None:
    off) and `top_p` None or a number in (0, 1]."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k (sampling) must be an int >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):  # NaN fails the comparison
        raise ValueError(f"top_p must be a number in (0, 1] (None: off), got {top_p!r}")


def check_finite(logits: torch.Tensor, position: int, method: str | None = None) -> None:
    """NonFiniteError when `logits` (one position's, any shape) hold a NaN or an infinity."""
    if not bool(torch.isfinite(logits).all()):
        where = f"{method}: " if method else ""
        raise NonFiniteError(
            f"{where}the model's logits are not finite (NaN or inf) at token position {position}; its output "
            "cannot be used (check the weights and the dtype: float16 overflows in some models)",
            position,
            method,
        )


def pick_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token from `logits` (..., vocab): argmax, or a sample under temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class _Sampling(NamedTuple):
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None


def stream(
    model: PreTrainedModel,
    tokenizer,
    prompt: str,
    *,
    cache: LambdaCache | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    chunk_size: int = 4096,
) -> Iterator[str]:
    """Generate from `prompt` forever (or `max_new_tokens`), yielding text pieces as they come.

    With `cache=None` a fresh LambdaCache is used and the prompt starts with the tokenizer's BOS;
    pass a cache (e.g. `LambdaCache.for_model(model)`) to keep the conversation: each call appends
    its prompt and its output to it. Single sequence (batch 1). The model must be enabled.

    Sampling (`do_sample=True`): `temperature` a finite number > 0, `top_k` (the sampling top-k, not
    LM-Infinite's top-k middle tokens) None or an int >= 0, `top_p` None or in (0, 1]; other values
    raise ValueError before anything runs. Non-finite logits raise `NonFiniteError` (with the position).

    Stopping early, and what the cache then holds:
    - The caller stops between tokens (breaks out of the loop, calls `close()`, or an exception such as
      KeyboardInterrupt is raised in the caller's code while the generator waits at a `yield`): the last
      token is fed, so the cache holds the prompt and every token generated; continuing the
      conversation with it gives the same result as a fresh cache fed the same tokens.
    - The stop happens inside this call's own work (a KeyboardInterrupt or an error during a model
      forward or the prompt's prefill): if the cache was not touched yet, it is as before the call;
      otherwise it may be incomplete or its layers out of step, and it is refused: the next `stream()`
      with it raises ValueError ("make a new cache", or empty it with `cache.reset()`), and any forward
      with a cache whose forward was cut short raises ValueError too. It is never silently continued.
    The generator must be closed (or run to its end) while the model is still enabled; a cache whose
    last token could not be fed because the model was disabled first is refused the same way.
    """
    if not is_enabled(model):
        raise ValueError("stream() needs an lminfinite-enabled model: call lminfinite.enable(model) first")
    if cache is None:
        cache = LambdaCache.for_model(model)
    elif cache in _UNUSABLE:
        if cache.get_seq_length() > 0:
            raise ValueError(
                "this LambdaCache was left incomplete by an interrupted stream() (stopped inside a forward or the "
                "prompt's prefill); make a new cache (LambdaCache.for_model(model)) or empty it (cache.reset())"
            )
        _UNUSABLE.discard(cache)  # emptied with reset(): usable again
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be None or an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    sampling = _Sampling(do_sample, temperature, top_k, top_p)
    return _generate(model, tokenizer, prompt, cache, max_new_tokens, sampling, seed, stop_at_eos, chunk_size)


def _generate(
    model: PreTrainedModel,
    tokenizer,
    prompt: str,
    cache: LambdaCache,
    max_new_tokens: int | None,
    sampling: _Sampling,
    seed: int | None,
    stop_at_eos: bool,
    chunk_size: int,
) -> Iterator[str]:
    first_turn = cache.get_seq_length() == 0
    ids = tokenizer.encode(prompt, add_special_tokens=first_turn) if prompt else []
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if not ids:
        if not first_turn:
            raise ValueError("give some text to continue a conversation")
        ids = [tokenizer.bos_token_id]
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pending: torch.Tensor | None = None  # a token of the conversation that is not in the cache yet
    mark = cache.get_seq_length()  # the cache's length when it was last known to be consistent
    try:
        if prompt_ids.shape[1] > 1:
            prefill(model, prompt_ids[:, :-1], chunk_size=chunk_size, cache=cache)
        mark, pending = cache.get_seq_length(), prompt_ids[:, -1:]
        text = Detokenizer(tokenizer, ids)
        produced = 0
        while max_new_tokens is None or produced < max_new_tokens:
            with torch.no_grad():
                logits = model(input_ids=pending, cache=cache, use_cache=True).logits[:, -1]
            mark, pending = cache.get_seq_length(), None
            check_finite(logits, mark - 1)
            token = int(pick_token(logits, *sampling, generator=generator)[0])
            produced += 1
            piece = text.piece(token)
            pending = torch.tensor([[token]], device=device)
            if stop_at_eos and token == tokenizer.eos_token_id:
                break
            if piece:
                yield piece
    finally:
        if cache.get_seq_length() != mark:
            _UNUSABLE.add(cache)  # stopped inside a forward (or the prefill) that had begun to change it
        elif pending is not None:
            # Feed the last token, also when the caller stops early, so the cache holds the whole
            # conversation for the next turn. Until that forward is done, the cache counts as unusable.
            _UNUSABLE.add(cache)
            if is_enabled(model):
                with torch.no_grad():
                    model(input_ids=pending, cache=cache, use_cache=True, logits_to_keep=1)
                _UNUSABLE.discard(cache)
