"""Block memory: its settings, the per-layer store, the choice of blocks and the kernel piece.

The kernel piece is checked against the dense reference (`kernels.memory.dense_scores`) and both against
a brute force written here from the rule's words: a query attends a middle key at distance D when the
key's block was chosen for the query's chunk. With every block chosen, memory is the top-k rule with k =
all middle keys. The store is checked against a plain-Python model of its slots (eviction of the
least-chosen block, the oldest among equals), the choice against a brute-force ranking of the
representatives.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_greedy_equals_naive_recomputation, family_model, ids, left_padded, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lminfinite
from lminfinite import LambdaCache, LambdaConfig
from lminfinite.kernels import memory as kmem
from lminfinite.kernels.score_mod import ScoreMod
from lminfinite.memory import BlockMemory, BlockStore, HotBlocks, choose, chunks_of, summarise, upper_bounds
from lminfinite.positions import Alibi
from lminfinite.rule import block_of, memory_rule, middle_blocks, middle_rule, query_chunk

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------- settings


def test_defaults():
    m = BlockMemory()
    assert (m.block_size, m.representatives, m.blocks, m.layers, m.dtype, m.max_blocks, m.shared) == (
        128,
        4,
        8,
        None,
        "float16",
        None,
        True,
    )
    assert m.query_chunk == 128 and m.hot_blocks == 64 and m.applies_to(0) and m.applies_to(10**6)
    assert BlockMemory(chunk=64).query_chunk == 64


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(block_size=2.5), TypeError, "block_size must be an int"),
        (dict(block_size=True), TypeError, "block_size must be an int"),
        (dict(representatives=0), ValueError, "representatives must be >= 1"),
        (dict(representatives=3), ValueError, "must divide block_size"),
        (dict(blocks=0), ValueError, "blocks must be >= 1"),
        (dict(dtype="bfloat16"), ValueError, "dtype must be one of"),
        (dict(max_blocks=4), ValueError, "max_blocks=4 < blocks=8"),
        (dict(max_blocks=0), ValueError, "max_blocks must be >= 1"),
        (dict(layers=[]), ValueError, "layers is empty"),
        (dict(layers=[1, -2]), ValueError, "layers entry must be >= 0"),
        (dict(layers="1,2"), TypeError, "layers must be layer numbers"),
        (dict(layers=5), TypeError, "layers must be layer numbers"),
        (dict(chunk=0), ValueError, "chunk must be >= 1"),
        (dict(shared="yes"), TypeError, "shared must be a bool"),
        (dict(hot_blocks=0), ValueError, "hot_blocks must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockMemory(**kwargs)


def test_layers_are_normalised_and_checked():
    m = BlockMemory(layers=range(6, 2, -1))
    assert m.layers == (3, 4, 5, 6)
    assert m.applies_to(4) and not m.applies_to(2) and not m.applies_to(7)
    assert BlockMemory(layers=[2, 2, 1]).layers == (1, 2)
    m.check_layers(7)
    with pytest.raises(ValueError, match="include 6 but the model has 6 layers"):
        m.check_layers(6)
    assert hash(m) == hash(BlockMemory(layers=[3, 4, 5, 6]))  # frozen, usable as a key


def test_bytes_per_token():
    # SmolLM2: 3 kv heads of 64. float32 keys + values 512 B per head; representatives: a minimum and a maximum
    # of 64 float32 per part, 4 parts per 128 tokens: 16 B per token and head.
    assert BlockMemory(dtype="float32").bytes_per_token(3, 64) == 3 * (128 * 4 + 16)
    assert BlockMemory().bytes_per_token(3, 64) == 3 * (128 * 2 + 16)  # float16 by default
    assert BlockMemory(dtype="int8").bytes_per_token(3, 64) == 3 * (128 + 8 + 16)


# ------------------------------------------------------------------------------------------------- the rule


@pytest.mark.slow  # a property test over many drawn cases (CI runs it)
@given(
    q=st.integers(-1, 60),
    k=st.integers(-1, 60),
    G=st.integers(0, 5),
    L=st.integers(1, 12),
    bs=st.integers(1, 9),
    chunk=st.integers(1, 9),
)
@settings(max_examples=300, **SETTINGS)
def test_rule_functions_match_their_definitions(q, k, G, L, bs, chunk):
    qt, kt = torch.tensor(q), torch.tensor(k)
    assert int(block_of(kt, G, bs)) == ((k - G) // bs if k >= G else -1)
    assert int(query_chunk(qt, chunk)) == (q // chunk if q >= 0 else -1)
    # middle_blocks: the blocks whose first token is a middle key of q.
    n = int(middle_blocks(qt, G, L, bs))
    reached = [b for b in range(64) if q >= 0 and q - (G + b * bs) >= L]
    assert n == len(reached) and reached == list(range(n))
    for chosen in (True, False):
        expected = k >= G and k >= 0 and q - k >= L and q >= 0 and chosen
        assert bool(memory_rule(qt, kt, G, L, torch.tensor(chosen))) == expected
    assert bool(memory_rule(qt, kt, G, L, torch.tensor(True))) == (bool(middle_rule(qt, kt, G, L)) and q >= 0)


# ------------------------------------------------------------------------------------------------ the store


def _columns(B, Hkv, T, d, pads, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, Hkv, T, d, generator=g)
    values = torch.randn(B, Hkv, T, d + 1 if dv is None else dv, generator=g)
    k_idx = torch.stack([torch.cat([torch.full((p,), -1), torch.arange(T - p)]) for p in pads])
    return keys, values, k_idx


def _fill(store, keys, values, k_idx, upto):
    cols = store.new_columns(k_idx, upto)
    safe = cols.clamp(min=0)
    kk = torch.gather(keys, 2, safe[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
    vv = torch.gather(values, 2, safe[:, None, :, None].expand(-1, values.shape[1], -1, values.shape[-1]))
    store.add(kk, vv, upto)


def test_store_holds_the_blocks_of_each_row():
    G, bs = 3, 4
    store = BlockStore(BlockMemory(block_size=bs, representatives=2, blocks=1, dtype="float32"), n_global=G)
    keys, values, k_idx = _columns(2, 2, 40, 8, pads=[0, 9])
    # In two steps: rows form 2 and 1 blocks, then 7 and 5.
    _fill(store, keys, values, k_idx, torch.tensor([2, 1]))
    _fill(store, keys, values, k_idx, torch.tensor([7, 5]))
    assert store.formed.tolist() == [7, 5]
    for r, pad in enumerate([0, 9]):
        firsts = sorted(int(f) for f in store.first[r] if f >= 0)
        assert firsts == [G + b * bs for b in range(int(store.formed[r]))]
        for slot in range(store.slots):
            f = int(store.first[r, slot])
            if f < 0:
                continue
            cols = pad + f + torch.arange(bs)
            torch.testing.assert_close(store.keys[r, :, slot], keys[r, :, cols])
            torch.testing.assert_close(store.values[r, :, slot], values[r, :, cols])
            torch.testing.assert_close(store.summary[r, :, slot], summarise(keys[r, :, cols], 2))
    assert store.tokens_held() == (7 + 5) * bs
    assert store.blocks_held().tolist() == [7, 5]


def test_store_refuses_missing_tokens_and_other_batches():
    store = BlockStore(BlockMemory(block_size=4, representatives=1, blocks=1), n_global=2)
    keys, values, k_idx = _columns(1, 1, 20, 4, pads=[0])
    gap = k_idx.clone()
    gap[0, 5:] += 3  # tokens 5, 6, 7 are missing from the columns
    with pytest.raises(ValueError, match="not among the key columns"):
        store.new_columns(gap, torch.tensor([2]))
    _fill(store, keys, values, k_idx, torch.tensor([1]))
    with pytest.raises(ValueError, match="holds a batch of 1 rows, the input has 2"):
        store.new_columns(k_idx.expand(2, -1), torch.tensor([2, 2]))


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("int8", 1 / 127)])
def test_store_dtypes_keep_keys_close(dtype, tol):
    store = BlockStore(BlockMemory(block_size=8, representatives=2, blocks=1, dtype=dtype), n_global=0)
    keys, values, k_idx = _columns(1, 2, 64, 16, pads=[0])
    _fill(store, keys, values, k_idx, torch.tensor([8]))
    assert store.keys.dtype == {"float16": torch.float16, "int8": torch.int8}[dtype]
    mem = store.memory_of(torch.arange(8).view(1, 1, 1, 8), torch.zeros(1, 1, dtype=torch.long))
    k, v, idx = mem.blocks(torch.arange(8).view(1, 1, 8), torch.device("cpu"))
    order = idx[0, 0]
    # Per-vector error bound: half a step of the vector's scale (int8) or float16 rounding.
    bound = keys.abs().amax(-1, keepdim=True) * tol
    assert ((k - keys[:, :, order]).abs() <= bound[:, :, order] + 1e-6).all()
    bound = values.abs().amax(-1, keepdim=True) * tol
    assert ((v - values[:, :, order]).abs() <= bound[:, :, order] + 1e-6).all()
    # What it costs: the formula of BlockMemory.bytes_per_token, for a full store.
    per_token = store.memory.bytes_per_token(2, 16, 17)
    bookkeeping = store.first.numel() * 8 * 2  # first and uses, int64 per slot
    assert store.nbytes() - bookkeeping == pytest.approx(per_token * store.tokens_held())


class _SlotModel:
    """The store's slots in plain Python: at the cap, evict the least-chosen block, the oldest among equals."""

    def __init__(self, cap):
        self.cap, self.blocks, self.evicted = cap, {}, 0  # block number -> uses

    def add(self, number):
        if self.cap is not None and len(self.blocks) >= self.cap:
            victim = min(self.blocks, key=lambda b: (self.blocks[b], b))
            del self.blocks[victim]
            self.evicted += 1
        self.blocks[number] = 0


