"""Randomized equivalence (hypothesis): every kernel, and the cached model path, equal the naive reference.

Drawn at random: G, L, D, the block and chunk sizes, batch size, left padding, the query/key split (a
cache in front of the queries), heads and GQA, dtype, ALiBi, softcapping, top-k and the backend. Inputs
of the kernels are small multiples of 1/2, so that every logit is exact in any summation order: the top-k
choice (and its ties) is then the same in every kernel, and only the softmax's rounding differs.

The examples are derandomized (the same ones in every run, so CI is reproducible); on a failure,
hypothesis prints the smallest failing example and the `@reproduce_failure` blob that replays it.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lminfinite
from lminfinite import LambdaCache
from lminfinite.kernels import get_kernel, torch_chunked
from lminfinite.kernels.common import Far, Middle
from lminfinite.kernels.score_mod import ScoreMod
from lminfinite.plan import candidate_columns, middle_columns
from lminfinite.positions import Alibi

pytestmark = pytest.mark.slow  # about 15 s on 2 quiet cores: CI runs them, `pytest -m "not slow"` does not

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@contextlib.contextmanager
def _backend(name: str):
    """The kernel of `name`; "torch-masked" is the chunked kernel forced onto its masked path."""
    if name != "torch-masked":
        yield get_kernel(name)
        return
    fused, torch_chunked._FUSED = torch_chunked._FUSED, None
    try:
        yield get_kernel("torch")
    finally:
        torch_chunked._FUSED = fused


@st.composite
def kernel_cases(draw):
    L = draw(st.integers(1, 12))
    G = draw(st.integers(0, 5))
    Hkv, rep = draw(st.sampled_from([(1, 1), (1, 2), (2, 2), (2, 1)]))
    B = draw(st.integers(1, 3))
    Tk = draw(st.integers(1, 5 * L + 10))
    Tq = draw(st.integers(1, Tk))
    pads = [draw(st.integers(0, Tk - 1)) for _ in range(B)]
    return dict(
        B=B,
        H=Hkv * rep,
        Hkv=Hkv,
        d=draw(st.sampled_from([4, 8])),
        Tq=Tq,
        Tk=Tk,
        pads=pads,
        G=G,
        L=L,
        D=draw(st.integers(0, L)),
        block_size=draw(st.one_of(st.none(), st.integers(1, 16))),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        alibi=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, None, 3.0])),
        top_k=draw(st.sampled_from([0, 0, 1, 3])),
        scaling=draw(st.sampled_from([0.25, 0.5])),
        backend=draw(st.sampled_from(["torch", "torch-masked", "flex"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _halves(g, *shape):
    """Random multiples of 1/2 in [-1.5, 1.5]: their dot products are exact in float32 and bf16."""
    return torch.randint(-3, 4, shape, generator=g).float() / 2


def _kernel_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, d, Tq, Tk = c["B"], c["H"], c["Hkv"], c["d"], c["Tq"], c["Tk"]
    valid = torch.ones(B, Tk, dtype=torch.bool)
    for b, p in enumerate(c["pads"]):
        valid[b, :p] = False
    k_idx = torch.where(valid, valid.long().cumsum(1) - 1, -1)
    q_idx = k_idx[:, Tk - Tq :]
    q, qg = _halves(g, B, H, Tq, d), _halves(g, B, H, Tq, d)
    k, km = _halves(g, B, Hkv, Tk, d), _halves(g, B, Hkv, Tk, d)
    v = torch.randn(B, Hkv, Tk, d, generator=g)
    S = candidate_columns(k_idx, c["G"])
    M = middle_columns(q_idx, k_idx, c["G"], c["L"]) if c["top_k"] else 0
    slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)
    alibi = Alibi(slopes, c["D"]) if c["alibi"] else None
    middle = Middle(km[:, :, :M], v[:, :, :M], k_idx[:, :M], c["top_k"]) if M else None
    far = Far(qg, k[:, :, :S], v[:, :, :S], k_idx[:, :S], middle=middle) if S or M else None
    kw = dict(n_global=c["G"], n_local=c["L"], mod=ScoreMod(c["scaling"], c["softcap"], alibi))
    return (q, k, v, q_idx, k_idx, far), kw


def _cast(args, dtype):
    q, k, v, q_idx, k_idx, far = args
    if far is not None:
        middle = far.middle
        if middle is not None:
            middle = Middle(middle.keys.to(dtype), middle.values.to(dtype), middle.idx, middle.top_k)
        far = Far(far.queries.to(dtype), far.keys.to(dtype), far.values.to(dtype), far.idx, middle)
    return q.to(dtype), k.to(dtype), v.to(dtype), q_idx, k_idx, far


@settings(max_examples=160, **SETTINGS)
@given(kernel_cases())
def test_every_kernel_equals_the_naive_reference(c):
    args, kw = _kernel_inputs(c)
    dtype = c["dtype"]
    low = _cast(args, dtype)
    ref = get_kernel("naive")(*_cast(low, torch.float32), **kw)  # the same (rounded) inputs, in float32
    with _backend(c["backend"]) as kernel:
        out = kernel(*low, **kw, block_size=c["block_size"])
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    q_idx = args[3]
    assert (out[(q_idx < 0)[:, None, :].expand_as(out[..., 0])] == 0).all()  # padding queries give 0


# ------------------------------------------------------------------------------------- the cached model


@functools.cache
def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@st.composite
def model_cases(draw):
    L = draw(st.integers(2, 10))
    n = draw(st.integers(1, 48))
    B = draw(st.integers(1, 3))
    return dict(
        G=draw(st.integers(0, 4)),
        L=L,
        D=draw(st.one_of(st.none(), st.integers(1, L))),
        n=n,
        pads=[draw(st.integers(0, n - 1)) for _ in range(B)],
        chunk=draw(st.integers(1, 24)),  # raised to >= 6 for flex below
        top_k=draw(st.sampled_from([0, 0, 2])),
        top_k_from_layer=draw(st.integers(0, 1)),
        # FlexAttention builds its block mask in every layer of every forward (slow on the CPU): fewer
        # examples, in chunks of a few tokens.
        backend=draw(st.sampled_from(["torch"] * 4 + ["flex"])),
        block_size=draw(st.one_of(st.none(), st.integers(1, 12))),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80, **SETTINGS)
@given(model_cases())
def test_cached_model_path_equals_the_naive_recomputation(c):
    """Feeding a left-padded batch chunk by chunk through a LambdaCache (re-basing positions, dropping or
    keeping the middle) gives, at every real token, the logits of one uncached forward with the naive kernel."""
    model = _model()
    if c["backend"] == "flex":
        c = dict(c, chunk=max(c["chunk"], 6))
    g = torch.Generator().manual_seed(c["seed"])
    B, n = len(c["pads"]), c["n"]
    ids = torch.randint(3, 101, (B, n), generator=g)
    mask = torch.ones(B, n, dtype=torch.long)
    for b, p in enumerate(c["pads"]):
        mask[b, :p] = 0
    ids = ids.masked_fill(mask == 0, 0)
    settings_ = dict(n_global=c["G"], n_local=c["L"], limit_distance=c["D"], top_k=c["top_k"])
    settings_["top_k_from_layer"] = c["top_k_from_layer"]
    try:
        lminfinite.enable(model, backend="naive", **settings_)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        lminfinite.enable(model, backend=c["backend"], block_size=c["block_size"], **settings_)
        cache = LambdaCache.for_model(model)
        outs = []
        with torch.no_grad():
            for s in range(0, n, c["chunk"]):
                e = min(s + c["chunk"], n)
                outs.append(model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], cache=cache).logits)
    finally:
        lminfinite.disable(model)
    out, real = torch.cat(outs, 1), mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    # Positions stay below 2 L + chunk, plus the largest difference in real tokens between rows.
    assert int(cache.pos.max()) < 2 * c["L"] + c["chunk"] + max(c["pads"]) - min(c["pads"])
    if not c["top_k"]:
        assert cache.layers[0].keys.shape[-2] <= c["G"] * B + c["L"] - 1  # the middle is dropped
