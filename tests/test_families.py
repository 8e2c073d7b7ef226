"""The family matrix: every supported family, RoPE and ALiBi, through the same invariants; and the refusals.

Tiny random configs (tests/helpers.py, one per family in families.FAMILIES), each with the feature that
family adds: its own sliding window (Mistral, Gemma2/3), logit softcapping (Gemma2), mixed sliding/global
layers with per-type RoPE (Gemma3), partial rotary (GPT-NeoX, StableLM, Phi, Phi-3), LongRoPE (Phi-3),
interleaved rotary from a sin/cos table sized by `n_positions` (GPT-J, CodeGen), interleaved `inv_freq`
(Cohere), layers without RoPE (SmolLM3), ALiBi in the model's own attention code (MPT, Bloom).
Invariants, per family:

(a) inputs of length <= n_local: the same logits as the unmodified model (and disable() restores it);
(b) beyond n_local: the chunked kernel equals the naive one (for several G, L, D), and differs from the
    unmodified model;
(c) the distance cap (1-layer model): the last position's logits depend only on the starting tokens and
    the last n_local tokens; with RoPE they equal the unmodified model's on just those tokens placed so
    that the starting tokens sit at distance D; D changes them;
(d) a cached stream (token by token through the LambdaCache, past its re-basing) and greedy
    `generate()` equal recomputation on the full history with the naive kernel; the cache stays bounded;
(e) the top-k extension's cached stream equals recomputation (middle keys brought back to position 0
    with each family's own rotary), and the middle keys change the result.

Families LM-Infinite cannot be applied to are refused with the reason. Family-specific behaviour:
test_alibi.py (ALiBi adapters), test_models.py (Llama: RoPE scaling, dtypes, training).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import (
    ALIBI_FAMILIES,
    COMMON,
    FAMILIES,
    FAMILY_CONFIGS,
    TABLE_LIMITED,
    V,
    assert_greedy_equals_naive_recomputation,
    family_model,
    ids,
    logits,
    with_cache,
)

import lminfinite
from lminfinite import LambdaCache, compat
from lminfinite.config import pretraining_length
from lminfinite.families import FAMILIES as TABLE
from lminfinite.families import Family, family_of, rope_of
from lminfinite.positions import TableRope, layer_rope, layer_window

# The quick run (`pytest -m "not slow"`) takes the costlier invariants on a few representatives (plain RoPE,
# per-layer-type RoPE, an interleaved sin/cos table, ALiBi); CI runs every family.
QUICK = {"llama", "gemma3", "gptj", "mpt"}
MATRIX = [pytest.param(f, marks=() if f in QUICK else pytest.mark.slow) for f in FAMILIES]


def _rope(model):
    return rope_of(model.base_model, family_of(model))


def _enable(model, family, **settings):
    """enable() with the tests' settings; Bloom configs carry no context length, so n_local defaults to 32."""
    if family == "bloom":
        settings.setdefault("n_local", 32)
    return lminfinite.enable(model, **settings)


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


def _tables(model) -> list[torch.nn.Module]:
    """The modules holding GPT-J's (CodeGen's) sin/cos table: its rotary module on transformers 5.24, each
    attention module on 5.19."""
    return [m for m in model.modules() if isinstance(getattr(m, "embed_positions", None), torch.Tensor)]


