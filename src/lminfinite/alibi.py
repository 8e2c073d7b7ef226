"""ALiBi models (MPT, Bloom): their slopes, and the narrow hook that routes their attention to the Λ kernels.

MPT and Bloom add their ALiBi biases inside their attention modules, outside transformers'
AttentionInterface, from bias tables sized by the context (MPT: `max_seq_len`, so the unmodified
model cannot even run past it). `enable()` replaces only the `forward` of those attention modules
with a few lines per family: the module's own projections, the cache update, then the same
`lambda_attention_forward` every other model uses, with the model's own slopes (read once from the
model's own ALiBi function). The bias rule itself lives in `positions.Alibi`.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ALIBI_STATES, lambda_attention_forward
from .context import CTX_KWARG


def _context(attention_mask) -> dict:
    """The forward's plan, carried by the placeholder mask (see `attention.alibi_mask`)."""
    plan = getattr(attention_mask, CTX_KWARG, None)
    return {} if plan is None else {CTX_KWARG: plan}


def _mpt_slopes(decoder: nn.Module) -> torch.Tensor:
    bias = decoder.build_mpt_alibi_tensor(decoder.num_heads, 2, device="cpu")  # (heads, 1, 2): [-slope, 0]
    return -bias[:, 0, 0].float()


def _bloom_slopes(decoder: nn.Module) -> torch.Tensor:
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
    out, _ = lambda_attention_forward(self, q, k, v, None, scaling=self.softmax_scale, **_context(attention_mask))
    return self.out_proj(out.reshape(B, T, -1)), None


def _bloom_attention(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
    B, T, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = lambda_attention_forward(self, q, k, v, None, scaling=self.inv_norm_factor, **_context(attention_mask))
    out = self.dense(out.reshape(B, T, -1))
    return residual + F.dropout(out, p=self.hidden_dropout, training=self.training), None


# model_type -> (attention adapter, slopes reader)
FAMILIES = {"mpt": (_mpt_attention, _mpt_slopes), "bloom": (_bloom_attention, _bloom_slopes)}


class _Forward:
    """A handle that puts `fn` in place of a module's `forward` until `remove()` (what `disable()` calls)."""

    def __init__(self, module: nn.Module, fn):
        self.module = module
        module.forward = MethodType(fn, module)

    def remove(self) -> None:
        vars(self.module).pop("forward", None)


class _Registered:
    """A handle that lets the ALiBi mask function find `state` from the model's config until `remove()`."""

    def __init__(self, config, state):
        self.key = id(config)
        ALIBI_STATES[self.key] = state

    def remove(self) -> None:
        ALIBI_STATES.pop(self.key, None)


def check(model: nn.Module) -> None:
    """Refuse an ALiBi model whose attention the adapters do not reproduce."""
    config = model.config
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise ValueError(
            "Bloom with slow_but_exact=True and pretraining_tp > 1 is not supported; set slow_but_exact=False"
        )


def slopes(decoder: nn.Module, model_type: str) -> torch.Tensor:
    """The model's ALiBi slopes, one per head (float32, CPU)."""
    return FAMILIES[model_type][1](decoder)


def install(state, config, model_type: str) -> list:
    """Route each attention module of an ALiBi model to the Λ kernels; returns the handles."""
    adapter = FAMILIES[model_type][0]
    return [_Registered(config, state)] + [_Forward(module, adapter) for module in state.modules]
