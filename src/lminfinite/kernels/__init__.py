"""Λ-attention kernels: the registry of backends, one file per backend, all with one typed contract.

    kernel(q, k, v, q_idx, k_idx, far=None, *, n_global, n_local, mod, block_size=None)
        -> (batch, heads, q_len, head_dim_v)

q: (batch, heads, q_len, d), rotated at the query positions (local branch).
k, v: (batch, kv_heads, k_len, d); key column `k_len - q_len + t` is query `t`'s own key.
q_idx, k_idx: (batch, q_len), (batch, k_len) token indices, -1 for padding.
far: a `common.Far`, the keys seen at distance D (starting tokens, top-k middle keys) with the
    queries moved to D; None (or empty) when no query sees any.
mod: a `score_mod.ScoreMod` (scaling, softcap, ALiBi): the logit of every key from its dot product and
    the distance it is seen at (true distance for local keys, D for far keys), the same rule in every kernel.
Outputs of padding queries are 0. Grouped-query attention: head h reads kv head h // (heads / kv_heads).

`BACKENDS` is the one list of backend names (`LambdaConfig` validates against it); a backend's
module is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .common import Far
    from .score_mod import ScoreMod

# backend name -> module of this package holding its `attention` function
KERNEL_MODULES = {"naive": "naive", "torch": "torch_chunked", "flex": "flex"}
# What `enable(backend=...)` accepts: "auto" picks one of the kernels (see `resolve_backend`).
BACKENDS = ("auto", *KERNEL_MODULES)


class Kernel(Protocol):
    """The contract above, as a type."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_idx: torch.Tensor,
        k_idx: torch.Tensor,
        far: Far | None = None,
        *,
        n_global: int,
        n_local: int,
        mod: ScoreMod,
        block_size: int | None = None,
    ) -> torch.Tensor: ...


_loaded: dict[str, Kernel] = {}


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """The kernel used for `backend` on `device`. "auto" is the chunked torch kernel on every device
    for now: the flex kernel is tested on CPU only and has not been measured on a GPU yet."""
    return "torch" if backend == "auto" else backend


def get_kernel(name: str) -> Kernel:
    """The kernel of backend `name` ("naive", "torch", "flex"; "auto" resolves first)."""
    name = resolve_backend(name)
    if name not in _loaded:
        if name not in KERNEL_MODULES:
            raise ValueError(f"unknown backend {name!r}; choose from {list(BACKENDS)}")
        _loaded[name] = importlib.import_module(f"{__name__}.{KERNEL_MODULES[name]}").attention
    return _loaded[name]
