"""ALiBi models (MPT, Bloom): their slopes, and the adapters that route their attention to the Λ kernels.

MPT and Bloom add their ALiBi biases inside their attention modules, outside transformers'
AttentionInterface, from bias tables sized by the context (MPT: `max_seq_len`, so the unmodified
model cannot even run past it). `enable()` replaces only the `forward` of those attention modules
with a few lines per family (an `Adapter`): the module's own projections, the cache update, then the
same `lambda_attention_forward` every other model uses, with the model's own slopes (read once from
the model's own ALiBi function). Their blocks pass the attention modules no keyword argument of ours,
so these models run under `attention.NAME_VIA_MASK`: the plan arrives as the mask each adapter is
given, and goes on to the attention function as its mask. The bias rule itself lives in
`positions.Alibi` and `kernels/score_mod.py`; which model types have an adapter is written in
`families.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import lambda_attention_forward

# ------------------------------------------------------------------------------------------- adapters


def _mpt_slopes(decoder: Any) -> torch.Tensor:
    bias = decoder.build_mpt_alibi_tensor(decoder.num_heads, 2, device="cpu")  # (heads, 1, 2): [-slope, 0]
    return -bias[:, 0, 0].float()


def _bloom_slopes(decoder: Any) -> torch.Tensor:
    mask = torch.ones(1, 2, dtype=torch.long)
    bias = decoder.build_alibi_tensor(mask, decoder.num_heads, torch.float32)  # (heads, 1, 2): [0, slope]
    return bias[:, 0, 1].float()


def _mpt_attention(
    self, hidden_states, position_bias=None, cache=None, attention_mask=None, past_key_values=None, **kwargs
):
    cache = past_key_values if cache is None else cache  # MPT's block passes `past_key_values=` on transformers 5.19
    B, T, _ = hidden_states.shape
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    out, _ = lambda_attention_forward(self, q, k, v, attention_mask, scaling=self.softmax_scale)
    return self.out_proj(out.reshape(B, T, -1)), None


def _bloom_attention(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
    B, T, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = lambda_attention_forward(self, q, k, v, attention_mask, scaling=self.inv_norm_factor)
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


def install(modules: list[nn.Module], adapter: Adapter) -> list:
    """Route each attention module of an ALiBi model to the Λ kernels; returns the handles."""
    return [_Forward(module, adapter.attention) for module in modules]
