"""LambdaCache: chunked feeding equals one Λ forward, cached generation equals recomputation,
positions stay bounded, memory stays constant, generate()/stream() and the errors."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import CharTokenizer, cache_of, left_padded, tiny_model
from transformers import DynamicCache, TextIteratorStreamer

import lminfinite
from lminfinite import LambdaCache, LambdaConfig

G, L = 3, 16


def _chunked_logits(model, ids, mask, chunk):
    cache = LambdaCache.for_model(model)
    outs = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            e = min(s + chunk, ids.shape[1])
            m = None if mask is None else mask[:, :e]
            outs.append(model(input_ids=ids[:, s:e], attention_mask=m, cache=cache).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("chunk", [1, 7, 64, L, 3 * L])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_feeding_equals_one_forward(chunk, padded):
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    ids, mask = left_padded([230, 170, 95] if padded else [230])
    mask = mask if padded else None
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out, cache = _chunked_logits(model, ids, mask, chunk)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    assert cache.base > 0  # the stream crossed re-basings
    assert cache.layers[0].keys.shape[-2] <= G * ids.shape[0] + L - 1


def test_cached_greedy_generation_equals_naive_recomputation():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    prompt = torch.randint(3, 101, (1, 20))
    out = model.generate(prompt, max_new_tokens=3 * L, do_sample=False, pad_token_id=0)
    assert isinstance(out, torch.Tensor) and out.shape[1] == 20 + 3 * L
    lminfinite.enable(model, n_global=G, n_local=L, backend="naive")
    seq = prompt
    with torch.no_grad():
        for _ in range(3 * L):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_uses_lambda_cache_and_bounded_memory():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    res = model.generate(
        torch.randint(3, 101, (2, 40)),
        max_new_tokens=100,
        do_sample=True,
        top_k=5,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    assert isinstance(cache_of(res), LambdaCache)
    assert cache_of(res).layers[0].keys.shape[-2] == G + L - 1
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 101, (1, 50)))
    assert isinstance(cache_of(out), LambdaCache)


def test_beam_search_and_left_padded_batch_generation():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    ids, mask = left_padded([30, 12])
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=2 * L, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 30 + 2 * L)
    # Each row of a padded batch generates what it generates alone.
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=2 * L, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[1:, 18:], max_new_tokens=2 * L, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy[1, 18:], alone[0])


def _last_logits_through_cache(model, parts, skip=0):
    cache = LambdaCache.for_model(model)
    positions = []
    hook = model.model.rotary_emb.register_forward_pre_hook(
        lambda m, a, kw: positions.append(int(kw["position_ids"].max())), with_kwargs=True
    )
    with torch.no_grad():
        for i, part in enumerate(parts):
            for s in range(0, part.shape[1], 5):
                out = model(input_ids=part[:, s : s + 5], cache=cache).logits[:, -1]
            if i == 0 and skip:
                cache.seen += skip  # as if `skip` tokens had gone by between the parts
    hook.remove()
    return out, max(positions), cache


def test_positions_stay_bounded_and_far_streams_equal_near_ones():
    """1-layer model: the last query sees the starting tokens and its window only, so its logits
    must not depend on how far the stream has run, even 10^8 tokens (float32 spacing there is 8)."""
    model = lminfinite.enable(tiny_model("llama", num_hidden_layers=1), n_global=G, n_local=L)
    g = torch.Generator().manual_seed(1)
    start, tail = torch.randint(3, 101, (1, G), generator=g), torch.randint(3, 101, (1, L), generator=g)
    near, _, _ = _last_logits_through_cache(model, [start, tail])
    middle = torch.randint(3, 101, (1, 37 * L), generator=g)
    far, max_pos, cache = _last_logits_through_cache(model, [start, middle, tail])
    torch.testing.assert_close(far, near, atol=1e-5, rtol=1e-5)
    assert max_pos < 2 * L + 5 and cache.base > 30 * L
    very_far, max_pos, cache = _last_logits_through_cache(model, [start, middle, tail], skip=10**8)
    torch.testing.assert_close(very_far, near, atol=1e-5, rtol=1e-5)
    assert max_pos < 2 * L + 5 and cache.base > 10**8
    lminfinite.disable(model)
    with torch.no_grad():
        vanilla_far = model(input_ids=torch.cat([start, middle, tail], 1)).logits[:, -1]
        vanilla_near = model(input_ids=torch.cat([start, tail], 1)).logits[:, -1]
    assert (vanilla_far - vanilla_near).abs().max() > 1e-2  # the distance cap is what makes them equal


def test_memory_is_constant_in_stream_length():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    sizes = []
    for n in (10 * L, 60 * L):
        cache = lminfinite.prefill(model, torch.randint(3, 101, (1, n)), chunk_size=L)
        sizes.append(cache.memory_bytes())
    assert sizes[0] == sizes[1] > 0


def test_score_matches_full_forward_and_marks_padding():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    ids, mask = left_padded([150, 90])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    nll = lminfinite.score(model, ids, attention_mask=mask, chunk_size=23)
    assert nll.shape == (2, 149)
    assert torch.isnan(nll[1, :60]).all() and not torch.isnan(nll[1, 60:]).any()
    ok = ~torch.isnan(nll)
    torch.testing.assert_close(nll[ok], ref[ok], atol=1e-4, rtol=1e-4)
    # unmodified model: exact vanilla scoring with a growing cache
    lminfinite.disable(model)
    with torch.no_grad():
        vlogits = model(input_ids=ids[:1], use_cache=False).logits
    vref = torch.nn.functional.cross_entropy(vlogits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(lminfinite.score(model, ids[:1], chunk_size=40)[0], vref, atol=1e-4, rtol=1e-4)


def test_errors_and_empty_inputs():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    other = LambdaCache(LambdaConfig(n_global=G + 1, n_local=L), 2)
    with pytest.raises(ValueError, match="n_global"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), cache=other)
    with pytest.raises(ValueError, match="layers"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), cache=LambdaCache(LambdaConfig(n_global=G, n_local=L), 5))
    with pytest.raises(ValueError, match="chunk_size"):
        lminfinite.score(model, torch.ones(1, 10, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        lminfinite.prefill(model, torch.ones(1, 10, dtype=torch.long), chunk_size=-3)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    with pytest.raises(ValueError, match="LambdaCache"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), cache=filled)
    assert lminfinite.score(model, torch.ones(1, 0, dtype=torch.long)).shape == (1, 0)
    assert lminfinite.prefill(model, torch.ones(1, 0, dtype=torch.long)).get_seq_length() == 0
    # a cache filled by one model is refused by another
    cache = lminfinite.prefill(model, torch.ones(1, 5, dtype=torch.long))
    model2 = lminfinite.enable(tiny_model("llama", seed=1), n_global=G, n_local=L)
    with pytest.raises(ValueError, match="another model"):
        model2(input_ids=torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_stream_keeps_its_cache_across_turns(lambda_stories):
    model, tok = lambda_stories
    cache = LambdaCache.for_model(model)
    first = "".join(lminfinite.stream(model, tok, "Once upon a time", cache=cache, max_new_tokens=30))
    assert first.startswith(", there was a little girl named Lily")
    seen = cache.get_seq_length()
    assert seen == len(tok.encode("Once upon a time")) + 30
    second = "".join(lminfinite.stream(model, tok, " Then", cache=cache, max_new_tokens=20))
    seen += len(tok.encode(" Then", add_special_tokens=False)) + 20
    assert second and cache.get_seq_length() == seen
    # a caller that stops reading early still leaves every shown token in the cache
    gen = lminfinite.stream(model, tok, " She", cache=cache)
    shown = [next(gen) for _ in range(5)]
    gen.close()
    assert shown and cache.get_seq_length() == seen + len(tok.encode(" She", add_special_tokens=False)) + 5


def test_text_iterator_streamer(lambda_stories):
    model, tok = lambda_stories
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    ids = tok("Once upon a time", return_tensors="pt")
    thread = threading.Thread(target=model.generate, kwargs=dict(**ids, max_new_tokens=20, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert "Lily" in text


def test_crop_rolls_back_inside_the_window_and_refuses_beyond():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    ids = torch.randint(3, 101, (1, 12))
    cache = lminfinite.prefill(model, ids)
    cache.crop(0)
    assert cache.get_seq_length() == 12
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache.crop(-4)
    assert cache.get_seq_length() == 8
    with torch.no_grad():
        out = model(input_ids=ids[:, 8:], cache=cache).logits
        ref = model(input_ids=ids, use_cache=False).logits[:, 8:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    long_cache = lminfinite.prefill(model, torch.randint(3, 101, (1, 5 * L)))
    with pytest.raises(ValueError, match="cannot roll back"):
        long_cache.crop(-2)


@pytest.mark.slow
def test_progress_bars_and_seeded_sampling(capsys):
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    ids = torch.randint(3, 101, (1, 100))
    nll = lminfinite.score(model, ids, chunk_size=16, progress=True)
    lminfinite.prefill(model, ids, chunk_size=16, progress=True)
    err = capsys.readouterr().err
    assert "score" in err and "prefill" in err and "7/7" in err
    assert torch.isfinite(nll).all()

    def sample(seed):
        return "".join(
            lminfinite.stream(
                model,
                CharTokenizer(),
                "abc",
                max_new_tokens=40,
                do_sample=True,
                top_k=20,
                top_p=0.9,
                temperature=0.8,
                seed=seed,
                stop_at_eos=False,
            )
        )

    assert sample(3) == sample(3) and sample(3) != sample(4)


def test_interrupted_forward_and_short_mask_are_refused():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L)
    cache = LambdaCache.for_model(model)
    layer = model.model.layers[1]
    handle = layer.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(input_ids=torch.randint(3, 101, (1, 10)), cache=cache)
    handle.remove()
    with pytest.raises(ValueError, match="did not finish"):
        model(input_ids=torch.randint(3, 101, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="does not cover"):
        model(input_ids=torch.randint(3, 101, (1, 5)), attention_mask=torch.ones(1, 3, dtype=torch.long))
    # a cache stays usable by the same model after enable() is called again with the same (G, L)
    cache = lminfinite.prefill(model, torch.randint(3, 101, (1, 20)))
    lminfinite.enable(model, n_global=G, n_local=L)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 101, (1, 1)), cache=cache)


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_generate_with_a_cache_feeds_only_new_tokens_when_the_config_says_no_cache(family):
    """Before: a model whose config says use_cache=False (MPT's default) fed the whole sequence again at
    every step of generate(ids, cache=cache), into the cache: 122 columns held after a 28-token prefill and
    4 new tokens. The LambdaCache gets only the tokens it does not hold."""
    from helpers import family_model

    model = family_model(family)
    model.config.use_cache = model.generation_config.use_cache = False
    lminfinite.enable(model, n_global=2, n_local=16)
    x = torch.randint(3, 101, (1, 29))
    ref = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cache = lminfinite.prefill(model, x[:, :-1])
    out = model.generate(x, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref) and cache.get_seq_length() == 28 + 4
