"""Block memory's piece of attention: each query chunk attends the blocks chosen for it, at distance D.

The middle of a stream (neither starting tokens nor in the window) is kept in fixed-size blocks
(`lminfinite.memory`); per query chunk (prefill) or per token (decode) a few blocks are chosen from
their representatives, and every key of a chosen block is seen like a starting token: the query
moved to distance `D` against the key at position 0 (RoPE), or with the bias of distance `D` (ALiBi).
A key is attended when it is a middle key of that query and its block was chosen for the query's
chunk (`rule.memory_rule`); the choice itself is made outside the kernels.

`Memory` is what a kernel gets (one layer, one forward): the layer's store of blocks (as stored:
float32, float16, or int8 with scales), the blocks chosen by each chunk, and each query's chunk.
`piece` attends a span of queries to their chunks' chosen blocks (gathered and dequantized per chunk,
never the whole store) and returns an (output, log-sum-exp) piece, which merges exactly with the
other far keys (`common.global_piece`); `dense_scores` scores every stored key of every query under
the rule, for the naive reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..rule import memory_rule

if TYPE_CHECKING:
    from .score_mod import ScoreMod

# PyTorch's fused CPU attention, which also returns the log-sum-exp the merge needs (as in the chunked kernel).
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(frozen=True)
class Memory:
    """The memory blocks of one layer in one forward.

    keys: (batch, kv_heads, N, block_size, d) the stored blocks' keys at position 0 (storage dtype).
    values: (batch, kv_heads, N, block_size, dv).
    key_scale, value_scale: (batch, kv_heads, N, block_size, 1) float32 scales of an int8 store (else None).
    first: (batch, N) token index of each slot's first token; -1: an empty slot.
    chosen: (batch, Hc, C, K) the slots chosen by each query chunk of the forward, -1: none; Hc is 1
        (one choice shared by all heads) or kv_heads (one per kv head).
    chunk: (batch, q_len) the chunk (0 .. C-1) of each query, -1: padding.
    """

    keys: torch.Tensor
    values: torch.Tensor
    first: torch.Tensor
    chosen: torch.Tensor
    chunk: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B, Hkv, N, bs = self.keys.shape[:4]
        if self.values.shape[:4] != (B, Hkv, N, bs) or self.first.shape != (B, N):
            raise ValueError(
                f"memory keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)} and block starts "
                f"{tuple(self.first.shape)} disagree"
            )
        if self.chosen.dim() != 4 or self.chosen.shape[0] != B or self.chosen.shape[1] not in (1, Hkv):
            raise ValueError(f"chosen blocks {tuple(self.chosen.shape)} must be (batch, 1 or {Hkv}, chunks, K)")
        if self.chunk.dim() != 2 or self.chunk.shape[0] != B:
            raise ValueError(f"query chunks {tuple(self.chunk.shape)} must be (batch, q_len)")

    @property
    def block_size(self) -> int:
        return self.keys.shape[3]

    def blocks(
        self, slots: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The blocks in `slots` (batch, Hc, K) (-1: none): keys (batch, kv_heads, K * bs, d) and values
        (batch, kv_heads, K * bs, dv) dequantized to `dtype` on `device`, and their token indices
        (batch, Hc, K * bs), -1 for the tokens of no block."""
        B, Hkv, N, bs, d = self.keys.shape
        Hc, K = slots.shape[1], slots.shape[2]
        slots = slots.to(self.keys.device)
        safe = slots.clamp(min=0).expand(B, Hkv, K)  # a shared choice reads the same slots in every kv head
        keys = _gather(self.keys, self.key_scale, safe, dtype).to(device, non_blocking=True)
        values = _gather(self.values, self.value_scale, safe, dtype).to(device, non_blocking=True)
        first = torch.gather(self.first.to(slots.device)[:, None].expand(B, Hc, N), 2, slots.clamp(min=0))
        idx = first[..., None] + torch.arange(bs, device=slots.device)
        idx = torch.where((slots >= 0)[..., None] & (first >= 0)[..., None], idx, -1)
        return keys.flatten(2, 3), values.flatten(2, 3), idx.flatten(2, 3).to(device)


