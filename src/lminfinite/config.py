"""LambdaConfig: the method's three numbers (G, L, D), the backend, and their defaults.

Defaults come from the model config: `n_local` is the pretraining length
(`original_max_position_embeddings` where RoPE scaling declares one, else
`max_position_embeddings`), `n_global` is 10 and `limit_distance` is `n_local`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from .kernels import BACKENDS
from .memory import BlockMemory

# The attribute of an enabled model holding what enable() attached (`context.LambdaState`: its config, its
# layer specs, the handles disable() removes). Only the library reads it; tools use `config_of`.
STATE_ATTR = "_lminfinite"


@dataclass(frozen=True)
class LambdaConfig:
    """Settings of LM-Infinite's Λ-attention.

    n_global: the first `G` tokens of each sequence stay visible to every query.
    n_local: the local window `L`; a query sees keys at distance `< L` with their true distance.
    limit_distance: the distance `D` at which the starting tokens are seen once outside the window.
    backend: "auto", "naive" (O(n^2) reference), "torch" (chunked, CPU/GPU) or "flex" (FlexAttention).
    block_size: queries per block in the chunked kernel (None: chosen from `n_local`).
    sink_positions: "zero" (LM-Infinite: every starting key at position 0, so at distance D) or
        "own" (StreamingLLM-style attention sinks: starting key j keeps position j and a query sits at
        min(D, its index), so the distance is min(D, i) - j).
    top_k: the optional top-k extension (0: off): in layers >= `top_k_from_layer`, each query also
        attends the `top_k` middle keys with the highest logits, scored and seen at distance D. The
        cache then keeps the middle, so memory grows with the stream.
    top_k_from_layer: the first layer that uses top-k.
    memory: block memory (`memory.BlockMemory`; None: off): the middle is kept in blocks, and each query
        chunk also attends the few blocks whose representatives score best, seen at distance D.
    """

    n_global: int = 10
    n_local: int = 4096
    limit_distance: int | None = None
    backend: str = "auto"
    block_size: int | None = None
    sink_positions: str = "zero"
    top_k: int = 0
    top_k_from_layer: int = 0
    memory: BlockMemory | None = None

    def __post_init__(self) -> None:
        optional = ("limit_distance",) if self.limit_distance is not None else ()
        for name in ("n_global", "n_local", "top_k", "top_k_from_layer") + optional:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.n_global < 0:
            raise ValueError(f"n_global must be >= 0, got {self.n_global}")
        if self.n_local < 1:
            raise ValueError(f"n_local must be >= 1, got {self.n_local}")
        if self.limit_distance is None:
            object.__setattr__(self, "limit_distance", self.n_local)
        if self.distance < 0:
            raise ValueError(f"limit_distance must be >= 0, got {self.limit_distance}")
        if self.distance > self.n_local:
            warnings.warn(
                f"limit_distance={self.limit_distance} > n_local={self.n_local}: the starting tokens are seen at a "
                "distance the local window never uses; if that distance exceeds the pretraining length the model "
                "meets unseen positions again",
                stacklevel=3,
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.sink_positions not in ("zero", "own"):
            raise ValueError(f"sink_positions must be 'zero' or 'own', got {self.sink_positions!r}")
        if self.top_k < 0 or self.top_k_from_layer < 0:
            raise ValueError(f"top_k and top_k_from_layer must be >= 0, got {self.top_k}, {self.top_k_from_layer}")
        if self.top_k and self.sink_positions != "zero":
            raise ValueError("top_k needs sink_positions='zero' (middle keys are seen at distance D)")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.memory is not None:
            if not isinstance(self.memory, BlockMemory):
                raise TypeError(f"memory must be a lminfinite.BlockMemory, got {type(self.memory).__name__}")
            if self.top_k:
                raise ValueError("memory and top_k both choose middle keys: use one of them")
            if self.sink_positions != "zero":
                raise ValueError("memory needs sink_positions='zero' (memory keys are seen at distance D)")
            self.memory.check_window(self.n_local)

    @property
    def distance(self) -> int:
        """D, the distance at which the starting tokens are seen (`limit_distance`, which defaults to `n_local`)."""
        return self.n_local if self.limit_distance is None else self.limit_distance

    def uses_top_k(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends top-k middle keys."""
        return self.top_k > 0 and layer_idx >= self.top_k_from_layer

    def uses_memory(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` keeps block memory (if it sees far keys at all: see `plan.build_specs`)."""
        return self.memory is not None and self.memory.applies_to(layer_idx)


def config_of(model: nn.Module) -> LambdaConfig | None:
    """The settings `enable()` put in effect on `model` (a frozen LambdaConfig), None when not enabled."""
    state = getattr(model, STATE_ATTR, None)
    return None if state is None else state.config


def pretraining_length(config) -> int:
    """The model's pretraining context length, read from a transformers config.

    A declared `original_max_position_embeddings` (RoPE scaling: llama3, yarn, Phi-3's longrope) wins
    over the extended `max_position_embeddings`, but never exceeds it: Phi-3 configs carry an
    `original_max_position_embeddings` of 4096 even when no scaling is used and the context is shorter."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rope = getattr(text_config, "rope_parameters", None) or {}
    originals = [getattr(text_config, "original_max_position_embeddings", None)]
    if isinstance(rope, dict):
        # Per-layer-type parameters (Gemma3 style) nest one dict per layer type.
        candidates = [rope] + [v for v in rope.values() if isinstance(v, dict)]
        originals = [params.get("original_max_position_embeddings") for params in candidates] + originals
    original = next((int(v) for v in originals if isinstance(v, int) and v > 0), None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value if original is None else min(original, value)
    if original is not None:
        return original
    raise ValueError("cannot tell the model's pretraining length from its config; pass n_local explicitly to enable()")