def test_table_rope_frequencies_match_the_table():
    model = family_model("gptj")
    rope = _rope(model)
    assert isinstance(rope, TableRope)
    cos, sin = rope.cos_sin(torch.arange(32)[None])
    assert _tables(model)
    for module in _tables(model):
        table = module.embed_positions  # (sin | cos) per position
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
    softcapping, partial/interleaved rotary, NoPE layers and ALiBi biases are all kept."""
    model = family_model(family)
    x = torch.cat([ids(32, 1), ids(32, 2)])
    ref = logits(model, x)
    _enable(model, family, n_global=4)
    assert lminfinite.is_enabled(model) and model._lminfinite.config.n_local == 32
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    lminfinite.disable(model)
    assert not lminfinite.is_enabled(model)
    torch.testing.assert_close(logits(model, x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ALIBI_FAMILIES])
def test_the_plan_reaches_attention_by_the_route_the_table_says(family, monkeypatch):
    """Each forward's plan reaches attention as a keyword argument, except for families whose decoder layers
    drop keyword arguments (the table's `drops_kwargs`, e.g. StableLM): there, as the mask. A wrong table
    entry fails here (the plan would not arrive, or a family would take the exception without need)."""
    from transformers import AttentionInterface

    from lminfinite import attention

    model = family_model(family)
    _enable(model, family, n_global=4, n_local=8)
    routes = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        routes.append((attention.PLAN_KWARG in kwargs, isinstance(attention_mask, attention.PlanMask)))
        return attention.lambda_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    for name in (attention.NAME, attention.NAME_VIA_MASK):
        monkeypatch.setitem(AttentionInterface._global_mapping, name, spy)
    logits(model, ids(20, 1))
    lminfinite.disable(model)
    drops = family_of(model).drops_kwargs  # the table's entry, as the installed transformers needs it (compat.py)
    assert drops == (TABLE[model.config.model_type].drops_kwargs or compat.computes_own_attention(model))
    assert routes and set(routes) == {(False, True) if drops else (True, False)}


def test_a_model_sliding_window_is_honoured():
    """Mistral with a window of 12 < n_local: the model never saw keys 12 tokens back, so it stays exactly
    itself at any length (no starting tokens are added)."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=12)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    x = ids(80, 3)
    ref = logits(model, x)
    lminfinite.enable(model, n_global=4, n_local=16)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- (b)


@pytest.mark.parametrize("family", MATRIX)
@pytest.mark.parametrize("G,L,D", [(3, 16, None), (0, 20, None), (3, 13, 9)])
def test_b_torch_kernel_equals_naive_beyond_window(family, G, L, D):
    model = family_model(family)
    x = ids(6 * L, 4, rows=2)
    lminfinite.enable(model, n_global=G, n_local=L, limit_distance=D, backend="naive")
    ref = logits(model, x)
    lminfinite.enable(model, n_global=G, n_local=L, limit_distance=D, backend="torch", block_size=7)
    out = logits(model, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if family not in TABLE_LIMITED:  # (those cannot run unmodified past their position table)
        lminfinite.disable(model)
        assert (logits(model, x) - ref).abs().max() > 1e-3  # the unmodified model differs beyond L


@pytest.mark.parametrize("family", ["llama", *ALIBI_FAMILIES])
@pytest.mark.parametrize("padded", [False, True])
def test_b_flex_kernel_equals_naive_beyond_window(family, padded):
    model = family_model(family)
    x = ids(100, 5, rows=2)
    mask = torch.ones_like(x)
    if padded:
        mask[1, :37] = 0
    lminfinite.enable(model, n_global=3, n_local=16, backend="naive")
    ref = logits(model, x, attention_mask=mask)
    lminfinite.enable(model, n_global=3, n_local=16, backend="flex", block_size=7)
    out = logits(model, x, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- (c)


def _start_middle_end(G, L, middle, seed=5):
    start, end = ids(G, seed), ids(L, seed + 1)
    return torch.cat([start, ids(middle, seed + 2 + middle), end], 1), start, end


@pytest.mark.parametrize("family", MATRIX)
@pytest.mark.parametrize("D", [None, 11])
def test_c_distance_cap_one_layer(family, D):
    G, L = 3, 16
    model = family_model(family, layers=1, **({"ctx": 128} if family == "mpt" else {}))
    if family in ("gptj", "codegen"):
        table = transformers.models.gptj.modeling_gptj.create_sinusoidal_positions(128, 8)
        for module in _tables(model):  # let the unmodified model run at 64 tokens
            module.max_positions, module.embed_positions = 128, table
    short, start, end = _start_middle_end(G, L, 20)
    long, _, _ = _start_middle_end(G, L, 45)
    plain_short, plain_long = logits(model, short)[0, -1], logits(model, long)[0, -1]
    assert (plain_short - plain_long).abs().max() > 1e-3  # the unmodified model sees the middle

    lminfinite.enable(model, n_global=G, n_local=L, limit_distance=D)
    out_short, out_long = logits(model, short)[0, -1], logits(model, long)[0, -1]
    torch.testing.assert_close(out_short, out_long, atol=1e-4, rtol=0)
    if family not in ALIBI_FAMILIES:
        # The reference: the unmodified model on start + end only, all starting tokens at one position `p0`
        # and the end at p0 + D - L + 1 .. p0 + D, so the last query sees them at distance D and the end at
        # its own distances (p0 keeps positions >= 0 when D < L: a sin/cos table cannot take negative ones).
        dist = L if D is None else D
        p0 = L - dist
        positions = torch.cat([torch.full((G,), p0), torch.arange(p0 + dist - L + 1, p0 + dist + 1)])[None]
        # An explicit attention_mask: with position_ids alone, transformers would read packed sequences.
        mask = torch.ones(1, G + L, dtype=torch.long)
        lminfinite.disable(model)
        ref = logits(model, torch.cat([start, end], 1), position_ids=positions, attention_mask=mask)[0, -1]
        torch.testing.assert_close(out_long, ref, atol=1e-4, rtol=0)
    if family != "smollm3":  # (its 1-layer config is the NoPE layer: no distance to cap)
        # D matters: the starting tokens are seen at distance D.
        lminfinite.enable(model, n_global=G, n_local=L, limit_distance=(D or L) - 6)
        assert (logits(model, long)[0, -1] - out_long).abs().max() > 1e-4


# --------------------------------------------------------------------------------------- (d)


def _stream_logits(model, x, prompt):
    """Prefill `prompt` tokens into a LambdaCache, then feed the rest one token at a time."""
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        outs = [model(input_ids=x[:, :prompt], **with_cache(model, cache)).logits]
        for t in range(prompt, x.shape[1]):
            outs.append(model(input_ids=x[:, t : t + 1], **with_cache(model, cache)).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("family", MATRIX)
def test_d_cached_stream_and_generation_equal_recomputation(family):
    G, L = 2, 8
    model = family_model(family)
    x = ids(5 * L, 6)  # 40 tokens: past the re-basing at 2 * L
    _enable(model, family, n_global=G, n_local=L, backend="naive")
    ref = logits(model, x)
    _enable(model, family, n_global=G, n_local=L)
    out, cache = _stream_logits(model, x, prompt=L + 3)
    assert cache.layers[0].keys.shape[-2] == G + L - 1  # bounded: starting tokens + window
    if family not in ALIBI_FAMILIES:
        assert cache.base > 0  # positions were re-based: keys rotated back in the cache
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    assert_greedy_equals_naive_recomputation(model, x[:, : L + 3], 4 * L, n_global=G, n_local=L)


# --------------------------------------------------------------------------------------- (e)


@pytest.mark.parametrize("family", MATRIX)
def test_e_top_k_cached_stream_equals_recomputation(family):
    """The top-k extension's middle keys are brought back to position 0 with each family's own rotary
    (partial, interleaved, per layer type, none): a cached stream past re-basing equals the naive kernel."""
    G, L = 2, 8
    model = family_model(family)
    x = ids(6 * L, 11)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=3, backend="naive")
    ref = logits(model, x)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=3)
    out, cache = _stream_logits(model, x, prompt=2 * L + 3)
    assert cache.layers[0].keys.shape[-2] == x.shape[1]  # the middle is kept
    if family not in ALIBI_FAMILIES:
        assert cache.base > 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    lminfinite.enable(model, n_global=G, n_local=L)
    assert (logits(model, x) - ref).abs().max() > 1e-3  # the middle keys were attended


# --------------------------------------------------------------------------------------- family specifics


def test_gptj_runs_far_beyond_its_sin_cos_table():
    model = family_model("gptj")
    assert _tables(model) and all(m.embed_positions.shape[0] == 32 for m in _tables(model))
    lminfinite.enable(model, n_global=2, n_local=16)
    out = logits(model, ids(200, 9))
    assert torch.isfinite(out).all()
    lminfinite.disable(model)
    torch.testing.assert_close(logits(model, ids(32, 9)), logits(family_model("gptj"), ids(32, 9)))


def test_longrope_stays_on_short_factors_and_disable_restores():
    model = family_model("phi3_longrope")
    rotary = model.base_model.rotary_emb
    lminfinite.enable(model, n_global=2, n_local=32)
    logits(model, ids(100, 10))
    torch.testing.assert_close(rotary.inv_freq, rotary.original_inv_freq)
    lminfinite.disable(model)
    logits(model, ids(100, 10))  # the unmodified model switches to the long factors past 32
    assert not torch.allclose(rotary.inv_freq, rotary.original_inv_freq)


# --------------------------------------------------------------------------------------- refused

ABSOLUTE = "absolute position embeddings; LM-Infinite needs a model with relative positions"
REFUSED = {
    "gpt2": (transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2), ABSOLUTE),
    "opt": (
        transformers.OPTConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=32
        ),
        ABSOLUTE,
    ),
    "gpt_neo": (
        transformers.GPTNeoConfig(
            vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]]
        ),
        ABSOLUTE,
    ),
    "bert": (
        transformers.BertConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        ),
        ABSOLUTE,
    ),
    "biogpt": (
        transformers.BioGptConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
        ABSOLUTE,
    ),
    # Falcon with RoPE sets `_supports_sdpa` but computes attention itself: enabling would do nothing.
    "falcon_rope": (
        transformers.FalconConfig(
            vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, alibi=False, bos_token_id=1
        ),
        "does not route attention through transformers' AttentionInterface",
    ),
    "falcon_alibi": (
        transformers.FalconConfig(
            vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, alibi=True, bos_token_id=1
        ),
        "ALiBi is supported for MPT and Bloom only",
    ),
    "mamba": (
        transformers.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, state_size=4),
        "does not route attention",
    ),
    "gpt_oss": (
        transformers.GptOssConfig(**COMMON, num_hidden_layers=1, num_local_experts=2, num_experts_per_tok=1),
        "is not supported yet",
    ),
    "deepseek_v3": (
        transformers.DeepseekV3Config(**COMMON, num_hidden_layers=1, n_routed_experts=2, num_experts_per_tok=1),
        "is not supported yet",
    ),
    "cohere2": (transformers.Cohere2Config(**COMMON, num_hidden_layers=2, sliding_window=8), "is not supported yet"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_the_reason(name):
    config, match = REFUSED[name]
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=match):
        lminfinite.enable(model, n_local=16)
    assert not lminfinite.is_enabled(model)


