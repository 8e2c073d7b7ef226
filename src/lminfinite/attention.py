"""The Λ-attention function, registered with transformers as "lm_infinite".

`lambda_attention_forward` has the signature of transformers' attention functions (see
`integrations/sdpa_attention.py`): it receives the layer's rotated queries and its keys/values
(cache included) and returns (batch, q_len, heads, head_dim). It reads the forward's plan built by
the pre-hook (`context.py`, `plan.py`), assembles the far keys as one `kernels.common.Far` (queries
moved to distance D, starting keys back to position 0, the top-k middle) and calls the kernel of the
configured backend (`kernels/`). ALiBi models reach it through their adapters (`alibi.py`).

The mask function registered for "lm_infinite" returns None: the Λ structure is derived from
token indices inside the kernels, in O(n), and no (q_len, k_len) mask is ever built here.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .config import LambdaConfig
from .context import CTX_KWARG, STATE_ATTR, LambdaState
from .kernels import get_kernel
from .kernels.common import Far, Middle
from .plan import ForwardPlan
from .positions import Alibi, Rope, layer_window

NAME = "lm_infinite"


def far_keys(
    plan: ForwardPlan,
    cfg: LambdaConfig,
    layer_idx: int,
    rope: Rope | None,
    alibi: Alibi | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> Far | None:
    """The keys this layer's queries see at distance D (None: none in this forward).

    RoPE: the queries are moved to position D and the starting keys back to position 0 (middle keys
    a LambdaCache keeps are stored at position 0 already); with `sink_positions="own"` a query sits at
    min(D, its index) and the starting keys keep their positions. ALiBi: nothing moves, `alibi` gives
    their biases."""
    S = plan.n_candidates
    M = plan.n_middle if cfg.uses_top_k(layer_idx) else 0
    if S == 0 and M == 0:
        return None
    device = query.device
    qg, kg, km = query, key[:, :, :S], key[:, :, :M]
    if rope is not None:
        sinks = cfg.sink_positions == "own"
        qg = rope.rotate(query, *plan.query_rotation(rope, cfg.distance, device, sinks))
        if not sinks:  # far keys back to position 0; cached middle keys are there already
            kg = rope.rotate(kg, *plan.key_rotation(rope, 0, S, device))
            z = plan.middle_at_zero(M, cfg.n_global)
            if z < M:
                moved = rope.rotate(key[:, :, z:M], *plan.key_rotation(rope, z, M, device))
                km = torch.cat([key[:, :, :z], moved], dim=2)
    k_idx = plan.k_idx.to(device)
    middle = Middle(km, value[:, :, :M], k_idx[:, :M], cfg.top_k) if M > 0 else None
    return Far(qg, kg, value[:, :, :S], k_idx[:, :S], middle=middle, alibi=alibi)


def lambda_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    state: LambdaState | None = getattr(module, STATE_ATTR, None)
    plan = None if state is None else kwargs.get(CTX_KWARG) or state.plan
    if state is None or plan is None:
        raise RuntimeError(
            "lm_infinite attention was called outside a forward of a model enabled with lminfinite.enable(); "
            "set attn_implementation through enable(), not by hand"
        )
    cfg = state.config
    if plan.k_idx.shape[1] != key.shape[2]:
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')} got {key.shape[2]} keys but the context describes "
            f"{plan.k_idx.shape[1]}: the cache in use is not a LambdaCache"
        )
    device = query.device
    q_idx, k_idx = plan.q_idx.to(device), plan.k_idx.to(device)
    # Per layer: its own RoPE (None: ALiBi or a layer without RoPE) and its own sliding window.
    layer_idx: int = getattr(module, "layer_idx")  # noqa: B009 (set by every transformers attention module)
    rope = plan.layer_ropes[layer_idx]
    alibi = state.alibi_on(device)
    n_local, has_global = layer_window(cfg.n_local, kwargs.get("sliding_window"))
    far = far_keys(plan, cfg, layer_idx, rope, alibi, query, key, value) if has_global else None
    out = get_kernel(cfg.backend)(
        query,
        key,
        value,
        q_idx,
        k_idx,
        far,
        n_global=cfg.n_global,
        n_local=n_local,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        softcap=kwargs.get("softcap"),
        block_size=cfg.block_size,
        alibi=alibi,
    )
    return out.transpose(1, 2).contiguous(), None


def lambda_mask(*args, **kwargs) -> None:
    """Mask function for "lm_infinite": nothing to build (the kernels apply the Λ rule in O(n))."""
    return None


def register() -> None:
    """Register "lm_infinite" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, lambda_attention_forward)
    AttentionMaskInterface.register(NAME, lambda_mask)


register()
