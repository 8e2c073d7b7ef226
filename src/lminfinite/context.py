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
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from .cache import LambdaCache
from .config import LambdaConfig
from .positions import Rope
from .rule import token_indices

CTX_KWARG = "lminfinite_ctx"


@dataclass
class ForwardContext:
    """What every layer's attention needs to know about the current forward."""

    q_idx: torch.Tensor  # (batch, q_len) token index of each query, -1 = padding
    q_pos: torch.Tensor  # (batch, q_len) RoPE position of each query
    k_idx: torch.Tensor  # (batch, k_len) token index of each key column the layers see
    n_candidates: int  # leading key columns that may hold starting tokens (0: no global branch)
    _rotations: dict = field(default_factory=dict)

    def global_rotations(self, rope: Rope, limit_distance: int, device: torch.device, sinks: bool = False):
        """(cos, sin) moving queries to position D, and (cos, sin) moving starting keys to 0.

        With `sinks` (StreamingLLM-style baseline) a query never moves past its own position: it
        is placed at min(D, token index), so a cache that is not full yet keeps true distances."""
        key = (id(rope.rotary), rope.freq_attr, device)  # one entry per rotary embedding and device
        if key not in self._rotations:
            q_pos, g_idx = self.q_pos.to(device), self.k_idx[:, : self.n_candidates].to(device)
            target = self.q_idx.to(device).clamp(max=limit_distance) if sinks else limit_distance
            self._rotations[key] = (rope.cos_sin(target - q_pos), rope.cos_sin(-g_idx.clamp(min=0)))
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
    ctx: ForwardContext | None = None


def candidate_columns(k_idx: torch.Tensor, n_global: int) -> int:
    """Number of leading key columns that hold some row's starting tokens (up to the last one)."""
    if n_global == 0 or k_idx.numel() == 0:
        return 0
    cols = ((k_idx >= 0) & (k_idx < n_global)).any(0).nonzero()
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
            cache = LambdaCache(cfg.n_global, cfg.n_local, state.num_layers)
        if cache is not None:
            kwargs[cache_kw] = cache
            kwargs["use_cache"] = True
            cache.check_compatible(cfg.n_global, cfg.n_local, state.num_layers, id(module))
            q_idx, q_pos, k_idx = cache.begin(valid, state.layer_ropes)
        else:
            q_idx = token_indices(valid)
            q_pos, k_idx = q_idx.clamp(min=0), q_idx
        kwargs["position_ids"] = q_pos
        needs_global = cfg.n_global > 0 and q_idx.numel() > 0 and int(q_idx.max()) >= cfg.n_local
        n_cand = candidate_columns(k_idx, cfg.n_global) if needs_global else 0
        state.ctx = ForwardContext(q_idx=q_idx, q_pos=q_pos, k_idx=k_idx, n_candidates=n_cand)
        kwargs[CTX_KWARG] = state.ctx
        return args, kwargs

    return pre_hook


def post_hook(module, args, kwargs, output):
    """After a forward: its cache layout is complete (see `LambdaCache.begin`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, LambdaCache):
        cache.finish()
