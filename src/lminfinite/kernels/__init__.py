"""Λ-attention kernels, one file per backend, all with one signature.

    kernel(q, k, v, q_idx, k_idx, qg, kg, vg, g_idx, *, n_global, n_local, scaling, softcap=None,
           block_size=None, alibi=None, middle=None) -> (batch, heads, q_len, head_dim_v)

q: (batch, heads, q_len, d), rotated at the query positions (local branch).
k, v: (batch, kv_heads, k_len, d); key column `k_len - q_len + t` is query `t`'s own key.
q_idx, k_idx: (batch, q_len), (batch, k_len) token indices, -1 for padding.
qg: the queries re-rotated to distance D (global branch); kg, vg: (batch, kv_heads, S, d)
    candidate starting keys brought back to position 0, g_idx their token indices. qg may be None
    when there are no candidates (S == 0) and no middle.
alibi: a `positions.Alibi` (ALiBi models): local keys get the bias of their true distance, far
    keys (starting, top-k middle) the bias of distance D.
middle: a `topk.Middle` (top-k extension): each query also attends its k best middle keys,
    scored with `qg` like a starting key.
Outputs of padding queries are 0. Grouped-query attention: head h reads kv head h // (heads / kv_heads).
"""

from __future__ import annotations

from collections.abc import Callable

from . import naive, torch_chunked

KERNELS: dict[str, Callable] = {"naive": naive.attention, "torch": torch_chunked.attention}


def get_kernel(name: str) -> Callable:
    """The kernel registered as `name` ("naive", "torch", "flex")."""
    if name == "flex" and "flex" not in KERNELS:
        from . import flex

        KERNELS["flex"] = flex.attention
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(KERNELS) + ['flex']}") from None
