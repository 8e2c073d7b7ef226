"""The Λ-attention function, registered with transformers as "lm_infinite".

`lambda_attention_forward` has the signature of transformers' attention functions (see
`integrations/sdpa_attention.py`): it receives the layer's rotated queries and its keys/values
(cache included) and returns (batch, q_len, heads, head_dim). Everything it needs arrives as
arguments: the forward's `ForwardPlan` (keyword `PLAN_KWARG`, built by the pre-hook in `context.py`)
holds this layer's `LayerSpec` (window, starting tokens, distance D, RoPE or ALiBi, top-k, kernel);
transformers passes the scaling, the softcap and the model's own sliding window. It assembles the
far keys as one `kernels.common.Far` (queries moved to distance D, starting keys back to position 0,
the top-k middle, the memory blocks chosen for each query chunk), the logit rule as one `ScoreMod`,
and calls the layer's kernel.
ALiBi models reach it through their adapters (`alibi.py`).

The mask function registered for "lm_infinite" returns None: the Λ structure is derived from
token indices inside the kernels, in O(n), and no (q_len, k_len) mask is ever built here.

How the plan reaches this function: as the keyword argument `PLAN_KWARG`, which transformers passes
from the decoder's forward down to each attention call. Some families drop those keyword arguments on
the way (StableLM's decoder layers, MPT's and Bloom's blocks; the family table says which, and a model
type not in the table is treated so): they run under `NAME_VIA_MASK`, the documented exception. Their
decoder hands each layer only the mask it built with the mask function registered under the model's
attention implementation; so the pre-hook publishes the forward's plan in `_CURRENT` (a ContextVar:
each thread and task has its own; the post-hook clears it), the mask function `plan_mask` wraps it in a
typed `PlanMask`, and this function reads the plan from the mask it is given. A layer re-run later by
gradient checkpointing gets the same mask, so it sees its own forward's plan.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .kernels.common import Far, Memory, Middle
from .kernels.score_mod import ScoreMod
from .memory import BlockStore, choose
from .plan import PLAN_KWARG, ForwardPlan, LayerSpec

NAME = "lm_infinite"  # the plan arrives as a keyword argument
NAME_VIA_MASK = "lm_infinite_via_mask"  # the plan arrives as the attention mask (see the module docstring)

_CURRENT: ContextVar[ForwardPlan | None] = ContextVar("lminfinite_plan", default=None)


@dataclass(frozen=True)
class PlanMask:
    """What the mask function of `NAME_VIA_MASK` returns in place of a (q_len, k_len) mask: the forward's
    plan. `to()` returns it unchanged (MPT's decoder calls `.to(torch.bool)` on its mask)."""

    plan: ForwardPlan

    def to(self, *args, **kwargs) -> PlanMask:
        return self


def publish(plan: ForwardPlan) -> None:
    """The decoder pre-hook's hand-over of a forward's plan to `plan_mask` (see the module docstring)."""
    _CURRENT.set(plan)


def clear(module, args, kwargs, output) -> None:
    """The decoder's post-hook under `NAME_VIA_MASK`: the forward is done, its plan is no longer current."""
    _CURRENT.set(None)


def plan_mask(*args, **kwargs) -> PlanMask:
    """Mask function for `NAME_VIA_MASK`: the current forward's plan, as a `PlanMask`."""
    plan = _CURRENT.get()
    if plan is None:
        raise RuntimeError("an lminfinite attention mask was built outside a forward of an enabled model")
    return PlanMask(plan)


def far_keys(
    plan: ForwardPlan, spec: LayerSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> Far | None:
    """The keys this layer's queries see at distance D (None: none in this forward).

    RoPE: the queries are moved to position D and the starting keys back to position 0 (middle keys
    a LambdaCache keeps are stored at position 0 already); with `spec.sinks` a query sits at
    min(D, its index) and the starting keys keep their positions. ALiBi: nothing moves (the
    `ScoreMod` gives their biases)."""
    S = plan.n_candidates
    M = plan.n_middle if spec.top_k else 0
    with_memory = spec.memory is not None and plan.q_idx.numel() > 0 and int(plan.q_idx.max()) >= spec.n_local
    if S == 0 and M == 0 and not with_memory:
        return None
    device = query.device
    qg, kg, km = query, key[:, :, :S], key[:, :, :M]
    rope = spec.rope
    if rope is not None:
        qg = rope.rotate(query, *plan.query_rotation(spec, device))
        if not spec.sinks:  # far keys back to position 0; cached middle keys are there already
            kg = rope.rotate(kg, *plan.key_rotation(spec, 0, S, device))
            z = plan.middle_at_zero(M, spec.n_global)
            if z < M:
                moved = rope.rotate(key[:, :, z:M], *plan.key_rotation(spec, z, M, device))
                km = torch.cat([key[:, :, :z], moved], dim=2)
    k_idx = plan.k_idx.to(device)
    middle = Middle(km, value[:, :, :M], k_idx[:, :M], spec.top_k) if M > 0 else None
    memory = memory_blocks(plan, spec, qg, key, value) if with_memory else None
    if S == 0 and middle is None and memory is None:
        return None
    return Far(qg, kg, value[:, :, :S], k_idx[:, :S], middle=middle, memory=memory)


def memory_blocks(
    plan: ForwardPlan, spec: LayerSpec, qg: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> Memory | None:
    """The memory blocks each query chunk of this layer attends (None: nothing stored yet), chosen from the
    representatives with the queries `qg` at distance D. With a cache, the layer's store (filled by the cache
    layer); without one, the blocks of this forward's own keys, in a store that lives for this forward."""
    assert spec.memory is not None
    store = None if plan.stores is None else plan.stores[spec.layer_idx]
    if store is None:
        store = BlockStore(spec.memory, spec.n_global)
        due = store.due(plan.q_idx, spec.n_local)
        store.ingest(key, value, plan.k_idx, due, None if spec.sinks else spec.rope, plan.k_pos)
    if store.first is None:
        return None
    choice = choose(store, qg, plan.q_idx.to(store.first.device), spec.n_local)
    return store.memory_of(choice.chosen, choice.chunk, qg.device)


def _check_call(module: torch.nn.Module, spec: LayerSpec, plan: ForwardPlan, key: torch.Tensor, kwargs) -> None:
    if plan.k_idx.shape[1] != key.shape[2]:
        raise RuntimeError(
            f"layer {spec.layer_idx} got {key.shape[2]} keys but the plan describes {plan.k_idx.shape[1]}: "
            "the cache in use is not a LambdaCache"
        )
    window = kwargs.get("sliding_window")
    if "sliding_window" in kwargs and window != spec.model_window:
        raise RuntimeError(
            f"layer {spec.layer_idx} of {type(module).__name__} attends a sliding window of {window} tokens, "
            f"enable() read {spec.model_window}: this model's layers are not read right (please report it)"
        )


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
    """transformers' attention interface: (batch, heads, q_len, d) queries, (batch, kv_heads, k_len, d)
    keys and values -> ((batch, q_len, heads, d_v), None), under the plan in `kwargs[PLAN_KWARG]`."""
    plan = kwargs.get(PLAN_KWARG)
    if plan is None and isinstance(attention_mask, PlanMask):
        plan = attention_mask.plan
    if not isinstance(plan, ForwardPlan):
        raise RuntimeError(
            "lm_infinite attention was called without the plan of a forward of a model enabled with "
            "lminfinite.enable() (set attn_implementation through enable(), not by hand; a model whose layers "
            "do not pass keyword arguments to their attention function is not supported)"
        )
    layer_idx: int = getattr(module, "layer_idx")  # noqa: B009 (transformers' own index of the layer)
    spec = plan.layers[layer_idx]
    _check_call(module, spec, plan, key, kwargs)
    if dropout:
        raise ValueError(
            f"lminfinite's attention does not apply attention dropout (layer {spec.layer_idx} asks for "
            f"p={dropout} in training mode): set the model config's attention dropout to 0 to train with "
            "Λ-attention (e.g. model.config.attention_dropout = 0.0), or use model.eval()"
        )
    device = query.device
    mod = ScoreMod(query.shape[-1] ** -0.5 if scaling is None else scaling, kwargs.get("softcap"), spec.alibi)
    far = far_keys(plan, spec, query, key, value) if spec.has_global else None
    out = spec.kernel(
        query,
        key,
        value,
        plan.q_idx.to(device),
        plan.k_idx.to(device),
        far,
        n_global=spec.n_global,
        n_local=spec.n_local,
        mod=mod.to(device),
        block_size=spec.block_size,
    )
    return out.transpose(1, 2).contiguous(), None


def lambda_mask(*args, **kwargs) -> None:
    """Mask function for "lm_infinite": nothing to build (the kernels apply the Λ rule in O(n))."""
    return None


def register() -> None:
    """Register `NAME` and `NAME_VIA_MASK` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, lambda_attention_forward)
    AttentionMaskInterface.register(NAME, lambda_mask)
    AttentionInterface.register(NAME_VIA_MASK, lambda_attention_forward)
    AttentionMaskInterface.register(NAME_VIA_MASK, plan_mask)


register()
