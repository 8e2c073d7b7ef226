"""The O(n^2) reference: every score computed, the Λ rule applied as a dense mask, one softmax.

Used by tests as the executable specification; never by default.
"""

from __future__ import annotations

import torch

from ..rule import global_rule, local_rule


def attention(
    q, k, v, q_idx, k_idx, qg, kg, vg, g_idx, *, n_global, n_local, scaling, softcap=None, block_size=None
) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = local_rule(q_idx[:, None, :, None], k_idx[:, None, None, :], n_local)
    scores = scores.masked_fill(~allowed, float("-inf"))
    values = v
    if qg is not None and kg.shape[2] > 0:
        kg, vg = kg.repeat_interleave(rep, 1).float(), vg.repeat_interleave(rep, 1).float()
        gscores = (qg.float() @ kg.transpose(-1, -2)) * scaling
        if softcap is not None:
            gscores = softcap * torch.tanh(gscores / softcap)
        gallowed = global_rule(q_idx[:, None, :, None], g_idx[:, None, None, :], n_global, n_local)
        scores = torch.cat([scores, gscores.masked_fill(~gallowed, float("-inf"))], dim=-1)
        values = torch.cat([v, vg], dim=-2)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = probs @ values
    out = out.masked_fill((q_idx < 0)[:, None, :, None], 0.0)
    return out.to(q.dtype)
