"""ALiBi models (MPT, Bloom) through the narrow attention adapters of `alibi.py`.

The invariants every family meets (same as the unmodified model for n <= L, chunked == naive, the distance
cap, cached == recomputed, top-k) run on MPT and Bloom in the family matrix (test_families.py). Here, what
is particular to ALiBi: left-padded rows count distances in real tokens, the adapters come off with
disable(), MPT's bias table sized by `max_seq_len` no longer limits the input, the slopes are the model's
own, gradient checkpointing sees each forward's own plan (carried on the mask placeholder), the `sinks`
baseline's distances, and the state registry does not keep a model alive.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ALIBI_FAMILIES, enable_checkpointing, family_model, ids, logits

import lminfinite
from lminfinite.attention import NAME_VIA_MASK

FAMILIES = list(ALIBI_FAMILIES)


def alibi_model(family: str, layers: int = 2, ctx: int = 32, seed: int = 0):
    return family_model(family, layers, seed, **({"ctx": ctx} if family == "mpt" else {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_count_real_tokens_and_disable_removes_the_adapters(family):
    model = alibi_model(family)
    x = ids(32, 1, rows=2)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # a left-padded row: ALiBi distances count real tokens
    ref, ref_padded = logits(model, x), logits(model, x, attention_mask=mask)
    lminfinite.enable(model, n_global=4, n_local=32)
    assert model.config._attn_implementation == NAME_VIA_MASK
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    padded = logits(model, x, attention_mask=mask)
    torch.testing.assert_close(padded[0], ref_padded[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1, 5:], ref_padded[1, 5:], atol=1e-5, rtol=0)
    lminfinite.disable(model)
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in vars(m) for m in model.modules())  # the attention adapters are gone
    torch.testing.assert_close(logits(model, x), ref, atol=0, rtol=0)


def test_mpt_default_window_is_max_seq_len():
    model = lminfinite.enable(alibi_model("mpt", ctx=48))
    assert model._lminfinite.config.n_local == 48


def test_mpt_runs_past_its_bias_table():
    model = alibi_model("mpt", ctx=32)
    x = ids(100, 9)
    with pytest.raises(RuntimeError):
        logits(model, x)  # the unmodified model's ALiBi table has 32 columns
    lminfinite.enable(model, n_global=4)
    assert torch.isfinite(logits(model, x)).all()


def test_slopes_are_the_models_own():
    """Read from each model's own ALiBi function; for 4 heads both give ALiBi's geometric slopes 2^(-8i/4)."""
    from lminfinite.families import family_of

    four_heads = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    bloom = alibi_model("bloom")
    slopes = family_of(bloom).alibi.slopes(bloom.base_model)
    torch.testing.assert_close(slopes, four_heads)
    mpt = alibi_model("mpt")
    slopes = family_of(mpt).alibi.slopes(mpt.base_model)
    torch.testing.assert_close(slopes, four_heads)


def test_bloom_without_a_context_length_asks_for_n_local():
    with pytest.raises(ValueError, match="pass n_local"):
        lminfinite.enable(alibi_model("bloom"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    """Their blocks pass no per-forward argument: layers re-run in backward must still see their own
    forward's plan (carried by the mask placeholder), not the latest forward's."""
    x = ids(40, 12, rows=2)
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    labels = x.masked_fill(mask == 0, -100)

    def grads(checkpointing):
        model = alibi_model(family).train()
        lminfinite.enable(model, n_global=2, n_local=8)
        if checkpointing:
            enable_checkpointing(model, reentrant)
        loss = model(input_ids=x, attention_mask=mask, labels=labels, use_cache=False).loss
        model(input_ids=ids(24, 13), use_cache=False)  # a later forward before backward
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(True), grads(False), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_own_sink_positions_change_alibi_distances(family):
    """The `sinks` baseline sees starting token j at distance min(D, i) - j (test_spec.py checks the
    values); here: it reaches ALiBi models, and stays the unmodified model inside the window."""
    model = alibi_model(family, layers=1)
    x = ids(60, 14)
    lminfinite.enable(model, n_global=3, n_local=16, limit_distance=15)
    zero = logits(model, x)
    lminfinite.enable(model, n_global=3, n_local=16, limit_distance=15, sink_positions="own")
    own = logits(model, x)
    assert (own[0, 20:] - zero[0, 20:]).abs().max() > 1e-3
    torch.testing.assert_close(own[0, :16], zero[0, :16], atol=1e-6, rtol=0)


def test_an_enabled_model_is_not_kept_alive():
    """The plan of an ALiBi model's forward is published for its mask function only during the forward
    (a ContextVar the post-hook clears), so nothing of the library keeps a dropped model alive."""
    import gc
    import weakref

    from lminfinite.attention import _CURRENT

    model = lminfinite.enable(alibi_model("mpt"), n_global=2, n_local=16)
    logits(model, ids(40, 1))
    assert _CURRENT.get() is None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
