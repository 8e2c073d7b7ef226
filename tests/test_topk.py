"""The optional top-k extension at model level: `enable(..., top_k, top_k_from_layer)`.

Each query of the chosen layers also attends its k best middle tokens (scored at distance D). The
kernels are checked against the naive reference and the written method in test_kernels.py and
test_spec.py; here: the cache keeps the middle and its positions stay bounded, chunked and cached
feeding equal one forward, greedy generation equals recomputation, and the layer setting is obeyed.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_greedy_equals_naive_recomputation, family_model, logits, tiny_model, with_cache

import lminfinite
from lminfinite import LambdaCache, LambdaConfig

G, L, K = 2, 8, 3


def _ids(n, seed=0, rows=1):
    return torch.randint(3, 101, (rows, n), generator=torch.Generator().manual_seed(seed))


MODELS = {"llama": lambda: tiny_model("llama"), "mpt": lambda: family_model("mpt")}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [1, 7, 3 * L])
def test_cached_feeding_equals_naive_one_forward(name, chunk):
    model = MODELS[name]()
    ids = _ids(12 * L)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K, top_k_from_layer=1, backend="naive")
    ref = logits(model, ids)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K, top_k_from_layer=1)
    cache = LambdaCache.for_model(model)
    assert cache.keep_middle
    with torch.no_grad():
        out = torch.cat(
            [
                model(input_ids=ids[:, s : s + chunk], **with_cache(model, cache)).logits
                for s in range(0, ids.shape[1], chunk)
            ],
            1,
        )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert cache.layers[0].keys.shape[-2] == ids.shape[1]  # the middle is kept: memory grows with n
    if name == "llama":
        assert cache.base > 0  # re-based, and the middle keys kept their own positions
        assert int(cache.pos.max()) <= 2 * L + chunk
        # Keys that left the window before the last forward sit at position 0 (read there unrotated).
        assert (cache.pos[:, G : ids.shape[1] - (L - 1) - chunk] == 0).all()


def test_left_padded_batch_equals_naive():
    model = tiny_model("llama")
    ids = _ids(10 * L, rows=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K, backend="naive")
    ref = logits(model, ids, attention_mask=mask)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K)
    out = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_recomputation():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L, top_k=K)
    assert_greedy_equals_naive_recomputation(model, _ids(L + 5, seed=3), 5 * L, n_global=G, n_local=L, top_k=K)


def test_layers_before_top_k_from_layer_are_plain_lambda():
    model = tiny_model("llama")  # 2 layers: top-k in layer 1 only
    ids = _ids(8 * L, seed=4)
    lminfinite.enable(model, n_global=G, n_local=L)
    plain = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K, top_k_from_layer=1)
    top = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(top.hidden_states[1], plain.hidden_states[1], atol=0, rtol=0)  # after layer 0
    assert (top.logits - plain.logits).abs().max() > 1e-3
    torch.testing.assert_close(top.logits[:, : L + G], plain.logits[:, : L + G], atol=1e-5, rtol=0)  # no middle yet


def test_cache_must_match_the_top_k_setting():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L, top_k=K)
    with pytest.raises(ValueError, match="keeps the middle"):
        model(input_ids=_ids(4), cache=LambdaCache(LambdaConfig(n_global=G, n_local=L), 2))
    lminfinite.enable(model, n_global=G, n_local=L)
    with pytest.raises(ValueError, match="enabled without top_k"):
        model(input_ids=_ids(4), cache=LambdaCache(LambdaConfig(n_global=G, n_local=L, top_k=1), 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": -1}, ">= 0"),
        ({"top_k": 2, "sink_positions": "own"}, "zero"),
        ({"top_k": 2, "top_k_from_layer": 2}, "no layer would use top-k"),
    ],
)
def test_bad_top_k_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L, **kwargs)


def test_left_padded_batch_through_the_cache_equals_naive():
    model = tiny_model("llama")
    ids = _ids(10 * L, rows=3, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :13], mask[2, :5] = 0, 0
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K, backend="naive")
    ref = logits(model, ids, attention_mask=mask)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        out = torch.cat(
            [
                model(input_ids=ids[:, s : s + 3], attention_mask=mask[:, : s + 3], cache=cache).logits
                for s in range(0, ids.shape[1], 3)
            ],
            1,
        )
    assert cache.base > 0
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_beam_search_runs_on_the_kept_middle():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L, top_k=K)
    prompt = _ids(3 * L, seed=9)
    out = model.generate(prompt, max_new_tokens=3 * L, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6 * L)
    with torch.no_grad():  # the beam's tokens are those the naive recomputation scores as the model did
        cached = lminfinite.score(model, out, chunk_size=5)
        lminfinite.enable(model, n_global=G, n_local=L, top_k=K, backend="naive")
        naive = lminfinite.score(model, out, chunk_size=None)
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)


def test_crop_rolls_back_decoded_tokens():
    """With the middle kept nothing is dropped, so decoded tokens can be rolled back (assisted decoding
    style); keys that had left the window and re-enter it move back to their window positions."""
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L, top_k=K)
    ids = _ids(4 * L, seed=10)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        model(input_ids=ids[:, : 2 * L], cache=cache)
        for t in range(2 * L, 3 * L):
            model(input_ids=ids[:, t : t + 1], cache=cache)
        cache.crop(-5)
        out = torch.cat([model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(3 * L - 5, 4 * L)], 1)
    lminfinite.enable(model, n_global=G, n_local=L, top_k=K, backend="naive")
    ref = logits(model, ids)[:, 3 * L - 5 :]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_crop_refuses_to_bring_the_starting_tokens_back_after_re_basing():
    model = lminfinite.enable(tiny_model("llama"), n_global=G, n_local=L, top_k=K)
    cache = lminfinite.prefill(model, _ids(6 * L, seed=11), chunk_size=L)
    assert cache.base > 0
    cache.crop(-L)  # fine: the window stays past the starting tokens
    with pytest.raises(ValueError, match="starting tokens would re-enter"):
        cache.crop(-(4 * L))


def _kernel_inputs(n=200, H=4, Hkv=2, d=8, G=2, tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, qg = (torch.randn(1, H, n, d, generator=g) for _ in range(2))
    k, v, km = (torch.randn(1, Hkv, n, d, generator=g) for _ in range(3))
    if tied:  # every middle key equal (a repeated token in the first layer): ties in every row
        km = km[:, :, :1].expand_as(km).contiguous()
    idx = torch.arange(n)[None]
    return [t.requires_grad_() for t in (q, k, v, qg, km)], idx


def _far(qg, k, v, km, idx, G, top_k):
    from lminfinite.kernels.common import Far, Middle

    return Far(qg, k[:, :, :G], v[:, :, :G], idx[:, :G], middle=Middle(km, v, idx, top_k))


@pytest.mark.parametrize("tied", [False, True])
def test_top_k_gradients_equal_the_naive_kernel(tied):
    """(FlexAttention has no backward on the CPU: torch raises its own error there.)"""
    from lminfinite.kernels import get_kernel
    from lminfinite.kernels.score_mod import ScoreMod

    (q, k, v, qg, km), idx = _kernel_inputs(tied=tied)
    grads = []
    for name in ("naive", "torch"):
        out = get_kernel(name)(
            q, k, v, idx, idx, _far(qg, k, v, km, idx, 2, K), n_global=2, n_local=L, mod=ScoreMod(0.4)
        )
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v, qg, km)))
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert grads[0][4].abs().sum() > 0  # the chosen middle keys get a gradient


def test_training_memory_of_top_k_grows_linearly():
    """Issue 15: `model(ids)` with top-k and gradients kept 10.5 GB for 8k tokens of a 260K model: autograd
    saved every query's scores of every middle key (O(n^2)). Now the choice is made without autograd and
    only the k chosen logits are recomputed with it, and the chunked kernel takes its masked path when
    gradients are recorded: what autograd keeps (distinct storages) grows linearly with n (ties in every
    row: all middle keys are equal)."""
    from lminfinite.kernels import get_kernel
    from lminfinite.kernels.score_mod import ScoreMod

    def saved_bytes(n):
        (q, k, v, qg, km), idx = _kernel_inputs(n=n, tied=True)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        far = _far(qg, k, v, km, idx, 2, K)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = get_kernel("torch")(q, k, v, idx, idx, far, n_global=2, n_local=L, mod=ScoreMod(0.4))
        out.sum().backward()
        return sum(storages.values())

    assert saved_bytes(800) < 5 * saved_bytes(200)  # linear: 4x; O(n^2): 16x (10.5x before the change)