@pytest.mark.slow  # a property test over many drawn cases (CI runs it)
@given(
    cap=st.one_of(st.none(), st.integers(2, 6)),
    steps=st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 30), max_size=3)), min_size=1, max_size=8),
)
@settings(max_examples=60, **SETTINGS)
def test_store_eviction_follows_least_used(cap, steps):
    bs, G = 2, 1
    memory = BlockMemory(block_size=bs, representatives=1, blocks=2, max_blocks=cap)
    store = BlockStore(memory, n_global=G)
    model = _SlotModel(cap)
    total = sum(n for n, _ in steps)
    keys, values, k_idx = _columns(1, 1, G + total * bs + 1, 2, pads=[0])
    formed = 0
    for n, picks in steps:
        formed += n
        _fill(store, keys, values, k_idx, torch.tensor([formed]))
        for b in range(formed - n, formed):
            model.add(b)
        # Choose some held blocks (by number), counted as a chunk's choice.
        firsts = [] if store.first is None else store.first[0].tolist()
        held = {(int(f) - G) // bs: s for s, f in enumerate(firsts) if f >= 0}
        chosen = [held[b] for b in sorted(set(picks)) if b in held][:2]
        if chosen:
            store.record_uses(torch.tensor(chosen + [-1] * (2 - len(chosen))).view(1, 1, 1, 2))
            for s in chosen:
                model.blocks[(int(store.first[0, s]) - G) // bs] += 1
        assert held.keys() == model.blocks.keys()
        assert {b: int(store.uses[0, s]) for b, s in held.items()} == model.blocks
        assert int(store.evicted[0]) == model.evicted if store.evicted is not None else model.evicted == 0
        if cap is not None:
            assert store.slots <= cap


def test_select_rows_and_reset():
    store = BlockStore(BlockMemory(block_size=2, representatives=1, blocks=1), n_global=0)
    keys, values, k_idx = _columns(2, 1, 12, 2, pads=[0, 2])
    _fill(store, keys, values, k_idx, torch.tensor([5, 4]))
    firsts = store.first.clone()
    store.select_rows(torch.tensor([1, 1, 0]))
    assert store.first.tolist() == [firsts[1].tolist(), firsts[1].tolist(), firsts[0].tolist()]
    assert store.formed.tolist() == [4, 4, 5]
    store.reset()
    assert store.first is None and store.formed is None and store.nbytes() == 0


def test_hot_blocks_are_an_lru_that_copies_only_misses():
    stored = [torch.arange(2 * 3 * 5 * 2 * 1).float().view(2, 3, 5, 2, 1)]  # (batch, kv_heads, slots, bs, 1)
    hot = HotBlocks(3, torch.device("cpu"))

    def fetch(*pairs):
        rows, slots = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        [got] = hot.fetch(stored, rows, slots)
        for (r, sl), block in zip(pairs, got, strict=True):
            assert torch.equal(block, stored[0][r, :, sl])
        return hot.copied

    assert fetch((0, 1), (1, 4)) == 2
    assert fetch((1, 4), (0, 1)) == 2  # both held: nothing copied
    assert fetch((0, 2)) == 3  # a free place
    assert fetch((0, 3)) == 4  # full: the least recently used, (1, 4), goes
    assert (1, 4) not in hot.where and fetch((0, 1), (0, 2), (0, 3)) == 4
    hot.forget(0, 2)
    assert fetch((0, 2)) == 5  # a replaced slot is copied again
    assert hot.fetch(stored, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0])) is None  # more than it holds
    hot.clear()
    assert fetch((0, 1)) == 6


