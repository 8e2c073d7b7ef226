"""The attention backend: vLLM's CPU_ATTN, with Λ-attention for the layers of a model that asks for it.

The plugin registers `LambdaCPUAttentionBackend` in place of CPU_ATTN (the backend the CPU platform gives
every non-MLA model). It keeps CPU_ATTN's name, metadata builder and KV-cache layout; its implementation
reads the model's `lminfinite` settings from the vLLM config current while the model is built:

- without them the layer is CPU_ATTN's own (`CPUAttentionBackendImpl.forward`), untouched;
- with them, a batch whose every sequence is at most `L` tokens long also runs CPU_ATTN's kernel (every key
  is then in the window: the model's own attention), and any other batch runs `lambda_attention` per
  request: prefill (chunked or not), decode and mixed batches alike.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
)

from .lambda_attention import PagedKV, lambda_attention
from .rope import inv_freq64
from .settings import LambdaSettings, settings_of


def _rope_of(hf_text_config, head_size: int) -> torch.Tensor:
    """float64 inverse frequencies of the model's plain RoPE; refuses RoPE variants the plugin does not handle."""
    params = dict(getattr(hf_text_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" or "mrope_section" in params:
        raise NotImplementedError(
            f"lminfinite's vLLM plugin supports plain RoPE (rope_type 'default'); this model uses {rope_type!r}"
        )
    base = params.get("rope_theta", getattr(hf_text_config, "rope_theta", 10000.0))
    rotary_dim = int(params.get("rope_dim") or head_size * params.get("partial_rotary_factor", 1.0))
    return inv_freq64(rotary_dim, base)


class LambdaCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's implementation, with Λ-attention where the model's config carries `lminfinite` settings."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes, sliding_window,
                 kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:  # fmt: skip
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)  # fmt: skip
        model_config = get_current_vllm_config().model_config
        settings = None if model_config is None else settings_of(model_config.hf_config)
        if attn_type != AttentionType.DECODER:
            settings = None
        self.settings: LambdaSettings | None = settings
        if settings is None:
            return
        refused = {
            "ALiBi": alibi_slopes is not None,
            "the model's own sliding window": sliding_window is not None,
            "attention sinks": sinks is not None,
            "logits soft-capping": bool(logits_soft_cap),
            f"a quantized KV cache ({kv_cache_dtype})": kv_cache_dtype != "auto",
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
        }
        for what, present in refused.items():
            if present:
                raise NotImplementedError(f"lminfinite's vLLM plugin does not support {what} yet")
        self.inv_freq = _rope_of(model_config.hf_text_config, head_size)
        self.layout_checked = False

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:  # fmt: skip
        settings = self.settings
        if settings is None or attn_metadata is None or attn_metadata.max_seq_len <= settings.n_local:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with lminfinite")
        return self._lambda_forward(layer, query, key, kv_cache, attn_metadata, output)

    def _lambda_forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        kv_cache: torch.Tensor,
        md: CPUAttentionMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        isa = getattr(layer, "isa", None)
        if isa != "vec":
            raise NotImplementedError(
                f"lminfinite's vLLM plugin reads CPU_ATTN's KV layout of the 'vec' kernels (float32/bfloat16 without "
                f"AMX, head size a multiple of 32); this layer uses {isa!r}"
            )
        cache = PagedKV.of(kv_cache)
        starts = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        if not self.layout_checked:
            cache.check(key, md, starts, seq_lens)
            self.layout_checked = True
        out = output[: md.num_actual_tokens].view(md.num_actual_tokens, self.num_heads, -1)
        q_all = query[: md.num_actual_tokens].view(md.num_actual_tokens, self.num_heads, -1)
        for r, seq_len in enumerate(seq_lens):
            a, b = starts[r], starts[r + 1]
            if b <= a:
                continue
            out[a:b] = lambda_attention(
                q_all[a:b],
                seq_len - (b - a),
                cache,
                md.block_table[r],
                self.settings,
                self.scale,
                self.inv_freq,
            )
        return output


class LambdaCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN (same name, builder and layout) whose implementation applies the Λ rule where asked."""

    @staticmethod
    def get_impl_cls() -> type[LambdaCPUAttentionImpl]:
        return LambdaCPUAttentionImpl
