"""The optional top-k extension: each query also attends its `k` best-scoring middle keys.

As in the official code's top-k attention, a middle key (neither a starting token nor in the
query's window) is scored like a starting token, at distance `D`: the query re-rotated to `D`
against the key at position 0 (RoPE), or with the bias of distance `D` (ALiBi). Per query and
head, the `k` highest of these logits join the softmax at those values. Ties go to the earlier
key (they are common: in the first layer, a repeated token has the same key at position 0).

Scoring every middle key is O(n) per query, and the middle must be kept in the cache, so memory
grows with the stream: that is the price of the extension, which is off unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rule import middle_rule
from .score_mod import ScoreMod

# Middle scores taken at once: 2**22 float32 scores are 16 MB, about 5x that with the selection's temporaries.
_SCORES_PER_PASS = 2**22


@dataclass
class Middle:
    """The keys the top-k extension chooses from, for one layer and one forward.

    keys: (batch, kv_heads, M, d) the first M key columns, brought to position 0 (RoPE).
    values: (batch, kv_heads, M, dv); idx: (batch, M) their token indices (-1: padding).
    top_k: how many middle keys each query attends.
    """

    keys: torch.Tensor
    values: torch.Tensor
    idx: torch.Tensor
    top_k: int


def select(qg, middle: Middle, q_idx, n_global: int, n_local: int, mod: ScoreMod, rep: int):
    """For queries `qg` (batch, heads, n, d) at distance D: the logits of their top-k middle keys
    (batch, heads, n, k), -inf where a query has fewer middle keys, and those keys' values
    (batch, heads, n, k, dv).

    The choice is made without autograd. When gradients are recorded (training), the chosen logits
    are computed again from the k chosen keys, so what autograd keeps is O(n * k) per layer rather
    than every query's scores of every middle key (O(n^2): gigabytes at 8k tokens). The gradient is
    the same: a top-k passes gradient only to the chosen scores."""
    B, H, n, _ = qg.shape
    Hkv, M, dv = middle.keys.shape[1], middle.keys.shape[2], middle.values.shape[-1]
    k = min(middle.top_k, M)
    kt = middle.keys.float().transpose(-1, -2)
    step = max(1, _SCORES_PER_PASS // max(1, B * H * M))
    differentiable = torch.is_grad_enabled() and (qg.requires_grad or middle.keys.requires_grad)
    top_scores, top_values = [], []
    for s in range(0, n, step):
        e = min(s + step, n)
        with torch.no_grad():
            dots = (qg[:, :, s:e].reshape(B, Hkv, rep * (e - s), -1).float() @ kt).view(B, H, e - s, M)
            scores = mod.far(dots, q_idx[:, None, s:e, None], middle.idx[:, None, None, :], (1, H))
            del dots
            allowed = middle_rule(q_idx[:, s:e, None], middle.idx[:, None, :], n_global, n_local)
            best, where = _top_k(scores.masked_fill(~allowed[:, None], float("-inf")), k)
            del scores, allowed
        # The chosen columns, gathered per kv head: (B, Hkv, rep * n * k) column indices.
        cols = where.reshape(B, Hkv, rep * (e - s) * k, 1)
        chosen = torch.gather(middle.values, 2, cols.expand(-1, -1, -1, dv)).view(B, H, e - s, k, dv)
        if differentiable:
            best = _rescore(qg[:, :, s:e], middle, cols, where, best, q_idx[:, s:e], mod)
        top_scores.append(best)
        top_values.append(chosen)
    return torch.cat(top_scores, 2), torch.cat(top_values, 2)


def _rescore(qg_b, middle: Middle, cols, where, best, q_idx_b, mod: ScoreMod):
    """The logits `best` (B, H, m, k) of the chosen middle keys, computed again with autograd from the
    chosen keys only (`cols`: their columns per kv head, `where`: per head); -inf stays -inf."""
    B, H, m, k = best.shape
    d = middle.keys.shape[-1]
    keys = torch.gather(middle.keys, 2, cols.expand(-1, -1, -1, d)).view(B, H, m, k, d)
    dots = (qg_b.float()[..., None, :] @ keys.float().transpose(-1, -2)).squeeze(-2)
    idx = torch.gather(middle.idx[:, None, None, :].expand(B, H, m, -1), -1, where)
    logits = mod.far(dots, q_idx_b[:, None, :, None], idx, (1, H))
    return torch.where(best == float("-inf"), best, logits)


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest scores along the last dimension and their indices; ties go to the earlier index.

    `torch.topk` leaves ties unspecified. On the CPU its answer is kept for the rows where it is the
    only one (exactly k scores reach the k-th value), and only the other rows are redone exactly; on
    other devices every row is done exactly (no host sync)."""
    if scores.device.type != "cpu":
        return _top_k_exact(scores, k)
    best, where = scores.topk(k, dim=-1)
    tied = (scores >= best[..., -1:]).sum(-1) > k
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        best, where = best.clone(), where.clone()
        best[rows], where[rows] = _top_k_exact(scores[rows], k)
    return best, where


def _top_k_exact(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_top_k` by its rule on every row: the k-th value is found, every higher score is taken, and
    the earliest scores equal to it fill the rest, so exactly k are chosen."""
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > kth
    tied = scores == kth
    fill = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= fill))
    # Exactly k chosen per row: their indices, earliest first, without a host sync (no nonzero()).
    rank = torch.arange(scores.shape[-1], 0, -1, device=scores.device)
    where = (chosen * rank).topk(k, dim=-1).indices
    return scores.gather(-1, where), where