@pytest.mark.parametrize("capacity", [2, 64])
def test_memory_through_hot_blocks_equals_direct_reads(capacity):
    """A store in host memory serves the blocks through its LRU (on an accelerator); forced here on the CPU,
    the kernel reads exactly what it reads from the store directly, also when the LRU is too small."""
    store = _filled_store(2, 2, 4, G=1, bs=2, R=1, K=3, n_blocks=9, chunk=2, dtype="int8")
    qg = torch.randn(2, 4, 6, 4)
    q_idx = (30 + torch.arange(6)).expand(2, 6)
    choice = choose(store, qg, q_idx, 4)
    direct = store.memory_of(choice.chosen, choice.chunk)  # beside the model: the store itself
    assert direct.keys is store.keys
    store.hot = HotBlocks(capacity, torch.device("cpu"))
    cpu, mod = torch.device("cpu"), ScoreMod(0.5)
    for _ in range(2):  # the second time from the LRU
        via_hot = store.memory_of(choice.chosen, choice.chunk)  # the union of the chosen blocks, renumbered
        for c in range(direct.chosen.shape[2]):
            mine, theirs = direct.blocks(direct.chosen[:, :, c], cpu), via_hot.blocks(via_hot.chosen[:, :, c], cpu)
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
        out, lse = kmem.piece(qg, direct, q_idx, 0, 6, 1, 4, mod, 2)
        hot_out, hot_lse = kmem.piece(qg, via_hot, q_idx, 0, 6, 1, 4, mod, 2)
        assert torch.equal(out, hot_out) and torch.equal(lse, hot_lse)
    read = int((via_hot.first >= 0).sum())  # blocks the forward reads (each row's union)
    assert store.hot.copied == (read if capacity >= read else 0)  # copied once; a union too big bypasses it


# ----------------------------------------------------------------------------------------------- the choice


def _filled_store(
    B, Hkv, d, G, bs, R, K, n_blocks, shared=True, seed=0, chunk=None, dtype="float32", dv=None, max_blocks=None
):
    memory = BlockMemory(
        block_size=bs, representatives=R, blocks=K, shared=shared, chunk=chunk, dtype=dtype, max_blocks=max_blocks
    )
    store = BlockStore(memory, n_global=G)
    keys, values, k_idx = _columns(B, Hkv, G + n_blocks * bs, d, pads=[0] * B, seed=seed, dv=dv)
    _fill(store, keys, values, k_idx, torch.full((B,), n_blocks))
    return store


