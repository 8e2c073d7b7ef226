"""The per-forward plan: one frozen value, built before each forward, that every layer reads.

The decoder's pre-hook (`context.py`) builds it once per forward from the padding of the new tokens
and, with a cache, the layout the LambdaCache decided for this forward (`LambdaCache.begin`). Its
fields are everything a layer needs that does not depend on the layer:

- `q_idx`, `k_idx`: the token index of each query and of each key column (the Λ rule works on these);
- `q_pos`, `k_pos`: the RoPE position of each query and of each key column (bounded by the cache);
- `n_candidates`, `n_middle`: how many leading key columns can hold starting tokens, and middle keys
  for the top-k extension (0: that branch is off in this forward);
- `layer_ropes`: the rotary embedding each layer applies (None: ALiBi, or a layer without RoPE);
- `cache_step`: what the cache layers do to their stored columns (which move, which are kept).

The rotations the plan implies ((cos, sin) of queries moved to distance D, of far keys moved back to
position 0, of cached keys re-based) are computed on first use by one layer and reused by the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .positions import Rope
from .rule import middle_rule, token_indices

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CacheStep:
    """What every layer of a LambdaCache does with its stored columns in one forward.

    moved: stored columns [a, b) whose RoPE position changes (re-basing; top-k keys leaving the window).
    delta: (batch, b - a) how far each of those columns moves (positions).
    keep: indices of the (stored + new) columns kept after this forward; None keeps all of them.
    """

    moved: tuple[int, int]
    delta: torch.Tensor
    keep: torch.Tensor | None


@dataclass(frozen=True)
class CacheLayout:
    """The layout a LambdaCache decided for one forward (`LambdaCache.begin`): indices and positions
    of the new queries and of all key columns the layers will return (stored + new), and its step."""

    q_idx: torch.Tensor
    q_pos: torch.Tensor
    k_idx: torch.Tensor
    k_pos: torch.Tensor
    step: CacheStep


@dataclass(frozen=True)
class ForwardPlan:
    """Everything the layers of one forward share; see the module docstring for the fields."""

    q_idx: torch.Tensor  # (batch, q_len) token index of each query, -1 = padding
    q_pos: torch.Tensor  # (batch, q_len) RoPE position of each query
    k_idx: torch.Tensor  # (batch, k_len) token index of each key column the layers see
    k_pos: torch.Tensor  # (batch, k_len) RoPE position each key column is at
    n_candidates: int  # leading key columns that may hold starting tokens (0: no global branch)
    n_middle: int  # leading key columns that may hold middle keys (top-k extension; 0 when off)
    layer_ropes: Mapping[int, Rope | None]  # layer_idx -> the rotary embedding that layer applies
    cache_step: CacheStep | None = None  # None: no cache in this forward
    # (cos, sin) computed by the first layer that needs them, keyed by rotary, frequencies and device.
    _rotations: dict = field(default_factory=dict, repr=False, compare=False)

    def query_rotation(self, rope: Rope, limit_distance: int, device: torch.device, sinks: bool = False) -> CosSin:
        """(cos, sin) moving each query from its position to position D (the far keys' branch).

        With `sinks` (StreamingLLM-style baseline) a query never moves past its own position: it
        is placed at min(D, token index), so a cache that is not full yet keeps true distances."""
        key = ("q", id(rope.rotary), rope.freq_attr, device, limit_distance, sinks)
        if key not in self._rotations:
            q_pos = self.q_pos.to(device)
            target = self.q_idx.to(device).clamp(max=limit_distance) if sinks else limit_distance
            self._rotations[key] = rope.cos_sin(target - q_pos)
        return self._rotations[key]

    def key_rotation(self, rope: Rope, start: int, stop: int, device: torch.device) -> CosSin:
        """(cos, sin) bringing key columns [start, stop) back to position 0."""
        key = ("k", id(rope.rotary), rope.freq_attr, device, start, stop)
        if key not in self._rotations:
            self._rotations[key] = rope.cos_sin(-self.k_pos[:, start:stop].to(device))
        return self._rotations[key]

    def move_rotation(self, rope: Rope, device: torch.device) -> CosSin:
        """(cos, sin) moving the cache's stored columns `cache_step.moved` by `cache_step.delta`."""
        key = ("move", id(rope.rotary), rope.freq_attr, device)
        if key not in self._rotations:
            assert self.cache_step is not None
            self._rotations[key] = rope.cos_sin(self.cache_step.delta.to(device))
        return self._rotations[key]

    def middle_at_zero(self, columns: int, n_global: int) -> int:
        """How many leading key columns hold only middle-eligible keys already at position 0 (or keys
        that are never middle keys: starting tokens, padding); up to `columns`. A LambdaCache that keeps
        the middle stores keys that left the window at position 0, so these need no rotation."""
        key = ("z", columns, n_global)
        if key not in self._rotations:
            away = ((self.k_pos[:, :columns] != 0) & (self.k_idx[:, :columns] >= n_global)).any(0).nonzero()
            self._rotations[key] = int(away.min()) if away.numel() else columns
        return self._rotations[key]


def candidate_columns(k_idx: torch.Tensor, n_global: int) -> int:
    """Number of leading key columns that hold some row's starting tokens (up to the last one)."""
    if n_global == 0 or k_idx.numel() == 0:
        return 0
    cols = ((k_idx >= 0) & (k_idx < n_global)).any(0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 0


def middle_columns(q_idx: torch.Tensor, k_idx: torch.Tensor, n_global: int, n_local: int) -> int:
    """Number of leading key columns that hold some query's middle keys (up to the last one)."""
    if q_idx.numel() == 0 or k_idx.numel() == 0:
        return 0
    cols = middle_rule(q_idx.max(), k_idx, n_global, n_local).any(0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 0


def build_plan(
    n_global: int,
    n_local: int,
    top_k: int,
    layer_ropes: Mapping[int, Rope | None],
    valid: torch.Tensor,
    layout: CacheLayout | None = None,
) -> ForwardPlan:
    """The plan of a forward of new tokens with padding mask `valid` (batch, q_len), through a cache
    whose `layout` for this forward is given, or without a cache (keys are the new tokens)."""
    if layout is not None:
        q_idx, q_pos, k_idx, k_pos, step = layout.q_idx, layout.q_pos, layout.k_idx, layout.k_pos, layout.step
    else:
        q_idx = k_idx = token_indices(valid)
        q_pos = k_pos = q_idx.clamp(min=0)
        step = None
    beyond = q_idx.numel() > 0 and int(q_idx.max()) >= n_local  # some query has keys outside its window
    n_cand = candidate_columns(k_idx, n_global) if beyond and n_global > 0 else 0
    n_mid = middle_columns(q_idx, k_idx, n_global, n_local) if beyond and top_k > 0 else 0
    return ForwardPlan(
        q_idx=q_idx,
        q_pos=q_pos,
        k_idx=k_idx,
        k_pos=k_pos,
        n_candidates=n_cand,
        n_middle=n_mid,
        layer_ropes=layer_ropes,
        cache_step=step,
    )
