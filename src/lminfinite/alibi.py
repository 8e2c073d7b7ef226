"""ALiBi models (MPT, Bloom): their slopes, the adapters that route their attention to the Λ kernels,
and the glue that carries each forward's plan to those adapters.

MPT and Bloom add their ALiBi biases inside their attention modules, outside transformers'
AttentionInterface, from bias tables sized by the context (MPT: `max_seq_len`, so the unmodified
model cannot even run past it). `enable()` replaces only the `forward` of those attention modules
with a few lines per family (an `Adapter`): the module's own projections, the cache update, then the
same `lambda_attention_forward` every other model uses, with the model's own slopes (read once from
the model's own ALiBi function). The bias rule itself lives in `positions.Alibi`; which model types
have an adapter is written in `families.py`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import lambda_attention_forward
from .context import CTX_KWARG

# The attention implementation name an enabled ALiBi model carries in its config (only its mask
# creation reads it: these models refuse `set_attn_implementation`).
ALIBI_NAME = "lm_infinite_alibi"

# Why the plan rides on the mask placeholder: MPT's and Bloom's decoder blocks pass their attention
# modules no per-forward argument of ours (no **kwargs), but they do pass the mask they built. Under
# ALIBI_NAME, transformers builds that mask with `alibi_mask` below, which returns an O(1) placeholder
# (MPT calls `.to(torch.bool)` on it) instead of a (q_len, k_len) mask, with the forward's plan set on
# it as an attribute. So each layer, also one re-run later by gradient checkpointing, reads its own
# forward's plan rather than the latest one. The mask function finds the plan through `_STATES`:
# id(model config) -> LambdaState, weak, so a dropped model is not kept alive.
_STATES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def alibi_mask(*args, config=None, **kwargs) -> torch.Tensor:
    """Mask function for ALiBi models: an O(1) placeholder carrying the current forward's plan."""
    placeholder = torch.zeros((), dtype=torch.bool)
    state = _STATES.get(id(config))
    setattr(placeholder, CTX_KWARG, None if state is None else state.plan)
    return placeholder


def _plan_kwargs(attention_mask) -> dict:
    """The forward's plan, read back from the placeholder mask, as keyword arguments for the attention."""
    plan = getattr(attention_mask, CTX_KWARG, None)
    return {} if plan is None else {CTX_KWARG: plan}


def register() -> None:
    """Register ALIBI_NAME with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ALIBI_NAME, lambda_attention_forward)
    AttentionMaskInterface.register(ALIBI_NAME, alibi_mask)


# ------------------------------------------------------------------------------------------- adapters


def _mpt_slopes(decoder: Any) -> torch.Tensor:
    bias = decoder.build_mpt_alibi_tensor(decoder.num_heads, 2, device="cpu")  # (heads, 1, 2): [-slope, 0]
    return -bias[:, 0, 0].float()


def _bloom_slopes(decoder: Any) -> torch.Tensor:
    mask = torch.ones(1, 2, dtype=torch.long)
    bias = decoder.build_alibi_tensor(mask, decoder.num_heads, torch.float32)  # (heads, 1, 2): [0, slope]
    return bias[:, 0, 1].float()


def _mpt_attention(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    B, T, _ = hidden_states.shape
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    out, _ = lambda_attention_forward(self, q, k, v, None, scaling=self.softmax_scale, **_plan_kwargs(attention_mask))
    return self.out_proj(out.reshape(B, T, -1)), None


def _bloom_attention(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
    B, T, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = lambda_attention_forward(self, q, k, v, None, scaling=self.inv_norm_factor, **_plan_kwargs(attention_mask))
    out = self.dense(out.reshape(B, T, -1))
    return residual + F.dropout(out, p=self.hidden_dropout, training=self.training), None


def _check_bloom(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise ValueError(
            "Bloom with slow_but_exact=True and pretraining_tp > 1 is not supported; set slow_but_exact=False"
        )


@dataclass(frozen=True)
class Adapter:
    """How one ALiBi family is routed to the Λ kernels.

    attention: replaces the `forward` of each attention module (a function of the module).
    slopes: reads the model's own per-head slopes from its decoder (float32, CPU).
    check: refuses, with the reason, a configuration the adapter does not reproduce.
    """

    attention: Callable
    slopes: Callable[[nn.Module], torch.Tensor]
    check: Callable[[nn.Module], None] = lambda model: None


MPT = Adapter(_mpt_attention, _mpt_slopes)
BLOOM = Adapter(_bloom_attention, _bloom_slopes, _check_bloom)


class _Forward:
    """A handle that puts `fn` in place of a module's `forward` until `remove()` (what `disable()` calls)."""

    def __init__(self, module: nn.Module, fn):
        self.module = module
        module.forward = MethodType(fn, module)

    def remove(self) -> None:
        vars(self.module).pop("forward", None)


class _Registered:
    """A handle that lets `alibi_mask` find `state` from the model's config until `remove()`."""

    def __init__(self, config, state):
        self.key = id(config)
        _STATES[self.key] = state

    def remove(self) -> None:
        _STATES.pop(self.key, None)


def install(state, config, adapter: Adapter) -> list:
    """Route each attention module of an ALiBi model to the Λ kernels; returns the handles."""
    register()
    return [_Registered(config, state)] + [_Forward(module, adapter.attention) for module in state.modules]