@pytest.mark.slow  # a property test over many drawn cases (CI runs it)
@given(
    B=st.integers(1, 2),
    kv=st.sampled_from([(1, 1), (1, 3), (2, 2)]),
    G=st.integers(0, 3),
    L=st.integers(1, 10),
    bs=st.sampled_from([1, 2, 4]),
    K=st.integers(1, 5),
    n_blocks=st.integers(0, 12),
    chunk=st.integers(1, 7),
    T=st.integers(1, 20),
    start=st.integers(0, 40),
    shared=st.booleans(),
    seed=st.integers(0, 3),
)
@settings(max_examples=80, **SETTINGS)
def test_choice_is_the_best_representatives(B, kv, G, L, bs, K, n_blocks, chunk, T, start, shared, seed):
    Hkv, rep = kv
    H, d, R = Hkv * rep, 4, min(2, bs)
    store = _filled_store(B, Hkv, d, G, bs, R, K, n_blocks, shared, seed, chunk)
    g = torch.Generator().manual_seed(seed + 7)
    queries = torch.randn(B, H, T, d, generator=g)
    q_idx = (start + torch.arange(T)).expand(B, T).clone()
    choice = choose(store, queries, q_idx, L, record=False)
    chunk_ids, C = chunks_of(q_idx, chunk)
    assert torch.equal(choice.chunk, chunk_ids)
    if n_blocks == 0:
        assert (choice.chosen == -1).all()
        return
    Hc = 1 if shared else Hkv
    assert choice.chosen.shape == (B, Hc, C, K)
    for b in range(B):
        for c in range(C):
            members = (chunk_ids[b] == c).nonzero().flatten()
            mean_q = queries[b, :, members].mean(1)  # (H, d)
            last = int(q_idx[b, members].max())
            allowed = max(0, (last - L - G) // bs + 1)  # blocks whose first token left the window
            for h in range(Hc):
                heads = range(H) if shared else range(h * rep, (h + 1) * rep)
                score = {}
                for slot in range(store.slots):
                    number = (int(store.first[b, slot]) - G) // bs
                    if store.first[b, slot] < 0 or number >= allowed:
                        continue
                    # From the stored keys: per part, sum_i max(q_i * max_i, q_i * min_i); the best part.
                    parts = store.keys[b, :, slot].view(Hkv, R, bs // R, d)  # (Hkv, R, part, d)
                    hi, lo = parts.amax(2), parts.amin(2)
                    score[slot] = sum(
                        float(torch.maximum(mean_q[hh] * hi[hh // rep], mean_q[hh] * lo[hh // rep]).sum(-1).max())
                        for hh in heads
                    )
                expected = sorted(score, key=lambda s: (-score[s], s))[:K]
                got = [s for s in choice.chosen[b, h, c].tolist() if s >= 0]
                assert len(got) == len(expected)
                # Equal up to float rounding: each chosen slot scores at least the K-th best.
                assert set(got) == set(expected) or all(score[s] >= score[expected[-1]] - 1e-5 for s in got), (
                    got,
                    expected,
                    score,
                )


@given(
    n=st.integers(1, 12),
    R=st.sampled_from([1, 2, 4]),
    d=st.integers(1, 6),
    seed=st.integers(0, 10**6),
    q=st.integers(1, 3),
)
@settings(max_examples=60, **SETTINGS)
def test_upper_bounds_bound_every_key(n, R, d, seed, q):
    """The score of a block is an upper bound of `q . k` for each of its keys, reached by some key when each part
    holds one key (Quest's bound)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, R, d, generator=g)  # n blocks of R parts of one key each...
    queries = torch.randn(q, d, generator=g)
    exact = (queries @ keys.reshape(n * R, d).T).view(q, n, R).amax(-1)
    torch.testing.assert_close(upper_bounds(queries, summarise(keys, R)), exact)
    more = torch.randn(n, R * 3, d, generator=g)  # ...and of three keys each: the bound is above every key
    bound = upper_bounds(queries, summarise(more, R))  # (q, n)
    assert (bound[:, :, None] >= torch.einsum("qd,nkd->qnk", queries, more) - 1e-5).all()


def test_choice_counts_uses_with_a_cap():
    store = _filled_store(1, 1, 4, G=1, bs=2, R=1, K=2, n_blocks=5, max_blocks=8)  # the counts order eviction
    queries = torch.randn(1, 1, 2, 4)
    q_idx = torch.tensor([[40, 41]])  # one chunk (chunk = block_size = 2)
    choice = choose(store, queries, q_idx, n_local=4)
    assert choice.chosen.shape == (1, 1, 1, 2)
    assert sorted(store.uses[0, choice.chosen[0, 0, 0]].tolist()) == [1, 1]
    assert int(store.uses.sum()) == 2
    choose(store, queries, q_idx, n_local=4, record=False)
    assert int(store.uses.sum()) == 2
    uncapped = _filled_store(1, 1, 4, G=1, bs=2, R=1, K=2, n_blocks=5)  # no cap: nothing to order, nothing counted
    choose(uncapped, queries, q_idx, n_local=4)
    assert int(uncapped.uses.sum()) == 0


# ------------------------------------------------------------------------------------------------ the kernel


def _brute_force(qg, mem, q_idx, G, L, scaling, rep, alibi=None):
    """Per query and head, from the rule's words: the chosen blocks' middle keys at distance D, one softmax."""
    B, H, T, _ = qg.shape
    Hkv, N, bs = mem.keys.shape[1:4]
    keys = mem.keys.float() * (mem.key_scale if mem.key_scale is not None else 1)
    values = mem.values.float() * (mem.value_scale if mem.value_scale is not None else 1)
    out = torch.zeros(B, H, T, values.shape[-1])
    lse = torch.full((B, H, T), -math.inf)
    for b in range(B):
        for h in range(H):
            hk = h // rep
            hc = 0 if mem.chosen.shape[1] == 1 else hk
            for t in range(T):
                i, c = int(q_idx[b, t]), int(mem.chunk[b, t])
                if i < 0 or c < 0:
                    continue
                logits, vals = [], []
                for slot in mem.chosen[b, hc, c].tolist():
                    if slot < 0 or mem.first[b, slot] < 0:
                        continue
                    for u in range(bs):
                        j = int(mem.first[b, slot]) + u
                        if j >= G and i - j >= L:
                            s = float(qg[b, h, t] @ keys[b, hk, slot, u]) * scaling
                            if alibi is not None:
                                s -= float(alibi.slopes[h]) * alibi.limit_distance
                            logits.append(s)
                            vals.append(values[b, hk, slot, u])
                if logits:
                    w = torch.tensor(logits)
                    lse[b, h, t] = torch.logsumexp(w, 0)
                    out[b, h, t] = torch.softmax(w, 0) @ torch.stack(vals)
    return out, lse


@st.composite
def kernel_cases(draw):
    Hkv, rep = draw(st.sampled_from([(1, 1), (1, 2), (2, 2), (3, 3)]))
    B = draw(st.integers(1, 3))
    return dict(
        B=B,
        Hkv=Hkv,
        rep=rep,
        G=draw(st.integers(0, 4)),
        L=draw(st.integers(1, 10)),
        bs=draw(st.sampled_from([1, 2, 3, 4])),
        K=draw(st.integers(1, 4)),
        n_blocks=draw(st.integers(1, 10)),
        chunk=draw(st.integers(1, 6)),
        T=draw(st.integers(1, 14)),
        start=draw(st.integers(0, 50)),
        pads=[draw(st.integers(0, 4)) for _ in range(B)],
        shared=draw(st.booleans()),
        dtype=draw(st.sampled_from(["float32", "float16", "int8"])),
        alibi=draw(st.booleans()),
        seed=draw(st.integers(0, 5)),
        dv=draw(st.sampled_from([4, 5])),  # 4 = the head size of the keys: the fused CPU path; 5: the masked one
    )


def _case_memory(case):
    B, Hkv, rep, G, bs, T = case["B"], case["Hkv"], case["rep"], case["G"], case["bs"], case["T"]
    H, d = Hkv * rep, 4
    store = _filled_store(
        B,
        Hkv,
        d,
        G,
        bs,
        1,
        case["K"],
        case["n_blocks"],
        case["shared"],
        case["seed"],
        case["chunk"],
        case["dtype"],
        case["dv"],
    )
    qg = torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(case["seed"] + 1))
    pads = torch.tensor(case["pads"])[:, None]
    q_idx = torch.where(torch.arange(T) < pads, -1, case["start"] + torch.arange(T) - pads)
    choice = choose(store, qg, q_idx, case["L"])
    mem = store.memory_of(choice.chosen, choice.chunk)
    alibi = Alibi(torch.linspace(0.1, 0.9, H), case["L"]) if case["alibi"] else None
    return mem, qg, q_idx, rep, alibi


@pytest.mark.slow  # a property test over many drawn cases (CI runs it)
@given(case=kernel_cases())
@settings(max_examples=150, **SETTINGS)
def test_piece_equals_dense_reference_and_brute_force(case):
    mem, qg, q_idx, rep, alibi = _case_memory(case)
    G, L, scaling = case["G"], case["L"], 0.5
    mod = ScoreMod(scaling, alibi=alibi)
    T = qg.shape[2]
    # The kernel piece, over spans of queries that cut chunks anywhere.
    outs, lses = [], []
    for s in range(0, T, 5):
        e = min(s + 5, T)
        o, lse = kmem.piece(qg[:, :, s:e], mem, q_idx[:, s:e], s, e, G, L, mod, rep)
        outs.append(o)
        lses.append(lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    # The dense reference.
    logits, values = kmem.dense_scores(qg, mem, q_idx, G, L, mod, rep)
    ref_lse = torch.logsumexp(logits, -1)
    ref = torch.softmax(logits, -1).nan_to_num(0.0) @ values
    bf_out, bf_lse = _brute_force(qg, mem, q_idx, G, L, scaling, rep, alibi)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, bf_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, bf_out, atol=1e-4, rtol=1e-4)


def test_every_block_chosen_is_every_middle_key_at_distance_D():
    """With K >= the blocks and one chunk per query, memory sees exactly the middle keys of each query (the
    top-k rule with k = all middle keys), each at distance D: a block joins as soon as its first token leaves
    the window, and its tokens still in the window stay local."""
    G, L, bs, n_blocks, d = 2, 5, 3, 6, 4
    store = _filled_store(1, 2, d, G, bs, 1, n_blocks, n_blocks, chunk=1)
    keys = store.keys[0].flatten(1, 2)  # (Hkv, n_blocks * bs, d): tokens G .. in order (slots filled in order)
    values = store.values[0].flatten(1, 2)
    T = 30
    qg = torch.randn(1, 4, T, d)
    q_idx = torch.arange(T)[None]
    choice = choose(store, qg, q_idx, L)
    mem = store.memory_of(choice.chosen, choice.chunk)
    out, lse = kmem.piece(qg, mem, q_idx, 0, T, G, L, ScoreMod(0.5), 2)
    for t in range(T):
        middle = [j - G for j in range(G, G + n_blocks * bs) if t - j >= L]
        for h in range(4):
            if not middle:
                assert lse[0, h, t] == -math.inf and (out[0, h, t] == 0).all()
                continue
            w = (keys[h // 2, middle] @ qg[0, h, t]) * 0.5
            torch.testing.assert_close(out[0, h, t], torch.softmax(w, 0) @ values[h // 2, middle])
            torch.testing.assert_close(lse[0, h, t], torch.logsumexp(w, 0))


def test_memory_value_checks_shapes():
    k = torch.zeros(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="disagree"):
        kmem.Memory(k, torch.zeros(1, 2, 3, 5, 5), torch.zeros(1, 3), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="chosen blocks"):
        kmem.Memory(k, k, torch.zeros(1, 3), torch.zeros(1, 3, 1, 1), torch.zeros(1, 1))


# ------------------------------------------------------------------------------------------- the model level

GM, LM = 2, 8  # n_global, n_local of the model-level tests
# One choice per query (any split of a sequence into forwards agrees); float32 so that keys compare exactly.
MEM = BlockMemory(block_size=4, representatives=2, blocks=2, chunk=1, dtype="float32")
MODELS = {"llama": lambda: tiny_model("llama", max_position_embeddings=64), "mpt": lambda: family_model("mpt")}


def _model_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=pytest.mark.slow)])
def test_model_with_memory_equals_the_naive_reference(name, backend):
    model = MODELS[name]()
    x = ids(12 * LM, seed=1)
    lminfinite.enable(model, n_global=GM, n_local=LM, memory=MEM, backend="naive")
    ref = _model_logits(model, x)
    lminfinite.enable(model, n_global=GM, n_local=LM, memory=MEM, backend=backend)
    torch.testing.assert_close(_model_logits(model, x), ref, atol=1e-4, rtol=1e-4)
    lminfinite.enable(model, n_global=GM, n_local=LM)
    plain = _model_logits(model, x)
    torch.testing.assert_close(plain[:, : GM + LM], ref[:, : GM + LM], atol=1e-5, rtol=0)  # no block reached yet
    assert (plain - ref).abs().max() > 1e-3  # memory changes what follows


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 7, 3 * LM])
def test_cached_feeding_equals_one_naive_forward(name, chunk):
    model = MODELS[name]()
    x = ids(12 * LM, seed=2)
    lminfinite.enable(model, n_global=GM, n_local=LM, memory=MEM, backend="naive")
    ref = _model_logits(model, x)
    lminfinite.enable(model, n_global=GM, n_local=LM, memory=MEM)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        out = torch.cat(
            [model(input_ids=x[:, s : s + chunk], cache=cache).logits for s in range(0, x.shape[1], chunk)], 1
        )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # The window part stays bounded; the middle is in the stores, in blocks.
    assert cache.layers[0].keys.shape[-2] <= GM + LM - 1
    store = cache.lambda_layers[0].store
    assert store is not None and int(store.formed[0]) == (x.shape[1] - LM - GM) // 4 + 1


def test_prefill_chunks_on_chunk_boundaries_equal_one_forward():
    """With prefill chunks of several queries, a forward split on chunk boundaries chooses the same blocks."""
    memory = BlockMemory(block_size=4, representatives=2, blocks=2)  # chunk = block_size = 4
    model = MODELS["llama"]()
    x = ids(16 * LM, seed=3)
    lminfinite.enable(model, n_global=GM, n_local=LM, memory=memory)
    ref = _model_logits(model, x)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        out = torch.cat([model(input_ids=x[:, s : s + 12], cache=cache).logits for s in range(0, x.shape[1], 12)], 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_block_chosen_equals_top_k_of_every_middle_key(name):
    """Blocks covering the whole middle: the output is LM-Infinite with every middle key at distance D (the
    naive reference of top-k with k = every middle key), so the choice is the only approximation."""
    model = MODELS[name]()
    x = ids(10 * LM, seed=4)
    lminfinite.enable(model, n_global=GM, n_local=LM, top_k=10 * LM, backend="naive")
    ref = _model_logits(model, x)
    every = BlockMemory(block_size=4, representatives=2, blocks=10 * LM, chunk=1, dtype="float32")
    for backend in ("naive", "torch"):
        lminfinite.enable(model, n_global=GM, n_local=LM, memory=every, backend=backend)
        torch.testing.assert_close(_model_logits(model, x), ref, atol=1e-4, rtol=1e-4)


def test_memory_sees_its_blocks_within_half_the_pretraining_length():
    """With memory and no limit_distance, D = n_local but at most half the pretraining length (64 here):
    memory seen at the pretraining length's edge is not read (api.memory_distance)."""
    model = MODELS["llama"]()
    distance = lambda **kw: lminfinite.config_of(lminfinite.enable(model, n_global=GM, **kw)).distance  # noqa: E731
    assert distance(n_local=48, memory=MEM) == 32
    assert distance(n_local=48) == 48  # plain Λ: LM-Infinite's D = n_local
    assert distance(n_local=48, memory=MEM, limit_distance=40) == 40  # an explicit D wins
    assert distance(n_local=16, memory=MEM) == 16  # a window within half the length keeps D = n_local
    assert distance(memory=MEM) == 32  # n_local defaults to the pretraining length


def test_greedy_generation_equals_naive_recomputation():
    model = lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, memory=MEM)
    assert_greedy_equals_naive_recomputation(model, ids(LM + 5, seed=5), 5 * LM, n_global=GM, n_local=LM, memory=MEM)


def test_left_padded_batch_equals_its_rows():
    model = lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, memory=MEM)
    x, mask = left_padded([9 * LM, 7 * LM, 9 * LM - 3], seed=6)
    batch = _model_logits(model, x, attention_mask=mask)
    for r in range(3):
        n = int(mask[r].sum())
        alone = _model_logits(model, x[r : r + 1, -n:])
        torch.testing.assert_close(batch[r, -n:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_long_stream_keeps_the_hot_part_bounded_and_the_cap_evicts():
    capped = BlockMemory(block_size=4, representatives=2, blocks=2, max_blocks=5, chunk=1)
    model = lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, memory=capped)
    cache = LambdaCache.for_model(model)
    x = ids(20 * LM, seed=7)
    with torch.no_grad():
        for s in range(0, x.shape[1], 5):
            model(input_ids=x[:, s : s + 5], cache=cache)
            assert all(layer.keys.shape[-2] <= GM + LM - 1 for layer in cache.lambda_layers)
            assert all(layer.store is None or layer.store.slots <= 5 for layer in cache.lambda_layers)
    store = cache.lambda_layers[1].store
    formed = (x.shape[1] - LM - GM) // 4 + 1
    assert int(store.formed[0]) == formed and int(store.evicted[0]) == formed - 5
    assert int((store.first >= 0).sum()) == 5
    # Bytes: the stores' keys, values and representatives at BlockMemory.bytes_per_token, plus bookkeeping.
    cfg = model.config
    per_token = capped.bytes_per_token(cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    slots = sum(layer.store.slots for layer in cache.lambda_layers)
    assert cache.store_bytes() == pytest.approx(per_token * 4 * slots + slots * 16)
    assert cache.store_tokens() == 2 * 5 * 4
    # The uncapped store keeps every block: what it costs grows with the stream, the window does not.
    model = lminfinite.enable(model, n_global=GM, n_local=LM, memory=MEM)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        model(input_ids=x, cache=cache)
    assert cache.store_tokens() == 2 * formed * 4
    assert cache.layers[0].keys.shape[-2] == GM + LM - 1


def test_memory_in_some_layers_only():
    model = MODELS["llama"]()  # 2 layers: memory in layer 1 only
    x = ids(8 * LM, seed=8)
    lminfinite.enable(model, n_global=GM, n_local=LM)
    plain = model(input_ids=x, use_cache=False, output_hidden_states=True)
    lminfinite.enable(
        model, n_global=GM, n_local=LM, memory=BlockMemory(block_size=4, representatives=2, blocks=2, layers=[1])
    )
    mem = model(input_ids=x, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(mem.hidden_states[1], plain.hidden_states[1], atol=0, rtol=0)
    assert (mem.logits - plain.logits).abs().max() > 1e-3
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        model(input_ids=x, cache=cache)
    assert cache.lambda_layers[0].store is None and cache.lambda_layers[1].store is not None


def test_int8_store_is_smaller_and_close():
    model = MODELS["llama"]()
    x = ids(10 * LM, seed=9)
    every = dict(block_size=4, representatives=2, blocks=10 * LM, chunk=1)  # every block: no choice to differ
    sizes, outs = {}, {}
    for dtype in ("float32", "int8"):
        lminfinite.enable(model, n_global=GM, n_local=LM, memory=BlockMemory(dtype=dtype, **every))
        cache = LambdaCache.for_model(model)
        with torch.no_grad():
            outs[dtype] = model(input_ids=x, cache=cache).logits
        sizes[dtype] = cache.store_bytes()
    # Same slots in both: each costs block_size tokens at bytes_per_token, plus 16 bytes of bookkeeping (head dim
    # 8 here, so the int8 scales and the representatives weigh more than with real heads of 64).
    slot = {d: BlockMemory(dtype=d, **every).bytes_per_token(2, 8) * 4 + 16 for d in sizes}
    assert sizes["int8"] / sizes["float32"] == pytest.approx(slot["int8"] / slot["float32"])
    assert sizes["int8"] < 0.6 * sizes["float32"]
    torch.testing.assert_close(outs["int8"], outs["float32"], atol=0.05, rtol=0)
    assert (outs["int8"] - outs["float32"]).abs().max() > 0  # really quantized


def test_beam_search_and_batch_bookkeeping_carry_the_store():
    model = lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, memory=MEM)
    prompt = ids(4 * LM, seed=10)
    out = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 4 * LM + 6)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        model(input_ids=ids(4 * LM, seed=11, rows=2), cache=cache)
    firsts = cache.lambda_layers[0].store.first.clone()
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.lambda_layers[0].store.first, firsts.repeat_interleave(2, 0))
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert torch.equal(cache.lambda_layers[0].store.first, firsts[[1, 0]])
    cache.reset()
    assert cache.lambda_layers[0].store.first is None and cache.store_bytes() == 0


def test_crop_is_possible_until_the_first_block_is_stored():
    model = lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, memory=MEM)
    x = ids(GM + LM + 12, seed=12)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        model(input_ids=x[:, : GM + LM - 1], cache=cache)  # nothing dropped, no block stored yet
        cache.crop(-3)
        model(input_ids=x[:, GM + LM - 4 :], cache=cache)  # the first block is stored, columns are dropped
    assert int(cache.lambda_layers[0].store.formed[0]) > 0
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.crop(-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(memory=BlockMemory(block_size=16)), ValueError, "block_size=16 > n_local=8"),
        (dict(memory=MEM, top_k=2), ValueError, "memory and top_k"),
        (dict(memory=MEM, sink_positions="own"), ValueError, "sink_positions='zero'"),
        (dict(memory=BlockMemory(block_size=4, representatives=2, layers=[2])), ValueError, "model has 2 layers"),
        (dict(memory={"block_size": 4}), TypeError, "memory must be a lminfinite.BlockMemory"),
    ],
)
def test_bad_memory_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, **kwargs)


