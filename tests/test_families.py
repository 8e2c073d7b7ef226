"""enable() on every relative-position family transformers 5.x routes through its AttentionInterface.

Tiny random configs, one per family, each with the feature that family adds: its own sliding window
(Mistral, Gemma2/3), logit softcapping (Gemma2), mixed sliding/global layers with per-type RoPE
(Gemma3), partial rotary (GPT-NeoX, StableLM, Phi, Phi-3), LongRoPE (Phi-3), interleaved rotary
from a sin/cos table sized by `n_positions` (GPT-J, CodeGen), interleaved `inv_freq` (Cohere), layers
without RoPE (SmolLM3). Invariants, per family:

(a) inputs of length <= n_local: the same logits as the unmodified model;
(b) beyond n_local: the chunked kernel equals the naive one;
(c) the distance cap (1-layer model): the last position's logits depend only on the starting tokens
    and the last n_local tokens, and equal the unmodified model's on just those tokens placed so that
    the starting tokens sit at distance D;
(d) a cached stream (token by token through the LambdaCache, past its re-basing) and greedy
    `generate()` equal recomputation on the full history with the naive kernel.

Families LM-Infinite cannot be applied to are refused with the reason. ALiBi models: test_alibi.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_greedy_equals_naive_recomputation

import lminfinite
from lminfinite import LambdaCache
from lminfinite.config import pretraining_length
from lminfinite.families import family_of, rope_of
from lminfinite.positions import TableRope, layer_rope, layer_window

V = 101
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


def _gemma3(layers, window=8, types=None):
    types = types or (["sliding_attention", "full_attention"] if layers == 2 else ["full_attention"])
    return transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=layers, head_dim=16, sliding_window=window, layer_types=types
    )


# family -> function(num_layers) -> config. A 1-layer config has a global-branch layer (full attention,
# or a sliding window wider than the n_local the tests use) so the distance cap can be observed.
# GPT-J and CodeGen: interleaved rotary on 8 dims, a sin/cos table of 32 positions.
GPTJ_LIKE = dict(
    vocab_size=V,
    n_embd=64,
    n_head=4,
    rotary_dim=8,
    n_positions=32,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)
CONFIGS = {
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
}
FAMILIES = list(CONFIGS)
# Unmodified models that cannot run past their sin/cos table (the reason TableRope grows it).
TABLE_LIMITED = {"gptj", "codegen"}


def family_model(family: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family](layers)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def _rope(model):
    return rope_of(model.base_model, family_of(model))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def _ids(n, seed):
    return torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- what is found


@pytest.mark.parametrize(
    "family,style,rotated",
    [
        ("mistral", "half", 16),
        ("gpt_neox", "half", 4),  # rotary_pct 0.25 of a 16-dim head
        ("stablelm", "half", 4),
        ("phi", "half", 8),
        ("phi3_longrope", "half", 8),
        ("gptj", "interleaved", 8),  # rotary_dim
        ("codegen", "interleaved", 8),
        ("cohere", "interleaved", 16),
        ("gemma3", "half", 16),
    ],
)
def test_find_rope_style_and_rotated_width(family, style, rotated):
    rope = _rope(family_model(family))
    assert rope.style == style and 2 * rope.inv_freq.numel() == rotated


def test_gemma3_global_branch_uses_full_attention_frequencies():
    model = family_model("gemma3")
    rope = _rope(model)
    torch.testing.assert_close(rope.inv_freq, model.base_model.rotary_emb.full_attention_inv_freq)
    assert not torch.allclose(rope.inv_freq, model.base_model.rotary_emb.sliding_attention_inv_freq)


def test_gemma3_each_layer_type_gets_its_own_frequencies():
    model = family_model("gemma3_wide_window")
    rotary, rope = model.base_model.rotary_emb, _rope(model)
    sliding, full = (layer.self_attn for layer in model.base_model.layers)
    torch.testing.assert_close(layer_rope(rope, sliding).inv_freq, rotary.sliding_attention_inv_freq)
    torch.testing.assert_close(layer_rope(rope, full).inv_freq, rotary.full_attention_inv_freq)
    assert layer_rope(rope, full) == rope != layer_rope(rope, sliding)


def test_nope_layers_have_no_rope():
    model = family_model("smollm3")
    rope = _rope(model)
    with_rope, without = (layer.self_attn for layer in model.base_model.layers)
    assert layer_rope(rope, with_rope) is rope and layer_rope(rope, without) is None


def test_table_rope_frequencies_match_the_table():
    model = family_model("gptj")
    rope = _rope(model)
    assert isinstance(rope, TableRope)
    cos, sin = rope.cos_sin(torch.arange(32)[None])
    table = model.base_model.rotary_emb.embed_positions  # (sin | cos) per position
    torch.testing.assert_close(torch.cat([sin[0, 0], cos[0, 0]], -1), table, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,expected", [("phi3", 32), ("phi3_longrope", 32), ("gptj", 32), ("mistral", 32)])
def test_pretraining_length(family, expected):
    assert pretraining_length(family_model(family).config) == expected


def test_layer_window_rule():
    assert layer_window(16, None) == (16, True)
    assert layer_window(16, 24) == (16, True)  # wider than the Λ window: cut to it
    assert layer_window(16, 16) == (16, False)
    assert layer_window(16, 8) == (8, False)  # the model's own window, no starting tokens


# --------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_inputs_equal_unmodified_model(family):
    """Default n_local (the pretraining length, 32): the model's own sliding windows (8 or 12 < 32),
    softcapping, partial/interleaved rotary and NoPE layers are all kept."""
    model = family_model(family)
    ids = torch.cat([_ids(32, 1), _ids(32, 2)])
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=4)
    assert model._lminfinite.config.n_local == 32
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=0)
    lminfinite.disable(model)
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)


def test_a_model_sliding_window_is_honoured():
    """Mistral with a window of 12 < n_local: the model never saw keys 12 tokens back, so it stays exactly
    itself at any length (no starting tokens are added)."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=12)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = _ids(80, 3)
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=4, n_local=16)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- (b)


