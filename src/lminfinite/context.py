"""The decoder's forward pre-hook: normalise each forward's arguments, then build its plan.

`enable()` puts a forward pre-hook on the model's decoder (the module that owns the layers and
the rotary embedding). Before every forward it does two things:

1. `normalise_arguments`: one keyword dict (positional ids moved to keywords, the cache under the
   decoder's own name), the ids checked, the padding of the new tokens read from the 2D
   `attention_mask` (left padding only), and the cache chosen: the caller's LambdaCache, a new one
   where transformers would build its own cache, or a clear error for a cache that cannot be used;
2. `plan.build_plan`: the forward's `ForwardPlan` (the layer specs enable() built, token indices,
   bounded positions, the cache's step), which replaces `position_ids` and travels with the forward's
   keyword arguments (`PLAN_KWARG`): transformers hands them to every layer's attention function, so
   a layer re-run later (gradient checkpointing) or another thread's forward sees its own plan. The
   plan is the only way per-forward state reaches attention (ALiBi models: see `alibi.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .cache import LambdaCache
from .compat import cache_keyword
from .config import LambdaConfig
from .plan import PLAN_KWARG, ForwardPlan, LayerSpec, build_plan

USE_LAMBDA_CACHE = (
    "pass cache=lminfinite.LambdaCache.for_model(model) (to continue from earlier tokens, fill it with "
    "lminfinite.prefill(model, ids, cache=cache)), or pass no cache and let the model make one"
)


@dataclass
class LambdaState:
    """What enable() attached to a model: its settings, its layer specs, and the handles disable() removes."""

    config: LambdaConfig
    layers: tuple[LayerSpec, ...]
    previous_attn: str
    handles: list = field(default_factory=list)
    vocab_size: int | None = None  # rows of the input embedding: token ids must be below it

    @property
    def num_layers(self) -> int:
        return len(self.layers)


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


def _check_ids(input_ids: torch.Tensor, vocab_size: int | None) -> None:
    """Token ids must be integers inside the vocabulary (else torch fails deep inside the embedding)."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got a tensor of {input_ids.dtype}")
    if vocab_size is not None and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the model's vocabulary (ids 0 .. {vocab_size - 1})")


def _choose_cache(state: LambdaState, cache, use_cache: bool) -> LambdaCache | None:
    """The LambdaCache of this forward (None: no cache), from what the caller passed.

    A cache of another class cannot hold what Λ-attention keeps, and must not be silently replaced
    by a fresh LambdaCache on each call (every forward would then see no context): it is refused. The
    cache `generate()` makes for itself is replaced before it gets here (`_prepare_inputs_checked`)."""
    if cache is None:
        return LambdaCache(state.config, state.num_layers) if use_cache else None
    if isinstance(cache, LambdaCache):
        return cache
    name = type(cache).__name__
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a LambdaCache, got a {name}; {USE_LAMBDA_CACHE}")
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"a filled {name} was passed to an lminfinite-enabled model: its keys were computed without "
            f"Λ-attention and it cannot hold what Λ-attention keeps; {USE_LAMBDA_CACHE}"
        )
    raise ValueError(
        f"a {name} was passed to an lminfinite-enabled model, which cannot fill it (it would stay empty "
        f"and every call would start without context); {USE_LAMBDA_CACHE}"
    )


