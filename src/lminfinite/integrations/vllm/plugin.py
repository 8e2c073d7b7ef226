"""The entry point vLLM calls in each of its processes (`vllm.general_plugins`): `register()`.

It registers, through vLLM's extension points, everything the plugin needs; none of it changes a model that
does not ask for LM-Infinite with `hf_overrides={"lminfinite": {...}}`:

- the attention backend: `LambdaCPUAttentionBackend` in place of CPU_ATTN (`register_backend`);
- the KV-cache spec `LambdaAttentionSpec` with its manager `LambdaManager` (`KVCacheSpecRegistry`);
- `ExactRotaryEmbedding` in place of vLLM's plain `RotaryEmbedding` (`CustomOp.register_oot`);
- the two version-gated private hooks of `vllm_private` (max_model_len, the layers' KV-cache spec).

vLLM may call it several times in one process: each step is done once.
"""

from __future__ import annotations

BACKEND_PATH = "lminfinite.integrations.vllm.backend.LambdaCPUAttentionBackend"


def register() -> None:
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import vllm_private
    from .rope import ExactRotaryEmbedding

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    register_kv_cache_spec()
    if op_registry_oot.get("RotaryEmbedding") is not ExactRotaryEmbedding:
        CustomOp.register_oot(ExactRotaryEmbedding, name="RotaryEmbedding")
    vllm_private.install()


def register_kv_cache_spec() -> None:
    """Register `LambdaAttentionSpec` with its manager `LambdaManager` (vLLM's built-in specs first)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from . import vllm_private
    from .kv_cache import LambdaAttentionSpec, LambdaManager

    vllm_private.ensure_builtin_specs()
    KVCacheSpecRegistry.register(LambdaAttentionSpec, LambdaManager, uniform_type_base_spec=LambdaAttentionSpec)
