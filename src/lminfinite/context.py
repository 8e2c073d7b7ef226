"""Per-forward context: token indices, bounded positions and the cache, set before each forward.

`enable()` puts a forward pre-hook on the model's decoder (the module that owns the layers and
the rotary embedding). Before every forward it:

1. reads the padding of the new tokens from the 2D `attention_mask` (left padding only);
2. gives each token its index among its row's real tokens (the Λ rule works on these);
3. replaces `position_ids` with the positions RoPE must use (bounded by the LambdaCache);
4. swaps in a LambdaCache where transformers would build a DynamicCache;
5. passes all this down with the forward's keyword arguments (`lminfinite_ctx`), which transformers
   hands to every layer's attention function, so a layer re-run later (gradient checkpointing) or
   another thread's forward sees its own context; `state.ctx` keeps the latest one as a fallback
   for models that do not forward extra keyword arguments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers.cache_utils import Cache

from .cache import LambdaCache
from .config import LambdaConfig
from .positions import Alibi, Rope
from .rule import middle_rule, token_indices

CTX_KWARG = "lminfinite_ctx"


@dataclass
class ForwardContext:
    """What every layer's attention needs to know about the current forward."""

    q_idx: torch.Tensor  # (batch, q_len) token index of each query, -1 = padding
    q_pos: torch.Tensor  # (batch, q_len) RoPE position of each query
    k_idx: torch.Tensor  # (batch, k_len) token index of each key column the layers see
    n_candidates: int  # leading key columns that may hold starting tokens (0: no global branch)
    k_pos: torch.Tensor | None = None  # (batch, k_len) RoPE position each key column is at (default: q_pos)
    n_middle: int = 0  # leading key columns that may hold middle keys (top-k extension; 0 when off)
    _rotations: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k_pos is None:
            self.k_pos = self.q_pos

    def query_rotation(self, rope: Rope, limit_distance: int, device: torch.device, sinks: bool = False):
        """(cos, sin) moving each query from its position to position D (the far keys' branch).

        With `sinks` (StreamingLLM-style baseline) a query never moves past its own position: it
        is placed at min(D, token index), so a cache that is not full yet keeps true distances."""
        key = ("q", id(rope.rotary), rope.freq_attr, device)  # one entry per rotary embedding and device
        if key not in self._rotations:
            q_pos = self.q_pos.to(device)
            target = self.q_idx.to(device).clamp(max=limit_distance) if sinks else limit_distance
            self._rotations[key] = rope.cos_sin(target - q_pos)
        return self._rotations[key]

    def key_rotation(self, rope: Rope, start: int, stop: int, device: torch.device):
        """(cos, sin) bringing key columns [start, stop) back to position 0."""
        key = ("k", id(rope.rotary), rope.freq_attr, device, start, stop)
        if key not in self._rotations:
            self._rotations[key] = rope.cos_sin(-self.k_pos[:, start:stop].to(device))
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


@dataclass
class LambdaState:
    """Everything enable() attached to a model."""

    config: LambdaConfig
    num_layers: int
    previous_attn: str
    handles: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    layer_ropes: dict = field(default_factory=dict)  # layer_idx -> the Rope that layer applies (None: no RoPE)
    alibi: Alibi | None = None  # ALiBi models: the slopes (on the CPU) and D
    ctx: ForwardContext | None = None
    _alibi_on: dict = field(default_factory=dict)

    def alibi_on(self, device: torch.device) -> Alibi | None:
        """The model's ALiBi with its slopes on `device` (None for models without ALiBi)."""
        if self.alibi is None:
            return None
        if device not in self._alibi_on:
            self._alibi_on[device] = replace(self.alibi, slopes=self.alibi.slopes.to(device))
        return self._alibi_on[device]


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


def _padding(attention_mask, batch: int, q_len: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("lminfinite needs a 2D padding attention_mask (batch, length) or None")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < q_len:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the {batch} x {q_len} input "
            "(it must span the past tokens and the new ones)"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("lminfinite supports left padding only (no padding after a real token)")
    return mask[:, -q_len:]


def make_pre_hook(state: LambdaState, decoder: nn.Module):
    params = inspect.signature(decoder.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    config = decoder.config

    def pre_hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            if len(args) > 1:
                raise TypeError("call the model with keyword arguments when lminfinite is enabled")
            kwargs["input_ids"], args = args[0], ()
        for alias in ("past_key_values", "cache"):
            if alias != cache_kw and alias in kwargs:
                kwargs[cache_kw] = kwargs.pop(alias)
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        batch, q_len = x.shape[:2]
        valid = _padding(kwargs.get("attention_mask"), batch, q_len, x.device)

        cache = kwargs.get(cache_kw)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(config, "use_cache", False)) and not module.training
        cfg = state.config
        if cache is not None and not isinstance(cache, LambdaCache):
            if not isinstance(cache, Cache) or cache.get_seq_length() > 0:
                raise ValueError(
                    f"a filled {type(cache).__name__} was passed to an lminfinite-enabled model; it needs a "
                    "LambdaCache: create the cache after enable() (LambdaCache.for_model(model)) or let the "
                    "model make one"
                )
            cache = None
            use_cache = True
        if cache is None and use_cache:
            cache = LambdaCache(cfg.n_global, cfg.n_local, state.num_layers, keep_middle=cfg.top_k > 0)
        if cache is not None:
            kwargs[cache_kw] = cache
            kwargs["use_cache"] = True
            cache.check_compatible(cfg.n_global, cfg.n_local, state.num_layers, id(module), cfg.top_k > 0)
            q_idx, q_pos, k_idx, k_pos = cache.begin(valid, state.layer_ropes)
        else:
            q_idx = token_indices(valid)
            q_pos = k_pos = q_idx.clamp(min=0)
            k_idx = q_idx
        kwargs["position_ids"] = q_pos
        beyond = q_idx.numel() > 0 and int(q_idx.max()) >= cfg.n_local
        n_cand = candidate_columns(k_idx, cfg.n_global) if beyond and cfg.n_global > 0 else 0
        n_mid = middle_columns(q_idx, k_idx, cfg.n_global, cfg.n_local) if beyond and cfg.top_k > 0 else 0
        state.ctx = ForwardContext(
            q_idx=q_idx, q_pos=q_pos, k_idx=k_idx, n_candidates=n_cand, k_pos=k_pos, n_middle=n_mid
        )
        kwargs[CTX_KWARG] = state.ctx
        return args, kwargs

    return pre_hook


def post_hook(module, args, kwargs, output):
    """After a forward: its cache layout is complete (see `LambdaCache.begin`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, LambdaCache):
        cache.finish()