def normalise_arguments(
    state: LambdaState, module: nn.Module, cache_kw: str, args: tuple, kwargs: dict
) -> tuple[dict, torch.Tensor, LambdaCache | None]:
    """The forward's keyword arguments (ids as a keyword, the cache under `cache_kw`), the padding mask of
    its new tokens (batch, q_len), and its LambdaCache (None: no cache)."""
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1:
            raise TypeError("call the model with keyword arguments when lminfinite is enabled")
        kwargs["input_ids"], args = args[0], ()
    for alias in ("past_key_values", "cache"):
        if alias != cache_kw and alias in kwargs:
            kwargs[cache_kw] = kwargs.pop(alias)
    x = kwargs.get("input_ids")
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor of token ids, got {type(x).__name__}")
        _check_ids(x, state.vocab_size)
    else:
        x = kwargs.get("inputs_embeds")
    if x is None or x.dim() < 2:
        raise ValueError("lminfinite needs input_ids (batch, length) or inputs_embeds (batch, length, hidden)")
    batch, q_len = x.shape[:2]
    valid = _padding(kwargs.get("attention_mask"), batch, q_len, x.device)

    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(module.config, "use_cache", False)) and not module.training
    cache = _choose_cache(state, kwargs.get(cache_kw), bool(use_cache))
    if cache is not None:
        cache.check_compatible(state.config, state.num_layers, module)
        kwargs[cache_kw] = cache
        kwargs["use_cache"] = True
    return kwargs, valid, cache


def make_pre_hook(state: LambdaState, decoder: nn.Module, publish: Callable[[ForwardPlan], None] | None = None):
    """The decoder's forward pre-hook. `publish`: also hands each plan to it (ALiBi models, `alibi.py`)."""
    cache_kw = cache_keyword(decoder)

    def pre_hook(module, args, kwargs):
        kwargs, valid, cache = normalise_arguments(state, module, cache_kw, args, kwargs)
        layout = None if cache is None else cache.begin(valid, state.layers)
        plan = build_plan(state.config, state.layers, valid, layout)
        kwargs["position_ids"] = plan.q_pos
        kwargs[PLAN_KWARG] = plan
        if publish is not None:
            publish(plan)
        return (), kwargs

    return pre_hook


def _prepare_inputs_checked(self, input_ids, *args, **kwargs):
    """`prepare_inputs_for_generation` of an enabled model.

    The empty cache `generate()` made for itself (a DynamicCache it did not get from the user) is replaced
    by a LambdaCache before the first forward; generate() then continues with the cache the model returns.
    Ids that do not extend a LambdaCache given to `generate()` are refused: generate() feeds
    `ids[:, cache_length:]`, so shorter ids would feed tokens the cache already holds (or none).
    A LambdaCache always gets only the tokens it does not hold yet, also where generate() would feed the
    whole sequence again (a model whose config says `use_cache=False`, e.g. MPT, given a cache)."""
    name = "cache" if "cache" in kwargs else "past_key_values"
    cache = kwargs.get(name)
    own = type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False)
    if own and cache.get_seq_length() == 0:
        kwargs[name] = cache = LambdaCache.for_model(self)
    if isinstance(cache, LambdaCache) and kwargs.get("next_sequence_length") is None and cache.get_seq_length():
        kwargs["next_sequence_length"] = input_ids.shape[1] - cache.get_seq_length()
    new = kwargs.get("next_sequence_length")
    if isinstance(cache, LambdaCache) and new is not None and new < 1 and kwargs.get("inputs_embeds") is None:
        held = cache.get_seq_length()
        raise ValueError(
            f"generate() was given {input_ids.shape[1]} token ids with a LambdaCache that already holds "
            f"{held}: pass the full ids (the {held} tokens the cache holds followed by at least one new one)"
        )
    return type(self).prepare_inputs_for_generation(self, input_ids, *args, **kwargs)


class _GenerationGuard:
    """Puts `_prepare_inputs_checked` in place of a model's `prepare_inputs_for_generation` until `remove()`."""

    def __init__(self, model: nn.Module):
        self.model = model
        setattr(model, "prepare_inputs_for_generation", MethodType(_prepare_inputs_checked, model))  # noqa: B010

    def remove(self) -> None:
        vars(self.model).pop("prepare_inputs_for_generation", None)


def guard_generation(model: nn.Module) -> list:
    """The handles of `_GenerationGuard` on `model` (none for a model that cannot generate)."""
    return [_GenerationGuard(model)] if callable(getattr(model, "prepare_inputs_for_generation", None)) else []
