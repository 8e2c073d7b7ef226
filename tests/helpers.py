"""Shared test helpers: tiny random models, token ids, logits, and the 'generation equals recomputation' check.

Imported by test modules as `from helpers import ...` (pytest puts tests/ on the path); fixtures live in
conftest.py.
"""

from __future__ import annotations

import torch
import transformers

import lminfinite

V = 101  # vocabulary of every tiny model


def tiny_config(family: str, **overrides):
    """A small config of `family` with GQA (8 query heads, 2 kv heads) and a 32-token context."""
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    if family == "qwen3":
        common.setdefault("head_dim", 8)
    if family == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random model of `family` (SDPA attention), in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def ids(n: int, seed: int = 0, rows: int = 1) -> torch.Tensor:
    """(rows, n) random token ids in [3, V)."""
    return torch.randint(3, V, (rows, n), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random rows of the given lengths: (ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    batch = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        batch[b, T - n :] = torch.randint(3, V, (n,), generator=g)
        mask[b, T - n :] = 1
    return batch, mask


def logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of one forward without a cache and without autograd."""
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits


def assert_greedy_equals_naive_recomputation(model, prompt: torch.Tensor, max_new_tokens: int, **settings) -> None:
    """Greedy `generate()` of the enabled model (its LambdaCache) picks, at every step, the token that
    the naive kernel picks when it recomputes the whole history without a cache."""
    gen = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    lminfinite.enable(model, backend="naive", **settings)
    out = logits(model, gen[:, :-1])
    assert torch.equal(out[:, prompt.shape[1] - 1 :].argmax(-1), gen[:, prompt.shape[1] :])


class CharTokenizer:
    """The smallest tokenizer `lminfinite.stream` needs: one id per character, BOS 1, EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 90 for c in text]

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in token_ids if i > 2)
