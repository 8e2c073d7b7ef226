"""The chunked PyTorch kernel: O(n·(G+L)) time and memory, exact.

Queries are taken in blocks; a block reads only the keys of its band (the `L - 1` key columns
before it and its own) for the local branch, and the `S` candidate starting keys for the global
branch. Two paths compute the same thing:

- Band path (CPU, contiguous keys: no padding, no gap in the band; inference only, as the fused op
  passes no gradient through its log-sum-exp). The band of a block
  [s, e) splits into three pieces that need no mask: its own keys (causal), the keys every query
  of the block sees (a full rectangle), and the oldest keys (an anti-causal triangle, which is
  causal once queries and keys are flipped). Each piece runs in PyTorch's fused CPU attention,
  which returns its log-sum-exp; the pieces and the global branch merge exactly by log-sum-exp.
  ALiBi biases enter each piece as key-only biases, corrected in its log-sum-exp.
- Masked path (anything else: padded rows, softcapping, other devices, autograd). Scores of the band
  are masked by the Λ rule; the band and the far keys (starting keys, top-k middle keys) merge by
  log-sum-exp.

Inputs no longer than `L` without padding are plain causal attention and go to
`scaled_dot_product_attention` directly. Grouped-query attention never copies the whole cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..rule import local_rule
from .common import NEG, Far, candidates, global_piece, merge
from .score_mod import ScoreMod

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _is_plain_causal(q_idx, k_idx, n_local) -> bool:
    """True when the Λ rule reduces to causal attention: same columns, no padding, all inside L."""
    if q_idx.shape != k_idx.shape:
        return False
    return bool((k_idx[:, 0] == 0).all() and (k_idx[:, -1] < n_local).all() and (k_idx >= 0).all())


def _records_grad(q, k, v, far) -> bool:
    """Whether autograd records this call (some input needs a gradient)."""
    if not torch.is_grad_enabled():
        return False
    tensors = [q, k, v] if far is None else [q, k, v, far.queries, far.keys, far.values]
    if far is not None and far.middle is not None:
        tensors += [far.middle.keys, far.middle.values]
    return any(t.requires_grad for t in tensors)


def _contiguous_from(k_idx, q_idx, n_local, n_candidates) -> int | None:
    """First key column of a gap-free, padding-free run of tokens (same in every row) that holds every
    key any query needs locally; None when the keys are not laid out so."""
    B, Tk = k_idx.shape
    for c0 in dict.fromkeys((0, n_candidates)):
        if c0 >= Tk:
            continue
        tail = k_idx[:, c0:]
        expected = tail[:1, :1] + torch.arange(Tk - c0, device=k_idx.device)
        if not bool((tail == expected).all()) or int(tail[0, 0]) < 0:  # a run starting at -1: padding first
            continue
        if c0 == 0 or int(q_idx.min()) - n_local + 1 >= int(tail[0, 0]):
            return c0
    return None


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
    """The contract of `kernels/__init__.py`, in blocks of queries (band path or masked path)."""
    Tq, rep = q.shape[2], q.shape[1] // k.shape[1]
    if mod.plain and _is_plain_causal(q_idx, k_idx, n_local):
        return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=mod.scaling, enable_gqa=rep > 1)
    far = far if far else None
    # The fused CPU op gives no gradient through its log-sum-exp, which the merge needs: with autograd
    # recording, the masked path (differentiable throughout) is taken instead.
    fused = _FUSED is not None and q.device.type == "cpu" and not _records_grad(q, k, v, far)
    if mod.softcap is None and fused and n_local > 1 and q.dtype == v.dtype:
        c0 = _contiguous_from(k_idx, q_idx, n_local, candidates(far))
        if c0 is not None:
            return _band_path(q, k, v, q_idx, c0, far, n_global, n_local, mod, block_size)
    return _masked_path(q, k, v, q_idx, k_idx, far, n_global, n_local, mod, block_size)


# ---------------------------------------------------------------------------------------------- band path


def _fused(q, k, v, causal: bool, scaling: float, bias=None):
    """Fused attention of one piece: (output, log-sum-exp), both (B, H, Tq, ...). `bias`: additive
    float32 logits broadcast against (B, H, Tq, Tk)."""
    assert _FUSED is not None  # the band path is only taken where the fused op exists
    out, lse = _FUSED(q, k, v, 0.0, causal, attn_mask=bias, scale=scaling)
    return out, lse


def _expand(x, rep):
    """(B, Hkv, m, d) -> (B, Hkv * rep, m, d): kv heads for causal pieces (a block's keys only)."""
    if rep == 1:
        return x
    B, Hkv, m, d = x.shape
    return x[:, :, None].expand(B, Hkv, rep, m, d).reshape(B, Hkv * rep, m, d)


def _band_path(q, k, v, q_idx, c0, far, n_global, n_local, mod: ScoreMod, block_size):
    """The band path; `mod` has no softcap, and its ALiBi slopes become key-only biases (`_KeyBias`)."""
    B, H, Tq, _ = q.shape
    scaling = mod.scaling
    slopes = None if mod.alibi is None else mod.alibi.slopes.to(device=q.device, dtype=torch.float32)
    rep = H // k.shape[1]
    kt, vt = k[:, :, c0:], v[:, :, c0:]
    off = kt.shape[2] - Tq  # key column (in kt) of query t is t + off
    bq = min(block_size or max(64, min(256, n_local // 2)), n_local - 1)
    out = torch.empty(B, H, Tq, v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, Tq, bq):
        e = min(s + bq, Tq)
        pieces = _local_pieces(q[:, :, s:e], kt, vt, s + off, e + off, n_local, scaling, rep, slopes)
        if far:
            pieces.append(global_piece(far, s, e, q_idx[:, s:e], n_global, n_local, mod, rep))
        out[:, :, s:e] = merge(pieces)
    return out


def _local_pieces(qb, kt, vt, a, b, n_local, scaling, rep, slopes=None):
    """The local branch of queries whose own keys are columns [a, b) of kt, as mask-free pieces.

    ALiBi (`slopes`): query `a + t` and key `c` need `-slope * (a + t - c)` (`ScoreMod.local`). Each piece gets the
    key-only bias `slope * (c - a)` (a row of constants is all a softmax needs), and its log-sum-exp
    is then moved by the row's `-slope * t`, so the pieces still merge exactly."""
    B, H, n, _ = qb.shape
    Hkv = H // rep
    alibi = _KeyBias(slopes, a, Hkv, rep) if slopes is not None else None
    if n == 1:  # one query (decoding): its whole window in one piece
        lo = max(0, b - n_local)
        bias = None if alibi is None else alibi.grouped(lo, b, 1)
        o, lse = _fused(qb.reshape(B, Hkv, rep, -1), kt[:, :, lo:b], vt[:, :, lo:b], False, scaling, bias)
        return [(o.reshape(B, H, 1, -1), lse.reshape(B, H, 1))]
    bias = None if alibi is None else alibi.per_head(a, b)
    pieces = [_fused(qb, _expand(kt[:, :, a:b], rep), _expand(vt[:, :, a:b], rep), True, scaling, bias)]
    r0 = max(0, b - n_local + 1)
    if r0 < a:  # keys every query of the block sees
        bias = None if alibi is None else alibi.grouped(r0, a, n)
        o, lse = _fused(qb.reshape(B, Hkv, rep * n, -1), kt[:, :, r0:a], vt[:, :, r0:a], False, scaling, bias)
        pieces.append((o.reshape(B, H, n, -1), lse.reshape(B, H, n)))
    t0, t1 = max(0, a - n_local + 1), b - n_local + 1
    if t1 > t0:  # oldest keys: query i sees key j iff j > i - L; causal after flipping both
        kf, vf = _expand(kt[:, :, t0:t1], rep).flip(2), _expand(vt[:, :, t0:t1], rep).flip(2)
        bias = None if alibi is None else alibi.per_head(t0, t1).flip(-1)
        o, lse = _fused(qb.flip(2), kf, vf, True, scaling, bias)
        pieces.append((o.flip(2), lse.flip(2)))
    if alibi is not None:
        pieces = [(o, lse - alibi.row_shift(n)) for o, lse in pieces]
    return pieces


class _KeyBias:
    """Key-only ALiBi biases `slope * (c - a)` for key columns c, in the layouts the pieces use."""

    def __init__(self, slopes, a, n_kv, rep):
        self.slopes, self.a, self.n_kv, self.rep = slopes, a, n_kv, rep

    def _cols(self, lo, hi):
        return torch.arange(lo - self.a, hi - self.a, device=self.slopes.device, dtype=torch.float32)

    def per_head(self, lo, hi):
        """(1, H, 1, hi - lo): queries of one head share a row."""
        return (self.slopes[:, None] * self._cols(lo, hi))[None, :, None]

    def grouped(self, lo, hi, n):
        """(1, Hkv, rep * n, hi - lo): the rows of `n` queries of each of the `rep` heads of a kv head."""
        bias = (self.slopes[:, None] * self._cols(lo, hi)).view(1, self.n_kv, self.rep, 1, -1)
        if self.rep == 1:
            return bias[:, :, 0]  # (1, H, 1, m): broadcast over the queries, nothing materialised
        return bias.expand(-1, -1, -1, n, -1).reshape(1, self.n_kv, self.rep * n, -1)

    def row_shift(self, n):
        """(1, H, n): what each query's log-sum-exp lacks, `slope * t` for query t of the block."""
        return self.slopes[None, :, None] * torch.arange(n, device=self.slopes.device, dtype=torch.float32)


# -------------------------------------------------------------------------------------------- masked path


def _masked_path(q, k, v, q_idx, k_idx, far, n_global, n_local, mod: ScoreMod, block_size):
    B, H, Tq, _ = q.shape
    Hkv, dv = k.shape[1], v.shape[-1]
    rep = H // Hkv
    # About 32M float32 scores per block at most, and a block no longer than the window.
    bq = block_size or max(16, min(n_local, 32 * 2**20 // max(1, H * (n_local + candidates(far)))))

    # (B, Hkv, rep, T, d) views: heads grouped by the kv head they read. Logits are taken in float32
    # (like the naive reference), so bf16/fp16 inputs are not rounded before the softmax.
    q5 = q.float().view(B, Hkv, rep, Tq, -1)
    out = q.new_empty(B, H, Tq, dv)
    # With autograd recording (training), each block is recomputed in backward rather than keeping its
    # (queries x band) scores: what a layer keeps for backward is then O(n) in the inputs' size, not O(n L).
    record = _records_grad(q, k, v, far)
    args = (q5, k, v, q_idx, k_idx, far, n_global, n_local, mod)
    for s in range(0, Tq, bq):
        e = min(s + bq, Tq)
        if record:
            out[:, :, s:e] = checkpoint(_masked_block, s, e, *args, use_reentrant=False)
        else:
            out[:, :, s:e] = _masked_block(s, e, *args)
    return out.masked_fill((q_idx < 0)[:, None, :, None], 0.0)


def _masked_block(s, e, q5, k, v, q_idx, k_idx, far, n_global, n_local, mod: ScoreMod):
    """Queries [s, e) on the masked path: their band of keys under the Λ rule's mask, and the far keys."""
    B, Hkv, rep, Tq, _ = q5.shape
    H, dv, n = Hkv * rep, v.shape[-1], e - s
    offset = k.shape[2] - Tq  # key column of query t is t + offset
    lo, hi = max(0, s + offset - n_local + 1), e + offset
    qb = q5[:, :, :, s:e].reshape(B, Hkv, rep * n, -1)
    dots = (qb @ k[:, :, lo:hi].float().transpose(-1, -2)).view(B, Hkv, rep, n, hi - lo)
    qi, ki = q_idx[:, s:e, None], k_idx[:, None, lo:hi]
    scores = mod.local(dots, qi[:, None, None], ki[:, None, None], (1, Hkv, rep))
    scores = scores.masked_fill(~local_rule(qi, ki, n_local)[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp(min=NEG)[..., None]).to(v.dtype)
    ob = (probs.reshape(B, Hkv, rep * n, hi - lo) @ v[:, :, lo:hi]).view(B, H, n, dv)
    pieces = [(ob, lse.view(B, H, n))]
    if far:
        pieces.append(global_piece(far, s, e, q_idx[:, s:e], n_global, n_local, mod, rep))
    return merge(pieces)
