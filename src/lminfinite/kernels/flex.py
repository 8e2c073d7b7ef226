"""The FlexAttention kernel (GPU; runs eagerly on CPU for tests).

The local branch is one `flex_attention` call whose block mask is the Λ rule's local part, so
only the blocks of the band are computed (softcapping and ALiBi biases as a `score_mod`); it
returns its log-sum-exp. The far keys (starting keys, top-k middle keys: queries re-rotated to
distance D) are a small second pass, and the two merge exactly by log-sum-exp, as in the chunked
kernel.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..rule import local_rule
from .common import Far, global_piece, merge
from .score_mod import ScoreMod

_compiled = None


def _flex(device: torch.device):
    """Compiled flex_attention on GPU; eager on CPU (where compiled flex cannot return the lse)."""
    global _compiled
    if device.type == "cpu":
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


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
    """The contract of `kernels/__init__.py`: the local branch in FlexAttention, the far keys beside it."""
    B, H, Tq, _ = q.shape
    Tk, rep = k.shape[2], H // k.shape[1]

    def local_mask(b, h, i, j):
        return local_rule(q_idx[b, i], k_idx[b, j], n_local)

    block_mask = create_block_mask(local_mask, B, None, Tq, Tk, device=q.device, _compile=q.device.type != "cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")  # raised inside torch itself
        out, lse = _flex(q.device)(
            q,
            k,
            v,
            score_mod=mod.elementwise(q_idx, k_idx),
            block_mask=block_mask,
            scale=mod.scaling,
            enable_gqa=rep > 1,
            return_lse=True,
        )
    if far:  # the far keys in blocks of queries: top-k values are (queries, k, head_dim) per head
        step = block_size or 256
        blocks = [
            global_piece(far, s, min(s + step, Tq), q_idx[:, s : s + step], n_global, n_local, mod, rep)
            for s in range(0, Tq, step)
        ]
        far_piece = (torch.cat([o for o, _ in blocks], 2), torch.cat([lse for _, lse in blocks], 2))
        out = merge([(out, lse), far_piece])
    return out.masked_fill((q_idx < 0)[:, None, :, None], 0.0)
