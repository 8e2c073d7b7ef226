"""Per-architecture position handling: how a RoPE model rotates, and how to re-rotate.

LM-Infinite's global branch sees a starting token at distance `D`. For RoPE this is done, as in
the official code, by scoring the query rotated to position `D` against the key at position 0.
Keys and queries reach the attention function already rotated at their positions `p`, so:

- a starting key (rotated at `p_j`) is brought back to position 0: `R(-p_j) k`;
- a query (rotated at `p_i`) is moved to position `D`: `R(D - p_i) q`.

Rotations are pure (cos, sin) rotations: a RoPE variant that scales cos/sin by an attention factor
(YaRN, LongRoPE) has already applied that factor once to q and k, and a rotation keeps it.

What differs between families, and where it is handled here:

- pairing of dimensions: "half" (rotate_half: Llama, NeoX, Qwen, Gemma, Phi...) or "interleaved"
  (pairs 2i, 2i+1: GPT-J, CodeGen, Cohere), given to `find_rope` by the family table (`families.py`);
- partial rotary (GPT-NeoX/Pythia, StableLM, Phi, Phi-3 with `partial_rotary_factor`, GPT-J with
  `rotary_dim`): only the leading `2 * len(inv_freq)` dimensions rotate, so the rotated width is
  read from the frequencies and the rest of the head passes through;
- frequencies per layer type (Gemma3: `sliding_attention_inv_freq`, `full_attention_inv_freq`) and
  layers without RoPE (SmolLM3's NoPE layers): `layer_rope` gives each attention layer its own;
- a precomputed sin/cos table sized by the context length (GPT-J, CodeGen): `TableRope`, and a
  hook that grows the table, so the table does not limit the input length;
- the model's own sliding window (Mistral, Qwen2, Gemma2/3, Phi-3, SmolLM3): `layer_window`.

ALiBi (MPT, Bloom) needs no rotation: a key at distance `t` gets the bias `-slope * t`, so `Alibi`
holds the per-head slopes and gives the local branch the bias of the true distance and the global
branch the bias of distance `D`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn


@dataclass
class Rope:
    """How one model (or one layer type) applies rotary embeddings to attention heads.

    rotary: the module holding the frequencies (read at call time: dynamic variants update them).
    style: "half" (rotate_half, Llama/NeoX) or "interleaved" (pairs 2i, 2i+1; GPT-J).
    freq_attr: the attribute of `rotary` holding the inverse frequencies ("inv_freq"; Gemma3 keeps
        one per layer type, e.g. "full_attention_inv_freq").
    Partial rotary needs no setting: the rotated width is `2 * len(inv_freq)`.
    """

    rotary: Any  # a transformers rotary module (duck-typed: its attributes differ per family)
    style: str = "half"
    freq_attr: str = "inv_freq"

    @property
    def inv_freq(self) -> torch.Tensor:
        return getattr(self.rotary, self.freq_attr)

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


@dataclass(frozen=True)
class Alibi:
    """ALiBi: the logit of a key at distance `t` gets `-slope * t` (one slope per head).

    slopes: (heads,) float32, read from the model's own ALiBi function.
    limit_distance: `D`, the distance at which the global branch sees its keys.
    sinks: StreamingLLM-style baseline (`sink_positions="own"`): starting key `j` is seen from query
        `i` at distance `min(D, i) - j`, as with RoPE.
    """

    slopes: torch.Tensor
    limit_distance: int
    sinks: bool = False

    def bias(self, distance: torch.Tensor | int, head_shape: tuple[int, ...]) -> torch.Tensor:
        """`-slope * distance`, with the slopes laid out as `head_shape` followed by two singleton
        (query, key) dimensions, to broadcast against scores whose head dimensions are `head_shape`."""
        slopes = self.slopes.view(*head_shape, 1, 1)
        if isinstance(distance, torch.Tensor):
            slopes = slopes.to(distance.device)
        return -slopes * distance

    def far_distance(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor | int:
        """The distance at which a far key (starting token, top-k middle key) is seen: `D`; with `sinks`,
        `min(D, i) - j` (q_idx, k_idx broadcast like the scores)."""
        if not self.sinks:
            return self.limit_distance
        return q_idx.clamp(max=self.limit_distance) - k_idx

    def to(self, device: torch.device | str) -> Alibi:
        """The same ALiBi with its slopes on `device`."""
        return replace(self, slopes=self.slopes.to(device))


@dataclass
class TableRope(Rope):
    """RoPE read from a precomputed (sin | cos) table `embed_positions` (GPT-J, CodeGen).

    The table has no `inv_freq`; its frequencies are those of transformers'
    `create_sinusoidal_positions(num_pos, pos_embd_dim)`: `10000 ** (-2i / pos_embd_dim)`.
    """

    style: str = "interleaved"

    @property
    def inv_freq(self) -> torch.Tensor:
        dim = self.rotary.pos_embd_dim
        return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))


def _per_type_freq_attr(module: nn.Module) -> str | None:
    """The frequency attribute of a rotary module with one set per layer type (Gemma3), else None.

    The full-attention set comes first: it is the one whose layers get LM-Infinite's global branch."""
    layer_types = getattr(module, "layer_types", None)
    if not isinstance(layer_types, (list, tuple)):
        return None
    names = [f"{t}_inv_freq" for t in sorted(layer_types, key=lambda t: t != "full_attention")]
    present = [n for n in names if isinstance(getattr(module, n, None), torch.Tensor)]
    return present[0] if present else None


