"""Endless generation: `stream()` yields text as it is generated and keeps its cache across calls.

The loop is plain: prefill the prompt in chunks, then one token per forward through the
LambdaCache, so memory and time per token stay constant for hours of output (not with the top-k
extension: its cache keeps every token). Passing the same
`cache` to the next call appends the next user turn to the same context (multi-turn chat).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .cache import LambdaCache
from .scoring import prefill


def _pick(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
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


def stream(
    model: nn.Module,
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
    its prompt and its output to it. Single sequence (batch 1).
    """
    if cache is None:
        cache = LambdaCache.for_model(model)
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    first_turn = cache.get_seq_length() == 0
    ids = tokenizer.encode(prompt, add_special_tokens=first_turn) if prompt else []
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if not ids:
        if not first_turn:
            raise ValueError("give some text to continue a conversation")
        ids = [tokenizer.bos_token_id]
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if prompt_ids.shape[1] > 1:
        prefill(model, prompt_ids[:, :-1], chunk_size=chunk_size, cache=cache)
    next_input = prompt_ids[:, -1:]
    recent: list[int] = ids[-4:]
    produced = 0
    try:
        while max_new_tokens is None or produced < max_new_tokens:
            with torch.no_grad():
                logits = model(input_ids=next_input, cache=cache, use_cache=True).logits[:, -1]
            token = int(_pick(logits, do_sample, temperature, top_k, top_p, generator)[0])
            produced += 1
            window = recent[-7:]
            before = tokenizer.decode(window, skip_special_tokens=True)
            piece = tokenizer.decode(window + [token], skip_special_tokens=True)[len(before) :]
            recent = window + [token]
            next_input = torch.tensor([[token]], device=device)
            if stop_at_eos and token == tokenizer.eos_token_id:
                break
            if piece:
                yield piece
    finally:
        # Feed the last token, also when the caller stops early, so the cache holds the whole
        # conversation for the next turn.
        with torch.no_grad():
            model(input_ids=next_input, cache=cache, use_cache=True, logits_to_keep=1)
