"""Block memory: the middle of a stream kept as blocks, and the few blocks each query chunk attends.

InfLLM's idea (Xiao et al., arXiv 2402.04617) on LM-Infinite's rule. Middle tokens (neither
starting tokens nor in the window) are kept per layer in fixed-size blocks (`BlockStore`), each
summarised by a few representative keys: for each part of the block, the elementwise minimum and
maximum of its keys, which bound `q . k` from above for any query (Quest, Tang et al., arXiv
2406.10774). Per chunk of queries (prefill) or per token (decode), `choose` scores these
representatives only (never every stored key) and picks the best blocks; every key of a chosen
block is then seen at the capped distance `D`, like a starting token (`rule.memory_rule`,
`kernels/memory.py`; `enable()` keeps `D` within half the pretraining length when memory is on:
`api.memory_distance`). What a forward reads stays bounded: starting tokens, window, chosen blocks. The
store grows with the input (SmolLM2: 816 bytes per token and layer in float16, 456 in int8;
`BlockMemory.bytes_per_token`), or stays bounded with a cap that evicts the least-used blocks.

This module owns the frozen settings (`BlockMemory`), one layer's store (`BlockStore`) and the choice
(`choose`). A cache layer owns its layer's store and fills it (`cache.LambdaLayer.update`); attention
calls `choose` and hands the chosen blocks to the kernel (without a cache, it stores the forward's own
blocks in a store that lives for that forward).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .kernels.memory import Memory
from .positions import Rope
from .rule import middle_blocks, query_chunk

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def _int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"BlockMemory {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"BlockMemory {name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class BlockMemory:
    """Settings of block memory (`lminfinite.enable(model, memory=BlockMemory(...))`).

    block_size: tokens per block (InfLLM: 128).
    representatives: parts each block is summarised in (default 4): each part by the elementwise minimum
        and maximum of its keys, the tightest box around them (Quest's page summary); a query scores a block
        by the highest upper bound of `q . k` over its parts, `sum_i max(q_i * min_i, q_i * max_i)`.
    blocks: blocks each query chunk (or decoded token) attends (default 8: 1024 tokens, twice a window of 512;
        InfLLM: 16, with a window of 4096).
    layers: the layers that use memory (None: every layer). The others run plain Λ-attention.
    dtype: how stored keys and values are kept: "float16" (half of what a full KV cache holds), "float32"
        or "int8" (one float32 scale per token and head); representatives are float32.
    max_blocks: the most blocks a layer keeps per sequence (None: no cap, the store grows with the
        input). When a new block would pass the cap, the block chosen the fewest times is evicted (the
        oldest among equals); an evicted block is never chosen again.
    shared: one choice for all heads of a layer (True), or one per kv head (False).
    chunk: queries that choose together in a prefill, aligned on token indices (None: `block_size`).
        A decoded token chooses alone.
    hot_blocks: on an accelerator, the store's keys and values live in host memory and the chosen blocks
        are copied in; the `hot_blocks` most recently used blocks of each layer stay on the device (an LRU),
        so a decoded token that chooses what the previous one chose copies nothing.

    The defaults attend 8 x 128 = 1024 memory tokens per query on top of the window.
    """

    block_size: int = 128
    representatives: int = 4
    blocks: int = 8
    layers: tuple[int, ...] | None = None
    dtype: str = "float16"
    max_blocks: int | None = None
    shared: bool = True
    chunk: int | None = None
    hot_blocks: int = 64

    def __post_init__(self) -> None:
        _int("block_size", self.block_size, 1)
        _int("representatives", self.representatives, 1)
        _int("blocks", self.blocks, 1)
        if self.block_size % self.representatives:
            raise ValueError(
                f"BlockMemory representatives={self.representatives} must divide block_size={self.block_size} "
                "(each representative summarises an equal part of the block)"
            )
        if self.chunk is not None:
            _int("chunk", self.chunk, 1)
        _int("hot_blocks", self.hot_blocks, 1)
        if self.max_blocks is not None:
            _int("max_blocks", self.max_blocks, 1)
            if self.max_blocks < self.blocks:
                raise ValueError(
                    f"BlockMemory max_blocks={self.max_blocks} < blocks={self.blocks}: a query could never get "
                    "the blocks it asks for"
                )
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"BlockMemory dtype must be one of {list(STORE_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.shared, bool):
            raise TypeError(f"BlockMemory shared must be a bool, got {type(self.shared).__name__}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise TypeError(f"BlockMemory layers must be layer numbers (e.g. range(4, 30)), got {self.layers!r}")
            layers = tuple(self.layers)
            for layer in layers:
                _int("layers entry", layer, 0)
            if not layers:
                raise ValueError("BlockMemory layers is empty: no layer would use memory (pass None for every layer)")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    @property
    def query_chunk(self) -> int:
        """Queries that choose their blocks together in a prefill."""
        return self.block_size if self.chunk is None else self.chunk

    @property
    def store_dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.dtype]

    def applies_to(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses memory."""
        return self.layers is None or layer_idx in self.layers

    def check_window(self, n_local: int) -> None:
        """ValueError when a block is longer than the window: a block enters the store once its first token
        leaves the window, and all of its tokens must exist by then."""
        if self.block_size > n_local:
            raise ValueError(
                f"BlockMemory block_size={self.block_size} > n_local={n_local}: a block's first token would leave "
                "the window before its last token exists; use a block no longer than the window"
            )

    def check_layers(self, num_layers: int) -> None:
        """ValueError when `layers` names a layer the model does not have."""
        if self.layers is not None and self.layers[-1] >= num_layers:
            raise ValueError(
                f"BlockMemory layers include {self.layers[-1]} but the model has {num_layers} layers (numbered from 0)"
            )

    def bytes_per_token(self, kv_heads: int, head_dim: int, head_dim_v: int | None = None) -> float:
        """Bytes one stored token costs in one layer: keys, values (and int8 scales), and its share of the
        block's representatives."""
        dv = head_dim if head_dim_v is None else head_dim_v
        width = self.store_dtype.itemsize
        scales = 2 * 4 if self.dtype == "int8" else 0
        summary = 2 * self.representatives * head_dim * 4 / self.block_size  # a minimum and a maximum per part
        return kv_heads * ((head_dim + dv) * width + scales + summary)


# ------------------------------------------------------------------------------------------------ the store


def _quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x` in the storage dtype: int8 with a float32 scale per vector (absmax / 127), else a cast."""
    if dtype != torch.int8:
        return x.to(dtype), None
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale


def summarise(keys: torch.Tensor, representatives: int) -> torch.Tensor:
    """The representatives of blocks `keys` (..., block_size, d): for each of `representatives` equal
    consecutive parts, the elementwise maximum and minimum of its keys, (..., 2 * representatives, d) in
    float32 (the maxima first)."""
    *lead, bs, d = keys.shape
    parts = keys.float().reshape(*lead, representatives, bs // representatives, d)
    return torch.cat([parts.amax(-2), parts.amin(-2)], dim=-2)


def upper_bounds(queries: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """For queries (..., n, d) and block summaries (..., N, 2R, d) (`summarise`): the highest upper bound of
    `q . k` over each block's parts, (..., n, N). The bound of a part is `q+ . max + q- . min` (q+, q-: the
    positive and negative entries of q), which is `sum_i max(q_i * max_i, q_i * min_i)`."""
    *lead, N, R2, d = summary.shape
    R = R2 // 2
    hi, lo = summary[..., :R, :].reshape(*lead, N * R, d), summary[..., R:, :].reshape(*lead, N * R, d)
    bound = queries.clamp(min=0) @ hi.transpose(-1, -2) + queries.clamp(max=0) @ lo.transpose(-1, -2)
    return bound.view(*bound.shape[:-1], N, R).amax(-1)


class HotBlocks:
    """The blocks of a store in host memory most recently read, kept on the compute device: an LRU of
    `capacity` blocks. `fetch` returns the blocks asked for on the device, copying in only those it does not
    hold; `forget` drops a slot whose block was replaced, `clear` everything (rows reordered)."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.pools: list[torch.Tensor] | None = None  # one per stored tensor: (capacity, kv_heads, bs, x)
        self.where: OrderedDict[tuple[int, int], int] = OrderedDict()  # (row, slot) -> pool index, oldest first
        self.copied = 0  # blocks copied in so far

    def fetch(self, stored: list[torch.Tensor], rows: torch.Tensor, slots: torch.Tensor) -> list[torch.Tensor] | None:
        """Blocks (`rows`, `slots`: 1-D, each pair once) of the host tensors `stored` (batch, kv_heads, slots, bs, x):
        per tensor (n, kv_heads, bs, x) on the device; None when more are asked for than the LRU holds."""
        wanted = list(zip(rows.tolist(), slots.tolist(), strict=True))
        if len(wanted) > self.capacity:
            return None
        if self.pools is None:
            self.pools = [
                torch.empty(self.capacity, t.shape[1], *t.shape[3:], dtype=t.dtype, device=self.device) for t in stored
            ]
        asked = set(wanted)
        free = sorted(set(range(self.capacity)) - set(self.where.values()), reverse=True)
        index = []
        for key in wanted:
            if key in self.where:
                self.where.move_to_end(key)
            else:
                i = free.pop() if free else self.where.pop(next(k for k in self.where if k not in asked))
                for pool, t in zip(self.pools, stored, strict=True):
                    pool[i].copy_(t[key[0], :, key[1]], non_blocking=True)
                self.where[key] = i
                self.copied += 1
            index.append(self.where[key])
        where = torch.tensor(index, dtype=torch.long, device=self.device)
        return [pool.index_select(0, where) for pool in self.pools]

    def forget(self, row: int, slot: int) -> None:
        self.where.pop((row, slot), None)

    def clear(self) -> None:
        self.where.clear()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools or [])


class BlockStore:
    """One layer's blocks, for each row of a batch.

    Slots hold blocks; `first` (batch, slots) is the token index of a slot's first token (-1: empty).
    keys (batch, kv_heads, slots, block_size, d) are at position 0 (RoPE), values beside them, both in
    the storage dtype (int8: with float32 scales); `summary` (batch, kv_heads, slots, 2 * representatives,
    d) holds the representatives (each part's maximum and minimum key, `summarise`); `uses` counts how
    often each slot was chosen (with a cap, which evicts by it); `formed` (batch,) how many blocks each
    row has put in the store (blocks are formed in order: block b holds the middle tokens `G + b * bs ..`);
    `evicted` how many the cap removed.

    Where it lives: the representatives and the bookkeeping beside the model; keys and values too on the
    CPU, but in host memory when the model runs on an accelerator (`host`), with the most recently chosen
    blocks kept on the device (`HotBlocks`, `BlockMemory.hot_blocks`).
    """

    def __init__(self, memory: BlockMemory, n_global: int):
        self.memory, self.n_global = memory, n_global
        self.host: torch.device | None = None  # where keys and values live (set by the first block)
        self.hot: HotBlocks | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.key_scale: torch.Tensor | None = None
        self.value_scale: torch.Tensor | None = None
        self.summary: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.uses: torch.Tensor | None = None
        self.formed: torch.Tensor | None = None
        self.evicted: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- reading

    @property
    def slots(self) -> int:
        return 0 if self.first is None else self.first.shape[1]

    def blocks_held(self) -> torch.Tensor | None:
        """(batch,) blocks each row holds now (None before the first block)."""
        return None if self.first is None else (self.first >= 0).sum(1)

    def nbytes(self) -> int:
        """Bytes held by the store (keys, values, scales, representatives, bookkeeping, hot blocks)."""
        tensors = (self.keys, self.values, self.key_scale, self.value_scale, self.summary, self.first, self.uses)
        hot = 0 if self.hot is None else self.hot.nbytes()
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + hot

    def tokens_held(self) -> int:
        """Tokens held in filled slots, over all rows."""
        return 0 if self.first is None else int((self.first >= 0).sum()) * self.memory.block_size

    def memory_of(self, chosen: torch.Tensor, chunk: torch.Tensor, device: torch.device | None = None) -> Memory:
        """What a kernel reads in one forward: the choice `chosen` (batch, Hc, C, K) (slots of this store) of the
        query chunks `chunk` (batch, q_len), and the blocks. Beside the model, the store itself (the kernel
        gathers each chunk's blocks); in host memory, the blocks some chunk chose, gathered on `device` once
        (through the LRU of hot blocks) with the choice numbered in them."""
        assert self.keys is not None and self.values is not None and self.first is not None
        home = self.first.device
        device = home if device is None else device
        if self.hot is None and self.keys.device == device:  # beside the model: the kernel reads the store itself
            return Memory(self.keys, self.values, self.first, chosen, chunk, self.key_scale, self.value_scale)
        B = chosen.shape[0]
        flat = chosen.reshape(B, -1).to(home)
        unions = [torch.unique(row[row >= 0]) for row in flat]  # sorted slots each row reads
        U = max([1] + [len(u) for u in unions])
        union = torch.full((B, U), -1, dtype=torch.long, device=home)
        for r, u in enumerate(unions):
            union[r, : len(u)] = u
        order = torch.where(union >= 0, union, self.slots)  # ascending, empty places last
        renumbered = torch.where(flat >= 0, torch.searchsorted(order, flat.clamp(min=0)), -1).view(chosen.shape)
        first = torch.where(union >= 0, torch.gather(self.first, 1, union.clamp(min=0)), -1)
        places = (union >= 0).nonzero()  # (n, 2): row and place in its union
        rows, slots = places[:, 0], union[places[:, 0], places[:, 1]]
        stored = [t for t in (self.keys, self.values, self.key_scale, self.value_scale) if t is not None]
        got = None if self.hot is None else self.hot.fetch(stored, rows, slots)
        if got is None:
            on_host = (rows.to(self.keys.device), slots.to(self.keys.device))
            got = [t[on_host[0], :, on_host[1]].to(device, non_blocking=True) for t in stored]
        blocks = []
        for g in got:
            full = g.new_zeros(B, U, *g.shape[1:])
            full[places[:, 0].to(device), places[:, 1].to(device)] = g
            blocks.append(full.transpose(1, 2))  # (B, kv_heads, U, bs, x)
        keys, values, *scales = blocks
        key_scale, value_scale = scales if scales else (None, None)
        return Memory(keys, values, first.to(device), renumbered.to(device), chunk.to(device), key_scale, value_scale)

    # ------------------------------------------------------------------------------------------- writing

    def pending(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch,) blocks each row has formed (0 for a new store)."""
        if self.formed is None:
            self.formed = torch.zeros(batch, dtype=torch.long, device=device)
            self.evicted = torch.zeros(batch, dtype=torch.long, device=device)
        elif self.formed.shape[0] != batch:
            raise ValueError(f"this block store holds a batch of {self.formed.shape[0]} rows, the input has {batch}")
        return self.formed

    def due(self, q_idx: torch.Tensor, n_local: int) -> torch.Tensor:
        """(batch,) blocks each row must hold after a forward of queries `q_idx` (batch, q_len): those that have
        reached the middle of the row's next query (so the cache may drop every key that left the window).
        With `block_size <= n_local` all their tokens are among the forward's keys."""
        last = q_idx.amax(1) if q_idx.shape[1] else torch.full_like(q_idx[:, 0], -1)
        next_query = torch.where(last >= 0, last + 1, -1)
        return middle_blocks(next_query, self.n_global, n_local, self.memory.block_size)

    def new_columns(self, k_idx: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """Key columns (batch, n * block_size) holding the tokens of the blocks each row forms now (blocks
        `formed .. upto - 1`; -1 beyond a row's blocks), read from the token indices `k_idx` (batch, k_len)
        of a forward's key columns. ValueError when a token of such a block is not among the columns."""
        B = k_idx.shape[0]
        formed = self.pending(B, k_idx.device).to(k_idx.device)
        upto = upto.to(k_idx.device)
        count = (upto - formed).clamp(min=0)
        bs = self.memory.block_size
        n = int(count.max()) if B else 0
        if n == 0:
            return torch.empty(B, 0, dtype=torch.long, device=k_idx.device)
        want = self.n_global + formed[:, None] * bs + torch.arange(n * bs, device=k_idx.device)  # token indices
        # Columns hold increasing token indices per row (padding -1 first), so a search finds each token.
        sorted_idx = torch.where(k_idx >= 0, k_idx, -1)
        col = torch.searchsorted(sorted_idx.contiguous(), want.contiguous()).clamp(max=k_idx.shape[1] - 1)
        found = torch.gather(sorted_idx, 1, col) == want
        needed = torch.arange(n * bs, device=k_idx.device) < (count * bs)[:, None]
        if bool((needed & ~found).any()):
            raise ValueError(
                "block memory: the tokens of a block that left the window are not among the key columns "
                "(the cache dropped them before their block was stored)"
            )
        return torch.where(needed, col, -1)

    def ingest(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        k_idx: torch.Tensor,
        upto: torch.Tensor,
        rope: Rope | None = None,
        k_pos: torch.Tensor | None = None,
    ) -> None:
        """Store the blocks each row forms now (`formed .. upto - 1`) from a forward's key columns: `keys`,
        `values` (batch, kv_heads, k_len, d) with token indices `k_idx` (batch, k_len). RoPE keys sit at
        positions `k_pos` and are brought back to position 0 with `rope`. Stored keys and values carry no
        gradient (memory is read at distance D, never trained through)."""
        cols = self.new_columns(k_idx.to(keys.device), upto)
        if cols.shape[1] == 0:
            return
        safe = cols.clamp(min=0)
        k = torch.gather(keys.detach(), 2, safe[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
        v = torch.gather(values.detach(), 2, safe[:, None, :, None].expand(-1, values.shape[1], -1, values.shape[-1]))
        if rope is not None:
            assert k_pos is not None, "RoPE keys need their positions"
            pos = torch.gather(k_pos.to(keys.device), 1, safe)
            k = rope.rotate(k, *rope.cos_sin(-pos))
        self.add(k, v, upto)

    def add(self, keys: torch.Tensor, values: torch.Tensor, upto: torch.Tensor) -> None:
        """Store the blocks each row forms now (`formed .. upto - 1`): `keys` (batch, kv_heads, n * bs, d) at
        position 0 and `values` (batch, kv_heads, n * bs, dv), taken at `new_columns(k_idx, upto)` (what lies
        beyond a row's blocks is ignored)."""
        B, Hkv, width, d = keys.shape
        bs = self.memory.block_size
        formed = self.pending(B, keys.device)
        upto = upto.to(formed.device)
        count = (upto - formed).clamp(min=0)
        n = width // bs
        if n == 0 or int(count.max()) == 0:
            return
        if width != n * bs or n < int(count.max()):
            raise ValueError(f"block memory: {width} key columns do not hold {int(count.max())} blocks of {bs}")
        dv = values.shape[-1]
        kb = keys.reshape(B, Hkv, n, bs, d)
        vb = values.reshape(B, Hkv, n, bs, dv)
        summary = summarise(kb, self.memory.representatives)
        kq, ks = _quantize(kb, self.memory.store_dtype)
        vq, vs = _quantize(vb, self.memory.store_dtype)
        if self.first is None:
            self._allocate(B, Hkv, d, dv, kq, vq, ks is not None, keys.device)
        for r in range(B):
            for j in range(int(count[r])):
                slot = self._free_slot(r)
                self._write(r, slot, kq[r, :, j], vq[r, :, j], ks, vs, summary[r, :, j], j)
                assert self.first is not None
                self.first[r, slot] = self.n_global + (int(formed[r]) + j) * bs
        self.formed = formed + count

    def _allocate(self, B, Hkv, d, dv, kq, vq, scaled: bool, device) -> None:
        # Keys and values in host memory when the model runs on an accelerator, the hot blocks on the device.
        self.host = torch.device("cpu")
        if device.type != "cpu":
            self.hot = HotBlocks(self.memory.hot_blocks, device)
        bs = self.memory.block_size
        self.keys = torch.empty(B, Hkv, 0, bs, d, dtype=kq.dtype, device=self.host)
        self.values = torch.empty(B, Hkv, 0, bs, dv, dtype=vq.dtype, device=self.host)
        if scaled:
            self.key_scale = torch.empty(B, Hkv, 0, bs, 1, device=self.host)
            self.value_scale = torch.empty(B, Hkv, 0, bs, 1, device=self.host)
        self.summary = torch.empty(B, Hkv, 0, 2 * self.memory.representatives, d, device=device)
        self.first = torch.empty(B, 0, dtype=torch.long, device=device)
        self.uses = torch.empty(B, 0, dtype=torch.long, device=device)

    def _grow(self) -> None:
        """Double the slots (up to the cap), every row: new slots are empty."""
        assert self.first is not None
        cap = self.memory.max_blocks
        old = self.slots
        new = max(4, 2 * old) if cap is None else min(cap, max(4, 2 * old))
        extra = new - old

        def pad(t: torch.Tensor | None, dim: int, fill=0) -> torch.Tensor | None:
            if t is None:
                return None
            shape = list(t.shape)
            shape[dim] = extra
            grown = torch.cat([t, t.new_full(shape, fill)], dim)
            # Pinned host memory copies to the accelerator asynchronously.
            pin = self.hot is not None and self.hot.device.type == "cuda" and grown.device.type == "cpu"
            return grown.pin_memory() if pin else grown

        self.keys, self.values = pad(self.keys, 2), pad(self.values, 2)
        self.key_scale, self.value_scale = pad(self.key_scale, 2), pad(self.value_scale, 2)
        self.summary = pad(self.summary, 2)
        self.first, self.uses = pad(self.first, 1, -1), pad(self.uses, 1)

    def _free_slot(self, row: int) -> int:
        """A slot of `row` for a new block: an empty one, else more slots, else (at the cap) the slot of the
        least-chosen block, the oldest among equals, which is evicted."""
        assert self.first is not None and self.uses is not None and self.evicted is not None
        empty = (self.first[row] < 0).nonzero()
        if empty.numel():
            return int(empty[0])
        if self.memory.max_blocks is None or self.slots < self.memory.max_blocks:
            self._grow()
            return self._free_slot(row)
        # Least uses first, then the oldest (smallest first token): one key orders both.
        order = self.uses[row] * (self.first[row].max() + 1) + self.first[row]
        slot = int(order.argmin())
        self.evicted[row] += 1
        return slot

    def _write(self, r, slot, k, v, ks, vs, summary, j) -> None:
        assert self.keys is not None and self.values is not None and self.summary is not None
        assert self.uses is not None
        self.keys[r, :, slot] = k
        self.values[r, :, slot] = v
        if ks is not None and self.key_scale is not None and self.value_scale is not None:
            self.key_scale[r, :, slot] = ks[r, :, j]
            self.value_scale[r, :, slot] = vs[r, :, j]
        self.summary[r, :, slot] = summary
        self.uses[r, slot] = 0
        if self.hot is not None:  # a block replaced by the cap: the device copy of that slot is stale
            self.hot.forget(r, slot)

    def record_uses(self, chosen: torch.Tensor) -> None:
        """Count a choice `chosen` (batch, Hc, C, K) of slots (-1: none): each slot once per chunk that chose it."""
        if self.uses is None:
            return
        B, N = self.uses.shape
        hit = torch.zeros(B, chosen.shape[2], N + 1, dtype=torch.bool, device=self.uses.device)
        slots = torch.where(chosen >= 0, chosen, N).to(self.uses.device)
        for h in range(chosen.shape[1]):
            hit.scatter_(-1, slots[:, h], True)
        self.uses += hit[..., :N].sum(1)

    # ------------------------------------------------------------------------------------ batch bookkeeping

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (and reorder, repeat) rows `index` (beam search, batch selection)."""
        for name in ("keys", "values", "key_scale", "value_scale", "summary", "first", "uses", "formed", "evicted"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
        if self.hot is not None:
            self.hot.clear()

    def reset(self) -> None:
        self.__init__(self.memory, self.n_global)  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Choice:
    """The blocks each query chunk of one forward attends, for one layer.

    chosen: (batch, Hc, C, K) slots of the layer's store, -1: none (Hc: 1 shared, or kv_heads).
    chunk: (batch, q_len) each query's chunk 0 .. C-1 in this forward, -1: padding.
    """

    chosen: torch.Tensor
    chunk: torch.Tensor


def chunks_of(q_idx: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """Each query's chunk numbered from 0 in this forward (batch, q_len; -1 padding), and the number of chunks.
    Chunks are aligned on token indices (`rule.query_chunk`); a row's first chunk in the forward is 0."""
    absolute = query_chunk(q_idx, chunk)
    big = torch.iinfo(torch.long).max
    lowest = torch.where(absolute >= 0, absolute, big).amin(1, keepdim=True)
    local = torch.where(absolute >= 0, absolute - lowest, -1)
    return local, int(local.max()) + 1 if local.numel() and int(local.max()) >= 0 else 0


def choose(store: BlockStore, queries: torch.Tensor, q_idx: torch.Tensor, n_local: int, record: bool = True) -> Choice:
    """The blocks each query chunk attends: for queries `queries` (batch, heads, q_len, d) moved to distance
    D and their token indices `q_idx` (batch, q_len), the `blocks` best stored blocks among those that have
    reached the middle of the chunk's last query (`rule.middle_blocks`), by their representatives.

    A chunk is scored with the mean of its queries (InfLLM); a block's score is the highest upper bound of
    `q . k` over its parts (`upper_bounds`), summed over the heads that share the choice (every head, or the
    heads of one kv head). Fewer candidates than `blocks`: all of them. Ties go to the earlier slot.
    `record`: count the choice in the store's use counts (kept with a cap `max_blocks`: they order eviction)."""
    memory = store.memory
    B, H, T, d = queries.shape
    if T == 1:  # a decoded token: its own chunk
        chunk, C = torch.where(q_idx >= 0, 0, -1), int(bool((q_idx >= 0).any()))
    else:
        chunk, C = chunks_of(q_idx, memory.query_chunk)
    K = memory.blocks
    if C == 0 or store.summary is None or store.first is None:  # nothing stored: no chunk chooses a block
        return Choice(torch.full((B, 1, C, K), -1, dtype=torch.long, device=q_idx.device), chunk)
    device = store.summary.device
    Hkv, N = store.summary.shape[1], store.slots
    rep = H // Hkv
    Hc = 1 if memory.shared else Hkv
    # Mean query of each chunk, per head, and the chunk's last query (which blocks it may choose).
    if T == 1:  # a decoded token: its own chunk
        mean_q, last = queries.float().to(device), q_idx.to(device)
    else:
        c_idx = torch.where(chunk >= 0, chunk, C).to(device)  # padding goes to a spare chunk
        sums = torch.zeros(B, H, C + 1, d, device=device)
        sums.scatter_add_(2, c_idx[:, None, :, None].expand(B, H, T, d), queries.float().to(device))
        counts = torch.zeros(B, C + 1, device=device).scatter_add_(1, c_idx, torch.ones(B, T, device=device))
        mean_q = (sums / counts.clamp(min=1)[:, None, :, None])[:, :, :C]
        last = torch.full((B, C + 1), -1, dtype=torch.long, device=device)
        last = last.scatter_reduce_(1, c_idx, q_idx.to(device), reduce="amax")[:, :C]
    allowed_blocks = middle_blocks(last, store.n_global, n_local, memory.block_size)  # (B, C)
    # Bounds from the representatives: (B, Hkv, rep * C, N) -> summed over the heads that share a choice.
    bounds = upper_bounds(mean_q.reshape(B, Hkv, rep * C, d), store.summary)
    scores = bounds.view(B, Hkv, rep, C, N).sum(2)  # (B, Hkv, C, N)
    if memory.shared:
        scores = scores.sum(1, keepdim=True)
    number = torch.where(store.first >= 0, (store.first - store.n_global) // memory.block_size, -1)
    ok = (store.first >= 0)[:, None, :] & (number[:, None, :] < allowed_blocks[:, :, None])  # (B, C, N)
    scores = scores.masked_fill(~ok[:, None], float("-inf"))
    k = min(K, N)
    best, where = scores.sort(dim=-1, descending=True, stable=True)  # stable: ties go to the earlier slot
    best, where = best[..., :k], where[..., :k]
    chosen = torch.where(best > float("-inf"), where, -1)
    if k < K:
        chosen = torch.cat([chosen, chosen.new_full((B, Hc, C, K - k), -1)], -1)
    if record and memory.max_blocks is not None:  # the counts order eviction, which only a cap needs
        store.record_uses(chosen)
    return Choice(chosen, chunk)


__all__ = ["BlockMemory", "BlockStore", "Choice", "HotBlocks", "choose", "chunks_of", "summarise", "upper_bounds"]
