"""What every kernel shares: the far keys' type (`Far`), their piece of attention, and the exact merge.

A kernel computes the local branch its own way (dense, chunked, FlexAttention) and gets the keys a
query sees at distance D as one `Far` value, built by the attention function (`attention.py`): the
starting tokens' keys brought back to position 0, the queries moved to distance D, and, with the
top-k extension, the middle keys to choose from, or, with block memory, the blocks each query chunk
chose (`kernels/memory.py`). `global_piece` scores a block of queries against
them; `merge` combines pieces computed over disjoint keys into one exact softmax from their
log-sum-exps. `NEG` is the finite stand-in for -inf where a row has no key (no NaN for padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rule import global_rule
from . import memory, topk
from .memory import Memory
from .score_mod import ScoreMod
from .topk import Middle

NEG = torch.finfo(torch.float32).min  # finite: a padding query gets no NaN

Piece = tuple[torch.Tensor, torch.Tensor]  # (output (B, H, n, dv), log-sum-exp (B, H, n))


@dataclass(frozen=True)
class Far:
    """The keys each query sees at distance D, for one layer and one forward.

    queries: (batch, heads, q_len, d) the queries moved to distance D (RoPE; ALiBi: the queries).
    keys, values: (batch, kv_heads, S, d) the S leading key columns that may hold starting tokens,
        keys at position 0; idx: (batch, S) their token indices (-1: padding). S may be 0.
    middle: the top-k extension's candidates (None: off, or no middle key in this forward).
    memory: block memory's chosen blocks (None: off, or nothing stored yet).
    The logits of all of them come from the kernel's `ScoreMod.far` (ALiBi: the bias of distance D).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    idx: torch.Tensor
    middle: Middle | None = None
    memory: Memory | None = None

    def __post_init__(self) -> None:
        if self.keys.shape[:3] != self.values.shape[:3] or self.idx.shape != (self.keys.shape[0], self.keys.shape[2]):
            raise ValueError(
                f"far keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)} and indices "
                f"{tuple(self.idx.shape)} disagree"
            )
        if self.middle is not None and self.middle.keys.shape[2] == 0:
            object.__setattr__(self, "middle", None)

    @property
    def n_candidates(self) -> int:
        """S, the number of starting-token candidate columns."""
        return self.keys.shape[2]

    def __bool__(self) -> bool:
        return self.n_candidates > 0 or self.middle is not None or self.memory is not None


def candidates(far: Far | None) -> int:
    """S of `far`, 0 when there are no far keys."""
    return far.n_candidates if far else 0


def global_piece(
    far: Far,
    s: int,
    e: int,
    q_idx_b: torch.Tensor,
    n_global: int,
    n_local: int,
    mod: ScoreMod,
    rep: int,
) -> Piece:
    """The far keys (starting keys, top-k middle keys, memory blocks) of queries [s, e): (output, log-sum-exp)
    with -inf where none is seen. `rep`: query heads per kv head."""
    qg_b = far.queries[:, :, s:e]
    B, H, n, _ = qg_b.shape
    Hkv, S = far.keys.shape[1], far.n_candidates
    dots = (qg_b.reshape(B, Hkv, rep * n, -1).float() @ far.keys.float().transpose(-1, -2)).view(B, H, n, S)
    scores = mod.far(dots, q_idx_b[:, None, :, None], far.idx[:, None, None, :], (1, H))
    allowed = global_rule(q_idx_b[:, :, None], far.idx[:, None, :], n_global, n_local)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if far.middle is not None:
        top_scores, top_values = topk.select(qg_b, far.middle, q_idx_b, n_global, n_local, mod, rep)
        scores = torch.cat([scores, top_scores], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp(min=NEG)[..., None])
    out = (probs[..., :S].to(far.values.dtype).reshape(B, Hkv, rep * n, S) @ far.values).view(B, H, n, -1)
    if far.middle is not None:
        out = out + (probs[..., S:, None] * top_values.float()).sum(-2).to(out.dtype)
    if far.memory is not None:  # the chosen blocks: a piece of their own, merged exactly
        mem_out, mem_lse = memory.piece(qg_b, far.memory, q_idx_b, s, e, n_global, n_local, mod, rep)
        total = torch.logaddexp(lse, mem_lse)
        floor = total.clamp(min=NEG)[..., None]
        out = out.float() * torch.exp(lse[..., None] - floor) + mem_out * torch.exp(mem_lse[..., None] - floor)
        out, lse = out.to(far.values.dtype), total
    return out, lse


def merge(pieces: list[Piece]) -> torch.Tensor:
    """Exact softmax over the union of the pieces' keys, from each piece's output and log-sum-exp."""
    if len(pieces) == 1:
        return pieces[0][0]
    lses = torch.stack([lse.float() for _, lse in pieces])
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.clamp(min=NEG))  # 0, not NaN, where no piece has a key
    out = sum(o.float() * w[..., None] for (o, _), w in zip(pieces, weights, strict=True))
    return out.to(pieces[0][0].dtype)


__all__ = ["NEG", "Far", "Memory", "Middle", "Piece", "ScoreMod", "candidates", "global_piece", "merge"]
