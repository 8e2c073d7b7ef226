"""Plausibility checks before a long evaluation: does the tokenizer belong to the checkpoint?

A tokenizer that does not belong to the model (same vocabulary size, other pieces) runs without
any error and gives numbers that look like results. Two checks, each returning warnings (text):

- `tokenizer_warnings`: what the checkpoint records about its tokenizer (the BOS/EOS ids in its
  config, the size of its embedding table) against the tokenizer. llama2.c checkpoints record
  neither (the loader already refuses a vocabulary of another size); GGUF files carry their own
  tokenizer; transformers configs usually carry the special ids.
- `nll_warning` / `text_warning`: the model's mean NLL on the start of the text, inside its window
  (where every method is the unmodified model), against its mean NLL on random token ids of the
  same length (a fixed seed): a warning when the text scores more than 0.7 times the random ids.
  Why: through a foreign tokenizer the text's ids relate to each other as random ids do, so the
  model scores the text like noise; with its own tokenizer it scores any text far better, even
  far from its domain. A ratio, because the noise level depends on the model: random ids cost
  stories260K (V = 512) 2.9 ln V per token and SmolLM2-135M (V = 49152) 1.24 ln V.
  Measured on the first 511 tokens of the six shared texts: the right tokenizer gives 0.08-0.33
  (stories260K; 0.50-0.57 on Grimm's all-capitals table of contents, the worst text here) and
  0.16-0.27 (SmolLM2); the tokenizer with its ids shuffled (same size, other pieces) 0.83-1.0
  (stories260K) and 0.80-0.96 (SmolLM2). Text the model truly cannot read could trip it too, so
  the warning names both causes; a tokenizer that differs in only a few pieces is not detected.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .perplexity import check_nll

THRESHOLD = 0.7  # warn when the text's mean NLL exceeds THRESHOLD times that of random ids
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


def nll_warning(text_nll: float, random_nll: float, tokens: int) -> str | None:
    """A warning when `text_nll` (mean nats/token over `tokens` in-window tokens of the text) is implausible
    against `random_nll` (the same model on random ids; see the module docstring for the threshold)."""
    if tokens < MIN_TOKENS or not random_nll > 0:
        return None
    if math.isfinite(text_nll) and text_nll <= THRESHOLD * random_nll:
        return None
    return (
        f"the model's NLL on the first {tokens} tokens of the text (inside its window) is {text_nll:.2f} nats/token, "
        f"{text_nll / random_nll:.0%} of its NLL on random token ids ({random_nll:.2f}): it reads the text as noise. "
        "The tokenizer probably does not belong to this checkpoint (or the text is one the model cannot read at "
        "all), so the results will say nothing about LM-Infinite"
    )


def _mean_nll(model: nn.Module, ids: torch.Tensor, what: str) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[1:, None].to(device)).squeeze(-1).cpu()
    check_nll(nll, what)
    return float(nll.mean())


def text_warning(model: nn.Module, ids: torch.Tensor, n_local: int, max_tokens: int = SAMPLE) -> str | None:
    """`nll_warning` for the first `min(n_local, max_tokens)` ids of the 1D `ids` (BOS first, if any), scored by
    `model` as it is (call it on the unmodified model: inside the window every method is the unmodified model).
    Non-finite logits raise NonFiniteError here already, before the long run."""
    vocab = vocab_size(model)
    if vocab is None:
        return None
    ids = ids[: max(2, min(n_local, max_tokens, ids.numel()))].cpu()
    noise = torch.randint(0, vocab, ids.shape, generator=torch.Generator().manual_seed(0))
    noise[0] = ids[0]  # the same first token (BOS)
    text_nll = _mean_nll(model, ids, "vanilla (checking the start of the text)")
    random_nll = _mean_nll(model, noise, "vanilla (checking the model on random ids)")
    return nll_warning(text_nll, random_nll, int(ids.numel()) - 1)
