"""The carrier of a forward: frozen per-layer specs built once by enable(), and one plan per forward.

`LayerSpec` is everything one attention layer does, fixed when `enable()` runs: its window `n_local`
after the model's own sliding window, whether it sees the starting tokens, the distance `D` they are
seen at, its RoPE (or ALiBi), whether it takes the top-k middle keys, and its kernel.

`ForwardPlan` is built once per forward by the decoder's pre-hook (`context.py`) and handed to every
layer as the keyword argument `PLAN_KWARG` (transformers passes a forward's extra keyword arguments down
to each attention function); it is the only way state reaches attention:

- `layers`: the specs, indexed by layer;
- `q_idx`, `k_idx`: the token index of each query and of each key column (the Λ rule works on these);
- `q_pos`, `k_pos`: the RoPE position of each query and of each key column (bounded by the cache);
- `n_candidates`, `n_middle`: how many leading key columns can hold starting tokens, and middle keys
  for the top-k extension (0: that branch is off in this forward);
- `cache_step`: what the cache layers do to their stored columns (which move, which are kept); the
  cache keeps the same step itself (`LambdaCache.begin` returns it);
- `stores`: with block memory and a cache, each layer's block store (`memory.BlockStore`, None for a
  layer without memory), owned by the cache layer; the layer fills it in `update()` and attention
  chooses from it. Without a cache, attention stores the forward's own blocks in a store of its own.

The rotations a plan implies (queries moved to distance D, far keys moved back to position 0, stored
keys re-based) are computed on first use by one layer and reused by the layers sharing its RoPE
(`LayerSpec.rope_key` numbers the model's distinct rotary embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import LambdaConfig
from .kernels import Kernel, get_kernel
from .memory import BlockMemory, BlockStore
from .positions import Alibi, Rope, layer_window
from .rule import middle_rule, token_indices

CosSin = tuple[torch.Tensor, torch.Tensor]

PLAN_KWARG = "lminfinite_plan"  # the keyword argument that carries a forward's plan to its layers


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer does, built once by `enable()` (see the module docstring).

    n_global, n_local: the layer's G and L; a layer with the model's own sliding window `W <= L` keeps
        exactly that window (`n_local = W`) and sees no starting tokens (`has_global` False).
    distance: D, the distance at which far keys (starting tokens, top-k middle keys) are seen.
    sinks: StreamingLLM-style baseline: a starting key keeps its position, the query sits at min(D, i).
    top_k: middle keys each query of this layer attends (0: off in this layer).
    model_window: the model's own sliding window of this layer (None: full attention), as transformers
        passes it to the attention function (checked there).
    rope, rope_key: the layer's rotary embedding (None: ALiBi or a layer without RoPE) and its number
        among the model's distinct rotary embeddings (-1: none).
    alibi: the model's ALiBi (slopes, D), None for RoPE models.
    kernel: the attention kernel of the configured backend; block_size: its query block (None: chosen).
    memory: the layer's block memory settings (None: no memory in this layer; never set for a layer
        without the global branch).
    """

    layer_idx: int
    n_global: int
    n_local: int
    has_global: bool
    distance: int
    sinks: bool
    top_k: int
    model_window: int | None
    rope: Rope | None
    rope_key: int
    alibi: Alibi | None
    kernel: Kernel = field(repr=False)
    block_size: int | None = None
    memory: BlockMemory | None = None


def build_specs(
    config: LambdaConfig,
    windows: list[int | None],
    ropes: list[Rope | None],
    alibi: Alibi | None = None,
) -> tuple[LayerSpec, ...]:
    """The spec of every layer: `windows[i]`, `ropes[i]` are layer i's own sliding window (None: full
    attention) and rotary embedding."""
    if len(windows) != len(ropes):
        raise ValueError("one window and one rotary embedding per layer")
    distinct: list[Rope] = []
    for rope in ropes:
        if rope is not None and not any(rope == seen for seen in distinct):
            distinct.append(rope)
    kernel = get_kernel(config.backend)
    specs = []
    for i, (window, rope) in enumerate(zip(windows, ropes, strict=True)):
        n_local, has_global = layer_window(config.n_local, window)
        specs.append(
            LayerSpec(
                layer_idx=i,
                n_global=config.n_global,
                n_local=n_local,
                has_global=has_global,
                distance=config.distance,
                sinks=config.sink_positions == "own",
                top_k=config.top_k if config.uses_top_k(i) else 0,
                model_window=window,
                rope=rope,
                rope_key=-1 if rope is None else next(k for k, seen in enumerate(distinct) if rope == seen),
                alibi=alibi,
                kernel=kernel,
                block_size=config.block_size,
                memory=config.memory if has_global and config.uses_memory(i) else None,
            )
        )
    if config.memory is not None and not any(spec.memory for spec in specs):
        raise ValueError(
            "block memory applies to no layer of this model: the layers it names "
            f"({'all' if config.memory.layers is None else list(config.memory.layers)}) all keep the model's own "
            "sliding window, which sees no far keys"
        )
    return tuple(specs)


class _Memo:
    """Values a plan computes on first use and its layers share (rotations, column counts)."""

    def __init__(self) -> None:
        self.values: dict[tuple, object] = {}

    def get(self, key: tuple, make):
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]


