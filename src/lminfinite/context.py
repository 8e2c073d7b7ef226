"""The decoder's forward pre-hook: normalise each forward's arguments, then build its plan.

`enable()` puts a forward pre-hook on the model's decoder (the module that owns the layers and
the rotary embedding). Before every forward it does two things:

1. `normalise_arguments`: one keyword dict (positional ids moved to keywords, the cache under the
   decoder's own name), the ids checked, the padding of the new tokens read from the 2D
   `attention_mask` (left padding only), and the cache chosen: the caller's LambdaCache, a new one
   where transformers would build a DynamicCache, or a clear error for a cache that cannot be used;
2. `plan.build_plan`: the forward's `ForwardPlan` (token indices, bounded positions, the cache's
   step), which replaces `position_ids` and travels with the forward's keyword arguments
   (`lminfinite_ctx`): transformers hands them to every layer's attention function, so a layer re-run
   later (gradient checkpointing) or another thread's forward sees its own plan. `state.plan` keeps the
   latest one as a fallback for models that do not forward extra keyword arguments.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field, replace
from types import MethodType

import torch
from torch import nn
from transformers.cache_utils import Cache

from .cache import LambdaCache
from .config import LambdaConfig
from .plan import ForwardPlan, build_plan
from .positions import Alibi

CTX_KWARG = "lminfinite_ctx"  # the keyword argument that carries a forward's plan to its layers
STATE_ATTR = "_lminfinite"  # the attribute holding the LambdaState on an enabled model and its attention modules

USE_LAMBDA_CACHE = (
    "pass cache=lminfinite.LambdaCache.for_model(model) (to continue from earlier tokens, fill it with "
    "lminfinite.prefill(model, ids, cache=cache)), or pass no cache and let the model make one"
)


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
    vocab_size: int | None = None  # rows of the input embedding: token ids must be below it
    plan: ForwardPlan | None = None  # the latest forward's plan (fallback for models without **kwargs)
    _alibi_on: dict = field(default_factory=dict)

    def alibi_on(self, device: torch.device) -> Alibi | None:
        """The model's ALiBi with its slopes on `device` (None for models without ALiBi)."""
        if self.alibi is None:
            return None
        if device not in self._alibi_on:
            self._alibi_on[device] = replace(self.alibi, slopes=self.alibi.slopes.to(device))
        return self._alibi_on[device]

    @property
    def rotary(self) -> bool:
        """Whether some layer applies RoPE."""
        return any(rope is not None for rope in self.layer_ropes.values())


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


# Foreign caches this hook has replaced by a LambdaCache (see `_choose_cache`): one that comes back is refused.
_REPLACED: weakref.WeakSet = weakref.WeakSet()


def _choose_cache(state: LambdaState, cache, use_cache: bool) -> LambdaCache | None:
    """The LambdaCache of this forward (None: no cache), from what the caller passed.

    A cache of another class cannot hold what Λ-attention keeps, and must not be silently replaced
    by a fresh LambdaCache on each call (every forward would then see no context). It is refused,
    except an empty one that is provably never read again: the DynamicCache `generate()` makes for
    itself (it then continues with the cache the model returns). Such a cache is replaced once and
    remembered: if it comes back (a caller reusing it), it is refused."""
    if cache is None or isinstance(cache, LambdaCache):
        return cache if cache is not None or not use_cache else LambdaCache(state.config, state.num_layers)
    name = type(cache).__name__
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a LambdaCache, got a {name}; {USE_LAMBDA_CACHE}")
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"a filled {name} was passed to an lminfinite-enabled model: its keys were computed without "
            f"Λ-attention and it cannot hold what Λ-attention keeps; {USE_LAMBDA_CACHE}"
        )
    if getattr(cache, "_is_user_defined", False) or cache in _REPLACED:
        raise ValueError(
            f"a {name} was passed to an lminfinite-enabled model, which cannot fill it (it would stay empty "
            f"and every call would start without context); {USE_LAMBDA_CACHE}"
        )
    _REPLACED.add(cache)
    return LambdaCache(state.config, state.num_layers)


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
        cache.check_compatible(state.config, state.num_layers, id(module))
        kwargs[cache_kw] = cache
        kwargs["use_cache"] = True
    return kwargs, valid, cache


def make_pre_hook(state: LambdaState, decoder: nn.Module):
    params = inspect.signature(decoder.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def pre_hook(module, args, kwargs):
        kwargs, valid, cache = normalise_arguments(state, module, cache_kw, args, kwargs)
        cfg = state.config
        layout = None if cache is None else cache.begin(valid, state.rotary)
        plan = build_plan(cfg.n_global, cfg.n_local, cfg.top_k, state.layer_ropes, valid, layout)
        if cache is not None:
            cache.start(plan)
        kwargs["position_ids"] = plan.q_pos
        kwargs[CTX_KWARG] = state.plan = plan
        return (), kwargs

    return pre_hook


def _prepare_inputs_checked(self, input_ids, *args, **kwargs):
    """`prepare_inputs_for_generation` of an enabled model: refuses ids that do not extend the LambdaCache
    given to `generate()`, which feeds `ids[:, cache_length:]`: shorter ids would feed tokens the cache
    already holds (or none) instead of failing."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
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


def post_hook(module, args, kwargs, output):
    """After a forward: its cache layout is complete (see `LambdaCache.begin`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, LambdaCache):
        cache.finish()