def test_memory_on_a_model_whose_layers_all_keep_their_own_window_is_refused():
    model = tiny_model("mistral", sliding_window=LM, max_position_embeddings=64)
    with pytest.raises(ValueError, match="applies to no layer"):
        lminfinite.enable(model, n_global=GM, n_local=LM, memory=MEM)


def test_a_cache_must_match_the_memory_setting():
    model = lminfinite.enable(MODELS["llama"](), n_global=GM, n_local=LM, memory=MEM)
    with pytest.raises(ValueError, match="made for memory=None"):
        model(input_ids=ids(4), cache=LambdaCache(LambdaConfig(n_global=GM, n_local=LM), 2))


# ------------------------------------------------------------------- every backend, drawn cases (property)


@st.composite
def full_kernel_cases(draw):
    L = draw(st.integers(2, 10))
    Hkv, rep = draw(st.sampled_from([(1, 1), (1, 2), (2, 2), (2, 1)]))
    B = draw(st.integers(1, 3))
    Tk = draw(st.integers(1, 6 * L + 12))
    return dict(
        B=B,
        Hkv=Hkv,
        rep=rep,
        L=L,
        G=draw(st.integers(0, 4)),
        Tk=Tk,
        Tq=draw(st.integers(1, Tk)),
        pads=[draw(st.integers(0, Tk - 1)) for _ in range(B)],
        bs=draw(st.integers(1, L)),
        K=draw(st.integers(1, 4)),
        chunk=draw(st.integers(1, 6)),
        shared=draw(st.booleans()),
        dtype=draw(st.sampled_from(["float32", "float16", "int8"])),
        alibi=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, None, 3.0])),
        backend=draw(st.sampled_from(["torch", "torch-masked", "flex"])),
        block_size=draw(st.one_of(st.none(), st.integers(1, 12))),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.slow  # a property test over many drawn cases (CI runs it)