@dataclass(frozen=True)
class CacheStep:
    """What every layer of a LambdaCache does with its stored columns in one forward.

    moved: stored columns [a, b) whose RoPE position changes (re-basing; top-k keys leaving the window).
    delta: (batch, b - a) how far each of those columns moves (positions).
    keep: indices of the (stored + new) columns kept after this forward; None keeps all of them.
    layers: the model's layer specs (each layer moves its columns with its own rotary embedding).
    k_idx, k_pos: token index and RoPE position of the (stored + new) columns after the move, and `due`
        (batch,) the blocks each row's store must hold after this forward (`BlockStore.due`): with block
        memory, a layer stores those blocks from these columns before any of them is dropped.
    """

    moved: tuple[int, int]
    delta: torch.Tensor
    keep: torch.Tensor | None
    layers: tuple[LayerSpec, ...] = field(repr=False)
    k_idx: torch.Tensor | None = field(default=None, repr=False)
    k_pos: torch.Tensor | None = field(default=None, repr=False)
    due: torch.Tensor | None = None
    _memo: _Memo = field(default_factory=_Memo, repr=False, compare=False)

    def move(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """Stored keys (batch, kv_heads, columns, d) of layer `layer_idx` with the columns `moved`
        rotated by `delta` (unchanged for a layer without RoPE, or when nothing moves)."""
        a, b = self.moved
        rope = self.layers[layer_idx].rope
        if b <= a or rope is None:
            return keys
        key = (self.layers[layer_idx].rope_key, keys.device)
        cos, sin = self._memo.get(key, lambda: rope.cos_sin(self.delta.to(keys.device)))
        moved = rope.rotate(keys[..., a:b, :], cos, sin)
        return torch.cat([keys[..., :a, :], moved, keys[..., b:, :]], dim=-2)


@dataclass(frozen=True)
class CacheLayout:
    """The layout a LambdaCache decided for one forward (`LambdaCache.begin`): indices and positions
    of the new queries and of all key columns the layers will return (stored + new), and its step."""

    q_idx: torch.Tensor
    q_pos: torch.Tensor
    k_idx: torch.Tensor
    k_pos: torch.Tensor
    step: CacheStep
    stores: tuple[BlockStore | None, ...] | None = None


@dataclass(frozen=True)
class ForwardPlan:
    """Everything the layers of one forward share; see the module docstring for the fields."""

    layers: tuple[LayerSpec, ...]
    q_idx: torch.Tensor  # (batch, q_len) token index of each query, -1 = padding
    q_pos: torch.Tensor  # (batch, q_len) RoPE position of each query
    k_idx: torch.Tensor  # (batch, k_len) token index of each key column the layers see
    k_pos: torch.Tensor  # (batch, k_len) RoPE position each key column is at
    n_candidates: int  # leading key columns that may hold starting tokens (0: no global branch)
    n_middle: int  # leading key columns that may hold middle keys (top-k extension; 0 when off)
    cache_step: CacheStep | None = None  # None: no cache in this forward
    stores: tuple[BlockStore | None, ...] | None = None  # per layer: its block store (None: no cache or no memory)
    _memo: _Memo = field(default_factory=_Memo, repr=False, compare=False)

    def query_rotation(self, spec: LayerSpec, device: torch.device) -> CosSin:
        """(cos, sin) moving each query from its position to position D (the far keys' branch).

        With `spec.sinks` (StreamingLLM-style baseline) a query never moves past its own position: it
        is placed at min(D, token index), so a cache that is not full yet keeps true distances."""
        rope = spec.rope
        assert rope is not None

        def make() -> CosSin:
            q_pos = self.q_pos.to(device)
            target = self.q_idx.to(device).clamp(max=spec.distance) if spec.sinks else spec.distance
            return rope.cos_sin(target - q_pos)

        return self._memo.get(("q", spec.rope_key, device, spec.distance, spec.sinks), make)

    def key_rotation(self, spec: LayerSpec, start: int, stop: int, device: torch.device) -> CosSin:
        """(cos, sin) bringing key columns [start, stop) back to position 0."""
        rope = spec.rope
        assert rope is not None
        make = lambda: rope.cos_sin(-self.k_pos[:, start:stop].to(device))  # noqa: E731
        return self._memo.get(("k", spec.rope_key, device, start, stop), make)

    def middle_at_zero(self, columns: int, n_global: int) -> int:
        """How many leading key columns hold only middle-eligible keys already at position 0 (or keys
        that are never middle keys: starting tokens, padding); up to `columns`. A LambdaCache that keeps
        the middle stores keys that left the window at position 0, so these need no rotation."""

        def make() -> int:
            away = ((self.k_pos[:, :columns] != 0) & (self.k_idx[:, :columns] >= n_global)).any(0).nonzero()
            return int(away.min()) if away.numel() else columns

        return self._memo.get(("z", columns, n_global), make)


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
    config: LambdaConfig,
    layers: tuple[LayerSpec, ...],
    valid: torch.Tensor,
    layout: CacheLayout | None = None,
) -> ForwardPlan:
    """The plan of a forward of new tokens with padding mask `valid` (batch, q_len), through a cache
    whose `layout` for this forward is given, or without a cache (keys are the new tokens)."""
    step: CacheStep | None = None
    stores: tuple[BlockStore | None, ...] | None = None
    if layout is not None:
        q_idx, q_pos, k_idx, k_pos, step = layout.q_idx, layout.q_pos, layout.k_idx, layout.k_pos, layout.step
        stores = layout.stores
    else:
        q_idx = k_idx = token_indices(valid)
        q_pos = k_pos = q_idx.clamp(min=0)
    G, L = config.n_global, config.n_local
    beyond = q_idx.numel() > 0 and int(q_idx.max()) >= L  # some query has keys outside its window
    n_cand = candidate_columns(k_idx, G) if beyond and G > 0 else 0
    n_mid = middle_columns(q_idx, k_idx, G, L) if beyond and config.top_k > 0 else 0
    return ForwardPlan(
        layers=layers,
        q_idx=q_idx,
        q_pos=q_pos,
        k_idx=k_idx,
        k_pos=k_pos,
        n_candidates=n_cand,
        n_middle=n_mid,
        cache_step=step,
        stores=stores,
    )
