"""Λ-attention over vLLM's paged KV cache, in plain torch: the rule of `lminfinite.rule` for one request.

A request's keys live in cache blocks listed by its row of the block table (token `t` is in block
`row[t // block_size]` at offset `t % block_size`), stored rotated at their true positions. CPU_ATTN's
"vec" kernels lay a block out per KV head as the keys transposed (head_size x block_size) followed by
the values (block_size x head_size); `PagedKV` reads that layout (and checks it once against the keys
just written, so a different layout fails loudly instead of giving wrong attention). For a chunk of
queries at positions `i` the attended keys are read from the cache:

- the window `max(0, i0 - L + 1) .. i_last` (local branch, true distance: dot products as stored);
- the starting tokens `0 .. G - 1` (global branch where `i - j >= L`): each key rotated back to
  position 0 and the query rotated to position `D`, as LM-Infinite's official code does.

Both sets are scored together and share one softmax, with the masks of `lminfinite.rule`
(`local_rule`, `global_rule`), so every query sees exactly the keys and distances the library gives it.
Memory per chunk is O(chunk * (G + L + chunk)); the middle of the context is never read (the KV-cache
manager frees it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lminfinite.rule import global_rule, local_rule

from .rope import cos_sin, rotate
from .settings import LambdaSettings

QUERY_CHUNK = 512  # queries scored together in a prefill


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged KV cache in CPU_ATTN's "vec" layout: keys (blocks, kv_heads, head_size, block_size)
    and values (blocks, kv_heads, block_size, head_size), views of the same memory."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, kv_cache: torch.Tensor) -> PagedKV:
        """Views of a CPU_ATTN cache tensor of shape (blocks, kv_heads, block_size, 2 * head_size)."""
        blocks, kv_heads, block_size, two_d = kv_cache.shape
        d = two_d // 2
        flat = kv_cache.view(blocks, kv_heads, 2, block_size * d)
        keys = flat[:, :, 0].view(blocks, kv_heads, d, block_size)
        values = flat[:, :, 1].view(blocks, kv_heads, block_size, d)
        return cls(keys, values)

    @property
    def block_size(self) -> int:
        return self.values.shape[2]

    def locate(self, block_row: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = block_row[torch.div(tokens, self.block_size, rounding_mode="floor")].long()
        return blocks, tokens % self.block_size

    def gather_keys(self, block_row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Keys of `tokens` of one request: (n, kv_heads, head_size)."""
        blocks, offsets = self.locate(block_row, tokens)
        return self.keys[blocks, :, :, offsets]

    def gather_values(self, block_row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Values of `tokens` of one request: (n, kv_heads, head_size)."""
        blocks, offsets = self.locate(block_row, tokens)
        return self.values[blocks, :, offsets, :]

    def check(self, key: torch.Tensor, md, starts: list[int], seq_lens: list[int]) -> None:
        """Raise if the keys just written for the first request of a batch do not read back (another layout)."""
        a, b = starts[0], starts[1]
        tokens = torch.arange(seq_lens[0] - (b - a), seq_lens[0], device=key.device)
        stored = self.gather_keys(md.block_table[0], tokens)
        written = key[a:b].reshape(stored.shape)
        if not torch.equal(stored, written.to(stored.dtype)):
            raise RuntimeError(
                "lminfinite's vLLM plugin: the KV cache does not hold keys in CPU_ATTN's 'vec' layout this plugin "
                "reads (tested on vLLM 0.32.0); refusing to compute attention from it"
            )


def lambda_attention(
    query: torch.Tensor,
    first: int,
    cache: PagedKV,
    block_row: torch.Tensor,
    settings: LambdaSettings,
    scale: float,
    inv_freq: torch.Tensor,
    query_chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """Attention output (n, heads, head_size) of one request's `n` queries at positions `first .. first + n - 1`
    (rotated at those positions), whose keys up to position `first + n - 1` are in the paged cache."""
    n, heads, head_size = query.shape
    kv_heads = cache.keys.shape[1]
    group = heads // kv_heads
    G, L, D = settings.n_global, settings.n_local, settings.limit_distance
    device = query.device
    out = torch.empty(n, heads, cache.values.shape[-1], dtype=query.dtype, device=device)
    n_starting = min(G, first + n)
    if n_starting:
        g_idx = torch.arange(n_starting, device=device)
        g_cos, g_sin = cos_sin(-g_idx, inv_freq, torch.float32)  # starting keys back to position 0
        g_keys = rotate(cache.gather_keys(block_row, g_idx).float(), g_cos, g_sin)
        g_values = cache.gather_values(block_row, g_idx).float()
    for c0 in range(0, n, query_chunk):
        c1 = min(n, c0 + query_chunk)
        q_idx = torch.arange(first + c0, first + c1, device=device)
        lo = max(0, first + c0 - L + 1)
        k_idx = torch.arange(lo, first + c1, device=device)
        q = query[c0:c1].float()  # (m, heads, d)
        keys = cache.gather_keys(block_row, k_idx).float()  # (k, kv_heads, d)
        values = cache.gather_values(block_row, k_idx).float()
        qg = q.view(-1, kv_heads, group, head_size)
        scores = torch.einsum("mhgd,khd->hgmk", qg, keys) * scale
        scores = scores.masked_fill(~local_rule(q_idx[:, None], k_idx[None, :], L), float("-inf"))
        far = global_rule(q_idx[:, None], g_idx[None, :], G, L) if n_starting else None
        if far is not None and bool(far.any()):
            q_cos, q_sin = cos_sin(D - q_idx, inv_freq, torch.float32)  # queries to position D
            q_far = rotate(q, q_cos, q_sin).view(-1, kv_heads, group, head_size)
            far_scores = torch.einsum("mhgd,khd->hgmk", q_far, g_keys) * scale
            far_scores = far_scores.masked_fill(~far, float("-inf"))
            probs = torch.softmax(torch.cat((scores, far_scores), dim=-1), dim=-1)
            mixed = torch.einsum("hgmk,khd->mhgd", probs[..., : keys.shape[0]], values)
            mixed = mixed + torch.einsum("hgmk,khd->mhgd", probs[..., keys.shape[0] :], g_values)
        else:
            probs = torch.softmax(scores, dim=-1)
            mixed = torch.einsum("hgmk,khd->mhgd", probs, values)
        out[c0:c1] = mixed.reshape(c1 - c0, heads, -1).to(out.dtype)
    return out
