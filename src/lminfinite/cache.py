"""LambdaCache: a transformers `Cache` that keeps, per layer, the starting tokens and the last window.

Each row keeps the key/value columns holding its first `n_global` real tokens and the last
`n_local - 1` columns (what the next query can see); the middle is dropped, so memory is constant
however long the stream. With `keep_middle` (the top-k extension) nothing is dropped, and memory
grows with the stream. All layers share one column layout, decided once per forward in `begin()`:
the token index and RoPE position of every column, which columns survive, and the re-basing. The cache
keeps the step its own `begin()` returned (`plan.CacheStep`, also in the forward's plan), and each
layer applies it once in `update()`: a counter of steps per layer tells a forward that was cut short
(some layers behind the others), so nothing outside the cache sets or clears its fields.

Block memory (`LambdaConfig.memory`). Each layer with memory owns a `memory.BlockStore`. In `update()`,
before any column is dropped, the layer stores the blocks that have reached the middle of the row's next
query (`CacheStep.due`), keys brought back to position 0: every column the cache then drops belongs to
a stored block, so the window part stays bounded while the store keeps the middle in blocks. Attention
reads the stores through the forward's plan (`ForwardPlan.stores`).

Bounded positions. Keys are stored rotated (RoPE) at model positions `p = t - base`, where `t`
counts a row's real tokens and `base` is a shared offset. When the next position would pass
`2 * n_local` (and every row is far enough that its starting tokens are only seen through the
global branch), `base` moves forward to `min(seen) - n_local` and the stored window keys are
rotated back by the shift. Only keys inside the window move: each row's starting keys keep
`base = 0` forever, and a key that leaves the window keeps the position it had, or, when the middle
is kept (top-k), goes to position 0 at the next forward (the far-key branch re-rotates keys from
their own small positions, known per column in `pos`), so no key is rotated more than a handful of
times, and the positions given to RoPE stay below `2 * n_local + chunk length` for any stream (plus
the largest difference in real tokens between the rows of a left-padded batch: `base` follows the
shortest row).
"""

from __future__ import annotations

import weakref
from typing import cast

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .config import LambdaConfig, config_of
from .memory import BlockStore
from .plan import CacheLayout, CacheStep, LayerSpec
from .rule import middle_blocks, token_indices


