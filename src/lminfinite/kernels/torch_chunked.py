"""The chunked PyTorch kernel: O(n·(G+L)) time and memory, exact.

Queries are taken in blocks. A block of queries reads only the keys of its band (the `L - 1`
columns before it and its own columns) for the local branch, and the `S` candidate starting keys
for the global branch. Both branches' scores go through one softmax (concatenated), so the result
equals the naive kernel's up to float rounding. Grouped-query attention reads each kv head once
(no `repeat_kv` copy). When every key lies inside every query's window (inputs no longer than
`L`, no padding), it is plain causal attention and goes to `scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rule import global_rule, local_rule

_NEG = torch.finfo(torch.float32).min  # finite: a padding query gets no NaN


def _default_block(n_local: int, heads: int, band_extra: int) -> int:
    # About 32M float32 scores per block at most, and a block no longer than the window.
    budget = 32 * 2**20 // max(1, heads * (n_local + band_extra))
    return max(16, min(n_local, budget))


def _is_plain_causal(q_idx, k_idx, n_local) -> bool:
    """True when the Λ rule reduces to causal attention: same columns, no padding, all inside L."""
    if q_idx.shape != k_idx.shape:
        return False
    return bool((k_idx[:, 0] == 0).all() and (k_idx[:, -1] < n_local).all() and (k_idx >= 0).all())


def attention(
    q, k, v, q_idx, k_idx, qg, kg, vg, g_idx, *, n_global, n_local, scaling, softcap=None, block_size=None
) -> torch.Tensor:
    B, H, Tq, _ = q.shape
    Hkv, Tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = H // Hkv
    if softcap is None and _is_plain_causal(q_idx, k_idx, n_local):
        return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=scaling, enable_gqa=rep > 1)

    offset = Tk - Tq  # key column of query t is t + offset
    has_global = qg is not None and kg.shape[2] > 0
    S = kg.shape[2] if has_global else 0
    bq = block_size or _default_block(n_local, H, S)

    # (B, Hkv, rep, T, d) views: heads grouped by the kv head they read.
    q5 = (q * scaling).view(B, Hkv, rep, Tq, -1)
    if has_global:
        qg5 = (qg * scaling).view(B, Hkv, rep, Tq, -1)
        kg_t = kg.transpose(-1, -2)
    out = q.new_empty(B, Hkv, rep, Tq, dv)

    for s in range(0, Tq, bq):
        e = min(s + bq, Tq)
        n = e - s
        lo, hi = max(0, s + offset - n_local + 1), e + offset
        kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
        qb = q5[:, :, :, s:e].reshape(B, Hkv, rep * n, -1)
        scores = (qb @ kb.transpose(-1, -2)).view(B, Hkv, rep, n, hi - lo).float()
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        qi = q_idx[:, s:e, None]
        allowed = local_rule(qi, k_idx[:, None, lo:hi], n_local)
        scores.masked_fill_(~allowed[:, None, None], _NEG)
        if has_global:
            gb = qg5[:, :, :, s:e].reshape(B, Hkv, rep * n, -1)
            gscores = (gb @ kg_t).view(B, Hkv, rep, n, S).float()
            if softcap is not None:
                gscores = softcap * torch.tanh(gscores / softcap)
            gallowed = global_rule(qi, g_idx[:, None, :], n_global, n_local)
            gscores.masked_fill_(~gallowed[:, None, None], _NEG)
            scores = torch.cat([scores, gscores], dim=-1)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        ob = probs[..., : hi - lo].reshape(B, Hkv, rep * n, hi - lo) @ vb
        if has_global:
            ob = ob + probs[..., hi - lo :].reshape(B, Hkv, rep * n, S) @ vg
        out[:, :, :, s:e] = ob.view(B, Hkv, rep, n, dv)

    out = out.view(B, H, Tq, dv)
    return out.masked_fill_((q_idx < 0)[:, None, :, None], 0.0)
