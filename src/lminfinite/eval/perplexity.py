"""Per-position NLL of long windows for each method, averaged in buckets of position (paper, Fig. 1).

Position convention: position `i` is the query that predicts token `i + 1` from tokens `0..i`, so
bucket `[0, L)` holds the predictions made with at most `L` tokens in view, the pretraining regime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..streaming import NonFiniteError
from .errors import BadValue
from .methods import Method, get
from .progress import progress_bar
from .truncate import truncate_nll

__all__ = [
    "bucket_edges",
    "check_buckets",
    "truncate_nll",
    "position_nll",
    "check_nll",
    "bucketize",
    "merge",
    "evaluate",
]

BucketSpec = str | int | Sequence[int]


def bucket_edges(spec: BucketSpec, n_positions: int) -> list[int]:
    """Bucket edges covering positions `0..n_positions-1`.

    "pow2" -> [0, 1, 2, 4, 8, ...]; an int w -> [0, w, 2w, ...]; a list -> those edges, as given.
    """
    if spec == "pow2":
        edges = [0, 1]
        while edges[-1] < n_positions:
            edges.append(edges[-1] * 2)
        return edges
    if isinstance(spec, int):
        if spec < 1:
            raise BadValue(f"bucket width must be >= 1, got {spec}")
        return list(range(0, n_positions + spec, spec))
    edges = [int(e) for e in spec]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or edges[0] < 0:
        raise BadValue(f"bucket edges must be >= 0 and strictly increasing, got {edges}")
    return edges


def check_buckets(spec: BucketSpec, n_positions: int) -> list[int]:
    """The bucket edges for `n_positions` positions (0..n_positions-1); BadValue when a bucket holds no position
    (it would be missing from the table and the plot without a word)."""
    edges = bucket_edges(spec, n_positions)
    empty = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if a >= n_positions]
    if empty:
        a, b = empty[0]
        none = " (no bucket selects any)" if len(empty) == len(edges) - 1 else ""
        raise BadValue(
            f"bucket [{a}, {b}) selects no token{none}: windows of {n_positions + 1} tokens have positions "
            f"0..{n_positions - 1}; lower the bucket edges or raise --max-length"
        )
    return edges


def position_nll(
    model: nn.Module, window: torch.Tensor, method: str | Method, n_global: int, n_local: int, chunk_size: int = 4096
) -> torch.Tensor:
    """NLL (n - 1,) of one 1D window of ids under `method` (switches the model for this one call)."""
    method = get(method)
    with method.applied(model, n_global, n_local):
        return method.score(model, window, n_local, chunk_size)


def check_nll(nll: torch.Tensor, method: str | Method, window: int = 0) -> None:
    """NonFiniteError naming the method, the window and the first position whose NLL is NaN or infinite."""
    bad = (~torch.isfinite(nll)).nonzero()
    if bad.numel():
        position = int(bad[0, -1])
        raise NonFiniteError(
            f"{method}: the NLL is not finite (NaN or inf) at position {position} of window {window} "
            f"({bad.shape[0]} of {nll.numel()} positions); the model's logits cannot be used (check the "
            "weights and the dtype: float16 overflows in some models)",
            position,
            str(method),
        )


def bucketize(method: str, nll: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    """Rows of mean NLL per bucket `[edges[k], edges[k+1])` of position, over all windows (rows of `nll`).

    A bucket that the windows' end cuts counts the positions up to that end and is labelled with it: with
    positions 0..1498, the bucket [1024, 2048) is the row [1024, 1499)."""
    rows = []
    for start, end in zip(edges, edges[1:], strict=False):
        end = min(end, nll.shape[1])
        values = nll[:, start:end]
        values = values[~values.isnan()]
        if values.numel():
            rows.append(_row(method, start, end, values.numel(), float(values.double().mean())))
    return rows


def merge(rows: list[dict], method: str, start: int, end: int) -> dict | None:
    """One row from the bucket rows of `method` inside `[start, end)` (token-weighted mean), labelled with the
    span they cover exactly: from the first one's start to the last one's end (an `end` past the data becomes
    where the data ends; a bucket that straddles `start` or `end` is left out, and the label says so). None
    when no bucket lies inside, or the ones inside leave a gap."""
    inside = sorted(
        (r for r in rows if r["method"] == method and r["bucket_start"] >= start and r["bucket_end"] <= end),
        key=lambda r: r["bucket_start"],
    )
    if not inside or any(a["bucket_end"] != b["bucket_start"] for a, b in zip(inside, inside[1:], strict=False)):
        return None
    tokens = sum(r["tokens"] for r in inside)
    nll = sum(r["nll"] * r["tokens"] for r in inside) / tokens
    return _row(method, inside[0]["bucket_start"], inside[-1]["bucket_end"], tokens, nll)


def _row(method: str, start: int, end: int, tokens: int, nll: float) -> dict:
    return {
        "method": method,
        "bucket_start": start,
        "bucket_end": end,
        "tokens": tokens,
        "nll": nll,
        "ppl": math.exp(nll),
    }


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    methods: Sequence[str | Method],
    n_global: int,
    n_local: int,
    buckets: BucketSpec = "pow2",
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> list[dict]:
    """Bucketed NLL rows for every method over `windows` (K, N), one window per forward pass.

    Each method switches the model once and scores every window (`Method.score`): vanilla, lminfinite,
    sinks and topk through `lminfinite.score` (vanilla exact, its cache growing with N), truncate with
    `truncate_nll`. A NaN or infinite NLL raises NonFiniteError; a bucket past the windows' last position
    raises BadValue. `progress=None` shows a bar on a terminal only.
    """
    edges = check_buckets(buckets, windows.shape[1] - 1)
    methods = [get(m) for m in methods]
    rows = []
    bar = progress_bar(len(methods) * len(windows), "ppl", "window", progress)
    for method in methods:
        bar.set_postfix_str(method.name)
        nll = []
        with method.applied(model, n_global, n_local):
            for k, window in enumerate(windows):
                nll.append(method.score(model, window, n_local, chunk_size))
                check_nll(nll[-1], method, k)
                bar.update()
        rows += bucketize(method.name, torch.stack(nll), edges)
    bar.close()
    return rows
