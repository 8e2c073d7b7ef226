"""Shared test helpers: tiny random models, token ids, logits, and the 'generation equals recomputation' check.

Imported by test modules as `from helpers import ...` (pytest puts tests/ on the path); fixtures live in
conftest.py.
"""

from __future__ import annotations

import torch
import transformers

import lminfinite
from lminfinite.compat import cache_keyword

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


def with_cache(model, cache) -> dict:
    """`cache` as the keyword argument the installed transformers takes: {"cache": cache} on 5.24,
    {"past_key_values": cache} on 5.19 (where `cache=` is ignored or dropped; lminfinite.compat)."""
    return {cache_keyword(model): cache}


def cache_of(output):
    """The cache a model output or a generate() result holds (`cache` on transformers 5.24, `past_key_values`
    on 5.19), or None."""
    return output.get("cache", output.get("past_key_values"))


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """Activation (gradient) checkpointing on: `activation_checkpointing_enable` on transformers 5.24, whose
    `gradient_checkpointing_enable` is its deprecated alias; 5.19 has only the latter."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        assert model.is_gradient_checkpointing


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

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(i) for i in token_ids if i > 2)


# ----------------------------------------------------------------------------------- the family matrix

COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,  # larger than the default 0.02: sharper attention, so position errors show
)
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.6],
    "long_factor": [2.0, 3.0, 5.0, 9.0],
    "original_max_position_embeddings": 32,
    "partial_rotary_factor": 0.5,
}
# GPT-J and CodeGen: interleaved rotary on 8 dims, a sin/cos table of 32 positions.
GPTJ_LIKE = dict(vocab_size=V, n_embd=64, n_head=4, rotary_dim=8, n_positions=32, initializer_range=0.1)
GPTJ_LIKE.update(bos_token_id=1, eos_token_id=2)


def _gemma3(layers, window=8, types=None):
    types = types or (["sliding_attention", "full_attention"] if layers == 2 else ["full_attention"])
    return transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=layers, head_dim=16, sliding_window=window, layer_types=types
    )


# family -> function(num_layers) -> config: one tiny config per supported family, each with the feature it
# adds. A 1-layer config has a global-branch layer (full attention, or a sliding window wider than the
# n_local the tests use) so the distance cap can be observed.
FAMILY_CONFIGS = {
    "llama": lambda n: transformers.LlamaConfig(**COMMON, num_hidden_layers=n),
    "mistral": lambda n: transformers.MistralConfig(**COMMON, num_hidden_layers=n, sliding_window=None),
    # Sliding window wider than the tests' n_local (16) but inside the context: cut to the Λ shape.
    "mistral_wide_window": lambda n: transformers.MistralConfig(**COMMON, num_hidden_layers=n, sliding_window=24),
    "qwen2": lambda n: transformers.Qwen2Config(**COMMON, num_hidden_layers=n),
    "qwen3": lambda n: transformers.Qwen3Config(**COMMON, num_hidden_layers=n, head_dim=16),
    "olmo2": lambda n: transformers.Olmo2Config(**COMMON, num_hidden_layers=n),
    "phi3": lambda n: transformers.Phi3Config(**COMMON, num_hidden_layers=n),
    "phi3_longrope": lambda n: transformers.Phi3Config(
        **{**COMMON, "max_position_embeddings": 128},
        num_hidden_layers=n,
        original_max_position_embeddings=32,
        rope_parameters=dict(PHI3_LONGROPE),
    ),
    "gemma2": lambda n: transformers.Gemma2Config(
        **COMMON,
        num_hidden_layers=n,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention"][-n:],
    ),
    "gemma3": _gemma3,
    # Sliding layers wider than n_local get the global branch, with their own (sliding) RoPE frequencies.
    "gemma3_wide_window": lambda n: _gemma3(n, window=24, types=["sliding_attention", "full_attention"][:n]),
    "gpt_neox": lambda n: transformers.GPTNeoXConfig(**COMMON, num_hidden_layers=n, rotary_pct=0.25),
    "stablelm": lambda n: transformers.StableLmConfig(**COMMON, num_hidden_layers=n),
    "phi": lambda n: transformers.PhiConfig(**COMMON, num_hidden_layers=n),
    "gptj": lambda n: transformers.GPTJConfig(**GPTJ_LIKE, n_layer=n),
    "codegen": lambda n: transformers.CodeGenConfig(**GPTJ_LIKE, n_layer=n),
    "cohere": lambda n: transformers.CohereConfig(**COMMON, num_hidden_layers=n, logit_scale=1.0),
    # Layer 0 with RoPE, layer 1 without (1 layer: the NoPE one).
    "smollm3": lambda n: transformers.SmolLM3Config(**COMMON, num_hidden_layers=n, no_rope_layers=[1, 0][-n:]),
    # ALiBi in the model's own attention code (MPT's bias table: `max_seq_len` columns)
    "mpt": lambda n, ctx=32: transformers.MptConfig(
        vocab_size=V, d_model=64, n_heads=4, n_layers=n, max_seq_len=ctx, initializer_range=0.1
    ),
    "bloom": lambda n: transformers.BloomConfig(
        vocab_size=V, hidden_size=64, n_head=4, n_layer=n, initializer_range=0.1
    ),
}
FAMILIES = list(FAMILY_CONFIGS)
ALIBI_FAMILIES = ("mpt", "bloom")
# Unmodified models that cannot run past their position table (the reason TableRope grows it, and what
# MPT's adapter removes).
TABLE_LIMITED = {"gptj", "codegen", "mpt"}


def family_model(family: str, layers: int = 2, seed: int = 0, **config_kwargs):
    """A tiny random model of `family` (eager attention for the RoPE families), float32, in eval mode."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family](layers, **config_kwargs)
    kwargs = {} if family in ALIBI_FAMILIES else {"attn_implementation": "eager"}
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).float().eval()


def with_mod(kw: dict) -> dict:
    """Kernel keyword arguments with `scaling`, `softcap` and `alibi` folded into the one `mod` the kernels take."""
    from lminfinite.kernels.score_mod import ScoreMod

    kw = dict(kw)
    mod = ScoreMod(kw.pop("scaling"), kw.pop("softcap", None), kw.pop("alibi", None))
    return {**kw, "mod": mod}
