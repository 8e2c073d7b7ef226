"""No silent wrong answers from the Python API (issue 15): foreign caches, bad token ids, a cache the ids do
not extend, something that is not a model; and the inference paths record no autograd graph.

Each test here failed on the code before the change (a silent wrong result or a raw torch error)."""

from __future__ import annotations

import pytest
import torch
from helpers import CharTokenizer, cache_of, family_model, ids, logits, tiny_model, with_cache
from transformers import DynamicCache

import lminfinite
from lminfinite import LambdaCache

G, L = 3, 16


@pytest.fixture
def model():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    yield model
    lminfinite.disable(model)


# ------------------------------------------------------------------------------------------ foreign caches


def test_a_dynamic_cache_is_refused(model):
    """Before: each forward swapped the (still empty) DynamicCache for a fresh LambdaCache, so a caller
    reusing it saw no context at all, silently. Any cache but a LambdaCache is refused, with what to pass
    instead (generate()'s own cache is replaced before the model sees it: test below)."""
    x = ids(30)
    with pytest.raises(ValueError, match=r"LambdaCache\.for_model\(model\).*lminfinite\.prefill"), torch.no_grad():
        model(input_ids=x[:, :20], **with_cache(model, DynamicCache()))
    with torch.no_grad():  # what the message says works
        first = model(input_ids=x[:, :20], use_cache=True)
        assert isinstance(cache_of(first), LambdaCache) and cache_of(first).get_seq_length() == 20
        second = model(input_ids=x[:, 20:21], **with_cache(model, cache_of(first))).logits
    torch.testing.assert_close(first.logits, logits(model, x[:, :20]))
    torch.testing.assert_close(second, logits(model, x[:, :21])[:, -1:], atol=1e-5, rtol=1e-5)


def test_generate_with_a_users_dynamic_cache_is_refused(model):
    """Before: generate() ran, but the user's cache stayed empty (every later use started from nothing)."""
    cache = DynamicCache()
    with pytest.raises(ValueError, match=r"LambdaCache\.for_model\(model\)"):
        model.generate(ids(20), **with_cache(model, cache), max_new_tokens=3, do_sample=False, pad_token_id=0)
    # generate()'s own cache (none passed) is replaced once and never read again: generation is right
    lam = LambdaCache.for_model(model)
    out = model.generate(ids(20), **with_cache(model, lam), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids(20), max_new_tokens=3, do_sample=False, pad_token_id=0), out)


def test_a_filled_foreign_cache_is_refused_with_what_to_pass(model):
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    with pytest.raises(ValueError, match=r"filled DynamicCache.*LambdaCache\.for_model\(model\).*lminfinite\.prefill"):
        model(input_ids=ids(3), **with_cache(model, filled))
    with pytest.raises(TypeError, match="must be a LambdaCache"):
        model(input_ids=ids(3), **with_cache(model, [(torch.zeros(1), torch.zeros(1))]))


def test_prefill_and_stream_refuse_a_dynamic_cache(model):
    """Before: prefill() returned the DynamicCache it was given, empty; stream() generated from no context."""
    with pytest.raises(ValueError, match=r"prefill\(\) into a DynamicCache"):
        lminfinite.prefill(model, ids(30), cache=DynamicCache())
    with pytest.raises(ValueError, match="LambdaCache"):
        "".join(lminfinite.stream(model, CharTokenizer(), "abcdef", cache=DynamicCache(), max_new_tokens=5))


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([[5, 101]]), "token id 101 is outside the model's vocabulary"),
        (torch.tensor([[-1, 5]]), "token id -1 is outside"),
        (torch.ones(1, 3), "integer token ids"),
    ],
)
def test_token_ids_are_checked(model, bad, match):
    """Before: IndexError 'index out of range in self' or a RuntimeError about the embedding's dtypes."""
    with pytest.raises(ValueError, match=match):
        model(input_ids=bad)


