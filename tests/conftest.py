"""Shared fixtures: the real assets (stories260K); helpers for tests are in helpers.py.

Tests run torch on one thread unless LMINFINITE_TEST_THREADS says otherwise: their tensors are tiny, and
on a busy 2-core machine a second thread's spin-waits made a 3-row decode step 100x slower.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from lminfinite.models.assets import asset

torch.set_num_threads(int(os.environ.get("LMINFINITE_TEST_THREADS", "1")))


def tiny_config(family: str, **overrides):
    """A small config of `family` with GQA (8 query heads, 2 kv heads) and a 32-token context."""
    common = dict(
        vocab_size=101,
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
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def assert_greedy_equals_naive_recomputation(model, prompt: torch.Tensor, max_new_tokens: int, **settings) -> None:
    """Greedy `generate()` of the enabled model (its LambdaCache) picks, at every step, the token that
    the naive kernel picks when it recomputes the whole history without a cache."""
    import lminfinite

    gen = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    lminfinite.enable(model, backend="naive", **settings)
    with torch.no_grad():
        logits = model(input_ids=gen[:, :-1], use_cache=False).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), gen[:, prompt.shape[1] :])


@pytest.fixture(scope="session")
def stories_path():
    path = asset("models", "stories260K", "stories260K.bin")
    if not path.exists():
        pytest.skip(f"stories260K not found at {path} (set LMINFINITE_ASSETS)")
    return path


@pytest.fixture(scope="session")
def stories(stories_path):
    from lminfinite.models.llama2c import load_llama2c

    return load_llama2c(stories_path)
