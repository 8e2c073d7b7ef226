"""What differs between the transformers releases the core supports (5.19 to 5.24), in one place.

Each difference is told apart by looking at the installed transformers (a signature, an attribute), not
by its version number; the versions named are the ones the tests run on (`.ci/run`: 5.24 in `.venv`,
5.19 in `.venv-vllm`).

- The cache keyword of a forward: `cache` on 5.24 (where `past_key_values` is a deprecated alias),
  `past_key_values` on 5.19, whose models put an unknown `cache=` into `**kwargs` and run without it (a
  silent wrong result), or drop it (MPT), and whose generate() refuses it. `cache_keyword(model)` is the
  name the model takes (the library passes that one); an output holds its cache under the same name. An
  enabled model takes `cache=` on both (`accept_cache_keyword`: its forward and generate() rename it).
- GPT-J and CodeGen: on 5.24 their attention modules call transformers' AttentionInterface; on 5.19 each
  attention module keeps its own sin/cos table and computes attention itself in `_attn(query, key, value,
  attention_mask)`, after the rotation and the cache update. `computes_own_attention(model)` tells them
  apart and `route_own_attention` replaces that `_attn` by the call of the AttentionInterface 5.24 makes
  at the same point (their blocks pass the attention modules no keyword argument of ours, so the plan
  goes through the mask), and grows each module's table with the model's positions.
"""

from __future__ import annotations

import inspect
from types import MethodType

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .positions import grow_table_on_demand

# Families whose attention modules computed attention themselves (`_attn`) before transformers moved them
# to the AttentionInterface (seen on 5.19; on 5.24 they use it).
OWN_ATTENTION_TYPES = ("gptj", "codegen")


def cache_keyword(model: nn.Module) -> str:
    """The keyword `model.forward` takes its cache under: "cache" (transformers 5.24) or "past_key_values" (5.19)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _rename_cache(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: `cache=` passed as `past_key_values=` (transformers 5.19)."""
    if "cache" not in kwargs:
        return None
    if kwargs.get("past_key_values") is not None:
        raise ValueError("pass the cache once: cache= or past_key_values=, not both")
    kwargs["past_key_values"] = kwargs.pop("cache")
    return args, kwargs


def _generate_taking_cache(self, *args, **kwargs):
    """generate() of an enabled model on transformers 5.19: `cache=` passed as `past_key_values=`."""
    if "cache" in kwargs:
        if kwargs.get("past_key_values") is not None:
            raise ValueError("pass the cache once: cache= or past_key_values=, not both")
        kwargs["past_key_values"] = kwargs.pop("cache")
    return type(self).generate(self, *args, **kwargs)


class _Generate:
    """A handle that puts `_generate_taking_cache` in place of a model's `generate` until `remove()`."""

    def __init__(self, model: nn.Module):
        self.model = model
        setattr(model, "generate", MethodType(_generate_taking_cache, model))  # noqa: B010

    def remove(self) -> None:
        vars(self.model).pop("generate", None)


def accept_cache_keyword(model: nn.Module) -> list:
    """Let `model` take its cache as `cache=` (its forward and generate()) where the installed transformers
    names it `past_key_values` (5.19), as 5.24 does; returns the undo handles (none on 5.24)."""
    if cache_keyword(model) == "cache":
        return []
    handles: list = [model.register_forward_pre_hook(_rename_cache, with_kwargs=True)]
    if callable(getattr(model, "generate", None)):
        handles.append(_Generate(model))
    return handles


def own_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a GPT-J or CodeGen model that compute attention themselves in `_attn` with a
    sin/cos table of their own (transformers 5.19); empty where they use the AttentionInterface (5.24)."""
    if getattr(model.config, "model_type", None) not in OWN_ATTENTION_TYPES:
        return []
    return [
        m
        for m in model.modules()
        if callable(getattr(m, "_attn", None)) and hasattr(m, "embed_positions") and hasattr(m, "layer_idx")
    ]


def computes_own_attention(model: nn.Module) -> bool:
    """Whether `model` is a GPT-J or CodeGen whose attention modules compute attention themselves (5.19)."""
    return bool(own_attention_modules(model))


def _attn_via_interface(name: str):
    """An `_attn` of GPT-J's or CodeGen's (transformers 5.19) that calls the attention function registered
    under `name`, as their forward does on 5.24: (batch, heads, q_len, d) in, (batch, heads, q_len, d) out."""

    def _attn(self, query, key, value, attention_mask=None):
        dropout = self.attn_dropout.p if self.training else 0.0
        out, _ = ALL_ATTENTION_FUNCTIONS[name](
            self,
            query.to(value.dtype),
            key.to(value.dtype),
            value,
            attention_mask,
            scaling=1.0 / self.scale_attn,
            dropout=dropout,
        )
        return out.transpose(1, 2), None

    return _attn


class _Attn:
    """A handle that puts `fn` in place of a module's `_attn` until `remove()` (what `disable()` calls)."""

    def __init__(self, module: nn.Module, fn):
        self.module = module
        setattr(module, "_attn", MethodType(fn, module))  # noqa: B010 (an instance attribute over the method)

    def remove(self) -> None:
        vars(self.module).pop("_attn", None)


def route_own_attention(modules: list[nn.Module], name: str) -> list:
    """Route the `_attn` of each GPT-J/CodeGen attention module (transformers 5.19) to the attention function
    registered under `name`, and grow each module's sin/cos table on demand; returns the undo handles."""
    handles: list = []
    for module in modules:
        handles.append(grow_table_on_demand(module))
        handles.append(_Attn(module, _attn_via_interface(name)))
    return handles
