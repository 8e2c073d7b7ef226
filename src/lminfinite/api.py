"""The public entry points enable(), disable(), is_enabled() and config_of(): Λ-attention on a model, in place.

`enable(model)` switches a transformers model to Λ-attention in place: it validates the settings
(`LambdaConfig`), builds one frozen `LayerSpec` per attention layer (`plan.build_specs`: its window,
starting tokens, distance D, RoPE or ALiBi, top-k, kernel), installs the per-forward pre-hook on the
decoder that hands every forward's plan (those specs, token indices, positions, the cache's step) to
the layers, and selects `attn_implementation="lm_infinite"`. Every change is an undo handle;
`disable(model)` removes them all.
"""

from __future__ import annotations

import os
import warnings

from torch import nn
from transformers import PreTrainedModel

from . import alibi, compat, families
from .attention import NAME, NAME_VIA_MASK, clear, publish, register
from .config import STATE_ATTR, LambdaConfig, config_of, pretraining_length
from .context import LambdaState, guard_generation, make_pre_hook
from .memory import BlockMemory
from .plan import build_specs
from .positions import Alibi, install_rope_hooks, layer_rope


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The module that owns the decoder layers (e.g. `LlamaModel` inside `LlamaForCausalLM`)."""
    return getattr(model, "base_model", model)


def _attention_modules(decoder: nn.Module) -> list[nn.Module]:
    return [m for m in decoder.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def _model_window(module: nn.Module) -> int | None:
    """The sliding window a layer passes to its attention function (None: full attention), as
    transformers' attention modules set it: their own `sliding_window` (None on full-attention layers,
    or gated by `is_sliding`), else the config's (Mistral-style modules pass `config.sliding_window`)."""
    if hasattr(module, "sliding_window"):
        window = getattr(module, "sliding_window")  # noqa: B009
        return window if getattr(module, "is_sliding", True) else None
    return getattr(getattr(module, "config", None), "sliding_window", None)