def find_rope(model: nn.Module, style: str | None = None) -> Rope | None:
    """The model's rotary embedding, or None when it has none.

    style: how it pairs dimensions, "half" or "interleaved" (from the family table); None takes each
    kind's usual pairing ("half" for `inv_freq` modules, "interleaved" for a sin/cos table)."""
    if style not in (None, "half", "interleaved"):
        raise ValueError(f"style must be 'half' or 'interleaved', got {style!r}")
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return Rope(rotary=module, style=style or "half")
        freq_attr = _per_type_freq_attr(module)
        if freq_attr is not None:
            return Rope(rotary=module, style=style or "half", freq_attr=freq_attr)
        if isinstance(getattr(module, "embed_positions", None), torch.Tensor) and hasattr(module, "pos_embd_dim"):
            return TableRope(rotary=module, style=style or "interleaved")
    return None


def layer_rope(rope: Rope | None, module: nn.Module) -> Rope | None:
    """The rotary embedding attention layer `module` applies: None for a layer without RoPE
    (SmolLM3's `use_rope = 0` layers), its layer type's frequencies where they differ per type
    (Gemma3), else the model's `rope`."""
    if rope is None or not getattr(module, "use_rope", True):
        return None
    layer_type = getattr(module, "layer_type", None)
    if layer_type is not None and rope.freq_attr != "inv_freq":
        freq_attr = f"{layer_type}_inv_freq"
        if isinstance(getattr(rope.rotary, freq_attr, None), torch.Tensor):
            return replace(rope, freq_attr=freq_attr)
    return rope


def layer_window(n_local: int, sliding_window: int | None) -> tuple[int, bool]:
    """(local window, whether the global branch applies) for a layer with the model's own
    `sliding_window` (None: full attention).

    The model's window is honoured: a layer that never sees beyond `W <= n_local` tokens keeps
    exactly its window (keys at distance `< W`) and gets no starting tokens, since the model never
    saw far tokens there (and inputs of length <= n_local stay identical to the model). A window
    wider than `n_local` is cut to the Λ shape like a full-attention layer."""
    if sliding_window is None or sliding_window > n_local:
        return n_local, True
    return int(sliding_window), False


def _freeze_dynamic(module: Any, args, kwargs):
    """Keep dynamic-NTK RoPE at its pretraining frequencies: LM-Infinite never uses a distance beyond
    `n_local`, so the frequencies for long inputs would only change what the model sees inside the window."""
    module.max_seq_len_cached = float("inf")
    if hasattr(module, "original_inv_freq"):
        module.inv_freq = module.original_inv_freq.to(module.inv_freq.device)
    return None


class _Restore:
    """A hook handle that undoes an attribute change on `remove()` (what `disable()` calls)."""

    def __init__(self, module: nn.Module, name: str, value):
        self.module, self.name = module, name
        self.had, self.old = hasattr(module, name), getattr(module, name, None)
        setattr(module, name, value)

    def remove(self) -> None:
        if self.had:
            setattr(self.module, self.name, self.old)
        elif hasattr(self.module, self.name):
            delattr(self.module, self.name)


def _freeze_longrope(module: Any) -> _Restore:
    """Keep LongRoPE (Phi-3) at its short factors, the ones of the pretraining length: transformers switches
    every position to the long factors once a position passes `original_max_position_embeddings`
    (positions beyond it only come from the gap LM-Infinite skips), which would change what the model
    sees inside the window and mix two frequency sets in one cache. The switch runs only for a rotary whose
    `rope_type` is "longrope" (transformers 5.24 reads the long set from `long_inv_freq`, 5.19 recomputes
    it, so only this holds in both): the rotary is marked "default" until `remove()`, with its short
    frequencies back in place (what it does itself for a short input); its attention factor stays."""
    with torch.no_grad():
        module.inv_freq.copy_(module.original_inv_freq)
    return _Restore(module, "rope_type", "default")


def _grow_table(module: Any, args, kwargs):
    """Extend a (sin | cos) table (GPT-J, CodeGen) to the largest position of this forward, with the
    model's own `create_sinusoidal_positions`: the rows it had stay bit-identical."""
    position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
    needed = int(position_ids.max()) + 1
    table = module.embed_positions
    if needed <= table.shape[0]:
        return None
    make = sys.modules[type(module).__module__].create_sinusoidal_positions
    size = max(needed, 2 * table.shape[0])
    module.embed_positions = make(size, module.pos_embd_dim).to(device=table.device, dtype=table.dtype)
    module.max_positions = size
    return None


def grow_table_on_demand(module: nn.Module):
    """A forward pre-hook on a module holding a (sin | cos) table `embed_positions` (GPT-J, CodeGen: the rotary
    module on transformers 5.24, each attention module on 5.19) that grows the table to the forward's largest
    position; returns its handle."""
    return module.register_forward_pre_hook(_grow_table, with_kwargs=True)


def install_rope_hooks(rope: Rope | None) -> list:
    """Hooks that keep the rotary embedding usable at any length with fixed frequencies; returns
    their handles (each with `remove()`)."""
    if rope is None:
        return []
    if isinstance(rope, TableRope):
        return [grow_table_on_demand(rope.rotary)]
    rope_type = str(getattr(rope.rotary, "rope_type", "default"))
    if "dynamic" in rope_type:
        return [rope.rotary.register_forward_pre_hook(_freeze_dynamic, with_kwargs=True)]
    if rope_type == "longrope" and hasattr(rope.rotary, "original_inv_freq"):
        return [_freeze_longrope(rope.rotary)]
    return []