@given(c=full_kernel_cases())
@settings(max_examples=120, **SETTINGS)
def test_every_kernel_with_memory_equals_the_naive_reference(c):
    """The kernels with block memory (chunked band and masked paths, FlexAttention) == the naive reference,
    given the same chosen blocks: drawn G, L, block size, blocks chosen, chunk, GQA, left padding, store dtype."""
    from lminfinite.kernels import get_kernel, torch_chunked
    from lminfinite.kernels.common import Far
    from lminfinite.plan import candidate_columns

    g = torch.Generator().manual_seed(c["seed"])
    B, Hkv, rep, Tk, Tq, G, L = c["B"], c["Hkv"], c["rep"], c["Tk"], c["Tq"], c["G"], c["L"]
    H, d = Hkv * rep, 4
    valid = torch.ones(B, Tk, dtype=torch.bool)
    for b, p in enumerate(c["pads"]):
        valid[b, :p] = False
    k_idx = torch.where(valid, valid.long().cumsum(1) - 1, -1)
    q_idx = k_idx[:, Tk - Tq :]
    q, qg = torch.randn(B, H, Tq, d, generator=g), torch.randn(B, H, Tq, d, generator=g)
    k, k0, v = (torch.randn(B, Hkv, Tk, d, generator=g) for _ in range(3))
    memory = BlockMemory(
        block_size=c["bs"], representatives=1, blocks=c["K"], chunk=c["chunk"], shared=c["shared"], dtype=c["dtype"]
    )
    store = BlockStore(memory, n_global=G)
    store.ingest(k0, v, k_idx, store.due(q_idx, L))
    mem = None
    if store.first is not None:
        choice = choose(store, qg, q_idx, L)
        mem = store.memory_of(choice.chosen, choice.chunk)
    S = candidate_columns(k_idx, G)
    far = Far(qg, k[:, :, :S], v[:, :, :S], k_idx[:, :S], memory=mem) if S or mem is not None else None
    alibi = Alibi(2.0 ** -torch.arange(1, H + 1, dtype=torch.float32), L) if c["alibi"] else None
    kw = dict(n_global=G, n_local=L, mod=ScoreMod(0.5, c["softcap"], alibi))
    ref = get_kernel("naive")(q, k, v, q_idx, k_idx, far, **kw)
    fused = torch_chunked._FUSED
    try:
        if c["backend"] == "torch-masked":
            torch_chunked._FUSED = None
        kernel = get_kernel("flex" if c["backend"] == "flex" else "torch")
        out = kernel(q, k, v, q_idx, k_idx, far, **kw, block_size=c["block_size"])
    finally:
        torch_chunked._FUSED = fused
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@st.composite
def model_memory_cases(draw):
    L = draw(st.integers(2, 10))
    n = draw(st.integers(1, 60))
    B = draw(st.integers(1, 3))
    return dict(
        G=draw(st.integers(0, 4)),
        L=L,
        n=n,
        pads=[draw(st.integers(0, n - 1)) for _ in range(B)],
        chunk=draw(st.integers(1, 24)),
        bs=draw(st.integers(1, L)),
        K=draw(st.integers(1, 3)),
        layers=draw(st.sampled_from([None, (0,), (1,)])),
        shared=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.slow  # a property test over many drawn cases (CI runs it)
@given(c=model_memory_cases())
@settings(max_examples=40, **SETTINGS)
def test_cached_model_with_memory_equals_the_naive_recomputation(c):
    """A left-padded batch fed chunk by chunk through a LambdaCache with block memory (stores filled before
    columns are dropped) gives, at every real token, the logits of one uncached naive forward."""
    model = MODELS["llama"]()
    g = torch.Generator().manual_seed(c["seed"])
    B, n = len(c["pads"]), c["n"]
    x = torch.randint(3, 101, (B, n), generator=g)
    mask = torch.ones(B, n, dtype=torch.long)
    for b, p in enumerate(c["pads"]):
        mask[b, :p] = 0
    memory = BlockMemory(
        block_size=c["bs"], representatives=1, blocks=c["K"], chunk=1, layers=c["layers"], shared=c["shared"]
    )
    lminfinite.enable(model, n_global=c["G"], n_local=c["L"], memory=memory, backend="naive")
    ref = _model_logits(model, x, attention_mask=mask)
    lminfinite.enable(model, n_global=c["G"], n_local=c["L"], memory=memory)
    cache = LambdaCache.for_model(model)
    with torch.no_grad():
        out = torch.cat(
            [
                model(input_ids=x[:, s : s + c["chunk"]], attention_mask=mask[:, : s + c["chunk"]], cache=cache).logits
                for s in range(0, n, c["chunk"])
            ],
            1,
        )
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