def _last_columns(n: int, count: int, device) -> torch.Tensor:
    """(n,) bool: the last `count` of `n` columns (the window: the keys the next query sees locally)."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if count > 0:
        mask[max(0, n - count) :] = True
    return mask


class LambdaLayer(DynamicLayer):
    """One layer of a LambdaCache: stores the columns the shared layout keeps (and, with block memory, owns
    the layer's block store)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, shared: LambdaCache, layer_idx: int):
        super().__init__()
        self.shared, self.layer_idx = shared, layer_idx
        self.applied = 0  # steps of the cache this layer has applied
        self.store: BlockStore | None = None  # block memory of this layer (made by the first forward that uses it)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.shared.step
        if step is None or self.applied != self.shared.steps - 1:
            raise RuntimeError("LambdaCache.update called outside a forward of an lminfinite-enabled model")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None  # initialized above
        full_k = torch.cat([step.move(self.layer_idx, keys), key_states], dim=-2)
        full_v = torch.cat([values, value_states], dim=-2)
        if self.store is not None and step.due is not None and step.k_idx is not None:
            rope = step.layers[self.layer_idx].rope
            self.store.ingest(full_k, full_v, step.k_idx, step.due, rope, step.k_pos)
        keep = step.keep
        if keep is None:
            self.keys, self.values = full_k, full_v
        else:
            keep = keep.to(full_k.device)
            self.keys, self.values = full_k.index_select(-2, keep), full_v.index_select(-2, keep)
        self.applied += 1
        return full_k, full_v

    def get_seq_length(self) -> int:
        return self.shared._columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.keys is None else self.keys.shape[-2]
        return stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.applied = 0
        if self.store is not None:
            self.store.reset()


class LambdaCache(Cache):
    """A bounded KV cache for LM-Infinite: starting tokens + local window, constant memory
    (`keep_middle=True`, for the top-k extension: every token, memory grows with the stream).

    Created for you by an enabled model (forward with `use_cache=True`, `generate()`,
    `lminfinite.prefill`); build one yourself with `LambdaCache.for_model(model)`.
    """

    def __init__(self, config: LambdaConfig, num_layers: int):
        if not isinstance(config, LambdaConfig):
            raise TypeError(
                f"LambdaCache(config, num_layers) takes a LambdaConfig, got {type(config).__name__}; "
                "use LambdaCache.for_model(model) for an enabled model"
            )
        self.config = config  # what the cache keeps depends on n_global, n_local and whether top-k is on
        super().__init__(layers=[LambdaLayer(self, i) for i in range(num_layers)])
        self._owner: weakref.ref | None = None  # the decoder of the enabled model that filled it
        self.tok: torch.Tensor | None = None  # (batch, stored columns) token index, -1 = padding
        self.pos: torch.Tensor | None = None  # (batch, stored columns) RoPE position each stored key is at
        self.seen: torch.Tensor | None = None  # (batch,) real tokens seen per row
        self.base = 0  # positions given to RoPE are token index - base (window) or token index (sinks)
        self._columns = 0  # columns seen (padding included), what generate() slices by
        self.step: CacheStep | None = None  # the step of the latest forward (returned by `begin`)
        self.steps = 0  # forwards begun; each layer counts the steps it applied
        self.refusal: str | None = None  # why this cache is refused until reset() (see `invalidate`)

    @classmethod
    def for_model(cls, model) -> LambdaCache:
        """An empty LambdaCache matching an enabled model's (G, L), depth and top-k setting."""
        config = config_of(model)
        if config is None:
            raise ValueError("call lminfinite.enable(model) before creating a LambdaCache for it")
        return cls(config, model.config.get_text_config(decoder=True).num_hidden_layers)

    @property
    def n_global(self) -> int:
        return self.config.n_global

    @property
    def n_local(self) -> int:
        return self.config.n_local

    @property
    def keep_middle(self) -> bool:
        """Whether the middle of the stream is kept (the top-k extension): memory then grows with it."""
        return self.config.top_k > 0

    @property
    def position_bound(self) -> int:
        return 2 * self.n_local

    def begin(self, valid: torch.Tensor, layers: tuple[LayerSpec, ...]) -> CacheLayout:
        """Decide the layout for a forward of new columns with padding mask `valid` (batch, q_len), and
        update the cache's bookkeeping (token indices, positions, base) to what it holds after it.

        `layers`: the model's layer specs (only when some layer applies RoPE do positions re-base; each
        layer moves its stored keys with its own rotary embedding). Returns the new tokens' indices and
        RoPE positions, the indices and positions of all key columns the layers will return (stored +
        new), and the step every layer applies to its stored columns, which the cache keeps (`step`)."""
        B, Tq = valid.shape
        device = valid.device
        G, L = self.n_global, self.n_local
        rotary = any(spec.rope is not None for spec in layers)
        if self.refusal is not None:
            raise ValueError(self.refusal)
        if any(layer.applied != self.steps for layer in self.lambda_layers):
            raise ValueError(
                "a previous forward with this LambdaCache did not finish (interrupted?), so its layers are "
                "out of step; make a new cache"
            )
        if self.tok is None or self.pos is None or self.seen is None:
            self.tok = self.pos = torch.empty(B, 0, dtype=torch.long, device=device)
            self.seen = torch.zeros(B, dtype=torch.long, device=device)
        elif self.tok.shape[0] != B:
            raise ValueError(f"this LambdaCache holds a batch of {self.tok.shape[0]} rows, the input has {B}")
        seen = self.seen.to(device)
        q_idx = token_indices(valid, seen)
        new_seen = seen + valid.long().sum(1)

        shift = 0
        if rotary and B and Tq:
            # Every starting token must be out of every new query's window before re-basing.
            far_enough = int(seen.min()) >= G + L - 1
            if far_enough and int(new_seen.max()) - 1 - self.base > self.position_bound:
                shift = max(0, int(seen.min()) - L - self.base)
        old_tok, old_pos = self.tok.to(device), self.pos.to(device)
        moving = (old_tok >= G) & _last_columns(old_tok.shape[1], L - 1, device)  # the stored window's keys
        self.base += shift
        q_pos = (q_idx - self.base).clamp(min=0)
        # Stored window keys go to `token index - base` (the new base); starting keys stay. With the middle
        # kept, a key that has left the window goes to position 0 once, where the far-key branch reads it
        # unrotated. `delta` is how far each stored key moves.
        target = torch.where(moving, old_tok - self.base, old_pos)
        if self.keep_middle and rotary:
            target = torch.where(~moving & (old_tok >= G), 0, target)
        delta = target - old_pos

        full_tok = torch.cat([old_tok, q_idx], dim=1)
        full_pos = torch.cat([old_pos + delta, q_pos], dim=1)
        total = full_tok.shape[1]
        keep_mask = _last_columns(total, L - 1, device) | ((full_tok >= 0) & (full_tok < G)).any(0)
        keep = None if self.keep_middle or bool(keep_mask.all()) else keep_mask.nonzero().squeeze(1)
        if keep is None:
            self.tok, self.pos = full_tok, full_pos
        else:
            self.tok, self.pos = full_tok.index_select(1, keep), full_pos.index_select(1, keep)
        self.seen = new_seen
        self._columns += Tq

        cols = (delta != 0).any(0).nonzero()
        a, b = (int(cols.min()), int(cols.max()) + 1) if cols.numel() else (0, 0)
        stores = self._stores(layers)
        due = None
        if stores is not None:  # block memory: the blocks that have reached the middle of each row's next query
            assert self.config.memory is not None
            due = middle_blocks(torch.where(new_seen > 0, new_seen, -1), G, L, self.config.memory.block_size)
        self.step = CacheStep(
            moved=(a, b), delta=delta[:, a:b], keep=keep, layers=layers, k_idx=full_tok, k_pos=full_pos, due=due
        )
        self.steps += 1
        return CacheLayout(q_idx=q_idx, q_pos=q_pos, k_idx=full_tok, k_pos=full_pos, step=self.step, stores=stores)

    def _stores(self, layers: tuple[LayerSpec, ...]) -> tuple[BlockStore | None, ...] | None:
        """Each layer's block store (made on first use for the layers with memory); None without memory."""
        if not any(spec.memory is not None for spec in layers):
            return None
        for layer, spec in zip(self.lambda_layers, layers, strict=True):
            if spec.memory is not None and layer.store is None:
                layer.store = BlockStore(spec.memory, self.n_global)
        return tuple(layer.store for layer in self.lambda_layers)

    def invalidate(self, reason: str) -> None:
        """Refuse every later forward with this cache (ValueError: `reason`) until `reset()` empties it.

        For a caller whose work on the cache was cut short (e.g. `stream()` interrupted during a prefill):
        the cache is then incomplete, and must never be silently continued."""
        self.refusal = reason

    @property
    def usable(self) -> bool:
        """False after `invalidate()`, until `reset()`."""
        return self.refusal is None

    def check_compatible(self, config: LambdaConfig, num_layers: int, owner: object) -> None:
        """Refuse a cache made for another model, another (G, L) or another top-k setting."""
        if (self.n_global, self.n_local) != (config.n_global, config.n_local):
            raise ValueError(
                f"this LambdaCache was made for n_global={self.n_global}, n_local={self.n_local}; the model is "
                f"enabled with n_global={config.n_global}, n_local={config.n_local}. Make a new cache."
            )
        keep_middle = config.top_k > 0
        if self.keep_middle != keep_middle:
            raise ValueError(
                "the model is enabled with top_k > 0, which needs a LambdaCache that keeps the middle "
                "(LambdaCache.for_model(model))"
                if keep_middle
                else "this LambdaCache keeps the middle (top-k), the model is enabled without top_k; make a new cache"
            )
        if self.config.memory != config.memory:
            raise ValueError(
                f"this LambdaCache was made for memory={self.config.memory}; the model is enabled with "
                f"memory={config.memory}. Make a new cache (LambdaCache.for_model(model))."
            )
        if len(self.layers) != num_layers:
            raise ValueError(f"this LambdaCache has {len(self.layers)} layers, the model has {num_layers}")
        filled_by = None if self._owner is None else self._owner()
        if filled_by is not owner and self._columns:
            raise ValueError("this LambdaCache holds another model's keys and values; make a new cache")
        self._owner = weakref.ref(owner)

    # Batch bookkeeping: the shared layout follows the layers.
    def _rows(self, fn, rows: torch.Tensor) -> None:
        if self.tok is not None:
            self.tok, self.pos, self.seen = (fn(t) for t in (self.tok, self.pos, self.seen))
        for layer in self.lambda_layers:
            if layer.store is not None:
                layer.store.select_rows(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)), beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        rows = torch.arange(0 if self.seen is None else self.seen.shape[0]).repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0), rows)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        rows = torch.arange(0 if self.seen is None else self.seen.shape[0])[indices]
        self._rows(lambda t: t[indices], rows)

    def reset(self):
        super().reset()
        self.tok = self.pos = self.seen = self.step = self.refusal = None
        self.base = self._columns = self.steps = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` columns (transformers 5 semantics: 0 is a no-op, a
        positive value is refused).

        Possible while nothing has been dropped yet (the stream still fits `n_global + n_local`, or the
        cache keeps the middle): afterwards the keys a rollback would need are gone, and this raises. (Block
        memory stores its first block only once a column has been dropped, so its stores are empty here.)
        (generate()'s assisted decoding still refuses this cache: it is not croppable in general.)"""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove (transformers 5 semantics)")
        keep = self._columns + tokens_to_remove
        if keep >= self._columns:
            return
        if self.tok is None or self.tok.shape[1] != self._columns or keep < 0:
            raise ValueError(
                "LambdaCache has dropped the middle of the stream and cannot roll back past its window "
                "(a rollback is only possible while the stream is shorter than n_global + n_local)"
            )
        # Keys that re-enter the window move back to `token index - base` at the next forward (the stored
        # window is always the last n_local - 1 columns); starting tokens never move, so after a re-basing
        # they must not re-enter it.
        lo = max(0, keep - (self.n_local - 1))
        tok = self.tok[:, lo:keep]
        if self.base > 0 and bool(((tok >= 0) & (tok < self.n_global)).any()):
            raise ValueError(
                "LambdaCache cannot roll back this far: the starting tokens would re-enter the window after "
                "its positions were re-based"
            )
        for layer in self.lambda_layers:
            if layer.keys is not None and layer.values is not None:
                layer.keys, layer.values = layer.keys[..., :keep, :], layer.values[..., :keep, :]
        assert self.pos is not None
        self.tok, self.pos = self.tok[:, :keep], self.pos[:, :keep]
        self.seen = (self.tok >= 0).sum(1)
        self._columns = keep

    @property
    def lambda_layers(self) -> list[LambdaLayer]:
        """The cache's layers (each a LambdaLayer)."""
        return cast("list[LambdaLayer]", self.layers)

    def memory_bytes(self) -> int:
        """Bytes held by the stored keys and values of all layers (block stores included)."""
        tensors = [t for layer in self.lambda_layers for t in (layer.keys, layer.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + self.store_bytes()

    def store_bytes(self) -> int:
        """Bytes held by the block stores of all layers (0 without block memory)."""
        return sum(layer.store.nbytes() for layer in self.lambda_layers if layer.store is not None)

    def store_tokens(self) -> int:
        """Tokens held by the block stores, summed over layers and rows (0 without block memory)."""
        return sum(layer.store.tokens_held() for layer in self.lambda_layers if layer.store is not None)
