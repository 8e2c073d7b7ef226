"""Block memory's piece of attention: each query chunk attends the blocks chosen for it, at distance D.

The middle of a stream (neither starting tokens nor in the window) is kept in fixed-size blocks
(`lminfinite.memory`); per query chunk (prefill) or per token (decode) a few blocks are chosen from
their representatives, and every key of a chosen block is seen like a starting token: the query
moved to distance `D` against the key at position 0 (RoPE), or with the bias of distance `D` (ALiBi).
A key is attended when it is a middle key of that query and its block was chosen for the query's
chunk (`rule.memory_rule`); the choice itself is made outside the kernels.

`Memory` is what a kernel gets (one layer, one forward): the layer's store of blocks (as stored:
float32, float16, or int8 with scales), the blocks chosen by each chunk, and each query's chunk.
`select` gives the logits and values of the chosen blocks for a span of queries (gathered and
dequantized per chunk, never the whole store), to join the far keys' softmax; `piece` is the same
as an (output, log-sum-exp) piece for the exact merge; `dense_scores` scores every stored key of
every query under the rule, for the naive reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..rule import memory_rule

if TYPE_CHECKING:
    from .score_mod import ScoreMod


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


def select(
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
    """For queries [s, e) of the forward, `qg_b` (batch, heads, n, d) at distance D: the logits of the keys
    of their chunks' chosen blocks (batch, heads, n, M), -inf where a query does not see a key, and those
    keys' values (batch, kv_heads, M, dv). M = (chunks met in [s, e)) * K * block_size."""
    B, H, n, _ = qg_b.shape
    Hkv = mem.keys.shape[1]
    chunk = mem.chunk[:, s:e].to(qg_b.device)
    present = chunk[chunk >= 0]
    scores, values = [], []
    if present.numel():
        for c in range(int(present.min()), int(present.max()) + 1):
            keys, vals, idx = mem.blocks(mem.chosen[:, :, c], qg_b.device)
            dots = (qg_b.reshape(B, Hkv, rep * n, -1).float() @ keys.transpose(-1, -2)).view(B, H, n, -1)
            logits = mod.far(dots, q_idx_b[:, None, :, None], idx[:, :, None, :], (1, H))
            in_chunk = (chunk == c)[:, None, :, None]
            allowed = _heads(memory_rule(q_idx_b[:, None, :, None], idx[:, :, None, :], n_global, n_local, in_chunk), H)
            scores.append(logits.masked_fill(~allowed, float("-inf")))
            values.append(vals)
    if not scores:
        dv = mem.values.shape[-1]
        return qg_b.new_zeros(B, H, n, 0, dtype=torch.float32), qg_b.new_zeros(B, Hkv, 0, dv, dtype=torch.float32)
    return torch.cat(scores, -1), torch.cat(values, -2)


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
    """Block memory alone for queries [s, e): (output (batch, heads, n, dv), log-sum-exp (batch, heads, n)),
    -inf log-sum-exp and 0 output where a query sees no memory key; merges exactly with the other pieces."""
    scores, values = select(qg_b, mem, q_idx_b, s, e, n_global, n_local, mod, rep)
    B, H, n, M = scores.shape
    Hkv = values.shape[1]
    lse = torch.logsumexp(scores, -1) if M else scores.new_full((B, H, n), float("-inf"))
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
    out = (probs.reshape(B, Hkv, rep * n, M) @ values.float()).view(B, H, n, -1)
    return out.to(qg_b.dtype), lse


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


__all__ = ["Memory", "chosen_mask", "dense_scores", "piece", "select"]
