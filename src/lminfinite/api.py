"""The public entry points enable(), disable() and is_enabled(): Λ-attention on a model, in place.

`enable(model)` switches a transformers model to Λ-attention in place: it registers the attention
function, tags each attention layer with the shared state, installs the per-forward pre-hook on
the decoder and selects `attn_implementation="lm_infinite"`. `disable(model)` undoes all of it.
"""

from __future__ import annotations

import os
import warnings

from torch import nn
from transformers import PreTrainedModel

from . import alibi, families
from .attention import NAME, register
from .config import LambdaConfig, pretraining_length
from .context import STATE_ATTR, LambdaState, guard_generation, make_pre_hook, post_hook
from .positions import Alibi, install_rope_hooks, layer_rope


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The module that owns the decoder layers (e.g. `LlamaModel` inside `LlamaForCausalLM`)."""
    return getattr(model, "base_model", model)


def _attention_modules(decoder: nn.Module) -> list[nn.Module]:
    return [m for m in decoder.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


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


def _warn_if_beyond_pretraining(config, n_local: int) -> None:
    try:
        trained = pretraining_length(config)
    except ValueError:
        return
    if n_local > trained:
        warnings.warn(
            f"n_local={n_local} exceeds the model's pretraining length {trained}: the window itself then holds "
            "distances the model never saw",
            stacklevel=3,
        )


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
) -> PreTrainedModel:
    """Switch `model` to LM-Infinite's Λ-attention in place and return it.

    n_global: starting tokens every query keeps seeing (default 10).
    n_local: local window (default: the model's pretraining length from its config).
    limit_distance: distance at which the starting tokens are seen (default `n_local`).
    backend: "auto", "torch" (chunked), "naive" (O(n^2) reference) or "flex".
    sink_positions: "zero" (LM-Infinite) or "own" (StreamingLLM-style sinks, a baseline).
    top_k: optional top-k extension (default 0, off): in layers >= `top_k_from_layer` each query also
        attends its `top_k` best-scoring middle tokens, seen at distance D. The cache then keeps every
        token (memory grows with the input) and each query scores every middle token.
    Calling it again reconfigures; training mode is allowed (the kernels are differentiable).
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
    config = LambdaConfig(
        n_global=n_global,
        n_local=n_local,
        limit_distance=limit_distance,
        backend=backend,
        block_size=block_size,
        sink_positions=sink_positions,
        top_k=top_k,
        top_k_from_layer=top_k_from_layer,
    )
    if is_enabled(model):
        disable(model)
    register()
    text_config = model.config.get_text_config(decoder=True)
    if config.top_k and config.top_k_from_layer >= text_config.num_hidden_layers:
        raise ValueError(
            f"top_k_from_layer={config.top_k_from_layer} but the model has {text_config.num_hidden_layers} layers "
            "(numbered from 0): no layer would use top-k, yet the cache would keep every token"
        )
    state = LambdaState(
        config=config,
        num_layers=text_config.num_hidden_layers,
        previous_attn=model.config._attn_implementation,
    )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    state.vocab_size = getattr(embeddings, "num_embeddings", None)
    state.modules = _attention_modules(decoder)
    if not state.modules:
        raise ValueError(f"found no attention layers in {type(model).__name__}")
    state.layer_ropes = {module.layer_idx: layer_rope(rope, module) for module in state.modules}
    for module in state.modules:
        setattr(module, STATE_ATTR, state)
    state.handles.append(decoder.register_forward_pre_hook(make_pre_hook(state, decoder), with_kwargs=True))
    state.handles.append(decoder.register_forward_hook(post_hook, with_kwargs=True))
    state.handles.extend(guard_generation(model))
    if family is not None and family.alibi is not None:
        sinks = config.sink_positions == "own"
        state.alibi = Alibi(family.alibi.slopes(decoder), config.distance, sinks=sinks)
        state.handles.extend(alibi.install(state, model.config, family.alibi))
        model.config._attn_implementation = alibi.ALIBI_NAME  # they refuse set_attn_implementation
    else:
        state.handles.extend(install_rope_hooks(rope))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.set_attn_implementation(NAME)
    setattr(model, STATE_ATTR, state)
    return model


def disable(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the model's own attention (no-op when not enabled) and return it."""
    state: LambdaState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for handle in state.handles:
        handle.remove()
    for module in state.modules:
        if hasattr(module, STATE_ATTR):
            delattr(module, STATE_ATTR)
    if state.alibi is not None:
        model.config._attn_implementation = state.previous_attn
    else:
        model.set_attn_implementation(state.previous_attn)
    delattr(model, STATE_ATTR)
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether `enable()` is in effect on `model`."""
    return getattr(model, STATE_ATTR, None) is not None


def config_of(model: nn.Module) -> LambdaConfig | None:
    """The settings `enable()` put in effect on `model` (a frozen LambdaConfig), None when not enabled."""
    state: LambdaState | None = getattr(model, STATE_ATTR, None)
    return None if state is None else state.config
