"""Per-architecture position handling: how a RoPE model rotates, and how to re-rotate.

LM-Infinite's global branch sees a starting token at distance `D`. For RoPE this is done, as in
the official code, by scoring the query rotated to position `D` against the key at position 0.
Keys and queries reach the attention function already rotated at their positions `p`, so:

- a starting key (rotated at `p_j`) is brought back to position 0: `R(-p_j) k`;
- a query (rotated at `p_i`) is moved to position `D`: `R(D - p_i) q`.

Rotations are pure (cos, sin) rotations: a RoPE variant that scales cos/sin by an attention factor
(YaRN, LongRoPE) has already applied that factor once to q and k, and a rotation keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Rope:
    """How one model applies rotary embeddings to attention heads.

    rotary: the module holding `inv_freq` (read at call time: dynamic variants update it).
    style: "half" (rotate_half, Llama/NeoX) or "interleaved" (pairs 2i, 2i+1; GPT-J).
    rotary_dim: how many leading dimensions of a head rotate (partial rotary rotates fewer).
    """

    rotary: nn.Module
    style: str = "half"
    rotary_dim: int | None = None

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of `positions * inv_freq`, shape (batch, 1, seq, rotary_dim / 2), float32."""
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float32)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        return angles.cos()[:, None], angles.sin()[:, None]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate heads `x` (batch, heads, seq, head_dim) by the angles behind (cos, sin)."""
        half = cos.shape[-1]
        rot = 2 * half
        xr = x[..., :rot].float()
        if self.style == "half":
            x1, x2 = xr[..., :half], xr[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        if rot == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rot:]), dim=-1)


def find_rope(model: nn.Module) -> Rope | None:
    """The model's rotary embedding, or None when it has none."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and isinstance(module.inv_freq, torch.Tensor):
            style = "interleaved" if "gptj" in type(module).__name__.lower() else "half"
            return Rope(rotary=module, style=style)
    return None


def _freeze_dynamic(module: nn.Module, args, kwargs):
    """Keep dynamic-NTK RoPE at its pretraining frequencies: LM-Infinite never uses a distance beyond
    `n_local`, so the frequencies for long inputs would only change what the model sees inside the window."""
    module.max_seq_len_cached = float("inf")
    if hasattr(module, "original_inv_freq"):
        module.inv_freq = module.original_inv_freq.to(module.inv_freq.device)
    return None


def install_rope_hooks(rope: Rope) -> list:
    """Hooks that keep a dynamic RoPE at its original frequencies; returns their handles."""
    rope_type = str(getattr(rope.rotary, "rope_type", "default"))
    if "dynamic" in rope_type:
        return [rope.rotary.register_forward_pre_hook(_freeze_dynamic, with_kwargs=True)]
    return []
