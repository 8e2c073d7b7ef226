"""The Λ rule: which key a query attends, and through which branch. The one place it is written.

Token indices count the real tokens of a row from 0; padding has index -1. For a query at index
`i` and a key at index `j`:

- local branch: `0 <= i - j < L` (seen at its true distance);
- global branch: `j < G` and `i - j >= L` (seen at distance `D`);
- otherwise the key is not attended; with the optional top-k extension, a middle key
  (`j >= G` and `i - j >= L`) is attended when it is among the query's `k` best-scoring middle
  keys, scored and seen at distance `D` like a starting token; with block memory, a middle key is
  attended when the block holding it was chosen for the query's chunk (`memory_rule`), seen at
  distance `D` too. Block `b` holds the tokens `G + b * bs .. G + (b + 1) * bs - 1`; a query chooses
  among the blocks that have reached its middle (`middle_blocks`), per chunk of `chunk` queries
  (`query_chunk`: aligned on token indices, so how a sequence is split into forwards does not change
  the chunks when the splits fall on chunk boundaries).

The functions work elementwise on broadcastable integer tensors (the branch tests also on plain ints), like the mask
functions of attention-gym, so every kernel calls the same rule on the shapes it needs.
"""

from __future__ import annotations

import torch


def local_rule(q_idx: torch.Tensor, k_idx: torch.Tensor, n_local: int) -> torch.Tensor:
    """True where key `k_idx` lies in the local window of query `q_idx`."""
    dist = q_idx - k_idx
    return (k_idx >= 0) & (dist >= 0) & (dist < n_local)


def global_rule(q_idx: torch.Tensor, k_idx: torch.Tensor, n_global: int, n_local: int) -> torch.Tensor:
    """True where key `k_idx` is a starting token outside the local window of query `q_idx`."""
    return (k_idx >= 0) & (k_idx < n_global) & (q_idx - k_idx >= n_local)


def middle_rule(q_idx: torch.Tensor, k_idx: torch.Tensor, n_global: int, n_local: int) -> torch.Tensor:
    """True where key `k_idx` is a middle token of query `q_idx`: neither a starting token nor in
    its window (the keys the top-k extension chooses from)."""
    return (k_idx >= max(n_global, 0)) & (q_idx - k_idx >= n_local)


def block_of(k_idx: torch.Tensor, n_global: int, block_size: int) -> torch.Tensor:
    """The memory block of key `k_idx` (-1 for starting tokens and padding)."""
    return torch.where(k_idx >= n_global, (k_idx - n_global).div(block_size, rounding_mode="floor"), -1)


def middle_blocks(q_idx: torch.Tensor, n_global: int, n_local: int, block_size: int) -> torch.Tensor:
    """How many memory blocks have reached the middle of query `q_idx` (their first token left its window):
    blocks 0 .. n - 1, those it may choose. Their tokens still in its window stay local (`memory_rule`)."""
    return ((q_idx - n_local - n_global).div(block_size, rounding_mode="floor") + 1).clamp(min=0)


def query_chunk(q_idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """The chunk of query `q_idx` (queries `c * chunk .. (c + 1) * chunk - 1` choose their blocks together);
    -1 for padding."""
    return torch.where(q_idx >= 0, q_idx.div(chunk, rounding_mode="floor"), -1)


def memory_rule(
    q_idx: torch.Tensor, k_idx: torch.Tensor, n_global: int, n_local: int, chosen: torch.Tensor
) -> torch.Tensor:
    """True where key `k_idx` is attended through block memory: a middle key of query `q_idx` whose block was
    chosen for the query's chunk (`chosen`: bool, broadcastable, that block's choice for that query)."""
    return middle_rule(q_idx, k_idx, n_global, n_local) & chosen


def token_indices(valid: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Token index of each column of a (batch, length) padding mask: real tokens count from `seen`
    (tokens of the row already seen, default 0), padding gets -1."""
    idx = valid.long().cumsum(1) - 1
    if seen is not None:
        idx = idx + seen[:, None]
    return torch.where(valid, idx, -1)
