"""Plausibility checks before a long evaluation: does the tokenizer belong to the checkpoint?

A tokenizer that does not belong to the model (same vocabulary size, other pieces) runs without
any error and gives numbers that look like results. Two checks, each returning warnings (text):

- `tokenizer_warnings`: what the checkpoint records about its tokenizer (the BOS/EOS ids in its
  config, the size of its embedding table) against the tokenizer. llama2.c checkpoints record
  neither (the loader already refuses a vocabulary of another size); GGUF files carry their own
  tokenizer; transformers configs usually carry the special ids.
- `nll_warning` / `text_warning`: the model's mean NLL on the start of the text, inside its window
  (where every method is the unmodified model), against `ln(V)`, the NLL of a uniform guess over
  the V tokens of its vocabulary. Threshold: 0.9 ln V. Why: a model reading text tokenized as in
  its training beats the uniform guess by far, even out of its domain (stories260K, a 260K-parameter
  TinyStories model, V = 512, ln V = 6.24: 0.24 ln V on TinyStories, 0.59-0.76 ln V on Alice, Peter
  Pan, Shakespeare and Wikipedia text); a mismatched tokenizer feeds it effectively random ids, which
  score about ln V or worse (stories260K with its ids permuted: 2.7-2.9 ln V, the same as random
  ids; a 32k-vocabulary model with a foreign tokenizer: 10.6 nats, 1.02 ln V). A text the model
  truly cannot read (another language, binary-like data) also trips it; the warning says both.
  A tokenizer that differs only in a few pieces is not detected.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .perplexity import check_nll

THRESHOLD = 0.9  # warn when the in-window mean NLL exceeds THRESHOLD * ln(vocabulary size)
MIN_TOKENS = 32  # fewer scored tokens say too little to warn about
SAMPLE = 512  # tokens scored by `text_warning`


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding table (None when it has none)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _ids(value) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int)}
    return set()


def tokenizer_warnings(model: nn.Module, tokenizer) -> list[str]:
    """Disagreements between the checkpoint's record of its tokenizer and `tokenizer`."""
    out = []
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    for name in ("bos_token_id", "eos_token_id"):
        recorded, actual = _ids(getattr(config, name, None)), getattr(tokenizer, name, None)
        if recorded and isinstance(actual, int) and actual not in recorded:
            shown = sorted(recorded)[0] if len(recorded) == 1 else sorted(recorded)
            out.append(
                f"the checkpoint's config says {name} = {shown}, the tokenizer's is {actual}: the tokenizer may "
                "not belong to this model"
            )
    size = vocab_size(model)
    try:
        n_tokens = len(tokenizer)
    except TypeError:
        n_tokens = None
    if size is not None and n_tokens is not None and n_tokens > size:
        out.append(
            f"the tokenizer has {n_tokens} tokens, the model's embedding table {size} rows: the tokenizer does not "
            "belong to this model"
        )
    return out


def nll_warning(mean_nll: float, vocab: int, tokens: int) -> str | None:
    """A warning when `mean_nll` (nats/token over `tokens` in-window tokens) is implausible for a vocabulary
    of `vocab` tokens (see the module docstring for the threshold)."""
    if tokens < MIN_TOKENS or vocab < 2:
        return None
    uniform = math.log(vocab)
    if math.isfinite(mean_nll) and mean_nll <= THRESHOLD * uniform:
        return None
    return (
        f"the model's NLL on the first {tokens} tokens of the text (inside its window) is {mean_nll:.2f} nats/token, "
        f"about as bad as guessing uniformly among its {vocab} tokens (ln {vocab} = {uniform:.2f}); the tokenizer "
        "probably does not belong to this checkpoint (or the text is one the model cannot read at all), so the "
        "results will say nothing about LM-Infinite"
    )


def text_warning(model: nn.Module, ids: torch.Tensor, n_local: int, max_tokens: int = SAMPLE) -> str | None:
    """`nll_warning` for the first `min(n_local, max_tokens)` ids of the 1D `ids`, scored by `model` as it is
    (call it on the unmodified model: inside the window every method is the unmodified model). Non-finite
    logits raise NonFiniteError here already, before the long run."""
    vocab = vocab_size(model)
    if vocab is None:
        return None
    ids = ids[: max(2, min(n_local, max_tokens, ids.numel()))]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[1:, None].to(device)).squeeze(-1).cpu()
    check_nll(nll, "vanilla (checking the start of the text)")
    return nll_warning(float(nll.mean()), vocab, int(nll.numel()))
