"""The truncate baseline's scores: each token sees only the latest `n_local` tokens, at fresh positions.

`truncate_nll` is how the `truncate` method (eval.methods) scores a window, by strided sliding windows;
`eval.perplexity` re-exports it.
"""

from __future__ import annotations

import torch
from torch import nn


def truncate_nll(model: nn.Module, ids: torch.Tensor, n_local: int, stride: int | None = None) -> torch.Tensor:
    """NLL (n - 1,) of a 1D `ids` when each token sees only recent tokens, at fresh positions.

    Strided sliding-window evaluation: windows of `L = n_local` tokens start at 0, S, 2S, ...
    (S = `stride`, default L // 2; the last window ends at the last query). The first window
    scores all its queries (positions 0..L-1, exactly the vanilla model); each later window scores
    only its queries past the previous window's end. So position i < L sees tokens 0..i, and each
    position i >= L sees between L - S + 1 and L of the latest tokens (itself included), at
    positions 0..L-1 of its window. `stride=1` is the exact "last L tokens" baseline (n forwards).
    """
    n = ids.numel() - 1  # queries 0..n-1 predict ids[1..n]
    L = n_local
    device = next(model.parameters()).device
    ids = ids.to(device)
    out = torch.empty(n)
    with torch.no_grad():
        out[: min(n, L)] = _window_nll(model, ids[None, : min(n, L)], ids[None, 1 : min(n, L) + 1])[0]
        if n <= L:
            return out
        S = max(1, stride or L // 2)
        starts = list(range(S, n - L, S)) + [n - L]
        per_batch = max(1, 16384 // L)
        done = L
        for b in range(0, len(starts), per_batch):
            group = starts[b : b + per_batch]
            inputs = torch.stack([ids[s : s + L] for s in group])
            targets = torch.stack([ids[s + L - S + 1 : s + L + 1] for s in group])
            nll = _window_nll(model, inputs, targets, keep=S)
            for s, row in zip(group, nll, strict=True):
                new = s + L - done  # queries past the previous window's end
                out[done : s + L] = row[S - new :]
                done = s + L
    return out


def _window_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """NLL of `targets` from the last `targets.shape[1]` logits of a plain forward of `inputs`."""
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits[:, -targets.shape[1] :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1).cpu()
