"""The O(n^2) reference: every score computed, the Λ rule applied as a dense mask, one softmax.

Used by tests as the executable specification; never by default.
"""

from __future__ import annotations

import torch

from ..positions import Alibi
from ..rule import global_rule, local_rule, middle_rule
from .common import Far


def _capped(scores, softcap):
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    far: Far | None = None,
    *,
    n_global: int,
    n_local: int,
    scaling: float,
    softcap: float | None = None,
    block_size: int | None = None,
    alibi: Alibi | None = None,
) -> torch.Tensor:
    """The contract of `kernels/__init__.py`, computed densely."""
    H, rep = q.shape[1], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    scores = _capped((q.float() @ k.transpose(-1, -2)) * scaling, softcap)
    qi = q_idx[:, None, :, None]
    if alibi is not None:
        scores = scores + alibi.bias(qi - k_idx[:, None, None, :], (1, H))
    scores = scores.masked_fill(~local_rule(qi, k_idx[:, None, None, :], n_local), float("-inf"))
    all_scores, values = [scores], [v]
    if far:
        all_scores, values = _far_scores(far, all_scores, values, qi, H, rep, n_global, n_local, scaling, softcap)
    probs = torch.softmax(torch.cat(all_scores, dim=-1), dim=-1).nan_to_num(0.0)
    out = probs @ torch.cat(values, dim=-2)
    out = out.masked_fill((q_idx < 0)[:, None, :, None], 0.0)
    return out.to(q.dtype)


def _far_scores(far: Far, all_scores, values, qi, H, rep, n_global, n_local, scaling, softcap):
    """`all_scores` and `values` with the far keys' added: the starting tokens outside each query's window,
    and each query's k best middle keys (top-k), all scored with the queries moved to distance D."""
    qg = far.queries.float()
    if far.n_candidates > 0:
        kg = far.keys.repeat_interleave(rep, 1).float()
        gscores = _capped((qg @ kg.transpose(-1, -2)) * scaling, softcap)
        gi = far.idx[:, None, None, :]
        bias = far.bias(qi, gi, (1, H))
        if bias is not None:
            gscores = gscores + bias
        all_scores = all_scores + [gscores.masked_fill(~global_rule(qi, gi, n_global, n_local), float("-inf"))]
        values = values + [far.values.repeat_interleave(rep, 1).float()]
    middle = far.middle
    if middle is not None:
        km = middle.keys.repeat_interleave(rep, 1).float()
        mscores = _capped((qg @ km.transpose(-1, -2)) * scaling, softcap)
        mi = middle.idx[:, None, None, :]
        bias = far.bias(qi, mi, (1, H))
        if bias is not None:
            mscores = mscores + bias
        mscores = mscores.masked_fill(~middle_rule(qi, mi, n_global, n_local), float("-inf"))
        # The k best middle keys of each query and head; among equal scores the earlier key wins.
        order = mscores.sort(dim=-1, descending=True, stable=True).indices[..., : middle.top_k]
        best = torch.zeros_like(mscores, dtype=torch.bool).scatter_(-1, order, True)
        all_scores = all_scores + [mscores.masked_fill(~best, float("-inf"))]
        values = values + [middle.values.repeat_interleave(rep, 1).float()]
    return all_scores, values
