"""RoPE for the plugin: exact angles at any position, and the re-rotation of LM-Infinite's global branch.

vLLM rotates queries and keys with a float32 cos/sin table sized by `max_position_embeddings`; past it the
positions would index outside the table, and a float32 angle `p * inv_freq` loses precision as `p` grows
(its spacing is 0.06 at p = 1e6). For a model with the `lminfinite` override the plugin replaces vLLM's
plain `RotaryEmbedding` (an out-of-tree custom op, vLLM's public mechanism) by `ExactRotaryEmbedding`,
which computes the angles of the positions of each batch in float64 and casts cos/sin to the model's
dtype. Positions stay the true token positions (keys are stored at their own position, so distances in
the window are exact at any length); no table grows with the context. The attention backend rotates with
the same float64 frequencies: a starting key back to position 0 and a query to position `D`.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from .settings import settings_of


def inv_freq64(rotary_dim: int, base: float) -> torch.Tensor:
    """RoPE's inverse frequencies in float64, shape (rotary_dim // 2,)."""
    return 1.0 / (float(base) ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `positions * inv_freq` computed in float64 (any integer position, negative included),
    cast to `dtype`: each of shape (len(positions), rotary_dim // 2)."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads `x` (tokens, heads, head_size) by the angles behind (cos, sin) (tokens, rotary_dim // 2),
    NeoX pairing (the first half of the rotated dimensions with the second); the rest passes through."""
    half = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half :]), dim=-1)


class ExactRotaryEmbedding(RotaryEmbedding):
    """vLLM's `RotaryEmbedding` with float64 angles computed per batch for a model with the `lminfinite`
    override; any other model gets vLLM's own behaviour, unchanged (the override is read from the vLLM
    config current while the model is built)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config_or_none()
        model_config = None if vllm_config is None else vllm_config.model_config
        self.exact = model_config is not None and settings_of(model_config.hf_config) is not None
        if self.exact and not self.is_neox_style:
            raise NotImplementedError(
                "lminfinite's vLLM plugin supports NeoX-style RoPE (Llama, Qwen, Mistral, ...); this model pairs "
                "dimensions GPT-J style"
            )
        self.exact_inv_freq = inv_freq64(self.rotary_dim, self.base)

    def _exact(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None):
        positions = positions.flatten()
        cos, sin = cos_sin(positions, self.exact_inv_freq, query.dtype)
        table = torch.cat((cos, sin), dim=-1)
        index = torch.arange(positions.shape[0], device=positions.device)
        return RotaryEmbedding.forward_static(
            index, query, key, self.head_size, self.rotary_dim, table, self.is_neox_style
        )

    def forward_native(self, positions, query, key=None):
        if not self.exact:
            return super().forward_native(positions, query, key)
        return self._exact(positions, query, key)

    def forward_cpu(self, positions, query, key=None):
        if not self.exact:
            return super().forward_cpu(positions, query, key)
        return self._exact(positions, query, key)

    def forward_cuda(self, positions, query, key=None):
        if not self.exact:
            return super().forward_cuda(positions, query, key)
        return self._exact(positions, query, key)