@pytest.mark.parametrize("held_more", [True, False])
def test_generate_refuses_ids_that_do_not_extend_the_cache(model, held_more):
    """generate() feeds `ids[:, cache_length:]`. Before: a cache holding more tokens than the ids failed
    deep in torch (reshape of 0 elements); one holding as many fed the same tokens again, silently."""
    x = ids(30)
    cache = lminfinite.prefill(model, x)
    given = x[:, :12] if held_more else x
    with pytest.raises(ValueError, match=rf"given {given.shape[1]} token ids with a LambdaCache that already holds 30"):
        model.generate(given, **with_cache(model, cache), max_new_tokens=3, do_sample=False, pad_token_id=0)
    cache = lminfinite.prefill(model, x[:, :-1])  # the documented use: the cache holds all but the last
    out = model.generate(x, **with_cache(model, cache), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("family", ["llama", "gptj", "mpt", "bloom"])
def test_an_enabled_model_takes_cache_on_every_supported_transformers(family):
    """transformers 5.19 names the cache `past_key_values`: its MPT dropped an unknown `cache=` (each forward
    started without context, silently) and its generate() refused it. An enabled model takes `cache=` there as
    on 5.24 (lminfinite.compat): forwards through it equal one forward, generate() with it equals generate()."""
    model = lminfinite.enable(family_model(family), n_global=2, n_local=8)
    x = ids(30, 4)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        first = model(input_ids=x[:, :20], cache=cache).logits
        assert cache.get_seq_length() == 20
        last = model(input_ids=x[:, 20:21], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, last], 1), logits(model, x[:, :21]), atol=1e-5, rtol=1e-5)
    cache = lminfinite.prefill(model, x[:, :-1])
    # use_cache=True: MPT's config says False, and generate() then feeds the whole sequence at every step
    out = model.generate(x, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=True)
    assert cache.get_seq_length() == 30 + 3
    assert torch.equal(out, model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0))
    lminfinite.disable(model)
    assert "generate" not in vars(model)  # disable() removed what enable() put on the model


def test_enable_refuses_what_is_not_a_transformers_model():
    """Before: AttributeError ('str' object has no attribute 'modules', 'Linear' ... 'config')."""
    with pytest.raises(TypeError, match="load it first"):
        lminfinite.enable("meta-llama/Llama-2-7b-hf")
    with pytest.raises(TypeError, match="PreTrainedModel.*got a Linear"):
        lminfinite.enable(torch.nn.Linear(2, 2))
    import transformers

    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        lminfinite.enable(t5)


def test_disable_removes_the_generation_guard(model):
    assert "prepare_inputs_for_generation" in vars(model)
    lminfinite.disable(model)
    assert "prepare_inputs_for_generation" not in vars(model)


# ------------------------------------------------------------------------------------- no autograd graphs


def test_score_and_prefill_record_no_autograd_graph(model):
    """Parameters require gradients (as loaded), yet score() and prefill() run without autograd (no_grad,
    not inference_mode: a prefilled cache may later meet autograd, and rotary hooks may grow tables)."""
    assert all(p.requires_grad for p in model.parameters())
    grad_on = []
    handle = model.model.register_forward_pre_hook(lambda *a: grad_on.append(torch.is_grad_enabled()))
    try:
        nll = lminfinite.score(model, ids(50), chunk_size=20)
        cache = lminfinite.prefill(model, ids(50), chunk_size=20)
    finally:
        handle.remove()
    assert grad_on == [False] * 6
    assert not nll.requires_grad and not cache.layers[0].keys.requires_grad


def test_config_of_gives_the_settings_in_effect(lambda_stories):
    import lminfinite

    model, _ = lambda_stories
    config = lminfinite.config_of(model)
    assert isinstance(config, lminfinite.LambdaConfig) and (config.n_global, config.n_local) == (10, 512)
    lminfinite.disable(model)
    assert lminfinite.config_of(model) is None
