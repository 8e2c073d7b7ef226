"""Long inputs through a cache: `prefill()` and `score()`, chunk by chunk, in bounded memory.

On an enabled model the cache is a LambdaCache, so memory depends on the chunk size and the
window, not on the input length (except with the top-k extension, whose cache keeps every token);
on an unmodified model the same code gives the exact vanilla
result with a growing DynamicCache (the baseline).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from .api import is_enabled
from .cache import LambdaCache
from .compat import cache_keyword
from .context import USE_LAMBDA_CACHE


def _chunks(n: int, chunk_size: int | None, progress: bool, desc: str):
    if chunk_size is None:
        chunk_size = n if n else 1
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    starts = range(0, n, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", total=len(starts))
    return ((s, min(s + chunk_size, n)) for s in starts)


def _new_cache(model: PreTrainedModel) -> Cache:
    if is_enabled(model):
        return LambdaCache.for_model(model)
    return DynamicCache(config=model.config)


def _check_ids(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2D tensor (batch, length)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")


def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = 4096,
    cache: Cache | None = None,
    progress: bool = False,
) -> Cache:
    """Feed `input_ids` (batch, n; left padding allowed) into a cache, `chunk_size` tokens at a time.

    On an enabled model the cache is a LambdaCache holding `n_global + n_local` tokens per row, so
    peak memory depends on `chunk_size + n_global + n_local`, not on `n` (with `top_k`, the cache keeps
    all `n` tokens). Returns the cache; pass it
    to `model.generate(full_ids, cache=cache)` (`past_key_values=cache` on transformers 5.19) or `stream()`
    to continue. Chunks also keep the
    RoPE positions bounded (below `2 * n_local + chunk_size`); `chunk_size=None` is one forward.
    Runs without autograd: under `torch.no_grad`, not `torch.inference_mode`, because the cache it fills
    may later be used where autograd records (inference tensors cannot be saved for backward).
    """
    _check_ids(input_ids, attention_mask)
    if cache is None:
        cache = _new_cache(model)
    elif is_enabled(model) and not isinstance(cache, LambdaCache):
        name = type(cache).__name__
        raise ValueError(f"prefill() into a {name}: an enabled model fills a LambdaCache; {USE_LAMBDA_CACHE}")
    device = next(model.parameters()).device
    cache_kw = cache_keyword(model)  # an unenabled model on transformers 5.19 ignores `cache=`
    with torch.no_grad():
        for s, e in _chunks(input_ids.shape[1], chunk_size, progress, "prefill"):
            mask = None if attention_mask is None else attention_mask[:, :e].to(device)
            model(
                input_ids=input_ids[:, s:e].to(device),
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
    return cache


def score(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = 4096,
    progress: bool = False,
) -> torch.Tensor:
    """Per-token negative log-likelihood (nats) of `input_ids[:, 1:]`, shape (batch, n - 1).

    The input is fed in chunks through a cache (a LambdaCache when the model is enabled), and only
    one chunk's logits exist at a time, so inputs of millions of tokens fit in memory (with `top_k` the
    cache grows with n, and each query scores every middle token). Positions
    whose token or predecessor is padding are NaN. An unenabled model is scored exactly too (its
    cache then grows with n). Runs without autograd (`torch.no_grad`).
    """
    _check_ids(input_ids, attention_mask)
    B, n = input_ids.shape
    out = torch.full((B, max(n - 1, 0)), float("nan"))
    if n < 2:
        return out
    cache = _new_cache(model)
    device = next(model.parameters()).device
    cache_kw = cache_keyword(model)
    valid = torch.ones(B, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    with torch.no_grad():
        for s, e in _chunks(n, chunk_size, progress, "score"):
            mask = None if attention_mask is None else attention_mask[:, :e].to(device)
            logits = model(
                input_ids=input_ids[:, s:e].to(device), attention_mask=mask, use_cache=True, **{cache_kw: cache}
            ).logits
            hi = min(e, n - 1)  # logits at s..hi-1 predict tokens s+1..hi
            if hi <= s:
                continue
            logp = torch.log_softmax(logits[:, : hi - s].float(), dim=-1)
            target = input_ids[:, s + 1 : hi + 1].to(device)
            nll = -logp.gather(-1, target[..., None]).squeeze(-1).cpu()
            ok = valid[:, s:hi] & valid[:, s + 1 : hi + 1]
            out[:, s:hi] = torch.where(ok, nll, float("nan"))
    return out