def _check_model(model) -> None:
    """enable() takes a transformers model whose layers decode (not a name, a plain module, an encoder-decoder)."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"enable() takes a loaded model, got the name {str(model)!r}: load it first, e.g. "
            "transformers.AutoModelForCausalLM.from_pretrained(name) or lminfinite.load_model(name)"
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"enable() takes a transformers PreTrainedModel (e.g. from AutoModelForCausalLM.from_pretrained), "
            f"got a {type(model).__name__}"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; LM-Infinite applies to decoder-only language models"
        )


def _known_pretraining_length(config) -> int | None:
    """The pretraining length, or None when the config does not tell it."""
    try:
        return pretraining_length(config)
    except ValueError:
        return None


def _warn_if_beyond_pretraining(config, n_local: int) -> None:
    trained = _known_pretraining_length(config)
    if trained is not None and n_local > trained:
        warnings.warn(
            f"n_local={n_local} exceeds the model's pretraining length {trained}: the window itself then holds "
            "distances the model never saw",
            stacklevel=3,
        )


def memory_distance(config, n_local: int) -> int:
    """D with block memory when `limit_distance` is not given: `n_local`, at most half the pretraining length.

    Memory blocks (and the starting tokens) are seen at distance D. At D = the pretraining length the
    model does not read them: SmolLM2-135M (8192 tokens), n_local=8192, passkey at 16k tokens, key at depth
    0.1-0.3 answered 0/3 with D=8192 and right with D=4096 and D=2048 (results/passkey_smollm2/). InfLLM
    likewise sees its memory at a local window of at most half the context. With a window of at most half
    the pretraining length (n_local=512 on SmolLM2) D stays `n_local`, LM-Infinite's own choice.
    """
    trained = _known_pretraining_length(config)
    return n_local if trained is None else max(1, min(n_local, trained // 2))


def enable(
    model: PreTrainedModel,
    n_global: int = 10,
    n_local: int | None = None,
    limit_distance: int | None = None,
    backend: str = "auto",
    block_size: int | None = None,
    sink_positions: str = "zero",
    top_k: int = 0,
    top_k_from_layer: int = 0,
    memory: BlockMemory | None = None,
) -> PreTrainedModel:
    """Switch `model` to LM-Infinite's Λ-attention in place and return it.

    n_global: starting tokens every query keeps seeing (default 10).
    n_local: local window (default: the model's pretraining length from its config).
    limit_distance: distance D at which the starting tokens (and memory blocks) are seen (default `n_local`;
        with `memory`, `n_local` but at most half the pretraining length: see `memory_distance`).
    backend: "auto", "torch" (chunked), "naive" (O(n^2) reference) or "flex".
    sink_positions: "zero" (LM-Infinite) or "own" (StreamingLLM-style sinks, a baseline).
    top_k: optional top-k extension (default 0, off): in layers >= `top_k_from_layer` each query also
        attends its `top_k` best-scoring middle tokens, seen at distance D. The cache then keeps every
        token (memory grows with the input) and each query scores every middle token.
    memory: block memory (`lminfinite.BlockMemory(...)`, default None: off): tokens that leave the window
        are kept in blocks; each query chunk (or decoded token) also attends the few blocks whose
        representative keys score best, seen at distance D. What a forward reads stays bounded (starting
        tokens + window + chosen blocks); the store of blocks grows with the input (see BlockMemory).
    Calling it again reconfigures; training mode is allowed (the kernels are differentiable; attention
    dropout is not applied, so a model training with a non-zero attention dropout is refused).
    """
    _check_model(model)
    decoder = _decoder(model)
    family = families.family_of(model)
    rope = families.rope_of(decoder, family)
    families.check(model, family, _attention_modules(decoder), rope)
    if n_local is None:
        n_local = pretraining_length(model.config)
    else:
        _warn_if_beyond_pretraining(model.config, n_local)
    if memory is not None and limit_distance is None:
        limit_distance = memory_distance(model.config, n_local)
    config = LambdaConfig(
        n_global=n_global,
        n_local=n_local,
        limit_distance=limit_distance,
        backend=backend,
        block_size=block_size,
        sink_positions=sink_positions,
        top_k=top_k,
        top_k_from_layer=top_k_from_layer,
        memory=memory,
    )
    if is_enabled(model):
        disable(model)
    register()
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if config.top_k and config.top_k_from_layer >= num_layers:
        raise ValueError(
            f"top_k_from_layer={config.top_k_from_layer} but the model has {num_layers} layers "
            "(numbered from 0): no layer would use top-k, yet the cache would keep every token"
        )
    if config.memory is not None:
        config.memory.check_layers(num_layers)
    indexed = sorted(((int(getattr(m, "layer_idx")), m) for m in _attention_modules(decoder)), key=lambda t: t[0])  # noqa: B009
    if not indexed:
        raise ValueError(f"found no attention layers in {type(model).__name__}")
    if [i for i, _ in indexed] != list(range(num_layers)):
        raise ValueError(
            f"{type(model).__name__}: expected one attention layer per decoder layer (0 .. {num_layers - 1}), "
            f"found layers {[i for i, _ in indexed]}"
        )
    modules = [m for _, m in indexed]
    adapter = None if family is None else family.alibi
    is_alibi = adapter is not None
    slopes = (
        None if adapter is None else Alibi(adapter.slopes(decoder), config.distance, config.sink_positions == "own")
    )
    layers = build_specs(
        config,
        windows=[None if is_alibi else _model_window(m) for m in modules],
        ropes=[layer_rope(rope, m) for m in modules],
        alibi=slopes,
    )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    state = LambdaState(
        config=config,
        layers=layers,
        previous_attn=model.config._attn_implementation,
        vocab_size=getattr(embeddings, "num_embeddings", None),
    )
    via_mask = families.plan_via_mask(family)
    hook = make_pre_hook(state, decoder, publish if via_mask else None)
    state.handles.append(decoder.register_forward_pre_hook(hook, with_kwargs=True))
    if via_mask:
        state.handles.append(decoder.register_forward_hook(clear, with_kwargs=True))
    state.handles.extend(guard_generation(model))
    state.handles.extend(compat.accept_cache_keyword(model))  # `cache=` on transformers 5.19 too
    name = NAME_VIA_MASK if via_mask else NAME
    if adapter is not None:
        state.handles.extend(alibi.install(modules, adapter))
        model.config._attn_implementation = name  # ALiBi models refuse set_attn_implementation
        state.handles.append(_ConfigAttn(model, state.previous_attn))
    elif family is not None and family.own_attention:  # GPT-J/CodeGen on transformers 5.19 (compat.py)
        state.handles.extend(compat.route_own_attention(modules, name))
        model.config._attn_implementation = name  # they refuse set_attn_implementation too
        state.handles.append(_ConfigAttn(model, state.previous_attn))
    else:
        state.handles.extend(install_rope_hooks(rope))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.set_attn_implementation(name)
        state.handles.append(_SetAttn(model, state.previous_attn))
    setattr(model, STATE_ATTR, state)
    return model


class _SetAttn:
    """Undo handle: restores the model's attention implementation."""

    def __init__(self, model: PreTrainedModel, previous: str):
        self.model, self.previous = model, previous

    def remove(self) -> None:
        self.model.set_attn_implementation(self.previous)


class _ConfigAttn(_SetAttn):
    """Undo handle for ALiBi models, which refuse set_attn_implementation: restores the config's value."""

    def remove(self) -> None:
        self.model.config._attn_implementation = self.previous


def disable(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the model's own attention (no-op when not enabled) and return it."""
    state: LambdaState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for handle in reversed(state.handles):
        handle.remove()
    delattr(model, STATE_ATTR)
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether `enable()` is in effect on `model`."""
    return getattr(model, STATE_ATTR, None) is not None


__all__ = ["enable", "disable", "is_enabled", "config_of"]