@pytest.mark.parametrize("family", FAMILIES)
def test_b_torch_kernel_equals_naive_beyond_window(family):
    G, L = 3, 16
    model = family_model(family)
    ids = _ids(6 * L, 4)
    lminfinite.enable(model, n_global=G, n_local=L, backend="naive")
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=G, n_local=L, backend="torch", block_size=7)
    out = _logits(model, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- (c)


def _start_middle_end(G, L, middle, seed=5):
    start, end = _ids(G, seed), _ids(L, seed + 1)
    return torch.cat([start, _ids(middle, seed + 2 + middle), end], 1), start, end


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("D", [None, 11])
def test_c_distance_cap_one_layer(family, D):
    G, L = 3, 16
    model = family_model(family, layers=1)
    if family in TABLE_LIMITED:
        model.base_model.rotary_emb.max_positions = 128  # let the unmodified model run at 64 tokens
        table = transformers.models.gptj.modeling_gptj.create_sinusoidal_positions(128, 8)
        model.base_model.rotary_emb.embed_positions = table
    short, start, end = _start_middle_end(G, L, 20)
    long, _, _ = _start_middle_end(G, L, 45)
    plain_short, plain_long = _logits(model, short)[0, -1], _logits(model, long)[0, -1]
    assert (plain_short - plain_long).abs().max() > 1e-3  # the unmodified model sees the middle
    # The reference: the unmodified model on start + end only, all starting tokens at one position `p0`
    # and the end at p0 + D - L + 1 .. p0 + D, so the last query sees them at distance D and the end at its
    # own distances (p0 keeps positions >= 0 when D < L: a sin/cos table cannot take negative ones).
    dist = L if D is None else D
    p0 = L - dist
    positions = torch.cat([torch.full((G,), p0), torch.arange(p0 + dist - L + 1, p0 + dist + 1)])[None]
    # An explicit attention_mask: with position_ids alone, transformers would read packed sequences.
    mask = torch.ones(1, G + L, dtype=torch.long)
    ref = _logits(model, torch.cat([start, end], 1), position_ids=positions, attention_mask=mask)[0, -1]

    lminfinite.enable(model, n_global=G, n_local=L, limit_distance=D)
    out_short, out_long = _logits(model, short)[0, -1], _logits(model, long)[0, -1]
    torch.testing.assert_close(out_short, out_long, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_long, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------- (d)


def _stream_logits(model, ids, prompt):
    """Prefill `prompt` tokens into a LambdaCache, then feed the rest one token at a time."""
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        outs = [model(input_ids=ids[:, :prompt], cache=cache).logits]
        for t in range(prompt, ids.shape[1]):
            outs.append(model(input_ids=ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_d_cached_stream_and_generation_equal_recomputation(family):
    G, L = 2, 8
    model = family_model(family)
    ids = _ids(5 * L, 6)  # 40 tokens: past the re-basing at 2 * L
    lminfinite.enable(model, n_global=G, n_local=L, backend="naive")
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=G, n_local=L)
    out, cache = _stream_logits(model, ids, prompt=L + 3)
    assert cache.base > 0  # positions were re-based: keys rotated back in the cache
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    assert_greedy_equals_naive_recomputation(model, ids[:, : L + 3], 4 * L, n_global=G, n_local=L)


def test_gptj_runs_far_beyond_its_sin_cos_table():
    model = family_model("gptj")
    assert model.base_model.rotary_emb.embed_positions.shape[0] == 32
    lminfinite.enable(model, n_global=2, n_local=16)
    out = _logits(model, _ids(200, 9))
    assert torch.isfinite(out).all()
    lminfinite.disable(model)
    torch.testing.assert_close(_logits(model, _ids(32, 9)), _logits(family_model("gptj"), _ids(32, 9)))


def test_longrope_stays_on_short_factors_and_disable_restores():
    model = family_model("phi3_longrope")
    rotary = model.base_model.rotary_emb
    lminfinite.enable(model, n_global=2, n_local=32)
    _logits(model, _ids(100, 10))
    torch.testing.assert_close(rotary.inv_freq, rotary.original_inv_freq)
    lminfinite.disable(model)
    _logits(model, _ids(100, 10))  # the unmodified model switches to the long factors past 32
    assert not torch.allclose(rotary.inv_freq, rotary.original_inv_freq)


# --------------------------------------------------------------------------------------- refused


def _refused(config, match):
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=match):
        lminfinite.enable(model, n_local=16)


@pytest.mark.parametrize(
    "config",
    [
        transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2),
        transformers.OPTConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=32
        ),
        transformers.GPTNeoConfig(
            vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]]
        ),
        transformers.BertConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        ),
        transformers.BioGptConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
    ],
    ids=["gpt2", "opt", "gpt_neo", "bert", "biogpt"],
)
def test_absolute_position_models_refused(config):
    _refused(config, "absolute position embeddings")