# --------------------------------------------------------------------------------------- the table


def test_every_supported_family_of_the_table_is_in_the_matrix():
    """Adding a family is an entry in families.FAMILIES and a config in helpers.FAMILY_CONFIGS."""
    tested = {make(1).model_type for make in FAMILY_CONFIGS.values()}
    supported = {name for name, family in TABLE.items() if family.positions in ("rope", "alibi")}
    assert supported <= tested, f"families without a test config: {sorted(supported - tested)}"
    assert {name for name, family in TABLE.items() if family.interleaved} == {"gptj", "codegen", "cohere"}
    refused = {config.model_type for config, _ in REFUSED.values()} - {"mamba"}
    assert refused <= set(TABLE)


def test_a_model_type_not_in_the_table_is_tried_by_looking():
    """StarCoder2 is not in the table: its attention modules route through the AttentionInterface and it
    has a rotary embedding, so the fallback accepts it, and the chunked kernel equals the naive one."""
    config = transformers.Starcoder2Config(**COMMON, num_hidden_layers=2)
    assert config.model_type not in TABLE
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = ids(80, 12)
    lminfinite.enable(model, n_global=2, n_local=16, backend="naive")
    ref = logits(model, x)
    lminfinite.enable(model, n_global=2, n_local=16)
    assert model._lminfinite.layers[0].rope.style == "half"
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-5)
    lminfinite.disable(model)
    assert (logits(model, x) - ref).abs().max() > 1e-3


def test_a_family_entry_must_be_consistent():
    with pytest.raises(ValueError, match="adapter"):
        Family("alibi")
    with pytest.raises(ValueError, match="reason"):
        Family("refused")
    with pytest.raises(ValueError, match="positions kind"):
        Family("nope")
