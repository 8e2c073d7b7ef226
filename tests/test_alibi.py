"""ALiBi models (MPT, Bloom) through the narrow attention hook of `alibi.py`.

The same invariants as the RoPE families (test_families.py): (a) inputs of length <= n_local give
the unmodified model's logits; (b) every kernel equals the naive one beyond the window; (c) the
distance cap on a 1-layer model; (d) a cached stream and greedy generation equal recomputation.
Plus: MPT's bias table sized by `max_seq_len` no longer limits the input length.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_greedy_equals_naive_recomputation

import lminfinite
from lminfinite import LambdaCache
from lminfinite.alibi import ALIBI_NAME

V = 101
CONFIGS = {
    "mpt": lambda n, ctx=32: transformers.MptConfig(
        vocab_size=V, d_model=64, n_heads=4, n_layers=n, max_seq_len=ctx, initializer_range=0.1
    ),
    "bloom": lambda n, ctx=32: transformers.BloomConfig(
        vocab_size=V, hidden_size=64, n_head=4, n_layer=n, initializer_range=0.1
    ),
}
FAMILIES = list(CONFIGS)


def alibi_model(family: str, layers: int = 2, ctx: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family](layers, ctx)).float().eval()


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def _ids(n, seed, rows=1):
    return torch.randint(3, V, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_inputs_equal_unmodified_model(family):
    model = alibi_model(family)
    ids = _ids(32, 1, rows=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: ALiBi distances count real tokens
    ref, ref_padded = _logits(model, ids), _logits(model, ids, attention_mask=mask)
    lminfinite.enable(model, n_global=4, n_local=32)
    assert model.config._attn_implementation == ALIBI_NAME
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=0)
    padded = _logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(padded[0], ref_padded[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1, 5:], ref_padded[1, 5:], atol=1e-5, rtol=0)
    lminfinite.disable(model)
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in vars(m) for m in model.modules())  # the attention adapters are gone
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)


def test_mpt_default_window_is_max_seq_len():
    model = lminfinite.enable(alibi_model("mpt", ctx=48))
    assert model._lminfinite.config.n_local == 48


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_b_kernels_equal_naive_beyond_window(family, backend):
    G, L = 3, 16
    model = alibi_model(family)
    ids = _ids(6 * L, 4, rows=2)
    lminfinite.enable(model, n_global=G, n_local=L, backend="naive")
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=G, n_local=L, backend=backend, block_size=7)
    out = _logits(model, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("D", [None, 11])
def test_c_distance_cap_one_layer(family, D):
    G, L = 3, 16
    model = alibi_model(family, layers=1, ctx=128)
    start, end = _ids(G, 5), _ids(L, 6)
    short = torch.cat([start, _ids(20, 7), end], 1)
    long = torch.cat([start, _ids(45, 8), end], 1)
    assert (_logits(model, short)[0, -1] - _logits(model, long)[0, -1]).abs().max() > 1e-3
    lminfinite.enable(model, n_global=G, n_local=L, limit_distance=D)
    out_long = _logits(model, long)[0, -1]
    torch.testing.assert_close(_logits(model, short)[0, -1], out_long, atol=1e-5, rtol=0)
    # D matters: the starting tokens are seen through the bias of distance D.
    lminfinite.enable(model, n_global=G, n_local=L, limit_distance=(D or L) - 6)
    assert (_logits(model, long)[0, -1] - out_long).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_d_cached_stream_and_generation_equal_recomputation(family):
    G, L = 2, 8
    model = alibi_model(family)
    ids = _ids(5 * L, 6)
    lminfinite.enable(model, n_global=G, n_local=L, backend="naive")
    ref = _logits(model, ids)
    lminfinite.enable(model, n_global=G, n_local=L)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        outs = [model(input_ids=ids[:, : L + 3], cache=cache).logits]
        outs += [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(L + 3, ids.shape[1])]
    assert cache.layers[0].keys.shape[-2] == G + L - 1  # bounded: starting tokens + window
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-4, rtol=1e-4)

    assert_greedy_equals_naive_recomputation(model, ids[:, : L + 3], 4 * L, n_global=G, n_local=L)


def test_mpt_runs_past_its_bias_table():
    model = alibi_model("mpt", ctx=32)
    ids = _ids(100, 9)
    with pytest.raises(RuntimeError):
        _logits(model, ids)  # the unmodified model's ALiBi table has 32 columns
    lminfinite.enable(model, n_global=4)
    assert torch.isfinite(_logits(model, ids)).all()


def test_slopes_are_the_models_own():
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from lminfinite.families import family_of

    bloom = alibi_model("bloom")
    slopes = family_of(bloom).alibi.slopes(bloom.base_model)
    torch.testing.assert_close(slopes, _get_alibi_slopes(4, torch.device("cpu")))
    mpt = alibi_model("mpt")
    slopes = family_of(mpt).alibi.slopes(mpt.base_model)
    torch.testing.assert_close(slopes, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))


def test_falcon_alibi_refused():
    config = transformers.FalconConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, alibi=True, bos_token_id=1
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="ALiBi is supported for MPT and Bloom only"):
        lminfinite.enable(model, n_local=16)


def test_bloom_without_a_context_length_asks_for_n_local():
    with pytest.raises(ValueError, match="pass n_local"):
        lminfinite.enable(alibi_model("bloom"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    """Their blocks pass no per-forward argument: layers re-run in backward must still see their own
    forward's context (carried by the mask placeholder), not the latest forward's."""
    ids = _ids(40, 12, rows=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def grads(checkpointing):
        model = alibi_model(family).train()
        lminfinite.enable(model, n_global=2, n_local=8)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        model(input_ids=_ids(24, 13), use_cache=False)  # a later forward before backward
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(True), grads(False), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_own_sink_positions_change_alibi_distances(family):
    """The `sinks` baseline sees starting token j at distance min(D, i) - j (test_spec.py checks the
    values); here: it reaches ALiBi models, and stays the unmodified model inside the window."""
    model = alibi_model(family, layers=1)
    ids = _ids(60, 14)
    lminfinite.enable(model, n_global=3, n_local=16, limit_distance=15)
    zero = _logits(model, ids)
    lminfinite.enable(model, n_global=3, n_local=16, limit_distance=15, sink_positions="own")
    own = _logits(model, ids)
    assert (own[0, 20:] - zero[0, 20:]).abs().max() > 1e-3
    torch.testing.assert_close(own[0, :16], zero[0, :16], atol=1e-6, rtol=0)


def test_an_enabled_model_is_not_kept_alive():
    """The ALiBi mask function finds a model's state through a weak registry: dropping the model frees it."""
    import gc
    import weakref

    from lminfinite.alibi import _STATES

    model = lminfinite.enable(alibi_model("mpt"), n_global=2, n_local=16)
    alive, key = weakref.ref(model), id(model.config)
    assert _STATES[key] is model._lminfinite
    del model
    gc.collect()
    assert alive() is None and key not in _STATES