def _gather(store: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks `slots` (B, Hkv, K) of `store` (B, Hkv, N, bs, d), dequantized: (B, Hkv, K, bs, d) in `dtype`.
    Whole blocks are copied (one row of a (B * Hkv * N, bs * d) view each), not element by element."""
    B, Hkv, N, bs, d = store.shape
    K = slots.shape[-1]
    rows = (torch.arange(B * Hkv, device=slots.device).view(B, Hkv, 1) * N + slots).flatten()
    out = store.reshape(B * Hkv * N, bs * d).index_select(0, rows).view(B, Hkv, K, bs, d).to(dtype)
    if scale is not None:
        out = out * scale.reshape(B * Hkv * N, bs).index_select(0, rows).view(B, Hkv, K, bs, 1).to(dtype)
    return out


def _heads(mask: torch.Tensor, H: int) -> torch.Tensor:
    """(B, Hc, ...) -> broadcastable against (B, H, ...): a shared mask as is, a per-kv-head one repeated."""
    return mask if mask.shape[1] in (1, H) else mask.repeat_interleave(H // mask.shape[1], 1)


def piece(
    qg_b: torch.Tensor,
    mem: Memory,
    q_idx_b: torch.Tensor,
    s: int,
    e: int,
    n_global: int,
    n_local: int,
    mod: ScoreMod,
    rep: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block memory for queries [s, e) of the forward, `qg_b` (batch, heads, n, d) moved to distance D:
    (output (batch, heads, n, dv), log-sum-exp (batch, heads, n)) over the keys of the blocks chosen for each
    query's chunk; 0 and -inf where a query sees none. It merges exactly with the other pieces.

    Chunk by chunk: each chunk's blocks are gathered (and dequantized) once and scored by that chunk's
    queries only, so a span that meets several chunks costs what its queries need, not chunks x span. On
    the CPU without softcapping or autograd, each chunk runs in PyTorch's fused attention (a mask only where
    some query does not see some key: the block its window cuts, empty places)."""
    B, H, n, d = qg_b.shape
    Hkv, dv = mem.keys.shape[1], mem.values.shape[-1]
    fused = (
        _FUSED is not None
        and qg_b.device.type == "cpu"
        and mod.softcap is None
        and d == dv  # the fused op takes one head size
        and not (torch.is_grad_enabled() and qg_b.requires_grad)
    )
    chunk = mem.chunk[:, s:e].to(qg_b.device)
    out = qg_b.new_zeros(B, H, n, dv, dtype=torch.float32)
    lse = qg_b.new_full((B, H, n), float("-inf"), dtype=torch.float32)
    present = chunk[chunk >= 0]
    if not present.numel():
        return out, lse
    first, last = int(present.min()), int(present.max())
    whole = first == last and present.numel() == chunk.numel()  # one chunk holds every query (decoding)
    for c in range(first, last + 1):
        members = chunk == c  # (B, n): a query belongs to one chunk of its row
        cols = members.any(0).nonzero()
        if not cols.numel():
            continue
        a, b = int(cols.min()), int(cols.max()) + 1
        m = b - a
        keys, vals, idx = mem.blocks(mem.chosen[:, :, c], qg_b.device)
        qi, ki, mine = q_idx_b[:, None, a:b, None], idx[:, :, None, :], members[:, None, a:b, None]
        allowed = memory_rule(qi, ki, n_global, n_local, mine)  # (B, Hc, m, M)
        q = qg_b[:, :, a:b].reshape(B, Hkv, rep * m, d).float()
        if fused:
            o, part = _fused_chunk(q, keys, vals, allowed, mod, rep)
        else:
            logits = mod.far((q @ keys.transpose(-1, -2)).view(B, H, m, -1), qi, ki, (1, H))
            logits = logits.masked_fill(~_heads(allowed, H), float("-inf"))
            part = torch.logsumexp(logits, -1)  # (B, H, m)
            probs = torch.exp(logits - part.clamp(min=torch.finfo(torch.float32).min)[..., None])
            o = (probs.reshape(B, Hkv, rep * m, -1) @ vals).view(B, H, m, dv)
        if whole:
            return o, part
        take = members[:, None, a:b]
        out[:, :, a:b] = torch.where(take[..., None], o, out[:, :, a:b])
        lse[:, :, a:b] = torch.where(take, part, lse[:, :, a:b])
    return out, lse


def _fused_chunk(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, allowed: torch.Tensor, mod: ScoreMod, rep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk in the fused CPU attention: `q` (B, kv_heads, rep * m, d) grouped by kv head, the chunk's keys
    and values (B, kv_heads, M, d), `allowed` (B, Hc, m, M) -> output (B, H, m, dv) and log-sum-exp (B, H, m)."""
    assert _FUSED is not None
    B, Hkv, rows, _ = q.shape
    m = rows // rep
    bias = None
    if not bool(allowed.all()):  # only the block the window cuts, or empty places: an additive mask
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = bias[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, allowed.shape[1], rows, -1)
    o, lse = _FUSED(q, keys, vals, 0.0, False, attn_mask=bias, scale=mod.scaling)
    o, lse = o.reshape(B, Hkv * rep, m, -1), lse.reshape(B, Hkv * rep, m)
    seen = _heads(allowed.any(-1), Hkv * rep)  # a query with no key: 0 and -inf, never NaN
    o = torch.where(seen[..., None], o, 0.0)
    lse = torch.where(seen, lse, float("-inf"))
    if mod.alibi is not None:  # every memory key is at distance D: the same bias for all of a head's keys
        lse = lse + mod.alibi.bias(mod.alibi.limit_distance, (1, Hkv * rep))[..., 0].to(lse.device)
    return o, lse


def chosen_mask(mem: Memory) -> torch.Tensor:
    """(batch, Hc, q_len, N): whether each stored slot was chosen for each query's chunk (False for padding)."""
    B, Hc, C, K = mem.chosen.shape
    N = mem.first.shape[1]
    onehot = torch.zeros(B, Hc, C + 1, N + 1, dtype=torch.bool, device=mem.chosen.device)
    slots = torch.where(mem.chosen >= 0, mem.chosen, N)  # -1 goes to a spare column
    onehot[:, :, :C].scatter_(-1, slots, True)
    chunk = torch.where(mem.chunk >= 0, mem.chunk, C).to(mem.chosen.device)  # padding reads the spare row
    return torch.gather(onehot, 2, chunk[:, None, :, None].expand(B, Hc, -1, N + 1))[..., :N]


def dense_scores(
    qg: torch.Tensor, mem: Memory, q_idx: torch.Tensor, n_global: int, n_local: int, mod: ScoreMod, rep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: every query `qg` (batch, heads, q_len, d) at distance D against every stored key, masked
    by the rule. Logits (batch, heads, q_len, N * bs) and values (batch, heads, N * bs, dv), in float32."""
    B, H, T, _ = qg.shape
    Hkv, N, bs = mem.keys.shape[1:4]
    every = torch.arange(N, device=mem.keys.device).expand(B, 1, N)
    keys, values, idx = mem.blocks(every, qg.device)
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    dots = qg.float() @ keys.transpose(-1, -2)
    logits = mod.far(dots, q_idx[:, None, :, None], idx[:, :, None, :], (1, H))
    chosen = chosen_mask(mem).to(qg.device).repeat_interleave(bs, -1)  # per key: its block chosen for the query
    allowed = _heads(memory_rule(q_idx[:, None, :, None], idx[:, :, None, :], n_global, n_local, chosen), H)
    return logits.masked_fill(~allowed, float("-inf")), values


__all__ = ["Memory", "chosen_mask", "dense_scores", "piece"]
