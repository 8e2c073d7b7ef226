"""Every kernel equals the naive O(n^2) reference on the same inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import with_mod

from lminfinite.kernels import get_kernel, topk, torch_chunked
from lminfinite.kernels.common import Far
from lminfinite.kernels.topk import Middle
from lminfinite.plan import candidate_columns
from lminfinite.positions import Alibi

# "torch" takes its fused band path where it can; "torch-masked" forces its masked path.
BACKENDS = ["torch", "torch-masked", "flex"]


@pytest.fixture
def kernel(request, monkeypatch):
    def get(name):
        if name == "torch-masked":
            monkeypatch.setattr(torch_chunked, "_FUSED", None)
            name = "torch"
        return get_kernel(name)

    return get


def run(kernel, args, middle=None, **kw):
    """Call `kernel` on the 9 tensors `_inputs` makes: the far keys (and `middle`) as one `Far`; `scaling`,
    `softcap` and `alibi` become the kernel's one `ScoreMod`."""
    q, k, v, q_idx, k_idx, qg, kg, vg, g_idx = args
    far = None if qg is None else Far(qg, kg, vg, g_idx, middle=middle)
    return kernel(q, k, v, q_idx, k_idx, far, **with_mod(kw))


def _inputs(B, H, Hkv, Tq, Tk, d, pads, G, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, d, generator=g).to(dtype)
    valid = torch.ones(B, Tk, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    k_idx = torch.where(valid, valid.long().cumsum(1) - 1, -1)
    q_idx = k_idx[:, Tk - Tq :]
    S = candidate_columns(k_idx, G)
    qg = torch.randn(B, H, Tq, d, generator=g).to(dtype) if S else None
    kg = torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    vg = v[:, :, :S]
    return q, k, v, q_idx, k_idx, qg, kg, vg, k_idx[:, :S]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "G,L,block,n_mult",
    [(4, 16, None, 8), (0, 16, 5, 8), (10, 13, 7, 8), (3, 24, 16, 3), (2, 1, 4, 20), (5, 16, 64, 1)],
)
def test_kernel_equals_naive(kernel, backend, G, L, block, n_mult):
    n = n_mult * L
    args = _inputs(2, 4, 2, n, n, 8, pads=[0, 0], G=G)
    kw = dict(n_global=G, n_local=L, scaling=8**-0.5, block_size=block)
    ref = run(get_kernel("naive"), args, **kw)
    out = run(kernel(backend), args, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq", [1, 7, 40])
@pytest.mark.parametrize("pads", [[0, 5, 33], [0, 0, 0]])
def test_kernel_with_cached_prefix_and_padding(kernel, backend, Tq, pads):
    """Queries at the end of longer keys (a cache), rows left-padded differently or not at all."""
    Tk, G, L = 90, 4, 16
    args = _inputs(3, 6, 3, Tq, Tk, 8, pads=pads, G=G)
    kw = dict(n_global=G, n_local=L, scaling=0.3, block_size=6)
    ref = run(get_kernel("naive"), args, **kw)
    out = run(kernel(backend), args, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    q_idx = args[3]
    assert (out[(q_idx < 0)[:, None, :].expand_as(out[..., 0])] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pads", [[0, 0], [0, 3]])
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_kernel_low_precision(kernel, backend, pads, dtype, atol):
    args = _inputs(2, 4, 1, 64, 64, 16, pads=pads, G=3, dtype=dtype)
    kw = dict(n_global=3, n_local=12, scaling=0.25, block_size=10)
    ref = run(get_kernel("naive"), [a.float() if a is not None and a.is_floating_point() else a for a in args], **kw)
    out = run(kernel(backend), args, **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_band_path_is_taken_for_contiguous_keys(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_chunked, "_band_path", lambda *a: calls.append(1) or a[0])
    run(get_kernel("torch"), _inputs(1, 2, 1, 50, 50, 8, pads=[0], G=2), n_global=2, n_local=9, scaling=1.0)
    run(get_kernel("torch"), _inputs(2, 2, 1, 50, 50, 8, pads=[0, 4], G=2), n_global=2, n_local=9, scaling=1.0)
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_matches_naive(kernel, backend):
    args = _inputs(1, 2, 1, 50, 50, 8, pads=[0], G=2)
    kw = dict(n_global=2, n_local=9, scaling=1.0, block_size=8, softcap=5.0)
    ref = run(get_kernel("naive"), args, **kw)
    torch.testing.assert_close(run(kernel(backend), args, **kw), ref, atol=1e-5, rtol=1e-5)
    kw.pop("softcap")
    assert (run(get_kernel("naive"), args, **kw) - ref).abs().max() > 1e-3  # softcap changes the result


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        get_kernel("cuda-magic")


@pytest.mark.parametrize("backend", ["torch-masked", "torch"])
def test_bf16_logits_are_not_rounded_before_softmax(kernel, backend):
    """Large logits in bf16: the error must stay near the rounding of the output itself."""
    args = _inputs(1, 4, 2, 96, 96, 64, pads=[0], G=3, dtype=torch.bfloat16, seed=3)
    kw = dict(n_global=3, n_local=24, scaling=1.0, block_size=16)
    ref = run(get_kernel("naive"), [a.float() if a is not None and a.is_floating_point() else a for a in args], **kw)
    out = run(kernel(backend), args, **kw).float()
    rounding = (ref.to(torch.bfloat16).float() - ref).abs().mean()
    assert (out - ref).abs().mean() < 2 * rounding


# ------------------------------------------------------------------------------ ALiBi and top-k middle keys


def _alibi(H, D):
    return Alibi(2.0 ** -torch.arange(1, H + 1, dtype=torch.float32), D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq,pads", [(60, [0, 0]), (60, [0, 7]), (1, [0, 9]), (9, [3, 0])])
def test_alibi_matches_naive(kernel, backend, Tq, pads):
    args = _inputs(2, 4, 2, Tq, 60, 8, pads=pads, G=3)
    kw = dict(n_global=3, n_local=12, scaling=0.3, block_size=7)
    ref = run(get_kernel("naive"), args, **kw, alibi=_alibi(4, 12))
    torch.testing.assert_close(run(kernel(backend), args, **kw, alibi=_alibi(4, 12)), ref, atol=1e-5, rtol=1e-5)
    assert (run(get_kernel("naive"), args, **kw) - ref).abs().max() > 1e-2  # the biases change the result
    assert (run(get_kernel("naive"), args, **kw, alibi=_alibi(4, 5)) - ref).abs().max() > 1e-3  # and so does D


def _with_middle(B, H, Hkv, Tq, Tk, d, pads, G, top_k, seed=0):
    """Kernel inputs plus a Middle over every key column (keys 'at position 0' drawn at random)."""
    q, k, v, q_idx, k_idx, qg, kg, vg, g_idx = _inputs(B, H, Hkv, Tq, Tk, d, pads=pads, G=G, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    qg = torch.randn(B, H, Tq, d, generator=g)
    return (q, k, v, q_idx, k_idx, qg, kg, vg, g_idx), Middle(torch.randn(B, Hkv, Tk, d, generator=g), v, k_idx, top_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 4, 500])
@pytest.mark.parametrize("G,Tq,pads", [(3, 70, [0, 0]), (0, 70, [0, 0]), (3, 1, [0, 6]), (2, 11, [5, 0])])
def test_top_k_matches_naive(kernel, backend, top_k, G, Tq, pads):
    args, middle = _with_middle(2, 4, 2, Tq, 70, 8, pads, G, top_k)
    kw = dict(n_global=G, n_local=10, scaling=0.4, block_size=6)
    ref = run(get_kernel("naive"), args, **kw, middle=middle)
    torch.testing.assert_close(run(kernel(backend), args, **kw, middle=middle), ref, atol=1e-5, rtol=1e-5)
    assert (run(get_kernel("naive"), args, **kw) - ref).abs().max() > 1e-2  # the middle keys change the result
    if top_k < 500:  # fewer middle keys than all of them
        everything = Middle(middle.keys, middle.values, middle.idx, 500)
        assert (run(get_kernel("naive"), args, **kw, middle=everything) - ref).abs().max() > 1e-3


def test_top_k_with_alibi_and_softcap(kernel):
    args, middle = _with_middle(1, 4, 4, 40, 40, 8, [0], 2, 3)
    kw = dict(n_global=2, n_local=8, scaling=0.5, block_size=6, softcap=3.0, alibi=_alibi(4, 8), middle=middle)
    ref = run(get_kernel("naive"), args, **kw)
    for backend in BACKENDS:
        torch.testing.assert_close(run(kernel(backend), args, **kw), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_top_k_scores_are_taken_a_few_queries_at_a_time(monkeypatch, backend):
    """Many middle keys: no more than `_SCORES_PER_PASS` scores exist at once, and the far-key piece
    (whose top-k values are queries x k x head_dim) is built one block of queries at a time; same result."""
    args, middle = _with_middle(1, 4, 2, 50, 50, 8, [0], 2, 3)
    kw = dict(n_global=2, n_local=8, scaling=0.5, middle=middle, block_size=8)
    ref = run(get_kernel("naive"), args, **kw)
    seen, blocks = [], []
    select, piece = topk._top_k, torch_chunked.global_piece
    monkeypatch.setattr(topk, "_SCORES_PER_PASS", 4 * 50 * 3)  # three queries per pass
    monkeypatch.setattr(topk, "_top_k", lambda scores, k: seen.append(scores.numel()) or select(scores, k))
    fake = lambda far, s, e, *a: blocks.append(e - s) or piece(far, s, e, *a)  # noqa: E731
    monkeypatch.setattr(torch_chunked, "global_piece", fake)
    if backend == "flex":
        from lminfinite.kernels import flex

        monkeypatch.setattr(flex, "global_piece", fake)
    torch.testing.assert_close(run(get_kernel(backend), args, **kw), ref, atol=1e-5, rtol=1e-5)
    assert seen and max(seen) <= 4 * 50 * 3
    assert blocks and max(blocks) <= 8


def test_top_k_ties_go_to_the_earlier_key(kernel):
    """Equal middle keys (a repeated token in the first layer): exactly k are attended, the earliest."""
    args, middle = _with_middle(1, 2, 1, 30, 30, 8, [0], 0, 2)
    keys = middle.keys[:, :, :1].expand_as(middle.keys).contiguous()  # every key equal, values differ
    kw = dict(n_global=0, n_local=6, scaling=0.5, block_size=4)
    ref = run(get_kernel("naive"), args, **kw, middle=Middle(keys, middle.values, middle.idx, 2))
    earliest = Middle(keys[:, :, :2], middle.values[:, :, :2], middle.idx[:, :2], 2)
    torch.testing.assert_close(run(get_kernel("naive"), args, **kw, middle=earliest), ref, atol=1e-6, rtol=0)
    for backend in BACKENDS:
        out = run(kernel(backend), args, **kw, middle=Middle(keys, middle.values, middle.idx, 2))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("Tq", [64, 1])
def test_alibi_low_precision(kernel, backend, dtype, atol, Tq):
    args = _inputs(1, 4, 4, Tq, 64, 16, pads=[0], G=3, dtype=dtype)
    kw = dict(n_global=3, n_local=12, scaling=0.25, block_size=10, alibi=_alibi(4, 12))
    ref = run(get_kernel("naive"), [a.float() if a is not None and a.is_floating_point() else a for a in args], **kw)
    out = run(kernel(backend), args, **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_band_path_is_taken_for_alibi(monkeypatch):
    calls = []
    band = torch_chunked._band_path
    monkeypatch.setattr(torch_chunked, "_band_path", lambda *a: calls.append(1) or band(*a))
    args = _inputs(1, 4, 4, 50, 50, 8, pads=[0], G=2)
    out = run(get_kernel("torch"), args, n_global=2, n_local=9, scaling=1.0, alibi=_alibi(4, 9))
    assert calls == [1]
    ref = run(get_kernel("naive"), args, n_global=2, n_local=9, scaling=1.0, alibi=_alibi(4, 9))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("select", ["_top_k", "_top_k_exact"])
def test_top_k_selection_rule(select):
    """k highest, ties to the earlier index, exactly k even among -inf: the set a stable sort gives."""
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 6, (40, 30), generator=g).float()  # many ties
    scores[::3] = torch.randn(14, 30, generator=g)  # rows without ties
    scores[5, 2:] = float("-inf")  # fewer than k finite scores
    best, where = getattr(topk, select)(scores, 4)
    expected = scores.sort(dim=-1, descending=True, stable=True).indices[:, :4]
    assert torch.equal(where.sort(-1).values, expected.sort(-1).values)
    torch.testing.assert_close(best, scores.gather(-1, where))


@pytest.mark.parametrize("Tq", [1, 20])
def test_alibi_band_path_with_a_cached_prefix(monkeypatch, Tq):
    """A LambdaCache layout: starting-token columns, then a contiguous run of recent keys; the band path
    starts after the starting tokens (c0 > 0)."""
    g = torch.Generator().manual_seed(5)
    G, L, H = 3, 16, 4
    k_idx = torch.cat([torch.arange(G), torch.arange(50, 90)])[None]
    q_idx = k_idx[:, -Tq:]
    q, qg = torch.randn(1, H, Tq, 8, generator=g), torch.randn(1, H, Tq, 8, generator=g)
    k, v = torch.randn(1, 2, k_idx.shape[1], 8, generator=g), torch.randn(1, 2, k_idx.shape[1], 8, generator=g)
    args = (q, k, v, q_idx, k_idx, qg, k[:, :, :G], v[:, :, :G], k_idx[:, :G])
    kw = dict(n_global=G, n_local=L, scaling=0.4, block_size=6, alibi=Alibi(torch.tensor([1.0, 0.5, 0.25, 0.1]), L))
    calls = []
    band = torch_chunked._band_path
    monkeypatch.setattr(torch_chunked, "_band_path", lambda *a: calls.append(a[4]) or band(*a))
    out = run(get_kernel("torch"), args, **kw)
    assert calls == [G]  # c0: the run after the starting tokens
    torch.testing.assert_close(out, run(get_kernel("naive"), args, **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pads,alibi,softcap", [([0, 0], False, None), ([0, 5], False, None), ([0, 0], True, None), ([0, 0], False, 4.0)]
)
def test_gradients_equal_naive(pads, alibi, softcap):
    """Training: the chunked kernel's gradients are the naive kernel's. (Its fused CPU band path passes no
    gradient through its log-sum-exp, so it is left to inference; FlexAttention has no CPU backward.)"""
    args = [
        a.requires_grad_() if a is not None and a.is_floating_point() else a
        for a in _inputs(2, 4, 2, 60, 60, 8, pads=pads, G=3)
    ]
    kw = dict(n_global=3, n_local=12, scaling=0.3, block_size=7, softcap=softcap)
    kw["alibi"] = _alibi(4, 12) if alibi else None
    leaves = [a for a in args if a is not None and a.is_floating_point()]
    grads = []
    for name in ("naive", "torch"):
        out = run(get_kernel(name), args, **kw)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), leaves))
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