def test_rotary_model_with_own_attention_code_refused():
    """Falcon with RoPE sets `_supports_sdpa` but computes attention itself: enabling would do nothing."""
    config = transformers.FalconConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, alibi=False, bos_token_id=1
    )
    _refused(config, "does not route attention through transformers' AttentionInterface")


def test_model_without_attention_refused():
    config = transformers.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, state_size=4)
    _refused(config, "does not route attention")


@pytest.mark.parametrize(
    "config",
    [
        transformers.GptOssConfig(**COMMON, num_hidden_layers=1, num_local_experts=2, num_experts_per_tok=1),
        transformers.DeepseekV3Config(**COMMON, num_hidden_layers=1, n_routed_experts=2, num_experts_per_tok=1),
        transformers.Cohere2Config(**COMMON, num_hidden_layers=2, sliding_window=8),
    ],
    ids=["gpt_oss", "deepseek_v3", "cohere2"],
)
def test_known_incompatible_rotary_models_refused(config):
    _refused(config, "is not supported yet")


# --------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("family", FAMILIES)
def test_e_top_k_cached_stream_equals_recomputation(family):
    """The top-k extension's middle keys are brought back to position 0 with each family's own rotary
    (partial, interleaved, per layer type, none): a cached stream past re-basing equals the naive kernel."""
    G, L = 2, 8
    model = family_model(family)
    ids = _ids(6 * L, 11)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=3, backend="naive")
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=3)
    out, cache = _stream_logits(model, ids, prompt=2 * L + 3)
    assert cache.base > 0 and cache.layers[0].keys.shape[-2] == ids.shape[1]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    lminfinite.enable(model, n_global=G, n_local=L)
    assert (_logits(model, ids) - ref).abs().max() > 1e-3  # the middle keys were attended


# --------------------------------------------------------------------------------------- the table


def test_every_supported_family_of_the_table_has_a_test_config():
    """Adding a family is an entry in families.FAMILIES and a config in a test matrix (here, or the ALiBi
    one in test_alibi.py, or the Llama of tests/helpers.py)."""
    from test_alibi import CONFIGS as ALIBI_CONFIGS

    from lminfinite.families import FAMILIES

    tested = {make(1).model_type for make in [*CONFIGS.values(), *ALIBI_CONFIGS.values()]} | {"llama"}
    supported = {name for name, family in FAMILIES.items() if family.positions in ("rope", "alibi")}
    assert supported <= tested, f"families without a test config: {sorted(supported - tested)}"
    assert {name for name, family in FAMILIES.items() if family.interleaved} == {"gptj", "codegen", "cohere"}


def test_a_model_type_not_in_the_table_is_tried_by_looking():
    """StarCoder2 is not in the table: its attention modules route through the AttentionInterface and it
    has a rotary embedding, so the fallback accepts it, and the chunked kernel equals the naive one."""
    from lminfinite.families import FAMILIES

    config = transformers.Starcoder2Config(**COMMON, num_hidden_layers=2)
    assert config.model_type not in FAMILIES
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = _ids(80, 12)
    lminfinite.enable(model, n_global=2, n_local=16, backend="naive")
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=2, n_local=16)
    assert model._lminfinite.layer_ropes[0].style == "half"
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    lminfinite.disable(model)
    assert (_logits(model, ids) - ref).abs().max() > 1e-3


def test_a_family_entry_must_be_consistent():
    from lminfinite.families import Family

    with pytest.raises(ValueError, match="adapter"):
        Family("alibi")
    with pytest.raises(ValueError, match="reason"):
        Family("refused")
    with pytest.raises(ValueError, match="positions kind"):
        Family("nope")
