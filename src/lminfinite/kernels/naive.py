"""The O(n^2) reference: every score computed, the Λ rule applied as a dense mask, one softmax.

Used by tests as the executable specification; never by default. It reads as the method: the
logits of local keys (`ScoreMod.local`), of the starting tokens outside the window, of each query's
k best middle keys and of the keys of the memory blocks chosen for its chunk (`ScoreMod.far`, with the
queries moved to distance D), each masked by its branch of `rule.py`, then one softmax over all of them.
"""

from __future__ import annotations

import torch

from ..rule import global_rule, local_rule, middle_rule
from .common import Far
from .memory import dense_scores
from .score_mod import ScoreMod


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
    mod: ScoreMod,
    block_size: int | None = None,
) -> torch.Tensor:
    """The contract of `kernels/__init__.py`, computed densely."""
    H, rep = q.shape[1], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    qi, ki = q_idx[:, None, :, None], k_idx[:, None, None, :]  # (B, 1, Tq, 1), (B, 1, 1, Tk)
    scores = mod.local(q.float() @ k.transpose(-1, -2), qi, ki, (1, H))
    all_scores, values = [scores.masked_fill(~local_rule(qi, ki, n_local), float("-inf"))], [v]
    if far:
        qg = far.queries.float()
        if far.n_candidates > 0:  # starting tokens outside the window, at distance D
            gi = far.idx[:, None, None, :]
            gscores = mod.far(qg @ far.keys.repeat_interleave(rep, 1).float().transpose(-1, -2), qi, gi, (1, H))
            all_scores.append(gscores.masked_fill(~global_rule(qi, gi, n_global, n_local), float("-inf")))
            values.append(far.values.repeat_interleave(rep, 1).float())
        if far.middle is not None:  # each query's k best middle keys, scored and seen at distance D
            middle, mi = far.middle, far.middle.idx[:, None, None, :]
            mscores = mod.far(qg @ middle.keys.repeat_interleave(rep, 1).float().transpose(-1, -2), qi, mi, (1, H))
            mscores = mscores.masked_fill(~middle_rule(qi, mi, n_global, n_local), float("-inf"))
            # Among equal scores the earlier key wins.
            order = mscores.sort(dim=-1, descending=True, stable=True).indices[..., : middle.top_k]
            best = torch.zeros_like(mscores, dtype=torch.bool).scatter_(-1, order, True)
            all_scores.append(mscores.masked_fill(~best, float("-inf")))
            values.append(middle.values.repeat_interleave(rep, 1).float())
        if far.memory is not None:  # every stored key, where its block was chosen for the query's chunk
            mscores, mvalues = dense_scores(qg, far.memory, q_idx, n_global, n_local, mod, rep)
            all_scores.append(mscores)
            values.append(mvalues)
    probs = torch.softmax(torch.cat(all_scores, dim=-1), dim=-1).nan_to_num(0.0)
    out = probs @ torch.cat(values, dim=-2)
    out = out.masked_fill((q_idx < 0)[:, None, :, None], 0.0)
    return out.to(q.dtype)
