"""Endless generation: `stream()` yields text as it is generated and keeps its cache across calls.

The loop is plain: prefill the prompt in chunks, then one token per forward through the
LambdaCache, so memory and time per token stay constant for hours of output (not with the top-k
extension: its cache keeps every token). Passing the same
`cache` to the next call appends the next user turn to the same context (multi-turn chat).

Tokens are chosen by `decoding.Sampler` and turned into text by `decoding.IncrementalDecoder` (the
ones the chat and the server use too). Also here: `NonFiniteError`, raised when the model's logits
are NaN or infinite (`check_finite`); `check_sampling` and `pick_token` are `decoding`'s, re-exported.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from .api import is_enabled
from .cache import LambdaCache
from .compat import cache_keyword
from .context import USE_LAMBDA_CACHE
from .decoding import IncrementalDecoder, Sampler, Sampling, check_sampling, pick_token
from .scoring import prefill

__all__ = ["stream", "NonFiniteError", "check_finite", "check_sampling", "pick_token"]

# Why stream() refuses a cache whose last call stopped inside a forward or the prompt's prefill.
INCOMPLETE = (
    "this LambdaCache was left incomplete by an interrupted stream() (stopped inside a forward or the "
    "prompt's prefill); make a new cache (LambdaCache.for_model(model)) or empty it (cache.reset())"
)
NOT_FED = (
    "this LambdaCache misses the last token of an interrupted stream() (the model was disabled before it could "
    "be fed); make a new cache (LambdaCache.for_model(model)) or empty it (cache.reset())"
)


class NonFiniteError(FloatingPointError):
    """The model's logits (or the NLL computed from them) are NaN or infinite.

    `position` is the index of the token whose output is not finite (counted from the first token
    of the sequence or conversation), `method` the evaluation method when known."""

    def __init__(self, message: str, position: int | None = None, method: str | None = None):
        super().__init__(message)
        self.position, self.method = position, method


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
    elif not isinstance(cache, LambdaCache):
        raise ValueError(
            f"stream() into a {type(cache).__name__}: an enabled model fills a LambdaCache; {USE_LAMBDA_CACHE}"
        )
    elif not cache.usable:
        raise ValueError(cache.refusal)
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be None or an int >= 0, got {max_new_tokens!r}")
    sampling = Sampling(do_sample, temperature, top_k, top_p)  # ValueError for bad settings
    return _generate(model, tokenizer, prompt, cache, max_new_tokens, sampling, seed, stop_at_eos, chunk_size)


def _generate(
    model: PreTrainedModel,
    tokenizer,
    prompt: str,
    cache: LambdaCache,
    max_new_tokens: int | None,
    sampling: Sampling,
    seed: int | None,
    stop_at_eos: bool,
    chunk_size: int,
) -> Iterator[str]:
    first_turn = cache.get_seq_length() == 0
    ids = tokenizer.encode(prompt, add_special_tokens=first_turn) if prompt else []
    device = next(model.parameters()).device
    cache_kw = cache_keyword(model)
    sampler = Sampler(sampling, torch.Generator().manual_seed(seed) if seed is not None else None)
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
        text = IncrementalDecoder(tokenizer, ids)
        produced = 0
        while max_new_tokens is None or produced < max_new_tokens:
            with torch.no_grad():
                logits = model(input_ids=pending, use_cache=True, **{cache_kw: cache}).logits[:, -1]
            mark, pending = cache.get_seq_length(), None
            check_finite(logits, mark - 1)
            token = int(sampler(logits)[0])
            produced += 1
            pending = torch.tensor([[token]], device=device)
            if stop_at_eos and token == tokenizer.eos_token_id:
                break
            piece = text.add(token)
            if piece:
                yield piece
        rest = text.flush()  # a character still incomplete at the end reads as U+FFFD
        if rest:
            yield rest
    finally:
        if cache.get_seq_length() != mark:
            cache.invalidate(INCOMPLETE)  # stopped inside a forward (or the prefill) that had begun to change it
        elif pending is not None:
            # Feed the last token, also when the caller stops early, so the cache holds the whole
            # conversation for the next turn; a cache that cannot get it is refused from now on.
            if not is_enabled(model):
                cache.invalidate(NOT_FED)
            else:
                try:
                    with torch.no_grad():
                        model(input_ids=pending, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
                except Exception:  # e.g. the cache refuses it: the interrupted forward had begun
                    cache.invalidate(INCOMPLETE)
                except BaseException:
                    cache.invalidate(INCOMPLETE)
                    raise
